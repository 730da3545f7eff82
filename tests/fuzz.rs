//! Seeded mutation fuzzing of every parser fed from outside: GGUF files, Hugging Face folders
//! (config.json and the safetensors header), tokenizer.json, chat templates, policy and daemon
//! config YAML, and the API's JSON bodies.
//!
//! Stable Rust has no coverage-guided harness that runs without nightly sanitizers, so each
//! target mutates seeds from the repository (bit flips, interesting bytes and numbers,
//! truncation, chunk duplication and deletion, splices between seeds) with a seeded RNG, for
//! `ACCEL_FUZZ_SECONDS` per target (2 by default, as CI runs it; `tests/fuzz.sh` runs them for
//! an hour in all). A panic fails the test with the seed and iteration that reproduce it, and the
//! input is written under `ACCEL_FUZZ_OUT` (default: the system temp dir). Executions per
//! second are printed for the README.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn seconds() -> f64 {
    std::env::var("ACCEL_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0)
}

fn seed() -> u64 {
    std::env::var("ACCEL_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed)
}

/// One mutation of `input`, drawn from `seeds` for splices.
fn mutate(rng: &mut ChaCha8Rng, input: &[u8], seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut out = input.to_vec();
    let rounds = 1 + rng.random_range(0..4);
    for _ in 0..rounds {
        let len = out.len();
        match rng.random_range(0..8) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                out[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                const INTERESTING: [u8; 8] = [0, 1, 0x7f, 0x80, 0xff, b'-', b'9', b'"'];
                let i = rng.random_range(0..len);
                out[i] = INTERESTING[rng.random_range(0..INTERESTING.len())];
            }
            2 if len >= 8 => {
                // A little-endian count or length set to something extreme.
                const NUMBERS: [u64; 6] = [0, 1, u32::MAX as u64, u64::MAX, 1 << 24, 1 << 40];
                let i = rng.random_range(0..len - 7);
                let n = NUMBERS[rng.random_range(0..NUMBERS.len())];
                out[i..i + 8].copy_from_slice(&n.to_le_bytes());
            }
            3 if len > 0 => out.truncate(rng.random_range(0..len)),
            4 if len > 1 => {
                let a = rng.random_range(0..len);
                let b = (a + rng.random_range(1..64)).min(len);
                let chunk = out[a..b].to_vec();
                let at = rng.random_range(0..=len);
                out.splice(at..at, chunk);
            }
            5 if len > 1 => {
                let a = rng.random_range(0..len);
                let b = (a + rng.random_range(1..64)).min(len);
                out.drain(a..b);
            }
            6 if !seeds.is_empty() => {
                let other = &seeds[rng.random_range(0..seeds.len())];
                if !other.is_empty() && len > 0 {
                    let cut = rng.random_range(0..len);
                    let from = rng.random_range(0..other.len());
                    out.truncate(cut);
                    out.extend_from_slice(&other[from..]);
                }
            }
            _ => {
                // A number written out in text (YAML, JSON, templates).
                const TEXT: [&str; 8] = [
                    "-1",
                    "1e309",
                    ".nan",
                    "99999999999999999999",
                    "0",
                    "[",
                    "{{",
                    "*a",
                ];
                let at = rng.random_range(0..=len);
                out.splice(at..at, TEXT[rng.random_range(0..TEXT.len())].bytes());
            }
        }
    }
    out
}

/// Runs `target` on mutants of `seeds` for the configured time; fails on a panic.
fn fuzz(name: &str, seeds: Vec<Vec<u8>>, target: impl Fn(&[u8])) {
    quiet_contained_panics();
    let seed = seed();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let budget = Duration::from_secs_f64(seconds());
    let started = Instant::now();
    let mut runs = 0u64;
    // The seeds themselves first: they must pass.
    for s in &seeds {
        target(s);
    }
    while started.elapsed() < budget {
        let base = &seeds[rng.random_range(0..seeds.len())];
        let input = mutate(&mut rng, base, &seeds);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(&input)));
        runs += 1;
        if outcome.is_err() {
            let dir = std::env::var_os("ACCEL_FUZZ_OUT")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir);
            let path = dir.join(format!("accel-fuzz-{name}-{seed}-{runs}"));
            let _ = std::fs::write(&path, &input);
            panic!(
                "{name}: a mutant panicked (ACCEL_FUZZ_SEED={seed}, run {runs}); input saved to {}",
                path.display()
            );
        }
    }
    let rate = runs as f64 / started.elapsed().as_secs_f64();
    eprintln!("fuzz {name}: {runs} runs, {rate:.0} exec/s, no panic");
}

/// The daemon contains some panics of its dependencies (the tokenizers crate) and carries
/// on; printing each of thousands would drown the log, so only this harness's own are shown.
fn quiet_contained_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info
                .location()
                .is_some_and(|l| l.file().ends_with("fuzz.rs"))
            {
                default(info);
            }
        }));
    });
}

fn read(path: impl AsRef<Path>) -> Vec<u8> {
    std::fs::read(repo().join(path)).unwrap()
}

#[test]
fn fuzz_gguf_files() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.gguf");
    let seeds = vec![
        read("tests/fixtures/llama-gqa-f32/model-q4_0.gguf"),
        read("tests/fixtures/llama-gqa-f32/model-q8_0.gguf"),
    ];
    fuzz("gguf", seeds, |bytes| {
        std::fs::write(&file, bytes).unwrap();
        let _ = accel_runtime::model::load(&file);
    });
}

