//! Tenant cgroups on this host's real hierarchies (v2 or hybrid, whichever it has): limits the
//! kernel enforces on processes placed in a worker's group, and removal of everything the
//! daemon made, after a crash too. Needs root (CI runs as root).

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};

use accel_runtime::cgroup::{self, Cgroups, TenantLimits};
use accel_tests::require_root;

/// A group directory name no other test or daemon uses.
fn instance(what: &str) -> String {
    format!("accel-test-{what}-{}", std::process::id())
}

/// The daemon's groups for one test, removed however the test ends.
struct Groups(Box<dyn Cgroups>);

impl Groups {
    fn new(name: &str) -> Self {
        let cg = cgroup::detect(name).unwrap();
        cg.remove_all().unwrap();
        cg.prepare().unwrap();
        Self(cg)
    }
}

impl std::ops::Deref for Groups {
    type Target = dyn Cgroups;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl Drop for Groups {
    fn drop(&mut self) {
        let _ = self.0.remove_all();
    }
}

/// The Python interpreter itself: `python3` on PATH may be a wrapper script whose own work
/// (opening `/dev/tty`, forking) would land in the group after it is placed.
fn python() -> &'static str {
    static PYTHON: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    })
}

/// Python waiting for a line on stdin before running `script`, so it can be placed in a group
/// first; its stdout is piped back.
fn waiting_python(script: &str) -> Child {
    Command::new(python())
        .args(["-c", &format!("import sys\nsys.stdin.readline()\n{script}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3")
}

fn go(child: &mut Child) {
    child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    child.stdin.as_mut().unwrap().flush().unwrap();
}

/// The cgroup paths `/proc/PID/cgroup` lists for `pid`.
fn cgroups_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap()
}

#[test]
fn a_worker_past_its_tenants_memory_limit_is_killed_by_the_kernel() {
    require_root!();
    let name = instance("oom");
    let cg = Groups::new(&name);
    let limits = TenantLimits {
        memory_max: Some(64 << 20),
        weight: 1,
        cpus: None,
        pids_max: None,
    };
    cg.set_tenant("small", &limits).unwrap();
    cg.set_tenant(
        "roomy",
        &TenantLimits {
            memory_max: None,
            ..limits
        },
    )
    .unwrap();
    let small = cg.create_worker("small", "w0").unwrap();
    let roomy = cg.create_worker("roomy", "w0").unwrap();

    // Each touches 256 MiB, page by page.
    let script = "b = bytearray(256 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('survived', flush=True)";
    let mut doomed = waiting_python(script);
    let mut fine = waiting_python(script);
    cg.attach(&small, doomed.id()).unwrap();
    cg.attach(&roomy, fine.id()).unwrap();
    let listed = cgroups_of(doomed.id());
    assert!(listed.contains(&format!("{name}/small/w0")), "{listed}");
    go(&mut doomed);
    go(&mut fine);

    let status = doomed.wait().unwrap();
    use std::os::unix::process::ExitStatusExt as _;
    assert_eq!(status.signal(), Some(9), "killed by the kernel: {status:?}");
    let usage = cg.usage("small").unwrap();
    assert!(usage.oom_kills >= 1, "{usage:?}");
    assert_eq!(usage.memory_limit_bytes, Some(64 << 20), "{usage:?}");
    // The other tenant's worker is untouched.
    let mut line = String::new();
    BufReader::new(fine.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "survived");
    assert!(fine.wait().unwrap().success());
    assert_eq!(cg.usage("roomy").unwrap().oom_kills, 0);
}

#[test]
fn a_tenants_process_count_and_cpu_share_are_the_kernels_to_enforce() {
    require_root!();
    let name = instance("pids");
    let cg = Groups::new(&name);
    let limits = TenantLimits {
        memory_max: None,
        weight: 2,
        cpus: Some(0.5),
        pids_max: Some(8),
    };
    cg.set_tenant("few", &limits).unwrap();
    let group = cg.create_worker("few", "w0").unwrap();
    let mut forker = waiting_python(
        "import os, time\nmade = 0\nfor i in range(20):\n    try:\n        if os.fork() == 0:\n            time.sleep(2)\n            os._exit(0)\n        made += 1\n    except OSError:\n        pass\nprint(made, flush=True)",
    );
    cg.attach(&group, forker.id()).unwrap();
    go(&mut forker);
    let mut line = String::new();
    BufReader::new(forker.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let made: u32 = line.trim().parse().unwrap();
    // The forker itself is one of the 8.
    assert_eq!(made, 7, "children forked under pids.max 8");

    // The CPU limits are in the files the kernel reads, in this layout's terms.
    let layout = cgroup::mounts::detect().unwrap();
    match &layout {
        cgroup::mounts::Layout::Unified(placed) => {
            let dir = placed.own_dir.join(&name).join("few");
            assert_eq!(read(&dir, "cpu.max"), "50000 100000");
            assert_eq!(read(&dir, "cpu.weight"), "200");
        }
        cgroup::mounts::Layout::Hybrid { .. } => {
            let dir = layout
                .v1_with("cpu")
                .unwrap()
                .own_dir
                .join(&name)
                .join("few");
            assert_eq!(read(&dir, "cpu.cfs_quota_us"), "50000");
            assert_eq!(read(&dir, "cpu.shares"), "2048");
        }
    }
    // Removing the tenant kills what is left in it.
    cg.remove_tenant("few").unwrap();
    assert!(forker.wait().is_ok());
}

fn read(dir: &std::path::Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.join(file).display()))
        .trim()
        .to_owned()
}

