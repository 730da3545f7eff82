//! Raw host interfaces the daemon uses, in one place: user and group lookups, peer groups from
//! procfs, the state-directory lock, the socket file's ownership and mode, systemd notification.
//!
//! Callers above this module deal in typed errors and plain values; everything that touches a
//! kernel interface or libc is here, so a test can see what the daemon asks of the host.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, Write as _};
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use nix::unistd::{Gid, Group, Uid, User};

use crate::policy::UserDb;

/// A host operation that failed: what was attempted, on what, and why.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("failed to {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "another acceld (pid {pid}) holds {path}; stop it first or give this one another state_dir"
    )]
    Locked { path: PathBuf, pid: String },
    #[error("{path} is in use by a live daemon that does not hold our state dir; stop it or choose another socket path")]
    SocketInUse { path: PathBuf },
    #[error("{path} exists and is not a socket; refusing to remove it")]
    NotASocket { path: PathBuf },
    #[error("socket group {group:?} does not exist; create it (groupadd {group}) or set socket_group: null")]
    NoSuchGroup { group: String },
    #[error("refusing {what} {path}: {reason}")]
    Untrusted {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
}

/// Refuses a directory the daemon writes into as root (state, socket) when someone else could
/// plant links or files in it.
fn require_trusted_dir(what: &'static str, dir: &Path) -> Result<(), SysError> {
    check_trusted(dir).map_err(|reason| SysError::Untrusted {
        what,
        path: dir.to_owned(),
        reason,
    })
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SysError + 'a {
    move |source| SysError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// User and group names from the system's databases (NSS).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemUserDb;

impl UserDb for SystemUserDb {
    fn user_name(&self, uid: u32) -> Option<String> {
        User::from_uid(Uid::from_raw(uid))
            .ok()
            .flatten()
            .map(|u| u.name)
    }
    fn group_name(&self, gid: u32) -> Option<String> {
        Group::from_gid(Gid::from_raw(gid))
            .ok()
            .flatten()
            .map(|g| g.name)
    }
}

/// The gid of a group name.
pub fn group_gid(name: &str) -> Result<u32, SysError> {
    match Group::from_name(name) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        _ => Err(SysError::NoSuchGroup {
            group: name.to_owned(),
        }),
    }
}

/// `SO_PEERGROUPS` (Linux 4.13+): the supplementary groups of a Unix-socket peer, as the
/// kernel recorded them when it connected. Not exported by the libc crate; 59 on every
/// architecture we build for.
const SO_PEERGROUPS: nix::libc::c_int = 59;

/// Niceness of the threads that compute (device loops, the compute pool, workers): below the
/// control plane's, so the API is answered promptly while every core computes (measured: the
/// p90 of `/healthz` under 128 streams on two cores went from 0.66-0.97 ms at nice 0 to
/// 0.35-0.5 ms).
pub const COMPUTE_NICE: i32 = 10;

