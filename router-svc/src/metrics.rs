//! The router's OpenTelemetry instruments (names, units and buckets come
//! from `moe_telemetry::catalog`). Everything recorded per message or per
//! row goes through instruments bound to their labels at start (or when a
//! replica joins), so the hot path looks up and allocates nothing.

use std::sync::Arc;
use std::time::Duration;

use moe_telemetry::catalog::{self as names};
use moe_telemetry::{KeyValue, Meter};
use opentelemetry::metrics::{
    BoundCounter, BoundGauge, BoundHistogram, Counter, Gauge, Histogram, ObservableGauge,
};

use crate::replicas::link::ReplicaState;
use crate::replicas::set::ReplicaSets;

/// How requests usually end: each finish reason, and the errors a router
/// answers most (bad requests, overload, experts down, deadlines, bugs).
const USUAL_ENDS: [(&str, tonic::Code); 9] = [
    ("length", tonic::Code::Ok),
    ("stop", tonic::Code::Ok),
    ("eos", tonic::Code::Ok),
    ("cancelled", tonic::Code::Cancelled),
    ("error", tonic::Code::InvalidArgument),
    ("error", tonic::Code::ResourceExhausted),
    ("error", tonic::Code::Unavailable),
    ("error", tonic::Code::DeadlineExceeded),
    ("error", tonic::Code::Internal),
];

/// Why a message was sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resend {
    /// Its replica failed or did not answer in time.
    Retry,
    /// Its replica was slow; another was asked too.
    Hedge,
}

impl std::fmt::Debug for RouterMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterMetrics").finish_non_exhaustive()
    }
}

