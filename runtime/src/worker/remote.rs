//! The supervisor's side of a worker: spawning it with its privileges dropped, and
//! [`RemoteEngine`], an engine whose every operation is a request to it.

use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd as _;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::proto::{self, tag};
use super::respawn::{Recipe, Respawner};
use super::{Sandbox, WorkerInit, WorkerReady, SOCKET_FD};
use crate::engine::ops::{Counters, EngineOps, Loss};
use crate::engine::{EngineError, SeqId, StepInput, StepOutput};

/// Longest a worker may take to load its model and report ready.
const START_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest one request may take before the worker counts as hung and is replaced.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// A worker lost this many times within [`CRASH_WINDOW`] is not started again.
const MAX_CRASHES: usize = 5;
const CRASH_WINDOW: Duration = Duration::from_secs(60);
/// Environment a worker keeps: where to find the CUDA libraries and how to log.
const KEPT_ENV: [&str; 6] = [
    "PATH",
    "LD_LIBRARY_PATH",
    "RUST_LOG",
    "RUST_BACKTRACE",
    "CUDA_VISIBLE_DEVICES",
    // GPU N must be the same GPU in the worker as in acceld.
    "CUDA_DEVICE_ORDER",
];

/// The running binary, which is also the worker.
const SELF: &str = "/proc/self/exe";

/// The user and group workers run as, and the program they run.
#[derive(Debug, Clone)]
pub struct WorkerIdentity {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    /// `acceld` itself (`/proc/self/exe`, which holds even if the file is replaced); a test or
    /// benchmark names the built binary.
    pub program: PathBuf,
    /// The id of its own a worker holds (see [`super::uids`]); `None` for the shared user.
    pub lease: Option<std::sync::Arc<super::uids::Lease>>,
}

impl WorkerIdentity {
    /// `configured`, else the `accel-worker` system user, else `nobody`. A daemon that is not
    /// root cannot switch users: its workers run as itself.
    pub fn resolve(configured: Option<&str>) -> Result<Self, String> {
        let me = nix::unistd::getuid();
        if !me.is_root() {
            tracing::warn!(
                uid = me.as_raw(),
                "acceld is not root: workers run as its own user"
            );
            return Ok(Self {
                user: format!("uid {}", me.as_raw()),
                uid: me.as_raw(),
                gid: nix::unistd::getgid().as_raw(),
                program: PathBuf::from(SELF),
                lease: None,
            });
        }
        let lookup = |name: &str| nix::unistd::User::from_name(name).ok().flatten();
        let user = match configured {
            Some(name) => lookup(name).ok_or_else(|| {
                format!("worker_user {name:?} does not exist; create it (useradd --system {name}) or choose another")
            })?,
            None => match lookup("accel-worker") {
                Some(user) => user,
                None => {
                    let user = lookup("nobody").ok_or("neither accel-worker nor nobody exists; set worker_user")?;
                    tracing::info!("no accel-worker user (make install creates it): workers run as nobody");
                    user
                }
            },
        };
        if user.uid.is_root() {
            return Err(format!(
                "worker_user {:?} is root; workers must not run as root",
                user.name
            ));
        }
        Ok(Self {
            user: user.name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            program: PathBuf::from(SELF),
            lease: None,
        })
    }

    /// Who the worker named `worker` (`<pool>/<model>-<device>`) runs as: an id of its own
    /// from `ids` when workers have a block of them, else this user.
    pub fn for_worker(
        &self,
        ids: Option<&std::sync::Arc<super::uids::WorkerIds>>,
        worker: &str,
    ) -> Result<Self, String> {
        let Some(ids) = ids else {
            return Ok(self.clone());
        };
        let lease = ids.claim(worker)?;
        Ok(Self {
            user: format!("uid {}", lease.uid),
            uid: lease.uid,
            gid: lease.gid,
            program: self.program.clone(),
            lease: Some(std::sync::Arc::new(lease)),
        })
    }
}

