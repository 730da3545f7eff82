//! Running a job: its unanswered lines go through the same handlers as API requests, as the
//! job's tenant in the batch class, `jobs.concurrency` at a time; each answer is journaled as
//! it arrives.
//!
//! A line the daemon cannot serve right now (its tenant's queue is full: 429; the model or a
//! worker is down: 503) is retried after a wait, not answered with the failure: a batch is
//! worth finishing. A line that is not a valid request fails alone, in the error file. While
//! the daemon is drained no line is started, and lines wait for the undrain (or, when the
//! daemon stops, for the next start).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::task::JoinSet;

use super::{Job, Status, MAX_CUSTOM_ID_BYTES};
use crate::state::DaemonState;

/// Most attempts at a line whose failure is the server's (503) before that is its answer:
/// with the backoff below, about ten minutes, long enough for a worker or model to come back.
const SERVER_FAILURE_ATTEMPTS: u32 = 24;
/// Longest wait between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often a job drained by an operator looks for the undrain.
const DRAIN_POLL: Duration = Duration::from_millis(250);

/// What a line came to.
#[derive(Debug)]
pub enum LineResult {
    /// Its answer: failed or not, and its output line.
    Answer { failed: bool, output: Vec<u8> },
    /// Not answered (the daemon is draining, or the job was cancelled): left for later.
    Unanswered,
    /// The job cannot go on.
    JobFails(String),
}

/// How a request line reached the API, for the runner.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub retry_after: Option<u64>,
}

/// A request line in OpenAI's batch input format.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestLine {
    custom_id: String,
    method: String,
    url: String,
    body: serde_json::Map<String, Value>,
}

/// Endpoints a line may name.
pub const LINE_URLS: [&str; 2] = ["/v1/chat/completions", "/v1/completions"];

