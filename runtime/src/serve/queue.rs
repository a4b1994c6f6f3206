//! The requests waiting and running, and which of them may share a batch.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::metrics::Metrics;
use super::request::{ModelKey, Request};
use super::{Event, Failure, Reply};

/// A queued request.
pub(crate) struct Job {
    pub id: String,
    pub req: Request,
    pub model: ModelKey,
    /// Requests of one group key may share a batch ([`group_key`]).
    pub group: String,
    pub cancel: Arc<AtomicBool>,
    pub reply: Reply,
    pub arrived: Instant,
}

impl Job {
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Samples per network call the request allows (the library's default, 64, if unset).
    pub fn batch_size(&self) -> usize {
        self.req
            .batch_size
            .unwrap_or(crate::generate::SampleOptions::default().batch_size)
    }
}

/// What must be equal for two requests to be sampled together, as given: the model and every
/// field but those that only choose a sample's stream, prompt or destination. (The worker
/// checks the library options they become too: `worker::batch_key`.)
pub(crate) fn group_key(model: &ModelKey, req: &Request) -> String {
    let shared = Request {
        id: None,
        n: None,
        seed: None,
        first_index: None,
        prompt: None,
        output: None,
        ..req.clone()
    };
    format!("{model}|{shared:?}")
}

struct State {
    queued: VecDeque<Job>,
    /// The running requests' ids and cancel flags.
    running: Vec<(String, Arc<AtomicBool>)>,
    closed: bool,
}

pub(crate) struct Queue {
    state: Mutex<State>,
    changed: Condvar,
    window: Duration,
}

impl Queue {
    pub fn new(window: Duration) -> Queue {
        Queue {
            state: Mutex::new(State {
                queued: VecDeque::new(),
                running: Vec::new(),
                closed: false,
            }),
            changed: Condvar::new(),
            window,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic never happens with the lock held (the worker's panics are caught outside
        // it), so poison is only a formality.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `job`; refused (the failure to answer) when its id is in use or the queue is
    /// closed.
    pub fn submit(&self, job: Job) -> Result<(), Failure> {
        let mut s = self.lock();
        if s.closed {
            return Err(Failure::new("bad_request", "the server is shutting down"));
        }
        let in_use =
            s.queued.iter().any(|j| j.id == job.id) || s.running.iter().any(|(i, _)| *i == job.id);
        if in_use {
            let mut f = Failure::new(
                "bad_request",
                format!(
                    "id '{}' is already queued or running; give each request its own id",
                    job.id
                ),
            );
            f.field = Some("id".into());
            return Err(f);
        }
        s.queued.push_back(job);
        self.changed.notify_all();
        Ok(())
    }

    /// Cancels `id` (see [`super::Server::cancel`]).
    pub fn cancel(&self, id: &str, metrics: &Metrics) -> bool {
        let mut s = self.lock();
        if let Some(i) = s.queued.iter().position(|j| j.id == id) {
            let job = s.queued.remove(i).expect("position is in range");
            drop(s);
            job.cancel.store(true, Ordering::SeqCst);
            job.reply.send(cancelled(&job.id), metrics);
            return true;
        }
        match s.running.iter().find(|(i, _)| i == id) {
            Some((_, flag)) => {
                flag.store(true, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    pub fn depth(&self) -> usize {
        self.lock().queued.len()
    }

    pub fn running(&self) -> usize {
        self.lock().running.len()
    }

    /// No more requests; the worker finishes those queued.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    /// The next batch's requests: the oldest queued one, once it has waited the batch window
    /// (or the queue is closed), and the queued ones of its group that fit in its batch size
    /// with it, oldest first. They count as running until [`Queue::done`]. None once the
    /// queue is closed and empty.
    pub fn next_group(&self) -> Option<Vec<Job>> {
        let mut s = self.lock();
        loop {
            if let Some(head) = s.queued.front() {
                let ready_at = head.arrived + self.window;
                let now = Instant::now();
                if now >= ready_at || s.closed {
                    break;
                }
                s = self
                    .changed
                    .wait_timeout(s, ready_at - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            } else if s.closed {
                return None;
            } else {
                s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
            }
        }
        let head = s.queued.pop_front().expect("a queued request");
        let limit = head.batch_size();
        let mut rows = head.req.samples();
        let mut group = vec![head];
        let mut i = 0;
        while i < s.queued.len() && rows < limit {
            let j = &s.queued[i];
            if j.group == group[0].group && rows + j.req.samples() <= limit {
                rows += j.req.samples();
                group.push(s.queued.remove(i).expect("index in range"));
            } else {
                i += 1;
            }
        }
        for j in &group {
            s.running.push((j.id.clone(), j.cancel.clone()));
        }
        Some(group)
    }

    /// The requests `ids` are answered.
    pub fn done(&self, ids: &[String]) {
        self.lock().running.retain(|(i, _)| !ids.contains(i));
    }
}

/// The answer to a cancelled request.
pub(crate) fn cancelled(id: &str) -> Event {
    Event::Failed {
        id: Some(id.to_string()),
        failure: Failure::new("cancelled", "cancelled by the client"),
    }
}