#[test]
fn after_a_crash_a_new_daemon_removes_every_group_the_old_one_left_and_nothing_else() {
    require_root!();
    let name = instance("crash");
    // The "old daemon": groups with a live process, never cleaned up.
    let old = cgroup::detect(&name).unwrap();
    old.prepare().unwrap();
    old.set_tenant(
        "left",
        &TenantLimits {
            memory_max: Some(512 << 20),
            weight: 1,
            cpus: None,
            pids_max: Some(100),
        },
    )
    .unwrap();
    let group = old.create_worker("left", "w7").unwrap();
    let mut orphan = Command::new("sleep").arg("600").spawn().unwrap();
    old.attach(&group, orphan.id()).unwrap();
    drop(old);
    // A group beside ours, which is not ours to touch.
    let neighbour = instance("neighbour");
    let _other = Groups::new(&neighbour);

    let new = cgroup::detect(&name).unwrap();
    let removed = new.remove_all().unwrap();
    assert_eq!(removed, 3, "instance, tenant and worker groups");
    // The orphan was killed with its group.
    let status = orphan.wait().unwrap();
    assert!(!status.success());
    let listed = cgroups_of(std::process::id());
    assert!(!listed.contains(&name), "{listed}");
    // Every hierarchy's directory is gone; the neighbour's is still there.
    let layout = cgroup::mounts::detect().unwrap();
    let dirs: Vec<std::path::PathBuf> = match &layout {
        cgroup::mounts::Layout::Unified(p) => vec![p.own_dir.clone()],
        cgroup::mounts::Layout::Hybrid { v1, unified } => v1
            .iter()
            .chain(unified.iter())
            .map(|p| p.own_dir.clone())
            .collect(),
    };
    for dir in &dirs {
        assert!(!dir.join(&name).exists(), "{}", dir.join(&name).display());
    }
    assert!(dirs.iter().any(|d| d.join(&neighbour).is_dir()));
}

/// Python waiting for a line, then opening each path read-write and printing `ok` or the
/// error's name, one line per path.
fn opener(paths: &[&std::path::Path]) -> Child {
    let list = paths
        .iter()
        .map(|p| format!("{:?}", p.display().to_string()))
        .collect::<Vec<_>>()
        .join(", ");
    waiting_python(&format!(
        "import errno, os\nfor p in [{list}]:\n    try:\n        os.close(os.open(p, os.O_RDWR))\n        print('ok', flush=True)\n    except OSError as e:\n        print(errno.errorcode[e.errno], flush=True)"
    ))
}

#[test]
fn the_device_gate_lets_a_worker_open_only_what_it_was_granted() {
    require_root!();
    use accel_runtime::gate::{self, grants, DeviceGate, Grant};
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};

    gate::ensure_bpffs().unwrap();
    let name = instance("gate");
    let cg = Groups::new(&name);
    cg.set_tenant(
        "t",
        &TenantLimits {
            memory_max: None,
            weight: 1,
            cpus: None,
            pids_max: None,
        },
    )
    .unwrap();
    let group = cg.create_worker("t", "w0").unwrap();
    let Some(gate_dir) = cg.gate_dir(&group) else {
        panic!("no unified cgroup hierarchy is mounted, so no device gate can attach");
    };

    // Device nodes of our own: /dev/null's numbers, and NVIDIA's first GPU, which has no
    // driver here (unguarded, opening it fails with ENXIO).
    let nodes = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let null = nodes.path().join("null");
    let gpu = nodes.path().join("nvidia0");
    let rw = Mode::from_bits_truncate(0o666);
    mknod(&null, SFlag::S_IFCHR, rw, makedev(1, 3)).unwrap();
    mknod(
        &gpu,
        SFlag::S_IFCHR,
        rw,
        makedev(grants::NVIDIA_MAJOR.into(), 0),
    )
    .unwrap();

    let mut worker = opener(&[&null, &gpu]);
    cg.attach(&group, worker.id()).unwrap();
    let pins = gate::pin_dir(&name, "t", "w0");
    // Pins are removed however the test ends.
    struct Unpin(String);
    impl Drop for Unpin {
        fn drop(&mut self) {
            let _ = accel_runtime::gate::remove_pins(&self.0);
        }
    }
    let _unpin = Unpin(name.clone());
    let granted = [Grant::char(1, Some(3), grants::access::READ_WRITE, "null")];
    let gate = DeviceGate::attach(&gate_dir, &granted, &pins).unwrap();
    go(&mut worker);
    let answers: Vec<String> = BufReader::new(worker.stdout.take().unwrap())
        .lines()
        .map(Result::unwrap)
        .collect();
    assert!(worker.wait().unwrap().success());
    // The gate answered, not the missing driver: EPERM, not ENXIO.
    assert_eq!(answers, ["ok", "EPERM"]);
    assert_eq!(gate.denials(), 1);
    // A restarted daemon finds the pinned gate and its count.
    assert_eq!(DeviceGate::open(&pins).unwrap().denials(), 1);

    // Outside the group, the same node is only refused by its missing driver.
    let mut outsider = opener(&[&gpu]);
    go(&mut outsider);
    let mut line = String::new();
    BufReader::new(outsider.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ENXIO");
    outsider.wait().unwrap();

    // Removing the pins detaches the gate; nothing of this instance is left in bpffs.
    assert_eq!(gate::remove_pins(&name).unwrap(), 2);
    assert!(!pins.exists());
    assert!(!pins.parent().unwrap().parent().unwrap().exists());
}
