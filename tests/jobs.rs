//! Batch jobs end to end: a JSONL file submitted over the socket is answered line by line
//! (each answer equal to the same request made directly), malformed lines fail alone, tenants
//! see only their own jobs, limits answer 413/400/429, a cancel stops the job; and a daemon
//! SIGKILLed three times during one job, once with its journal torn, still answers every line
//! exactly once with the outputs of a run without crashes.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use accel_tests::{eventually, http_exchange, Daemon, DaemonOptions};
use serde_json::{json, Value};

const POLICY: &str = r#"
tenants:
  - name: alpha
    match: {uids: [2001]}
  - name: beta
    match: {uids: [2002]}
    limits: {max_jobs: 1}
"#;

fn options<'a>(extra: &'a str, state_dir: Option<&'a Path>) -> DaemonOptions<'a> {
    DaemonOptions {
        policy: Some(POLICY),
        extra_config: extra,
        state_dir,
        ..Default::default()
    }
}

fn model_config(more: &str) -> String {
    format!(
        "models:\n  - name: tiny\n    path: {}\n    kv_blocks: 128\n{more}",
        accel_tests::fixture_model().display()
    )
}

/// A request over the socket as an operator acting for `tenant`.
fn as_tenant(
    daemon: &Daemon,
    tenant: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> (u16, String) {
    let stream = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    http_exchange(stream, method, path, body, &[("X-Accel-Tenant", tenant)]).unwrap()
}

fn job_view(daemon: &Daemon, tenant: &str, id: &str) -> Value {
    let (status, body) = as_tenant(daemon, tenant, "GET", &format!("/v1/jobs/{id}"), None);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn wait_finished(daemon: &Daemon, tenant: &str, id: &str, timeout: Duration) -> Value {
    let mut last = Value::Null;
    let finished = eventually(timeout, || {
        last = job_view(daemon, tenant, id);
        ["completed", "cancelled", "failed"].contains(&last["status"].as_str().unwrap())
    });
    assert!(finished, "job not finished: {last}\n{}", daemon.log_text());
    last
}

fn lines_of(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn completion_line(id: &str, prompt: &str, max_tokens: usize) -> Value {
    json!({
        "custom_id": id, "method": "POST", "url": "/v1/completions",
        "body": {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
    })
}

/// A line that takes its whole `max_tokens` (the tiny model would often stop early).
fn long_line(id: &str, prompt: &str, max_tokens: usize) -> Value {
    let mut line = completion_line(id, prompt, max_tokens);
    line["body"]["ignore_eos"] = json!(true);
    line
}

fn jsonl(lines: &[Value]) -> Vec<u8> {
    lines
        .iter()
        .map(|l| l.to_string() + "\n")
        .collect::<String>()
        .into_bytes()
}

fn submit(daemon: &Daemon, tenant: &str, body: &[u8]) -> Value {
    let (status, answer) = as_tenant(daemon, tenant, "POST", "/v1/jobs", Some(body));
    assert_eq!(status, 201, "{answer}");
    serde_json::from_str(&answer).unwrap()
}

/// Each output line by its custom_id, checking none is there twice.
fn by_custom_id(lines: &[Value]) -> HashMap<String, Value> {
    let mut map = HashMap::new();
    for line in lines {
        let id = line["custom_id"].as_str().unwrap().to_owned();
        assert!(
            map.insert(id.clone(), line.clone()).is_none(),
            "{id} answered twice"
        );
    }
    map
}

#[test]
fn a_job_answers_each_line_as_the_api_would_and_only_its_tenant_sees_it() {
    let daemon = Daemon::start_with(options(&model_config(""), None));
    let mut lines: Vec<Value> = (0..8)
        .map(|i| completion_line(&format!("req-{i}"), &format!("Line number {i} says"), 12))
        .collect();
    lines.push(json!({
        "custom_id": "chat-0", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0},
    }));
    let mut body = jsonl(&lines);
    // A line that is not JSON, one for a model that does not exist, one that asks to stream.
    body.extend_from_slice(b"this is not json\n");
    body.extend_from_slice(
        (completion_line("missing-model", "x", 4)
            .to_string()
            .replace("\"tiny\"", "\"nope\"")
            + "\n")
            .as_bytes(),
    );
    let mut streaming = completion_line("streamed", "x", 4);
    streaming["body"]["stream"] = json!(true);
    body.extend_from_slice((streaming.to_string() + "\n").as_bytes());

    let job = submit(&daemon, "alpha", &body);
    let id = job["id"].as_str().unwrap().to_owned();
    assert_eq!(job["status"], "in_progress");
    assert_eq!(job["request_counts"]["total"], 12);
    let done = wait_finished(&daemon, "alpha", &id, Duration::from_secs(60));
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["request_counts"]["completed"], 9, "{done}");
    assert_eq!(done["request_counts"]["failed"], 3, "{done}");

    // Every good line answered once, equal to the same request sent directly.
    let (status, output) = as_tenant(
        &daemon,
        "alpha",
        "GET",
        &format!("/v1/jobs/{id}/output"),
        None,
    );
    assert_eq!(status, 200);
    let answers = by_custom_id(&lines_of(&output));
    assert_eq!(answers.len(), 9);
    for line in &lines {
        let custom_id = line["custom_id"].as_str().unwrap();
        let answer = &answers[custom_id];
        assert_eq!(answer["response"]["status_code"], 200, "{answer}");
        let url = line["url"].as_str().unwrap();
        let (status, direct) = as_tenant(
            &daemon,
            "alpha",
            "POST",
            url,
            Some(line["body"].to_string().as_bytes()),
        );
        assert_eq!(status, 200, "{direct}");
        let direct: Value = serde_json::from_str(&direct).unwrap();
        assert_eq!(
            answer["response"]["body"]["choices"], direct["choices"],
            "{custom_id}: the job's answer differs from the API's"
        );
        // The same counts; how much of the prompt the prefix cache held depends on what ran
        // before each (the direct request finds the job's blocks).
        for count in ["prompt_tokens", "completion_tokens", "total_tokens"] {
            assert_eq!(
                answer["response"]["body"]["usage"][count],
                direct["usage"][count]
            );
        }
    }
    // The three bad lines, each failed alone and saying why.
    let (_, errors) = as_tenant(
        &daemon,
        "alpha",
        "GET",
        &format!("/v1/jobs/{id}/errors"),
        None,
    );
    let errors = lines_of(&errors);
    assert_eq!(errors.len(), 3, "{errors:?}");
    let malformed = errors.iter().find(|e| e["custom_id"].is_null()).unwrap();
    assert_eq!(malformed["error"]["code"], "invalid_line");
    assert!(
        malformed["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("line 10:"),
        "{malformed}"
    );
    let missing = errors
        .iter()
        .find(|e| e["custom_id"] == "missing-model")
        .unwrap();
    assert_eq!(missing["response"]["status_code"], 404, "{missing}");
    assert_eq!(
        missing["response"]["body"]["error"]["code"],
        "model_not_found"
    );
    let streamed = errors
        .iter()
        .find(|e| e["custom_id"] == "streamed")
        .unwrap();
    assert!(
        streamed["error"]["message"]
            .as_str()
            .unwrap()
            .contains("stream"),
        "{streamed}"
    );

    // Another tenant: the same 404 as for a job that does not exist, and an empty list.
    let (status, body) = as_tenant(&daemon, "beta", "GET", &format!("/v1/jobs/{id}"), None);
    assert_eq!(status, 404, "{body}");
    let (status, unknown) = as_tenant(
        &daemon,
        "beta",
        "GET",
        "/v1/jobs/job_000000000000000000000000",
        None,
    );
    assert_eq!(status, 404);
    let message = |b: &str| serde_json::from_str::<Value>(b).unwrap()["error"]["code"].clone();
    assert_eq!(message(&body), message(&unknown));
    for path in ["output", "errors", "cancel"] {
        let method = if path == "cancel" { "POST" } else { "GET" };
        let (status, _) = as_tenant(
            &daemon,
            "beta",
            method,
            &format!("/v1/jobs/{id}/{path}"),
            None,
        );
        assert_eq!(status, 404, "{path}");
    }
    let (_, list) = as_tenant(&daemon, "beta", "GET", "/v1/jobs", None);
    assert_eq!(
        serde_json::from_str::<Value>(&list).unwrap()["data"],
        json!([])
    );
    // Operators see it; accelctl shows it and prints the same output.
    let listed = accel_tests::json_of(&daemon.ctl(&["--json", "jobs", "list"]));
    assert_eq!(listed["data"][0]["id"], id.as_str());
    let printed = daemon.ctl(&["jobs", "output", &id]);
    assert!(printed.status.success());
    assert_eq!(String::from_utf8(printed.stdout).unwrap(), output);
    // Cancelling a completed job is a conflict, not a silent success.
    let (status, _) = as_tenant(
        &daemon,
        "alpha",
        "POST",
        &format!("/v1/jobs/{id}/cancel"),
        None,
    );
    assert_eq!(status, 409);
    if accel_tests::is_root() {
        // beta's own uid, through accelctl: not found (exit 6).
        let out = daemon.ctl_as(2002, 2002, &["jobs", "show", &id]);
        assert_eq!(
            out.status.code(),
            Some(6),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = daemon.ctl_as(2001, 2001, &["--json", "jobs", "show", &id]);
        assert_eq!(accel_tests::json_of(&out)["status"], "completed");
    }
}

#[test]
fn job_limits_answer_413_400_and_429_and_a_cancel_stops_the_job() {
    let extra = model_config("jobs:\n  max_file_size: 8KiB\n  max_lines: 30\n  concurrency: 2\n");
    let daemon = Daemon::start_with(options(&extra, None));
    // Over the size: 413 naming the limit, nothing stored.
    let big = jsonl(
        &(0..100)
            .map(|i| completion_line(&format!("r{i}"), "a long enough prompt here", 4))
            .collect::<Vec<_>>(),
    );
    assert!(big.len() > 8192);
    let (status, body) = as_tenant(&daemon, "alpha", "POST", "/v1/jobs", Some(&big));
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("jobs.max_file_size"), "{body}");
    // Over the line count, duplicate ids, nothing at all: 400s that say which.
    let many = jsonl(
        &(0..31)
            .map(|i| completion_line(&format!("{i}"), "p", 1))
            .collect::<Vec<_>>(),
    );
    let (status, body) = as_tenant(&daemon, "alpha", "POST", "/v1/jobs", Some(&many));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("jobs.max_lines"), "{body}");
    let twice = jsonl(&[
        completion_line("same", "p", 1),
        completion_line("same", "q", 1),
    ]);
    let (status, body) = as_tenant(&daemon, "alpha", "POST", "/v1/jobs", Some(&twice));
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("\\\"same\\\"") && body.contains("lines 1 and 2"),
        "{body}"
    );
    let (status, _) = as_tenant(&daemon, "alpha", "POST", "/v1/jobs", Some(b"\n\n"));
    assert_eq!(status, 400);
    // An operator acting for no tenant is told to name one.
    let (status, body) = daemon.request("POST", "/v1/jobs", Some(&twice));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("--tenant"), "{body}");
    assert!(std::fs::read_dir(daemon.dir.path().join("state/jobs"))
        .unwrap()
        .next()
        .is_none());

    // beta may have one unfinished job: the second is 429 naming limits.max_jobs.
    let long: Vec<Value> = (0..30)
        .map(|i| long_line(&format!("c{i}"), "count", 200))
        .collect();
    let job = submit(&daemon, "beta", &jsonl(&long));
    let (status, body) = as_tenant(
        &daemon,
        "beta",
        "POST",
        "/v1/jobs",
        Some(&jsonl(&long[..1])),
    );
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("limits.max_jobs"), "{body}");
    // Cancel once a line is answered: the job stops with what it has.
    let id = job["id"].as_str().unwrap().to_owned();
    assert!(eventually(Duration::from_secs(60), || {
        job_view(&daemon, "beta", &id)["request_counts"]["completed"]
            .as_u64()
            .unwrap()
            >= 1
    }));
    let out = daemon.ctl(&["--tenant", "beta", "jobs", "cancel", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done = wait_finished(&daemon, "beta", &id, Duration::from_secs(30));
    assert_eq!(done["status"], "cancelled", "{done}");
    let answered = done["request_counts"]["completed"].as_u64().unwrap();
    assert!(answered < 30, "{done}");
    let (_, output) = as_tenant(
        &daemon,
        "beta",
        "GET",
        &format!("/v1/jobs/{id}/output"),
        None,
    );
    assert_eq!(lines_of(&output).len() as u64, answered);
    // Nothing more is answered after the cancel, and beta may submit again.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        job_view(&daemon, "beta", &id)["request_counts"]["completed"].as_u64(),
        Some(answered)
    );
    submit(&daemon, "beta", &jsonl(&long[..1]));
}

