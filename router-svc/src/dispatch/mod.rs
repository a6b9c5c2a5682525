//! The MoE half of every layer as the router runs it: gate, send each expert
//! one batch holding all of its rows, and combine the weighted answers.
//!
//! Where the experts run is an [`ExpertBackend`]: in this process
//! ([`LocalExperts`], the reference) or behind gRPC ([`RemoteExperts`]).

mod local;
pub mod remote;

use std::future::Future;
use std::sync::Arc;

use attention_svc::MoeLayer;
use candle_core::Tensor;
use futures::future::try_join_all;

use crate::RouterError;
use crate::gate::Gate;
use crate::stats::RouterStats;

pub use local::LocalExperts;
pub use remote::{DispatchSettings, EndpointClient, RemoteExperts};

/// Runs one expert on a batch of rows.
pub trait ExpertBackend: Send + Sync {
    /// `rows` is `[n, hidden]`; the answer must be `[n, hidden]`.
    fn run(
        &self,
        expert: usize,
        layer: usize,
        rows: Tensor,
    ) -> impl Future<Output = Result<Tensor, RouterError>> + Send;
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

    async fn forward(&self, layer: usize, hidden: &Tensor) -> Result<Tensor, RouterError> {
        let routed = self.gate.route(layer, hidden)?;
        self.stats.record_dispatch(
            routed
                .iter()
                .map(|expert_rows| (expert_rows.expert, expert_rows.rows.len())),
        );
        let device = hidden.device();
        let calls = routed.iter().map(|expert_rows| {
            let indices = Tensor::new(expert_rows.rows.as_slice(), device);
            async move {
                let indices = indices?;
                let input = hidden.index_select(&indices, 0)?;
                let output = self.backend.run(expert_rows.expert, layer, input).await?;
                let weights = Tensor::new(expert_rows.weights.as_slice(), device)?.unsqueeze(1)?;
                Ok::<_, RouterError>((indices, output.broadcast_mul(&weights)?))
            }
        });
        let outputs = try_join_all(calls).await?;
        // Summed in expert order, as the reference does.
        let mut combined = hidden.zeros_like()?;
        for (indices, weighted) in outputs {
            combined = combined.index_add(&indices, &weighted, 0)?;
        }
        Ok(combined)
    }
}