/// Lowers the calling thread's CPU priority to `nice` (on Linux niceness is per thread, and
/// threads it starts inherit it). Needs no privilege.
pub fn lower_thread_priority(nice: i32) -> std::io::Result<()> {
    let tid = nix::unistd::gettid().as_raw();
    // SAFETY: setpriority takes plain integers and touches no memory of ours.
    let rc =
        unsafe { nix::libc::setpriority(nix::libc::PRIO_PROCESS, tid as nix::libc::id_t, nice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Moves the calling thread to the lowest real-time priority (`SCHED_FIFO` 1), above every
/// ordinary thread on the host. Needs `CAP_SYS_NICE` (or an `RLIMIT_RTPRIO` that allows it);
/// the kernel's real-time throttling still leaves ordinary threads a share of each second.
/// For a thread that only waits and measures: anything it runs, it runs before the host.
pub fn realtime_thread() -> std::io::Result<()> {
    let param = nix::libc::sched_param { sched_priority: 1 };
    // SAFETY: `param` is a valid sched_param that outlives the call; pid 0 is this thread.
    let rc = unsafe { nix::libc::sched_setscheduler(0, nix::libc::SCHED_FIFO, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The supplementary groups of the process at the other end of a Unix socket.
pub fn peer_groups(socket: &impl std::os::fd::AsRawFd) -> std::io::Result<Vec<u32>> {
    use nix::libc;
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = libc::socklen_t::try_from(groups.len() * std::mem::size_of::<libc::gid_t>())
            .map_err(|_| std::io::Error::other("too many groups"))?;
        // SAFETY: the buffer is valid for `len` bytes and outlives the call; the kernel writes at
        // most `len` bytes and stores the size it needs (or wrote) back into `len`.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(needed);
            return Ok(groups);
        }
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::ERANGE) && needed > groups.len() && needed <= 1 << 16
        {
            groups.resize(needed, 0);
            continue;
        }
        return Err(error);
    }
}

/// Refuses a file or directory that someone other than root (or the daemon's own user) could
/// have written or replaced: the daemon runs as root and the policy decides who is an
/// operator, so a policy file a user could change would be a way to become one. The path
/// itself and every directory above it must be owned by root (or us) and not writable by
/// group or others, except root-owned sticky directories such as /tmp, where others cannot
/// rename or replace what is not theirs (sshd's StrictModes and sudo check the same).
pub fn check_trusted(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot inspect: {e}"))?;
    trusted_owner_and_mode(path, &meta, false)?;
    check_ancestors(path)
}

fn trusted_owner_and_mode(
    path: &Path,
    meta: &std::fs::Metadata,
    sticky_ok: bool,
) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    let owner = meta.uid();
    let me = nix::unistd::geteuid().as_raw();
    if owner != 0 && owner != me {
        return Err(format!(
            "{} is owned by uid {owner}; only root (or the daemon's user) may own it: chown root {}",
            path.display(),
            path.display()
        ));
    }
    let sticky = meta.mode() & 0o1000 != 0 && owner == 0;
    if meta.mode() & 0o022 != 0 && !(sticky_ok && sticky) {
        return Err(format!(
            "{} is writable by group or others (mode {:04o}); fix with chmod go-w {}",
            path.display(),
            meta.mode() & 0o7777,
            path.display()
        ));
    }
    Ok(())
}

/// Checks every directory above `path`: those its name passes through as written (whoever
/// can write the directory holding a link can re-point it) and the real ones it resolves to
/// (a link may lead into someone else's directory).
fn check_ancestors(path: &Path) -> Result<(), String> {
    let cwd = || {
        std::env::current_dir().map_err(|e| format!("cannot resolve the current directory: {e}"))
    };
    let written = if path.is_absolute() {
        path.to_owned()
    } else {
        cwd()?.join(path)
    };
    let real = match path.canonicalize() {
        Ok(real) => real,
        // Not there yet (a file about to be created): its directory decides.
        Err(_) => match path.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(parent) => parent
                .canonicalize()
                .map_err(|e| format!("cannot resolve {}: {e}", parent.display()))?
                .join("_"),
            None => cwd()?.join("_"),
        },
    };
    for dir in written.ancestors().skip(1).chain(real.ancestors().skip(1)) {
        let meta =
            std::fs::metadata(dir).map_err(|e| format!("cannot inspect {}: {e}", dir.display()))?;
        trusted_owner_and_mode(dir, &meta, true)
            .map_err(|e| format!("is in an untrusted directory: {e}"))?;
    }
    Ok(())
}

/// Reads a config or policy file: opened once, without following a symbolic link at its
/// name and without blocking on a FIFO; refused unless it is a regular file of at most
/// `max_bytes`; and, when `trusted` is asked for, refused unless its owner and mode (checked
/// on the open descriptor, so a file swapped after the check is not the one read) and every
/// directory above it pass [`check_trusted`]'s rules. The text is read from that descriptor.
pub fn read_checked_file(path: &Path, max_bytes: usize, trusted: bool) -> Result<String, String> {
    if trusted {
        check_ancestors(path)?;
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(nix::libc::ELOOP) => "is a symbolic link; name the file it points to".to_owned(),
            _ => format!("cannot open: {e}"),
        })?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot inspect: {e}"))?;
    if !meta.is_file() {
        return Err("is not a regular file".to_owned());
    }
    if trusted {
        trusted_owner_and_mode(path, &meta, false)?;
    }
    if meta.len() > max_bytes as u64 {
        return Err(format!(
            "is {} bytes, more than the {max_bytes} accepted",
            meta.len()
        ));
    }
    let mut text = String::new();
    (&file)
        .take(max_bytes as u64 + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read: {e}"))?;
    if text.len() > max_bytes {
        return Err(format!(
            "grew past the {max_bytes} bytes accepted while being read"
        ));
    }
    Ok(text)
}

/// An exclusive lock on the state directory, held for the daemon's lifetime.
#[derive(Debug)]
pub struct StateLock {
    _lock: Flock<File>,
    pub path: PathBuf,
}

impl StateLock {
    /// Creates the state directory if needed and takes `acceld.lock` in it, recording our pid.
    pub fn acquire(state_dir: &Path) -> Result<Self, SysError> {
        std::fs::create_dir_all(state_dir).map_err(io("create state directory", state_dir))?;
        require_trusted_dir("state directory", state_dir)?;
        let path = state_dir.join("acceld.lock");
        // Never through a link, and only a plain file of our own: a planted link or hard link
        // would have root truncate someone else's file.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&path)
            .map_err(io("open lock file", &path))?;
        {
            use std::os::unix::fs::MetadataExt as _;
            let meta = file.metadata().map_err(io("inspect lock file", &path))?;
            let me = nix::unistd::geteuid().as_raw();
            if !meta.is_file() || meta.uid() != me || meta.nlink() != 1 {
                return Err(SysError::Untrusted {
                    what: "lock file",
                    path,
                    reason: "it is not a plain file of the daemon's own (a link or another user's file); remove it".into(),
                });
            }
        }
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, errno)) if errno == nix::errno::Errno::EWOULDBLOCK => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(SysError::Locked {
                    path,
                    pid: if pid.is_empty() {
                        "unknown".into()
                    } else {
                        pid.to_owned()
                    },
                });
            }
            Err((_, errno)) => return Err(io("lock", &path)(errno.into())),
        };
        lock.set_len(0).map_err(io("truncate lock file", &path))?;
        lock.rewind().map_err(io("rewind lock file", &path))?;
        writeln!(lock, "{}", std::process::id()).map_err(io("write pid to", &path))?;
        Ok(Self { _lock: lock, path })
    }
}

