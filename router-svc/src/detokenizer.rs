//! Text of a growing token sequence, streamed as it grows.
//!
//! Decoding token by token splits multi-byte characters and loses the spaces
//! some decoders add between tokens, so each step decodes a short window and
//! emits only what it added, holding back an incomplete character (the way
//! text-generation-inference does).

use tokenizers::Tokenizer;

/// Prompt tokens kept as context, so the first generated token decodes as
/// it would mid-sentence.
const CONTEXT_TOKENS: usize = 5;

pub struct IncrementalDecoder {
    tokens: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new(prompt: &[u32]) -> Self {
        let context = prompt[prompt.len().saturating_sub(CONTEXT_TOKENS)..].to_vec();
        let read_offset = context.len();
        Self {
            tokens: context,
            prefix_offset: 0,
            read_offset,
        }
    }

    /// Adds `token` and returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> String {
        self.tokens.push(token);
        let decode = |tokens: &[u32]| tokenizer.decode(tokens, false).unwrap_or_default();
        let prefix = decode(&self.tokens[self.prefix_offset..self.read_offset]);
        let text = decode(&self.tokens[self.prefix_offset..]);
        if text.len() > prefix.len()
            && !text.ends_with('\u{FFFD}')
            && text.is_char_boundary(prefix.len())
        {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.tokens.len();
            text[prefix.len()..].to_owned()
        } else {
            String::new()
        }
    }
}

/// Holds back generated text that might be the start of a stop string, and
/// finds the first stop string once it is complete.
pub struct StopMatcher {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            text: String::new(),
            emitted: 0,
        }
    }

    /// Appends `delta`; returns the text now safe to emit, and whether a
    /// stop string was reached (the text then ends before it).
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        let search_from = self.emitted;
        self.text.push_str(delta);
        let hit = self
            .stops
            .iter()
            .filter_map(|stop| {
                self.text[search_from..]
                    .find(stop.as_str())
                    .map(|at| search_from + at)
            })
            .min();
        if let Some(at) = hit {
            let out = self.text[self.emitted..at].to_owned();
            self.emitted = at;
            return (out, true);
        }
        let held = self
            .stops
            .iter()
            .map(|stop| longest_suffix_prefix(&self.text[self.emitted..], stop))
            .max()
            .unwrap_or(0);
        let safe = self.text.len() - held;
        let out = self.text[self.emitted..safe].to_owned();
        self.emitted = safe;
        (out, false)
    }

    /// Whatever was held back, once generation ends for another reason.
    pub fn flush(&mut self) -> String {
        let out = self.text[self.emitted..].to_owned();
        self.emitted = self.text.len();
        out
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n)
                && stop.is_char_boundary(n)
                && text.ends_with(&stop[..n])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_cut_the_text_and_partial_matches_are_held() {
        let mut matcher = StopMatcher::new(vec!["END".into()]);
        assert_eq!(matcher.push("hello E"), ("hello ".into(), false));
        assert_eq!(matcher.push("N"), (String::new(), false));
        assert_eq!(matcher.push("x"), ("ENx".into(), false));
        assert_eq!(matcher.push(" bye ENDING"), (" bye ".into(), true));
    }

    #[test]
    fn flush_releases_held_text() {
        let mut matcher = StopMatcher::new(vec!["stop".into()]);
        assert_eq!(matcher.push("so st"), ("so ".into(), false));
        assert_eq!(matcher.flush(), "st");
    }

    #[test]
    fn incremental_decoding_matches_whole_decoding() {
        let tokenizer = moe_model::synth::train_tokenizer(60).unwrap();
        let text = "Licensed — naïve “quotes” under the License";
        let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
        let mut decoder = IncrementalDecoder::new(&[]);
        let streamed: String = ids.iter().map(|&id| decoder.push(&tokenizer, id)).collect();
        assert_eq!(streamed, text);
    }
}
