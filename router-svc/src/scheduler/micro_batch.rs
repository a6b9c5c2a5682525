//! A large step as two micro-batches driven together (MegaScale-Infer's
//! ping-pong): while one waits for its experts, the other's attention runs
//! on the scheduler's thread, so neither the router nor the experts sit
//! idle for a whole phase.

use attention_svc::{Engine, MoeLayer, SequenceChunk};

use crate::RouterError;

/// Runs `chunks` as one batch, or, from `min_tokens` tokens on, as two
/// micro-batches of about half the tokens each, polled together on this
/// thread. A decode-only step always runs whole: splitting it would read
/// every expert's weights twice for rows that cost little else. Returns
/// each chunk's logits, in order.
pub(super) async fn run_micro_batches<M: MoeLayer<Error = RouterError>>(
    engine: &Engine,
    chunks: &mut [SequenceChunk<'_>],
    decode_only: bool,
    min_tokens: usize,
    moe: &M,
) -> Result<Vec<Vec<f32>>, RouterError> {
    let logits = |tensor: candle_core::Tensor| -> Result<Vec<Vec<f32>>, RouterError> {
        Ok(tensor.to_vec2::<f32>()?)
    };
    let split = split_point(chunks, decode_only, min_tokens);
    if split == 0 {
        return logits(engine.step(chunks, moe).await?);
    }
    let (first, second) = chunks.split_at_mut(split);
    let (first, second) = futures::join!(engine.step(first, moe), engine.step(second, moe));
    let mut all = logits(first?)?;
    all.extend(logits(second?)?);
    Ok(all)
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
    fn decode_only_steps_are_never_split() {
        assert_eq!(split_of_step(&[1; 300], false, 256), 150);
        assert_eq!(split_of_step(&[1; 300], true, 256), 0);
    }
}