#[test]
fn fuzz_hf_config_and_safetensors_header() {
    let source = repo().join("tests/fixtures/llama-gqa-f32");
    let dir = tempfile::tempdir().unwrap();
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(source.join(name), dir.path().join(name)).unwrap();
    }
    let weights = std::fs::read(source.join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize + 8;
    let (header, data) = weights.split_at(header_len);
    let config = std::fs::read(source.join("config.json")).unwrap();
    // Seeds: "C" + config.json, or "S" + the safetensors header (its data kept as is).
    let seeds = vec![
        [b"C".as_slice(), &config].concat(),
        [b"S".as_slice(), header].concat(),
    ];
    fuzz("hf", seeds, |bytes| {
        let (kind, rest) = bytes.split_first().unwrap_or((&b'C', &[]));
        let (config_bytes, weight_bytes) = if *kind == b'S' {
            (config.clone(), [rest, data].concat())
        } else {
            (rest.to_vec(), weights.clone())
        };
        std::fs::write(dir.path().join("config.json"), config_bytes).unwrap();
        std::fs::write(dir.path().join("model.safetensors"), weight_bytes).unwrap();
        let _ = accel_runtime::model::load(dir.path());
    });
}

fn tokenizer_target(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    if let Ok(t) = accel_runtime::tokenizer::Tokenizer::from_json(text) {
        if let Ok(ids) = t.encode("Hello, wörld! 東京 🙂  <|im_end|>") {
            let _ = t.decode(&ids, false);
        }
        let _ = t.decode(&[0, 1, 2, 300, 65_000], true);
    }
}

#[test]
fn fuzz_tokenizer_json() {
    let seeds = vec![read("tests/fixtures/tokenizer/tokenizer.json")];
    fuzz("tokenizer", seeds, tokenizer_target);
}

/// Every crash the fuzzer found, kept in `tests/fixtures/fuzz/` and named by its target, must
/// stay fixed.
#[test]
fn crashes_found_by_fuzzing_stay_fixed() {
    quiet_contained_panics();
    let dir = repo().join("tests/fixtures/fuzz");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(&path).unwrap();
        match name.split('-').next() {
            Some("tokenizer") => tokenizer_target(&bytes),
            other => panic!("{name}: no target {other:?}"),
        }
        checked += 1;
    }
    assert!(checked > 0);
}

#[test]
fn fuzz_chat_templates() {
    let seeds = vec![
        read("tests/fixtures/llama-gqa-f32/chat_template.jinja"),
        b"{% for m in messages %}{{ m['role'] }}: {{ m['content'] | trim }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}".to_vec(),
    ];
    let input = accel_runtime::chat::ChatInput {
        bos_token: "<s>".into(),
        eos_token: "</s>".into(),
        ..accel_runtime::chat::ChatInput::prompt(&[
            accel_runtime::chat::Message::new("system", "be brief"),
            accel_runtime::chat::Message::new("user", "hi {{ there }}"),
        ])
    };
    fuzz("chat_template", seeds, |bytes| {
        let Ok(text) = std::str::from_utf8(bytes) else {
            return;
        };
        if let Ok(t) = accel_runtime::chat::ChatTemplate::new(text) {
            let _ = t.render(&input);
        }
    });
}

#[test]
fn fuzz_policy_yaml() {
    let seeds = vec![
        read("cgroup-policies/default.yaml"),
        read("cgroup-policies/examples/production.yaml"),
        read("cgroup-policies/examples/single-model-kiosk.yaml"),
    ];
    fuzz("policy", seeds, |bytes| {
        let text = String::from_utf8_lossy(bytes).into_owned();
        let _ =
            accel_runtime::policy::Policy::from_sources(&[accel_runtime::policy::PolicySource {
                name: "p.yaml".into(),
                text,
            }]);
    });
}

#[test]
fn fuzz_daemon_config_yaml() {
    let seeds = vec![read("runtime/dist/acceld.yaml")];
    fuzz("config", seeds, |bytes| {
        let text = String::from_utf8_lossy(bytes);
        if let Ok(config) = accel_runtime::config::DaemonConfig::parse("c.yaml", &text) {
            let _ = config.validate();
        }
    });
}

#[test]
fn fuzz_api_json_bodies() {
    use accel_runtime::api::openai_types::{ChatRequest, CompletionRequest};
    let seeds: Vec<Vec<u8>> = [
        r#"{"model":"tiny","prompt":"hello","max_tokens":16,"temperature":0.7,"top_p":0.9,"stop":["\n"],"logprobs":2,"stream":true,"stream_options":{"include_usage":true}}"#,
        r#"{"model":"tiny","prompt":[1,2,3],"seed":7,"stop_token_ids":[2],"ignore_eos":true}"#,
        r#"{"model":"tiny","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hi"}]}],"max_completion_tokens":8,"logprobs":true,"top_logprobs":3}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    fuzz("api_json", seeds, |bytes| {
        let _ = serde_json::from_slice::<CompletionRequest>(bytes);
        let _ = serde_json::from_slice::<ChatRequest>(bytes);
    });
}
