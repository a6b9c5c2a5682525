//! The shared parameters, loaded from the checkpoint: everything except the
//! experts and the gate (which the router owns).

use candle_core::{Device, Tensor};
use moe_model::{Checkpoint, ModelError, layout};

pub struct LayerWeights {
    pub input_norm: Tensor,
    pub q_proj: Tensor,
    pub k_proj: Tensor,
    pub v_proj: Tensor,
    pub o_proj: Tensor,
    pub post_attention_norm: Tensor,
}

pub struct SharedWeights {
    pub embed_tokens: Tensor,
    pub layers: Vec<LayerWeights>,
    pub final_norm: Tensor,
    pub lm_head: Tensor,
}

impl SharedWeights {
    /// Checks the checkpoint holds every shared tensor with the right shape
    /// (naming the first that does not), then loads them onto `device`.
    pub fn load(checkpoint: &Checkpoint, device: &Device) -> Result<Self, ModelError> {
        let config = checkpoint.config();
        checkpoint.verify(&layout::shared_tensors(config))?;
        let load = |name: String| checkpoint.load(&name, device);
        let layers = (0..config.num_hidden_layers)
            .map(|layer| {
                Ok(LayerWeights {
                    input_norm: load(layout::input_layernorm(layer))?,
                    q_proj: load(layout::attention(layer, "q_proj"))?,
                    k_proj: load(layout::attention(layer, "k_proj"))?,
                    v_proj: load(layout::attention(layer, "v_proj"))?,
                    o_proj: load(layout::attention(layer, "o_proj"))?,
                    post_attention_norm: load(layout::post_attention_layernorm(layer))?,
                })
            })
            .collect::<Result<_, ModelError>>()?;
        Ok(Self {
            embed_tokens: load(layout::embed_tokens())?,
            layers,
            final_norm: load(layout::final_norm())?,
            lm_head: load(checkpoint.lm_head_name())?,
        })
    }
}
