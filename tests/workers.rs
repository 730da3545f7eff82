//! Engines in worker processes (`isolation: shared`): the same outputs as in-process, workers
//! that run unprivileged, and a worker killed mid-request replaced with the request finishing
//! as if nothing happened. Needs root to switch the workers' user (CI runs as root).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use accel_tests::{eventually, fixture_model, require_root, Daemon, DaemonOptions};
use serde_json::{json, Value};

fn daemon(isolation: &str) -> Daemon {
    daemon_for(isolation, &fixture_model())
}

fn daemon_for(isolation: &str, model: &Path) -> Daemon {
    let extra = format!(
        "isolation: {isolation}\nmodels:\n  - name: tiny\n    path: {}\n    kv_blocks: 64\n",
        model.display()
    );
    Daemon::start_with(DaemonOptions {
        extra_config: &extra,
        ..Default::default()
    })
}

/// Worker processes of the daemon: its children running `acceld worker`.
fn workers(daemon: &Daemon) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The parent pid is the second field after the parenthesised command name.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == Some(daemon.pid()) && cmdline.split(|&b| b == 0).any(|a| a == b"worker") {
            found.push(pid);
        }
    }
    found
}

/// The daemon instance a worker's cgroup path names (`accel-<hash>`).
fn instance_of(pid: u32) -> String {
    let groups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    groups
        .lines()
        .find_map(|l| {
            let path = l.splitn(3, ':').nth(2)?;
            let parts: Vec<&str> = path.split('/').collect();
            let at = parts.iter().position(|p| *p == "_shared")?;
            at.checked_sub(1).map(|i| parts[i].to_owned())
        })
        .unwrap_or_else(|| panic!("worker {pid} is in no _shared group: {groups}"))
}

/// Every directory of `instance` in the host's cgroup hierarchies and bpffs.
fn leftovers(instance: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let layout = accel_runtime::cgroup::mounts::detect().unwrap();
    let dirs = match &layout {
        accel_runtime::cgroup::mounts::Layout::Unified(p) => vec![p.own_dir.clone()],
        accel_runtime::cgroup::mounts::Layout::Hybrid { v1, unified } => v1
            .iter()
            .chain(unified.iter())
            .map(|p| p.own_dir.clone())
            .collect(),
    };
    for dir in dirs {
        if dir.join(instance).exists() {
            found.push(dir.join(instance));
        }
    }
    let pins = Path::new("/sys/fs/bpf/accel").join(instance);
    if pins.exists() {
        found.push(pins);
    }
    found
}

fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default()
}

fn greedy(daemon: &Daemon, prompt: &[u32], max_tokens: usize) -> Value {
    let body = json!({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true});
    let (status, text) =
        daemon.request("POST", "/v1/completions", Some(body.to_string().as_bytes()));
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

fn reference() -> (Vec<u32>, Vec<u32>) {
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_model().join("expected.json")).unwrap(),
    )
    .unwrap();
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    (ids(&expected["prompt_ids"][0]), ids(&expected["greedy"][0]))
}