/// Starts running `job` unless it is finished.
pub fn spawn(state: Arc<DaemonState>, job: Arc<Job>) {
    if job.status().is_finished() {
        return;
    }
    tokio::spawn(drive(state, job));
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

async fn drive(state: Arc<DaemonState>, job: Arc<Job>) {
    let id = job.meta.id.clone();
    if job.status() == Status::Cancelling {
        finish(&job, Status::Cancelled, None).await;
        return;
    }
    {
        let job = job.clone();
        if let Some(Err(e)) = blocking(move || job.mark_started()).await {
            tracing::warn!(job = %id, error = %e, "cannot journal the job's start");
        }
    }
    let concurrency = state.jobs.config.concurrency.max(1);
    let mut pending: VecDeque<u32> = job.pending().into();
    tracing::info!(job = %id, tenant = %job.meta.tenant, pending = pending.len(), total = job.meta.lines, "running batch job");
    let mut in_flight: JoinSet<(u32, LineResult)> = JoinSet::new();
    // Which line each task serves, so a task that ends without its result (aborted) leaves
    // its line to be answered again rather than lost.
    let mut line_of: std::collections::HashMap<tokio::task::Id, u32> =
        std::collections::HashMap::new();
    let mut cancel = job.cancelled();
    loop {
        if *cancel.borrow_and_update() {
            // Dropping a line's future drops its generation, which frees its sequence.
            in_flight.abort_all();
            while in_flight.join_next().await.is_some() {}
            finish(&job, Status::Cancelled, None).await;
            tracing::info!(job = %id, "batch job cancelled");
            return;
        }
        while !state.draining() && in_flight.len() < concurrency {
            let Some(line) = pending.pop_front() else {
                break;
            };
            let (state, job) = (state.clone(), job.clone());
            let task = in_flight.spawn(async move {
                // A panic in serving one line is that line's failure, not the job's.
                let result = std::panic::AssertUnwindSafe(answer_line(&state, &job, line))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|_| {
                        tracing::error!(job = %job.meta.id, line = line + 1, "serving a job line panicked");
                        LineResult::Answer {
                            failed: true,
                            output: invalid_output(&job, line, None, "internal_error", "serving this line failed inside the daemon; see its log"),
                        }
                    });
                (line, result)
            });
            line_of.insert(task.id(), line);
        }
        if in_flight.is_empty() {
            if pending.is_empty() {
                finish(&job, Status::Completed, None).await;
                let counts = job.view().request_counts;
                tracing::info!(job = %id, completed = counts.completed, failed = counts.failed, "batch job completed");
                return;
            }
            if state.stopping() {
                tracing::info!(job = %id, pending = pending.len(), "batch job paused as the daemon stops; it resumes at the next start");
                return;
            }
            // Drained by an operator: wait for the undrain (or a cancel).
            tokio::select! {
                _ = tokio::time::sleep(DRAIN_POLL) => {}
                _ = cancel.changed() => {}
            }
            continue;
        }
        tokio::select! {
            joined = in_flight.join_next_with_id() => {
                let (line, result) = match joined {
                    Some(Ok((task, done))) => {
                        line_of.remove(&task);
                        done
                    }
                    Some(Err(e)) => {
                        if let Some(line) = line_of.remove(&e.id()) {
                            pending.push_front(line);
                        }
                        continue;
                    }
                    None => continue,
                };
                match result {
                    LineResult::Answer { failed, output } => {
                        let recorder = job.clone();
                        let kept = output.clone();
                        match blocking(move || recorder.answer(line, failed, output)).await {
                            Some(Ok(_)) => {}
                            Some(Err(e)) if e.kind() == std::io::ErrorKind::InvalidInput => {
                                // Too large for a record: the line fails with a small answer.
                                let output = invalid_output(&job, line, None, "answer_too_large", &e.to_string());
                                let task = in_flight.spawn(async move { (line, LineResult::Answer { failed: true, output }) });
                                line_of.insert(task.id(), line);
                            }
                            other => {
                                let error = match other {
                                    Some(Err(e)) => e.to_string(),
                                    _ => "the journal writer stopped".into(),
                                };
                                // The answer is kept and journaled again later: the work is not
                                // redone, and nothing is answered before it is journaled.
                                tracing::error!(job = %id, line = line + 1, %error, "cannot journal a line's answer; retrying in 5 s");
                                let task = in_flight.spawn(async move {
                                    tokio::time::sleep(Duration::from_secs(5)).await;
                                    (line, LineResult::Answer { failed, output: kept })
                                });
                                line_of.insert(task.id(), line);
                            }
                        }
                    }
                    LineResult::Unanswered => pending.push_front(line),
                    LineResult::JobFails(reason) => {
                        in_flight.abort_all();
                        while in_flight.join_next().await.is_some() {}
                        tracing::warn!(job = %id, %reason, "batch job failed");
                        finish(&job, Status::Failed, Some(reason)).await;
                        return;
                    }
                }
            }
            _ = cancel.changed() => {}
        }
    }
}

/// Journals the job's end, retrying until it is recorded: a job whose end is not journaled
/// would hold its tenant's place and run again at the next start.
async fn finish(job: &Arc<Job>, status: Status, error: Option<String>) {
    let mut wait = Duration::from_secs(1);
    loop {
        let (recorder, error) = (job.clone(), error.clone());
        match blocking(move || recorder.finish(status, error)).await {
            Some(Ok(_)) => return,
            other => {
                let why = match other {
                    Some(Err(e)) => e.to_string(),
                    _ => "the journal writer stopped".into(),
                };
                tracing::error!(job = %job.meta.id, error = %why, "cannot journal the job's end; retrying");
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(MAX_BACKOFF);
    }
}

/// An error-file line for a line that never reached a handler.
fn invalid_output(
    job: &Job,
    line: u32,
    custom_id: Option<&str>,
    code: &str,
    message: &str,
) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": format!("{}-{}", job.meta.id, line + 1),
        "custom_id": custom_id,
        "response": null,
        "error": {"code": code, "message": format!("line {}: {message}", line + 1)},
    }))
    .unwrap_or_default()
}

