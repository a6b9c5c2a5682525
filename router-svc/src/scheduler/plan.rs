//! Which tokens each running sequence feeds the next step: a plain function
//! of the sequences' progress and the step's token budget, so its rules are
//! tested without an engine.
//!
//! Decode tokens go first, one per decoding sequence: they are what a
//! client waiting for its next token is waiting for, and each costs one
//! token of the budget. Prompt chunks take what the budget leaves, in
//! arrival order; a prompt longer than that is split across steps.

/// What a running sequence needs from the next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending<'a> {
    /// Prompt tokens not yet in its KV cache.
    Prompt(&'a [u32]),
    /// The token it sampled last, which the next step decodes from.
    Decode(u32),
}

/// One running sequence as the planner sees it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub pending: Pending<'a>,
    /// Whether its client has room for what the step would send; a client
    /// that is behind sits the step out rather than buffering without
    /// bound.
    pub client_ready: bool,
}

/// The tokens one sequence feeds a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Index of the sequence among the candidates.
    pub sequence: usize,
    pub tokens: Vec<u32>,
    /// A decode token rather than prompt tokens.
    pub decode: bool,
}

/// Plans a step of at most `budget` tokens over `candidates`, in their
/// order (the order the engine keeps their caches in).
pub fn plan_step(candidates: &[Candidate<'_>], budget: usize) -> Vec<Chunk> {
    let mut left = budget;
    let mut chunks = Vec::new();
    let ready = || {
        candidates
            .iter()
            .enumerate()
            .filter(|(_, candidate)| candidate.client_ready)
    };
    for (sequence, candidate) in ready() {
        if left == 0 {
            break;
        }
        if let Pending::Decode(token) = candidate.pending {
            chunks.push(Chunk {
                sequence,
                tokens: vec![token],
                decode: true,
            });
            left -= 1;
        }
    }
    for (sequence, candidate) in ready() {
        if left == 0 {
            break;
        }
        if let Pending::Prompt(prompt) = candidate.pending {
            let take = prompt.len().min(left);
            chunks.push(Chunk {
                sequence,
                tokens: prompt[..take].to_vec(),
                decode: false,
            });
            left -= take;
        }
    }
    chunks.sort_by_key(|chunk| chunk.sequence);
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode<'a>(token: u32) -> Candidate<'a> {
        Candidate {
            pending: Pending::Decode(token),
            client_ready: true,
        }
    }

    fn prompt(tokens: &[u32]) -> Candidate<'_> {
        Candidate {
            pending: Pending::Prompt(tokens),
            client_ready: true,
        }
    }

    fn tokens(chunks: &[Chunk]) -> usize {
        chunks.iter().map(|chunk| chunk.tokens.len()).sum()
    }

    #[test]
    fn a_budget_exactly_met_takes_every_token() {
        let long: Vec<u32> = (0..6).collect();
        let candidates = [decode(7), prompt(&long), decode(9)];
        let chunks = plan_step(&candidates, 8);
        assert_eq!(tokens(&chunks), 8);
        assert_eq!(
            chunks,
            [
                Chunk {
                    sequence: 0,
                    tokens: vec![7],
                    decode: true,
                },
                Chunk {
                    sequence: 1,
                    tokens: long.clone(),
                    decode: false,
                },
                Chunk {
                    sequence: 2,
                    tokens: vec![9],
                    decode: true,
                },
            ]
        );
    }

    #[test]
    fn a_prompt_longer_than_the_budget_is_split_across_steps() {
        let long: Vec<u32> = (0..10).collect();
        let mut prefilled = 0;
        let mut steps = Vec::new();
        while prefilled < long.len() {
            let chunks = plan_step(&[prompt(&long[prefilled..])], 4);
            assert_eq!(chunks.len(), 1);
            prefilled += chunks[0].tokens.len();
            steps.push(chunks[0].tokens.clone());
        }
        assert_eq!(steps, [vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]);
    }

    #[test]
    fn decodes_are_never_starved_by_prefill() {
        let long: Vec<u32> = (0..1000).collect();
        // The prompt arrived first, but every decode still gets its token,
        // and the prompt gets only what they leave.
        let mut candidates = vec![prompt(&long)];
        candidates.extend((0..5).map(decode));
        let chunks = plan_step(&candidates, 16);
        assert_eq!(tokens(&chunks), 16);
        assert_eq!(chunks[0].tokens.len(), 11, "the prompt takes the rest");
        for (sequence, chunk) in chunks.iter().enumerate().skip(1) {
            assert_eq!(chunk.sequence, sequence);
            assert_eq!(chunk.tokens.len(), 1);
        }
        // With fewer tokens than decoders, only decodes run.
        let chunks = plan_step(&candidates, 3);
        assert_eq!(chunks.len(), 3);
        assert!(chunks.iter().all(|chunk| chunk.sequence > 0));
    }

    #[test]
    fn prompts_are_served_in_arrival_order() {
        let (first, second) = ([1u32; 5], [2u32; 5]);
        let chunks = plan_step(&[prompt(&first), prompt(&second)], 7);
        assert_eq!(chunks[0].tokens, first);
        assert_eq!(chunks[1].tokens, [2, 2]);
    }

    #[test]
    fn a_client_that_is_behind_sits_the_step_out() {
        let waiting = Candidate {
            client_ready: false,
            ..decode(3)
        };
        let chunks = plan_step(&[waiting, decode(4)], 8);
        assert_eq!(
            chunks,
            [Chunk {
                sequence: 1,
                tokens: vec![4],
                decode: true,
            }]
        );
        assert!(plan_step(&[waiting], 8).is_empty());
    }
}
