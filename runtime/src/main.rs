mod cli;

fn main() {
    restore_sigpipe();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = parse_args();
    if let Err(e) = cli::run(cli) {
        eprintln!("edgediff: error: {}", e.message_with(&cli::flag));
        std::process::exit(e.exit_code());
    }
}

/// The command line as argh parses it, plus what argh lacks: `--version`/`-V` and `-h` (as
/// `--help`, in whichever position argh reads it).
fn parse_args() -> cli::Cli {
    let args: Vec<String> = std::env::args().collect();
    if matches!(args.get(1).map(String::as_str), Some("--version" | "-V")) && args.len() == 2 {
        println!("edgediff {}", edgediff::VERSION);
        std::process::exit(0);
    }
    let args: Vec<&str> = args
        .iter()
        .map(|a| if a == "-h" { "--help" } else { a.as_str() })
        .collect();
    let (cmd, rest) = args.split_first().expect("argv[0] is there");
    let name = std::path::Path::new(cmd)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("edgediff");
    match <cli::Cli as argh::FromArgs>::from_args(&[name], rest) {
        Ok(cli) => cli,
        Err(early) => {
            // argh's own help (exit 0) or usage error (exit 1).
            match early.status {
                Ok(()) => {
                    println!("{}", early.output);
                    std::process::exit(0)
                }
                Err(()) => {
                    eprintln!("{}\nRun {name} --help for more information.", early.output);
                    std::process::exit(1)
                }
            }
        }
    }
}

/// Rust starts programs with SIGPIPE ignored, so `println!` into a closed pipe
/// (`edgediff schedule --json | head`) panics. A command-line tool should end quietly there, as
/// `cat` does: restore the default action.
#[cfg(unix)]
fn restore_sigpipe() {
    const SIGPIPE: i32 = 13; // the same number on Linux and macOS
    const SIG_DFL: usize = 0;
    extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
    }
    // SAFETY: called first thing in main, before any thread exists; SIG_DFL is a valid action.
    unsafe {
        signal(SIGPIPE, SIG_DFL);
    }
}

#[cfg(not(unix))]
fn restore_sigpipe() {}
