//! The CPU engine against independent references: logits and greedy continuations computed by
//! Hugging Face transformers (tests/reference/make_fixtures.py) on the same weights, the
//! tokenizer against HF tokenizers, GGUF against the Hugging Face folder, batched against
//! alone, and SmolLM2-135M-Instruct's greedy answers.

#![allow(clippy::unwrap_used)]

use accel_runtime::backend::cpu::simd::Level;
use accel_runtime::backend::cpu::CpuBackend;
use accel_runtime::chat::{ChatInput, ChatTemplate, Message};
use accel_runtime::engine::sampling::{argmax, Sampler, SamplingParams};
use accel_runtime::engine::{Engine, EngineError, LogitsWanted, SeqId, StepInput};
use accel_runtime::kv::disk::{DiskError, DiskTier};
use accel_runtime::model::{self, LoadedModel};
use accel_tests::reference::{
    expected_logits, fixtures, greedy, greedy_with_swap, ids, json, prompt_logits, prompts,
    relative_error, HF_MODELS,
};

/// An engine on the best SIMD level of this CPU.
fn engine_for(model: &LoadedModel) -> Engine<CpuBackend> {
    engine_at(model, Level::detect())
}

fn engine_at(model: &LoadedModel, level: Level) -> Engine<CpuBackend> {
    Engine::new(
        CpuBackend::with_level(level).expect("a level this CPU supports"),
        model.config.clone(),
        &model.weights,
        64,
        16,
    )
    .unwrap()
}

#[test]
fn hf_models_match_transformers_logits() {
    for name in HF_MODELS {
        let dir = fixtures().join(name);
        let model = model::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        let meta = json(&dir.join("expected.json"));
        let expected = expected_logits(&dir.join("expected.safetensors"));
        let mut engine = engine_for(&model);
        for (i, prompt) in meta["prompt_ids"].as_array().unwrap().iter().enumerate() {
            let got = prompt_logits(&mut engine, &ids(prompt));
            let reference = &expected[&format!("prompt{i}")];
            let err = relative_error(&got, reference);
            // f32 compute on the model's own weights, as the reference: 1e-4 for every dtype.
            assert!(err <= 1e-4, "{name} prompt {i}: relative error {err:e}");
            if let Some(bf16_compute) = expected.get(&format!("prompt{i}_bf16_compute")) {
                let err = relative_error(&got, bf16_compute);
                assert!(
                    err <= 2e-2,
                    "{name} prompt {i}: {err:e} against transformers' bf16 compute"
                );
            }
        }
    }
}

#[test]
fn greedy_continuations_match_transformers() {
    for name in HF_MODELS {
        let dir = fixtures().join(name);
        let model = model::load(&dir).unwrap();
        let meta = json(&dir.join("expected.json"));
        let steps = meta["greedy_tokens"].as_u64().unwrap() as usize;
        let mut engine = engine_for(&model);
        for (prompt, want) in meta["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .zip(meta["greedy"].as_array().unwrap())
        {
            assert_eq!(
                greedy(&mut engine, &ids(prompt), steps),
                ids(want),
                "{name}"
            );
        }
        assert_eq!(engine.free_blocks(), 64, "{name}: every block is returned");
    }
}

#[test]
fn a_sequence_swapped_out_and_back_continues_as_if_never_moved() {
    let dir = fixtures().join("llama-gqa-f32");
    let model = model::load(&dir).unwrap();
    let meta = json(&dir.join("expected.json"));
    let prompts = prompts(&meta);
    let mut engine = engine_for(&model);
    let seq = engine.add_sequence();
    assert!(matches!(
        engine.swap_out(seq),
        Err(EngineError::NoSwapSpace)
    ));
    engine.remove_sequence(seq);
    engine.enable_swap(8).unwrap();

    let want = greedy(&mut engine, &prompts[0], 12);
    let got = greedy_with_swap(&mut engine, &prompts[0], &prompts[1], 12, 5);
    assert_eq!(got, want);
    assert_eq!(engine.free_blocks(), 64, "every device block is returned");
    assert_eq!(engine.free_swap_blocks(), 8, "every swap block is returned");

    // Errors leave everything as it was.
    let seq = engine.add_sequence();
    assert!(matches!(
        engine.swap_in(seq),
        Err(EngineError::NotSwapped(_))
    ));
    let long: Vec<u32> = prompts
        .iter()
        .flatten()
        .copied()
        .cycle()
        .take(200)
        .collect();
    engine
        .step(&[StepInput {
            seq,
            tokens: &long,
            logits: LogitsWanted::Last,
        }])
        .unwrap();
    let err = engine.swap_out(seq).unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::OutOfSwapSpace {
                needed: 13,
                free: 8
            }
        ),
        "{err}"
    );
    assert!(!engine.is_swapped(seq));
    assert_eq!(engine.sequence_len(seq), Some(200));
    engine.remove_sequence(seq);
    assert_eq!(engine.free_blocks(), 64);
    assert!(matches!(
        engine.enable_swap(4),
        Err(EngineError::SwapAlreadyEnabled)
    ));

    // A sequence removed while swapped out gives back its swap blocks and its device blocks.
    let seq = engine.add_sequence();
    engine
        .step(&[StepInput {
            seq,
            tokens: &prompts[0],
            logits: LogitsWanted::Last,
        }])
        .unwrap();
    engine.swap_out(seq).unwrap();
    assert!(engine.free_swap_blocks() < 8);
    engine.remove_sequence(seq);
    assert_eq!(engine.sequence_len(seq), None);
    assert_eq!(engine.free_swap_blocks(), 8);
    assert_eq!(engine.free_blocks(), 64);
    assert_eq!(
        greedy(&mut engine, &prompts[0], 12),
        want,
        "the engine serves on"
    );
}

