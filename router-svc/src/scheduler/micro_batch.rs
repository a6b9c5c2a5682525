//! A large step as two micro-batches driven together (MegaScale-Infer's
//! ping-pong): while one waits for its experts, the other's attention runs
//! on the scheduler's thread, so neither the router nor the experts sit
//! idle for a whole phase.

use attention_svc::{Engine, SequenceChunk};

use crate::RouterError;
use crate::dispatch::{Reporting, RowOutcomes, StepMoe};

/// A step's results: each chunk's logits, in order, and the chunks whose
/// rows an expert could not serve as the gate asked.
#[derive(Debug, Default)]
pub(super) struct StepOutcome {
    pub(super) logits: Vec<Vec<f32>>,
    /// Chunks to fail, each once, with the first error among its rows.
    pub(super) failed: Vec<(usize, RouterError)>,
    /// Chunks served in part by next-best experts, and the missing expert.
    pub(super) rerouted: Vec<(usize, usize)>,
}

/// Runs `chunks` as one batch, or, from `min_tokens` tokens on, as two
/// micro-batches of about half the tokens each, polled together on this
/// thread. A decode-only step always runs whole: splitting it would read
/// every expert's weights twice for rows that cost little else.
pub(super) async fn run_micro_batches<M: StepMoe>(
    engine: &Engine,
    chunks: &mut [SequenceChunk<'_>],
    decode_only: bool,
    min_tokens: usize,
    moe: &M,
) -> Result<StepOutcome, RouterError> {
    let split = split_point(chunks, decode_only, min_tokens);
    let mut outcome = StepOutcome::default();
    if split == 0 {
        let whole = Reporting::new(moe);
        let logits = engine.step(chunks, &whole).await?;
        outcome.logits = logits.to_vec2::<f32>()?;
        outcome.attribute(whole.report.into_outcomes(), &lengths(chunks), 0);
        return Ok(outcome);
    }
    let (first, second) = chunks.split_at_mut(split);
    let (first_moe, second_moe) = (Reporting::new(moe), Reporting::new(moe));
    let (first_logits, second_logits) = futures::join!(
        engine.step(first, &first_moe),
        engine.step(second, &second_moe)
    );
    outcome.logits = first_logits?.to_vec2::<f32>()?;
    outcome.logits.extend(second_logits?.to_vec2::<f32>()?);
    outcome.attribute(first_moe.report.into_outcomes(), &lengths(first), 0);
    outcome.attribute(second_moe.report.into_outcomes(), &lengths(second), split);
    Ok(outcome)
}

fn lengths(chunks: &[SequenceChunk<'_>]) -> Vec<usize> {
    chunks.iter().map(|chunk| chunk.tokens.len()).collect()
}

impl StepOutcome {
    /// Turns a batch's row indices into chunk indices: the batch holds
    /// chunks of `lengths` rows, in order, from chunk `offset` of the step.
    fn attribute(&mut self, rows: RowOutcomes, lengths: &[usize], offset: usize) {
        let ends: Vec<usize> = lengths
            .iter()
            .scan(0, |end, length| {
                *end += length;
                Some(*end)
            })
            .collect();
        let chunk_of = |row: u32| offset + ends.partition_point(|&end| end <= row as usize);
        for (failed_rows, err) in rows.failed {
            for row in failed_rows {
                let chunk = chunk_of(row);
                if !self.failed.iter().any(|(failed, _)| *failed == chunk) {
                    self.failed.push((chunk, err.duplicate()));
                }
            }
        }
        for (rerouted_rows, expert) in rows.rerouted {
            for row in rerouted_rows {
                let entry = (chunk_of(row), expert);
                if !self.rerouted.contains(&entry) {
                    self.rerouted.push(entry);
                }
            }
        }
    }
}

/// Where to cut `chunks` into two micro-batches of about half the tokens
/// each, or 0 to run them as one: a decode-only step, a step below
/// `min_tokens` (0 disables), or one where no cut between chunks leaves
/// each side a quarter of the tokens.
fn split_point(chunks: &[SequenceChunk<'_>], decode_only: bool, min_tokens: usize) -> usize {
    let rows: usize = chunks.iter().map(|chunk| chunk.tokens.len()).sum();
    if decode_only || min_tokens == 0 || rows < min_tokens || chunks.len() < 2 {
        return 0;
    }
    let half = rows / 2;
    let mut before = 0;
    for (index, chunk) in chunks.iter().enumerate() {
        let after = before + chunk.tokens.len();
        if after >= half {
            // Cut before this chunk or after it, whichever is more even.
            let (cut, first) = if after - half <= half - before {
                (index + 1, after)
            } else {
                (index, before)
            };
            // A micro-batch of under a quarter of the tokens overlaps too
            // little to pay for the second pass over the experts.
            let smaller = first.min(rows - first);
            return if smaller * 4 < rows { 0 } else { cut };
        }
        before = after;
    }
    0
}

#[cfg(test)]
mod tests {
    use attention_svc::SequenceCache;

    use super::*;

    fn split_of(lengths: &[usize], min_tokens: usize) -> usize {
        split_of_step(lengths, false, min_tokens)
    }

    fn split_of_step(lengths: &[usize], decode_only: bool, min_tokens: usize) -> usize {
        let tokens: Vec<Vec<u32>> = lengths.iter().map(|&n| vec![0; n]).collect();
        let mut caches: Vec<SequenceCache> = lengths
            .iter()
            .map(|_| SequenceCache::new(1, 1, 1))
            .collect();
        let chunks: Vec<SequenceChunk<'_>> = caches
            .iter_mut()
            .zip(&tokens)
            .map(|(cache, tokens)| SequenceChunk { cache, tokens })
            .collect();
        split_point(&chunks, decode_only, min_tokens)
    }

    #[test]
    fn small_steps_and_single_chunks_are_not_split() {
        assert_eq!(split_of(&[1; 32], 256), 0);
        assert_eq!(split_of(&[300], 256), 0);
        assert_eq!(split_of(&[200, 200], 0), 0);
    }

    #[test]
    fn large_steps_split_near_half_the_tokens() {
        assert_eq!(split_of(&[200, 200], 256), 1);
        assert_eq!(split_of(&[1, 1, 1, 1, 500, 500], 256), 5);
        // Decodes first, then two prompt chunks.
        let mut lengths = vec![1; 32];
        lengths.extend([128, 128, 128, 128, 128, 128, 128, 96]);
        let cut = split_of(&lengths, 256);
        let first: usize = lengths[..cut].iter().sum();
        let total: usize = lengths.iter().sum();
        assert!(
            (first as i64 - total as i64 / 2).abs() <= 64,
            "{first} of {total}"
        );
        // One chunk holds nearly everything: no useful split.
        assert_eq!(split_of(&[1, 1000], 256), 0);
    }

    #[test]
    fn rows_are_attributed_to_the_chunks_that_hold_them() {
        let mut outcome = StepOutcome::default();
        let rows = RowOutcomes {
            failed: vec![
                (vec![0, 4], RouterError::ExpertUnavailable("e1".into())),
                (vec![5], RouterError::ExpertUnavailable("e2".into())),
            ],
            rerouted: vec![(vec![1, 2], 7), (vec![2], 7)],
        };
        // Chunks of 1, 3 and 2 rows, the second micro-batch from chunk 10.
        outcome.attribute(rows, &[1, 3, 2], 10);
        let failed: Vec<(usize, String)> = outcome
            .failed
            .iter()
            .map(|(chunk, err)| (*chunk, err.to_string()))
            .collect();
        assert_eq!(failed, vec![(10, "e1".into()), (12, "e1".into())]);
        assert_eq!(outcome.rerouted, vec![(11, 7)]);
    }

    #[test]
    fn decode_only_steps_are_never_split() {
        assert_eq!(split_of_step(&[1; 300], false, 256), 150);
        assert_eq!(split_of_step(&[1; 300], true, 256), 0);
    }
}