#[test]
fn a_worker_serves_the_reference_tokens_unprivileged_and_without_capabilities() {
    require_root!();
    // The model where only root may read it: the worker gets its files as descriptors.
    let private = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        private.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let model = private.path().join("tiny");
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(fixture_model()).unwrap().flatten() {
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    let daemon = daemon_for("shared", &model);
    let pids = workers(&daemon);
    assert_eq!(pids.len(), 1, "one worker for the one model: {pids:?}");
    let pid = pids[0];
    // Not root, no capabilities, no way back to them.
    let uid = status_field(pid, "Uid");
    assert!(uid.split_whitespace().all(|u| u != "0"), "Uid: {uid}");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    // Its only descriptors beyond stdio are its socket (and what it opened itself: the
    // model's files, mapped).
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    assert!(fds.iter().any(|f| f.starts_with("socket:")), "{fds:?}");
    assert!(
        !fds.iter()
            .any(|f| f.contains("acceld.sock") || f.ends_with(".lock")),
        "the worker holds none of the supervisor's files: {fds:?}"
    );

    // In its group in every hierarchy (the unified one, `0::`, holds its device gate), and
    // the gate is pinned where a restarted daemon finds it.
    let instance = instance_of(pid);
    let groups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for line in groups
        .lines()
        .filter(|l| l.starts_with("0::") || l.contains(":memory:"))
    {
        assert!(
            line.ends_with(&format!("{instance}/_shared/tiny-cpu")),
            "{groups}"
        );
    }
    assert!(Path::new(&format!(
        "/sys/fs/bpf/accel/{instance}/_shared/tiny-cpu/link"
    ))
    .exists());

    // The weights it maps came from the supervisor: it could not have opened them.
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(maps.contains("model.safetensors"), "the weights are mapped");

    let (prompt, want) = reference();
    let answer = greedy(&daemon, &prompt, want.len());
    let tokenizer = accel_runtime::model::load(&fixture_model())
        .unwrap()
        .tokenizer;
    assert_eq!(
        answer["choices"][0]["text"],
        tokenizer.decode(&want, true).unwrap()
    );

    // Its cgroup and gate are in the metrics.
    let metrics = metric_values(&daemon);
    let labels = "{model=\"tiny\",worker=\"_shared/tiny-cpu\"}";
    assert_eq!(metrics.get(&format!("accel_worker_up{labels}")), Some(&1.0));
    assert_eq!(
        metrics.get(&format!("accel_worker_restarts{labels}")),
        Some(&0.0)
    );
    assert!(
        metrics[&format!("accel_worker_memory_bytes{labels}")] > 1e6,
        "{metrics:?}"
    );
    assert!(metrics[&format!("accel_worker_cpu_seconds{labels}")] > 0.0);
    assert_eq!(
        metrics.get(&format!("accel_worker_device_denials{labels}")),
        Some(&0.0)
    );

    // And operators see it with accelctl.
    let listed = accel_tests::json_of(&daemon.ctl(&["workers", "--json"]));
    assert_eq!(listed["isolation"], "shared");
    assert_eq!(listed["workers"][0]["worker"], "_shared/tiny-cpu");
    assert_eq!(listed["workers"][0]["tenant"], Value::Null);
    assert_eq!(listed["workers"][0]["pid"], pid);
    assert_eq!(listed["workers"][0]["device_denials"], 0);
    let table = daemon.ctl(&["workers"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("tiny-cpu") && table.contains(&pid.to_string()),
        "{table}"
    );
}

/// `name{labels} value` lines of the daemon's metrics.
fn metric_values(daemon: &Daemon) -> std::collections::HashMap<String, f64> {
    let (status, text) = daemon.request("GET", "/metrics", None);
    assert_eq!(status, 200);
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

#[test]
fn a_worker_killed_mid_request_is_replaced_and_the_request_ends_as_it_would_have() {
    require_root!();
    let daemon = daemon("shared");
    let (prompt, _) = reference();
    // Most of the fixture's context: the tiny model is quick, and a shorter stream could end
    // before the kill lands (the worker would then be replaced only by a next request).
    let max_tokens = 240;
    let undisturbed = greedy(&daemon, &prompt, max_tokens);

    // The same request, streamed; the worker is killed once tokens are flowing.
    use std::io::{BufRead, BufReader, Read, Write};
    let body = json!({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true, "stream": true}).to_string();
    let mut s = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reader = BufReader::new(s);
    let mut streamed = String::new();
    while !streamed.contains("data: ") {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "{streamed}");
        streamed.push_str(&line);
    }
    let before = workers(&daemon);
    assert_eq!(before.len(), 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(before[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    reader.read_to_string(&mut streamed).unwrap();
    let text: String = streamed
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| {
            let v: Value = serde_json::from_str(d).unwrap();
            v["choices"][0]["text"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(
        text,
        undisturbed["choices"][0]["text"].as_str().unwrap(),
        "{streamed}"
    );
    // A new worker took the old one's place.
    assert!(eventually(Duration::from_secs(10), || {
        let now = workers(&daemon);
        now.len() == 1 && now != before
    }));
    let metrics = metric_values(&daemon);
    assert_eq!(
        metrics.get("accel_worker_restarts{model=\"tiny\",worker=\"_shared/tiny-cpu\"}"),
        Some(&1.0),
        "{metrics:?}"
    );
    let log = daemon.log_text();
    assert!(log.contains("worker lost"), "{log}");
    // It was lost with the request on it, which was recomputed.
    assert!(
        log.lines()
            .any(|l| l.contains("requeueing the sequences of a lost worker")
                && l.contains("sequences=1")),
        "{log}"
    );
}

#[test]
fn a_stopped_daemon_leaves_no_worker_group_or_gate_and_a_killed_one_is_cleaned_up_after() {
    require_root!();
    let state = tempfile::tempdir().unwrap();
    let extra = format!(
        "isolation: shared\nmodels:\n  - name: tiny\n    path: {}\n    kv_blocks: 64\n",
        fixture_model().display()
    );
    let options = || DaemonOptions {
        extra_config: &extra,
        state_dir: Some(state.path()),
        ..Default::default()
    };

    // Killed with SIGKILL: its worker dies with it, its groups and pinned gate stay behind.
    let mut first = Daemon::start_with(options());
    let worker = workers(&first)[0];
    let instance = instance_of(worker);
    first.signal(nix::sys::signal::Signal::SIGKILL);
    first.wait_exit(Duration::from_secs(10));
    assert!(eventually(Duration::from_secs(5), || !Path::new(&format!(
        "/proc/{worker}"
    ))
    .exists()));
    assert!(!leftovers(&instance).is_empty());

    // The next daemon on that state directory removes them before making its own.
    let mut second = Daemon::start_with(options());
    assert!(second
        .log_text()
        .contains("removed what an earlier daemon left"));
    let now = workers(&second);
    assert_eq!(now.len(), 1);
    assert_eq!(instance_of(now[0]), instance);

    // Stopped cleanly: no worker, group or pin of it is left.
    assert_eq!(second.stop(), Some(0));
    assert!(eventually(Duration::from_secs(2), || !Path::new(&format!(
        "/proc/{}",
        now[0]
    ))
    .exists()));
    assert_eq!(leftovers(&instance), Vec::<PathBuf>::new());
}

#[test]
fn a_worker_killed_while_idle_is_replaced_by_the_next_request() {
    require_root!();
    let daemon = daemon("shared");
    let (prompt, want) = reference();
    let before = greedy(&daemon, &prompt, want.len());
    let pid = workers(&daemon)[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    // The next request finds the worker gone, has it replaced, and gets the same answer.
    let after = greedy(&daemon, &prompt, want.len());
    assert_eq!(after["choices"][0]["text"], before["choices"][0]["text"]);
    let now = workers(&daemon);
    assert_eq!(now.len(), 1);
    assert_ne!(now[0], pid);
}

/// Workers replaced again and again are given up on: five lost within a minute and the
/// model's requests fail saying so, instead of a sixth being started.
#[test]
fn a_worker_that_keeps_crashing_is_not_restarted_for_ever() {
    require_root!();
    let daemon = daemon("shared");
    let (prompt, want) = reference();
    let body = json!({"model": "tiny", "prompt": prompt, "max_tokens": want.len(), "temperature": 0, "ignore_eos": true});
    let mut killed = Vec::new();
    let outcome = loop {
        let (status, text) =
            daemon.request("POST", "/v1/completions", Some(body.to_string().as_bytes()));
        if status != 200 || killed.len() > 6 {
            break (status, text);
        }
        let pid = workers(&daemon)[0];
        assert!(
            !killed.contains(&pid),
            "a worker served after it was killed"
        );
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        killed.push(pid);
    };
    // Four replacements served; the fifth loss is the last.
    assert_eq!(killed.len(), 5, "{outcome:?}");
    assert!(outcome.1.contains("not restarted"), "{outcome:?}");
    assert!(workers(&daemon).is_empty());
    assert!(
        daemon.log_text().contains("worker restarted"),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn a_read_only_cgroup_filesystem_stops_an_isolated_daemon_with_a_clear_error() {
    require_root!();
    let mut daemon = Daemon::prepare(DaemonOptions {
        extra_config: "isolation: shared\n",
        ..Default::default()
    });
    // The daemon in a mount namespace of its own where every cgroup hierarchy is read-only.
    let script = format!(
        "grep -E ' - cgroup2? ' /proc/self/mountinfo | cut -d' ' -f5 | while read m; do mount -o remount,bind,ro \"$m\" || exit 9; done; exec {} --config {}",
        accel_tests::bin("acceld").display(),
        daemon.config.display()
    );
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(71), "{stderr}");
    assert!(stderr.contains("cannot isolate workers"), "{stderr}");
    assert!(stderr.contains("read-only"), "{stderr}");
    assert!(stderr.contains("isolation: off"), "{stderr}");
    // With isolation off the same host runs it (loudly).
    std::fs::write(
        &daemon.config,
        std::fs::read_to_string(&daemon.config)
            .unwrap()
            .replace("isolation: shared", "isolation: off"),
    )
    .unwrap();
    daemon.spawn();
    daemon.wait_ready();
    assert!(daemon.log_text().contains("isolation: off"));
}

/// POSTs `body` to `path` over TCP as the tenant holding `token`.
fn post_as(port: u16, token: &str, path: &str, body: &Value) -> (u16, Value) {
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let auth = format!("Bearer {token}");
    let (status, text) = accel_tests::http_exchange(
        tcp,
        "POST",
        path,
        Some(body.to_string().as_bytes()),
        &[
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ],
    )
    .unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[test]
fn a_dedicated_tenant_gets_a_worker_of_its_own_under_its_limits() {
    require_root!();
    let port = accel_tests::free_port();
    let token = |t: &str| accel_tests::sha256_hex(&format!("{t}-token"));
    let policy = format!(
        "tenants:
  - name: alpha
    isolation: dedicated
    limits: {{memory: 1GiB, pids: 256}}
    match: {{tokens_sha256: [\"{}\"]}}
  - name: tight
    isolation: dedicated
    limits: {{memory: 16MiB}}
    match: {{tokens_sha256: [\"{}\"]}}
  - name: beta
    match: {{tokens_sha256: [\"{}\"]}}
",
        token("alpha"),
        token("tight"),
        token("beta")
    );
    let extra = format!(
        // A KV cache of 4,096 blocks takes 32 MiB: more than tight's 16 MiB.
        "isolation: shared\ntcp_listen: 127.0.0.1:{port}\nworker_uids: {{first: {WORKER_UIDS}, count: 1000}}\nmodels:\n  - name: tiny\n    path: {}\n    kv_blocks: 4096\n",
        fixture_model().display()
    );
    let daemon = Daemon::start_with(DaemonOptions {
        policy: Some(&policy),
        extra_config: &extra,
        ..Default::default()
    });

    // The shared worker and alpha's; tight's limit is below what the model needs.
    let listed = accel_tests::json_of(&daemon.ctl(&["workers", "--json"]));
    let groups: Vec<&str> = listed["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["worker"].as_str().unwrap())
        .collect();
    assert_eq!(groups, ["_shared/tiny-cpu", "alpha/tiny-cpu"], "{listed}");
    assert_eq!(listed["workers"][1]["tenant"], "alpha");
    // accelctl tenants show names the tenant's own worker.
    let shown = daemon.ctl(&["tenants", "show", "alpha"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("dedicated") && shown.contains("worker alpha/tiny-cpu"),
        "{shown}"
    );
    let alpha_pid = listed["workers"][1]["pid"].as_u64().unwrap() as u32;
    let shared_pid = listed["workers"][0]["pid"].as_u64().unwrap() as u32;

    // Each worker runs as an id of its own from worker_uids, so neither can signal the other.
    let alpha_uid = own_ids(alpha_pid);
    let shared_uid = own_ids(shared_pid);
    assert_ne!(alpha_uid, shared_uid);
    assert_eq!(listed["workers"][1]["user"], format!("uid {alpha_uid}"));
    assert!(
        can_signal(alpha_uid, alpha_pid),
        "a process of alpha's worker's uid signals that worker"
    );
    assert!(
        !can_signal(alpha_uid, shared_pid),
        "alpha's worker's uid cannot signal the shared worker"
    );
    assert!(!can_signal(shared_uid, alpha_pid));

    // Alpha's worker is in alpha's group, which carries alpha's memory limit.
    let instance = instance_of(shared_pid);
    let groups_of_alpha = std::fs::read_to_string(format!("/proc/{alpha_pid}/cgroup")).unwrap();
    assert!(
        groups_of_alpha.contains(&format!("{instance}/alpha/tiny-cpu")),
        "{groups_of_alpha}"
    );
    let layout = accel_runtime::cgroup::mounts::detect().unwrap();
    let limit_file = match &layout {
        accel_runtime::cgroup::mounts::Layout::Unified(p) => {
            p.own_dir.join(&instance).join("alpha/memory.max")
        }
        accel_runtime::cgroup::mounts::Layout::Hybrid { .. } => layout
            .v1_with("memory")
            .unwrap()
            .own_dir
            .join(&instance)
            .join("alpha/memory.limit_in_bytes"),
    };
    let limit = std::fs::read_to_string(&limit_file).unwrap();
    assert_eq!(limit.trim(), (1u64 << 30).to_string());
    // A reload with a new limit reaches the kernel at once.
    std::fs::write(
        &daemon.policy,
        policy.replace("memory: 1GiB", "memory: 2GiB"),
    )
    .unwrap();
    let (status, text) = daemon.request("POST", "/v1/policy/reload", None);
    assert_eq!(status, 200, "{text}");
    let limit = std::fs::read_to_string(&limit_file).unwrap();
    assert_eq!(limit.trim(), (2u64 << 30).to_string());

    // Both tenants are served, the same answer from either worker.
    let (prompt, want) = reference();
    let body = json!({"model": "tiny", "prompt": prompt, "max_tokens": want.len(), "temperature": 0, "ignore_eos": true});
    let (status, alpha) = post_as(port, "alpha-token", "/v1/completions", &body);
    assert_eq!(status, 200, "{alpha}");
    let (status, beta) = post_as(port, "beta-token", "/v1/completions", &body);
    assert_eq!(status, 200, "{beta}");
    assert_eq!(alpha["choices"][0]["text"], beta["choices"][0]["text"]);

    // Tight's requests are refused with both numbers, not served by the shared pool.
    let (status, tight) = post_as(port, "tight-token", "/v1/completions", &body);
    assert_eq!(status, 503, "{tight}");
    let message = tight["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("limits.memory 16 MiB") && message.contains("MiB model \"tiny\" needs"),
        "{message}"
    );

    // Alpha's worker killed: alpha is served by its replacement; the shared worker is untouched.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(alpha_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let (status, again) = post_as(port, "alpha-token", "/v1/completions", &body);
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["choices"][0]["text"], alpha["choices"][0]["text"]);
    let listed = accel_tests::json_of(&daemon.ctl(&["workers", "--json"]));
    assert_eq!(listed["workers"][0]["pid"], shared_pid);
    assert_eq!(listed["workers"][0]["restarts"], 0);
    assert_eq!(listed["workers"][1]["restarts"], 1);
    // Its replacement runs as the id it had.
    let replacement = listed["workers"][1]["pid"].as_u64().unwrap() as u32;
    assert_eq!(own_ids(replacement), alpha_uid);
}

/// The block of ids the tests give workers (`worker_uids`), far from any the host uses.
const WORKER_UIDS: u32 = 3_400_000;

/// A worker's uid, checked to be one of [`WORKER_UIDS`] in every slot (real, effective, saved,
/// file system) and equal to its gid, as the tests' block gives both at one offset.
fn own_ids(pid: u32) -> u32 {
    let ids = |field: &str| -> Vec<u32> {
        status_field(pid, field)
            .split_whitespace()
            .map(|id| id.parse().unwrap())
            .collect()
    };
    let (uids, gids) = (ids("Uid"), ids("Gid"));
    assert_eq!(uids.len(), 4, "{uids:?}");
    assert!(uids.iter().all(|&u| u == uids[0]), "{uids:?}");
    assert_eq!(uids, gids);
    assert!(
        (WORKER_UIDS..WORKER_UIDS + 1000).contains(&uids[0]),
        "{uids:?}"
    );
    assert_eq!(status_field(pid, "Groups"), "", "no supplementary groups");
    uids[0]
}

/// Whether a process running as `uid` may send `pid` a signal (`kill -0`).
fn can_signal(uid: u32, pid: u32) -> bool {
    use std::os::unix::process::CommandExt as _;
    std::process::Command::new("/bin/sh")
        .args(["-c", &format!("kill -0 {pid} 2>/dev/null")])
        .uid(uid)
        .gid(uid)
        .status()
        .unwrap()
        .success()
}

/// A file of a tenant's (or the pool's) group in `controller`'s hierarchy: `v1` on a hybrid
/// host, `v2` on a unified one.
fn group_file(instance: &str, group: &str, controller: &str, v1: &str, v2: &str) -> PathBuf {
    let layout = accel_runtime::cgroup::mounts::detect().unwrap();
    match &layout {
        accel_runtime::cgroup::mounts::Layout::Unified(p) => {
            p.own_dir.join(instance).join(group).join(v2)
        }
        accel_runtime::cgroup::mounts::Layout::Hybrid { .. } => layout
            .v1_with(controller)
            .unwrap()
            .own_dir
            .join(instance)
            .join(group)
            .join(v1),
    }
}

/// SmolLM2-135M's KV cache per token: 30 layers, keys and values of 3 heads of 64, in f32.
const SMOLLM2_KV_BYTES_PER_TOKEN: u64 = 30 * 2 * 3 * 64 * 4;

/// The kernel, not the daemon, stops a dedicated worker that grows past its tenant's memory
/// limit; the shared worker's tenant is served throughout. Of two requests killed together,
/// the one that fits alone is retried and answers as it would have, and the one that cannot
/// fit alone fails with an error naming the limit.
#[test]
fn a_dedicated_worker_killed_at_its_memory_limit_is_contained_and_its_requests_retried() {
    require_root!();
    let Some(model) = accel_tests::smollm2_gguf() else {
        return;
    };
    let port = accel_tests::free_port();
    let token = |t: &str| accel_tests::sha256_hex(&format!("{t}-token"));
    let policy = format!(
        "tenants:
  - name: alpha
    isolation: dedicated
    limits: {{memory: 1GiB}}
    match: {{tokens_sha256: [\"{}\"]}}
  - name: beta
    match: {{tokens_sha256: [\"{}\"]}}
",
        token("alpha"),
        token("beta")
    );
    // Prefill in small chunks, so a sequence's memory is its KV cache, which the kernel
    // charges to the worker page by page as the sequence grows.
    let extra = format!(
        "isolation: shared\ntcp_listen: 127.0.0.1:{port}\nmodels:\n  - name: small\n    path: {}\n    kv_blocks: 512\n    max_batch_tokens: 64\n    preemption: recompute\n",
        model.display()
    );
    let daemon = Daemon::start_with(DaemonOptions {
        policy: Some(&policy),
        extra_config: &extra,
        ..Default::default()
    });
    let completion = |prompt: &[u32], max_tokens: usize| json!({"model": "small", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true});
    let prompt = |seed: u32, len: usize| -> Vec<u32> {
        (0..len as u32)
            .map(|i| 500 + (i * 7 + seed * 131) % 30_000)
            .collect()
    };
    // A short request that fits under the limit many times over, and one whose cache alone
    // (3,000 tokens: 132 MiB) is twice the room the limit leaves. The margins are
    // wide because a worker's charged memory varies from run to run by tens of MiB (the model
    // file's page cache is charged to whichever group faults it in).
    let short = prompt(1, 50);
    let long = prompt(2, 3000);
    const ROOM: u64 = 64 << 20;
    // Long enough that the short one is surely still decoding when the long one's cache goes
    // over: the kernel reclaims the model file's page cache before it kills, so when that
    // happens varies (13 MiB of cache, a fifth of the room).
    const SHORT_TOKENS: usize = 256;
    let (status, want) = post_as(
        port,
        "beta-token",
        "/v1/completions",
        &completion(&short, SHORT_TOKENS),
    );
    assert_eq!(status, 200, "{want}");
    let want = want["choices"][0]["text"].clone();

    // Alpha's worker, warm; then alpha's limit is lowered to the most its group has used
    // (loading included) and ROOM more.
    let (status, warm) = post_as(
        port,
        "alpha-token",
        "/v1/completions",
        &completion(&[1, 2, 3], 2),
    );
    assert_eq!(status, 200, "{warm}");
    let listed = accel_tests::json_of(&daemon.ctl(&["workers", "--json"]));
    let shared_pid = listed["workers"][0]["pid"].as_u64().unwrap() as u32;
    let instance = instance_of(shared_pid);
    let peak_file = group_file(
        &instance,
        "alpha",
        "memory",
        "memory.max_usage_in_bytes",
        "memory.peak",
    );
    let peak: u64 = std::fs::read_to_string(&peak_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let limit = peak + ROOM;
    eprintln!(
        "alpha's group peaked at {} MiB; limit {} MiB; the long request's cache {} MiB",
        peak >> 20,
        limit >> 20,
        (3000 * SMOLLM2_KV_BYTES_PER_TOKEN) >> 20
    );
    std::fs::write(
        &daemon.policy,
        policy.replace("memory: 1GiB", &format!("memory: {limit}")),
    )
    .unwrap();
    let (status, text) = daemon.request("POST", "/v1/policy/reload", None);
    assert_eq!(status, 200, "{text}");

    // Alpha's short request decoding (and beta's meanwhile), then alpha's long one: the short
    // one is still decoding when the long one's prefill goes over. The short one goes first
    // because a long prefill takes the whole step budget, so a request arriving after it
    // waits for its prefill to end.
    let short_body = completion(&short, SHORT_TOKENS);
    let long_body = completion(&long, 1);
    let [(long_status, long_answer), (short_status, short_answer), (beta_status, beta_answer)] =
        std::thread::scope(|s| {
            let short = s.spawn(|| post_as(port, "alpha-token", "/v1/completions", &short_body));
            let beta = s.spawn(|| post_as(port, "beta-token", "/v1/completions", &short_body));
            assert!(
                eventually(Duration::from_secs(30), || {
                    let listed = accel_tests::json_of(&daemon.ctl(&["--json", "requests"]));
                    listed["data"].as_array().is_some_and(|requests| {
                        requests.iter().any(|r| {
                            r["tenant"] == "alpha" && r["completion_tokens"].as_u64() >= Some(1)
                        })
                    })
                }),
                "alpha's short request did not start"
            );
            let long = s.spawn(|| post_as(port, "alpha-token", "/v1/completions", &long_body));
            [long, short, beta].map(|h| h.join().unwrap())
        });
    // The short one was retried on its own and answers as the unlimited shared worker did.
    assert_eq!(short_status, 200, "{short_answer}");
    assert_eq!(short_answer["choices"][0]["text"], want);
    assert_eq!(beta_status, 200, "{beta_answer}");
    assert_eq!(beta_answer["choices"][0]["text"], want);
    // The long one cannot fit alone: a 400 naming the limit, which clients do not retry.
    assert_eq!(long_status, 400, "{long_answer}");
    assert_eq!(long_answer["error"]["code"], "request_cannot_be_served");
    let message = long_answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("limits.memory, {} MiB", limit >> 20))
            && message.contains("alone"),
        "{message}"
    );
    assert!(
        daemon
            .log_text()
            .contains("its sequences run again one at a time"),
        "the two were not retried one at a time"
    );
    let listed = accel_tests::json_of(&daemon.ctl(&["workers", "--json"]));
    let (shared, alpha) = (&listed["workers"][0], &listed["workers"][1]);
    assert_eq!(alpha["worker"], "alpha/small-cpu");
    // Replaced once after the first kill; the next replacement starts with alpha's next request.
    assert!(alpha["restarts"].as_u64().unwrap() >= 1, "{listed}");
    // Beta's worker was never disturbed.
    assert_eq!(
        (shared["pid"].as_u64(), shared["restarts"].as_u64()),
        (Some(u64::from(shared_pid)), Some(0))
    );
}

/// `shared_pool` in the config puts the kernel's limits on the shared workers' group.
#[test]
fn the_shared_pool_gets_the_configs_limits() {
    require_root!();
    let extra = format!(
        "isolation: shared\nshared_pool: {{memory: 2GiB, cpu: 1.5, pids: 512}}\nmodels:\n  - name: tiny\n    path: {}\n    kv_blocks: 64\n",
        fixture_model().display()
    );
    let daemon = Daemon::start_with(DaemonOptions {
        extra_config: &extra,
        ..Default::default()
    });
    let worker = *workers(&daemon).first().expect("a worker");
    let instance = instance_of(worker);
    let read = |controller: &str, v1: &str, v2: &str| {
        std::fs::read_to_string(group_file(&instance, "_shared", controller, v1, v2))
            .unwrap()
            .trim()
            .to_owned()
    };
    assert_eq!(
        read("memory", "memory.limit_in_bytes", "memory.max"),
        (2u64 << 30).to_string()
    );
    assert_eq!(read("pids", "pids.max", "pids.max"), "512");
    let quota = read("cpu", "cpu.cfs_quota_us", "cpu.max");
    assert!(quota == "150000" || quota == "150000 100000", "{quota}");
    // And it serves.
    let (prompt, want) = reference();
    let got = greedy(&daemon, &prompt, want.len());
    assert_eq!(got["usage"]["completion_tokens"], want.len());
}

#[test]
fn a_model_loaded_at_run_time_gets_a_worker_and_unloading_it_leaves_nothing_of_it() {
    require_root!();
    let daemon = daemon("shared");
    let tiny = workers(&daemon);
    assert_eq!(tiny.len(), 1);
    let instance = instance_of(tiny[0]);
    let (prompt, expected) = reference();

    daemon.load_model("second", &fixture_model(), 64);
    let both = workers(&daemon);
    assert_eq!(both.len(), 2, "{both:?}");
    let second = *both.iter().find(|p| !tiny.contains(p)).unwrap();
    assert_eq!(instance_of(second), instance);
    // It computes at the same priority as the worker started with the daemon.
    let nice = |pid: u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<String> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        fields[16].clone() // the 19th field of the line: the niceness
    };
    assert_eq!(nice(second), nice(tiny[0]));
    let gate = PathBuf::from(format!("/sys/fs/bpf/accel/{instance}/_shared/second-cpu"));
    assert!(gate.join("link").exists());
    // The loaded model's worker serves the reference tokens.
    let body = json!({"model": "second", "prompt": prompt, "max_tokens": expected.len(), "temperature": 0, "ignore_eos": true});
    let (status, text) =
        daemon.request("POST", "/v1/completions", Some(body.to_string().as_bytes()));
    assert_eq!(status, 200, "{text}");
    let got: Value = serde_json::from_str(&text).unwrap();
    let tokenizer = accel_runtime::model::load(&fixture_model())
        .unwrap()
        .tokenizer;
    assert_eq!(
        got["choices"][0]["text"],
        tokenizer.decode(&expected, true).unwrap()
    );

    let series = "worker=\"_shared/second-cpu\"";
    assert!(daemon.request("GET", "/metrics", None).1.contains(series));

    // Unloaded: its worker is gone, with its group in every hierarchy and its pinned gate;
    // the other model's worker serves on, the same process.
    let out = daemon.ctl(&["models", "unload", "second"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!Path::new(&format!("/proc/{second}")).exists());
    assert_eq!(workers(&daemon), tiny);
    assert!(!gate.exists(), "{} is left", gate.display());
    let groups: Vec<PathBuf> = leftovers(&instance)
        .into_iter()
        .map(|dir| dir.join("_shared/second-cpu"))
        .filter(|dir| dir.exists())
        .collect();
    assert!(groups.is_empty(), "left behind: {groups:?}");
    let answer = greedy(&daemon, &prompt, expected.len());
    assert_eq!(
        answer["choices"][0]["text"],
        tokenizer.decode(&expected, true).unwrap()
    );
    let listed = accel_tests::json_of(&daemon.ctl(&["--json", "workers"]));
    assert_eq!(listed["workers"].as_array().unwrap().len(), 1, "{listed}");
    let metrics = daemon.request("GET", "/metrics", None).1;
    assert!(!metrics.contains(series), "its worker's series are gone");
}

/// A tenant made dedicated by a policy reload: the reload says which served model takes the
/// change when it is loaded again, and once it is (no daemon restart), the tenant has a
/// worker of its own serving it; made shared again, the next load has none for it.
#[test]
fn a_tenant_made_dedicated_by_a_reload_gets_its_worker_when_the_model_is_loaded_again() {
    require_root!();
    let shared_policy =
        "tenants:\n  - name: alpha\n    match: {default: true}\n  - name: beta\n    match: {uids: [61002]}\n";
    let dedicated_policy = shared_policy.replace(
        "  - name: alpha\n",
        "  - name: alpha\n    isolation: dedicated\n    limits: {memory: 1GiB}\n",
    );
    let extra = format!(
        "isolation: shared\nmodels:\n  - name: tiny\n    path: {}\n    kv_blocks: 64\n",
        fixture_model().display()
    );
    let daemon = Daemon::start_with(DaemonOptions {
        policy: Some(shared_policy),
        extra_config: &extra,
        ..Default::default()
    });
    let groups = || -> Vec<String> {
        let listed = accel_tests::json_of(&daemon.ctl(&["workers", "--json"]));
        listed["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["worker"].as_str().unwrap().to_owned())
            .collect()
    };
    let reload = |policy: &str| -> String {
        std::fs::write(&daemon.policy, policy).unwrap();
        let out = daemon.ctl(&["policy", "reload"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let reload_model = || {
        let out = daemon.ctl(&["models", "unload", "tiny"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        daemon.load_model("tiny", &fixture_model(), 64);
    };
    assert_eq!(groups(), ["_shared/tiny-cpu"]);
    let (prompt, want) = reference();
    let before = greedy(&daemon, &prompt, want.len());

    let said = reload(&dedicated_policy);
    assert!(
        said.contains(
            "pending: model \"tiny\": [\"alpha\"] get workers of their own once it is loaded again"
        ),
        "{said}"
    );
    assert_eq!(
        groups(),
        ["_shared/tiny-cpu"],
        "a served model keeps its workers"
    );
    reload_model();
    assert_eq!(groups(), ["_shared/tiny-cpu", "alpha/tiny-cpu"]);
    // Alpha (the default tenant) is served by its own worker, with the same answer.
    let after = greedy(&daemon, &prompt, want.len());
    assert_eq!(after["choices"][0]["text"], before["choices"][0]["text"]);
    let shown =
        String::from_utf8_lossy(&daemon.ctl(&["tenants", "show", "alpha"]).stdout).into_owned();
    assert!(shown.contains("worker alpha/tiny-cpu"), "{shown}");

    let said = reload(shared_policy);
    assert!(
        said.contains("[\"alpha\"] move to the shared workers once it is loaded again"),
        "{said}"
    );
    reload_model();
    assert_eq!(groups(), ["_shared/tiny-cpu"]);
    // Nothing changed: nothing pending.
    assert!(!reload(shared_policy).contains("pending"));
}

/// A worker's engine says what its prefix cache holds of a prompt, and what its sequences
/// share through it, in the supervisor's ids: the scheduler orders a tenant's requests and
/// counts shared blocks once for engines in workers too. Once the lender is gone nothing is
/// shared. (The worker runs as this user when not root.)
#[test]
fn a_workers_engine_reports_what_its_cache_holds_and_shares() {
    use accel_runtime::engine::ops::EngineOps as _;
    use accel_runtime::engine::{LogitsWanted, StepInput};
    use accel_runtime::worker::{RemoteEngine, WorkerIdentity, WorkerInit};
    let path = fixture_model();
    let (loaded, opened) =
        accel_runtime::model::files::record(|| accel_runtime::model::load(&path));
    loaded.unwrap();
    let init = WorkerInit {
        model: "tiny".into(),
        path: Some(path.clone()),
        spec: accel_runtime::config::ModelSpec {
            kv_blocks: 64,
            ..accel_runtime::config::ModelSpec::default_model()
        },
        device: "cpu".into(),
        kernel_cache: None,
        files: opened.files.clone(),
        dirs: opened.dirs.clone(),
        disk_dir: None,
    };
    let identity = WorkerIdentity {
        program: accel_tests::bin("acceld"),
        ..WorkerIdentity::resolve(None).unwrap()
    };
    let (mut engine, _) = RemoteEngine::start(
        init,
        opened.handles.clone(),
        identity,
        None,
        "_shared",
        None,
    )
    .unwrap();
    let first: Vec<u32> = (0..40u32).map(|t| (t * 7) % 300 + 3).collect();
    let mut second = first[..36].to_vec();
    second.extend([5, 6, 7]);
    let (a, held) = engine.add_sequence_cached("t", &first).unwrap();
    assert_eq!(held, 0);
    engine
        .step(&[StepInput {
            seq: a,
            tokens: &first,
            logits: LogitsWanted::Last,
        }])
        .unwrap();
    assert!(engine.sharing().is_empty(), "one sequence shares nothing");
    // What the cache holds of a prompt, asked without holding it: a's two full blocks for
    // its tenant, nothing for another.
    assert_eq!(engine.resident_prefix("t", &second), 32);
    assert_eq!(engine.resident_prefix("other", &second), 0);
    let (b, held) = engine.add_sequence_cached("t", &second).unwrap();
    assert_eq!(held, 32, "two full blocks of a's");
    let mut sharing = engine.sharing();
    sharing.sort();
    assert_eq!(sharing, [(a, 0, 2), (b, 2, 2)]);
    engine.remove_sequence(a);
    let (c, _) = engine.add_sequence_cached("other", &second).unwrap();
    assert!(
        engine.sharing().is_empty(),
        "b holds its blocks alone; c is another scope"
    );
    engine.remove_sequence(b);
    engine.remove_sequence(c);
}
