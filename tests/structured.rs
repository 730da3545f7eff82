//! Structured output through the daemon with the default model (SmolLM2-135M-Instruct): every
//! output under a JSON schema parses and validates against its schema (checked by the
//! `jsonschema` crate, independent of the code under test), greedy and sampled; a choice always
//! yields one of its labels; a regex holds over the whole output; a grammar that cannot
//! compile is a 400 naming its field.

#![allow(clippy::unwrap_used)]

use rand::{Rng as _, SeedableRng as _};
use serde_json::{json, Value};

/// The assistant's text and why it ended.
fn answer(response: &Value) -> (String, String) {
    let choice = &response["choices"][0];
    (
        choice["message"]["content"].as_str().unwrap().to_owned(),
        choice["finish_reason"].as_str().unwrap().to_owned(),
    )
}

/// A property schema of one of the kinds the issue names: bounded strings, integers with
/// bounds, booleans, enums, arrays, nested objects.
fn property(rng: &mut rand_chacha::ChaCha8Rng, depth: u32) -> Value {
    match rng.random_range(0..if depth > 0 { 5 } else { 6 }) {
        0 => json!({"type": "string", "maxLength": rng.random_range(3..16)}),
        1 => {
            let low: i64 = rng.random_range(-50..50);
            json!({"type": "integer", "minimum": low, "maximum": low + rng.random_range(1..1000)})
        }
        2 => json!({"type": "boolean"}),
        3 => {
            let words = [
                "red", "green", "blue", "small", "large", "yes", "no", "maybe",
            ];
            let n = rng.random_range(2..5);
            let start = rng.random_range(0..words.len() - n);
            json!({"enum": words[start..start + n]})
        }
        4 => json!({
            "type": "array",
            "items": {"type": "string", "maxLength": 8},
            "maxItems": rng.random_range(1..4)
        }),
        _ => object(rng, depth + 1),
    }
}

fn object(rng: &mut rand_chacha::ChaCha8Rng, depth: u32) -> Value {
    let names = [
        "name", "color", "count", "ok", "tags", "size", "detail", "score",
    ];
    let n = rng.random_range(1..4);
    let start = rng.random_range(0..names.len() - n);
    let mut properties = serde_json::Map::new();
    let mut required = Vec::new();
    for (i, name) in names[start..start + n].iter().enumerate() {
        properties.insert((*name).to_owned(), property(rng, depth));
        if i == 0 || rng.random_bool(0.5) {
            required.push(*name);
        }
    }
    json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false
    })
}