#[test]
fn a_sequence_in_a_mixed_batch_gives_what_it_gives_alone() {
    let dir = fixtures().join("llama-gqa-f32");
    let model = model::load(&dir).unwrap();
    let meta = json(&dir.join("expected.json"));
    let prompts = prompts(&meta);
    let steps = 6;

    // Alone: each prompt's per-step logits.
    let mut alone = Vec::new();
    for prompt in &prompts {
        let mut engine = engine_for(&model);
        let seq = engine.add_sequence();
        let mut rows = Vec::new();
        let mut next = prompt.clone();
        for _ in 0..steps {
            let out = engine
                .step(&[StepInput {
                    seq,
                    tokens: &next,
                    logits: LogitsWanted::Last,
                }])
                .unwrap();
            let row = out[0].logits[0].clone();
            next = vec![argmax(&row)];
            rows.push(row);
        }
        alone.push(rows);
    }

    // Together: prompts start at different steps and prefill in chunks of 3 tokens while
    // others decode, so every step mixes prefill chunks and decode tokens.
    let mut engine = engine_for(&model);
    struct Live {
        seq: SeqId,
        pending: Vec<u32>,
        rows: Vec<Vec<f32>>,
    }
    let mut live: Vec<Option<Live>> = prompts.iter().map(|_| None).collect();
    for round in 0..60 {
        for (i, prompt) in prompts.iter().enumerate() {
            if live[i].is_none() && round == i {
                live[i] = Some(Live {
                    seq: engine.add_sequence(),
                    pending: prompt.clone(),
                    rows: Vec::new(),
                });
            }
        }
        let mut inputs = Vec::new();
        let mut chunks = Vec::new();
        for l in live.iter().flatten() {
            if l.rows.len() < steps {
                let take = l.pending.len().min(3);
                chunks.push((l.seq, l.pending[..take].to_vec(), take == l.pending.len()));
            }
        }
        if chunks.is_empty() && round > prompts.len() {
            break;
        }
        for (seq, tokens, _) in &chunks {
            inputs.push(StepInput {
                seq: *seq,
                tokens,
                logits: LogitsWanted::Last,
            });
        }
        let outputs = engine.step(&inputs).unwrap();
        for ((seq, tokens, finished_prompt), out) in chunks.iter().zip(outputs) {
            let l = live.iter_mut().flatten().find(|l| l.seq == *seq).unwrap();
            l.pending.drain(..tokens.len());
            if *finished_prompt {
                let row = out.logits[0].clone();
                l.pending = vec![argmax(&row)];
                l.rows.push(row);
            }
        }
    }
    for (i, l) in live.iter().enumerate() {
        let l = l.as_ref().unwrap();
        assert_eq!(l.rows.len(), steps);
        for (s, (together, by_itself)) in l.rows.iter().zip(&alone[i]).enumerate() {
            assert_eq!(argmax(together), argmax(by_itself), "prompt {i} step {s}");
            let err = relative_error(together, by_itself);
            assert!(err <= 1e-5, "prompt {i} step {s}: {err:e}");
        }
    }
}

#[test]
fn gguf_files_match_their_references_and_the_hf_folder() {
    let dir = fixtures().join("llama-gqa-f32");
    let hf_expected = expected_logits(&dir.join("expected.safetensors"));
    for qtype in ["f32", "f16", "q8_0", "q4_0", "q4_1"] {
        let path = dir.join(format!("model-{qtype}.gguf"));
        let model = model::load(&path).unwrap_or_else(|e| panic!("{qtype}: {e}"));
        assert_eq!(model.format, "gguf");
        let expected = expected_logits(&dir.join(format!("model-{qtype}.expected.safetensors")));
        let meta = json(&dir.join(format!("model-{qtype}.expected.json")));
        let mut engine = engine_for(&model);
        for (i, prompt) in meta["prompt_ids"].as_array().unwrap().iter().enumerate() {
            let got = prompt_logits(&mut engine, &ids(prompt));
            let err = relative_error(&got, &expected[&format!("prompt{i}")]);
            assert!(
                err <= 1e-4,
                "{qtype} prompt {i}: {err:e} against transformers on the same file"
            );
            if qtype == "f32" {
                let err = relative_error(&got, &hf_expected[&format!("prompt{i}")]);
                assert!(err <= 1e-4, "f32 GGUF vs HF folder, prompt {i}: {err:e}");
            }
        }
        for (prompt, want) in meta["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .zip(meta["greedy"].as_array().unwrap())
        {
            assert_eq!(
                greedy(&mut engine, &ids(prompt), want.as_array().unwrap().len()),
                ids(want),
                "{qtype}"
            );
        }
    }
}

#[test]
fn tokenizers_match_hugging_face() {
    let cases = json(&fixtures().join("tokenizer_cases.json"));
    let hf = model::load(&fixtures().join("llama-gqa-f32")).unwrap();
    let gguf = model::load(&fixtures().join("llama-gqa-f32/model-f32.gguf")).unwrap();
    for tokenizer in [&hf.tokenizer, &gguf.tokenizer] {
        for case in cases.as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let got = tokenizer.encode(text).unwrap();
            assert_eq!(got, ids(&case["ids"]), "{text:?}");
            assert_eq!(
                tokenizer.decode(&got, false).unwrap(),
                case["decoded"].as_str().unwrap(),
                "{text:?}"
            );
        }
        assert_eq!(tokenizer.eos_ids(), [2]);
    }
}

