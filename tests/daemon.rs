//! The real acceld over its real socket: caller mapping by uid (switching uids in child
//! processes), policy reload, lifecycle (lock, stale socket, SIGTERM), bad HTTP input,
//! the TCP listener, and promtool on the live metrics.

// Tests unwrap freely: a failure is a test failure, not an operator's input.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use accel_tests::{
    eventually, free_port, http_exchange, json_of, require_root, sha256_hex, Daemon, DaemonOptions,
};
use nix::sys::signal::Signal;

const TEAMS: &str = "\
operators:
  uids: [61500]
tenants:
  - name: alpha
    match:
      uids: [61001]
    limits:
      max_concurrent_requests: 2
  - name: beta
    match:
      gids: [62002]
    weight: 3
    class: batch
";

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn callers_are_mapped_by_uid_and_gid_or_refused() {
    require_root!();
    let daemon = Daemon::start(Some(TEAMS));

    let root = json_of(&daemon.ctl(&["whoami", "--json"]));
    assert_eq!(root["role"], "operator");
    assert_eq!(root["uid"], 0);

    let alpha = json_of(&daemon.ctl_as(61001, 61001, &["whoami", "--json"]));
    assert_eq!(alpha["role"], "tenant");
    assert_eq!(alpha["tenant"], "alpha");
    assert_eq!(alpha["uid"], 61001);
    assert_eq!(alpha["matched_by"], "uid 61001");

    let beta = json_of(&daemon.ctl_as(61002, 62002, &["whoami", "--json"]));
    assert_eq!(beta["tenant"], "beta");
    assert_eq!(beta["matched_by"], "gid 62002");

    let op = json_of(&daemon.ctl_as(61500, 61500, &["whoami", "--json"]));
    assert_eq!(op["role"], "operator");

    // No default tenant in this policy: an unknown uid is refused and told its uid.
    let stranger = daemon.ctl_as(61009, 61009, &["whoami"]);
    assert_eq!(stranger.status.code(), Some(4), "{}", stderr(&stranger));
    assert!(
        stderr(&stranger).contains("uid 61009"),
        "{}",
        stderr(&stranger)
    );

    // A tenant sees only itself; another tenant's name is "not found", not "forbidden".
    let list = json_of(&daemon.ctl_as(61001, 61001, &["tenants", "list", "--json"]));
    let names: Vec<&str> = list["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha"]);
    let peek = daemon.ctl_as(61001, 61001, &["tenants", "show", "beta"]);
    assert_eq!(peek.status.code(), Some(6), "{}", stderr(&peek));
    let all = json_of(&daemon.ctl(&["tenants", "list", "--json"]));
    assert_eq!(all["tenants"].as_array().unwrap().len(), 2);

    // Tenants may not reload the policy, read /metrics on the socket, or act for others.
    let reload = daemon.ctl_as(61001, 61001, &["policy", "reload"]);
    assert_eq!(reload.status.code(), Some(4), "{}", stderr(&reload));
    assert!(stderr(&reload).contains("operators"), "{}", stderr(&reload));
    let metrics = daemon.ctl_as(61001, 61001, &["metrics"]);
    assert_eq!(metrics.status.code(), Some(4), "{}", stderr(&metrics));
    let sneak = daemon.ctl_as(61001, 61001, &["--tenant", "beta", "whoami"]);
    assert_eq!(sneak.status.code(), Some(4), "{}", stderr(&sneak));

    // An operator may act for a tenant, and then sees what the tenant sees; it is logged.
    let acting = json_of(&daemon.ctl(&["--tenant", "beta", "whoami", "--json"]));
    assert_eq!(acting["role"], "operator");
    assert_eq!(acting["tenant"], "beta");
    assert_eq!(acting["acting_for_tenant"], true);
    let as_beta = json_of(&daemon.ctl(&["--tenant", "beta", "tenants", "list", "--json"]));
    assert_eq!(as_beta["tenants"].as_array().unwrap().len(), 1);
    assert!(
        daemon.log_text().contains("operator acting for tenant"),
        "{}",
        daemon.log_text()
    );
    let unknown = daemon.ctl(&["--tenant", "gamma", "whoami"]);
    assert_eq!(unknown.status.code(), Some(6), "{}", stderr(&unknown));
}

