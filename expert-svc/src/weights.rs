//! One expert's SwiGLU weights for a range of layers: the kernel that both
//! the expert service and the router's in-process mode run.

use std::ops::Range;

use candle_core::{Device, Tensor};
use moe_model::{Checkpoint, ModelError, layout};

/// Kept as `[in, out]` (the checkpoint's `[out, in]` transposed once, at
/// load): `x.matmul(w)` then streams the weights in order, which on CPU is
/// 4-7x faster at a few rows than a product through a transposed view
/// (candle's gemm would gather every column of the weights on each call).
struct LayerWeights {
    /// w1 (gate) and w3 (up) side by side: `[hidden, 2 * intermediate]`,
    /// so one matrix product computes both.
    gate_up: Tensor,
    /// w2: `[intermediate, hidden]`.
    down: Tensor,
}

pub struct ExpertWeights {
    expert: usize,
    layers: Range<usize>,
    intermediate_size: usize,
    weights: Vec<LayerWeights>,
}

impl ExpertWeights {
    /// Checks and loads `expert`'s matrices for `layers`, touching no other
    /// tensor of the checkpoint.
    pub fn load(
        checkpoint: &Checkpoint,
        expert: usize,
        layers: Range<usize>,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let config = checkpoint.config();
        if expert >= config.num_local_experts {
            return Err(ModelError::Config(format!(
                "expert {expert} does not exist: the checkpoint has {} experts",
                config.num_local_experts
            )));
        }
        if layers.is_empty() || layers.end > config.num_hidden_layers {
            return Err(ModelError::Config(format!(
                "layers {}..{} are not a non-empty range within the checkpoint's 0..{}",
                layers.start, layers.end, config.num_hidden_layers
            )));
        }
        checkpoint.verify(&layout::expert_tensors(config, expert, layers.clone()))?;
        let weights = layers
            .clone()
            .map(|layer| {
                let load = |matrix| checkpoint.load(&layout::expert(layer, expert, matrix), device);
                Ok(LayerWeights {
                    gate_up: Tensor::cat(&[load("w1")?, load("w3")?], 0)?
                        .t()?
                        .contiguous()?,
                    down: load("w2")?.t()?.contiguous()?,
                })
            })
            .collect::<Result<_, ModelError>>()?;
        Ok(Self {
            expert,
            layers,
            intermediate_size: config.intermediate_size,
            weights,
        })
    }

    pub fn expert(&self) -> usize {
        self.expert
    }

    pub fn layers(&self) -> Range<usize> {
        self.layers.clone()
    }

    pub fn serves(&self, layer: usize) -> bool {
        self.layers.contains(&layer)
    }

    /// `w2(silu(w1 x) * w3 x)` for `x` of shape `[rows, hidden]`.
    /// `layer` must be one of [`ExpertWeights::layers`].
    pub fn forward(&self, layer: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        let weights = &self.weights[layer - self.layers.start];
        let gate_up = x.matmul(&weights.gate_up)?;
        let gate = gate_up.narrow(1, 0, self.intermediate_size)?;
        let up = gate_up.narrow(1, self.intermediate_size, self.intermediate_size)?;
        (gate.silu()? * up)?.matmul(&weights.down)
    }
}