pub struct RouterMetrics {
    ttft: Histogram<f64>,
    time_per_output_token: Histogram<f64>,
    request_duration: Histogram<f64>,
    input_tokens: BoundHistogram<f64>,
    output_tokens: BoundHistogram<f64>,
    prompt_tokens: BoundCounter<f64>,
    generated_tokens: BoundCounter<f64>,
    /// The usual ends, bound (and exported at 0) from the start so that
    /// rates read 0 rather than nothing; others go through `requests`.
    usual_ends: Vec<((&'static str, tonic::Code), BoundCounter<u64>)>,
    requests: Counter<u64>,
    running: Gauge<f64>,
    waiting: Gauge<f64>,
    kv_cache_usage: Gauge<f64>,
    step_duration: Histogram<f64>,
    step_tokens: Histogram<f64>,
    /// `[expert * layers + layer]`.
    expert_rows: Vec<BoundCounter<u64>>,
    num_layers: usize,
    call_duration: Histogram<f64>,
    /// `[expert][retry, hedge]`.
    resends: Vec<[BoundCounter<u64>; 2]>,
    failovers: Vec<BoundCounter<u64>>,
    rerouted_rows: Vec<BoundCounter<u64>>,
    desired_replicas: Vec<BoundGauge<f64>>,
    imbalance: Gauge<f64>,
}

fn expert_label(expert: usize) -> KeyValue {
    KeyValue::new("expert", expert as i64)
}

impl RouterMetrics {
    /// Binds every per-expert series now, so that each exists (at zero)
    /// from the start: a dashboard shows every expert before it has work.
    pub fn new(meter: &Meter, num_experts: usize, num_layers: usize) -> Self {
        let token_usage = moe_telemetry::histogram(meter, &names::TOKEN_USAGE);
        let tokens = moe_telemetry::counter(meter, &names::TOKENS);
        let expert_rows = moe_telemetry::u64_counter(meter, &names::EXPERT_ROWS);
        let resends = moe_telemetry::u64_counter(meter, &names::EXPERT_RESENDS);
        let failovers = moe_telemetry::u64_counter(meter, &names::EXPERT_FAILOVERS);
        let rerouted = moe_telemetry::u64_counter(meter, &names::EXPERT_REROUTED_ROWS);
        let desired = moe_telemetry::gauge(meter, &names::EXPERT_DESIRED_REPLICAS);
        let requests = moe_telemetry::u64_counter(meter, &names::REQUESTS);
        let per_expert = |counter: &Counter<u64>| -> Vec<BoundCounter<u64>> {
            (0..num_experts)
                .map(|expert| counter.bind(&[expert_label(expert)]))
                .collect()
        };
        let metrics = Self {
            ttft: moe_telemetry::histogram(meter, &names::TIME_TO_FIRST_TOKEN),
            time_per_output_token: moe_telemetry::histogram(meter, &names::TIME_PER_OUTPUT_TOKEN),
            request_duration: moe_telemetry::histogram(meter, &names::REQUEST_DURATION),
            input_tokens: token_usage.bind(&[KeyValue::new("gen_ai.token.type", "input")]),
            output_tokens: token_usage.bind(&[KeyValue::new("gen_ai.token.type", "output")]),
            prompt_tokens: tokens.bind(&[KeyValue::new("type", "prompt")]),
            generated_tokens: tokens.bind(&[KeyValue::new("type", "generated")]),
            usual_ends: USUAL_ENDS
                .iter()
                .map(|&(finish_reason, code)| {
                    let counter = requests.bind(&[
                        KeyValue::new("finish_reason", finish_reason),
                        KeyValue::new("code", moe_telemetry::grpc_code_name(code)),
                    ]);
                    ((finish_reason, code), counter)
                })
                .collect(),
            requests,
            running: moe_telemetry::gauge(meter, &names::RUNNING),
            waiting: moe_telemetry::gauge(meter, &names::WAITING),
            kv_cache_usage: moe_telemetry::gauge(meter, &names::KV_CACHE_USAGE),
            step_duration: moe_telemetry::histogram(meter, &names::STEP_DURATION),
            step_tokens: moe_telemetry::histogram(meter, &names::STEP_TOKENS),
            expert_rows: (0..num_experts)
                .flat_map(|expert| {
                    let expert_rows = &expert_rows;
                    (0..num_layers).map(move |layer| {
                        expert_rows
                            .bind(&[expert_label(expert), KeyValue::new("layer", layer as i64)])
                    })
                })
                .collect(),
            num_layers,
            call_duration: moe_telemetry::histogram(meter, &names::EXPERT_CALL_DURATION),
            resends: (0..num_experts)
                .map(|expert| {
                    [Resend::Retry, Resend::Hedge].map(|reason| {
                        resends.bind(&[
                            expert_label(expert),
                            KeyValue::new("reason", reason.as_str()),
                        ])
                    })
                })
                .collect(),
            failovers: per_expert(&failovers),
            rerouted_rows: per_expert(&rerouted),
            desired_replicas: (0..num_experts)
                .map(|expert| desired.bind(&[expert_label(expert)]))
                .collect(),
            imbalance: moe_telemetry::gauge(meter, &names::EXPERT_IMBALANCE),
        };
        for counters in &metrics.resends {
            counters.iter().for_each(|counter| counter.add(0));
        }
        for counter in metrics
            .expert_rows
            .iter()
            .chain(metrics.usual_ends.iter().map(|(_, counter)| counter))
            .chain(&metrics.failovers)
            .chain(&metrics.rerouted_rows)
        {
            counter.add(0);
        }
        metrics
    }

    /// Metrics that go nowhere (benchmarks and unit tests).
    pub fn detached(num_experts: usize, num_layers: usize) -> Self {
        Self::new(
            &opentelemetry::global::meter("detached"),
            num_experts,
            num_layers,
        )
    }

    pub fn expert_rows(&self, expert: usize, layer: usize, rows: usize) {
        if let Some(counter) = self.expert_rows.get(expert * self.num_layers + layer) {
            counter.add(rows as u64);
        }
    }

    /// The call-latency series of one replica, bound once when it joins.
    pub fn bind_call_duration(&self, expert: usize, replica: &str) -> BoundHistogram<f64> {
        self.call_duration.bind(&[
            expert_label(expert),
            KeyValue::new("replica", replica.to_owned()),
        ])
    }

    pub fn resend(&self, expert: usize, reason: Resend) {
        if let Some(counters) = self.resends.get(expert) {
            counters[reason as usize].add(1);
        }
    }

    /// The failover counter of `expert`, for its replicas' links.
    pub fn bind_failovers(&self, expert: usize) -> Option<BoundCounter<u64>> {
        self.failovers.get(expert).cloned()
    }

    pub fn rerouted(&self, expert: usize, rows: usize) {
        if let Some(counter) = self.rerouted_rows.get(expert) {
            counter.add(rows as u64);
        }
    }

    pub fn desired_replicas(&self, expert: usize, replicas: f64) {
        if let Some(gauge) = self.desired_replicas.get(expert) {
            gauge.record(replicas);
        }
    }

    pub fn imbalance(&self, ratio: f64) {
        self.imbalance.record(ratio, &[]);
    }

    /// One scheduler step: how long, how many tokens of each kind.
    pub fn step(&self, took: Duration, prompt_tokens: usize, decode_tokens: usize) {
        self.step_duration.record(took.as_secs_f64(), &[]);
        self.step_tokens
            .record((prompt_tokens + decode_tokens) as f64, &[]);
        self.prompt_tokens.add(prompt_tokens as f64);
        self.generated_tokens.add(decode_tokens as f64);
    }

    pub fn batch(&self, running: usize, waiting: usize, kv_cache_usage: f64) {
        self.running.record(running as f64, &[]);
        self.waiting.record(waiting as f64, &[]);
        self.kv_cache_usage.record(kv_cache_usage, &[]);
    }

    pub fn first_token(&self, after: Duration) {
        self.ttft.record(after.as_secs_f64(), &[]);
    }

    pub fn next_token(&self, after: Duration) {
        self.time_per_output_token.record(after.as_secs_f64(), &[]);
    }

    /// A request ended: `finish_reason` is `length`, `stop`, `eos`,
    /// `cancelled` or `error`, `code` a gRPC code's name.
    pub fn request_ended(
        &self,
        finish_reason: &'static str,
        code: tonic::Code,
        took: Duration,
        usage: Option<(u32, u32)>,
    ) {
        match self
            .usual_ends
            .iter()
            .find(|(end, _)| *end == (finish_reason, code))
        {
            Some((_, counter)) => counter.add(1),
            None => self.requests.add(
                1,
                &[
                    KeyValue::new("finish_reason", finish_reason),
                    KeyValue::new("code", moe_telemetry::grpc_code_name(code)),
                ],
            ),
        }
        self.request_duration.record(took.as_secs_f64(), &[]);
        if let Some((prompt, completion)) = usage {
            self.input_tokens.record(prompt as f64);
            self.output_tokens.record(completion as f64);
        }
    }
}

impl Resend {
    fn as_str(self) -> &'static str {
        match self {
            Resend::Retry => "retry",
            Resend::Hedge => "hedge",
        }
    }
}

/// How a replica's state shows in `moe.expert.replicas`: connecting,
/// refused and lost replicas all count as down; removed ones not at all.
pub fn state_label(state: ReplicaState) -> Option<&'static str> {
    match state {
        ReplicaState::Ready => Some("ready"),
        ReplicaState::Draining => Some("draining"),
        ReplicaState::Connecting | ReplicaState::Down | ReplicaState::Refused => Some("down"),
        ReplicaState::Removed => None,
    }
}