#[test]
fn supplementary_groups_from_the_socket_decide_operator_and_tenant() {
    require_root!();
    let policy = "\
operators:
  gids: [64000]
tenants:
  - name: primary
    match:
      gids: [64200]
  - name: extra
    match:
      gids: [64100]
";
    let daemon = Daemon::start(Some(policy));
    let by_group =
        json_of(&daemon.ctl_with_groups(61020, 61020, &[5, 64100], &["whoami", "--json"]));
    assert_eq!(by_group["tenant"], "extra");
    assert_eq!(by_group["matched_by"], "gid 64100");
    let operator = json_of(&daemon.ctl_with_groups(61021, 61021, &[64000], &["whoami", "--json"]));
    assert_eq!(operator["role"], "operator");
    assert_eq!(operator["matched_by"], "operator gid 64000");
    // The primary group is considered before the supplementary ones.
    let primary_first =
        json_of(&daemon.ctl_with_groups(61022, 64200, &[64100], &["whoami", "--json"]));
    assert_eq!(primary_first["tenant"], "primary");
    // Without the group, the same uid is nobody to this policy.
    let without = daemon.ctl_with_groups(61020, 61020, &[], &["whoami"]);
    assert_eq!(without.status.code(), Some(4), "{}", stderr(&without));
}

#[test]
fn embedded_default_policy_serves_any_local_user_as_default_tenant() {
    require_root!();
    let daemon = Daemon::start(None);
    let someone = json_of(&daemon.ctl_as(63333, 63333, &["whoami", "--json"]));
    assert_eq!(someone["tenant"], "default");
    assert_eq!(someone["matched_by"], "default tenant");
    let status = json_of(&daemon.ctl(&["status", "--json"]));
    assert_eq!(status["state"], "serving");
    assert_eq!(status["policy"]["sources"][0], "<embedded default policy>");
}