/// What the rest of the daemon may know of a model's worker (the API and metrics read it;
/// the device loop that owns the worker writes it).
#[derive(Debug)]
pub struct WorkerStatus {
    /// Its group name (`<model>-<device>`).
    pub name: String,
    /// The group above it: `_shared`, or the tenant it is dedicated to.
    pub pool: String,
    pub device: String,
    pub user: String,
    pid: std::sync::atomic::AtomicU32,
    restarts: std::sync::atomic::AtomicU64,
    /// Its tenant's memory limit as last written (0: none), for the error a request gets when
    /// the kernel kills the worker at that limit.
    memory_limit: std::sync::atomic::AtomicU64,
    /// Counters of the groups of workers lost before the current one (a lost worker's group is
    /// made again for its replacement): reports add them, so they count over its whole life.
    earlier: std::sync::Mutex<Earlier>,
    sandbox: Option<std::sync::Arc<Sandbox>>,
}

#[derive(Debug, Default)]
struct Earlier {
    oom_kills: u64,
    cpu_usec: u64,
    denials: u64,
}

impl WorkerStatus {
    /// The worker's pid; `None` while none runs.
    pub fn pid(&self) -> Option<u32> {
        match self.pid.load(std::sync::atomic::Ordering::SeqCst) {
            0 => None,
            pid => Some(pid),
        }
    }

