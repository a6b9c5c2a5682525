//! Attention of decode rows (one new token per sequence) on CPU, straight
//! over the KV cache buffers, all sequences of a step at once.
//!
//! Through candle, one decode row costs about ten small tensor operations
//! per layer, each allocating, and they dominated a decode step
//! (docs/decisions.md). Here a row is a few dot products
//! over its own context, and rows run in parallel on the rayon pool: a
//! step's cost is the sum of its sequences' contexts, with no padding to
//! the longest.

use rayon::prelude::*;

/// One sequence's decode row and the cached context it attends to (the row
/// itself is the last cached position).
pub struct DecodeRow<'a> {
    /// `[heads, head_dim]`, rotary already applied.
    pub query: &'a [f32],
    /// `[context, kv_heads, head_dim]`: the sequence's cache of this layer.
    pub keys: &'a [f32],
    pub values: &'a [f32],
}

#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Writes each row's attention output, `[heads * head_dim]`, into
/// consecutive slices of `output`.
pub fn attend_decode_rows(rows: &[DecodeRow<'_>], shape: Heads, output: &mut [f32]) {
    let width = shape.heads * shape.head_dim;
    let wide = moe_model::cpu_has_avx2_fma();
    output
        .par_chunks_mut(width)
        .zip(rows.par_iter())
        .for_each(|(out, row)| {
            #[cfg(target_arch = "x86_64")]
            if wide {
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                unsafe { attend_one_avx2(row, shape, out) };
                return;
            }
            let _ = wide;
            attend_one(row, shape, out)
        });
}

/// The same loops compiled for AVX2 and FMA: 8-wide where the portable
/// build (baseline x86-64) is 4-wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_one_avx2(row: &DecodeRow<'_>, shape: Heads, out: &mut [f32]) {
    attend_one(row, shape, out)
}

#[inline(always)]
fn attend_one(row: &DecodeRow<'_>, shape: Heads, out: &mut [f32]) {
    let Heads {
        heads,
        kv_heads,
        head_dim,
    } = shape;
    let group = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let position_width = kv_heads * head_dim;
    let context = row.keys.len() / position_width;
    let mut scores = vec![0f32; context];
    for head in 0..heads {
        // Heads h = g * group + j share kv head g (transformers' repeat_kv).
        let kv = head / group;
        let query = &row.query[head * head_dim..(head + 1) * head_dim];
        let head_range = kv * head_dim..(kv + 1) * head_dim;
        let keys = row
            .keys
            .chunks_exact(position_width)
            .map(|position| &position[head_range.clone()]);
        let values = row
            .values
            .chunks_exact(position_width)
            .map(|position| &position[head_range.clone()]);
        let mut max = f32::NEG_INFINITY;
        for (score, key) in scores.iter_mut().zip(keys) {
            *score = dot(query, key) * scale;
            max = max.max(*score);
        }
        let mut total = 0f32;
        for score in scores.iter_mut() {
            *score = (*score - max).exp();
            total += *score;
        }
        let out = &mut out[head * head_dim..(head + 1) * head_dim];
        out.fill(0.0);
        for (&weight, value) in scores.iter().zip(values) {
            let weight = weight / total;
            for (o, v) in out.iter_mut().zip(value) {
                *o = weight.mul_add(*v, *o);
            }
        }
    }
}

/// Eight independent partial sums, so the compiler keeps them in vector
/// registers rather than serialising on one accumulator.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut partial = [0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for lane in 0..8 {
            partial[lane] = x[lane].mul_add(y[lane], partial[lane]);
        }
    }
    partial.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::SequenceCache;

    /// The kernel against the candle path it replaces, on GQA shapes with
    /// contexts of different lengths in one call.
    #[test]
    fn matches_candle_attention() {
        let device = Device::Cpu;
        let shape = Heads {
            heads: 4,
            kv_heads: 2,
            head_dim: 12,
        };
        let contexts = [1usize, 7, 16];
        let caches: Vec<(Vec<f32>, SequenceCache)> = contexts
            .iter()
            .map(|&context| {
                let randn = |n: usize| {
                    Tensor::randn(0f32, 1.0, n, &device)
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                };
                let width = shape.kv_heads * shape.head_dim;
                let mut cache = SequenceCache::new(1, shape.kv_heads, shape.head_dim);
                cache.append(0, &randn(context * width), &randn(context * width));
                cache.advance(context);
                (randn(shape.heads * shape.head_dim), cache)
            })
            .collect();
        let rows: Vec<DecodeRow<'_>> = caches
            .iter()
            .map(|(query, cache)| {
                let (keys, values) = cache.layer(0);
                DecodeRow {
                    query,
                    keys,
                    values,
                }
            })
            .collect();
        let width = shape.heads * shape.head_dim;
        let mut output = vec![0f32; rows.len() * width];
        attend_decode_rows(&rows, shape, &mut output);
        for (index, (query, cache)) in caches.iter().enumerate() {
            let q = Tensor::from_slice(query, (1, shape.heads, shape.head_dim), &device).unwrap();
            let (keys, values) = cache.tensors(0, shape.kv_heads, &device).unwrap();
            let expected = crate::attention::attend(&q, &keys, &values)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let got = &output[index * width..(index + 1) * width];
            for (g, e) in got.iter().zip(&expected) {
                assert!(
                    (g - e).abs() < 1e-5,
                    "context {}: {g} vs {e}",
                    contexts[index]
                );
            }
        }
    }
}