#[test]
fn invalid_policy_is_rejected_on_reload_and_valid_change_applies_without_restart() {
    let daemon = Daemon::start(Some(TEAMS));
    let pid = daemon.pid();

    // Duplicate tenant and an unparsable size: rejected over the API with every problem.
    std::fs::write(&daemon.policy, format!("{TEAMS}  - name: alpha\n")).unwrap();
    let reload = daemon.ctl(&["policy", "reload"]);
    assert_eq!(reload.status.code(), Some(5), "{}", stderr(&reload));
    let err = stderr(&reload);
    assert!(
        err.contains("duplicate tenant \"alpha\"") && err.contains("policy.yaml:14"),
        "{err}"
    );
    assert!(err.contains("unchanged"), "{err}");

    // The old policy still answers.
    let list = json_of(&daemon.ctl(&["tenants", "list", "--json"]));
    assert_eq!(list["tenants"].as_array().unwrap().len(), 2);
    let status = json_of(&daemon.ctl(&["status", "--json"]));
    assert_eq!(status["policy"]["generation"], 1);

    // Rejected on SIGHUP too, and the old policy stays.
    std::fs::write(
        &daemon.policy,
        format!("{TEAMS}    limits: {{memory: 10XB}}\n"),
    )
    .unwrap();
    daemon.signal(Signal::SIGHUP);
    assert!(
        eventually(Duration::from_secs(10), || daemon
            .log_text()
            .contains("10XB")),
        "{}",
        daemon.log_text()
    );
    let status = json_of(&daemon.ctl(&["status", "--json"]));
    assert_eq!(status["policy"]["generation"], 1);

    // A valid change takes effect on SIGHUP without a restart.
    std::fs::write(
        &daemon.policy,
        format!("{TEAMS}  - name: gamma\n    match: {{uids: [61003]}}\n"),
    )
    .unwrap();
    daemon.signal(Signal::SIGHUP);
    assert!(
        eventually(Duration::from_secs(10), || {
            let list = json_of(&daemon.ctl(&["tenants", "list", "--json"]));
            list["tenants"].as_array().is_some_and(|t| t.len() == 3)
        }),
        "{}",
        daemon.log_text()
    );
    // ... and through the API: dry run first (nothing changes), then for real.
    std::fs::write(&daemon.policy, TEAMS).unwrap();
    let dry = json_of(&daemon.ctl(&["policy", "reload", "--dry-run", "--json"]));
    assert_eq!(dry["applied"], false);
    assert_eq!(
        json_of(&daemon.ctl(&["tenants", "list", "--json"]))["tenants"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let applied = json_of(&daemon.ctl(&["policy", "reload", "--json"]));
    assert_eq!(applied["applied"], true);
    assert_eq!(applied["generation"], 3);
    assert_eq!(
        json_of(&daemon.ctl(&["tenants", "list", "--json"]))["tenants"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(daemon.pid(), pid);

    let (_, metrics) = daemon.request("GET", "/metrics", None);
    assert!(
        metrics.contains("accel_policy_reloads_total{result=\"failure\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("accel_policy_reloads_total{result=\"success\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("accel_tenants_configured 2"), "{metrics}");
}

#[test]
fn second_daemon_on_the_same_state_dir_refuses_to_start() {
    let first = Daemon::start(None);
    let state = first.dir.path().join("state");
    let mut second = Daemon::prepare(DaemonOptions {
        state_dir: Some(&state),
        ..Default::default()
    });
    second.spawn();
    let code = second.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(69), "{}", second.log_text());
    let log = second.log_text();
    assert!(
        log.contains(&format!("another acceld (pid {})", first.pid())),
        "{log}"
    );
    assert!(
        !second.socket.exists(),
        "the refused daemon must not create its socket"
    );
    // The first one is unaffected.
    assert_eq!(first.request("GET", "/healthz", None).0, 200);
}

#[test]
fn a_live_daemons_socket_is_never_taken_over() {
    let first = Daemon::start(None);
    // Another state dir (so the lock does not stop it) but the same socket path.
    let extra = format!("socket: {}\n", first.socket.display());
    let mut second = Daemon::prepare(DaemonOptions {
        extra_config: &extra,
        ..Default::default()
    });
    // `socket` appears twice now; keep only the override.
    let config = std::fs::read_to_string(&second.config).unwrap();
    let own = config.lines().next().unwrap().to_owned();
    std::fs::write(&second.config, config.replacen(&format!("{own}\n"), "", 1)).unwrap();
    second.spawn();
    let code = second.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(69), "{}", second.log_text());
    assert!(
        second.log_text().contains("in use by a live daemon"),
        "{}",
        second.log_text()
    );
    assert_eq!(first.request("GET", "/healthz", None).0, 200);
}

/// Every connection is served from one thread at real-time priority (root may use it), so a
/// probe is answered while compute fills the cores; every other thread of the daemon stays at
/// ordinary priority, so what requests compute never runs above the host's own work.
#[test]
fn connections_are_served_from_a_real_time_front_thread() {
    require_root!();
    let daemon = Daemon::start_with(DaemonOptions::default());
    assert_eq!(daemon.request("GET", "/healthz", None).0, 200);
    // A handler's work (here the model list) runs off the front thread and still answers.
    assert_eq!(daemon.request("GET", "/v1/models", None).0, 200);
    let mut policies = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{}/task", daemon.pid())).unwrap() {
        let task = task.unwrap().path();
        let name = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        let Ok(stat) = std::fs::read_to_string(task.join("stat")) else {
            continue; // a thread that ended meanwhile
        };
        // Fields after the name (which may hold spaces); the policy is field 41, the 39th.
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let policy: u32 = after_name.split(' ').nth(38).unwrap().parse().unwrap();
        policies.push((name.trim().to_owned(), policy));
    }
    const SCHED_FIFO: u32 = 1;
    let front: Vec<_> = policies.iter().filter(|(n, _)| n == "api-front").collect();
    assert_eq!(front.len(), 1, "{policies:?}");
    assert_eq!(front[0].1, SCHED_FIFO, "{policies:?}");
    assert!(
        policies
            .iter()
            .all(|(n, p)| n == "api-front" || *p != SCHED_FIFO),
        "{policies:?}"
    );
    assert!(
        daemon.log_text().contains("real-time priority"),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn stale_socket_is_removed_and_sigterm_stops_cleanly() {
    let mut daemon = Daemon::prepare(DaemonOptions::default());
    // A socket file left by a daemon that died: bound, never removed, nobody listening.
    std::fs::create_dir_all(daemon.socket.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&daemon.socket).unwrap());
    assert!(daemon.socket.exists());
    daemon.spawn();
    daemon.wait_ready();
    assert!(
        daemon.log_text().contains("removing stale socket"),
        "{}",
        daemon.log_text()
    );

    assert_eq!(daemon.stop(), Some(0));
    assert!(
        !daemon.socket.exists(),
        "socket must be removed on a clean stop"
    );
    let log = daemon.log_text();
    assert!(
        log.contains("SIGTERM") && log.contains("acceld stopped"),
        "{log}"
    );
}

#[test]
fn sigterm_lets_a_started_request_finish() {
    let mut daemon = Daemon::start(None);
    // Open a connection and send only part of a request: the daemon is now serving it.
    let mut slow = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    std::io::Write::write_all(&mut slow, b"GET /v1/whoami HTTP/1.1\r\nHost: localhost\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    daemon.signal(Signal::SIGTERM);
    assert!(
        eventually(Duration::from_secs(5), || daemon
            .log_text()
            .contains("draining")),
        "{}",
        daemon.log_text()
    );
    // Finish the request: it is still answered during the drain.
    std::io::Write::write_all(&mut slow, b"Connection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut slow, &mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"operator\""), "{answer}");
    assert_eq!(daemon.stop(), Some(0));
}

#[test]
fn bad_http_input_gets_clear_json_errors() {
    let daemon = Daemon::start(None);

    let (status, body) = daemon.request("POST", "/v1/policy/reload", Some(b"{\"dry_run\": tru"));
    assert_eq!(status, 400, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["code"], "invalid_json");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("line 1 column"),
        "{body}"
    );

    let (status, body) = daemon.request("POST", "/v1/policy/reload", Some(b"{\"dry_rnu\": true}"));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("dry_rnu"), "{body}");

    let big = vec![b' '; 2 << 20];
    let (status, body) = daemon.request("POST", "/v1/policy/reload", Some(&big));
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("payload_too_large"), "{body}");

    let (status, body) = daemon.request("GET", "/v1/nothing-here", None);
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains("no such endpoint: /v1/nothing-here"),
        "{body}"
    );

    let (status, body) = daemon.request("DELETE", "/v1/status", None);
    assert_eq!(status, 405, "{body}");
    assert!(body.contains("method_not_allowed"), "{body}");

    // After all that, the daemon still serves.
    assert_eq!(
        daemon.request("GET", "/healthz", None),
        (200, "{\"status\":\"ok\"}".to_owned())
    );
}

#[test]
fn tcp_listener_authenticates_by_bearer_token() {
    let port = free_port();
    // Hashes from coreutils' sha256sum, independent of the daemon's own hashing.
    let policy = format!(
        "operators:\n  tokens_sha256: [\"{}\"]\ntenants:\n  - name: remote\n    match:\n      tokens_sha256: [\"{}\"]\n  - name: other\n",
        sha256_hex("operator-token"),
        sha256_hex("tenant-token")
    );
    let extra = format!("tcp_listen: 127.0.0.1:{port}\n");
    let daemon = Daemon::start_with(DaemonOptions {
        policy: Some(&policy),
        extra_config: &extra,
        ..Default::default()
    });
    let get = |path: &str, headers: &[(&str, &str)]| {
        let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        http_exchange(tcp, "GET", path, None, headers).unwrap()
    };
    let post = |path: &str, headers: &[(&str, &str)]| {
        let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        http_exchange(tcp, "POST", path, None, headers).unwrap()
    };
    let tenant = [("Authorization", "Bearer tenant-token")];
    let operator = [("Authorization", "Bearer operator-token")];

    let (status, body) = get("/v1/whoami", &[]);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("Bearer"), "{body}");
    assert_eq!(
        get("/v1/whoami", &[("Authorization", "Bearer wrong")]).0,
        401
    );

    let (status, body) = get("/v1/whoami", &tenant);
    assert_eq!(status, 200, "{body}");
    let me: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(me["tenant"], "remote");
    assert_eq!(me["uid"], serde_json::Value::Null);
    // A tenant token may not reload the policy or act for another tenant.
    assert_eq!(post("/v1/policy/reload", &tenant).0, 403);
    let sneak = [tenant[0], ("X-Accel-Tenant", "other")];
    assert_eq!(get("/v1/whoami", &sneak).0, 403);

    let (status, body) = get("/v1/whoami", &operator);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"operator\""), "{body}");
    let acting = [operator[0], ("X-Accel-Tenant", "other")];
    let (status, body) = get("/v1/tenants", &acting);
    assert_eq!(status, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list["tenants"].as_array().unwrap().len(), 1);
    assert_eq!(list["tenants"][0]["name"], "other");
    assert_eq!(post("/v1/policy/reload", &operator).0, 200);

    // Health is open on every listener; the Unix socket still works alongside.
    assert_eq!(get("/healthz", &[]).0, 200);
    assert_eq!(daemon.request("GET", "/healthz", None).0, 200);
}

