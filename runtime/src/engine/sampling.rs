//! Choosing the next token from logits, per sequence: penalties, temperature, top-k, top-p,
//! min-p, a per-request seed, and top-n log-probabilities. Pure: logits in, a token out.
//!
//! Order, as in vLLM and Hugging Face: penalties on the raw logits; log-probabilities reported
//! from the model's own distribution (before penalties and temperature); then temperature
//! (0 means greedy), top-k, top-p and min-p filters, and a draw from what remains.

use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Per-request sampling settings (OpenAI names where they exist).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 keeps all.
    pub min_p: f32,
    /// Hugging Face's repetition penalty over prompt and output tokens; 1 is none.
    pub repetition_penalty: f32,
    /// OpenAI's presence penalty over output tokens.
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty over output tokens.
    pub frequency_penalty: f32,
    /// Same seed, same output.
    pub seed: Option<u64>,
    /// Report this many most likely tokens with their log-probabilities (at most 20).
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            top_logprobs: 0,
        }
    }
}

/// A model's sampling for the fields a request leaves out: from its `generation_config.json`
/// (Hugging Face folders) or a `sampling_defaults` block in its config entry (which wins).
/// What neither gives is OpenAI's default (temperature 1, no truncation, no penalty).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingDefaults {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f32>,
}

impl SamplingDefaults {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// These, with `base` where these say nothing.
    pub fn or(self, base: Self) -> Self {
        Self {
            temperature: self.temperature.or(base.temperature),
            top_p: self.top_p.or(base.top_p),
            top_k: self.top_k.or(base.top_k),
            repetition_penalty: self.repetition_penalty.or(base.repetition_penalty),
        }
    }

    /// Read from a `generation_config.json` as transformers writes it: `do_sample: false`
    /// means greedy whatever the temperature says; a `top_k` of 0 keeps every token.
    pub fn from_generation_config(config: &serde_json::Value) -> Self {
        let number = |field: &str| {
            config[field]
                .as_f64()
                .map(|v| v as f32)
                .filter(|v| v.is_finite())
        };
        let greedy = config["do_sample"].as_bool() == Some(false);
        Self {
            temperature: if greedy {
                Some(0.0)
            } else {
                number("temperature")
            },
            top_p: number("top_p"),
            top_k: config["top_k"].as_u64().map(|k| k as usize),
            repetition_penalty: number("repetition_penalty"),
        }
    }

    /// Problems with the values, as [`SamplingParams::validate`] names them.
    pub fn validate(&self) -> Vec<String> {
        let base = SamplingParams::default();
        SamplingParams {
            temperature: self.temperature.unwrap_or(base.temperature),
            top_p: self.top_p.unwrap_or(base.top_p),
            top_k: self.top_k.unwrap_or(base.top_k),
            repetition_penalty: self.repetition_penalty.unwrap_or(base.repetition_penalty),
            ..base
        }
        .validate()
    }
}

/// Temperatures below this sample greedily.
pub const GREEDY_BELOW: f32 = 1e-5;

/// Most `top_logprobs` a request may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Every problem with the values, naming the field and the accepted range.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut range = |name: &str, value: f32, lo: f32, hi: f32| {
            if !(value.is_finite() && (lo..=hi).contains(&value)) {
                problems.push(format!("{name} is {value}; use a value from {lo} to {hi}"));
            }
        };
        range("temperature", self.temperature, 0.0, 100.0);
        range("top_p", self.top_p, 0.0, 1.0);
        range("min_p", self.min_p, 0.0, 1.0);
        range("repetition_penalty", self.repetition_penalty, 0.01, 100.0);
        range("presence_penalty", self.presence_penalty, -2.0, 2.0);
        range("frequency_penalty", self.frequency_penalty, -2.0, 2.0);
        if self.top_p == 0.0 {
            problems.push("top_p is 0, which keeps no token; use a value above 0".into());
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            problems.push(format!(
                "top_logprobs is {}; at most {MAX_TOP_LOGPROBS}",
                self.top_logprobs
            ));
        }
        problems
    }
}

