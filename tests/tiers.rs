//! The KV memory tiers through the daemon: sequences preempted into the disk tier (sealed for a
//! tenant that asks) finish with the output they would have had; a full disk falls back to
//! recomputing; a daemon killed while its tier holds files leaves nothing readable by a
//! worker's user, and its next start removes them.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use accel_tests::{eventually, fixture_model, is_root, Daemon, DaemonOptions};
use serde_json::{json, Value};

/// Two tenants an operator acts for: `sealed` asks for encryption at rest.
const POLICY: &str = "tenants:\n  - name: sealed\n    encrypt_kv_at_rest: true\n    match: {default: true}\n  - name: plain\n    match: {uids: [61002]}\n";

/// A daemon serving the fixture model as `tiny` with 16 device blocks (two sequences of 120
/// tokens), no host tier and a disk tier in `kv_dir`: every preemption goes to disk.
fn disk_daemon(kv_dir: &Path, disk_blocks: usize) -> Daemon {
    let extra = format!(
        "kv_disk_dir: {}\nmodels:\n  - name: tiny\n    path: {}\n    kv_blocks: 16\n    max_sequences: 8\n    swap_blocks: 0\n    disk_blocks: {disk_blocks}\n    preemption: swap\n    prefix_cache: false\n",
        kv_dir.display(),
        fixture_model().display()
    );
    Daemon::start_with(DaemonOptions {
        policy: Some(POLICY),
        extra_config: &extra,
        ..Default::default()
    })
}

/// A completion of 100 tokens after a 20-token prompt of its own, greedy or seeded.
fn request(i: usize) -> Value {
    let prompt: Vec<u32> = (0..20)
        .map(|j| ((i * 37 + j * 11) % 250) as u32 + 3)
        .collect();
    let mut body =
        json!({"model": "tiny", "prompt": prompt, "max_tokens": 100, "ignore_eos": true});
    if i.is_multiple_of(2) {
        body["temperature"] = json!(0);
    } else {
        body["temperature"] = json!(0.9);
        body["seed"] = json!(i);
    }
    body
}

fn complete_for(daemon: &Daemon, tenant: &str, body: &Value) -> String {
    let stream = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    let (status, text) = accel_tests::http_exchange(
        stream,
        "POST",
        "/v1/completions",
        Some(body.to_string().as_bytes()),
        &[
            ("Content-Type", "application/json"),
            ("x-accel-tenant", tenant),
        ],
    )
    .unwrap();
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    answer["choices"][0]["text"].as_str().unwrap().to_owned()
}

fn tenant_of(i: usize) -> &'static str {
    if i.is_multiple_of(2) {
        "sealed"
    } else {
        "plain"
    }
}

/// Sends requests `0..n` at once, each from its own thread; their texts in order.
fn all_at_once(daemon: &Daemon, n: usize) -> Vec<String> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| s.spawn(move || complete_for(daemon, tenant_of(i), &request(i))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// A sample's value in the daemon's metrics (0 when absent).
fn metric(daemon: &Daemon, series: &str) -> f64 {
    let (_, text) = daemon.request("GET", "/metrics", None);
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

fn tier_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir.join("model-tiny")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "kv"))
        .collect()
}