#[test]
fn promtool_accepts_the_live_metrics() {
    let port = free_port();
    let extra = format!("metrics_listen: 127.0.0.1:{port}\n");
    let daemon = Daemon::start_with(DaemonOptions {
        extra_config: &extra,
        ..Default::default()
    });
    // Traffic so that request counters and histograms have samples.
    let _ = daemon.ctl(&["status"]);
    let _ = daemon.request("GET", "/v1/missing", None);
    // An invented method is counted as "other", not as a new label value.
    let _ = daemon.request("BREW", "/v1/status", None);
    let (status, socket_text) = daemon.request("GET", "/metrics", None);
    assert_eq!(status, 200);
    let (status, tcp_text) = http_exchange(
        std::net::TcpStream::connect(("127.0.0.1", port)).unwrap(),
        "GET",
        "/metrics",
        None,
        &[],
    )
    .unwrap();
    assert_eq!(status, 200);
    for text in [&socket_text, &tcp_text] {
        for family in [
            "accel_build_info{",
            "accel_api_requests_total{method=\"GET\",route=\"/v1/status\",status=\"200\"}",
            "accel_api_requests_total{method=\"GET\",route=\"unmatched\",status=\"404\"}",
            "accel_api_requests_total{method=\"other\",route=\"/v1/status\",status=\"405\"}",
            "accel_api_request_duration_seconds_bucket{",
            "accel_policy_reloads_total{result=\"success\"} 0",
            "accel_tenants_configured 1",
            "process_resident_memory_bytes",
        ] {
            assert!(text.contains(family), "missing {family} in:\n{text}");
        }
    }

    let promtool = match which("promtool") {
        Some(path) => path,
        None if std::env::var_os("CI").is_some() => {
            panic!("promtool is missing in CI: the test command installs the `prometheus` package")
        }
        None => {
            eprintln!(
                "skipped the promtool check: promtool not installed (apt-get install prometheus)"
            );
            return;
        }
    };
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), tcp_text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool reported:\n{report}"
    );
}