#[test]
fn a_job_survives_three_sigkills_and_a_torn_journal_answering_each_line_once() {
    let state = accel_tests::shared_tempdir();
    // One line at a time, so the job lasts long enough to be killed three times.
    let extra = model_config("jobs:\n  concurrency: 1\n");
    let mut daemon = Daemon::start_with(options(&extra, Some(state.path())));
    let lines: Vec<Value> = (0..120)
        .map(|i| long_line(&format!("line-{i:03}"), &format!("Story {i}:"), 200))
        .collect();
    let job = submit(&daemon, "alpha", &jsonl(&lines));
    let id = job["id"].as_str().unwrap().to_owned();
    let journal = state.path().join("jobs").join(&id).join("journal");
    let mut seen = 0;
    for crash in 0..3 {
        // Let some lines be answered since the last start, then kill without warning.
        assert!(
            eventually(Duration::from_secs(60), || {
                job_view(&daemon, "alpha", &id)["request_counts"]["completed"]
                    .as_u64()
                    .unwrap()
                    >= seen + 3
            }),
            "no progress after crash {crash}:\n{}",
            daemon.log_text()
        );
        // Killed mid-job, not after it.
        let before = job_view(&daemon, "alpha", &id);
        assert_eq!(before["status"], "in_progress", "{before}");
        daemon.signal(nix::sys::signal::Signal::SIGKILL);
        daemon.wait_exit(Duration::from_secs(10));
        seen = job_view_offline(&journal);
        if crash == 2 {
            // A power cut mid-write: the journal's last record is cut short.
            let len = std::fs::metadata(&journal).unwrap().len();
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&journal)
                .unwrap();
            file.set_len(len - 5).unwrap();
        }
        daemon.spawn();
        daemon.wait_ready();
        if crash == 2 {
            assert!(
                daemon
                    .log_text()
                    .contains("repaired the job journal's torn tail"),
                "{}",
                daemon.log_text()
            );
        }
    }
    let done = wait_finished(&daemon, "alpha", &id, Duration::from_secs(120));
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["request_counts"]["completed"], 120, "{done}");
    assert_eq!(done["request_counts"]["failed"], 0, "{done}");
    let (_, output) = as_tenant(
        &daemon,
        "alpha",
        "GET",
        &format!("/v1/jobs/{id}/output"),
        None,
    );
    let answers = by_custom_id(&lines_of(&output));
    assert_eq!(answers.len(), 120);
    // The outputs of a run without crashes: each line asked directly, greedy.
    for line in &lines {
        let (status, direct) = as_tenant(
            &daemon,
            "alpha",
            "POST",
            "/v1/completions",
            Some(line["body"].to_string().as_bytes()),
        );
        assert_eq!(status, 200);
        let direct: Value = serde_json::from_str(&direct).unwrap();
        let custom_id = line["custom_id"].as_str().unwrap();
        assert_eq!(
            answers[custom_id]["response"]["body"]["choices"][0]["text"],
            direct["choices"][0]["text"],
            "{custom_id}"
        );
    }
}