/// Six sequences of 8 blocks on a pool of 16: the later ones are preempted to disk (the
/// sealed tenant's blocks encrypted) and come back; each text is what the request gives
/// alone, greedy and seeded. The metrics count the swaps both ways and no failure, `accelctl
/// memory` shows the tier, and no file is left once they are done.
#[test]
fn sequences_preempted_to_disk_finish_as_they_would_have() {
    let kv = tempfile::tempdir().unwrap();
    let daemon = disk_daemon(kv.path(), 256);
    let alone: Vec<String> = (0..6)
        .map(|i| complete_for(&daemon, tenant_of(i), &request(i)))
        .collect();
    assert_eq!(
        metric(
            &daemon,
            "accel_kv_swaps_total{direction=\"out\",model=\"tiny\",tier=\"disk\"}"
        ),
        0.0,
        "one at a time, nothing is preempted"
    );
    let together = all_at_once(&daemon, 6);
    assert_eq!(together, alone);
    let out = metric(
        &daemon,
        "accel_kv_swaps_total{direction=\"out\",model=\"tiny\",tier=\"disk\"}",
    );
    let back = metric(
        &daemon,
        "accel_kv_swaps_total{direction=\"in\",model=\"tiny\",tier=\"disk\"}",
    );
    assert!(out > 0.0, "{}", daemon.request("GET", "/metrics", None).1);
    assert_eq!(out, back);
    assert!(
        metric(
            &daemon,
            "accel_kv_swap_bytes_total{direction=\"out\",model=\"tiny\",tier=\"disk\"}"
        ) >= out * 8192.0
    );
    for tenant in ["sealed", "plain"] {
        let swaps = metric(
            &daemon,
            &format!(
                "accel_preemptions_total{{kind=\"swap_disk\",model=\"tiny\",tenant=\"{tenant}\"}}"
            ),
        );
        let recomputes = metric(
            &daemon,
            &format!(
                "accel_preemptions_total{{kind=\"recompute\",model=\"tiny\",tenant=\"{tenant}\"}}"
            ),
        );
        assert_eq!(recomputes, 0.0, "{tenant}: the disk tier had room");
        eprintln!("{tenant}: {swaps} preempted to disk");
    }
    assert_eq!(
        metric(
            &daemon,
            "accel_kv_swap_failures_total{direction=\"out\",model=\"tiny\",tier=\"disk\"}"
        ),
        0.0
    );
    assert_eq!(
        metric(&daemon, "accel_kv_disk_auth_failures_total{model=\"tiny\"}"),
        0.0
    );
    assert!(
        tier_files(kv.path()).is_empty(),
        "no file outlives its blocks"
    );

    let out = daemon.ctl(&["--json", "memory"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let memory = accel_tests::json_of(&out);
    let tiers = &memory["devices"][0]["models"][0]["tiers"];
    assert_eq!(tiers[2]["tier"], "disk", "{memory}");
    assert_eq!(tiers[2]["capacity"], 256);
    assert_eq!(tiers[2]["used"], 0);
    assert_eq!(tiers[0]["capacity"], 16);
    let table = daemon.ctl(&["memory"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("disk") && text.contains("sealed"), "{text}");
}

/// The policy's tier limits reach the scheduler: a tenant allowed no disk blocks
/// (`limits.disk_kv_blocks: 0`) has its preempted sequences recomputed while the other
/// tenant's go to disk, and every text is still what it is alone.
#[test]
fn a_tenant_allowed_no_disk_blocks_is_recomputed_instead() {
    const CAPPED: &str = "tenants:\n  - name: sealed\n    encrypt_kv_at_rest: true\n    match: {default: true}\n  - name: plain\n    match: {uids: [61002]}\n    limits: {disk_kv_blocks: 0}\n";
    let kv = tempfile::tempdir().unwrap();
    let extra = format!(
        "kv_disk_dir: {}\nmodels:\n  - name: tiny\n    path: {}\n    kv_blocks: 16\n    max_sequences: 8\n    swap_blocks: 0\n    disk_blocks: 256\n    preemption: swap\n    prefix_cache: false\n",
        kv.path().display(),
        fixture_model().display()
    );
    let daemon = Daemon::start_with(DaemonOptions {
        policy: Some(CAPPED),
        extra_config: &extra,
        ..Default::default()
    });
    let alone: Vec<String> = (0..8)
        .map(|i| complete_for(&daemon, tenant_of(i), &request(i)))
        .collect();
    assert_eq!(all_at_once(&daemon, 8), alone);
    let count = |kind: &str, tenant: &str| {
        metric(
            &daemon,
            &format!(
                "accel_preemptions_total{{kind=\"{kind}\",model=\"tiny\",tenant=\"{tenant}\"}}"
            ),
        )
    };
    eprintln!(
        "plain: {} recomputed; sealed: {} to disk",
        count("recompute", "plain"),
        count("swap_disk", "sealed")
    );
    assert_eq!(
        count("swap_disk", "plain"),
        0.0,
        "plain may hold no disk blocks"
    );
    assert!(
        count("recompute", "plain") > 0.0,
        "plain's sequences were preempted and recomputed: {}",
        daemon.request("GET", "/metrics", None).1
    );
    assert_eq!(count("recompute", "sealed"), 0.0, "sealed's went to disk");
}

/// A disk tier on a filesystem of 64 KiB fills after a few blocks (ENOSPC): those swaps fail
/// and their sequences are recomputed; every request still gets what it gets alone, and the
/// failures are counted.
#[test]
fn a_full_disk_falls_back_to_recompute_and_loses_nothing() {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root (CI runs this as root)");
        return;
    }
    let kv = tempfile::tempdir().unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        kv.path(),
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=64k,mode=0700"),
    )
    .unwrap();
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _unmount = Unmount(kv.path());
    let daemon = disk_daemon(kv.path(), 256);
    let alone: Vec<String> = (0..6)
        .map(|i| complete_for(&daemon, tenant_of(i), &request(i)))
        .collect();
    assert_eq!(all_at_once(&daemon, 6), alone);
    let failed = metric(
        &daemon,
        "accel_kv_swap_failures_total{direction=\"out\",model=\"tiny\",tier=\"disk\"}",
    );
    assert!(failed > 0.0, "{}", daemon.log_text());
    assert!(
        daemon.log_text().contains("No space left on device"),
        "the error is logged"
    );
    assert_eq!(daemon.request("GET", "/healthz", None).0, 200);
}

/// kill -9 while the disk tier holds a tenant's blocks: its file is the daemon's alone (mode
/// 0600; a worker's user cannot read it), and the next start removes it.
#[test]
fn a_killed_daemons_disk_tier_is_removed_at_the_next_start() {
    let kv = tempfile::tempdir().unwrap();
    let mut daemon = disk_daemon(kv.path(), 4096);
    let mut left = Vec::new();
    for _attempt in 0..5 {
        let socket = daemon.socket.clone();
        // Many long streams, left running: the pool is overcommitted for as long as they go.
        let streams: Vec<_> = (0..12)
            .map(|i| {
                let mut body = request(i);
                body["stream"] = json!(true);
                body["max_tokens"] = json!(220);
                accel_tests::open_stream(&socket, Some(tenant_of(i)), &body)
            })
            .collect();
        let mut found = Vec::new();
        eventually(Duration::from_secs(20), || {
            found = tier_files(kv.path());
            !found.is_empty()
        });
        daemon.signal(nix::sys::signal::Signal::SIGKILL);
        daemon.wait_exit(Duration::from_secs(10));
        drop(streams);
        left = tier_files(kv.path());
        if !left.is_empty() {
            break;
        }
        // The file went between the look and the kill: try again.
        daemon.spawn();
        daemon.wait_ready();
    }
    assert!(!left.is_empty(), "no disk tier file was ever seen");
    for file in &left {
        let meta = std::fs::metadata(file).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600, "{}", file.display());
        assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());
        if is_root() {
            // As a worker's unprivileged user (nobody).
            let read = std::process::Command::new("cat")
                .arg(file)
                .uid(65534)
                .gid(65534)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(!read.success(), "nobody read {}", file.display());
        }
    }
    daemon.spawn();
    daemon.wait_ready();
    assert!(
        tier_files(kv.path()).is_empty(),
        "{:?}",
        tier_files(kv.path())
    );
    assert!(
        daemon
            .log_text()
            .contains("removed a previous run's KV disk tier files"),
        "{}",
        daemon.log_text()
    );
}

