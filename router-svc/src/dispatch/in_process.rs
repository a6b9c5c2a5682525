//! The in-process mode: every expert's kernels in the router's own process,
//! no network. The reference the distributed mode is tested and benchmarked
//! against.
//!
//! A layer's expert forward passes run in parallel on a pool of their own
//! (one expert per thread at a time, as one expert process would), rather
//! than one after another on the scheduler's thread: few-row passes are
//! single-threaded, so running them in turn would leave cores idle.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use expert_svc::ExpertWeights;
use moe_model::{Checkpoint, ModelError};

use super::ExpertBackend;
use crate::RouterError;

pub struct InProcessExperts {
    experts: Arc<Vec<ExpertWeights>>,
    /// The expert threads, apart from the scheduler's pool: the scheduler
    /// thread is a worker of that one, and while it waits for a layer's
    /// results it runs no jobs, so passes queued there would get one
    /// thread fewer than the expert processes get.
    pool: rayon::ThreadPool,
    hidden_size: usize,
    device: Device,
}

impl InProcessExperts {
    pub fn load(checkpoint: &Checkpoint, device: &Device) -> Result<Self, RouterError> {
        let config = checkpoint.config();
        let experts = (0..config.num_local_experts)
            .map(|expert| {
                ExpertWeights::load(checkpoint, expert, 0..config.num_hidden_layers, device)
            })
            .collect::<Result<_, ModelError>>()?;
        let pool = rayon::ThreadPoolBuilder::new()
            .thread_name(|index| format!("in-process-expert-{index}"))
            .build()
            .map_err(|err| {
                RouterError::Internal(format!("cannot start the expert threads: {err}"))
            })?;
        Ok(Self {
            experts: Arc::new(experts),
            pool,
            hidden_size: config.hidden_size,
            device: device.clone(),
        })
    }
}

impl ExpertBackend for InProcessExperts {
    async fn run(
        &self,
        expert: usize,
        layer: usize,
        rows: Vec<f32>,
    ) -> Result<Vec<f32>, RouterError> {
        let (reply, result) = tokio::sync::oneshot::channel();
        let experts = self.experts.clone();
        let shape = (rows.len() / self.hidden_size, self.hidden_size);
        let device = self.device.clone();
        self.pool.spawn(move || {
            let output = Tensor::from_vec(rows, shape, &device)
                .and_then(|rows| experts[expert].forward(layer, &rows))
                .and_then(|output| output.flatten_all()?.to_vec1::<f32>());
            let _ = reply.send(output);
        });
        let output = result
            .await
            .map_err(|_| RouterError::Internal("an expert's forward pass panicked".into()))?;
        Ok(output?)
    }
}