#[test]
fn chat_template_renders_like_transformers() {
    let dir = fixtures().join("llama-gqa-f32");
    let model = model::load(&dir).unwrap();
    let meta = json(&dir.join("expected.json"));
    let template = ChatTemplate::new(model.chat_template.as_deref().unwrap()).unwrap();
    let text = template
        .render(&ChatInput {
            eos_token: "<|im_end|>".into(),
            ..ChatInput::prompt(&[Message::new("user", "What is a daemon?")])
        })
        .unwrap();
    let chat_prompt = meta["prompt_ids"].as_array().unwrap().last().unwrap();
    assert_eq!(model.tokenizer.encode(&text).unwrap(), ids(chat_prompt));
}

#[test]
fn bad_model_files_are_clear_errors() {
    let dir = accel_tests::shared_tempdir();
    let src = fixtures().join("llama-gqa-f32");
    // A truncated safetensors file names the file.
    let folder = dir.path().join("truncated");
    std::fs::create_dir(&folder).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), folder.join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(folder.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let err = model::load(&folder).unwrap_err().to_string();
    assert!(
        err.contains("model.safetensors") && (err.contains("truncated") || err.contains("corrupt")),
        "{err}"
    );

    // A truncated GGUF names the file.
    let gguf = std::fs::read(src.join("model-q8_0.gguf")).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &gguf[..gguf.len() - 100]).unwrap();
    let err = model::load(&cut).unwrap_err().to_string();
    assert!(
        err.contains("cut.gguf") && err.contains("truncated"),
        "{err}"
    );

    // A tensor with the wrong shape is named with both shapes.
    let wrong = dir.path().join("wrong");
    std::fs::create_dir(&wrong).unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        std::fs::copy(src.join(f), wrong.join(f)).unwrap();
    }
    let mut config = json(&src.join("config.json"));
    config["intermediate_size"] = 128.into();
    std::fs::write(wrong.join("config.json"), config.to_string()).unwrap();
    let err = model::load(&wrong).unwrap_err().to_string();
    assert!(
        err.contains("mlp.gate_proj.weight")
            && err.contains("[160, 64]")
            && err.contains("[128, 64]"),
        "{err}"
    );

    // An unknown architecture is named.
    config = json(&src.join("config.json"));
    config["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
    std::fs::write(wrong.join("config.json"), config.to_string()).unwrap();
    let err = model::load(&wrong).unwrap_err().to_string();
    assert!(
        err.contains("GPTNeoXForCausalLM") && err.contains("not supported"),
        "{err}"
    );

    // A prompt longer than the context is refused and the engine keeps working.
    let model = model::load(&src).unwrap();
    let mut engine = engine_for(&model);
    let seq = engine.add_sequence();
    let long = vec![5u32; model.config.max_position_embeddings + 1];
    let err = engine
        .step(&[StepInput {
            seq,
            tokens: &long,
            logits: LogitsWanted::Last,
        }])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("257 tokens") && err.contains("context of 256"),
        "{err}"
    );
    assert_eq!(engine.sequence_len(seq), Some(0));
    assert_eq!(engine.free_blocks(), 64);
    let ok = engine
        .step(&[StepInput {
            seq,
            tokens: &[5, 6],
            logits: LogitsWanted::Last,
        }])
        .unwrap();
    assert_eq!(ok[0].logits[0].len(), model.config.vocab_size);
}

#[test]
fn smollm2_answers_like_transformers() {
    let Some(path) = accel_tests::smollm2_gguf() else {
        return;
    };
    let model = model::load(&path).unwrap();
    let reference = json(&fixtures().join("smollm2.json"));
    for case in reference["tokenizer_cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            model.tokenizer.encode(text).unwrap(),
            ids(&case["ids"]),
            "{text:?}"
        );
        assert_eq!(
            model.tokenizer.decode(&ids(&case["ids"]), false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "{text:?}"
        );
    }
    let template = ChatTemplate::new(model.chat_template.as_deref().unwrap()).unwrap();
    let mut engine = engine_for(&model);
    for chat in reference["chats"].as_array().unwrap() {
        let question = chat["question"].as_str().unwrap();
        let prompt = template
            .render(&ChatInput {
                bos_token: "<|im_start|>".into(),
                eos_token: "<|im_end|>".into(),
                ..ChatInput::prompt(&[Message::new("user", question)])
            })
            .unwrap();
        assert_eq!(prompt, chat["prompt"].as_str().unwrap());
        let prompt_ids = model.tokenizer.encode(&prompt).unwrap();
        assert_eq!(prompt_ids, ids(&chat["prompt_ids"]), "{question}");
        let got = greedy(&mut engine, &prompt_ids, 20);
        assert_eq!(
            got,
            ids(&chat["greedy"]),
            "{question}: {:?}",
            model.tokenizer.decode(&got, true)
        );
    }
}

