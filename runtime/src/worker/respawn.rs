//! Replacement workers, started off the device loop's thread. The backoff before a restart
//! and the start itself (a process, its cgroup and device gate, the model mapped) used to run
//! on the device loop, stalling every other model on the device for as long as they took (up
//! to 3.2 s of backoff alone); now the loop only asks, each turn, whether the replacement is
//! up, and the model's requests wait in its queue meanwhile.
//!
//! One long-lived thread per engine that has lost a worker: a worker's parent-death signal
//! follows the *thread* that started it, so that thread must live as long as the workers it
//! starts may, which is as long as the engine.

use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use super::remote::{spawn, Connection, WorkerIdentity};
use super::sandbox::Sandbox;
use super::{WorkerInit, WorkerReady};

/// A started worker, or why it could not start.
pub(super) type Started = Result<(Connection, WorkerReady), String>;

/// What a worker is started from: the engine keeps it, and its respawn thread a copy.
#[derive(Debug, Clone)]
pub(super) struct Recipe {
    pub init: WorkerInit,
    pub files: Vec<Arc<std::fs::File>>,
    pub identity: WorkerIdentity,
    pub sandbox: Option<Arc<Sandbox>>,
    pub pool: String,
}

impl Recipe {
    /// A new worker, in its group and behind its gate when the daemon isolates.
    pub fn spawn(&self) -> Started {
        let sandbox = self.sandbox.as_deref().map(|s| (s, self.pool.as_str()));
        spawn(&self.init, &self.files, &self.identity, sandbox)
    }
}

/// The thread that starts an engine's replacement workers, and the one it is starting.
#[derive(Debug)]
pub(super) struct Respawner {
    orders: Option<mpsc::Sender<Duration>>,
    started: mpsc::Receiver<Started>,
    pending: bool,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Respawner {
    pub(super) fn new(recipe: Recipe) -> std::io::Result<Self> {
        let (orders, ordered) = mpsc::channel::<Duration>();
        let (done, started) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("worker-respawn".into())
            .spawn(move || {
                while let Ok(delay) = ordered.recv() {
                    // The backoff, cut short only by the engine going away.
                    if let Err(RecvTimeoutError::Disconnected) = ordered.recv_timeout(delay) {
                        return;
                    }
                    let result = recipe.spawn();
                    // An engine gone meanwhile drops the worker with the channel.
                    if done.send(result).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Self {
            orders: Some(orders),
            started,
            pending: false,
            thread: Some(thread),
        })
    }

    /// Starts a worker after `delay`, unless one is on its way already.
    pub(super) fn order(&mut self, delay: Duration) -> Result<(), String> {
        if self.pending {
            return Ok(());
        }
        self.orders
            .as_ref()
            .ok_or("the thread starting workers is gone")?
            .send(delay)
            .map_err(|_| "the thread starting workers ended".to_owned())?;
        self.pending = true;
        Ok(())
    }

    /// Whether a worker ordered has not been taken yet.
    pub(super) fn pending(&self) -> bool {
        self.pending
    }

    /// The worker ordered, once it has started or failed to.
    pub(super) fn try_take(&mut self) -> Option<Started> {
        if !self.pending {
            return None;
        }
        match self.started.try_recv() {
            Ok(started) => {
                self.pending = false;
                Some(started)
            }
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => {
                self.pending = false;
                Some(Err("the thread starting workers ended".into()))
            }
        }
    }
}

/// Waits for a start in progress to end (its worker is then stopped), so that nothing of it
/// outlives the engine, whose group and gate go next.
impl Drop for Respawner {
    fn drop(&mut self) {
        self.orders.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // A worker that started after the engine stopped asking is stopped with `started`.
    }
}
