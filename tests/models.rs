//! Models loaded and unloaded while the daemon runs (`accelctl models load | unload`): a model
//! loaded at run time serves exactly what the same files serve when configured, its load
//! reports the bytes read; unloading it while another model streams leaves that stream
//! untouched, ends its own requests saying why, clears its metrics, and it can be loaded
//! again; bad loads and callers who may not load get clear errors.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use accel_tests::{eventually, json_of, Daemon, DaemonOptions};
use serde_json::{json, Value};

const POLICY: &str = r#"
operators:
  uids: [2009]
tenants:
  - name: alpha
    match: {uids: [2001]}
  - name: beta
    match: {uids: [2002]}
"#;

fn completion(daemon: &Daemon, model: &str, max_tokens: u32) -> (u16, Value) {
    let body = json!({"model": model, "prompt": "Hello there", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true});
    let (status, text) =
        daemon.request("POST", "/v1/completions", Some(body.to_string().as_bytes()));
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn served(daemon: &Daemon) -> Vec<String> {
    let list = json_of(&daemon.ctl(&["--json", "models"]));
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_model_loaded_at_run_time_serves_and_unloads_without_touching_another_models_stream() {
    // The default model streams across the unload; the fixture model is loaded beside it.
    let Some(gguf) = accel_tests::smollm2_gguf() else {
        return;
    };
    let fixture = accel_tests::fixture_model();
    let config = format!(
        "models:\n  - name: smollm2\n    path: {}\n    kv_blocks: 256\n  - name: configured\n    path: {}\n    kv_blocks: 64\n",
        gguf.display(),
        fixture.display()
    );
    let daemon = Daemon::start_with(DaemonOptions {
        policy: Some(POLICY),
        extra_config: &config,
        ..Default::default()
    });
    assert_eq!(served(&daemon), ["smollm2", "configured"]);
    let (status, reference) = completion(&daemon, "configured", 24);
    assert_eq!(status, 200, "{reference}");

    // Loaded at run time, followed to its end: every byte of the model's files was read.
    let load = daemon.load_model("second", &fixture, 64);
    assert_eq!(load["state"], "ready", "{load}");
    assert_eq!(load["backend"], "cpu");
    let weights = std::fs::metadata(fixture.join("model.safetensors"))
        .unwrap()
        .len();
    let total = load["bytes_total"].as_u64().unwrap();
    assert!(total > weights, "{load}: the weights and the JSON files");
    assert_eq!(load["bytes_read"].as_u64(), Some(total), "{load}");
    assert_eq!(served(&daemon), ["smollm2", "configured", "second"]);
    let (status, second) = completion(&daemon, "second", 24);
    assert_eq!(status, 200, "{second}");
    assert_eq!(
        second["choices"][0]["text"], reference["choices"][0]["text"],
        "the same files serve the same text, loaded at start or at run time"
    );
    let (status, one) = daemon.request("GET", "/v1/models/second", None);
    assert_eq!(status, 200, "{one}");
    let metrics = daemon.request("GET", "/metrics", None).1;
    assert!(
        metrics.contains("accel_model_info{backend=\"cpu\",format=\"hf\",model=\"second\"} 1"),
        "{metrics}"
    );

    // A second load of a served name is refused (exit code 5, conflict).
    let again = daemon.ctl(&["models", "load", "second", fixture.to_str().unwrap()]);
    assert_eq!(
        again.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(String::from_utf8_lossy(&again.stderr).contains("already served"));

    // The default model streams for one tenant, the loaded one for another (a tenant's own
    // requests to two models run one model at a time); then the loaded one goes with no
    // grace. Its stream ends with an error saying so; the other stream is whole and equal to
    // the same request made alone.
    let long = json!({"model": "smollm2", "prompt": "Tell me a story", "max_tokens": 160, "temperature": 0, "ignore_eos": true});
    let (status, alone) =
        daemon.request("POST", "/v1/completions", Some(long.to_string().as_bytes()));
    assert_eq!(status, 200, "{alone}");
    let alone: Value = serde_json::from_str(&alone).unwrap();
    let mut streaming = long.clone();
    streaming["stream"] = json!(true);
    let (open, head) = accel_tests::open_stream(&daemon.socket, Some("alpha"), &streaming);
    let doomed = json!({"model": "second", "prompt": "Hi", "max_tokens": 200, "temperature": 0, "ignore_eos": true, "stream": true});
    let (doomed_open, doomed_head) =
        accel_tests::open_stream(&daemon.socket, Some("beta"), &doomed);
    let out = daemon.ctl(&["--json", "models", "unload", "second", "--grace", "0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unloaded = json_of(&out);
    let requests = json_of(&daemon.ctl(&["--json", "requests"]));
    let in_flight: Vec<&str> = requests["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["model"].as_str().unwrap())
        .collect();
    let events = accel_tests::finish_stream(open, head);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(
        accel_tests::streamed_text(&events),
        alone["choices"][0]["text"].as_str().unwrap(),
        "the other model's stream is untouched by the unload"
    );
    assert!(
        in_flight.contains(&"smollm2"),
        "the default model's stream was still running when the unload ended: {requests}"
    );
    let doomed_events = accel_tests::finish_stream(doomed_open, doomed_head);
    let (finished, cancelled) = (
        unloaded["finished"].as_u64(),
        unloaded["cancelled"].as_u64(),
    );
    if doomed_events.iter().any(|e| e.contains("\"error\"")) {
        // Ended by the unload (no grace), with an error event saying so.
        assert_eq!((finished, cancelled), (Some(0), Some(1)), "{unloaded}");
        assert!(
            doomed_events.iter().any(|e| e.contains("unloaded model")),
            "{doomed_events:?}"
        );
    } else {
        // The fixture model is quick: its stream may have ended before the unload began.
        assert_eq!((finished, cancelled), (Some(0), Some(0)), "{unloaded}");
    }

    // Gone: 404 for requests and retrieval, its series gone from the metrics.
    assert_eq!(served(&daemon), ["smollm2", "configured"]);
    let (status, gone) = completion(&daemon, "second", 4);
    assert_eq!(status, 404, "{gone}");
    assert_eq!(daemon.request("GET", "/v1/models/second", None).0, 404);
    // What it holds is gone from the gauges; the counters of what it served stay.
    let metrics = daemon.request("GET", "/metrics", None).1;
    let held: Vec<&str> = metrics
        .lines()
        .filter(|l| l.contains("model=\"second\""))
        .filter(|l| {
            ["accel_model_info", "accel_model_up", "accel_kv_cache_bytes"]
                .iter()
                .any(|gauge| l.starts_with(gauge))
        })
        .collect();
    assert!(held.is_empty(), "{held:?}");
    assert!(metrics.contains("accel_generation_tokens_total{model=\"second\""));
    let out = daemon.ctl(&["models", "unload", "second"]);
    assert_eq!(
        out.status.code(),
        Some(6),
        "unloading what is not served: not found"
    );

    // Loaded again (into the place the unload freed), it serves the same text.
    let out = daemon.ctl(&[
        "models",
        "load",
        "second",
        fixture.to_str().unwrap(),
        "--kv-blocks",
        "64",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("loaded second on cpu"));
    let (status, again) = completion(&daemon, "second", 24);
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["choices"][0]["text"], reference["choices"][0]["text"]);
    let (status, still) = completion(&daemon, "configured", 24);
    assert_eq!(
        (status, &still["choices"][0]["text"]),
        (200, &reference["choices"][0]["text"])
    );

    // A GGUF model loaded at run time, unloaded with a grace period while it streams: the
    // stream finishes whole, and the name cannot be loaded again until the unload answered.
    let load = daemon.load_model("big", &gguf, 256);
    let size = std::fs::metadata(&gguf).unwrap().len();
    assert_eq!(
        (load["bytes_read"].as_u64(), load["bytes_total"].as_u64()),
        (Some(size), Some(size)),
        "{load}"
    );
    let long = json!({"model": "big", "prompt": "Tell me a story", "max_tokens": 400, "temperature": 0, "ignore_eos": true});
    let (status, whole) =
        daemon.request("POST", "/v1/completions", Some(long.to_string().as_bytes()));
    assert_eq!(status, 200, "{whole}");
    let whole: Value = serde_json::from_str(&whole).unwrap();
    let mut streaming = long.clone();
    streaming["stream"] = json!(true);
    let (open, head) = accel_tests::open_stream(&daemon.socket, Some("alpha"), &streaming);
    std::thread::scope(|scope| {
        let unloading =
            scope.spawn(|| daemon.ctl(&["--json", "models", "unload", "big", "--grace", "120"]));
        assert!(eventually(Duration::from_secs(5), || !served(&daemon)
            .contains(&"big".to_owned())));
        let again = daemon.ctl(&["models", "load", "big", gguf.to_str().unwrap()]);
        assert!(
            !unloading.is_finished(),
            "the stream outlasts the unload's start"
        );
        assert_eq!(again.status.code(), Some(5));
        assert!(
            String::from_utf8_lossy(&again.stderr).contains("is being unloaded"),
            "{}",
            String::from_utf8_lossy(&again.stderr)
        );
        let events = accel_tests::finish_stream(open, head);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        assert_eq!(
            accel_tests::streamed_text(&events),
            whole["choices"][0]["text"].as_str().unwrap()
        );
        let out = unloading.join().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let unloaded = json_of(&out);
        assert_eq!(
            (
                unloaded["finished"].as_u64(),
                unloaded["cancelled"].as_u64()
            ),
            (Some(1), Some(0)),
            "{unloaded}"
        );
    });
    assert_eq!(served(&daemon), ["smollm2", "configured", "second"]);
}

#[test]
fn bad_loads_and_callers_who_may_not_load_get_clear_errors() {
    // A model cache holding a copy of the fixture model, and a folder whose tokenizer links
    // out of the cache.
    let cache = accel_tests::shared_tempdir();
    let fixture = accel_tests::fixture_model();
    for (folder, link) in [("tiny", false), ("linked", true)] {
        let dir = cache.path().join(folder);
        std::fs::create_dir(&dir).unwrap();
        for name in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            if link && name == "tokenizer.json" {
                std::os::unix::fs::symlink(fixture.join(name), dir.join(name)).unwrap();
            } else {
                std::fs::copy(fixture.join(name), dir.join(name)).unwrap();
            }
        }
    }
    let extra = format!("model_cache: {}\n", cache.path().display());
    let daemon = Daemon::start_with(DaemonOptions {
        policy: Some(POLICY),
        extra_config: &extra,
        ..Default::default()
    });
    let post =
        |body: &Value| daemon.request("POST", "/v1/models", Some(body.to_string().as_bytes()));
    // Fields are checked and named.
    let (status, text) = post(&json!({"name": "Not A Name", "path": "x", "kv_blocks": 0}));
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("name:") && text.contains("kv_blocks: 0 is out of range"),
        "{text}"
    );
    let (status, text) = post(&json!({"name": "m", "path": "x", "kv_blocks": 8, "colour": "red"}));
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("colour"), "{text}");
    let (status, text) = post(&json!({"name": "m", "path": "/nonexistent/model.gguf"}));
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("cannot open /nonexistent/model.gguf"),
        "{text}"
    );

    // A folder that is not a model: the load is accepted, then fails saying why; accelctl
    // exits non-zero with the reason, and nothing is served.
    let empty = daemon.dir.path().join("not-a-model");
    std::fs::create_dir_all(&empty).unwrap();
    let out = daemon.ctl(&["models", "load", "broken", empty.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("loading broken failed") && stderr.contains("config.json"),
        "{stderr}"
    );
    let (status, text) = daemon.request("GET", "/v1/models/broken/load", None);
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"state\":\"failed\""), "{text}");
    assert!(json_of(&daemon.ctl(&["--json", "models"]))["data"]
        .as_array()
        .unwrap()
        .is_empty());
    let (status, text) = daemon.request("DELETE", "/v1/models/broken?grace=-1", None);
    assert_eq!(status, 400, "{text}");

    if !accel_tests::is_root() {
        eprintln!("skipped: callers by uid need root");
        return;
    }
    // A tenant may not load or unload.
    let fixture = accel_tests::fixture_model();
    let out = daemon.ctl_as(
        2001,
        2001,
        &["models", "load", "m", fixture.to_str().unwrap()],
    );
    refused(&out, "");
    let out = daemon.ctl_as(2001, 2001, &["models", "unload", "m"]);
    refused(&out, "");
    // An operator who is not root loads only from the model cache.
    let out = daemon.ctl_as(
        2009,
        2009,
        &["models", "load", "m", fixture.to_str().unwrap()],
    );
    refused(&out, "outside the model cache");
    let (status, _) = daemon.request("GET", "/v1/models/m/load", None);
    assert_eq!(status, 404, "a refused load leaves nothing behind");

    // Inside the cache (relative to it), a non-root operator may load; a folder there with a
    // file linking out of the cache is refused before anything is opened.
    let out = daemon.ctl_as(2009, 2009, &["models", "load", "cached", "tiny"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = daemon.ctl_as(2009, 2009, &["models", "load", "linked", "linked"]);
    refused(&out, "links outside the model cache");
    let out = daemon.ctl_as(2009, 2009, &["models", "load", "up", "../elsewhere"]);
    refused(&out, "");
}

/// `accelctl` exited 4 (refused by the daemon) and its error says `says`.
fn refused(out: &std::process::Output, says: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains(says), "{stderr}");
}

/// `accelctl models load --no-prefix-cache`: the model shares nothing between requests (a
/// repeated 40-token prompt holds no cached tokens), while the same files loaded with the
/// default cache hold two full blocks the second time; both answer alike.
#[test]
fn a_model_loaded_without_the_prefix_cache_shares_nothing() {
    let daemon = Daemon::start_with(DaemonOptions::default());
    let fixture = accel_tests::fixture_model();
    let path = fixture.to_str().unwrap();
    let loaded = daemon.ctl(&[
        "--json",
        "models",
        "load",
        "plain",
        path,
        "--kv-blocks",
        "64",
        "--no-prefix-cache",
    ]);
    assert!(
        loaded.status.success(),
        "{}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    daemon.load_model("cached", &fixture, 64);
    let prompt: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 300).collect();
    let ask = |model: &str| {
        let body = json!({"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": true});
        let (status, text) =
            daemon.request("POST", "/v1/completions", Some(body.to_string().as_bytes()));
        assert_eq!(status, 200, "{text}");
        let answer: Value = serde_json::from_str(&text).unwrap();
        (
            answer["usage"]["prompt_tokens_details"]["cached_tokens"].clone(),
            answer["choices"][0]["text"].clone(),
        )
    };
    let (_, first) = ask("plain");
    let (held, again) = ask("plain");
    assert_eq!(held, 0, "no cache: nothing held");
    assert_eq!(again, first);
    ask("cached");
    let (held, text) = ask("cached");
    assert_eq!(held, 32, "two full blocks held the second time");
    assert_eq!(text, first);
}
