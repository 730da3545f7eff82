//! Constrained decoding: a request's grammar (a JSON schema, a regular expression, a choice
//! of strings, a Lark grammar) compiled by llguidance against the model's vocabulary into a
//! [`Guide`], which gives before each token the set of tokens the grammar allows. The device
//! loop masks that sequence's logits with it before sampling and feeds it every token sampled;
//! when the grammar is complete the request ends.
//!
//! Grammars come from tenants: compiling is bounded by llguidance's fuel and size limits
//! ([`ParserLimits`]), and callers run it off the async threads under a deadline. A panic in
//! the library is contained to the request.

mod vocab;

use std::sync::{Arc, OnceLock};

use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::SimpleVob;
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use crate::tokenizer::Tokenizer;

/// Longest a `guided_choice` may be, in options and in bytes per option.
pub const MAX_CHOICES: usize = 256;
pub const MAX_CHOICE_BYTES: usize = 4096;

/// What a request's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid against this schema (`response_format: {"type": "json_schema", ...}`).
    JsonSchema(Value),
    /// Exactly one of these strings (`guided_choice`).
    Choice(Vec<String>),
    /// The whole output matches this regular expression (`guided_regex`).
    Regex(String),
    /// A grammar in llguidance's Lark dialect (`guided_grammar`).
    Lark(String),
}

impl Grammar {
    /// The field a tenant wrote it in, for errors.
    pub fn field(&self) -> &'static str {
        match self {
            Grammar::JsonObject | Grammar::JsonSchema(_) => "response_format",
            Grammar::Choice(_) => "guided_choice",
            Grammar::Regex(_) => "guided_regex",
            Grammar::Lark(_) => "guided_grammar",
        }
    }

    fn to_llguidance(&self) -> Result<TopLevelGrammar, GuideError> {
        Ok(match self {
            Grammar::JsonObject => {
                TopLevelGrammar::from_json_schema(compact(serde_json::json!({"type": "object"})))
            }
            Grammar::JsonSchema(schema) => {
                TopLevelGrammar::from_json_schema(compact(schema.clone()))
            }
            Grammar::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Grammar::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
            Grammar::Choice(options) => {
                if options.is_empty() || options.len() > MAX_CHOICES {
                    return Err(GuideError::Invalid(format!(
                        "guided_choice takes 1 to {MAX_CHOICES} strings"
                    )));
                }
                if options
                    .iter()
                    .any(|o| o.is_empty() || o.len() > MAX_CHOICE_BYTES)
                {
                    return Err(GuideError::Invalid(format!(
                        "guided_choice strings must be 1 to {MAX_CHOICE_BYTES} bytes"
                    )));
                }
                // Lark string literals take JSON's escapes.
                let alternatives: Vec<String> = options
                    .iter()
                    .map(|o| serde_json::Value::String(o.clone()).to_string())
                    .collect();
                TopLevelGrammar::from_lark(format!("start: {}", alternatives.join(" | ")))
            }
        })
    }
}

/// JSON as people and models write it on one line (`{"a": 1, "b": [2, 3]}`), not with any
/// whitespace anywhere: a model left free to emit whitespace can loop on newlines until its
/// token limit. A schema that sets llguidance's own `x-guidance` options keeps them.
fn compact(mut schema: Value) -> Value {
    if let Some(object) = schema.as_object_mut() {
        object.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            })
        });
    }
    schema
}

/// Why a grammar could not be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GuideError {
    /// The tenant's grammar is wrong or too large: a 400.
    #[error("{0}")]
    Invalid(String),
    /// This model cannot be constrained (its vocabulary): a 400 too, since asking again will
    /// not change that, but not the grammar's fault.
    #[error("{0}")]
    Unavailable(String),
    /// The library failed (a contained panic): a 500.
    #[error("{0}")]
    Failed(String),
}

/// A model's grammar compiler, built on first use (it indexes the whole vocabulary).
#[derive(Debug)]
pub struct Guides {
    tokenizer: Arc<Tokenizer>,
    vocab_size: usize,
    factory: OnceLock<Result<Arc<Factory>, String>>,
}

/// llguidance's factory, which has no `Debug`.
struct Factory(ParserFactory);

impl std::fmt::Debug for Factory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ParserFactory")
    }
}