/// Engines in worker processes, each with a uid of its own: a dedicated tenant's worker and
/// the shared one each keep their disk tier in a directory only they can enter, their files
/// unreadable by the other's uid; the sequences they preempt to disk finish as they would
/// have; a worker killed while holding files is replaced with its directory emptied.
#[test]
fn each_workers_disk_tier_is_its_own() {
    if !is_root() {
        eprintln!("skipped: workers with uids of their own need root (CI runs this as root)");
        return;
    }
    const DEDICATED: &str = "tenants:\n  - name: sealed\n    encrypt_kv_at_rest: true\n    isolation: dedicated\n    limits: {memory: 1GiB}\n    match: {default: true}\n  - name: plain\n    match: {uids: [61002]}\n";
    let kv = tempfile::tempdir().unwrap();
    let extra = format!(
        "isolation: shared\nworker_uids: {{first: 3410000, count: 1000}}\nkv_disk_dir: {}\nmodels:\n  - name: tiny\n    path: {}\n    kv_blocks: 16\n    max_sequences: 8\n    swap_blocks: 0\n    disk_blocks: 4096\n    preemption: swap\n    prefix_cache: false\n",
        kv.path().display(),
        fixture_model().display()
    );
    let daemon = Daemon::start_with(DaemonOptions {
        policy: Some(DEDICATED),
        extra_config: &extra,
        ..Default::default()
    });
    let listed = accel_tests::json_of(&daemon.ctl(&["workers", "--json"]));
    let pid_of = |listed: &Value, worker: &str| -> u32 {
        listed["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["worker"] == worker)
            .and_then(|w| w["pid"].as_u64())
            .unwrap_or_else(|| panic!("no {worker} in {listed}")) as u32
    };
    let uid_of = |pid: u32| -> u32 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().next()?.parse().ok())
            .unwrap()
    };
    let shared_uid = uid_of(pid_of(&listed, "_shared/tiny-cpu"));
    let sealed_pid = pid_of(&listed, "sealed/tiny-cpu");
    let sealed_uid = uid_of(sealed_pid);
    assert_ne!(shared_uid, sealed_uid);
    let shared_dir = kv.path().join(format!("workers/{shared_uid}"));
    let sealed_dir = kv.path().join(format!("workers/{sealed_uid}"));
    for (dir, uid) in [(&shared_dir, shared_uid), (&sealed_dir, sealed_uid)] {
        let meta = std::fs::symlink_metadata(dir).unwrap();
        assert_eq!(
            (meta.uid(), meta.mode() & 0o777),
            (uid, 0o700),
            "{}",
            dir.display()
        );
    }
    let files_in = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "kv"))
                    .collect()
            })
            .unwrap_or_default()
    };

    // Long streams from both tenants overcommit both workers' pools until both write files.
    let streams: Vec<_> = (0..12)
        .map(|i| {
            let mut body = request(i);
            body["stream"] = json!(true);
            body["max_tokens"] = json!(220);
            accel_tests::open_stream(&daemon.socket, Some(tenant_of(i)), &body)
        })
        .collect();
    let (mut shared_files, mut sealed_files) = (Vec::new(), Vec::new());
    eventually(Duration::from_secs(30), || {
        shared_files.extend(files_in(&shared_dir));
        sealed_files.extend(files_in(&sealed_dir));
        shared_files.sort();
        shared_files.dedup();
        sealed_files.sort();
        sealed_files.dedup();
        !shared_files.is_empty() && !sealed_files.is_empty()
    });
    let run_as = |uid: u32, program: &str, path: &Path| {
        std::process::Command::new(program)
            .arg(path)
            .uid(uid)
            .gid(uid)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    // Each file is its worker's: its owner may list the directory and read what is still
    // there; the other worker's uid can do neither.
    eprintln!(
        "seen: {} files of the shared worker's, {} of the dedicated one's",
        shared_files.len(),
        sealed_files.len()
    );
    assert!(run_as(shared_uid, "ls", &shared_dir) && run_as(sealed_uid, "ls", &sealed_dir));
    assert!(!run_as(sealed_uid, "ls", &shared_dir) && !run_as(shared_uid, "ls", &sealed_dir));
    for (files, owner, other) in [
        (&shared_files, shared_uid, sealed_uid),
        (&sealed_files, sealed_uid, shared_uid),
    ] {
        for file in files {
            if let Ok(meta) = std::fs::metadata(file) {
                assert_eq!((meta.uid(), meta.mode() & 0o777), (owner, 0o600));
            }
            let read_by_owner = run_as(owner, "cat", file);
            assert!(read_by_owner || !file.exists(), "{}", file.display());
            assert!(
                !run_as(other, "cat", file),
                "uid {other} read {}",
                file.display()
            );
        }
    }

    // The dedicated worker killed while it may hold files: its replacement starts with its
    // directory emptied (a file left there is gone), and serves.
    let left = sealed_dir.join("left-behind.kv");
    std::fs::write(&left, b"a lost worker's").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sealed_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    drop(streams);
    assert!(!complete_for(&daemon, "sealed", &request(0)).is_empty());
    let listed = accel_tests::json_of(&daemon.ctl(&["workers", "--json"]));
    let replacement = pid_of(&listed, "sealed/tiny-cpu");
    assert_ne!(replacement, sealed_pid);
    assert_eq!(
        uid_of(replacement),
        sealed_uid,
        "the replacement has its uid"
    );
    assert!(!left.exists(), "{} outlived its worker", left.display());
    for file in &sealed_files {
        assert!(!file.exists(), "{} outlived its worker", file.display());
    }

    // Preempted to disk in both workers, every text is what it is alone.
    let alone: Vec<String> = (0..12)
        .map(|i| complete_for(&daemon, tenant_of(i), &request(i)))
        .collect();
    assert_eq!(all_at_once(&daemon, 12), alone);
    let out = metric(
        &daemon,
        "accel_kv_swaps_total{direction=\"out\",model=\"tiny\",tier=\"disk\"}",
    );
    assert!(out > 0.0, "{}", daemon.request("GET", "/metrics", None).1);
    eprintln!("{out} swaps out to disk");
    assert_eq!(
        metric(
            &daemon,
            "accel_kv_swap_failures_total{direction=\"out\",model=\"tiny\",tier=\"disk\"}"
        ),
        0.0,
        "{}",
        daemon.log_text()
    );
}

