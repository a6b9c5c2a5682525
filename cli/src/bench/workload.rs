//! What a benchmark sends: a fixed number of requests, each a prompt of a
//! fixed length, chosen deterministically from a seed so that two runs (and
//! two servers) get the same work.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tokenizers::Tokenizer;

#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    /// Requests in flight at once: each client sends its next request as
    /// soon as its previous one finished (a closed loop).
    pub concurrency: usize,
    pub requests: usize,
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    pub seed: u64,
}

/// One request's prompt, as token ids and as the text they decode to (for
/// servers that take text only).
#[derive(Debug, Clone)]
pub struct Prompt {
    pub token_ids: Vec<u32>,
    pub text: Option<String>,
}

impl Workload {
    /// Windows of `prompt_tokens` tokens of the embedded English corpus,
    /// each starting at a word, so that the decoded text tokenises back to
    /// the same ids on any server that uses this tokenizer.
    pub fn prompts_from_corpus(&self, tokenizer: &Tokenizer) -> anyhow::Result<Vec<Prompt>> {
        let encoding = tokenizer
            .encode(moe_model::synth::corpus(), false)
            .map_err(|err| anyhow::anyhow!("cannot tokenise the corpus: {err}"))?;
        let ids = encoding.get_ids();
        let tokens = encoding.get_tokens();
        // Byte-level BPE marks a token that begins with a space with 'Ġ'.
        let starts: Vec<usize> = (0..ids.len().saturating_sub(self.prompt_tokens))
            .filter(|&i| tokens[i].starts_with('Ġ'))
            .collect();
        anyhow::ensure!(
            !starts.is_empty(),
            "the corpus is shorter than {} tokens",
            self.prompt_tokens
        );
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        (0..self.requests)
            .map(|_| {
                let start = starts[rng.random_range(0..starts.len())];
                let token_ids = ids[start..start + self.prompt_tokens].to_vec();
                let text = tokenizer
                    .decode(&token_ids, false)
                    .map_err(|err| anyhow::anyhow!("cannot decode a prompt: {err}"))?;
                Ok(Prompt {
                    token_ids,
                    text: Some(text),
                })
            })
            .collect()
    }

    /// Uniformly random token ids, for a server whose tokenizer we lack.
    pub fn random_prompts(&self, vocab_size: u32) -> Vec<Prompt> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        (0..self.requests)
            .map(|_| Prompt {
                token_ids: (0..self.prompt_tokens)
                    .map(|_| rng.random_range(0..vocab_size))
                    .collect(),
                text: None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(seed: u64) -> Workload {
        Workload {
            concurrency: 2,
            requests: 5,
            prompt_tokens: 40,
            max_tokens: 4,
            seed,
        }
    }

    #[test]
    fn corpus_prompts_have_the_length_asked_and_round_trip() {
        let tokenizer = moe_model::synth::train_tokenizer(300).unwrap();
        let prompts = workload(3).prompts_from_corpus(&tokenizer).unwrap();
        assert_eq!(prompts.len(), 5);
        for prompt in &prompts {
            assert_eq!(prompt.token_ids.len(), 40);
            let text = prompt.text.as_deref().unwrap();
            let again = tokenizer.encode(text, false).unwrap();
            assert_eq!(again.get_ids(), prompt.token_ids.as_slice(), "{text:?}");
        }
        let same = workload(3).prompts_from_corpus(&tokenizer).unwrap();
        assert_eq!(same[4].token_ids, prompts[4].token_ids);
        let other = workload(4).prompts_from_corpus(&tokenizer).unwrap();
        assert_ne!(other[0].token_ids, prompts[0].token_ids);
    }

    #[test]
    fn random_prompts_stay_in_the_vocabulary() {
        let prompts = workload(1).random_prompts(50);
        assert!(prompts.iter().flat_map(|p| &p.token_ids).all(|&id| id < 50));
        assert_eq!(prompts[0].token_ids.len(), 40);
    }
}
