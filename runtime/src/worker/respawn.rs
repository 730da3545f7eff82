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
use std::sync::{Arc, Mutex};
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
    /// The KV disk tier's root, under which each start makes the worker a directory of its
    /// own (`init.disk_dir`); `None`: no disk tier.
    pub disk_root: Option<std::path::PathBuf>,
}

impl Recipe {
    /// A new worker, in its group and behind its gate when the daemon isolates.
    pub fn spawn(&self) -> Started {
        self.spawn_watched(&Mutex::new(None))
    }

    /// As [`Recipe::spawn`], with the starting worker's pid in `starting` until the start
    /// ends, so that another thread can cut a start short (see [`Respawner`]'s drop).
    fn spawn_watched(&self, starting: &Mutex<Option<u32>>) -> Started {
        let sandbox = self.sandbox.as_deref().map(|s| (s, self.pool.as_str()));
        let note = |pid: Option<u32>| *starting.lock().unwrap_or_else(|p| p.into_inner()) = pid;
        let mut init = std::borrow::Cow::Borrowed(&self.init);
        if let Some(root) = &self.disk_root {
            init.to_mut().disk_dir = self.disk_dir(root);
        }
        let started = spawn(&init, &self.files, &self.identity, sandbox, &|pid| {
            note(Some(pid))
        });
        note(None);
        started
    }
}

impl Recipe {
    /// A fresh directory of the worker's own for its disk tier; `None` (logged) where one
    /// cannot be made, and the worker has no disk tier.
    fn disk_dir(&self, root: &std::path::Path) -> Option<std::path::PathBuf> {
        let made = crate::kv::disk::prepare_worker_dir(root, self.identity.uid, self.identity.gid);
        match made {
            Ok(dir) => Some(dir),
            Err(e) => {
                tracing::warn!(model = %self.init.model, pool = %self.pool, root = %root.display(), error = %e,
                    "cannot make the worker's KV disk tier directory; its preempted sequences the host tier cannot hold are recomputed");
                None
            }
        }
    }
}

/// The thread that starts an engine's replacement workers, and the one it is starting.
#[derive(Debug)]
pub(super) struct Respawner {
    orders: Option<mpsc::Sender<Duration>>,
    started: mpsc::Receiver<Started>,
    pending: bool,
    /// The pid of the worker being started, while a start is under way.
    starting: Arc<Mutex<Option<u32>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Respawner {
    pub(super) fn new(recipe: Recipe) -> std::io::Result<Self> {
        let (orders, ordered) = mpsc::channel::<Duration>();
        let (done, started) = mpsc::channel();
        let starting = Arc::new(Mutex::new(None));
        let watched = Arc::clone(&starting);
        let thread = std::thread::Builder::new()
            .name("worker-respawn".into())
            .spawn(move || {
                while let Ok(delay) = ordered.recv() {
                    // The backoff, cut short only by the engine going away.
                    if let Err(RecvTimeoutError::Disconnected) = ordered.recv_timeout(delay) {
                        return;
                    }
                    let result = recipe.spawn_watched(&watched);
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
            starting,
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

/// Ends a start in progress (its worker is killed: one hanging at start would otherwise hold
/// the drop for the whole start timeout) and waits for the thread, so that nothing of it
/// outlives the engine, whose group and gate go next.
impl Drop for Respawner {
    fn drop(&mut self) {
        self.orders.take();
        let Some(thread) = self.thread.take() else {
            return;
        };
        // Checked until the thread ends: a start may begin just after a first look.
        while !thread.is_finished() {
            // Our child, not yet reaped while its start runs, so the pid is still its own.
            if let Some(pid) = *self.starting.lock().unwrap_or_else(|p| p.into_inner()) {
                let pid = nix::unistd::Pid::from_raw(pid as i32);
                if let Err(e) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL) {
                    tracing::debug!(error = %e, "stopping a worker that was starting");
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = thread.join();
        // A worker that started after the engine stopped asking is stopped with `started`.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Instant;

    /// A replacement worker that hangs while starting (here: a program that never answers)
    /// does not hold the engine's drop for the start timeout: the drop kills it and returns.
    #[test]
    fn dropping_the_engine_ends_a_start_that_hangs() {
        let dir = tempfile::tempdir().unwrap();
        let program = dir.path().join("hangs");
        std::fs::write(&program, "#!/bin/sh\nexec /bin/sleep 600\n").unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        let recipe = Recipe {
            init: WorkerInit {
                model: "m".into(),
                path: None,
                spec: crate::config::ModelSpec::default_model(),
                device: "cpu".into(),
                kernel_cache: None,
                files: Vec::new(),
                dirs: Vec::new(),
                disk_dir: None,
            },
            files: Vec::new(),
            identity: WorkerIdentity {
                user: "self".into(),
                uid: nix::unistd::getuid().as_raw(),
                gid: nix::unistd::getgid().as_raw(),
                program,
                lease: None,
            },
            sandbox: None,
            pool: "_shared".into(),
            disk_root: None,
        };
        let mut respawner = Respawner::new(recipe).unwrap();
        respawner.order(Duration::ZERO).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let pid = loop {
            if let Some(pid) = *respawner.starting.lock().unwrap() {
                break pid;
            }
            assert!(Instant::now() < deadline, "the start never began");
            std::thread::sleep(Duration::from_millis(5));
        };
        let dropped = Instant::now();
        drop(respawner);
        assert!(
            dropped.elapsed() < Duration::from_secs(5),
            "the drop took {:?}",
            dropped.elapsed()
        );
        let gone = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None);
        assert_eq!(
            gone,
            Err(nix::errno::Errno::ESRCH),
            "the hanging worker was reaped"
        );
    }
}