/// A model folder made by `tests/gpu/make_model.py` (with transformers' logits and greedy
/// continuations beside it), named by `ACCEL_REFERENCE_MODEL`: the CPU engine against it.
/// Skipped when unset; the GPU check makes the SmolLM2-shaped one there.
#[test]
fn a_reference_model_from_the_environment_matches_transformers() {
    let Some(dir) = std::env::var_os("ACCEL_REFERENCE_MODEL").map(std::path::PathBuf::from) else {
        eprintln!("skipped: ACCEL_REFERENCE_MODEL is not set");
        return;
    };
    let model = model::load(&dir).unwrap();
    let meta = json(&dir.join("expected.json"));
    let expected = expected_logits(&dir.join("expected.safetensors"));
    let mut engine = engine_for(&model);
    for (i, prompt) in meta["prompt_ids"].as_array().unwrap().iter().enumerate() {
        let err = relative_error(
            &prompt_logits(&mut engine, &ids(prompt)),
            &expected[&format!("prompt{i}")],
        );
        eprintln!("{}: prompt {i}: relative error {err:e}", dir.display());
        assert!(err <= 1e-4, "prompt {i}: relative error {err:e}");
    }
    let steps = meta["greedy_tokens"].as_u64().unwrap() as usize;
    for (prompt, want) in meta["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .zip(meta["greedy"].as_array().unwrap())
    {
        assert_eq!(greedy(&mut engine, &ids(prompt), steps), ids(want));
    }
}

/// A copy of the f32 fixture model with its config.json edited.
fn fixture_with_config(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let source = fixtures().join("llama-gqa-f32");
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(source.join(name), dir.path().join(name)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap())
            .unwrap();
    edit(&mut config);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    dir
}

/// A config.json claiming 16M layers (or any count beyond sane maxima) is a clear error
/// naming the field, not an allocation that aborts the daemon.
#[test]
fn header_counts_are_checked_before_anything_is_sized_by_them() {
    for (field, value) in [
        ("num_hidden_layers", 16_777_216u64),
        ("hidden_size", 1 << 24),
        ("vocab_size", 1 << 24),
    ] {
        let dir = fixture_with_config(|config| {
            config[field] = value.into();
        });
        let Err(err) = model::load(dir.path()) else {
            panic!("{field} = {value} was accepted");
        };
        let err = err.to_string();
        assert!(
            err.contains(field) && err.contains("out of range"),
            "{field}: {err}"
        );
    }
}

/// A config.json field that is present but wrong is an error naming it, never a silent default
/// that surfaces later as a shape mismatch; a config without `architectures` says so.
#[test]
fn wrong_config_fields_are_named() {
    let cases: [(&str, serde_json::Value, &str); 4] = [
        (
            "num_key_value_heads",
            (-2).into(),
            "num_key_value_heads is -2, not a positive integer",
        ),
        (
            "head_dim",
            2.5.into(),
            "head_dim is 2.5, not a positive integer",
        ),
        (
            "rms_norm_eps",
            "small".into(),
            "rms_norm_eps is \"small\", not a number",
        ),
        (
            "architectures",
            serde_json::Value::Null,
            "has no \"architectures\" list (model_type: llama)",
        ),
    ];
    for (field, value, needle) in cases {
        let dir = fixture_with_config(|config| {
            config[field] = value;
            config["model_type"] = "llama".into();
        });
        let Err(err) = model::load(dir.path()) else {
            panic!("{field} was accepted");
        };
        assert!(err.to_string().contains(needle), "{field}: {err}");
    }
}

/// The GQA fixture model and a 40-token prompt from its reference prompts: two full blocks
/// of 16 and a part.
/// Tokens unlike `prompt`'s (its own, reversed and repeated), filling 8 blocks of 16 but
/// the last token: enough to push a small pool's cached blocks out.
fn filler_for(prompt: &[u32]) -> Vec<u32> {
    prompt
        .iter()
        .rev()
        .copied()
        .cycle()
        .take(8 * 16 - 1)
        .collect()
}

fn forty_token_prompt() -> (LoadedModel, Vec<u32>) {
    let dir = fixtures().join("llama-gqa-f32");
    let model = model::load(&dir).unwrap();
    let prompts = prompts(&json(&dir.join("expected.json")));
    let tokens = prompts.iter().flatten().copied().cycle().take(40).collect();
    (model, tokens)
}

/// Feeds `tokens` to `seq` and greedily continues `steps` tokens; the first step's last
/// logits and the continuation.
fn feed_and_continue(
    engine: &mut Engine<CpuBackend>,
    seq: SeqId,
    tokens: &[u32],
    steps: usize,
) -> (Vec<f32>, Vec<u32>) {
    let mut logits = engine
        .step(&[StepInput {
            seq,
            tokens,
            logits: LogitsWanted::Last,
        }])
        .unwrap()
        .remove(0)
        .logits
        .remove(0);
    let first = logits.clone();
    let mut out = Vec::new();
    for _ in 0..steps {
        let next = argmax(&logits) as u32;
        out.push(next);
        logits = engine
            .step(&[StepInput {
                seq,
                tokens: &[next],
                logits: LogitsWanted::Last,
            }])
            .unwrap()
            .remove(0)
            .logits
            .remove(0);
    }
    (first, out)
}

/// The prefix cache: a sequence of the same scope whose tokens start as an earlier one's did
/// holds that one's full blocks (the same block numbers) and computes only the rest, with the
/// logits and greedy continuation of a run without the cache; another scope holds nothing; a
/// prompt wholly cached still computes its last token; blocks nobody holds are evicted when
/// the pool needs them.
#[test]
fn a_common_prefix_is_shared_within_a_scope_and_changes_no_output() {
    let (model, first) = forty_token_prompt();
    // The same 36 tokens (two full blocks and a part), then others.
    let mut second = first[..36].to_vec();
    second.extend([5, 6, 7, 8, 9]);

    let mut plain = engine_for(&model);
    plain.disable_prefix_cache();
    let (plain_seq, held) = plain.add_sequence_cached("alpha", &second);
    assert_eq!(held, 0, "a disabled cache holds nothing");
    let (want_logits, want) = feed_and_continue(&mut plain, plain_seq, &second, 8);

    let mut engine = engine_for(&model);
    let (a, held) = engine.add_sequence_cached("alpha", &first);
    assert_eq!(held, 0);
    feed_and_continue(&mut engine, a, &first, 3);
    let (b, held) = engine.add_sequence_cached("alpha", &second);
    assert_eq!(held, 32, "two full blocks of 16");
    assert_eq!(
        engine.block_table(b).unwrap(),
        &engine.block_table(a).unwrap()[..2]
    );
    // What the scheduler is told: b holds two blocks a (the earlier) holds too.
    let mut sharing = engine.sharing();
    sharing.sort();
    assert_eq!(sharing, [(a, 0, 2), (b, 2, 2)]);
    let free_before = engine.free_blocks();
    let (got_logits, got) = feed_and_continue(&mut engine, b, &second[32..], 8);
    assert_eq!(got, want);
    assert!(
        relative_error(&got_logits, &want_logits) < 1e-5,
        "{}",
        relative_error(&got_logits, &want_logits)
    );
    // Its own blocks: the rest of its 49 tokens, 2 blocks beyond the shared 2.
    assert_eq!(free_before - engine.free_blocks(), 2);

    // Another tenant's identical prompt holds nothing.
    let (c, held) = engine.add_sequence_cached("beta", &second);
    assert_eq!(held, 0);
    engine.remove_sequence(c);
    // A prompt whose every block is cached still leaves its last token to compute.
    let (d, held) = engine.add_sequence_cached("alpha", &first[..32]);
    assert_eq!(held, 16);
    engine.remove_sequence(d);

    // Everyone gone: every block is free again (cached ones count as free) and a sequence
    // that needs the whole pool evicts them.
    engine.remove_sequence(a);
    engine.remove_sequence(b);
    assert_eq!(engine.free_blocks(), 64);
    assert!(engine.cached_blocks() > 0);
    let (e, held) = engine.add_sequence_cached("alpha", &second);
    assert_eq!(held, 32, "still cached after its holders left");
    engine.remove_sequence(e);
    // Four sequences of the model's whole context (256 tokens, 16 blocks) fill the pool.
    let long: Vec<u32> = first.iter().copied().cycle().take(256).collect();
    for _ in 0..4 {
        let seq = engine.add_sequence();
        engine
            .step(&[StepInput {
                seq,
                tokens: &long,
                logits: LogitsWanted::Last,
            }])
            .unwrap();
    }
    assert_eq!(engine.free_blocks(), 0);
    assert_eq!(engine.cached_blocks(), 0, "evicted to make room");
}

/// A sequence whose first blocks another holds is swapped out (to the host tier, or sealed to
/// the disk tier) and back: the other goes on reading the shared blocks as if nothing moved,
/// the swapped one shares them again when it comes back and continues as it would have, and
/// every block comes back.
#[test]
fn swapping_out_a_sequence_whose_blocks_are_shared_leaves_its_sharer_whole() {
    let (model, first) = forty_token_prompt();
    let mut second = first[..33].to_vec();
    second.extend([7, 8, 9]);

    let mut plain = engine_for(&model);
    plain.disable_prefix_cache();
    let (s, _) = plain.add_sequence_cached("t", &first);
    let (_, want_first) = feed_and_continue(&mut plain, s, &first, 6);
    let (s, _) = plain.add_sequence_cached("t", &second);
    let (_, want_second) = feed_and_continue(&mut plain, s, &second, 6);

    // Out to the host tier, and to the disk tier.
    for to_disk in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = engine_for(&model);
        engine.enable_swap(16).unwrap();
        let tier = disk_tier_for(&engine, dir.path(), 16);
        engine.enable_disk(tier).unwrap();
        let (a, _) = engine.add_sequence_cached("t", &first);
        let (_, a_start) = feed_and_continue(&mut engine, a, &first, 0);
        assert!(a_start.is_empty());
        let (b, held) = engine.add_sequence_cached("t", &second);
        assert_eq!(held, 32);
        if to_disk {
            engine.swap_out_to_disk(a, "t", true).unwrap();
        } else {
            engine.swap_out(a).unwrap();
        }
        assert_eq!(
            engine.free_blocks(),
            62,
            "a's third block is free once copied; the two b holds are not"
        );
        // b computes its rest over blocks a no longer holds on the device.
        let (_, got_second) = feed_and_continue(&mut engine, b, &second[32..], 6);
        assert_eq!(got_second, want_second);
        let free_before = engine.free_blocks();
        engine.swap_in(a).unwrap();
        // a's two full blocks were still in the cache (b holds them): a shares them again,
        // and only its third block is copied back into a block of its own.
        let (a_blocks, b_blocks) = (
            engine.block_table(a).unwrap(),
            engine.block_table(b).unwrap(),
        );
        assert_eq!(
            a_blocks[..2],
            b_blocks[..2],
            "{a_blocks:?} {b_blocks:?} (disk: {to_disk})"
        );
        assert!(!b_blocks.contains(&a_blocks[2]));
        assert_eq!(free_before - engine.free_blocks(), 1);
        // a's greedy continuation from where it stopped: feed nothing new but its next token.
        let (_, got_first) = feed_and_continue(&mut engine, a, &want_first[..1], 5);
        assert_eq!(&got_first[..], &want_first[1..], "disk: {to_disk}");
        engine.remove_sequence(a);
        engine.remove_sequence(b);
        assert_eq!(engine.free_blocks(), 64);
        assert_eq!(engine.free_swap_blocks(), 16);
        // From disk only the block not shared again was read.
        assert_eq!(engine.disk_stats().unwrap().blocks_read, u64::from(to_disk));
    }
}

