//! `edgediff serve`: the library's server (edgediff::serve) on stdio or HTTP.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use argh::FromArgs;

use edgediff::serve::{http, stdio, ServeOptions, Server};
use edgediff::{Error, Result};

use super::model_args::model_command;

model_command! {
@model {
    /// a model file or pipeline folder loaded at start and kept (repeatable); requests may
    /// name others, loaded on first use (default: the shipped MNIST model, and with a prompt
    /// models/mnist-t2i, each loaded on first use)
    #[argh(option)]
    model: Vec<PathBuf>,
}
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "serve")]
/// Serve sampling requests with the models kept loaded: JSON lines on stdio, or HTTP
/// (docs/serving.md).
pub struct ServeCmd {
    /// read JSON requests from stdin, one per line; write JSON events to stdout
    #[argh(switch)]
    stdio: bool,
    /// serve HTTP on this address, e.g. 127.0.0.1:8000 (port 0: any free port, printed)
    #[argh(option)]
    listen: Option<String>,
    /// models loaded on first use kept resident, the least recently used evicted (default 2)
    #[argh(option, default = "2")]
    max_models: usize,
    /// milliseconds the first queued request waits for others to share its batch (default 5)
    #[argh(option, default = "5")]
    batch_window_ms: u64,
    /// folder for the PNGs of OpenAI requests with response_format url
    #[argh(option)]
    out_dir: Option<PathBuf>,
}
}

pub fn serve(cmd: ServeCmd) -> Result<()> {
    let out_dir = match &cmd.out_dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(Error::io(format!("creating {}", d.display())))?;
            Some(
                std::fs::canonicalize(d)
                    .map_err(Error::io(format!("resolving {}", d.display())))?,
            )
        }
        None => None,
    };
    let opts = ServeOptions {
        model: cmd.model_options()?,
        models: cmd.model.clone(),
        max_models: cmd.max_models,
        batch_window: Duration::from_millis(cmd.batch_window_ms),
        out_dir,
    };
    match (cmd.stdio, &cmd.listen) {
        (true, None) => {
            let server = Server::start(opts)?;
            stdio::serve(&server, std::io::stdin().lock(), std::io::stdout())
        }
        (false, Some(addr)) => http::serve(Arc::new(Server::start(opts)?), addr),
        _ => Err(Error::invalid("give one of --stdio and --listen ADDR")),
    }
}