/// Reads, checks and serves one line, retrying what the server could not do now.
async fn answer_line(state: &Arc<DaemonState>, job: &Arc<Job>, line: u32) -> LineResult {
    let limit = state.config.max_request_body.bytes();
    let raw = {
        let reader = job.clone();
        match blocking(move || reader.read_line(line, limit)).await {
            Some(Ok(Ok(raw))) => raw,
            Some(Ok(Err(len))) => {
                return LineResult::Answer {
                    failed: true,
                    output: invalid_output(
                        job,
                        line,
                        None,
                        "invalid_line",
                        &format!("the line is {len} bytes, over max_request_body ({limit}); shorten the request"),
                    ),
                }
            }
            Some(Err(e)) => {
                return LineResult::JobFails(format!("cannot read the job's input file: {e}"))
            }
            None => return LineResult::Unanswered,
        }
    };
    let invalid = |custom_id: Option<&str>, message: &str| LineResult::Answer {
        failed: true,
        output: invalid_output(job, line, custom_id, "invalid_line", message),
    };
    let request: RequestLine = match serde_json::from_slice(&raw) {
        Ok(r) => r,
        Err(e) => {
            // Name the custom_id if the line has one, so the error can be matched.
            let custom_id = serde_json::from_slice::<Value>(&raw).ok().and_then(|v| {
                v.get("custom_id")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            });
            return invalid(
                custom_id.as_deref(),
                &format!("not a request in the batch format ({{\"custom_id\", \"method\", \"url\", \"body\"}}): {e}"),
            );
        }
    };
    let custom_id = Some(request.custom_id.as_str());
    if request.custom_id.is_empty() || request.custom_id.len() > MAX_CUSTOM_ID_BYTES {
        return invalid(
            None,
            &format!("custom_id must be 1 to {MAX_CUSTOM_ID_BYTES} bytes"),
        );
    }
    if request.method != "POST" {
        return invalid(
            custom_id,
            &format!("method is {:?}; only POST is supported", request.method),
        );
    }
    if !LINE_URLS.contains(&request.url.as_str()) {
        return invalid(
            custom_id,
            &format!(
                "url {:?} is not one of {}",
                request.url.chars().take(80).collect::<String>(),
                LINE_URLS.join(", ")
            ),
        );
    }
    if request.body.get("stream").and_then(Value::as_bool) == Some(true) {
        return invalid(
            custom_id,
            "body.stream is true; a job's answers are written whole, so leave stream out",
        );
    }
    let body = match serde_json::to_vec(&request.body) {
        Ok(b) => axum::body::Bytes::from(b),
        Err(e) => return invalid(custom_id, &format!("body cannot be encoded: {e}")),
    };
    let mut cancelled = job.cancelled();
    let mut server_failures = 0u32;
    loop {
        if state.draining() || *cancelled.borrow_and_update() {
            return LineResult::Unanswered;
        }
        let reply =
            match crate::api::serve_job_line(state, &job.meta.tenant, &request.url, body.clone())
                .await
            {
                Ok(reply) => reply,
                Err(reason) => return LineResult::JobFails(reason),
            };
        let wait = match reply.status {
            429 => Some(Duration::from_secs(
                reply.retry_after.unwrap_or(1).clamp(1, 60),
            )),
            503 if server_failures + 1 < SERVER_FAILURE_ATTEMPTS => {
                server_failures += 1;
                Some((Duration::from_secs(1) * 2u32.pow(server_failures)).min(MAX_BACKOFF))
            }
            503 if state.draining() => return LineResult::Unanswered,
            _ => None,
        };
        if let Some(wait) = wait {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = cancelled.changed() => {}
            }
            continue;
        }
        let request_id = reply
            .body
            .get("id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let output = serde_json::to_vec(&json!({
            "id": format!("{}-{}", job.meta.id, line + 1),
            "custom_id": request.custom_id,
            "response": {
                "status_code": reply.status,
                "request_id": request_id,
                "body": reply.body,
            },
            "error": null,
        }))
        .unwrap_or_default();
        return LineResult::Answer {
            failed: reply.status != 200,
            output,
        };
    }
}