/// Runs `prompt` for `steps` tokens chosen by `sampler` and returns every step's logits (bit
/// for bit) and tokens; before step `at`, `interrupt` moves the sequence about.
fn sample_moved(
    engine: &mut Engine<CpuBackend>,
    prompt: &[u32],
    steps: usize,
    sampler: &mut Sampler,
    at: usize,
    mut interrupt: impl FnMut(&mut Engine<CpuBackend>, SeqId),
) -> (Vec<Vec<u32>>, Vec<u32>) {
    let seq = engine.add_sequence();
    let mut context = prompt.to_vec();
    let mut next = prompt.to_vec();
    let (mut logits_bits, mut out) = (Vec::new(), Vec::new());
    for i in 0..steps {
        if i == at {
            interrupt(engine, seq);
        }
        let logits = engine
            .step(&[StepInput {
                seq,
                tokens: &next,
                logits: LogitsWanted::Last,
            }])
            .unwrap()
            .remove(0)
            .logits
            .remove(0);
        logits_bits.push(logits.iter().map(|x| x.to_bits()).collect());
        let token = sampler.sample(&logits, &context, prompt.len()).token;
        out.push(token);
        context.push(token);
        next = vec![token];
    }
    engine.remove_sequence(seq);
    (logits_bits, out)
}

