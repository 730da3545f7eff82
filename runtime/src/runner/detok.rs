//! Turning generated token ids into streamed text: incremental detokenization that never
//! emits half a UTF-8 character, and stop strings that are never partly emitted.
//!
//! Pure: ids in, text deltas out. Decoding the whole output each time keeps tokenizer-level
//! merges (spaces, byte sequences) exact; outputs are short enough that this is cheap.

use crate::tokenizer::Tokenizer;

/// Streams the text of generated tokens and watches for stop strings.
#[derive(Debug)]
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Tokens before `prefix_offset` are settled; `prefix_offset..read_offset` is the context
    /// decoded again so tokenizer-level merges (a leading space, a byte sequence) come out
    /// right (the scheme vLLM uses). Work per token is bounded by this window, not the output.
    prefix_offset: usize,
    read_offset: usize,
    /// All text decoded so far, and how much of it has been emitted.
    text: String,
    emitted: usize,
    stop: Vec<String>,
    longest_stop: usize,
    /// Set when the tokenizer crashed on this output: the request must end with this error.
    crashed: Option<String>,
}

/// What one more token produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    /// Text safe to show now (may be empty while a character or a possible stop string is pending).
    pub text: String,
    /// A stop string was found: generation ends, and `text` ends just before it.
    pub stopped: bool,
}

