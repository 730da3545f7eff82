use rand::{Rng as _, SeedableRng as _};

use super::*;

/// The generated model's vocabulary: token `b` is byte `b`, 256 is `<|im_end|>` (its EOS).
fn guides() -> Guides {
    let tokenizer = Tokenizer::byte_level(&["<|im_end|>"]).unwrap();
    Guides::new(Arc::new(tokenizer), 260)
}

/// Samples under `grammar` from random logits until the grammar ends the output; returns its
/// bytes (EOS not included).
fn random_walk(guides: &Guides, grammar: &Grammar, seed: u64) -> Vec<u8> {
    let mut guide = guides.compile(grammar).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    for _ in 0..2_000 {
        let mut logits: Vec<f32> = (0..260).map(|_| rng.random::<f32>()).collect();
        guide.constrain(&mut logits).unwrap();
        let token = crate::engine::sampling::argmax(&logits);
        if token == 256 {
            return out;
        }
        out.push(u8::try_from(token).unwrap());
        if guide.advance(token).unwrap() {
            return out;
        }
    }
    panic!(
        "the grammar never ended: {:?}",
        String::from_utf8_lossy(&out)
    );
}

#[test]
fn a_choice_yields_exactly_one_of_its_strings() {
    let guides = guides();
    let labels = ["positive", "negative", "neutral \"quoted\""];
    let grammar = Grammar::Choice(labels.iter().map(|s| (*s).to_owned()).collect());
    for seed in 0..20 {
        let out = String::from_utf8(random_walk(&guides, &grammar, seed)).unwrap();
        assert!(labels.contains(&out.as_str()), "{out:?}");
    }
}

#[test]
fn a_regex_constrains_the_whole_output() {
    let guides = guides();
    let grammar = Grammar::Regex(r"[0-9]{4}-(0[1-9]|1[0-2])-[0-3][0-9]".into());
    for seed in 0..20 {
        let out = String::from_utf8(random_walk(&guides, &grammar, seed)).unwrap();
        let b = out.as_bytes();
        assert_eq!(b.len(), 10, "{out:?}");
        assert!(
            b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' && b[7] == b'-',
            "{out:?}"
        );
        assert!(
            matches!(
                &out[5..7],
                "01" | "02" | "03" | "04" | "05" | "06" | "07" | "08" | "09" | "10" | "11" | "12"
            ),
            "{out:?}"
        );
    }
}

#[test]
fn a_json_schema_output_parses_and_has_its_required_fields() {
    let guides = guides();
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "label": {"enum": ["a", "b"]},
            "score": {"type": "integer", "minimum": 0, "maximum": 9},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2}
        },
        "required": ["label", "score"],
        "additionalProperties": false
    });
    let grammar = Grammar::JsonSchema(schema);
    for seed in 0..20 {
        let out = random_walk(&guides, &grammar, seed);
        let value: Value = serde_json::from_slice(&out)
            .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&out)));
        assert!(
            matches!(value["label"].as_str(), Some("a" | "b")),
            "{value}"
        );
        assert!(value["score"].as_u64().is_some_and(|s| s <= 9), "{value}");
        if let Some(tags) = value.get("tags") {
            assert!(tags.as_array().is_some_and(|t| t.len() <= 2), "{value}");
        }
    }
    // Any object (its numbers may be past what an f64 holds, which serde_json refuses).
    let out = random_walk(&guides, &Grammar::JsonObject, 7);
    assert!(
        out.starts_with(b"{") && out.ends_with(b"}"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
}

#[test]
fn a_bad_grammar_is_the_tenants_error_naming_its_field() {
    let guides = guides();
    for (grammar, field) in [
        (
            Grammar::JsonSchema(serde_json::json!({"type": "no-such-type"})),
            "response_format",
        ),
        (Grammar::Regex("(unclosed".into()), "guided_regex"),
        (
            Grammar::Lark("start: undefined_rule".into()),
            "guided_grammar",
        ),
        (Grammar::Choice(Vec::new()), "guided_choice"),
    ] {
        match guides.compile(&grammar) {
            Err(GuideError::Invalid(message)) => {
                assert!(message.contains(field), "{message}")
            }
            other => panic!("{grammar:?}: {other:?}"),
        }
    }
}

#[test]
fn a_vocabulary_that_is_not_byte_level_cannot_be_constrained() {
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": {"[UNK]": 0, "a": 1}}
    });
    let tokenizer = Tokenizer::from_json(&json.to_string()).unwrap();
    let guides = Guides::new(Arc::new(tokenizer), 2);
    match guides.compile(&Grammar::JsonObject) {
        Err(GuideError::Unavailable(message)) => {
            assert!(message.contains("byte-level"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}
