//! The MoE half of every layer as the router runs it: gate, send each expert
//! one batch holding all of its rows, and combine the weighted results.
//!
//! Where the experts run is an [`ExpertBackend`]: in this process
//! ([`InProcessExperts`], the reference) or behind gRPC
//! ([`DistributedExperts`]); [`Experts`] is either, chosen at start.

mod distributed;
mod in_process;
pub mod remote;

use std::future::Future;
use std::sync::{Arc, Mutex};

use attention_svc::MoeLayer;
use candle_core::Tensor;
use futures::future::join_all;
use tracing::Instrument;

use crate::RouterError;
use crate::config::OnExpertDown;
use crate::gate::{ExpertRows, Gate};
use crate::stats::RouterStats;

pub use distributed::{DistributedExperts, FailoverPolicy};
pub use in_process::InProcessExperts;
pub use remote::{DispatchSettings, EndpointClient};

/// Runs one expert on a batch of rows.
pub trait ExpertBackend: Send + Sync {
    /// `rows` is `[n, hidden]`, row-major; the result must be too.
    fn run(
        &self,
        expert: usize,
        layer: usize,
        rows: Vec<f32>,
    ) -> impl Future<Output = Result<Vec<f32>, RouterError>> + Send;

    /// Whether a message for (`expert`, `layer`) could be sent now: where
    /// rerouted rows may go.
    fn has_ready_replica(&self, _expert: usize, _layer: usize) -> bool {
        true
    }

    /// The in-process experts when they run the generic kernels: the
    /// dispatcher then gathers, runs and sums each layer's rows as tensors
    /// on the device ([`InProcessExperts::combine`]) rather than through
    /// the host buffers of [`ExpertBackend::run`].
    fn on_device(&self) -> Option<&InProcessExperts> {
        None
    }
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

    fn has_ready_replica(&self, expert: usize, layer: usize) -> bool {
        match self {
            Self::InProcess(experts) => experts.has_ready_replica(expert, layer),
            Self::Distributed(experts) => experts.has_ready_replica(expert, layer),
        }
    }

    fn on_device(&self) -> Option<&InProcessExperts> {
        match self {
            Self::InProcess(experts) => experts.on_device(),
            Self::Distributed(_) => None,
        }
    }
}

/// Rows of one batch (one micro-batch of a step) that the experts could
/// not serve as the gate asked: the sequences they belong to fail, or are
/// flagged degraded, while the rest of the batch goes on. Row indices are
/// the batch's.
#[derive(Debug, Default)]
pub struct RowReport {
    outcomes: Mutex<RowOutcomes>,
}

#[derive(Debug, Default)]
pub struct RowOutcomes {
    /// Rows whose expert call failed, with the error.
    pub failed: Vec<(Vec<u32>, RouterError)>,
    /// Rows served by next-best experts because `expert` had no replica.
    pub rerouted: Vec<(Vec<u32>, usize)>,
}

