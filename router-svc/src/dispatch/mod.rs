//! The MoE half of every layer as the router runs it: gate, send each expert
//! one batch holding all of its rows, and combine the weighted results.
//!
//! Where the experts run is an [`ExpertBackend`]: in this process
//! ([`InProcessExperts`], the reference) or behind gRPC
//! ([`DistributedExperts`]); [`Experts`] is either, chosen at start.

mod in_process;
pub mod remote;

use std::future::Future;
use std::sync::Arc;

use attention_svc::MoeLayer;
use candle_core::Tensor;
use futures::future::try_join_all;

use crate::RouterError;
use crate::gate::Gate;
use crate::stats::RouterStats;

pub use in_process::InProcessExperts;
pub use remote::{DispatchSettings, DistributedExperts, EndpointClient};

/// Runs one expert on a batch of rows.
pub trait ExpertBackend: Send + Sync {
    /// `rows` is `[n, hidden]`, row-major; the result must be too.
    fn run(
        &self,
        expert: usize,
        layer: usize,
        rows: Vec<f32>,
    ) -> impl Future<Output = Result<Vec<f32>, RouterError>> + Send;
}

/// The experts of one router, in either mode.
pub enum Experts {
    InProcess(InProcessExperts),
    Distributed(DistributedExperts),
}

impl ExpertBackend for Experts {
    async fn run(
        &self,
        expert: usize,
        layer: usize,
        rows: Vec<f32>,
    ) -> Result<Vec<f32>, RouterError> {
        match self {
            Self::InProcess(experts) => experts.run(expert, layer, rows).await,
            Self::Distributed(experts) => experts.run(expert, layer, rows).await,
        }
    }
}

/// Gate + dispatch + combine over a backend.
pub struct MoeDispatcher<B> {
    gate: Gate,
    backend: B,
    stats: Arc<RouterStats>,
}

impl<B: ExpertBackend> MoeDispatcher<B> {
    pub fn new(gate: Gate, backend: B, stats: Arc<RouterStats>) -> Self {
        Self {
            gate,
            backend,
            stats,
        }
    }
}

impl<B: ExpertBackend> MoeLayer for MoeDispatcher<B> {
    type Error = RouterError;

    /// Gathers each expert's rows straight into the buffer that goes on the
    /// wire (or to the in-process kernel), and sums the weighted results
    /// straight out of theirs: one copy each way, no tensor per expert.
    async fn forward(&self, layer: usize, hidden: &Tensor) -> Result<Tensor, RouterError> {
        let routed = self.gate.route(layer, hidden)?;
        self.stats.record_dispatch(
            routed
                .iter()
                .map(|expert_rows| (expert_rows.expert, expert_rows.rows.len())),
        );
        let (rows, width) = hidden.dims2()?;
        let values = hidden.flatten_all()?.to_vec1::<f32>()?;
        let calls = routed.iter().map(|expert_rows| {
            let gathered = gather_rows(&values, width, &expert_rows.rows);
            self.backend.run(expert_rows.expert, layer, gathered)
        });
        let outputs = try_join_all(calls).await?;
        // Summed in expert order, each result scaled then added, as the
        // reference does.
        let mut combined = vec![0f32; rows * width];
        for (expert_rows, output) in routed.iter().zip(&outputs) {
            if output.len() != expert_rows.rows.len() * width {
                return Err(RouterError::Internal(format!(
                    "expert {} returned {} values for {} rows of {width}",
                    expert_rows.expert,
                    output.len(),
                    expert_rows.rows.len()
                )));
            }
            let results = output.chunks_exact(width);
            for ((&row, &weight), result) in expert_rows
                .rows
                .iter()
                .zip(&expert_rows.weights)
                .zip(results)
            {
                let row = row as usize;
                let target = &mut combined[row * width..(row + 1) * width];
                for (sum, value) in target.iter_mut().zip(result) {
                    *sum += weight * value;
                }
            }
        }
        Ok(Tensor::from_vec(combined, (rows, width), hidden.device())?)
    }
}

/// The listed rows of a row-major `[_, width]` buffer, in order.
fn gather_rows(values: &[f32], width: usize, rows: &[u32]) -> Vec<f32> {
    let mut gathered = Vec::with_capacity(rows.len() * width);
    for &row in rows {
        let row = row as usize;
        gathered.extend_from_slice(&values[row * width..(row + 1) * width]);
    }
    gathered
}
