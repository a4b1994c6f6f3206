//! `edgediff serve`: one process that keeps its models loaded and samples the requests of
//! many clients, two front doors (JSON lines on stdio, HTTP) over one request schema
//! ([`request::Request`]). Requests wait in one queue; one worker samples them, running
//! queued requests that share a model and every setting that shapes the network calls as one
//! batch, each sample still from its own request's `(seed, index)` stream
//! ([`crate::SampleOptions::streams`]), so a batched result is the bytes it is alone.
//! docs/serving.md describes the protocol.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::model::ModelOptions;

pub mod http;
mod metrics;
mod models;
mod queue;
pub mod request;
pub mod stdio;
mod worker;

pub use request::{OpenAiRequest, Request, MAX_REQUEST_BATCH, MAX_REQUEST_SAMPLES};

use metrics::Metrics;
use queue::{Job, Queue};
use request::ModelKey;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// How every model is opened (its `path` unused: see `models`).
    pub model: ModelOptions,
    /// Models loaded at start and kept for the server's life (a broken one stops the start).
    /// Default: none (each loaded on first use).
    pub models: Vec<std::path::PathBuf>,
    /// Models loaded on first use that stay resident, the least recently used evicted beyond
    /// it. Default: 2.
    pub max_models: usize,
    /// How long the first queued request of a batch waits for others to join it. Default:
    /// 5 ms.
    pub batch_window: Duration,
    /// Where the OpenAI route writes the PNGs of `response_format: url`. Default: none (such
    /// requests are refused).
    pub out_dir: Option<std::path::PathBuf>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            model: ModelOptions::default(),
            models: Vec::new(),
            max_models: 2,
            batch_window: Duration::from_millis(5),
            out_dir: None,
        }
    }
}

/// A failure as the server answers it: a stable `code` (the library's error kinds, as C's
/// statuses name them, and the server's own), the message, and the request field at fault.
#[derive(Debug, Clone)]
pub struct Failure {
    /// `argument`, `model`, `io`, `nonfinite`, `cancelled` (the library's kinds), `internal`
    /// (a panic), `bad_request` (malformed JSON, an unknown field, an id in use),
    /// `not_found` (route or id), `busy` (too many connections).
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

/// A library option's name as the request schema spells it.
fn field_name(lib: &str) -> String {
    match lib {
        "class_label" => "class".into(),
        "out" => "output".into(),
        other => other.into(),
    }
}

impl From<&Error> for Failure {
    fn from(e: &Error) -> Failure {
        let code = match e.exit_code() {
            2 => "argument",
            3 => "model",
            4 => "io",
            5 => "nonfinite",
            6 => "cancelled",
            _ => "internal",
        };
        Failure {
            code,
            message: e.message_with(&field_name),
            field: e.argument().and_then(|a| a.arg()).map(field_name),
        }
    }
}

impl Failure {
    pub fn new(code: &'static str, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
            field: None,
        }
    }

    /// A request body that does not fit the schema (`T`: [`Request`] or [`OpenAiRequest`]),
    /// as a `bad_request` naming the field at fault: serde's own message gives only a line
    /// and column ("invalid type: string \"ten\", expected usize").
    pub fn decode<T: serde::de::DeserializeOwned>(value: Value) -> std::result::Result<T, Failure> {
        if !value.is_object() {
            // serde would read an array as the struct's fields in order.
            return Err(Failure::new(
                "bad_request",
                "bad request: a request is a JSON object ({\"prompt\": ..., \"n\": ...})",
            ));
        }
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let mut f = Failure::new("bad_request", format!("bad request: {}", e.inner()));
            if path != "." {
                f.message = format!("bad request: {path}: {}", e.inner());
                f.field = Some(path);
            }
            f
        })
    }
}

/// What the server tells a client about a request.
#[derive(Debug, Clone)]
pub enum Event {
    /// `done` of `total` sampling steps of the request's batch.
    Progress {
        id: String,
        done: usize,
        total: usize,
    },
    /// The request's answer: a JSON object (`files` or `images`, and figures).
    Done { id: String, body: Value },
    /// The request failed.
    Failed {
        id: Option<String>,
        failure: Failure,
    },
    /// The answer to a cancel line: whether request `id` was queued or running.
    Cancel { id: String, found: bool },
}

impl Event {
    /// The event as one JSON object (a stdio line, an HTTP body).
    pub fn to_json(&self) -> Value {
        match self {
            Event::Progress { id, done, total } => {
                json!({"id": id, "event": "progress", "done": done, "total": total})
            }
            Event::Done { id, body } => {
                let mut v = json!({"id": id, "event": "result"});
                if let (Value::Object(m), Value::Object(b)) = (&mut v, body) {
                    m.extend(b.clone());
                }
                v
            }
            Event::Failed { id, failure } => json!({
                "id": id, "event": "error", "code": failure.code,
                "message": failure.message, "field": failure.field,
            }),
            Event::Cancel { id, found } => json!({"id": id, "event": "cancel", "found": found}),
        }
    }

