//! The generation requests in flight, for operators: `GET /v1/requests` (`accelctl
//! requests`) lists them with their tenant, model, age and tokens so far, and a cancel stops
//! one.
//!
//! Each request's events pass through a small relay task that counts its tokens and watches
//! for a cancel; on a cancel it ends the request with an error event (answered 410
//! `cancelled`) and drops the runner's receiver, which frees the sequence on its device. The
//! entry leaves the registry when the request ends, however it ends (the client gone too).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::runner::{Event, Failure};

/// What the registry knows of a request when it starts.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    pub id: String,
    pub tenant: String,
    pub model: String,
    pub stream: bool,
    /// A batch job's line.
    pub batch: bool,
    pub prompt_tokens: usize,
}

#[derive(Debug)]
struct Entry {
    info: RequestInfo,
    started: Instant,
    started_at: u64,
    completion_tokens: AtomicU64,
    cancel: tokio::sync::watch::Sender<bool>,
}

/// One request as operators see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestView {
    pub id: String,
    pub tenant: String,
    pub model: String,
    pub stream: bool,
    pub batch: bool,
    pub started_at: u64,
    pub age_seconds: f64,
    pub prompt_tokens: usize,
    pub completion_tokens: u64,
}

/// The registry.
#[derive(Debug, Default)]
pub struct Requests {
    entries: Arc<Mutex<HashMap<String, Arc<Entry>>>>,
}

fn lock(
    m: &Mutex<HashMap<String, Arc<Entry>>>,
) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Entry>>> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Removes its entry when the relay ends.
struct Registration {
    entries: Arc<Mutex<HashMap<String, Arc<Entry>>>>,
    id: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.entries).remove(&self.id);
    }
}

impl Requests {
    /// Registers a request and relays its events; the returned receiver replaces `upstream`.
    /// Must be called within a tokio runtime.
    pub fn track(
        &self,
        info: RequestInfo,
        mut upstream: mpsc::UnboundedReceiver<Event>,
    ) -> mpsc::UnboundedReceiver<Event> {
        let (tx, rx) = mpsc::unbounded_channel();
        let entry = Arc::new(Entry {
            started: Instant::now(),
            started_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            completion_tokens: AtomicU64::new(0),
            cancel: tokio::sync::watch::channel(false).0,
            info,
        });
        let registration = Registration {
            entries: self.entries.clone(),
            id: entry.info.id.clone(),
        };
        lock(&self.entries).insert(entry.info.id.clone(), entry.clone());
        let mut cancelled = entry.cancel.subscribe();
        tokio::spawn(async move {
            let _registration = registration;
            loop {
                tokio::select! {
                    event = upstream.recv() => {
                        let Some(event) = event else { break };
                        let last = match &event {
                            Event::Token { .. } => {
                                entry.completion_tokens.fetch_add(1, Ordering::Relaxed);
                                false
                            }
                            Event::Done { .. } | Event::Error { .. } => true,
                        };
                        if tx.send(event).is_err() || last {
                            break;
                        }
                    }
                    _ = cancelled.changed() => {
                        let _ = tx.send(Event::Error {
                            message: "cancelled by an operator".into(),
                            cause: Failure::Cancelled,
                        });
                        break;
                    }
                    // The client is gone: stop relaying, so the generation stops too.
                    _ = tx.closed() => break,
                }
            }
            // Dropping `upstream` here tells the runner to free the sequence.
        });
        rx
    }

    /// Requests in flight, oldest first.
    pub fn list(&self) -> Vec<RequestView> {
        let mut views: Vec<RequestView> = lock(&self.entries)
            .values()
            .map(|e| RequestView {
                id: e.info.id.clone(),
                tenant: e.info.tenant.clone(),
                model: e.info.model.clone(),
                stream: e.info.stream,
                batch: e.info.batch,
                started_at: e.started_at,
                age_seconds: e.started.elapsed().as_secs_f64(),
                prompt_tokens: e.info.prompt_tokens,
                completion_tokens: e.completion_tokens.load(Ordering::Relaxed),
            })
            .collect();
        views.sort_by(|a, b| b.age_seconds.total_cmp(&a.age_seconds));
        views
    }

    /// The tenant of request `id`, if it is in flight.
    pub fn tenant_of(&self, id: &str) -> Option<String> {
        lock(&self.entries).get(id).map(|e| e.info.tenant.clone())
    }

    /// Cancels request `id`; false if it is not in flight.
    pub fn cancel(&self, id: &str) -> bool {
        match lock(&self.entries).get(id) {
            Some(entry) => {
                entry.cancel.send_replace(true);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::FinishReason;

    fn info(id: &str) -> RequestInfo {
        RequestInfo {
            id: id.into(),
            tenant: "alpha".into(),
            model: "m".into(),
            stream: false,
            batch: false,
            prompt_tokens: 3,
        }
    }

    fn token() -> Event {
        Event::Token {
            text: "a".into(),
            token: 1,
            logprob: 0.0,
            top: Vec::new(),
        }
    }

    #[tokio::test]
    async fn events_pass_through_counted_and_the_entry_leaves_when_done() {
        let requests = Requests::default();
        let (up, upstream) = mpsc::unbounded_channel();
        let mut rx = requests.track(info("r1"), upstream);
        up.send(token()).unwrap();
        up.send(token()).unwrap();
        assert_eq!(rx.recv().await, Some(token()));
        assert_eq!(rx.recv().await, Some(token()));
        let listed = requests.list();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].completion_tokens, 2);
        assert_eq!(listed[0].tenant, "alpha");
        let done = Event::Done {
            reason: FinishReason::Length,
            prompt_tokens: 3,
            completion_tokens: 2,
            cached_tokens: 0,
        };
        up.send(done.clone()).unwrap();
        assert_eq!(rx.recv().await, Some(done));
        assert_eq!(rx.recv().await, None);
        assert!(requests.list().is_empty());
    }

    #[tokio::test]
    async fn a_cancel_ends_the_request_and_drops_the_runners_receiver() {
        let requests = Requests::default();
        let (up, upstream) = mpsc::unbounded_channel();
        let mut rx = requests.track(info("r2"), upstream);
        assert!(requests.cancel("r2"));
        assert!(!requests.cancel("nope"));
        match rx.recv().await {
            Some(Event::Error { cause, message }) => {
                assert_eq!(cause, Failure::Cancelled);
                assert!(message.contains("operator"));
            }
            other => panic!("{other:?}"),
        }
        // The runner sees its receiver gone: that is how the sequence is freed.
        up.closed().await;
        assert!(requests.list().is_empty());
    }

    #[tokio::test]
    async fn a_client_that_leaves_stops_the_relay() {
        let requests = Requests::default();
        let (up, upstream) = mpsc::unbounded_channel();
        let rx = requests.track(info("r3"), upstream);
        drop(rx);
        up.closed().await;
        assert!(requests.list().is_empty());
    }
}
