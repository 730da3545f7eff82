//! Constrained decoding's cost, each figure against a bound measured in the same run:
//! - the token mask for a JSON schema at the default model's vocabulary (49,152 tokens), per
//!   token of a valid document, against one decode step of the engine at batch 1;
//! - greedy decode through the device loop (a [`ModelHandle`], the API's path) with every
//!   request held to a JSON schema, against the same requests unconstrained, at batch 1 and 16.
//!
//! `cargo bench -p accel-benches --bench guide`. Uses the default model (SmolLM2-135M-Instruct)
//! from the model cache, else the small generated model (whose vocabulary is 260 tokens).

use std::time::{Duration, Instant};

use accel_runtime::config::{DaemonConfig, ModelSpec};
use accel_runtime::guide::{Grammar, Guide};
use accel_runtime::runner::{GenerateRequest, ModelHandle};
use criterion::Criterion;

const PROMPT: usize = 16;
const OUTPUT: usize = 32;

/// A list of records: structure in every token, and never complete within `OUTPUT` tokens.
fn schema() -> serde_json::Value {
    serde_json::json!({
        "type": "array",
        "minItems": 50,
        "items": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 12},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}
            },
            "required": ["name", "age", "tags"],
            "additionalProperties": false
        }
    })
}

/// A document the schema accepts, for timing the mask token by token.
fn document() -> String {
    let records: Vec<String> = (0..50)
        .map(|i| {
            format!(
                r#"{{"name": "person {i}", "age": {}, "tags": ["a", "c"]}}"#,
                i % 90
            )
        })
        .collect();
    format!("[{}]", records.join(", "))
}

fn config() -> DaemonConfig {
    let cache =
        std::env::var("ACCEL_MODEL_CACHE").unwrap_or_else(|_| "/var/cache/accel/models".into());
    let mut spec = ModelSpec::default_model();
    spec.kv_blocks = 512;
    spec.swap_blocks = 0;
    DaemonConfig {
        model_cache: cache.into(),
        backend: accel_runtime::config::BackendChoice::Cpu,
        models: vec![spec],
        ..DaemonConfig::default()
    }
}

fn prompt(i: usize) -> Vec<u32> {
    (0..PROMPT as u32)
        .map(|t| 100 + (t * 17 + i as u32 * 31) % 1000)
        .collect()
}

/// Seconds to serve `n` greedy requests of `PROMPT` + `OUTPUT` tokens, each under `guide`.
fn serve(handle: &ModelHandle, n: usize, guide: Option<&Guide>) -> f64 {
    let requests = (0..n)
        .map(|i| GenerateRequest {
            guide: guide.cloned(),
            ..accel_benches::greedy_request("t", prompt(i), OUTPUT)
        })
        .collect();
    let (seconds, generated) = accel_benches::serve(handle, requests);
    assert!(
        generated.iter().all(|&g| g == OUTPUT),
        "the grammar ended early"
    );
    seconds
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let config = config();
    let devices = accel_runtime::devices::DeviceReport {
        devices: Vec::new(),
        cuda_driver: false,
        reason: Some("the guide bench runs on the CPU".into()),
    };
    let handles = accel_runtime::runner::start_models(&config, &devices, None, None, None);
    let handle = handles.first().expect("a model");
    println!(
        "model: {} ({}), vocabulary {}",
        handle.info.name, handle.info.source, handle.info.vocab_size
    );
    let grammar = Grammar::JsonSchema(schema());
    let guide = handle
        .guides()
        .compile(&grammar)
        .expect("the schema compiles");

    // The mask alone, token by token along a valid document.
    let tokens = handle
        .tokenizer()
        .encode_plain(&document())
        .expect("tokenize");
    let mut per_token = Vec::new();
    c.bench_function("guide_mask_per_token_json_schema", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut g = guide.clone();
                let start = Instant::now();
                for &t in &tokens {
                    g.prepare().expect("mask");
                    g.advance(t).expect("a valid document");
                }
                let elapsed = start.elapsed();
                per_token.push(elapsed.as_secs_f64() / tokens.len() as f64);
                total += elapsed;
            }
            total
        })
    });

    let mut rows = Vec::new();
    let mut group = c.benchmark_group("guide_decode");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(5));
    for n in [1usize, 16] {
        let (mut free, mut held) = (Vec::new(), Vec::new());
        group.bench_function(format!("unconstrained_{n}_streams"), |b| {
            b.iter_custom(|iters| {
                accel_benches::timed_iterations(iters, &mut free, || serve(handle, n, None))
            })
        });
        group.bench_function(format!("json_schema_{n}_streams"), |b| {
            b.iter_custom(|iters| {
                accel_benches::timed_iterations(iters, &mut held, || serve(handle, n, Some(&guide)))
            })
        });
        if let (Some(free), Some(held)) = (
            accel_benches::median(&mut free),
            accel_benches::median(&mut held),
        ) {
            rows.push((n, free, held));
        }
    }
    group.finish();

    let mask = accel_benches::median(&mut per_token).unwrap_or(f64::NAN);
    let step = rows
        .iter()
        .find(|r| r.0 == 1)
        .map_or(f64::NAN, |r| r.1 / OUTPUT as f64);
    println!(
        "\nmask per token, JSON schema, {} tokens: {:.1} µs = {:.3} x one batch-1 decode step ({:.2} ms)",
        tokens.len(),
        mask * 1e6,
        mask / step,
        step * 1e3
    );
    println!(
        "\n| streams | unconstrained | JSON schema | constrained / unconstrained throughput |"
    );
    println!("|---|---|---|---|");
    for (n, free, held) in &rows {
        let tokens = (n * OUTPUT) as f64;
        println!(
            "| {n} | {:.0} tok/s | {:.0} tok/s | {:.3} |",
            tokens / free,
            tokens / held,
            free / held
        );
    }
    c.final_summary();
}