#[test]
fn accelctl_says_when_the_daemon_is_not_running() {
    let dir = accel_tests::shared_tempdir();
    let out = std::process::Command::new(accel_tests::bin("accelctl"))
        .args([
            "--socket",
            dir.path().join("none.sock").to_str().unwrap(),
            "status",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = stderr(&out);
    assert!(
        err.contains("cannot reach acceld") && err.contains("is it running?"),
        "{err}"
    );
}

#[test]
fn check_config_prints_every_policy_problem() {
    let bad = "tenants:\n  - name: a\n    weight: 0\n  - name: a\n    limits: {cpu: -2}\n";
    let daemon = Daemon::prepare(DaemonOptions {
        policy: Some(bad),
        ..Default::default()
    });
    let out = std::process::Command::new(accel_tests::bin("acceld"))
        .args(["--check-config", "--config"])
        .arg(&daemon.config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = stderr(&out);
    assert!(err.contains("3 problems"), "{err}");
    assert!(
        err.contains("policy.yaml:3:") && err.contains("tenants[0].weight"),
        "{err}"
    );
    assert!(
        err.contains("policy.yaml:4:") && err.contains("duplicate tenant"),
        "{err}"
    );
    assert!(
        err.contains("policy.yaml:5:") && err.contains("tenants[1].limits.cpu"),
        "{err}"
    );

    // And a daemon with that policy refuses to start, with the same message.
    let out = std::process::Command::new(accel_tests::bin("acceld"))
        .arg("--config")
        .arg(&daemon.config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr(&out).contains("duplicate tenant"),
        "{}",
        stderr(&out)
    );
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| std::path::Path::new(dir).join(name))
        .find(|p| p.is_file())
}

#[test]
fn tells_systemd_ready_and_stopping_and_logs_json_when_asked() {
    let notify_dir = accel_tests::shared_tempdir();
    let notify_path = notify_dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let notify_env = notify_path.to_str().unwrap();
    let mut daemon = Daemon::start_with(DaemonOptions {
        extra_config: "log: {format: json}\n",
        env: &[("NOTIFY_SOCKET", notify_env)],
        ..Default::default()
    });

    let next_message = || {
        let mut buffer = [0u8; 4096];
        let n = notify.recv(&mut buffer).unwrap();
        String::from_utf8_lossy(&buffer[..n]).into_owned()
    };
    let ready = next_message();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    // READY=1 comes only once the socket accepts connections.
    assert_eq!(daemon.request("GET", "/healthz", None).0, 200);

    daemon.signal(Signal::SIGHUP);
    let reloading = next_message();
    assert!(reloading.contains("RELOADING=1"), "{reloading:?}");
    let ready_again = next_message();
    assert!(ready_again.contains("READY=1"), "{ready_again:?}");

    assert_eq!(daemon.stop(), Some(0));
    let stopping = next_message();
    assert!(stopping.contains("STOPPING=1"), "{stopping:?}");

    // Every log line is a JSON object with a level and a message.
    let log = daemon.log_text();
    assert!(log.lines().count() >= 3, "{log}");
    for line in log.lines() {
        let entry: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            entry["level"].is_string() && entry["fields"]["message"].is_string(),
            "{line}"
        );
    }
}

/// A connection opened with nothing sent (a client's idle pool) does not hold a stop up: it is
/// closed at once, and the drain reports nothing left behind.
#[test]
fn an_idle_connection_does_not_hold_up_a_stop() {
    let mut daemon = Daemon::start_with(DaemonOptions {
        extra_config: "drain_timeout: 15s\n",
        ..Default::default()
    });
    let idle = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let started = std::time::Instant::now();
    assert_eq!(daemon.stop(), Some(0));
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "stopped after {took:?}");
    assert!(
        !daemon.log_text().contains("drain timeout reached"),
        "{}",
        daemon.log_text()
    );
    drop(idle);
}

#[test]
fn drain_timeout_bounds_how_long_a_stuck_request_delays_shutdown() {
    let mut daemon = Daemon::start_with(DaemonOptions {
        extra_config: "drain_timeout: 1s\n",
        ..Default::default()
    });
    // A client that starts a request and never finishes it.
    let mut stuck = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    std::io::Write::write_all(
        &mut stuck,
        b"GET /v1/status HTTP/1.1\r\nHost: localhost\r\n",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let started = std::time::Instant::now();
    assert_eq!(daemon.stop(), Some(0));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "stopped after {took:?}, before the drain timeout"
    );
    assert!(took < Duration::from_secs(10), "stopped after {took:?}");
    assert!(
        daemon.log_text().contains("drain timeout reached"),
        "{}",
        daemon.log_text()
    );
    drop(stuck);
}
