//! Attention of a step's decode rows as candle tensor operations only, so
//! that it runs on any candle device: the generic kernels' counterpart of
//! [`crate::decode_attention`] (`--kernels generic`; what a GPU runs).
//!
//! Every decode row attends in one batched product: the rows' cached
//! contexts are copied from the KV cache (host memory, position-major)
//! into one head-major `[rows, kv_heads, longest, head_dim]` buffer padded
//! with zeros, sent to the device once, and the padding is masked out of
//! the softmax.
//! The cost is the longest context times the rows, where the CPU kernel's
//! is the sum of the contexts; in exchange a step's decode attention is a
//! handful of device operations whatever the number of sequences. Prompt
//! chunks go through [`crate::attention::attend`], which is candle already.

use candle_core::Tensor;

/// Attention output `[rows, heads * head_dim]` of the decode rows
/// `queries` (`[rows, heads, head_dim]`, rotary applied), row `i`
/// attending to `contexts[i]`: its keys and values of this layer, each
/// `[context, kv_heads, head_dim]` flattened, the row itself last.
pub fn attend_decode_rows(
    queries: &Tensor,
    contexts: &[(&[f32], &[f32])],
    kv_heads: usize,
) -> candle_core::Result<Tensor> {
    let (rows, heads, head_dim) = queries.dims3()?;
    if contexts.len() != rows {
        candle_core::bail!("{rows} decode rows but {} contexts", contexts.len());
    }
    let group = heads / kv_heads;
    let position_width = kv_heads * head_dim;
    let longest = contexts
        .iter()
        .map(|(keys, _)| keys.len() / position_width)
        .max()
        .unwrap_or(0);
    let mut keys = vec![0f32; rows * longest * position_width];
    let mut values = vec![0f32; rows * longest * position_width];
    let mut mask = vec![0f32; rows * longest];
    for (row, (row_keys, row_values)) in contexts.iter().enumerate() {
        let context = row_keys.len() / position_width;
        let row_start = row * kv_heads * longest * head_dim;
        for (position, (key, value)) in row_keys
            .chunks_exact(position_width)
            .zip(row_values.chunks_exact(position_width))
            .enumerate()
        {
            for head in 0..kv_heads {
                let to = row_start + (head * longest + position) * head_dim;
                let from = head * head_dim..(head + 1) * head_dim;
                keys[to..to + head_dim].copy_from_slice(&key[from.clone()]);
                values[to..to + head_dim].copy_from_slice(&value[from]);
            }
        }
        mask[row * longest + context..(row + 1) * longest].fill(f32::NEG_INFINITY);
    }
    let (device, dtype) = (queries.device(), queries.dtype());
    // In the queries' dtype (the cache holds f32).
    let head_major = |data: Vec<f32>| {
        Tensor::from_vec(data, (rows, kv_heads, longest, head_dim), device)?.to_dtype(dtype)
    };
    let (keys, values) = (head_major(keys)?, head_major(values)?);
    // Heads h = g * group + j share kv head g (transformers' repeat_kv).
    let q = queries
        .contiguous()?
        .reshape((rows, kv_heads, group, head_dim))?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let scores = (q.matmul(&keys.transpose(2, 3)?)? * scale)?;
    let mask = Tensor::from_vec(mask, (rows, 1, 1, longest), device)?.to_dtype(dtype)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
    probs.matmul(&values)?.reshape((rows, heads * head_dim))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::decode_attention::{self, DecodeRow, Heads};

    fn randn(n: usize) -> Vec<f32> {
        Tensor::randn(0f32, 1.0, n, &Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    /// The generic decode attention against the fast CPU kernel, on
    /// random queries and caches of contexts of different lengths in one
    /// call, for MQA, GQA and MHA. Both compute in f32 with different
    /// summation orders: |generic - fast| <= 1e-5.
    #[test]
    fn matches_the_fast_kernel_for_mqa_gqa_and_mha() {
        for (heads, kv_heads, head_dim) in [(4, 1, 16), (8, 2, 12), (4, 4, 8)] {
            let shape = Heads {
                heads,
                kv_heads,
                head_dim,
            };
            let width = kv_heads * head_dim;
            let contexts = [1usize, 9, 40, 3];
            let caches: Vec<(Vec<f32>, Vec<f32>)> = contexts
                .iter()
                .map(|&context| (randn(context * width), randn(context * width)))
                .collect();
            let queries = randn(contexts.len() * heads * head_dim);
            let rows: Vec<DecodeRow<'_>> = caches
                .iter()
                .zip(queries.chunks_exact(heads * head_dim))
                .map(|((keys, values), query)| DecodeRow {
                    query,
                    keys,
                    values,
                })
                .collect();
            let mut expected = vec![0f32; queries.len()];
            decode_attention::attend_decode_rows(&rows, shape, &mut expected);

            let q = Tensor::from_slice(&queries, (contexts.len(), heads, head_dim), &Device::Cpu)
                .unwrap();
            let slices: Vec<(&[f32], &[f32])> = caches
                .iter()
                .map(|(k, v)| (k.as_slice(), v.as_slice()))
                .collect();
            let got = attend_decode_rows(&q, &slices, kv_heads).unwrap();
            assert_eq!(got.dims(), &[contexts.len(), heads * head_dim]);
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                assert!(
                    (g - e).abs() <= 1e-5,
                    "{heads} heads, {kv_heads} kv heads, value {i}: generic {g} vs fast {e}"
                );
            }
        }
    }
}
