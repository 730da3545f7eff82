//! Operator control of a live node: a drain lets an open stream finish while new requests get
//! 503 with `Retry-After` and an undrain restores service; `accelctl requests` shows a
//! generation in flight with its tokens so far and cancels it; `accelctl tokens` creates a
//! TCP token that the official OpenAI SDK uses (chat, streaming, completions, errors as its
//! exception classes), that survives a restart, and that stops working when revoked.

#![allow(clippy::unwrap_used)]

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::time::Duration;

use accel_tests::{eventually, json_of, Daemon, DaemonOptions};
use serde_json::{json, Value};

const POLICY: &str = r#"
tenants:
  - name: alpha
    match: {uids: [2001]}
  - name: beta
    match: {uids: [2002]}
"#;

fn tiny_config(more: &str) -> String {
    format!(
        "models:\n  - name: tiny\n    path: {}\n    kv_blocks: 64\n{more}",
        accel_tests::fixture_model().display()
    )
}

#[test]
fn a_drain_finishes_open_streams_refuses_new_work_and_an_undrain_restores_it() {
    // The default model: its stream lasts long enough to be open across the drain.
    let Some(daemon) = accel_tests::smollm2_daemon(256, "") else {
        return;
    };
    let body = json!({"model": "smollm2-135m-instruct", "prompt": "Hello", "max_tokens": 60, "temperature": 0, "ignore_eos": true});
    let (status, whole) =
        daemon.request("POST", "/v1/completions", Some(body.to_string().as_bytes()));
    assert_eq!(status, 200, "{whole}");
    let expected: Value = serde_json::from_str(&whole).unwrap();

    let mut streaming = body.clone();
    streaming["stream"] = json!(true);
    let (open, head) = accel_tests::open_stream(&daemon.socket, None, &streaming);
    let drained = json_of(&daemon.ctl(&["--json", "drain"]));
    assert_eq!(drained["state"], "draining");
    assert_eq!(drained["changed"], true);
    assert_eq!(
        drained["inference_in_flight"], 1,
        "the open stream is in flight"
    );

    // New work is refused with a Retry-After; reads still work; /healthz says draining.
    let stream = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    let (status, head_503, refused) = accel_tests::http_exchange_with_head(
        stream,
        "POST",
        "/v1/completions",
        Some(body.to_string().as_bytes()),
        &[],
    )
    .unwrap();
    assert_eq!(status, 503, "{refused}");
    assert!(refused.contains("\"draining\""), "{refused}");
    assert!(
        head_503.to_ascii_lowercase().contains("retry-after: 30"),
        "{head_503}"
    );
    let (status, refused_job) = daemon.request("POST", "/v1/jobs", Some(b"{}\n"));
    assert_eq!(status, 503);
    assert!(refused_job.contains("\"draining\""), "{refused_job}");
    let (status, health) = daemon.request("GET", "/healthz", None);
    assert_eq!(
        (status, health.contains("draining")),
        (503, true),
        "{health}"
    );
    let (status, _) = daemon.request("GET", "/v1/models", None);
    assert_eq!(status, 200);

    // The open stream finishes whole, with the same text as before the drain.
    let events = accel_tests::finish_stream(open, head);
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    assert_eq!(
        accel_tests::streamed_text(&events),
        expected["choices"][0]["text"].as_str().unwrap()
    );
    let status = json_of(&daemon.ctl(&["--json", "status"]));
    assert_eq!(status["state"], "draining");
    assert!(eventually(Duration::from_secs(5), || {
        json_of(&daemon.ctl(&["--json", "status"]))["api"]["inference_in_flight"] == 0
    }));

    // Only operators drain; undrain restores service.
    if accel_tests::is_root() {
        let out = daemon.ctl_as(2001, 2001, &["undrain"]);
        assert_eq!(
            out.status.code(),
            Some(4),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let undrained = json_of(&daemon.ctl(&["--json", "undrain"]));
    assert_eq!(undrained["state"], "serving");
    let (status, again) =
        daemon.request("POST", "/v1/completions", Some(body.to_string().as_bytes()));
    assert_eq!(status, 200, "{again}");
    let (status, _) = daemon.request("GET", "/healthz", None);
    assert_eq!(status, 200);
}

#[test]
fn requests_in_flight_are_listed_with_their_tokens_and_cancelled() {
    let Some(daemon) = accel_tests::smollm2_daemon(256, "") else {
        return;
    };
    let body = json!({
        "model": "smollm2-135m-instruct", "prompt": "Count to a thousand:",
        "max_tokens": 3000, "ignore_eos": true, "temperature": 0,
    });
    let socket = daemon.socket.clone();
    let whole = std::thread::spawn(move || {
        let stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        accel_tests::http_exchange(
            stream,
            "POST",
            "/v1/completions",
            Some(body.to_string().as_bytes()),
            &[],
        )
        .unwrap()
    });
    let mut listed = Value::Null;
    assert!(
        eventually(Duration::from_secs(30), || {
            listed = json_of(&daemon.ctl(&["--json", "requests"]));
            listed["data"][0]["completion_tokens"].as_u64().unwrap_or(0) >= 5
        }),
        "{listed}"
    );
    let request = &listed["data"][0];
    assert_eq!(request["tenant"], "operator");
    assert_eq!(request["model"], "smollm2-135m-instruct");
    assert_eq!(request["stream"], false);
    let id = request["id"].as_str().unwrap().to_owned();
    // Its tokens go on growing while it runs.
    let first = request["completion_tokens"].as_u64().unwrap();
    assert!(eventually(Duration::from_secs(10), || {
        json_of(&daemon.ctl(&["--json", "requests"]))["data"][0]["completion_tokens"]
            .as_u64()
            .unwrap_or(0)
            > first
    }));
    // Another tenant neither sees it nor can cancel it.
    let theirs = json_of(&daemon.ctl(&["--json", "--tenant", "default", "requests"]));
    assert_eq!(theirs["data"], json!([]), "{theirs}");
    let out = daemon.ctl(&["--tenant", "default", "requests", "cancel", &id]);
    assert_eq!(out.status.code(), Some(6));

    let out = daemon.ctl(&["requests", "cancel", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, answer) = whole.join().unwrap();
    assert_eq!(status, 410, "{answer}");
    assert!(answer.contains("\"cancelled\""), "{answer}");
    // Gone from the list, and its sequence freed on the device.
    assert!(eventually(Duration::from_secs(5), || {
        json_of(&daemon.ctl(&["--json", "requests"]))["data"] == json!([])
    }));
    assert!(eventually(Duration::from_secs(5), || {
        let queue = json_of(&daemon.ctl(&["--json", "queue"]));
        queue["devices"][0]["tenants"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["running"] == 0 && t["kv_blocks"] == 0)
    }));
}

#[test]
fn a_created_token_serves_the_openai_sdk_over_tcp_survives_a_restart_and_is_revoked() {
    let Some(deps) = accel_tests::python_deps() else {
        return;
    };
    let port = accel_tests::free_port();
    let state = accel_tests::shared_tempdir();
    let extra = tiny_config(&format!("tcp_listen: 127.0.0.1:{port}\n"));
    let mut daemon = Daemon::start_with(DaemonOptions {
        policy: Some(POLICY),
        extra_config: &extra,
        state_dir: Some(state.path()),
        ..Default::default()
    });
    let out = daemon.ctl(&["tokens", "create", "alpha"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(token.starts_with("acc_"), "{token}");
    // Only its hash is kept.
    let file = std::fs::read_to_string(state.path().join("tokens.json")).unwrap();
    assert!(!file.contains(&token));
    assert!(file.contains(&accel_tests::sha256_hex(&token)));
    let listed = json_of(&daemon.ctl(&["--json", "tokens", "list"]));
    assert_eq!(listed["data"][0]["tenant"], "alpha");
    assert!(!listed.to_string().contains(&token));
    // Unknown tenants get no token; tenants make none.
    assert_eq!(
        daemon.ctl(&["tokens", "create", "nobody"]).status.code(),
        Some(6)
    );
    if accel_tests::is_root() {
        let out = daemon.ctl_as(2001, 2001, &["tokens", "create", "alpha"]);
        assert_eq!(out.status.code(), Some(4));
    }

    let base_url = format!("http://127.0.0.1:{port}/v1");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk/tcp.py");
    let run = |mode: &str| {
        std::process::Command::new("python3")
            .arg(&script)
            .args([base_url.as_str(), token.as_str(), "tiny", mode])
            .env("PYTHONPATH", &deps)
            .output()
            .unwrap()
    };
    let out = run("serve");
    assert!(
        out.status.success(),
        "{}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        daemon.log_text()
    );
    // The token is alpha: whoami over TCP says so.
    let whoami = |port: u16| {
        let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let auth = format!("Bearer {token}");
        accel_tests::http_exchange(
            tcp,
            "GET",
            "/v1/whoami",
            None,
            &[("Authorization", auth.as_str())],
        )
        .unwrap()
    };
    let (status, who) = whoami(port);
    assert_eq!(status, 200, "{who}");
    assert_eq!(
        serde_json::from_str::<Value>(&who).unwrap()["tenant"],
        "alpha"
    );

    // A restarted daemon knows it.
    daemon.stop();
    daemon.spawn();
    daemon.wait_ready();
    assert_eq!(whoami(port).0, 200);

    let out = daemon.ctl(&["tokens", "revoke", "alpha"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(whoami(port).0, 401);
    let out = run("revoked");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_load_generator_reports_each_tenant_over_the_socket_and_over_tcp() {
    let port = accel_tests::free_port();
    let extra = tiny_config(&format!("tcp_listen: 127.0.0.1:{port}\n"));
    let daemon = Daemon::start_with(DaemonOptions {
        policy: Some(POLICY),
        extra_config: &extra,
        ..Default::default()
    });
    // Two tenants on the socket, closed loop: every request answered, split evenly, with
    // exactly the drawn output lengths (end-of-sequence is ignored).
    let report = json_of(&daemon.ctl(&[
        "--json",
        "bench",
        "--tenants",
        "alpha,beta",
        "--concurrency",
        "4",
        "--requests",
        "24",
        "--prompt-tokens",
        "8-24",
        "--output-tokens",
        "16",
        "--probe-health",
    ]));
    assert_eq!(report["total"]["requests"], 24, "{report}");
    assert_eq!(report["total"]["errors"], 0, "{report}");
    assert_eq!(report["total"]["output_tokens"], 24 * 16, "{report}");
    let tenants = report["tenants"].as_array().unwrap();
    assert_eq!(tenants.len(), 2);
    for t in tenants {
        assert_eq!(t["requests"], 12, "{t}");
        let ttft = &t["ttft_ms"];
        assert!(
            ttft["p50"].as_f64().unwrap() <= ttft["p99"].as_f64().unwrap(),
            "{t}"
        );
        assert!(t["itl_ms"]["p50"].as_f64().unwrap() > 0.0, "{t}");
        assert!(t["tokens_per_second"].as_f64().unwrap() > 0.0);
    }
    assert!(report["health_ms"]["p99"].as_f64().is_some(), "{report}");
    if nix::unistd::geteuid().is_root() {
        assert_eq!(report["health_probe"], "realtime", "{report}");
    }
    // The daemon counted the same tokens for each tenant.
    let metrics = String::from_utf8(daemon.ctl(&["metrics"]).stdout).unwrap();
    for tenant in ["alpha", "beta"] {
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with("accel_generation_tokens_total")
                    && l.contains(&format!("tenant=\"{tenant}\""))
            })
            .unwrap_or_else(|| panic!("no generated-token counter for {tenant}:\n{metrics}"));
        assert!(line.ends_with(" 192"), "{line}");
    }

    // Over TCP with created tokens, open loop at a rate; the table names both tenants.
    let token = |tenant: &str| {
        let out = daemon.ctl(&["tokens", "create", tenant]);
        assert!(out.status.success());
        format!("{tenant}={}", String::from_utf8(out.stdout).unwrap().trim())
    };
    let (alpha, beta) = (token("alpha"), token("beta"));
    let url = format!("http://127.0.0.1:{port}");
    let out = daemon.ctl(&[
        "bench",
        "--url",
        &url,
        "--token",
        &alpha,
        "--token",
        &beta,
        "--rate",
        "50",
        "--concurrency",
        "8",
        "--requests",
        "20",
        "--output-tokens",
        "4-8",
    ]);
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{table}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(table.contains("rate 50/s"), "{table}");
    for row in ["alpha ", "beta ", "total "] {
        let line = table
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("{table}"));
        assert_eq!(
            line.split_whitespace().nth(2),
            Some("0"),
            "errors in {line}"
        );
    }
    // A bad token is every request's error, and the run fails.
    let out = daemon.ctl(&[
        "bench",
        "--url",
        &url,
        "--token",
        "alpha=acc_wrong",
        "--requests",
        "2",
        "--model",
        "tiny",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Threads of a process, from procfs.
fn threads(pid: i32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap()
}

#[test]
fn a_thousand_idle_streaming_connections_are_held_without_errors_or_new_threads() {
    const STREAMS: usize = 1000;
    // alpha's token bucket (full at first: two or three requests) then admits one request
    // every 20 s or so: its streams wait, open and idle.
    let policy = "tenants:\n  - name: alpha\n    match: {uids: [2001]}\n    limits: {tokens_per_minute: 120}\n";
    let extra = tiny_config(
        "    max_sequences: 4\nmax_connections: 1200\nmax_connections_per_client: 1100\nscheduler:\n  max_queued_per_tenant: 1100\n",
    );
    let daemon = Daemon::start_with(DaemonOptions {
        policy: Some(policy),
        extra_config: &extra,
        ..Default::default()
    });
    let body = json!({"model": "tiny", "prompt": "Hi", "max_tokens": 40, "temperature": 0, "ignore_eos": true, "stream": true});
    // Warm: one request first, so lazily started threads are there before the count.
    let (status, _) = daemon.request("POST", "/v1/completions", Some(body.to_string().as_bytes()));
    assert_eq!(status, 200);
    let before = threads(daemon.pid());
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Accel-Tenant: alpha\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.to_string().len()
    );
    let mut open = Vec::with_capacity(STREAMS);
    for _ in 0..STREAMS {
        let mut s = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        open.push(s);
    }
    // Each stream is answered 200 and starts its event stream; then it idles.
    for (i, s) in open.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(
                s.read(&mut byte).unwrap(),
                1,
                "stream {i} closed: {}",
                String::from_utf8_lossy(&head)
            );
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 200"), "stream {i}: {head}");
        assert!(head.contains("text/event-stream"), "stream {i}: {head}");
    }
    // Held at once, with no thread added for them, and the daemon still answers.
    let in_flight = json_of(&daemon.ctl(&["--json", "status"]))["api"]["inference_in_flight"]
        .as_u64()
        .unwrap();
    // (At most a couple of plans' admissions, 4 each, finished before the bucket ran dry.)
    assert!(in_flight >= STREAMS as u64 - 12, "{in_flight} in flight");
    let during = threads(daemon.pid());
    assert!(
        during <= before + 2,
        "threads grew from {before} to {during}"
    );
    let (status, health) = daemon.request("GET", "/healthz", None);
    assert_eq!(status, 200, "{health}");
    // Clients that leave free everything they held.
    drop(open);
    assert!(eventually(Duration::from_secs(20), || {
        json_of(&daemon.ctl(&["--json", "status"]))["api"]["inference_in_flight"] == 0
    }));
    let (status, _) = daemon.request("POST", "/v1/completions", Some(body.to_string().as_bytes()));
    assert_eq!(status, 200);
    assert!(threads(daemon.pid()) <= before + 2);
}
