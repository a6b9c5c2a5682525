//! Causal grouped-query attention of one sequence's new rows against its
//! cached context. Cost grows with that sequence's own context only, so a
//! step's attention costs the sum of its sequences' contexts, not the batch
//! size times the longest one.

use candle_core::Tensor;

/// Attention output `[n, heads * head_dim]` for `q` of shape
/// `[n, heads, head_dim]`, the new rows sitting at the end of `keys` and
/// `values` (`[kv_heads, context, head_dim]`).
pub fn attend(q: &Tensor, keys: &Tensor, values: &Tensor) -> candle_core::Result<Tensor> {
    let (n, heads, head_dim) = q.dims3()?;
    let (kv_heads, context, _) = keys.dims3()?;
    let group = heads / kv_heads;
    // Heads h = g * group + j share kv head g (transformers' repeat_kv), so
    // folding each group's queries into one matrix needs no copy of K or V.
    let q = q
        .transpose(0, 1)?
        .contiguous()?
        .reshape((kv_heads, group * n, head_dim))?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let scores = (q.matmul(&keys.t()?)? * scale)?;
    let scores = if n > 1 {
        let mask = causal_mask(n, context, q.device())?.to_dtype(scores.dtype())?;
        scores
            .reshape((kv_heads, group, n, context))?
            .broadcast_add(&mask)?
            .reshape((kv_heads, group * n, context))?
    } else {
        scores
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs
        .matmul(values)?
        .reshape((heads, n, head_dim))?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((n, heads * head_dim))
}

/// `[n, context]`: 0 where new row `i` (at position `context - n + i`) may
/// look, -inf at the positions after it.
fn causal_mask(
    n: usize,
    context: usize,
    device: &candle_core::Device,
) -> candle_core::Result<Tensor> {
    let offset = context - n;
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| {
            (0..context).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (n, context), device)
}
