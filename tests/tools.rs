//! Tool calling through the daemon with the default model: the official OpenAI Python SDK
//! forces a call, streams it, answers the tool's result and names a function
//! (`tests/sdk/tools.py`); and with `tool_choice` `auto`, an answer that is text streams as
//! the same text it is whole.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use serde_json::{json, Value};

#[test]
fn the_openai_sdk_calls_tools_streams_calls_and_answers_results() {
    let Some(daemon) = accel_tests::smollm2_daemon(256, "") else {
        return;
    };
    let Some(deps) = accel_tests::python_deps() else {
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk/tools.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(&daemon.socket)
        .env("PYTHONPATH", &deps)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        daemon.log_text()
    );
}

#[test]
fn with_tool_choice_auto_a_text_answer_streams_as_it_is_whole() {
    let Some(daemon) = accel_tests::smollm2_daemon(256, "") else {
        return;
    };
    let body = json!({
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "Write one sentence about the sea."}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        "temperature": 0, "max_tokens": 30,
    });
    let (status, whole) = accel_tests::chat_whole(&daemon, &body);
    assert_eq!(status, 200, "{whole}");
    let content = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        whole["choices"][0]["message"]["tool_calls"].is_null(),
        "{whole}"
    );
    let chunks = accel_tests::chat_streamed(&daemon, &body);
    assert_eq!(accel_tests::streamed_chat_text(&chunks), content);
    // Text, not held to the end: it came in more than one piece.
    assert!(chunks.len() > 3, "{chunks:?}");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        whole["choices"][0]["finish_reason"]
    );
}

/// A forced call's tokens are held back while streaming and sent as one delta; their
/// log-probabilities go with it, the same as the whole answer reports.
#[test]
fn a_streamed_calls_logprobs_are_those_of_the_whole_answer() {
    let Some(daemon) = accel_tests::smollm2_daemon(256, "") else {
        return;
    };
    let body = json!({
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}],
        "tool_choice": "required", "temperature": 0, "max_tokens": 60,
        "logprobs": true, "top_logprobs": 2,
    });
    let tokens = |logprobs: &Value| -> Vec<String> {
        logprobs["content"]
            .as_array()
            .map(|c| {
                c.iter()
                    .map(|t| t["token"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let (status, whole) = accel_tests::chat_whole(&daemon, &body);
    assert_eq!(status, 200, "{whole}");
    assert_eq!(
        whole["choices"][0]["finish_reason"], "tool_calls",
        "{whole}"
    );
    let want = tokens(&whole["choices"][0]["logprobs"]);
    assert_eq!(
        want.len() as u64,
        whole["usage"]["completion_tokens"].as_u64().unwrap()
    );
    let chunks = accel_tests::chat_streamed(&daemon, &body);
    let streamed: Vec<String> = chunks
        .iter()
        .flat_map(|c| tokens(&c["choices"][0]["logprobs"]))
        .collect();
    assert_eq!(streamed, want);
}