fn disk_tier_for(engine: &Engine<CpuBackend>, dir: &std::path::Path, blocks: usize) -> DiskTier {
    DiskTier::open(dir, engine.kv_block_bytes(), blocks, 4).unwrap()
}

/// The disk tier: a running sequence swapped device → host → disk → device, or straight to
/// disk and back (sealed or not), continues bit for bit as a run never moved, greedy and
/// seeded, while another sequence overwrote the device blocks it had; every tier's blocks are
/// given back and the tenant's file is gone.
#[test]
fn a_sequence_moved_down_the_tiers_and_back_continues_bit_for_bit() {
    let (model, prompt) = forty_token_prompt();
    let dir = tempfile::tempdir().unwrap();
    let mut engine = engine_for(&model);
    engine.disable_prefix_cache();
    let seq = engine.add_sequence();
    assert!(matches!(
        engine.swap_out_to_disk(seq, "t", false),
        Err(EngineError::NoDiskTier)
    ));
    engine.remove_sequence(seq);
    engine.enable_swap(8).unwrap();
    // Four blocks per submission: the 3-4 block sequences below take one or two batches.
    engine
        .enable_disk(disk_tier_for(&engine, dir.path(), 8))
        .unwrap();
    let other: Vec<u32> = prompt.iter().rev().copied().collect();
    let seeded = SamplingParams {
        temperature: 0.9,
        seed: Some(11),
        ..SamplingParams::default()
    };
    for params in [SamplingParams::greedy(), seeded] {
        let want = sample_moved(
            &mut engine,
            &prompt,
            12,
            &mut Sampler::new(params.clone()),
            usize::MAX,
            |_, _| {},
        );
        let through_host = |engine: &mut Engine<CpuBackend>, seq| {
            engine.swap_out(seq).unwrap();
            engine.demote(seq, "tenant-a", false).unwrap();
            assert!(engine.is_on_disk(seq));
            assert_eq!(
                engine.free_swap_blocks(),
                8,
                "demoted: the host blocks are free"
            );
            greedy(engine, &other, 4);
            engine.swap_in(seq).unwrap();
        };
        let got = sample_moved(
            &mut engine,
            &prompt,
            12,
            &mut Sampler::new(params.clone()),
            5,
            through_host,
        );
        assert!(got == want, "device → host → disk → device changed the run");
        for encrypt in [false, true] {
            let straight = |engine: &mut Engine<CpuBackend>, seq| {
                engine.swap_out_to_disk(seq, "tenant-a", encrypt).unwrap();
                assert!(engine.is_swapped(seq) && engine.is_on_disk(seq));
                assert_eq!(engine.free_disk_blocks(), 5, "three blocks on disk");
                greedy(engine, &other, 4);
                engine.swap_in(seq).unwrap();
                assert!(!engine.is_swapped(seq));
            };
            let got = sample_moved(
                &mut engine,
                &prompt,
                12,
                &mut Sampler::new(params.clone()),
                7,
                straight,
            );
            assert!(
                got == want,
                "device → disk → device (sealed: {encrypt}) changed the run"
            );
        }
    }
    assert_eq!(engine.free_blocks(), 64);
    assert_eq!(engine.free_swap_blocks(), 8);
    assert_eq!(engine.free_disk_blocks(), 8);
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no file is left"
    );
    let stats = engine.disk_stats().unwrap();
    assert_eq!(stats.blocks_written, stats.blocks_read);
    assert!(stats.blocks_written >= 6 * 3);
}

