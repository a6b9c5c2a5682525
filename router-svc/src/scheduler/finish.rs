//! When a sequence stops, decided after each sampled token: a plain
//! function, so every rule is tested without an engine.
//!
//! Two more ways to stop are not decided here: a stop string is found in
//! the text, by the request's relay task (`detokenizer::StopMatcher`), and
//! a client that leaves cancels its sequence. Both close the sequence's
//! event channel, which the scheduler reads as cancelled.

/// Why the scheduler ended a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// `max_tokens` generated, or the context is full.
    Length,
    /// The model sampled an end-of-sequence token.
    Eos,
}

/// What a request may generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_tokens: usize,
    pub prompt_tokens: usize,
    /// The model's context length: prompt plus generated tokens at most.
    pub context: usize,
    /// False when the client asked to ignore end-of-sequence tokens.
    pub stop_at_eos: bool,
}

/// What to do with a token just sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterToken {
    /// Send it; the sequence goes on.
    Continue,
    /// Send it, then end the sequence.
    SendThenFinish(Finish),
    /// End the sequence without sending it (an end-of-sequence token is
    /// not text the client asked for).
    FinishWithoutIt(Finish),
}

impl Limits {
    /// The rule for `token`, the `generated`-th token of the sequence
    /// (counting from 1). End-of-sequence wins over length: a sequence that
    /// samples EOS as its last allowed token ends with `Eos`.
    pub fn after_token(&self, token: u32, generated: usize, eos_tokens: &[u32]) -> AfterToken {
        if self.stop_at_eos && eos_tokens.contains(&token) {
            return AfterToken::FinishWithoutIt(Finish::Eos);
        }
        let context_full = self.prompt_tokens + generated >= self.context;
        if generated >= self.max_tokens || context_full {
            return AfterToken::SendThenFinish(Finish::Length);
        }
        AfterToken::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EOS: [u32; 2] = [2, 9];

    fn limits() -> Limits {
        Limits {
            max_tokens: 4,
            prompt_tokens: 3,
            context: 100,
            stop_at_eos: true,
        }
    }

    #[test]
    fn tokens_before_the_limit_continue() {
        for generated in 1..4 {
            assert_eq!(
                limits().after_token(5, generated, &EOS),
                AfterToken::Continue
            );
        }
    }

    #[test]
    fn the_last_allowed_token_is_sent_then_the_sequence_ends_with_length() {
        assert_eq!(
            limits().after_token(5, 4, &EOS),
            AfterToken::SendThenFinish(Finish::Length)
        );
    }

    #[test]
    fn any_eos_token_ends_without_being_sent() {
        for token in EOS {
            assert_eq!(
                limits().after_token(token, 1, &EOS),
                AfterToken::FinishWithoutIt(Finish::Eos)
            );
        }
        assert_eq!(
            limits().after_token(9, 4, &EOS),
            AfterToken::FinishWithoutIt(Finish::Eos),
            "EOS wins over length"
        );
    }

    #[test]
    fn ignore_eos_sends_eos_tokens_as_text() {
        let limits = Limits {
            stop_at_eos: false,
            ..limits()
        };
        assert_eq!(limits.after_token(2, 1, &EOS), AfterToken::Continue);
    }

    #[test]
    fn a_full_context_ends_with_length_before_max_tokens() {
        let limits = Limits {
            max_tokens: 50,
            prompt_tokens: 8,
            context: 10,
            stop_at_eos: true,
        };
        assert_eq!(limits.after_token(5, 1, &EOS), AfterToken::Continue);
        assert_eq!(
            limits.after_token(5, 2, &EOS),
            AfterToken::SendThenFinish(Finish::Length)
        );
    }
}