impl Guides {
    /// For a model whose logits have `vocab_size` entries.
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize) -> Self {
        Self {
            tokenizer,
            vocab_size,
            factory: OnceLock::new(),
        }
    }

    fn factory(&self) -> Result<Arc<Factory>, GuideError> {
        self.factory
            .get_or_init(|| {
                let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let env =
                        vocab::ModelVocab::build(Arc::clone(&self.tokenizer), self.vocab_size)?;
                    let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
                    factory.quiet();
                    *factory.limits_mut() = limits();
                    Ok(Arc::new(Factory(factory)))
                }));
                built.unwrap_or_else(|_| {
                    Err("indexing the model's vocabulary for constrained decoding panicked".into())
                })
            })
            .clone()
            .map_err(|e| {
                GuideError::Unavailable(format!("this model's output cannot be constrained: {e}"))
            })
    }

    /// Compiles `grammar` into a guide for one request. Blocking and CPU-bound (bounded by
    /// [`limits`]): run it off the async threads.
    pub fn compile(&self, grammar: &Grammar) -> Result<Guide, GuideError> {
        let factory = self.factory()?;
        let top = grammar.to_llguidance()?;
        let parser = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            factory.0.create_parser(top)
        }))
        .map_err(|_| GuideError::Failed("compiling the grammar panicked".into()))?
        .map_err(|e| {
            GuideError::Invalid(format!(
                "{}: {}",
                grammar.field(),
                first_line(&e.to_string())
            ))
        })?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GuideError::Invalid(format!(
                "{}: {}",
                grammar.field(),
                first_line(&e)
            )));
        }
        Ok(Guide {
            matcher,
            mask: None,
            vocab_size: self.vocab_size,
        })
    }
}

/// Bounds on what one grammar may cost; llguidance's defaults, which its authors size so that
/// real schemas (a few megabytes of JSON) fit and a mask never takes more than tens of ms.
fn limits() -> ParserLimits {
    ParserLimits {
        verbose_errors: false,
        ..ParserLimits::default()
    }
}

fn first_line(text: &str) -> String {
    const MAX: usize = 500;
    let line = text.lines().next().unwrap_or_default();
    match line.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}…", &line[..at]),
        None => line.to_owned(),
    }
}

/// One request's grammar, as far as its output has got.
#[derive(Clone)]
pub struct Guide {
    matcher: Matcher,
    /// The tokens allowed next, once computed.
    mask: Option<SimpleVob>,
    vocab_size: usize,
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guide")
            .field("stopped", &self.matcher.is_stopped())
            .finish_non_exhaustive()
    }
}

impl Guide {
    /// Computes the set of tokens allowed next (ahead of the logits, so it can overlap a
    /// step); [`Guide::constrain`] computes it if this was not called.
    pub fn prepare(&mut self) -> Result<(), String> {
        if self.mask.is_none() {
            let mask = self.matcher.compute_mask_or_eos().map_err(|e| {
                format!(
                    "the output's grammar failed: {}",
                    first_line(&e.to_string())
                )
            })?;
            self.mask = Some(mask);
        }
        Ok(())
    }

    /// Leaves only the tokens the grammar allows next with a finite logit.
    pub fn constrain(&mut self, logits: &mut [f32]) -> Result<(), String> {
        self.prepare()?;
        let Some(mask) = &self.mask else {
            return Err("the output's grammar gave no mask".into());
        };
        let mut any = false;
        for (i, logit) in logits.iter_mut().enumerate() {
            if i < self.vocab_size && mask.is_allowed(i as u32) {
                any |= logit.is_finite();
            } else {
                *logit = f32::NEG_INFINITY;
            }
        }
        if any {
            Ok(())
        } else {
            Err("the output's grammar allows no token the model can produce here".into())
        }
    }

    /// Feeds the token sampled; true when the grammar is complete and the output must end.
    pub fn advance(&mut self, token: u32) -> Result<bool, String> {
        self.mask = None;
        self.matcher.consume_token(token).map_err(|e| {
            format!(
                "the output's grammar failed: {}",
                first_line(&e.to_string())
            )
        })?;
        Ok(self.matcher.is_stopped())
    }
}

#[cfg(test)]
mod tests;
