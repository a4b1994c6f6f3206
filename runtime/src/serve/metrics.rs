//! The server's figures, for `GET /metrics` (Prometheus' text format) and `/health`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

pub(crate) struct Metrics {
    start: Instant,
    images: AtomicU64,
    model_calls: AtomicU64,
    batches: AtomicU64,
    /// Answered requests by outcome (`ok` or an error code).
    outcomes: Mutex<BTreeMap<&'static str, u64>>,
    /// The resident models, as the worker last saw them.
    models: Mutex<Vec<String>>,
}

impl Metrics {
    pub fn new(models: Vec<String>) -> Metrics {
        Metrics {
            start: Instant::now(),
            images: AtomicU64::new(0),
            model_calls: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            outcomes: Mutex::new(BTreeMap::new()),
            models: Mutex::new(models),
        }
    }

    pub fn outcome(&self, code: &'static str) {
        *self
            .outcomes
            .lock()
            .expect("metrics")
            .entry(code)
            .or_default() += 1;
    }

    /// A batch ran: `calls` network calls for `images` samples kept.
    pub fn batch(&self, calls: usize, images: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.model_calls.fetch_add(calls as u64, Ordering::Relaxed);
        self.images.fetch_add(images as u64, Ordering::Relaxed);
    }

    pub fn set_models(&self, models: Vec<String>) {
        *self.models.lock().expect("metrics") = models;
    }

    pub fn models(&self) -> Vec<String> {
        self.models.lock().expect("metrics").clone()
    }

    pub fn prometheus(&self, queue_depth: usize, running: usize) -> String {
        let images = self.images.load(Ordering::Relaxed);
        let secs = self.start.elapsed().as_secs_f64();
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = write!(
                out,
                "# HELP edgediff_{name} {help}\n# TYPE edgediff_{name} {kind}\n{value}\n"
            );
        };
        let plain = |name: &str, v: f64| format!("edgediff_{name} {v}");
        metric(
            "queue_depth",
            "gauge",
            "Requests waiting to be sampled.",
            plain("queue_depth", queue_depth as f64),
        );
        metric(
            "requests_running",
            "gauge",
            "Requests being sampled.",
            plain("requests_running", running as f64),
        );
        metric(
            "images_generated_total",
            "counter",
            "Samples made for requests answered or running.",
            plain("images_generated_total", images as f64),
        );
        metric(
            "images_per_second",
            "gauge",
            "Samples made per second since the server started.",
            plain("images_per_second", images as f64 / secs.max(1e-9)),
        );
        metric(
            "model_calls_total",
            "counter",
            "Network calls, one per batch evaluated.",
            plain(
                "model_calls_total",
                self.model_calls.load(Ordering::Relaxed) as f64,
            ),
        );
        metric(
            "batches_total",
            "counter",
            "Batches run (each one or more requests).",
            plain("batches_total", self.batches.load(Ordering::Relaxed) as f64),
        );
        let outcomes = self.outcomes.lock().expect("metrics");
        let rows: Vec<String> = outcomes
            .iter()
            .map(|(k, v)| format!("edgediff_requests_total{{outcome=\"{k}\"}} {v}"))
            .collect();
        metric(
            "requests_total",
            "counter",
            "Requests answered, by outcome (ok or the error code).",
            rows.join("\n"),
        );
        metric(
            "uptime_seconds",
            "gauge",
            "Seconds since the server started.",
            plain("uptime_seconds", secs),
        );
        out
    }
}
