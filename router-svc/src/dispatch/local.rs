//! The in-process mode: every expert's kernels in the router's own process,
//! no network. The reference the distributed mode is tested and benchmarked
//! against.
//!
//! A layer's expert products run in parallel on the compute pool (one
//! expert per thread at a time, as one expert process would), rather than
//! one after another on the scheduler's thread: few-row products are
//! single-threaded, so running them in turn would leave cores idle.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use expert_svc::ExpertWeights;
use moe_model::{Checkpoint, ModelError};

use super::ExpertBackend;
use crate::RouterError;

pub struct LocalExperts {
    experts: Arc<Vec<ExpertWeights>>,
    hidden_size: usize,
    device: Device,
}

impl LocalExperts {
    pub fn load(checkpoint: &Checkpoint, device: &Device) -> Result<Self, ModelError> {
        let config = checkpoint.config();
        let experts = (0..config.num_local_experts)
            .map(|expert| {
                ExpertWeights::load(checkpoint, expert, 0..config.num_hidden_layers, device)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            experts: Arc::new(experts),
            hidden_size: config.hidden_size,
            device: device.clone(),
        })
    }
}

impl ExpertBackend for LocalExperts {
    async fn run(
        &self,
        expert: usize,
        layer: usize,
        rows: Vec<f32>,
    ) -> Result<Vec<f32>, RouterError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let experts = self.experts.clone();
        let shape = (rows.len() / self.hidden_size, self.hidden_size);
        let device = self.device.clone();
        rayon::spawn(move || {
            let output = Tensor::from_vec(rows, shape, &device)
                .and_then(|rows| experts[expert].forward(layer, &rows))
                .and_then(|output| output.flatten_all()?.to_vec1::<f32>());
            let _ = reply.send(output);
        });
        let output = answer
            .await
            .map_err(|_| RouterError::Internal("an expert product panicked".into()))?;
        Ok(output?)
    }
}
