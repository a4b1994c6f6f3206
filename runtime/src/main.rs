fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli: edgediff::cli::Cli = argh::from_env();
    if let Err(e) = edgediff::cli::run(cli) {
        eprintln!("edgediff: error: {e}");
        std::process::exit(e.exit_code());
    }
}