/// Makes way for a new socket at `path`: creates its directory and removes a stale socket left
/// by a daemon that died, but never a live daemon's socket or a file that is not a socket.
pub fn clear_stale_socket(path: &Path) -> Result<(), SysError> {
    if let Some(parent) = path.parent() {
        if !parent.exists() {
            std::fs::create_dir_all(parent).map_err(io("create socket directory", parent))?;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))
                .map_err(io("set permissions of", parent))?;
        }
        // Only we may create entries there, so the socket's name stays ours between bind,
        // chown and chmod.
        require_trusted_dir("socket directory", parent)?;
    }
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("inspect", path)(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(SysError::NotASocket {
            path: path.to_owned(),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(SysError::SocketInUse {
            path: path.to_owned(),
        }),
        Err(_) => {
            tracing::info!(socket = %path.display(), "removing stale socket left by a previous daemon");
            std::fs::remove_file(path).map_err(io("remove stale socket", path))
        }
    }
}

/// Sets the socket's group (when given) and permission bits.
pub fn set_socket_access(path: &Path, gid: Option<u32>, mode: u32) -> Result<(), SysError> {
    // The directory is trusted (checked before bind), so the name is still our socket; a link
    // there is refused all the same rather than followed.
    let meta = std::fs::symlink_metadata(path).map_err(io("inspect", path))?;
    if !meta.file_type().is_socket() {
        return Err(SysError::NotASocket {
            path: path.to_owned(),
        });
    }
    if let Some(gid) = gid {
        std::os::unix::fs::lchown(path, None, Some(gid)).map_err(io("change group of", path))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io("set mode of", path))
}

/// Tells systemd (when it started us with `Type=notify`) about our state; a no-op otherwise.
pub fn notify_systemd(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, state) {
        tracing::warn!(error = %e, "failed to notify systemd");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_groups_are_the_connecting_process_groups() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut mine: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .iter()
            .map(|g| g.as_raw())
            .collect();
        let mut seen = peer_groups(&a).unwrap();
        mine.sort();
        seen.sort();
        assert_eq!(seen, mine);
    }

    #[test]
    fn untrusted_policy_files_are_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.yaml");
        std::fs::write(&file, "").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        check_trusted(&file).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o664)).unwrap();
        let err = check_trusted(&file).unwrap_err();
        assert!(
            err.contains("writable by group or others (mode 0664)"),
            "{err}"
        );
    }

    #[test]
    fn only_regular_files_are_read_and_never_through_a_link_or_past_the_cap() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.yaml");
        std::fs::write(&file, "tenants: []\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            read_checked_file(&file, 100, true).unwrap(),
            "tenants: []\n"
        );
        let err = read_checked_file(&file, 4, false).unwrap_err();
        assert!(err.contains("more than the 4 accepted"), "{err}");
        // A link at the name is refused, even to a good file.
        let link = dir.path().join("link.yaml");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let err = read_checked_file(&link, 100, false).unwrap_err();
        assert!(err.contains("symbolic link"), "{err}");
        // Devices and FIFOs are refused at once instead of read forever or blocking.
        let err = read_checked_file(Path::new("/dev/zero"), 100, false).unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
        let fifo = dir.path().join("fifo.yaml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = read_checked_file(&fifo, 100, false).unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[test]
    fn a_file_in_a_directory_others_can_write_is_not_trusted() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("policies");
        std::fs::create_dir(&sub).unwrap();
        let file = sub.join("p.yaml");
        std::fs::write(&file, "").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o755)).unwrap();
        read_checked_file(&file, 100, true).unwrap();
        // Whoever can write the directory can swap the file (rename, RENAME_EXCHANGE).
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = read_checked_file(&file, 100, true).unwrap_err();
        assert!(
            err.contains("untrusted directory") && err.contains("mode 0777"),
            "{err}"
        );
        let err = check_trusted(&file).unwrap_err();
        assert!(err.contains("untrusted directory"), "{err}");
        // Sticky and root-owned (like /tmp) is fine for a directory above; a directory a user
        // owns is not, whatever its mode.
        if nix::unistd::geteuid().is_root() {
            std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o1777)).unwrap();
            read_checked_file(&file, 100, true).unwrap();
            std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o755)).unwrap();
            nix::unistd::chown(&sub, Some(Uid::from_raw(65534)), None).unwrap();
            let err = read_checked_file(&file, 100, true).unwrap_err();
            assert!(err.contains("owned by uid 65534"), "{err}");
            // A trusted name that is a link into a user's directory is judged by where it
            // leads: the user could swap what is behind it.
            nix::unistd::chown(&sub, Some(Uid::from_raw(0)), None).unwrap();
            let users = dir.path().join("home");
            std::fs::create_dir(&users).unwrap();
            let inner = users.join("d");
            std::fs::create_dir(&inner).unwrap();
            nix::unistd::chown(&users, Some(Uid::from_raw(65534)), None).unwrap();
            let link = sub.join("state");
            std::os::unix::fs::symlink(&inner, &link).unwrap();
            let err = check_trusted(&link).unwrap_err();
            assert!(err.contains("owned by uid 65534"), "{err}");
        }
    }

    #[test]
    fn the_state_directory_must_be_trusted_and_the_lock_file_never_a_link() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        // A planted link to a file the daemon must not truncate.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, state.join("acceld.lock")).unwrap();
        let err = StateLock::acquire(&state).unwrap_err().to_string();
        assert!(err.contains("open lock file"), "{err}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        std::fs::remove_file(state.join("acceld.lock")).unwrap();
        // A hard link is refused too.
        std::fs::hard_link(&victim, state.join("acceld.lock")).unwrap();
        let err = StateLock::acquire(&state).unwrap_err().to_string();
        assert!(
            err.contains("not a plain file of the daemon's own"),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        std::fs::remove_file(state.join("acceld.lock")).unwrap();
        // A directory others can write is refused before anything is created in it.
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = StateLock::acquire(&state).unwrap_err().to_string();
        assert!(err.contains("refusing state directory"), "{err}");
        assert!(!state.join("acceld.lock").exists());
        // And a socket directory likewise; a link at the socket's name is not followed.
        let err = clear_stale_socket(&state.join("s.sock"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("refusing socket directory"), "{err}");
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&victim, state.join("s.sock")).unwrap();
        let err = set_socket_access(&state.join("s.sock"), None, 0o666)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a socket"), "{err}");
        let mode = std::fs::metadata(&victim).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the link's target was not chmod'ed");
    }

    #[test]
    fn state_lock_is_exclusive_and_records_pid() {
        let dir = tempfile::tempdir().unwrap();
        let lock = StateLock::acquire(dir.path()).unwrap();
        let text = std::fs::read_to_string(&lock.path).unwrap();
        assert_eq!(text.trim(), std::process::id().to_string());
        // flock locks belong to the open file description, so a second open in the same
        // process conflicts just like another process would.
        match StateLock::acquire(dir.path()) {
            Err(SysError::Locked { pid, .. }) => assert_eq!(pid, std::process::id().to_string()),
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(lock);
        StateLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn stale_socket_is_removed_but_live_one_and_plain_files_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/acceld.sock");
        clear_stale_socket(&path).unwrap();
        assert!(path.parent().unwrap().is_dir());

        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(matches!(
            clear_stale_socket(&path),
            Err(SysError::SocketInUse { .. })
        ));
        drop(listener);
        clear_stale_socket(&path).unwrap();
        assert!(!path.exists());

        std::fs::write(&path, "data").unwrap();
        assert!(matches!(
            clear_stale_socket(&path),
            Err(SysError::NotASocket { .. })
        ));
        assert!(path.exists());
    }
}