/// Faults in the disk tier: a sealed block changed on disk fails the swap-in (never returned)
/// and the sequence stays parked, to be removed and recomputed; a sequence too big for the
/// tier stays on the device; the engine serves on.
#[test]
fn a_tampered_or_full_disk_tier_loses_nothing_else() {
    let (model, prompt) = forty_token_prompt();
    let dir = tempfile::tempdir().unwrap();
    let mut engine = engine_for(&model);
    engine.disable_prefix_cache();
    engine
        .enable_disk(disk_tier_for(&engine, dir.path(), 4))
        .unwrap();
    let want = greedy(&mut engine, &prompt, 6);

    let seq = engine.add_sequence();
    feed_and_continue(&mut engine, seq, &prompt, 0);
    engine.swap_out_to_disk(seq, "tenant-a", true).unwrap();
    let file = dir
        .path()
        .read_dir()
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let err = engine.swap_in(seq).unwrap_err();
    assert!(err.to_string().contains("failed authentication"), "{err}");
    assert!(
        engine.is_on_disk(seq),
        "still parked, for the caller to remove"
    );
    assert_eq!(engine.free_blocks(), 64, "no device block is kept");
    assert_eq!(engine.disk_stats().unwrap().auth_failures, 1);
    engine.remove_sequence(seq);
    assert_eq!(engine.free_disk_blocks(), 4);

    // 200 tokens need 13 blocks; the tier has 4.
    let seq = engine.add_sequence();
    let long: Vec<u32> = prompt.iter().copied().cycle().take(200).collect();
    feed_and_continue(&mut engine, seq, &long, 0);
    let err = engine.swap_out_to_disk(seq, "tenant-a", false).unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::Disk(DiskError::Full {
                needed: 13,
                free: 4
            })
        ),
        "{err}"
    );
    assert!(!engine.is_swapped(seq));
    assert_eq!(engine.sequence_len(seq), Some(200));
    engine.remove_sequence(seq);
    assert_eq!(
        greedy(&mut engine, &prompt, 6),
        want,
        "the engine serves on"
    );
}

/// An engine of `blocks` device blocks with `host` swap blocks and, when `disk` is given, a
/// disk tier of 8 blocks there.
fn small_engine(
    model: &LoadedModel,
    blocks: usize,
    host: usize,
    disk: Option<&std::path::Path>,
) -> Engine<CpuBackend> {
    let mut engine = Engine::new(
        CpuBackend::default(),
        model.config.clone(),
        &model.weights,
        blocks,
        16,
    )
    .unwrap();
    if host > 0 {
        engine.enable_swap(host).unwrap();
    }
    if let Some(dir) = disk {
        let tier = disk_tier_for(&engine, dir, 8);
        engine.enable_disk(tier).unwrap();
    }
    engine
}

/// A sequence of `scope` started through the cache with `tokens`: how many it held, the
/// bits of its first logits, and its greedy continuation; then it ends.
fn cached_run(
    engine: &mut Engine<CpuBackend>,
    scope: &str,
    tokens: &[u32],
) -> (usize, Vec<u32>, Vec<u32>) {
    let (seq, held) = engine.add_sequence_cached(scope, tokens);
    let (first, out) = feed_and_continue(engine, seq, &tokens[held..], 4);
    engine.remove_sequence(seq);
    (held, first.iter().map(|x| x.to_bits()).collect(), out)
}

