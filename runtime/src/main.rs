mod cli;

fn main() {
    restore_sigpipe();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli: cli::Cli = argh::from_env();
    if let Err(e) = cli::run(cli) {
        eprintln!("edgediff: error: {}", e.message_with(&cli::flag));
        std::process::exit(e.exit_code());
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