    /// Workers started to replace a lost one.
    pub fn restarts(&self) -> u64 {
        self.restarts.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Memory, CPU and OOM kills of its cgroup, and its gate's refusals, the counters
    /// including the workers it replaced; `None` when workers are not isolated.
    pub fn usage(&self) -> Option<(crate::cgroup::Usage, u64)> {
        let (mut usage, mut denials) = self.group_usage()?;
        let earlier = self
            .earlier
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        usage.oom_kills += earlier.oom_kills;
        usage.cpu_usec += earlier.cpu_usec;
        denials += earlier.denials;
        Some((usage, denials))
    }

    /// What the current worker's group says alone.
    fn group_usage(&self) -> Option<(crate::cgroup::Usage, u64)> {
        let sandbox = self.sandbox.as_ref()?;
        Some((
            sandbox.usage(&self.pool, &self.name).ok()?,
            sandbox.denials(&self.pool, &self.name),
        ))
    }

    /// Keeps the counters of a lost worker's group, which is about to be removed.
    fn retire(&self, (usage, denials): (crate::cgroup::Usage, u64)) {
        let mut earlier = self
            .earlier
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        earlier.oom_kills += usage.oom_kills;
        earlier.cpu_usec += usage.cpu_usec;
        earlier.denials += denials;
    }

    /// The tenant this worker is dedicated to, if it is.
    pub fn tenant(&self) -> Option<&str> {
        (self.pool != super::sandbox::SHARED_POOL).then_some(self.pool.as_str())
    }

    /// Writes a dedicated worker's tenant's limits again (after a policy reload).
    pub fn apply_limits(&self, limits: &crate::cgroup::TenantLimits) -> Result<(), String> {
        match (&self.sandbox, self.tenant()) {
            (Some(sandbox), Some(tenant)) => {
                sandbox.limit_tenant(tenant, limits)?;
                self.limited_to(limits.memory_max);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Records the memory limit its tenant's group was given.
    pub fn limited_to(&self, memory_max: Option<u64>) {
        self.memory_limit
            .store(memory_max.unwrap_or(0), std::sync::atomic::Ordering::SeqCst);
    }

    fn memory_limit(&self) -> Option<u64> {
        match self.memory_limit.load(std::sync::atomic::Ordering::SeqCst) {
            0 => None,
            limit => Some(limit),
        }
    }

    /// Processes the kernel has killed in the current worker's group for lack of memory (0
    /// unisolated).
    fn group_oom_kills(&self) -> u64 {
        // The cgroup's files alone: the gate's pinned map is not needed for this.
        self.sandbox
            .as_ref()
            .and_then(|s| s.usage(&self.pool, &self.name).ok())
            .map_or(0, |usage| usage.oom_kills)
    }

    fn set_pid(&self, pid: Option<u32>) {
        self.pid
            .store(pid.unwrap_or(0), std::sync::atomic::Ordering::SeqCst);
    }
}

/// A live worker: its process and our end of its socket.
#[derive(Debug)]
pub(super) struct Connection {
    pub child: Child,
    pub stream: UnixStream,
}

impl Drop for Connection {
    fn drop(&mut self) {
        let _ = proto::write_frame(&mut self.stream, tag::SHUTDOWN, &[]);
        // A worker that does not stop when asked is killed.
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `acceld <subcommand>` as `identity`: no capabilities, `no_new_privs`, killed with
/// its parent, a reduced environment, no descriptor but stdio and the socket at
/// [`SOCKET_FD`], and at most `address_space` bytes of memory when given. Returns the child
/// and our end of its socket.
pub(super) fn launch(
    identity: &WorkerIdentity,
    subcommand: &str,
    address_space: Option<u64>,
) -> Result<(Child, UnixStream), String> {
    let (ours, theirs) = UnixStream::pair()
        .map_err(|e| format!("cannot make a socket for acceld {subcommand}: {e}"))?;
    let fd = theirs.as_raw_fd();
    let (uid, gid) = (identity.uid, identity.gid);
    let supervisor = nix::unistd::getpid().as_raw();
    let mut command = Command::new(&identity.program);
    command
        .arg(subcommand)
        .env_clear()
        .envs(
            KEPT_ENV
                .iter()
                .filter_map(|k| std::env::var_os(k).map(|v| (k, v))),
        )
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    // SAFETY: between fork and exec the closure only makes raw system calls (no allocation,
    // no locks), which is what a forked child of a multi-threaded process may do.
    unsafe {
        command.pre_exec(move || {
            use nix::libc;
            let check = |r: libc::c_int| {
                if r < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            // Credentials first: every change of them clears the parent-death signal.
            if libc::getuid() == 0 {
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setgid(gid))?;
                check(libc::setuid(uid))?;
            }
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
            // The supervisor may have died between fork and the line above.
            if libc::getppid() != supervisor {
                libc::_exit(1);
            }
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            if let Some(bytes) = address_space {
                let limit = libc::rlimit {
                    rlim_cur: bytes,
                    rlim_max: bytes,
                };
                check(libc::setrlimit(libc::RLIMIT_AS, &limit))?;
            }
            // The socket at its well-known number, open across exec; nothing else is: every
            // other descriptor of ours is close-on-exec.
            if fd == SOCKET_FD {
                check(libc::fcntl(fd, libc::F_SETFD, 0))?;
            } else {
                check(libc::dup2(fd, SOCKET_FD))?;
            }
            // And in case something opened a descriptor without close-on-exec (a library,
            // the daemon's own parent), none but stdio and the socket get through. Kernels
            // before 5.9 lack close_range; there, close-on-exec is all there is.
            let _ = libc::syscall(
                libc::SYS_close_range,
                (SOCKET_FD + 1) as libc::c_uint,
                libc::c_uint::MAX,
                0 as libc::c_uint,
            );
            Ok(())
        });
    }
    let child = command
        .spawn()
        .map_err(|e| format!("cannot start acceld {subcommand}: {e}"))?;
    drop(theirs);
    Ok((child, ours))
}

/// Spawns `acceld worker` as `identity` with the socket at [`SOCKET_FD`], and completes the
/// handshake: `Hello`, `Init`, then `Ready` once the model is loaded.
pub(super) fn spawn(
    init: &WorkerInit,
    files: &[std::sync::Arc<std::fs::File>],
    identity: &WorkerIdentity,
    sandbox: Option<(&Sandbox, &str)>,
    launched: &dyn Fn(u32),
) -> Result<(Connection, WorkerReady), String> {
    let (child, mut ours) = launch(identity, "worker", None)?;
    launched(child.id());

    let connection = Connection {
        child,
        stream: ours.try_clone().map_err(|e| e.to_string())?,
    };
    ours.set_read_timeout(Some(START_TIMEOUT))
        .map_err(|e| e.to_string())?;
    super::hello(&mut ours)?;
    // Placed in its group, behind its gate, before it opens a model file or a device.
    if let Some((sandbox, pool)) = sandbox {
        let name = super::sandbox::worker_name(&init.model, &init.device);
        sandbox.place(pool, &name, &init.device, connection.child.id())?;
    }
    let init_json = serde_json::to_vec(init).map_err(|e| e.to_string())?;
    proto::write_frame(&mut ours, tag::INIT, &init_json).map_err(|e| e.to_string())?;
    // The model's files, as our own load opened them: the worker's user need not be able to
    // read them, and nothing swapped in at their paths since reaches it.
    if files.len() != init.files.len() {
        return Err(format!(
            "{} descriptors for {} model files",
            files.len(),
            init.files.len()
        ));
    }
    let plain: Vec<&std::fs::File> = files.iter().map(|f| &**f).collect();
    proto::send_fds(&ours, &plain).map_err(|e| e.to_string())?;
    let frame = match proto::read_frame(&mut ours) {
        Ok(frame) => frame,
        Err(e) => {
            return Err(format!(
                "the worker did not start: {e}{}",
                exit_of(connection)
            ))
        }
    };
    if frame.tag == tag::ERROR {
        return Err(String::from_utf8_lossy(&frame.payload).into_owned());
    }
    let ready: WorkerReady =
        serde_json::from_slice(&frame.expect(tag::READY).map_err(|e| e.to_string())?)
            .map_err(|e| format!("malformed ready: {e}"))?;
    connection
        .stream
        .set_write_timeout(Some(CALL_TIMEOUT))
        .map_err(|e| e.to_string())?;
    Ok((connection, ready))
}

/// How a worker that stopped answering ended, for the error: killed by the kernel (as by its
/// cgroup's memory limit) reads differently from a crash.
fn exit_of(mut connection: Connection) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = connection.child.try_wait() {
            return match status.signal() {
                Some(9) => " (it was killed with SIGKILL: by the kernel for going past its cgroup's memory limit, or by an operator)".to_owned(),
                Some(signal) => format!(" (it died of signal {signal})"),
                None => format!(" (it exited with {status})"),
            };
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    String::new()
}

/// A sequence on the worker, by the id this side gave it.
#[derive(Debug, Clone, Copy)]
struct RemoteSeq {
    /// The worker's own id for it.
    on_worker: u64,
    len: usize,
    swapped: bool,
}

/// A model's engine in a worker process. Sequence lengths and swap states are mirrored here,
/// so the device loop's bookkeeping costs no round trip. Ids are this side's, never reused
/// across workers, so an id from a lost worker can never name a sequence on its replacement.
#[derive(Debug)]
pub struct RemoteEngine {
    /// What its workers start from; the model's files are those opened when the model was
    /// loaded, passed again to each new worker (never reopened by path).
    recipe: Recipe,
    connection: Option<Connection>,
    kv_block_bytes: usize,
    seqs: HashMap<SeqId, RemoteSeq>,
    next_id: u64,
    /// Every sequence was lost since the device loop last asked, and how.
    lost: Option<Loss>,
    /// Its group's OOM kills when the current worker started: a loss with more was the
    /// kernel's doing.
    oom_kills_at_start: u64,
    /// When workers were lost (or failed to start) recently, for the crash-loop limit.
    losses: VecDeque<Instant>,
    status: std::sync::Arc<WorkerStatus>,
    /// Starts replacements off the device loop's thread; made at the first loss.
    respawner: Option<Respawner>,
    /// The counters of the workers lost so far, as they last reported them, and the current
    /// worker's: the engine's counters go on growing across replacements.
    counted_before: Counters,
    counted: Counters,
    /// What its sequences shared when last asked; `None` once a sequence joined or left
    /// since (only that changes what is shared: growing never does).
    shared: Option<Vec<(SeqId, usize, usize)>>,
}

/// An engine dropped is a model unloaded (or the daemon stopping): its worker stops, then
/// its group and gate go.
impl Drop for RemoteEngine {
    fn drop(&mut self) {
        // The worker is asked to stop first: one its replacement thread started would be
        // killed with that thread. Then a replacement still starting is waited for and
        // stopped, before the group goes.
        if self.connection.take().is_some() {
            tracing::info!(model = %self.recipe.init.model, device = %self.recipe.init.device, "worker stopped");
        }
        self.respawner.take();
        self.status.set_pid(None);
        // Its disk tier's directory goes before its uid is given back (another pool's worker
        // may have the uid next).
        if let Some(root) = &self.recipe.disk_root {
            if let Err(e) = crate::kv::disk::remove_worker_dir(root, self.recipe.identity.uid) {
                tracing::error!(model = %self.recipe.init.model, error = %e, "could not remove the worker's KV disk tier directory");
            }
        }
        if let Some(sandbox) = &self.recipe.sandbox {
            sandbox.release(&self.status.pool, &self.status.name);
        }
    }
}

impl RemoteEngine {
    /// Starts the first worker; errors say why it could not start. `files` are the model's
    /// files as the supervisor's own load opened them, in `init.files`' order. With
    /// `disk_root`, each worker started gets a directory of its own under it for its KV disk
    /// tier.
    pub fn start(
        init: WorkerInit,
        files: Vec<std::sync::Arc<std::fs::File>>,
        identity: WorkerIdentity,
        sandbox: Option<std::sync::Arc<Sandbox>>,
        pool: &str,
        disk_root: Option<PathBuf>,
    ) -> Result<(Self, WorkerReady), String> {
        let recipe = Recipe {
            init,
            files,
            identity,
            sandbox,
            pool: pool.to_owned(),
            disk_root,
        };
        let (connection, ready) = recipe.spawn()?;
        let (init, identity, sandbox) = (&recipe.init, &recipe.identity, &recipe.sandbox);
        let status = std::sync::Arc::new(WorkerStatus {
            name: super::sandbox::worker_name(&init.model, &init.device),
            pool: pool.to_owned(),
            device: init.device.clone(),
            user: identity.user.clone(),
            pid: std::sync::atomic::AtomicU32::new(connection.child.id()),
            restarts: std::sync::atomic::AtomicU64::new(0),
            memory_limit: std::sync::atomic::AtomicU64::new(0),
            earlier: std::sync::Mutex::default(),
            sandbox: sandbox.clone(),
        });
        let oom_kills_at_start = status.group_oom_kills();
        tracing::info!(model = %init.model, device = %init.device, pid = connection.child.id(), user = %identity.user, "worker started");
        Ok((
            Self {
                recipe,
                connection: Some(connection),
                kv_block_bytes: ready.kv_block_bytes as usize,
                seqs: HashMap::new(),
                next_id: 1,
                lost: None,
                oom_kills_at_start,
                losses: VecDeque::new(),
                status,
                respawner: None,
                counted_before: Counters::default(),
                counted: Counters::default(),
                shared: None,
            },
            ready,
        ))
    }

    /// What the API and the metrics may know of this worker.
    pub fn status(&self) -> std::sync::Arc<WorkerStatus> {
        std::sync::Arc::clone(&self.status)
    }

    /// The live worker. Without one, a replacement is on its way (see [`Self::replacing`]),
    /// or workers crashed in a loop and none is started again.
    fn connection(&mut self) -> Result<&mut Connection, EngineError> {
        if self.connection.is_none() && !self.replacing() && self.crash_looping() {
            return Err(EngineError::Worker(format!(
                "the model's worker was lost {} times within {} s; it is not restarted (see the daemon log)",
                self.losses.len(),
                CRASH_WINDOW.as_secs()
            )));
        }
        self.connection
            .as_mut()
            .ok_or_else(|| EngineError::WorkerLost("its worker is being replaced".into()))
    }

    /// Whether the crash-loop limit is reached: too many workers lost (or failed to start)
    /// within the window.
    fn crash_looping(&mut self) -> bool {
        let now = Instant::now();
        while self
            .losses
            .front()
            .is_some_and(|t| now.duration_since(*t) > CRASH_WINDOW)
        {
            self.losses.pop_front();
        }
        self.losses.len() >= MAX_CRASHES
    }

    /// Without a worker: takes in the replacement once it has started, and orders one (after
    /// a backoff that grows with each recent loss) when none is on its way, unless workers
    /// crash in a loop. Whether a replacement is still on its way.
    fn replacing(&mut self) -> bool {
        if self.connection.is_some() {
            return false;
        }
        match self.respawner.as_mut().and_then(Respawner::try_take) {
            Some(Ok((connection, _))) => {
                tracing::warn!(model = %self.recipe.init.model, pid = connection.child.id(), "worker restarted");
                self.status.set_pid(Some(connection.child.id()));
                self.oom_kills_at_start = self.status.group_oom_kills();
                self.status
                    .restarts
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                self.connection = Some(connection);
                return false;
            }
            Some(Err(why)) => {
                // A worker that cannot start counts against the crash-loop limit too.
                self.losses.push_back(Instant::now());
                tracing::error!(model = %self.recipe.init.model, reason = %why, "a replacement worker could not start");
            }
            None if self.respawner.as_ref().is_some_and(Respawner::pending) => return true,
            None => {}
        }
        if self.crash_looping() {
            return false;
        }
        if self.respawner.is_none() {
            match Respawner::new(self.recipe.clone()) {
                Ok(respawner) => self.respawner = Some(respawner),
                Err(e) => {
                    self.losses.push_back(Instant::now());
                    tracing::error!(model = %self.recipe.init.model, error = %e, "cannot start a thread to replace the worker");
                    return false;
                }
            }
        }
        let backoff = Duration::from_millis(100 << self.losses.len().min(5));
        let ordered = self
            .respawner
            .as_mut()
            .map_or(Err("no respawner".to_owned()), |r| r.order(backoff));
        match ordered {
            Ok(()) => true,
            Err(why) => {
                self.losses.push_back(Instant::now());
                tracing::error!(model = %self.recipe.init.model, reason = %why, "cannot order a replacement worker");
                false
            }
        }
    }

    /// Forgets a worker that failed: it is killed and reaped, and everything it held is gone.
    fn lose(&mut self, why: String) -> EngineError {
        let mut loss = Loss::Failed;
        if let Some(mut connection) = self.connection.take() {
            let _ = connection.child.kill();
            let status = connection.child.wait();
            // The kernel counts its kill before the process is gone, so this is settled by the
            // time we see the worker's socket close.
            let group = self.status.group_usage();
            if group.is_some_and(|(usage, _)| usage.oom_kills > self.oom_kills_at_start) {
                loss = Loss::OutOfMemory {
                    limit_bytes: self.status.memory_limit(),
                };
            }
            tracing::error!(model = %self.recipe.init.model, pid = connection.child.id(), status = ?status, reason = %why, ?loss, "worker lost; its sequences will be recomputed");
            // Anything it forked dies with its group. A group that could not be removed is
            // the replacement's too, and its counters go on from where they are.
            let removed = self
                .recipe
                .sandbox
                .as_ref()
                .is_some_and(|sandbox| sandbox.empty(&self.status.pool, &self.status.name));
            if let (true, Some(group)) = (removed, group) {
                self.status.retire(group);
            }
        }
        self.status.set_pid(None);
        self.seqs.clear();
        self.shared = None;
        self.counted_before = self.counted_before + std::mem::take(&mut self.counted);
        self.lost = Some(loss);
        self.losses.push_back(Instant::now());
        EngineError::WorkerLost(why)
    }

    /// Sends one request and reads its reply; an error reply is the engine's error, anything
    /// else going wrong loses the worker.
    fn call(&mut self, request: u8, payload: &[u8], reply: u8) -> Result<Vec<u8>, EngineError> {
        let connection = self.connection()?;
        let deadline = Instant::now() + CALL_TIMEOUT;
        let result = proto::write_frame(&mut connection.stream, request, payload).and_then(|()| {
            proto::read_frame(&mut proto::Deadline::new(&connection.stream, deadline))
        });
        match result {
            Ok(frame) if frame.tag == tag::ERROR => {
                Err(EngineError::Worker(error_text(&frame.payload)))
            }
            Ok(frame) => frame.expect(reply).map_err(|e| self.lose(e.to_string())),
            Err(e) => Err(self.lose(e.to_string())),
        }
    }
}

impl RemoteEngine {
    /// Asks the worker to move sequence `id` off the device (`request`, to the host or the
    /// disk tier); once it says done, the sequence is swapped out here too.
    fn move_out(&mut self, id: SeqId, request: u8, payload: &[u8]) -> Result<(), EngineError> {
        self.shared = None;
        self.call(request, payload, tag::OK)?;
        if let Some(s) = self.seqs.get_mut(&id) {
            s.swapped = true;
        }
        Ok(())
    }

    fn on_worker(&self, id: SeqId) -> Result<u64, EngineError> {
        self.seqs
            .get(&id)
            .map(|s| s.on_worker)
            .ok_or(EngineError::UnknownSequence(id))
    }
}

/// A worker's error text as this side shows it: bounded, printable.
fn error_text(payload: &[u8]) -> String {
    const MAX: usize = 1024;
    let text = String::from_utf8_lossy(&payload[..payload.len().min(MAX)]);
    let mut clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if payload.len() > MAX {
        clean.push_str(" (cut)");
    }
    clean
}

impl RemoteEngine {
    /// Records a sequence the worker started, holding `held` tokens.
    fn started(&mut self, on_worker: u64, held: usize) -> Result<SeqId, EngineError> {
        self.shared = None;
        if self.seqs.values().any(|s| s.on_worker == on_worker) {
            return Err(self.lose(format!("the worker gave out sequence {on_worker} twice")));
        }
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(
            id,
            RemoteSeq {
                on_worker,
                len: held,
                swapped: false,
            },
        );
        Ok(id)
    }
}

impl EngineOps for RemoteEngine {
    fn add_sequence(&mut self) -> Result<SeqId, EngineError> {
        let payload = self.call(tag::ADD_SEQUENCE, &[], tag::SEQUENCE)?;
        let on_worker =
            proto::decode_u64(tag::SEQUENCE, &payload).map_err(|e| self.lose(e.to_string()))?;
        self.started(on_worker, 0)
    }

    fn add_sequence_cached(
        &mut self,
        scope: &str,
        tokens: &[u32],
    ) -> Result<(SeqId, usize), EngineError> {
        if scope.len() > proto::MAX_SCOPE {
            // Longer than any tenant's name: served without the cache, never cut short.
            return Ok((self.add_sequence()?, 0));
        }
        let request = proto::encode_add_cached(scope, tokens);
        let payload = self.call(tag::ADD_CACHED, &request, tag::CACHED_SEQUENCE)?;
        let (on_worker, held) =
            proto::decode_cached_sequence(&payload).map_err(|e| self.lose(e.to_string()))?;
        // The worker holds at most what it was asked to, and never all of it.
        let held = usize::try_from(held).unwrap_or(usize::MAX);
        if held >= tokens.len().max(1) {
            return Err(self.lose(format!(
                "the worker says it holds {held} of {} tokens",
                tokens.len()
            )));
        }
        Ok((self.started(on_worker, held)?, held))
    }

    fn remove_sequence(&mut self, id: SeqId) {
        self.shared = None;
        let Some(seq) = self.seqs.remove(&id) else {
            return; // not on this worker (it was replaced since)
        };
        let _ = self.call(
            tag::REMOVE_SEQUENCE,
            &proto::encode_u64(seq.on_worker),
            tag::OK,
        );
    }

    fn swap_out(&mut self, id: SeqId) -> Result<(), EngineError> {
        let on_worker = self.on_worker(id)?;
        self.move_out(id, tag::SWAP_OUT, &proto::encode_u64(on_worker))
    }

    fn swap_out_to_disk(
        &mut self,
        id: SeqId,
        scope: &str,
        encrypt: bool,
    ) -> Result<(), EngineError> {
        let on_worker = self.on_worker(id)?;
        if scope.len() > proto::MAX_SCOPE {
            // The scope picks the tenant's file: it is never cut short to fit.
            return Err(EngineError::Worker(format!(
                "a tenant name of {} bytes is longer than the {} a worker's disk tier takes",
                scope.len(),
                proto::MAX_SCOPE
            )));
        }
        let request = proto::encode_swap_out_disk(on_worker, encrypt, scope);
        self.move_out(id, tag::SWAP_OUT_DISK, &request)
    }

    fn resident_prefix(&mut self, scope: &str, tokens: &[u32]) -> usize {
        // A hint: a worker being replaced, or one that cannot say, holds nothing.
        if self.connection.is_none() || scope.len() > proto::MAX_SCOPE {
            return 0;
        }
        let request = proto::encode_add_cached(scope, tokens);
        self.call(tag::RESIDENT, &request, tag::RESIDENT_TOKENS)
            .ok()
            .and_then(|payload| proto::decode_u64(tag::RESIDENT_TOKENS, &payload).ok())
            .map_or(0, |held| {
                usize::try_from(held)
                    .unwrap_or(usize::MAX)
                    .min(tokens.len())
            })
    }

    fn sharing(&mut self) -> Vec<(SeqId, usize, usize)> {
        // Sharing takes two sequences on the device: with fewer, no round trip; nor when
        // none joined or left since the last answer.
        if self.connection.is_none() || self.seqs.values().filter(|s| !s.swapped).count() < 2 {
            return Vec::new();
        }
        if let Some(shared) = &self.shared {
            return shared.clone();
        }
        let Ok(payload) = self.call(tag::SHARING, &[], tag::SHARED) else {
            return Vec::new();
        };
        let shares = match proto::decode_shared(&payload, self.seqs.len()) {
            Ok(shares) => shares,
            Err(e) => {
                self.lose(e.to_string());
                return Vec::new();
            }
        };
        // Back to this side's ids; a sequence this side does not know is left out (the
        // scheduler cuts a report that does not add up).
        let ours: HashMap<u64, SeqId> =
            self.seqs.iter().map(|(&id, s)| (s.on_worker, id)).collect();
        let shared: Vec<(SeqId, usize, usize)> = shares
            .into_iter()
            .filter_map(|(on_worker, borrowed, sharing)| {
                Some((*ours.get(&on_worker)?, borrowed as usize, sharing as usize))
            })
            .collect();
        self.shared = Some(shared.clone());
        shared
    }

    fn counters(&mut self) -> Counters {
        // A worker being replaced is not waited for: what it last said stands meanwhile.
        if self.connection.is_some() {
            let asked = self
                .call(tag::COUNTERS, &[], tag::COUNTED)
                .and_then(|payload| {
                    serde_json::from_slice::<Counters>(&payload)
                        .map_err(|e| self.lose(format!("malformed counters: {e}")))
                });
            if let Ok(counted) = asked {
                self.counted = counted;
            }
        }
        self.counted_before + self.counted
    }

    fn swap_in(&mut self, id: SeqId) -> Result<(), EngineError> {
        self.shared = None;
        let on_worker = self.on_worker(id)?;
        self.call(tag::SWAP_IN, &proto::encode_u64(on_worker), tag::OK)?;
        if let Some(s) = self.seqs.get_mut(&id) {
            s.swapped = false;
        }
        Ok(())
    }

    fn step(&mut self, inputs: &[StepInput<'_>]) -> Result<Vec<StepOutput>, EngineError> {
        let mut items = Vec::with_capacity(inputs.len());
        for input in inputs {
            items.push((
                SeqId(self.on_worker(input.seq)?),
                input.tokens,
                input.logits,
            ));
        }
        let payload = self.call(tag::STEP, &proto::encode_step(&items), tag::STEPPED)?;
        let mut outputs = proto::decode_stepped(&payload).map_err(|e| self.lose(e.to_string()))?;
        if outputs.len() != items.len() || outputs.iter().zip(&items).any(|(o, i)| o.seq != i.0) {
            return Err(self.lose("the worker answered a step for other sequences".into()));
        }
        for (output, input) in outputs.iter_mut().zip(inputs) {
            output.seq = input.seq;
            if let Some(s) = self.seqs.get_mut(&input.seq) {
                s.len += input.tokens.len();
            }
        }
        Ok(outputs)
    }

    fn is_swapped(&self, id: SeqId) -> bool {
        self.seqs.get(&id).is_some_and(|s| s.swapped)
    }

    fn sequence_len(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.len)
    }

    fn kv_block_bytes(&self) -> usize {
        self.kv_block_bytes
    }

    fn take_loss(&mut self) -> Option<Loss> {
        self.lost.take()
    }

    fn starting(&mut self) -> bool {
        self.replacing()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workers_error_text_is_bounded_and_printable() {
        assert_eq!(
            error_text(b"out of blocks\n\x1b[31m"),
            "out of blocks  [31m"
        );
        let long = error_text(&[b'x'; 5000]);
        assert!(
            long.len() < 1100 && long.ends_with(" (cut)"),
            "{}",
            long.len()
        );
    }

    #[test]
    fn a_worker_that_died_says_how() {
        let stream = |child| Connection {
            child,
            stream: UnixStream::pair().unwrap().0,
        };
        let killed = Command::new("sh")
            .args(["-c", "kill -9 $$"])
            .spawn()
            .unwrap();
        assert!(exit_of(stream(killed)).contains("SIGKILL"));
        let failed = Command::new("sh").args(["-c", "exit 3"]).spawn().unwrap();
        assert!(exit_of(stream(failed)).contains("exit status: 3"));
    }
}
