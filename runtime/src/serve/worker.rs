//! The worker: takes the queue's next group, samples it as one batch, answers each request.
//! A panic inside a group's work is caught and answered as an internal error; the server
//! goes on (with the model it ran in reopened).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use base64::Engine;
use ndarray::{concatenate, s, Array4, Axis};
use serde_json::json;

use crate::error::{Error, Result};
use crate::generate::{check_options, generate_chunks, SampleOptions};
use crate::model::Model;

use super::metrics::Metrics;
use super::models::Models;
use super::queue::{cancelled, Job, Queue};
use super::{Event, Failure};

pub(crate) fn work(mut models: Models, queue: &Queue, metrics: &Metrics) {
    while let Some(group) = queue.next_group() {
        let ids: Vec<String> = group.iter().map(|j| j.id.clone()).collect();
        let replies: Vec<_> = group
            .iter()
            .map(|j| (j.id.clone(), j.reply.clone()))
            .collect();
        let key = group[0].model.clone();
        let run = catch_unwind(AssertUnwindSafe(|| run_group(&mut models, group, metrics)));
        if run.is_err() {
            for (id, reply) in replies.iter().filter(|(_, r)| !r.answered()) {
                let failure = Failure::new(
                    "internal",
                    "the server panicked while sampling this request (a bug: please report it with the request); the server goes on",
                );
                reply.send(
                    Event::Failed {
                        id: Some(id.clone()),
                        failure,
                    },
                    metrics,
                );
            }
            if let Err(e) = models.forget(&key) {
                log::error!("serve: reopening {key} after a panic: {e}");
            }
        }
        metrics.set_models(models.keys());
        queue.done(&ids);
    }
}

fn fail(job: &Job, e: &Error, metrics: &Metrics) {
    let event = if job.cancelled() || matches!(e, Error::Cancelled) {
        cancelled(&job.id)
    } else {
        Event::Failed {
            id: Some(job.id.clone()),
            failure: Failure::from(e),
        }
    };
    job.reply.send(event, metrics);
}

/// Validates each request of `group` on its model (answering those refused), then samples
/// those whose library options share a batch key together.
fn run_group(models: &mut Models, group: Vec<Job>, metrics: &Metrics) {
    #[cfg(debug_assertions)]
    if let Some(id) = std::env::var_os("EDGEDIFF_SERVE_TEST_PANIC") {
        // Test hook (debug builds only): a request of this id panics in the worker.
        if group.iter().any(|j| *j.id == *id) {
            panic!("test panic for request {id:?}");
        }
    }
    let model = match models.get(&group[0].model) {
        Ok(m) => m,
        Err(e) => {
            group.iter().for_each(|j| fail(j, &e, metrics));
            return;
        }
    };
    let mut ready = Vec::new();
    for job in group {
        if job.cancelled() {
            job.reply.send(cancelled(&job.id), metrics);
            continue;
        }
        match prepare(model, &job) {
            Ok(opts) => ready.push((job, opts)),
            Err(e) => fail(&job, &e, metrics),
        }
    }
    while !ready.is_empty() {
        let key = batch_key(&ready[0].1);
        let (same, rest): (Vec<_>, Vec<_>) =
            ready.into_iter().partition(|(_, o)| batch_key(o) == key);
        run_batch(model, same, metrics);
        ready = rest;
    }
}

/// The request's library options, checked as `edgediff sample` checks them before any work,
/// its destination too.
fn prepare(model: &Model, job: &Job) -> Result<SampleOptions> {
    let opts = job.req.options(model)?;
    check_options(model, &opts, None)?;
    if let Some(path) = &job.req.output {
        crate::output::check_output(path)?;
    }
    Ok(opts)
}

/// Every option that changes the network calls of a batch: all but the per-sample ones
/// (count, streams, prompt) and cancellation.
fn batch_key(opts: &SampleOptions) -> String {
    let shared = SampleOptions {
        n: 0,
        seed: 0,
        prompt: None,
        streams: None,
        cancel: None,
        ..opts.clone()
    };
    format!("{shared:?}")
}

