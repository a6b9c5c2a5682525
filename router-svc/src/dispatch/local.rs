//! The in-process mode: every expert's kernels in the router's own process,
//! no network. The reference the distributed mode is tested and benchmarked
//! against.

use candle_core::{Device, Tensor};
use expert_svc::ExpertWeights;
use moe_model::{Checkpoint, ModelError};

use super::ExpertBackend;
use crate::RouterError;

pub struct LocalExperts {
    experts: Vec<ExpertWeights>,
}

impl LocalExperts {
    pub fn load(checkpoint: &Checkpoint, device: &Device) -> Result<Self, ModelError> {
        let config = checkpoint.config();
        let experts = (0..config.num_local_experts)
            .map(|expert| {
                ExpertWeights::load(checkpoint, expert, 0..config.num_hidden_layers, device)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { experts })
    }
}

impl ExpertBackend for LocalExperts {
    async fn run(&self, expert: usize, layer: usize, rows: Tensor) -> Result<Tensor, RouterError> {
        Ok(self.experts[expert].forward(layer, &rows)?)
    }
}