/// Replicas by state and in-flight rows per replica, read from the replica
/// sets when metrics are exported (nothing is recorded as they change).
/// The instruments must live as long as the sets.
pub fn observe_replicas(meter: &Meter, sets: Arc<ReplicaSets>) -> [ObservableGauge<f64>; 2] {
    let counted = sets.clone();
    let by_state = moe_telemetry::observable_gauge(meter, &names::EXPERT_REPLICAS, move |gauge| {
        let mut counts = vec![[0u32; 3]; counted.num_experts()];
        for report in counted.reports() {
            let slot = match state_label(report.state) {
                Some("ready") => 0,
                Some("draining") => 1,
                Some(_) => 2,
                None => continue,
            };
            if let Some(expert) = counts.get_mut(report.expert) {
                expert[slot] += 1;
            }
        }
        for (expert, states) in counts.iter().enumerate() {
            for (state, count) in ["ready", "draining", "down"].iter().zip(states) {
                gauge.observe(
                    *count as f64,
                    &[expert_label(expert), KeyValue::new("state", *state)],
                );
            }
        }
    });
    let in_flight =
        moe_telemetry::observable_gauge(meter, &names::EXPERT_IN_FLIGHT_ROWS, move |gauge| {
            for report in sets.reports() {
                if report.state != ReplicaState::Removed {
                    gauge.observe(
                        report.load.in_flight_rows as f64,
                        &[
                            expert_label(report.expert),
                            KeyValue::new("replica", report.uri),
                        ],
                    );
                }
            }
        });
    [by_state, in_flight]
}