#[test]
fn every_output_under_a_json_schema_validates_greedy_and_sampled() {
    let Some(daemon) = accel_tests::smollm2_daemon(512, "") else {
        return;
    };
    const REQUESTS: u64 = 200;
    const CLIENTS: u64 = 8;
    let failures: Vec<String> = std::thread::scope(|s| {
        let daemon = &daemon;
        let clients: Vec<_> = (0..CLIENTS)
            .map(|client| {
                s.spawn(move || {
                    let mut failures = Vec::new();
                    for i in (client..REQUESTS).step_by(CLIENTS as usize) {
                        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(i);
                        let schema = object(&mut rng, 0);
                        let sampling = if i % 2 == 0 {
                            json!({"temperature": 0})
                        } else {
                            json!({"temperature": 0.8, "top_p": 0.95, "seed": i})
                        };
                        let mut body = json!({
                            "model": "smollm2-135m-instruct",
                            "messages": [{"role": "user", "content": format!("Describe item number {i} as JSON.")}],
                            "max_tokens": 400,
                            "response_format": {"type": "json_schema", "json_schema": {"name": "item", "schema": schema, "strict": true}},
                        });
                        body.as_object_mut()
                            .unwrap()
                            .extend(sampling.as_object().unwrap().clone());
                        let (status, response) = accel_tests::chat_whole(daemon, &body);
                        if status != 200 {
                            failures.push(format!("request {i}: {status} {response}"));
                            continue;
                        }
                        let (text, reason) = answer(&response);
                        let problem = match serde_json::from_str::<Value>(&text) {
                            Err(e) => Some(format!("not JSON ({e}), finish_reason {reason}")),
                            Ok(value) => {
                                let validator = jsonschema::validator_for(&schema).unwrap();
                                let errors: Vec<String> =
                                    validator.iter_errors(&value).map(|e| e.to_string()).collect();
                                (!errors.is_empty()).then(|| errors.join("; "))
                            }
                        };
                        if let Some(problem) = problem {
                            failures.push(format!("request {i}: {problem}\n  schema {schema}\n  output {text:?}"));
                        }
                    }
                    failures
                })
            })
            .collect();
        clients
            .into_iter()
            .flat_map(|c| c.join().unwrap())
            .collect()
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_choice_yields_one_of_its_labels_and_a_regex_holds_over_the_whole_output() {
    let Some(daemon) = accel_tests::smollm2_daemon(512, "") else {
        return;
    };
    let labels = ["positive", "negative", "neutral"];
    let reviews = [
        "I loved every minute of it.",
        "Terrible service, never again.",
        "It was fine, I guess.",
        "Best purchase this year!",
        "The box was blue.",
    ];
    for (i, review) in reviews.iter().enumerate() {
        for temperature in [0.0, 1.0] {
            let (status, response) = accel_tests::chat_whole(
                &daemon,
                &json!({
                    "model": "smollm2-135m-instruct",
                    "messages": [{"role": "user", "content": format!("Is this review positive, negative or neutral? {review}")}],
                    "max_tokens": 10, "temperature": temperature, "seed": i,
                    "guided_choice": labels,
                }),
            );
            assert_eq!(status, 200, "{response}");
            let (text, reason) = answer(&response);
            assert!(labels.contains(&text.as_str()), "{text:?}");
            assert_eq!(reason, "stop");
        }
    }
    for (i, question) in [
        "When did the Apollo 11 landing happen?",
        "What is today's date?",
    ]
    .iter()
    .enumerate()
    {
        let (status, response) = accel_tests::chat_whole(
            &daemon,
            &json!({
                "model": "smollm2-135m-instruct",
                "messages": [{"role": "user", "content": question}],
                "max_tokens": 20, "temperature": 0.7, "seed": i,
                "guided_regex": "[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
            }),
        );
        assert_eq!(status, 200, "{response}");
        let (text, _) = answer(&response);
        let b = text.as_bytes();
        assert!(
            b.len() == 10
                && b[4] == b'-'
                && b[7] == b'-'
                && text.replace('-', "").bytes().all(|c| c.is_ascii_digit())
                && (1..=12).contains(&text[5..7].parse::<u32>().unwrap())
                && (1..=31).contains(&text[8..10].parse::<u32>().unwrap()),
            "{text:?}"
        );
    }
    // Streamed, the output reassembles to what the whole response says.
    let schema = json!({
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "legs": {"type": "integer", "minimum": 0, "maximum": 8}},
        "required": ["name", "legs"], "additionalProperties": false
    });
    let body = json!({
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "A cat as a JSON object."}],
        "max_tokens": 100, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "animal", "schema": schema}},
    });
    let (status, response) = accel_tests::chat_whole(&daemon, &body);
    assert_eq!(status, 200, "{response}");
    let (whole, _) = answer(&response);
    let streamed = accel_tests::streamed_chat_text(&accel_tests::chat_streamed(&daemon, &body));
    assert_eq!(streamed, whole);
    let value: Value = serde_json::from_str(&whole).unwrap_or_else(|e| panic!("{e}: {whole:?}"));
    assert!(jsonschema::is_valid(&schema, &value), "{value}");
}

#[test]
fn a_grammar_that_cannot_compile_is_a_400_naming_its_field() {
    let Some(daemon) = accel_tests::smollm2_daemon(512, "") else {
        return;
    };
    let base = json!({
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
    });
    let with = |extra: Value| {
        let mut body = base.clone();
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    for (extra, needle) in [
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}}),
            "response_format",
        ),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            "response_format.json_schema.schema",
        ),
        (
            json!({"response_format": {"type": "yaml"}}),
            "response_format.type",
        ),
        (json!({"guided_regex": "(unclosed"}), "guided_regex"),
        (
            json!({"guided_grammar": "start: missing_rule"}),
            "guided_grammar",
        ),
        (json!({"guided_choice": []}), "guided_choice"),
        (
            json!({"guided_choice": ["a"], "guided_regex": "a"}),
            "guided_choice, guided_regex each constrain the output",
        ),
    ] {
        let (status, response) = accel_tests::chat_whole(&daemon, &with(extra.clone()));
        assert_eq!(status, 400, "{extra}: {response}");
        let message = response["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{extra}: {message}");
    }
    // `text` is free text, as without a format.
    let (status, response) =
        accel_tests::chat_whole(&daemon, &with(json!({"response_format": {"type": "text"}})));
    assert_eq!(status, 200, "{response}");
}