/// Cold prefix blocks through the daemon, with the engine in acceld and in a worker (whose
/// counters reach the metrics over its socket): prompts of four full blocks each, one after
/// another, outgrow a device pool of 16 blocks, so cached blocks are evicted and kept in the
/// host tier; the first prompt again brings its blocks back and gets the text it got first.
#[test]
fn cold_prefix_blocks_go_to_the_host_and_come_back_in_acceld_and_in_a_worker() {
    let isolations: &[&str] = if is_root() {
        &["off", "shared"]
    } else {
        eprintln!("in a worker only as root (CI runs this as root)");
        &["off"]
    };
    for isolation in isolations {
        let extra = format!(
            "isolation: {isolation}\nmodels:\n  - name: tiny\n    path: {}\n    kv_blocks: 16\n    swap_blocks: 64\n    preemption: swap\n",
            fixture_model().display()
        );
        let daemon = Daemon::start_with(DaemonOptions {
            policy: Some(POLICY),
            extra_config: &extra,
            ..Default::default()
        });
        let prompt = |i: usize| -> Value {
            let tokens: Vec<u32> = (0..64)
                .map(|j| ((i * 53 + j * 7) % 250) as u32 + 3)
                .collect();
            json!({"model": "tiny", "prompt": tokens, "max_tokens": 4, "temperature": 0, "ignore_eos": true})
        };
        let texts: Vec<String> = (0..6)
            .map(|i| complete_for(&daemon, "sealed", &prompt(i)))
            .collect();
        let again = complete_for(&daemon, "sealed", &prompt(0));
        assert_eq!(again, texts[0], "{isolation}");
        let cold = |event: &str| {
            metric(
                &daemon,
                &format!(
                    "accel_prefix_cache_cold_blocks_total{{event=\"{event}\",model=\"tiny\"}}"
                ),
            )
        };
        let evicted = || {
            metric(
                &daemon,
                "accel_prefix_cache_evictions_total{model=\"tiny\"}",
            )
        };
        // The engine's counters are read once the device is idle, which may be just after
        // the last answer reached us (a worker is asked over its socket).
        let seen = eventually(Duration::from_secs(5), || {
            evicted() > 0.0 && cold("demoted") > 0.0 && cold("promoted") > 0.0
        });
        eprintln!(
            "{isolation}: {} evicted, {} demoted, {} promoted",
            evicted(),
            cold("demoted"),
            cold("promoted")
        );
        assert!(
            seen,
            "{isolation}: {}",
            daemon.request("GET", "/metrics", None).1
        );
        let hits = metric(
            &daemon,
            "accel_prefix_cache_hit_tokens_total{model=\"tiny\",tenant=\"sealed\"}",
        );
        assert!(
            hits >= 48.0,
            "{isolation}: the first prompt's blocks were found again: {hits}"
        );
    }
}