/// Largest byte index `<= i` on a character boundary of `s`.
fn floor_char_boundary(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

impl Detokenizer {
    pub fn new(stop: Vec<String>) -> Self {
        let stop: Vec<String> = stop.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            text: String::new(),
            emitted: 0,
            longest_stop: stop.iter().map(String::len).max().unwrap_or(0),
            stop,
            crashed: None,
        }
    }

    /// The tokenizer's crash on this output, if it crashed (taken once).
    pub fn take_crash(&mut self) -> Option<String> {
        self.crashed.take()
    }

    /// Adds a token and returns the text that can be emitted now.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Delta {
        self.ids.push(id);
        self.settle(tokenizer, false);
        self.release(false)
    }

    /// Moves the text of the pending window into `text`. An incomplete character decodes as
    /// U+FFFD (one per byte with byte-fallback tokenizers): unless `force`, wait for the rest.
    fn settle(&mut self, tokenizer: &Tokenizer, force: bool) {
        let mut decode = |ids: &[u32]| match tokenizer.decode(ids, true) {
            Ok(text) => text,
            Err(e) => {
                if e.is_crash() {
                    self.crashed.get_or_insert_with(|| e.to_string());
                }
                String::new()
            }
        };
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = decode(&self.ids[self.prefix_offset..]);
        if full.len() > prefix.len() && (force || !full.ends_with('\u{FFFD}')) {
            let new = match full.strip_prefix(prefix.as_str()) {
                Some(rest) => rest,
                None => full
                    .get(floor_char_boundary(&full, prefix.len())..)
                    .unwrap_or_default(),
            };
            self.text.push_str(new);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
        }
    }

    /// Decides what of `text` past `emitted` can go out, watching for stop strings.
    fn release(&mut self, at_end: bool) -> Delta {
        // A stop string may span tokens: search from before the emitted point by its length.
        let from = floor_char_boundary(&self.text, self.emitted.saturating_sub(self.longest_stop));
        let tail = self.text.get(from..).unwrap_or_default();
        let found = self
            .stop
            .iter()
            .filter_map(|s| tail.find(s.as_str()).map(|i| from + i))
            .min();
        if let Some(at) = found {
            let at = at.max(self.emitted);
            let text = self
                .text
                .get(self.emitted..at)
                .unwrap_or_default()
                .to_owned();
            self.emitted = at;
            return Delta {
                text,
                stopped: true,
            };
        }
        // Hold back a tail that could still become a stop string.
        let mut end = self.text.len();
        if !at_end {
            for s in &self.stop {
                for k in (1..s.len()).rev() {
                    if s.is_char_boundary(k) && self.text.ends_with(&s[..k]) {
                        end = end.min(self.text.len() - k);
                        break;
                    }
                }
            }
        }
        let end = floor_char_boundary(&self.text, end.max(self.emitted));
        let text = self
            .text
            .get(self.emitted..end)
            .unwrap_or_default()
            .to_owned();
        self.emitted = self.emitted.max(end);
        Delta {
            text,
            stopped: false,
        }
    }

    /// Text held back at the end of generation: a stop-string prefix that never completed,
    /// and bytes that never completed a character (shown as U+FFFD, as a full decode would).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> String {
        self.settle(tokenizer, true);
        self.release(true).text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_tok() -> Tokenizer {
        Tokenizer::byte_level(&["<|im_end|>"]).unwrap()
    }

    fn run(stop: &[&str], text: &str) -> (Vec<String>, bool, String) {
        let t = bytes_tok();
        let mut d = Detokenizer::new(stop.iter().map(|s| s.to_string()).collect());
        let mut deltas = Vec::new();
        let mut stopped = false;
        for id in t.encode(text).unwrap() {
            let delta = d.push(&t, id);
            deltas.push(delta.text);
            if delta.stopped {
                stopped = true;
                break;
            }
        }
        let rest = if stopped { String::new() } else { d.finish(&t) };
        (deltas, stopped, rest)
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        let (deltas, _, rest) = run(&[], "é東🙂");
        assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')), "{deltas:?}");
        assert_eq!(deltas.concat() + &rest, "é東🙂");
        // The 4-byte emoji appears at once, on its last byte.
        assert_eq!(deltas.iter().filter(|d| !d.is_empty()).count(), 3);
    }

    #[test]
    fn stop_strings_end_generation_and_are_not_emitted() {
        let (deltas, stopped, _) = run(&["STOP"], "abcSTOPdef");
        assert!(stopped);
        assert_eq!(deltas.concat(), "abc");
        // A prefix of the stop string is held back while it could still match...
        let (deltas, stopped, rest) = run(&["STOP"], "abST");
        assert!(!stopped);
        assert_eq!(deltas.concat(), "ab");
        // ...and released at the end when it did not.
        assert_eq!(rest, "ST");
    }

    #[test]
    fn byte_fallback_tokenizers_never_split_or_lose_characters() {
        // A Llama-2 style tokenizer: unknown characters become <0xNN> byte tokens, and the
        // decoder writes one U+FFFD per incomplete byte.
        let spec = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": true, "ignore_merges": false,
                      "vocab": (0..256u32).map(|b| (format!("<0x{b:02X}>"), serde_json::json!(b))).chain([("a".to_string(), serde_json::json!(256)), ("b".to_string(), serde_json::json!(257))])
                          .collect::<serde_json::Map<String, serde_json::Value>>(),
                      "merges": []},
        });
        let t = Tokenizer::from_json(&spec.to_string()).unwrap();
        let mut d = Detokenizer::new(vec![]);
        let mut out = String::new();
        let ids: Vec<u32> = [256u32]
            .into_iter()
            .chain("🙂é".bytes().map(u32::from))
            .chain([257])
            .collect();
        for id in ids {
            let delta = d.push(&t, id);
            assert!(!delta.text.contains('\u{FFFD}'), "{delta:?}");
            out.push_str(&delta.text);
        }
        out.push_str(&d.finish(&t));
        assert_eq!(out, "a🙂éb");
    }

    #[test]
    fn the_earliest_of_several_stop_strings_wins() {
        let (deltas, stopped, _) = run(&["\n\n", "C"], "ab\n\nC");
        assert!(stopped);
        assert_eq!(deltas.concat(), "ab");
    }

    #[test]
    fn a_tokenizer_crash_ends_the_request_with_its_error() {
        // A `Strip` decoder asked to strip more than a token holds panics inside the crate.
        let tokenizer = Tokenizer::from_json(
            r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":null,"pre_tokenizer":null,"post_processor":null,
            "decoder":{"type":"Strip","content":" ","start":5,"stop":5},
            "model":{"type":"WordLevel","vocab":{" ":0,"a":1,"[UNK]":2},"unk_token":"[UNK]"}}"#,
        )
        .unwrap();
        let mut d = Detokenizer::new(Vec::new());
        assert_eq!(d.push(&tokenizer, 1).text, "a");
        assert!(d.take_crash().is_none());
        d.push(&tokenizer, 0);
        let crash = d.take_crash().expect("the crash is reported");
        assert!(crash.contains("failed while decoding"), "{crash}");
    }
}