/// Answers in a job's journal, counted from its size as a lower bound of progress: the
/// daemon is down, so this reads the output file the journal keeps in step.
fn job_view_offline(journal: &Path) -> u64 {
    let output = journal.with_file_name("output.jsonl");
    std::fs::read_to_string(output)
        .map(|t| t.lines().count() as u64)
        .unwrap_or(0)
        .saturating_sub(1)
}

#[test]
fn a_job_whose_tenant_leaves_the_policy_fails_saying_so() {
    let daemon = Daemon::start_with(options(&model_config("jobs:\n  concurrency: 1\n"), None));
    let long: Vec<Value> = (0..30)
        .map(|i| long_line(&format!("c{i}"), "count", 200))
        .collect();
    let job = submit(&daemon, "beta", &jsonl(&long));
    let id = job["id"].as_str().unwrap().to_owned();
    assert!(eventually(Duration::from_secs(60), || {
        job_view(&daemon, "beta", &id)["request_counts"]["completed"]
            .as_u64()
            .unwrap()
            >= 1
    }));
    // The policy loses beta; the job cannot run as a tenant that is not there.
    let without_beta = POLICY.split("  - name: beta").next().unwrap();
    std::fs::write(&daemon.policy, without_beta).unwrap();
    let (status, text) = daemon.request("POST", "/v1/policy/reload", None);
    assert_eq!(status, 200, "{text}");
    let mut view = Value::Null;
    assert!(
        eventually(Duration::from_secs(30), || {
            let (_, body) = daemon.request("GET", &format!("/v1/jobs/{id}"), None);
            view = serde_json::from_str(&body).unwrap();
            view["status"] == "failed"
        }),
        "{view}"
    );
    assert!(
        view["error"].as_str().unwrap().contains("\"beta\""),
        "{view}"
    );
    assert!(view["failed_at"].as_u64().is_some(), "{view}");
    assert!(
        view["request_counts"]["completed"].as_u64().unwrap() < 30,
        "{view}"
    );
}
