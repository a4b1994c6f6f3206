//! The stdio front door: one JSON request per line on stdin, one JSON event per line on
//! stdout (progress, results, errors, each naming its request's id). A line
//! `{"cancel": "ID"}` cancels a request. At end of input the queued work is finished.

use std::io::{BufRead, Write};
use std::sync::mpsc::{channel, Sender};

use serde_json::Value;

use crate::error::{Error, Result};

use super::{Event, Failure, Request, Server};

/// Serves `input` until it ends, writing events to `output`.
pub fn serve(
    server: &Server,
    input: impl BufRead,
    output: impl Write + Send + 'static,
) -> Result<()> {
    let (tx, rx) = channel::<Event>();
    let printer = std::thread::spawn(move || {
        let mut out = output;
        for event in rx {
            // A reader that went away is no reason to stop the work of the others.
            let _ = writeln!(out, "{}", event.to_json()).and_then(|_| out.flush());
        }
    });
    for line in input.lines() {
        let line = line.map_err(Error::io("reading requests from stdin"))?;
        if !line.trim().is_empty() {
            handle_line(server, &line, &tx);
        }
    }
    server.finish();
    drop(tx);
    let _ = printer.join();
    Ok(())
}

/// A request line, a cancel line, or an error event for a line that is neither.
fn handle_line(server: &Server, line: &str, tx: &Sender<Event>) {
    let value: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return bad_request(server, tx, None, format!("not a JSON object: {e}")),
    };
    let id = value.get("id").and_then(Value::as_str).map(str::to_string);
    if let Some(target) = value
        .as_object()
        .filter(|m| m.len() == 1)
        .and_then(|m| m.get("cancel"))
    {
        let Some(target) = target.as_str() else {
            return bad_request(
                server,
                tx,
                None,
                "cancel takes a request id (a string)".into(),
            );
        };
        let found = server.cancel(target);
        let _ = tx.send(Event::Cancel {
            id: target.to_string(),
            found,
        });
        return;
    }
    match Failure::decode::<Request>(value) {
        Ok(req) => {
            server.submit(req, tx.clone());
        }
        Err(failure) => refuse(server, tx, id, failure),
    }
}

fn bad_request(server: &Server, tx: &Sender<Event>, id: Option<String>, message: String) {
    refuse(server, tx, id, Failure::new("bad_request", message));
}

fn refuse(server: &Server, tx: &Sender<Event>, id: Option<String>, failure: Failure) {
    server.metrics().outcome(failure.code);
    let _ = tx.send(Event::Failed { id, failure });
}
