//! The shared parameters, loaded from the checkpoint: everything except the
//! experts and the gate (which the router owns).

use candle_core::{DType, Device, Tensor};
use moe_model::{Checkpoint, ModelError, layout};

/// Matrices are kept as `[in, out]` ([`Checkpoint::load_transposed`]), so
/// that products read them in order.
pub struct LayerWeights {
    pub input_norm: Tensor,
    /// q, k and v projections side by side: `[hidden, (heads + 2 kv_heads)
    /// * head_dim]`, one product for all three.
    pub qkv: Tensor,
    pub o_proj: Tensor,
    pub post_attention_norm: Tensor,
}

pub struct SharedWeights {
    pub embed_tokens: Tensor,
    pub layers: Vec<LayerWeights>,
    pub final_norm: Tensor,
    /// `[hidden, vocab]`.
    pub lm_head: Tensor,
}

impl SharedWeights {
    /// Checks the checkpoint holds every shared tensor with the right shape
    /// (naming the first that does not), then loads them onto `device`.
    pub fn load(checkpoint: &Checkpoint, device: &Device) -> Result<Self, ModelError> {
        Self::load_as(checkpoint, device, DType::F32)
    }

    /// [`SharedWeights::load`] as `dtype`.
    pub fn load_as(
        checkpoint: &Checkpoint,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        let config = checkpoint.config();
        checkpoint.verify(&layout::shared_tensors(config))?;
        let load = |name: String| checkpoint.load_as(&name, device, dtype);
        let load_transposed = |name: String| checkpoint.load_transposed_as(&name, device, dtype);
        let layers = (0..config.num_hidden_layers)
            .map(|layer| {
                let qkv = Tensor::cat(
                    &[
                        load_transposed(layout::attention(layer, "q_proj"))?,
                        load_transposed(layout::attention(layer, "k_proj"))?,
                        load_transposed(layout::attention(layer, "v_proj"))?,
                    ],
                    1,
                )?;
                Ok(LayerWeights {
                    input_norm: load(layout::input_layernorm(layer))?,
                    qkv,
                    o_proj: load_transposed(layout::attention(layer, "o_proj"))?,
                    post_attention_norm: load(layout::post_attention_layernorm(layer))?,
                })
            })
            .collect::<Result<_, ModelError>>()?;
        Ok(Self {
            embed_tokens: load(layout::embed_tokens())?,
            layers,
            final_norm: load(layout::final_norm())?,
            lm_head: load_transposed(checkpoint.lm_head_name())?,
        })
    }
}
