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
    emitted: usize,
    stop: Vec<String>,
    text: String,
}

/// What one more token produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    /// Text safe to show now (may be empty while a character or a possible stop string is pending).
    pub text: String,
    /// A stop string was found: generation ends, and `text` ends just before it.
    pub stopped: bool,
}

impl Detokenizer {
    pub fn new(stop: Vec<String>) -> Self {
        Self {
            ids: Vec::new(),
            emitted: 0,
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            text: String::new(),
        }
    }

    /// Adds a token and returns the text that can be emitted now.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Delta {
        self.ids.push(id);
        self.text = tokenizer.decode(&self.ids, true).unwrap_or_default();
        // Earliest stop string at or after what was already emitted (a stop string may span
        // tokens, so search from before the emitted point by its length).
        let search_from = self
            .emitted
            .saturating_sub(self.stop.iter().map(String::len).max().unwrap_or(0));
        let search_from = floor_char_boundary(&self.text, search_from);
        let found = self
            .stop
            .iter()
            .filter_map(|s| {
                self.text[search_from..]
                    .find(s.as_str())
                    .map(|i| search_from + i)
            })
            .min();
        if let Some(at) = found {
            let at = at.max(self.emitted);
            let text = self.text[self.emitted..at].to_owned();
            self.emitted = at;
            return Delta {
                text,
                stopped: true,
            };
        }
        // Hold back an incomplete character (decoded as U+FFFD) and any tail that could still
        // become a stop string.
        let mut end = self.text.len();
        if self.text.ends_with('\u{FFFD}') {
            end -= '\u{FFFD}'.len_utf8();
        }
        let mut hold = end;
        for s in &self.stop {
            for k in (1..s.len()).rev() {
                if s.is_char_boundary(k) && self.text[..end].ends_with(&s[..k]) {
                    hold = hold.min(end - k);
                    break;
                }
            }
        }
        let end = hold;
        let end = end.max(self.emitted);
        let text = self.text[self.emitted..end].to_owned();
        self.emitted = end;
        Delta {
            text,
            stopped: false,
        }
    }

    /// Text held back at the end of generation (an incomplete stop-string prefix is real text).
    pub fn finish(&mut self) -> String {
        let rest = self.text.get(self.emitted..).unwrap_or_default().to_owned();
        self.emitted = self.text.len();
        rest
    }

    /// Tokens generated so far.
    pub fn tokens(&self) -> &[u32] {
        &self.ids
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
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
        let rest = if stopped { String::new() } else { d.finish() };
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
    fn the_earliest_of_several_stop_strings_wins() {
        let (deltas, stopped, _) = run(&["\n\n", "C"], "ab\n\nC");
        assert!(stopped);
        assert_eq!(deltas.concat(), "ab");
    }
}
