//! Rotary position embeddings, as transformers' Mixtral computes them
//! (non-interleaved halves, `rotate_half`).

use candle_core::{DType, Device, Tensor};
use moe_model::ModelConfig;

/// cos/sin tables for every position up to the context length, computed
/// in f32 and kept in the dtype they rotate (as transformers casts them).
pub struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    pub fn new(config: &ModelConfig, device: &Device, dtype: DType) -> candle_core::Result<Self> {
        let half = config.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                1.0 / config
                    .rope_theta
                    .powf(2.0 * i as f64 / config.head_dim as f64) as f32
            })
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let positions = Tensor::arange(0u32, config.max_position_embeddings as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((config.max_position_embeddings, 1))?;
        let freqs = positions.broadcast_mul(&inv_freq)?;
        Ok(Self {
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
        })
    }

    /// Rotates `x` of shape `[rows, heads, head_dim]`, row `i` being at
    /// position `positions[i]`. Rows of many sequences may be mixed.
    pub fn apply(&self, x: &Tensor, positions: &Tensor) -> candle_core::Result<Tensor> {
        let cos = self.cos.index_select(positions, 0)?;
        let sin = self.sin.index_select(positions, 0)?;
        let (rows, heads, head_dim) = x.dims3()?;
        candle_nn::rotary_emb::rope_thd(&x.reshape((1, rows, heads, head_dim))?, &cos, &sin)?
            .reshape((rows, heads, head_dim))
    }
}