/// Cold prefix blocks: cached blocks that another sequence's growth evicts move to the host
/// tier (or, without one, to disk, sealed) instead of being dropped; the same scope's next
/// prompt brings them back and runs bit for bit as if they had stayed on the device; another
/// scope finds nothing; a swap-out that needs the host blocks moves them on down to disk.
#[test]
fn evicted_prefix_blocks_move_down_the_tiers_and_come_back() {
    let (model, prompt) = forty_token_prompt();
    // Never evicted: the reference for a hit.
    let mut roomy = engine_for(&model);
    cached_run(&mut roomy, "t", &prompt);
    let want = cached_run(&mut roomy, "t", &prompt);
    assert_eq!(want.0, 32, "two full blocks held");
    assert_eq!(
        roomy.resident_prefix("t", &prompt),
        32,
        "a look holds the same"
    );
    assert_eq!(roomy.resident_prefix("u", &prompt), 0);

    let filler = filler_for(&prompt);
    for (host, disk) in [(4, false), (0, true), (1, true)] {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = small_engine(&model, 8, host, disk.then_some(dir.path()));
        cached_run(&mut engine, "t", &prompt);
        assert!(engine.cached_blocks() >= 2);
        // Another scope's sequence takes the whole pool: the cached blocks must go.
        let seq = engine.add_sequence();
        feed_and_continue(&mut engine, seq, &filler, 0);
        engine.remove_sequence(seq);
        let (on_host, on_disk) = engine.cold_blocks();
        assert!(
            on_host + on_disk >= 2,
            "({host}, {disk}): {:?}",
            engine.cold_blocks()
        );
        assert_eq!(on_disk > 0, disk, "({host}, {disk})");
        let demoted = engine.cold_stats().demoted;
        assert!(demoted >= 2);
        assert_eq!(
            engine.resident_prefix("t", &prompt),
            0,
            "cold is not resident"
        );

        assert_eq!(
            cached_run(&mut engine, "u", &prompt).0,
            0,
            "another scope holds nothing"
        );
        let got = cached_run(&mut engine, "t", &prompt);
        assert!(
            got == want,
            "({host}, {disk}): held {} of {}",
            got.0,
            want.0
        );
        assert!(engine.cold_stats().promoted >= 2);
        if disk {
            assert!(
                dir.path().read_dir().unwrap().count() <= 1,
                "cold blocks of one scope share its file"
            );
        }
    }

    // A swap-out takes the host blocks cold prefix blocks hold, moving them down to disk.
    let dir = tempfile::tempdir().unwrap();
    let mut engine = small_engine(&model, 8, 4, Some(dir.path()));
    cached_run(&mut engine, "t", &prompt);
    let seq = engine.add_sequence();
    feed_and_continue(&mut engine, seq, &filler, 0);
    engine.remove_sequence(seq);
    let cold_on_host = engine.cold_blocks().0;
    assert!(cold_on_host >= 2);
    assert_eq!(engine.free_swap_blocks(), 4, "cold blocks count as free");
    let seq = engine.add_sequence();
    feed_and_continue(&mut engine, seq, &filler[..63], 0);
    engine.swap_out(seq).unwrap();
    assert_eq!(engine.cold_blocks().0, 0, "the swap-out took the host tier");
    assert!(engine.cold_blocks().1 >= 1, "{:?}", engine.cold_blocks());
    engine.swap_in(seq).unwrap();
    engine.remove_sequence(seq);
}

/// A prefix whose first block was dropped from the cold tier while later ones stayed is
/// computed again and evicted again, round after round: its cold copies are replaced, never
/// piled up, and the host tier's room comes back whole.
#[test]
fn a_prefix_evicted_again_and_again_keeps_one_cold_copy_per_block() {
    let (model, prompt) = forty_token_prompt();
    let filler = filler_for(&prompt);
    // One host block and no disk: the second block evicted pushes the first out.
    let mut engine = small_engine(&model, 8, 1, None);
    for round in 0..4 {
        cached_run(&mut engine, "t", &prompt);
        let seq = engine.add_sequence();
        feed_and_continue(&mut engine, seq, &filler, 0);
        engine.remove_sequence(seq);
        assert_eq!(engine.cold_blocks(), (1, 0), "round {round}");
        assert_eq!(engine.free_swap_blocks(), 1, "round {round}");
    }
    assert!(engine.cold_stats().dropped >= 4);
    // The swap space is whole: a sequence of one block swaps out and back.
    let seq = engine.add_sequence();
    feed_and_continue(&mut engine, seq, &prompt[..10], 0);
    engine.swap_out(seq).unwrap();
    assert_eq!(engine.cold_blocks(), (0, 0));
    engine.swap_in(seq).unwrap();
    engine.remove_sequence(seq);
    assert_eq!(engine.free_swap_blocks(), 1);
}

/// A block one tenant's sequence freed and the next sequence then takes is never read by it:
/// every read of the cache is bounded by the reading sequence's own length, which starts at
/// zero, so the second sequence (on the first's very blocks) computes bit for bit what it
/// computes on a fresh engine.
#[test]
fn a_block_freed_by_one_tenant_is_never_read_by_the_next() {
    let (model, prompt) = forty_token_prompt();
    let other: Vec<u32> = prompt.iter().rev().copied().take(30).collect();
    let bits = |(logits, tokens): (Vec<f32>, Vec<u32>)| {
        (
            logits.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            tokens,
        )
    };
    let mut fresh = engine_for(&model);
    fresh.disable_prefix_cache();
    let seq = fresh.add_sequence();
    let want = bits(feed_and_continue(&mut fresh, seq, &other, 6));

    let mut engine = engine_for(&model);
    engine.disable_prefix_cache();
    let first = engine.add_sequence();
    feed_and_continue(&mut engine, first, &prompt, 8);
    let freed = engine.block_table(first).unwrap().to_vec();
    engine.remove_sequence(first);
    let second = engine.add_sequence();
    let got = bits(feed_and_continue(&mut engine, second, &other, 6));
    let taken = engine.block_table(second).unwrap();
    assert!(
        taken.iter().all(|b| freed.contains(b)),
        "the second sequence is on the first's blocks: {taken:?} of {freed:?}"
    );
    assert!(
        got == want,
        "a freed block's old contents changed what the next one computed"
    );
}