impl RowReport {
    fn record(&self, update: impl FnOnce(&mut RowOutcomes)) {
        update(&mut self.outcomes.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub fn into_outcomes(self) -> RowOutcomes {
        self.outcomes
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// A MoE layer that can lose some of a batch's rows without failing the
/// others: what the scheduler drives.
pub trait StepMoe: Sync {
    fn forward_rows(
        &self,
        layer: usize,
        hidden: &Tensor,
        report: &RowReport,
    ) -> impl Future<Output = Result<Tensor, RouterError>> + Send;
}

/// One batch's view of a [`StepMoe`], as the engine's [`MoeLayer`],
/// collecting that batch's [`RowReport`].
pub struct Reporting<'a, M> {
    pub moe: &'a M,
    pub report: RowReport,
}

impl<'a, M: StepMoe> Reporting<'a, M> {
    pub fn new(moe: &'a M) -> Self {
        Self {
            moe,
            report: RowReport::default(),
        }
    }
}

impl<M: StepMoe> MoeLayer for Reporting<'_, M> {
    type Error = RouterError;

    fn forward(
        &self,
        layer: usize,
        hidden: &Tensor,
    ) -> impl Future<Output = Result<Tensor, RouterError>> + Send {
        self.moe.forward_rows(layer, hidden, &self.report)
    }
}

/// Gate + dispatch + combine over a backend.
pub struct MoeDispatcher<B> {
    gate: Gate,
    backend: B,
    stats: Arc<RouterStats>,
    on_expert_down: OnExpertDown,
}

impl<B: ExpertBackend> MoeDispatcher<B> {
    pub fn new(
        gate: Gate,
        backend: B,
        stats: Arc<RouterStats>,
        on_expert_down: OnExpertDown,
    ) -> Self {
        Self {
            gate,
            backend,
            stats,
            on_expert_down,
        }
    }

    /// Sends each expert its rows of `values` (`[_, width]`) and adds each
    /// row's weighted results into `combined`. Rows whose expert failed in
    /// a way that concerns only them are left as they are and returned
    /// with the error; any other failure fails the batch.
    async fn dispatch(
        &self,
        layer: usize,
        routed: &[ExpertRows],
        values: &[f32],
        width: usize,
        combined: &mut [f32],
    ) -> Result<Vec<(usize, RouterError)>, RouterError> {
        let calls = routed.iter().map(|expert_rows| {
            let gathered = gather_rows(values, width, &expert_rows.rows);
            self.backend.run(expert_rows.expert, layer, gathered)
        });
        let outputs = join_all(calls).await;
        let mut failed = Vec::new();
        // Summed in expert order, each result scaled then added, as the
        // reference does.
        for (index, (expert_rows, output)) in routed.iter().zip(outputs).enumerate() {
            let output = match output {
                Ok(output) => output,
                Err(err) if err.ends_only_its_rows() => {
                    failed.push((index, err));
                    continue;
                }
                Err(err) => return Err(err),
            };
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
        Ok(failed)
    }

    /// Serves again, from scratch, the rows of experts that had no ready
    /// replica: each row goes to its best `k` experts among those that
    /// have one, weights renormalised over them. Returns the rows that
    /// could not be served even so (no usable expert, or a failed call).
    async fn reroute(
        &self,
        layer: usize,
        rows: Vec<u32>,
        missing: &[usize],
        (values, width, device): (&[f32], usize, &candle_core::Device),
        combined: &mut [f32],
    ) -> Result<Vec<(Vec<u32>, RouterError)>, RouterError> {
        let subset = gather_rows(values, width, &rows);
        let hidden = Tensor::from_vec(subset, (rows.len(), width), device)?;
        let usable = |expert: usize| {
            !missing.contains(&expert) && self.backend.has_ready_replica(expert, layer)
        };
        let routed = self.gate.route_among(layer, &hidden, usable)?;
        let sub_values = hidden.flatten_all()?.to_vec1::<f32>()?;
        let mut sub_combined = vec![0f32; rows.len() * width];
        let failed = self
            .dispatch(layer, &routed, &sub_values, width, &mut sub_combined)
            .await?;
        for (sub_row, &row) in rows.iter().enumerate() {
            let row = row as usize;
            combined[row * width..(row + 1) * width]
                .copy_from_slice(&sub_combined[sub_row * width..(sub_row + 1) * width]);
        }
        self.stats.record_rerouted(rows.len());
        let original =
            |sub_rows: &[u32]| -> Vec<u32> { sub_rows.iter().map(|&r| rows[r as usize]).collect() };
        let mut lost: Vec<(Vec<u32>, RouterError)> = failed
            .into_iter()
            .map(|(index, err)| (original(&routed[index].rows), err))
            .collect();
        let mut served = vec![false; rows.len()];
        for expert_rows in &routed {
            for &row in &expert_rows.rows {
                served[row as usize] = true;
            }
        }
        let unserved: Vec<u32> = (0..rows.len() as u32)
            .filter(|&row| !served[row as usize])
            .collect();
        if !unserved.is_empty() {
            lost.push((
                original(&unserved),
                RouterError::NoReplica {
                    expert: missing[0],
                    message: format!(
                        "experts {missing:?} have no ready replica, nor does any other expert at layer {layer}"
                    ),
                },
            ));
        }
        Ok(lost)
    }
}

impl<B: ExpertBackend> StepMoe for MoeDispatcher<B> {
    /// Gathers each expert's rows straight into the buffer that goes on the
    /// wire (or to the in-process kernel), and sums the weighted results
    /// straight out of theirs: one copy each way, no tensor per expert.
    /// In-process experts on the generic kernels gather and sum on the
    /// device instead.
    async fn forward_rows(
        &self,
        layer: usize,
        hidden: &Tensor,
        report: &RowReport,
    ) -> Result<Tensor, RouterError> {
        let span = tracing::debug_span!(
            target: moe_telemetry::TRACE_TARGET,
            "moe_dispatch",
            layer,
            rows = hidden.dim(0).unwrap_or(0)
        );
        self.forward_rows_in_span(layer, hidden, report)
            .instrument(span)
            .await
    }
}

impl<B: ExpertBackend> MoeDispatcher<B> {
    async fn forward_rows_in_span(
        &self,
        layer: usize,
        hidden: &Tensor,
        report: &RowReport,
    ) -> Result<Tensor, RouterError> {
        let routed = self.gate.route(layer, hidden)?;
        self.stats.record_dispatch(
            layer,
            routed
                .iter()
                .map(|expert_rows| (expert_rows.expert, expert_rows.rows.len())),
        );
        // In-process experts fail no rows: nothing to report.
        if let Some(experts) = self.backend.on_device() {
            return experts.combine(layer, &routed, hidden).await;
        }
        let (rows, width) = hidden.dims2()?;
        let values = hidden.flatten_all()?.to_vec1::<f32>()?;
        let mut combined = vec![0f32; rows * width];
        let failed = self
            .dispatch(layer, &routed, &values, width, &mut combined)
            .await?;
        let mut missing = Vec::new();
        let mut lost: Vec<(Vec<u32>, RouterError)> = Vec::new();
        for (index, err) in failed {
            let expert_rows = &routed[index];
            match err {
                RouterError::NoReplica { expert, .. }
                    if self.on_expert_down == OnExpertDown::Reroute =>
                {
                    missing.push(expert);
                    self.stats.metrics.rerouted(expert, expert_rows.rows.len());
                    report.record(|o| o.rerouted.push((expert_rows.rows.clone(), expert)));
                }
                err => lost.push((expert_rows.rows.clone(), err)),
            }
        }
        if !missing.is_empty() {
            let mut rows_to_reroute: Vec<u32> = routed
                .iter()
                .filter(|expert_rows| missing.contains(&expert_rows.expert))
                .flat_map(|expert_rows| expert_rows.rows.iter().copied())
                .collect();
            rows_to_reroute.sort_unstable();
            rows_to_reroute.dedup();
            // Rerouted rows are computed anew: their earlier failures on
            // other experts no longer count, only the reroute's own.
            for (failed_rows, _) in &mut lost {
                failed_rows.retain(|row| rows_to_reroute.binary_search(row).is_err());
            }
            lost.retain(|(failed_rows, _)| !failed_rows.is_empty());
            let rerouting_failed = self
                .reroute(
                    layer,
                    rows_to_reroute,
                    &missing,
                    (&values, width, hidden.device()),
                    &mut combined,
                )
                .await?;
            lost.extend(rerouting_failed);
        }
        if !lost.is_empty() {
            report.record(|o| o.failed.extend(lost));
        }
        Ok(Tensor::from_vec(combined, (rows, width), hidden.device())?)
    }
}

/// The whole batch or nothing: what a caller without a [`RowReport`]
/// (the dispatch benchmark) gets.
impl<B: ExpertBackend> MoeLayer for MoeDispatcher<B> {
    type Error = RouterError;

    async fn forward(&self, layer: usize, hidden: &Tensor) -> Result<Tensor, RouterError> {
        let report = RowReport::default();
        let output = self.forward_rows(layer, hidden, &report).await?;
        match report.into_outcomes().failed.into_iter().next() {
            Some((_, err)) => Err(err),
            None => Ok(output),
        }
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