/// A chosen token with its log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// A sampler for one sequence.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_os_rng(),
        };
        Self { params, rng }
    }

    /// Picks the next token. `context` is the prompt and output so far; `output_start` is where
    /// the output begins in it (presence and frequency penalties count only output tokens).
    pub fn sample(&mut self, logits: &[f32], context: &[u32], output_start: usize) -> Sampled {
        let p = &self.params;
        let logprobs = log_softmax(logits);
        let top = top_n(&logprobs, p.top_logprobs);

        let mut scores = logits.to_vec();
        if p.repetition_penalty != 1.0 {
            let mut seen = context.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(s) = scores.get_mut(t as usize) {
                    *s = if *s > 0.0 {
                        *s / p.repetition_penalty
                    } else {
                        *s * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts: Vec<(u32, usize)> = Vec::new();
            let mut output: Vec<u32> = context.get(output_start..).unwrap_or_default().to_vec();
            output.sort_unstable();
            for t in output {
                match counts.last_mut() {
                    Some((last, n)) if *last == t => *n += 1,
                    _ => counts.push((t, 1)),
                }
            }
            for (t, n) in counts {
                if let Some(s) = scores.get_mut(t as usize) {
                    *s -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }

        // Temperatures this small are greedy in effect and would overflow the division.
        let token = if p.temperature < GREEDY_BELOW {
            argmax(&scores)
        } else {
            self.draw(&scores)
        };
        Sampled {
            token,
            logprob: logprobs
                .get(token as usize)
                .copied()
                .unwrap_or(f32::NEG_INFINITY),
            top,
        }
    }

    fn draw(&mut self, scores: &[f32]) -> u32 {
        let kept = nucleus(scores, &self.params);
        let total: f32 = kept.iter().map(|c| c.1).sum();
        if !(total.is_finite() && total > 0.0) {
            // Non-finite logits: fall back to the most likely candidate rather than the least.
            return argmax(scores);
        }
        let mut target = self.rng.random::<f32>() * total;
        for &(token, weight) in &kept {
            if target < weight {
                return token;
            }
            target -= weight;
        }
        kept.last().map_or(0, |c| c.0)
    }
}

/// Orders candidates most likely first, then by token id.
fn more_likely(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The tokens `params` lets a draw choose among, most likely first, each with its unnormalised
/// weight (`exp` of its scaled score less the best one's): the `top_k` best, then the smallest
/// prefix whose probability reaches `top_p`, then those at least `min_p` of the best.
///
/// Only as much of the vocabulary is sorted as the prefix needs: the best 64 candidates are
/// selected and sorted, then 256, and so on, until the prefix ends inside them. A nucleus is
/// usually a few tokens, and sorting all 49,152 of a vocabulary for every sampled token cost
/// as much as the forward pass at large batches. With neither `top_p` nor `min_p` every
/// candidate is kept, in id order.
fn nucleus(scores: &[f32], p: &SamplingParams) -> Vec<(u32, f32)> {
    let mut candidates: Vec<(u32, f32)> = scores
        .iter()
        .enumerate()
        // A NaN logit can never be chosen.
        .map(|(i, &s)| {
            let scaled = if s.is_nan() {
                f32::NEG_INFINITY
            } else {
                s / p.temperature
            };
            (i as u32, scaled)
        })
        .collect();
    if p.top_k > 0 && p.top_k < candidates.len() {
        candidates.select_nth_unstable_by(p.top_k - 1, more_likely);
        candidates.truncate(p.top_k);
    }
    let max = candidates
        .iter()
        .map(|c| c.1)
        .fold(f32::NEG_INFINITY, f32::max);
    for c in &mut candidates {
        c.1 = (c.1 - max).exp();
    }
    let total: f32 = candidates.iter().map(|c| c.1).sum();
    if p.top_p >= 1.0 && p.min_p <= 0.0 {
        return candidates;
    }
    let best = if max.is_finite() { 1.0 } else { 0.0 };
    let threshold = p.min_p * best;
    // How many of the sorted `prefix` the nucleus and min_p keep, if the cut falls inside it.
    let cut = |prefix: &[(u32, f32)], complete: bool| -> Option<usize> {
        let mut keep = prefix.len();
        let mut reached = complete;
        if p.top_p < 1.0 {
            let mut cumulative = 0.0;
            reached = false;
            for (i, c) in prefix.iter().enumerate() {
                cumulative += c.1 / total;
                if cumulative >= p.top_p {
                    keep = i + 1;
                    reached = true;
                    break;
                }
            }
            reached |= complete;
        }
        if p.min_p > 0.0 {
            let within = prefix[..keep]
                .iter()
                .take_while(|c| c.1 >= threshold)
                .count();
            if within < keep {
                return Some(within.max(1));
            }
        }
        reached.then_some(keep.max(1))
    };
    let mut m = 64usize;
    loop {
        if m >= candidates.len() {
            candidates.sort_by(more_likely);
            let keep = cut(&candidates, true).unwrap_or(candidates.len());
            candidates.truncate(keep);
            return candidates;
        }
        candidates.select_nth_unstable_by(m - 1, more_likely);
        candidates[..m].sort_by(more_likely);
        if let Some(keep) = cut(&candidates[..m], false) {
            candidates.truncate(keep);
            return candidates;
        }
        m *= 4;
    }
}

/// Index of the largest value; the lowest index among equals; NaN never wins.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best: Option<usize> = None;
    for (i, v) in values.iter().enumerate() {
        if !v.is_nan() && best.is_none_or(|b| *v > values[b]) {
            best = Some(i);
        }
    }
    best.unwrap_or(0) as u32
}

/// Natural-log softmax, computed stably.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    let log_sum = sum.ln() + max;
    logits.iter().map(|l| l - log_sum).collect()
}

fn top_n(logprobs: &[f32], n: usize) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    // A token a grammar ruled out has no probability to report (and -inf is no JSON number).
    let mut all: Vec<(u32, f32)> = logprobs
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .map(|(i, &l)| (i as u32, l))
        .collect();
    if n < all.len() {
        all.select_nth_unstable_by(n - 1, more_likely);
        all.truncate(n);
    }
    all.sort_by(more_likely);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the nucleus was before it selected partially: the whole vocabulary sorted.
    fn nucleus_by_full_sort(scores: &[f32], p: &SamplingParams) -> Vec<u32> {
        let mut all: Vec<(u32, f32)> = scores
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                (
                    i as u32,
                    if s.is_nan() {
                        f32::NEG_INFINITY
                    } else {
                        s / p.temperature
                    },
                )
            })
            .collect();
        all.sort_by(more_likely);
        if p.top_k > 0 {
            all.truncate(p.top_k);
        }
        let max = all.first().map_or(0.0, |c| c.1);
        let probs: Vec<f64> = all.iter().map(|c| f64::from((c.1 - max).exp())).collect();
        let total: f64 = probs.iter().sum();
        let mut keep = all.len();
        if p.top_p < 1.0 {
            let mut cumulative = 0.0;
            keep = probs
                .iter()
                .position(|q| {
                    cumulative += q / total;
                    cumulative >= f64::from(p.top_p)
                })
                .map_or(all.len(), |i| i + 1);
        }
        if p.min_p > 0.0 {
            let threshold = f64::from(p.min_p) * probs[0];
            keep = probs[..keep]
                .iter()
                .take_while(|&&q| q >= threshold)
                .count()
                .max(1);
        }
        all.truncate(keep);
        all.into_iter().map(|c| c.0).collect()
    }

    #[test]
    fn the_partial_nucleus_keeps_what_a_full_sort_keeps() {
        use rand::SeedableRng as _;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let mut checked = 0;
        for case in 0..300 {
            let vocab = [5, 63, 64, 65, 300, 5000][case % 6];
            // Peaked and flat distributions, with ties and a few masked tokens.
            let spread = [0.5f32, 3.0, 12.0][case % 3];
            let scores: Vec<f32> = (0..vocab)
                .map(|i| {
                    if i % 97 == 13 {
                        f32::NEG_INFINITY
                    } else {
                        (rng.random::<f32>() * spread * 4.0).round() / 4.0
                    }
                })
                .collect();
            let p = SamplingParams {
                temperature: [0.2f32, 0.7, 1.0, 1.5][case % 4],
                top_k: [0usize, 1, 10, 70][(case / 3) % 4],
                top_p: [1.0f32, 0.9, 0.5, 0.99, 0.999][case % 5],
                min_p: [0.0f32, 0.0, 0.05, 0.2][(case / 5) % 4],
                ..SamplingParams::default()
            };
            let got: Vec<u32> = nucleus(&scores, &p).iter().map(|c| c.0).collect();
            let want = nucleus_by_full_sort(&scores, &p);
            if p.top_p >= 1.0 && p.min_p <= 0.0 {
                // Everything is kept, in no particular order.
                let (mut g, mut w) = (got.clone(), want.clone());
                g.sort_unstable();
                w.sort_unstable();
                assert_eq!(g, w, "case {case}");
            } else {
                // The boundary token can differ only where f32 and f64 sums disagree.
                let n = got.len().min(want.len());
                assert_eq!(got[..n], want[..n], "case {case}: {p:?}");
                assert!(
                    got.len().abs_diff(want.len()) <= 1,
                    "case {case}: {} vs {}",
                    got.len(),
                    want.len()
                );
                checked += 1;
            }
        }
        assert!(checked > 150);
    }

    #[test]
    fn generation_config_sampling_is_read_as_transformers_means_it() {
        let read = |text: &str| {
            SamplingDefaults::from_generation_config(&serde_json::from_str(text).unwrap())
        };
        let sampled = read(
            r#"{"do_sample": true, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.05}"#,
        );
        assert_eq!(
            sampled,
            SamplingDefaults {
                temperature: Some(0.6),
                top_p: Some(0.9),
                top_k: Some(20),
                repetition_penalty: Some(1.05),
            }
        );
        // do_sample false is greedy, whatever the temperature says.
        assert_eq!(
            read(r#"{"do_sample": false, "temperature": 0.6}"#).temperature,
            Some(0.0)
        );
        assert!(read(r#"{"eos_token_id": 2}"#).is_empty());
        // The config's block wins field by field.
        let config = SamplingDefaults {
            temperature: Some(0.2),
            ..SamplingDefaults::default()
        };
        assert_eq!(config.or(sampled).temperature, Some(0.2));
        assert_eq!(config.or(sampled).top_k, Some(20));
    }

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams {
            seed: Some(1),
            ..SamplingParams::default()
        };
        f(&mut p);
        p
    }

    #[test]
    fn greedy_takes_the_argmax_and_reports_logprobs() {
        let mut s = Sampler::new(params(|p| {
            p.temperature = 0.0;
            p.top_logprobs = 2;
        }));
        let out = s.sample(&[0.0, 3.0, 1.0, 3.0], &[], 0);
        assert_eq!(out.token, 1, "ties go to the lowest id");
        let expected = 3.0 - (1.0f32 + 2.0 * 3.0f32.exp() + 1.0f32.exp()).ln();
        assert!((out.logprob - expected).abs() < 1e-6);
        assert_eq!(out.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 3]);
    }

    #[test]
    fn same_seed_same_tokens_different_seed_differs() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(|p| p.seed = Some(seed)));
            (0..40)
                .map(|_| s.sample(&logits, &[], 0).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_top_p_and_min_p_restrict_the_draw() {
        let logits = [5.0, 4.0, 0.0, -1.0, -2.0];
        let draws = |p: SamplingParams| {
            let mut s = Sampler::new(p);
            let mut seen: Vec<u32> = (0..300).map(|_| s.sample(&logits, &[], 0).token).collect();
            seen.sort_unstable();
            seen.dedup();
            seen
        };
        assert_eq!(draws(params(|p| p.top_k = 2)), [0, 1]);
        assert_eq!(draws(params(|p| p.top_k = 1)), [0]);
        // p(0) ≈ 0.72, p(1) ≈ 0.26: top_p 0.9 needs both.
        assert_eq!(draws(params(|p| p.top_p = 0.9)), [0, 1]);
        assert_eq!(draws(params(|p| p.top_p = 0.5)), [0]);
        assert_eq!(draws(params(|p| p.min_p = 0.3)), [0, 1]);
        assert_eq!(draws(params(|p| p.min_p = 0.5)), [0]);
        assert!(draws(params(|_| {})).len() >= 4);
    }

    #[test]
    fn penalties_move_the_greedy_choice() {
        let logits = [2.0, 1.9, -1.0];
        let greedy = |f: fn(&mut SamplingParams), context: &[u32], start| {
            let mut s = Sampler::new(params(|p| {
                p.temperature = 0.0;
                f(p);
            }));
            s.sample(&logits, context, start).token
        };
        assert_eq!(greedy(|_| {}, &[0], 0), 0);
        assert_eq!(greedy(|p| p.repetition_penalty = 1.2, &[0], 0), 1);
        assert_eq!(greedy(|p| p.presence_penalty = 0.5, &[0], 0), 1);
        // Presence and frequency penalties count only the output, not the prompt.
        assert_eq!(greedy(|p| p.presence_penalty = 0.5, &[0], 1), 0);
        assert_eq!(greedy(|p| p.frequency_penalty = 0.06, &[0, 0], 0), 1);
        assert_eq!(greedy(|p| p.frequency_penalty = 0.06, &[0], 0), 0);
    }

    #[test]
    fn tiny_temperatures_and_non_finite_logits_pick_the_likely_token() {
        let mut s = Sampler::new(params(|p| p.temperature = 1e-39));
        assert_eq!(s.sample(&[0.0, 5.0, 1.0], &[], 0).token, 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, 3.0]), 2);
        let mut s = Sampler::new(params(|_| {}));
        for _ in 0..20 {
            assert_eq!(s.sample(&[f32::NAN, f32::INFINITY, 1.0], &[], 0).token, 1);
        }
    }

    #[test]
    fn validation_names_fields_and_ranges() {
        let bad = SamplingParams {
            temperature: -1.0,
            top_p: 0.0,
            top_logprobs: 50,
            ..SamplingParams::default()
        };
        let problems = bad.validate().join("\n");
        assert!(problems.contains("temperature is -1"), "{problems}");
        assert!(problems.contains("top_p is 0"), "{problems}");
        assert!(problems.contains("top_logprobs is 50"), "{problems}");
        assert!(SamplingParams::default().validate().is_empty());
    }
}