    /// Whether it ends the request (a result or an error).
    pub fn is_final(&self) -> bool {
        matches!(self, Event::Done { .. } | Event::Failed { .. })
    }
}

/// Where a request's events go; its final one is sent once.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    tx: Sender<Event>,
    answered: Arc<AtomicBool>,
}

impl Reply {
    pub fn new(tx: Sender<Event>) -> Reply {
        Reply {
            tx,
            answered: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Sends `event`; a final one only if none was sent before (a client that left is not
    /// an error).
    pub fn send(&self, event: Event, metrics: &Metrics) {
        if event.is_final() {
            if self.answered.swap(true, Ordering::SeqCst) {
                return;
            }
            metrics.outcome(match &event {
                Event::Failed { failure, .. } => failure.code,
                _ => "ok",
            });
        }
        let _ = self.tx.send(event);
    }

    pub fn answered(&self) -> bool {
        self.answered.load(Ordering::SeqCst)
    }
}

/// A running server: the queue, its worker, the figures.
pub struct Server {
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
    worker: Mutex<Option<JoinHandle<()>>>,
    next_id: AtomicU64,
    out_dir: Option<std::path::PathBuf>,
}

impl Server {
    /// Loads ONNX Runtime and the models named at start, and starts the worker.
    pub fn start(opts: ServeOptions) -> Result<Server> {
        let pinned: Vec<ModelKey> = opts.models.iter().map(|p| ModelKey::of(p)).collect();
        let models = models::Models::open(opts.model.clone(), &pinned, opts.max_models)?;
        let queue = Arc::new(Queue::new(opts.batch_window));
        let metrics = Arc::new(Metrics::new(models.keys()));
        let worker = {
            let (queue, metrics) = (queue.clone(), metrics.clone());
            std::thread::Builder::new()
                .name("edgediff-serve-worker".into())
                .spawn(move || worker::work(models, &queue, &metrics))
                .map_err(Error::io("starting the worker thread"))?
        };
        Ok(Server {
            queue,
            metrics,
            worker: Mutex::new(Some(worker)),
            next_id: AtomicU64::new(1),
            out_dir: opts.out_dir,
        })
    }

    /// A fresh request id.
    pub fn new_id(&self) -> String {
        format!("req-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Queues `req`; its events go to `tx` (an error at once if it is refused). Returns its
    /// id.
    pub fn submit(&self, req: Request, tx: Sender<Event>) -> String {
        let id = req.id.clone().unwrap_or_else(|| self.new_id());
        let reply = Reply::new(tx);
        let refuse = |failure: Failure| {
            reply.send(
                Event::Failed {
                    id: Some(id.clone()),
                    failure,
                },
                &self.metrics,
            )
        };
        if let Err(e) = req.check_bounds() {
            refuse(Failure::from(&e));
            return id;
        }
        let model = match req.model_key() {
            Ok(k) => k,
            Err(e) => {
                refuse(Failure::from(&e));
                return id;
            }
        };
        let job = Job {
            id: id.clone(),
            group: queue::group_key(&model, &req),
            model,
            req,
            cancel: Arc::new(AtomicBool::new(false)),
            reply: reply.clone(),
            arrived: Instant::now(),
        };
        if let Err(failure) = self.queue.submit(job) {
            refuse(failure);
        }
        id
    }

    /// Cancels request `id`: a queued one is answered `cancelled` now, a running one before
    /// its batch's next network call (or at once, if others share the batch). False if no
    /// such request is queued or running.
    pub fn cancel(&self, id: &str) -> bool {
        self.queue.cancel(id, &self.metrics)
    }

    /// `/health`'s answer.
    pub fn health(&self) -> Value {
        json!({"status": "ok", "queue_depth": self.queue.depth(), "running": self.queue.running(),
               "models": self.metrics.models()})
    }

    /// `/metrics`' answer, in Prometheus' text format.
    pub fn metrics_text(&self) -> String {
        self.metrics
            .prometheus(self.queue.depth(), self.queue.running())
    }

    /// Where the OpenAI route's `url` images go.
    pub fn out_dir(&self) -> Option<&std::path::Path> {
        self.out_dir.as_deref()
    }

    /// Finishes the queued work, then stops the worker.
    pub fn finish(&self) {
        self.queue.close();
        if let Some(w) = self.worker.lock().expect("worker handle").take() {
            let _ = w.join();
        }
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}
