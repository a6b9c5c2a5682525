//! Counters of work done and bytes moved since start, shared by the
//! scheduler, the dispatcher and the endpoint actors, and read through the
//! `Stats` RPC. Relaxed atomics: each counter is monotonic on its own, and a
//! snapshot taken between steps is what a benchmark subtracts.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use moe_proto::WireDType;
use moe_proto::v1::{ReplicaStatus, StatsResponse};

use crate::metrics::{Resend, RouterMetrics};
use crate::replicas::link::{ReplicaState, Work};
use crate::replicas::picker::ReplicaLoad;

#[derive(Debug)]
pub struct RouterStats {
    steps: AtomicU64,
    step_sequences: AtomicU64,
    running_sequences: AtomicU64,
    step_tokens: AtomicU64,
    moe_dispatches: AtomicU64,
    experts_hit: AtomicU64,
    expert_messages: AtomicU64,
    wire_bytes_sent: AtomicU64,
    wire_bytes_received: AtomicU64,
    rows_by_expert: Vec<AtomicU64>,
    expert_resends: AtomicU64,
    replicas_refused: AtomicU64,
    rerouted_rows: AtomicU64,
    /// `None` in the in-process mode: nothing goes on a wire.
    wire_dtype: Option<WireDType>,
    /// The same events, and more, as OpenTelemetry metrics.
    pub metrics: RouterMetrics,
}

/// gRPC's length prefix in front of every message on a stream.
pub const GRPC_PREFIX_BYTES: u64 = 5;

impl RouterStats {
    pub fn new(num_experts: usize, wire_dtype: Option<WireDType>, metrics: RouterMetrics) -> Self {
        Self {
            steps: AtomicU64::new(0),
            step_sequences: AtomicU64::new(0),
            running_sequences: AtomicU64::new(0),
            step_tokens: AtomicU64::new(0),
            moe_dispatches: AtomicU64::new(0),
            experts_hit: AtomicU64::new(0),
            expert_messages: AtomicU64::new(0),
            wire_bytes_sent: AtomicU64::new(0),
            wire_bytes_received: AtomicU64::new(0),
            rows_by_expert: (0..num_experts).map(|_| AtomicU64::new(0)).collect(),
            expert_resends: AtomicU64::new(0),
            replicas_refused: AtomicU64::new(0),
            rerouted_rows: AtomicU64::new(0),
            wire_dtype,
            metrics,
        }
    }

    /// A step ran `sequences` sequences' `tokens` tokens.
    pub fn record_step(&self, sequences: usize, tokens: usize) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.step_sequences
            .fetch_add(sequences as u64, Ordering::Relaxed);
        self.step_tokens.fetch_add(tokens as u64, Ordering::Relaxed);
    }

    /// `sequences` are running now.
    pub fn set_running(&self, sequences: usize) {
        self.running_sequences
            .store(sequences as u64, Ordering::Relaxed);
    }

    /// One layer of one micro-batch dispatched: `count` rows to `expert`
    /// for each expert that received some.
    pub fn record_dispatch(&self, layer: usize, rows: impl IntoIterator<Item = (usize, usize)>) {
        self.moe_dispatches.fetch_add(1, Ordering::Relaxed);
        for (expert, count) in rows {
            self.metrics.expert_rows(expert, layer, count);
            self.experts_hit.fetch_add(1, Ordering::Relaxed);
            if let Some(counter) = self.rows_by_expert.get(expert) {
                counter.fetch_add(count as u64, Ordering::Relaxed);
            }
        }
    }

    /// A message of `encoded_len` bytes went out on a Forward stream.
    pub fn record_sent(&self, encoded_len: usize) {
        self.expert_messages.fetch_add(1, Ordering::Relaxed);
        self.wire_bytes_sent
            .fetch_add(encoded_len as u64 + GRPC_PREFIX_BYTES, Ordering::Relaxed);
    }

    pub fn record_received(&self, encoded_len: usize) {
        self.wire_bytes_received
            .fetch_add(encoded_len as u64 + GRPC_PREFIX_BYTES, Ordering::Relaxed);
    }

    /// A message for `expert` was sent again to another replica.
    pub fn record_resend(&self, expert: usize, reason: Resend) {
        self.metrics.resend(expert, reason);
        self.expert_resends.fetch_add(1, Ordering::Relaxed);
    }

    /// A replica's Describe did not match; it was refused.
    pub fn record_replica_refused(&self) {
        self.replicas_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// `rows` went to a next-best expert.
    pub fn record_rerouted(&self, rows: usize) {
        self.rerouted_rows.fetch_add(rows as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsResponse {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let rows_by_expert: Vec<u64> = self.rows_by_expert.iter().map(load).collect();
        StatsResponse {
            steps: load(&self.steps),
            step_sequences: load(&self.step_sequences),
            running_sequences: load(&self.running_sequences),
            step_tokens: load(&self.step_tokens),
            moe_dispatches: load(&self.moe_dispatches),
            experts_hit: load(&self.experts_hit),
            expert_rows: rows_by_expert.iter().sum(),
            expert_messages: load(&self.expert_messages),
            wire_bytes_sent: load(&self.wire_bytes_sent),
            wire_bytes_received: load(&self.wire_bytes_received),
            wire_dtype: self.wire_dtype.map(|dtype| dtype.to_string()),
            rows_by_expert,
            expert_resends: load(&self.expert_resends),
            replicas_refused: load(&self.replicas_refused),
            rerouted_rows: load(&self.rerouted_rows),
            replicas: Vec::new(),
        }
    }
}

/// One replica as the Stats RPC reports it.
#[derive(Debug, Clone)]
pub struct ReplicaReport {
    pub expert: usize,
    pub layers: Range<usize>,
    pub uri: String,
    pub state: ReplicaState,
    pub load: ReplicaLoad,
    /// The share of the last seconds it spent computing, as it reports.
    pub busy_fraction: Option<f64>,
    /// Its work since it started, as it last reported it.
    pub work: Option<Work>,
    /// Why it is out of service, when it is.
    pub problem: Option<String>,
}

impl From<ReplicaReport> for ReplicaStatus {
    fn from(report: ReplicaReport) -> Self {
        Self {
            expert: report.expert as u32,
            layer_start: report.layers.start as u32,
            layer_end: report.layers.end as u32,
            endpoint: report.uri,
            state: report.state.to_string(),
            in_flight_rows: report.load.in_flight_rows,
            latency_seconds: report.load.latency.as_secs_f64(),
            problem: report.problem.unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_sums_rows_and_counts_prefixes() {
        let stats = RouterStats::new(4, Some(WireDType::F32), RouterMetrics::detached(4, 2));
        stats.record_step(3, 10);
        stats.record_dispatch(0, [(0, 3), (2, 7)]);
        stats.record_dispatch(1, [(2, 1)]);
        stats.record_sent(100);
        stats.record_received(90);
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.steps, 1);
        assert_eq!(snapshot.step_sequences, 3);
        assert_eq!(snapshot.wire_dtype.as_deref(), Some("f32"));
        assert_eq!(snapshot.step_tokens, 10);
        assert_eq!(snapshot.moe_dispatches, 2);
        assert_eq!(snapshot.experts_hit, 3);
        assert_eq!(snapshot.rows_by_expert, vec![3, 0, 8, 0]);
        assert_eq!(snapshot.expert_rows, 11);
        assert_eq!(snapshot.expert_messages, 1);
        assert_eq!(snapshot.wire_bytes_sent, 105);
        assert_eq!(snapshot.wire_bytes_received, 95);
    }
}