/// Samples `members` (requests of one batch key) as one run, each sample on its own stream,
/// and answers each.
#[allow(clippy::single_range_in_vec_init)] // one range of samples: all of them
fn run_batch(model: &mut Model, members: Vec<(Job, SampleOptions)>, metrics: &Metrics) {
    let start = Instant::now();
    let offsets: Vec<usize> = members
        .iter()
        .scan(0, |at, (_, o)| {
            let first = *at;
            *at += o.n;
            Some(first)
        })
        .collect();
    let total: usize = members.iter().map(|(_, o)| o.n).sum();
    let first = &members[0].1;
    // One prompt for all, or each sample its request's (the library's `prompts`).
    let row_prompts: Vec<Option<String>> = members
        .iter()
        .flat_map(|(_, o)| std::iter::repeat_n(o.prompt.clone(), o.n))
        .collect();
    let same_prompt = row_prompts.iter().all(|p| *p == row_prompts[0]);
    let group_cancel = Arc::new(AtomicBool::new(false));
    let merged = SampleOptions {
        n: total,
        streams: Some(
            members
                .iter()
                .flat_map(|(_, o)| o.streams.clone().unwrap_or_default())
                .collect(),
        ),
        prompt: if same_prompt {
            row_prompts[0].clone()
        } else {
            None
        },
        prompts: (!same_prompt).then(|| {
            row_prompts
                .iter()
                .map(|p| p.clone().unwrap_or_default())
                .collect()
        }),
        cancel: Some(group_cancel.clone()),
        ..first.clone()
    };
    let mut rows: Vec<Vec<Array4<f32>>> = vec![Vec::new(); members.len()];
    let mut progress = |done: usize, steps: usize| {
        let mut live = 0;
        for (job, _) in &members {
            if job.cancelled() {
                // Answered now; its rows are made with the others' and dropped.
                job.reply.send(cancelled(&job.id), metrics);
            } else {
                live += 1;
                job.reply.send(
                    Event::Progress {
                        id: job.id.clone(),
                        done,
                        total: steps,
                    },
                    metrics,
                );
            }
        }
        if live == 0 {
            group_cancel.store(true, Ordering::SeqCst);
        }
    };
    let mut sink = |at: usize, x: Array4<f32>| {
        let end = at + x.len_of(Axis(0));
        for (j, (_, o)) in members.iter().enumerate() {
            let (lo, hi) = (offsets[j].max(at), (offsets[j] + o.n).min(end));
            if lo < hi {
                rows[j].push(x.slice(s![lo - at..hi - at, .., .., ..]).to_owned());
            }
        }
        Ok(())
    };
    let run = generate_chunks(model, &merged, None, &[0..total], &mut progress, &mut sink);
    let report = match run {
        Ok(r) => r,
        Err(e) => {
            members.iter().for_each(|(j, _)| fail(j, &e, metrics));
            return;
        }
    };
    metrics.batch(report.network_calls, total);
    let range = model.metadata().data_range;
    for ((job, _), parts) in members.iter().zip(rows) {
        if job.cancelled() {
            job.reply.send(cancelled(&job.id), metrics);
            continue;
        }
        let answer = deliver(job, parts, range).map(|mut body| {
            body["network_calls"] = json!(report.network_calls);
            body["batch_requests"] = json!(members.len());
            body["batch_samples"] = json!(total);
            body["seconds"] = json!(start.elapsed().as_secs_f64());
            Event::Done {
                id: job.id.clone(),
                body,
            }
        });
        match answer {
            Ok(event) => job.reply.send(event, metrics),
            Err(e) => fail(job, &e, metrics),
        }
    }
}

/// Writes a request's samples where it asked (through the library's atomic writers), or
/// encodes them as base64 PNGs; the result's body.
fn deliver(job: &Job, parts: Vec<Array4<f32>>, range: [f64; 2]) -> Result<serde_json::Value> {
    let views: Vec<_> = parts.iter().map(|a| a.view()).collect();
    let x = concatenate(Axis(0), &views).map_err(|e| Error::invalid(e.to_string()))?;
    let n = x.len_of(Axis(0));
    match &job.req.output {
        Some(path) => {
            let files =
                crate::output::write_all(&x, path, range, None, job.req.first_index.unwrap_or(0))?;
            Ok(json!({"n": n, "files": files}))
        }
        None => {
            let b64 = base64::engine::general_purpose::STANDARD;
            let images = x
                .outer_iter()
                .map(|s| crate::image::sample_png(s, range).map(|png| b64.encode(png)))
                .collect::<Result<Vec<_>>>()?;
            Ok(json!({"n": n, "images": images}))
        }
    }
}
