//! What the dashboard shows, computed from the router's own metrics: a
//! snapshot a second, and windows read as differences between snapshots
//! (the last minute for the heatmap and percentiles, the last ten seconds
//! for rates), as Prometheus would compute them from the same series.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moe_proto::ExpertMode;
use moe_telemetry::Telemetry;
use moe_telemetry::catalog as names;
use moe_telemetry::snapshot::{Buckets, Snapshot};
use serde::Serialize;

use crate::autoscale::{AutoscalePolicy, ExpertDemand, Observation};
use crate::metrics::state_label;
use crate::replicas::link::Work;
use crate::replicas::set::ReplicaSets;
use crate::stats::RouterStats;

/// The heatmap's and the percentiles' window.
const LONG_WINDOW: Duration = Duration::from_secs(60);
/// The rates' window.
const SHORT_WINDOW: Duration = Duration::from_secs(10);
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

pub struct Dashboard {
    telemetry: Arc<Telemetry>,
    policy: AutoscalePolicy,
    autoscale: Mutex<AutoscaleState>,
    stats: Arc<RouterStats>,
    sets: Option<Arc<ReplicaSets>>,
    mode: ExpertMode,
    num_experts: usize,
    num_layers: usize,
    history: Mutex<VecDeque<(Instant, Snapshot)>>,
}

/// The autoscaling signal's state, advanced once a snapshot.
#[derive(Default)]
struct AutoscaleState {
    demand: Vec<ExpertDemand>,
    /// Each replica's work as it last reported it, by endpoint.
    last_work: HashMap<String, Work>,
    /// `None` until the expert's capacity is known.
    desired: Vec<Option<u32>>,
}

#[derive(Debug, Serialize)]
pub struct DashboardView {
    pub mode: String,
    pub num_experts: usize,
    pub num_layers: usize,
    pub window_seconds: f64,
    pub rate_window_seconds: f64,
    /// `[expert][layer]`: rows routed in the window.
    pub heatmap: Vec<Vec<u64>>,
    pub imbalance: Option<f64>,
    pub requests: RequestsView,
    pub experts: Vec<ExpertView>,
}

#[derive(Debug, Serialize)]
pub struct RequestsView {
    pub rate_per_second: Option<f64>,
    pub tokens_per_second: Option<f64>,
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p99_ms: Option<f64>,
    pub itl_p50_ms: Option<f64>,
    pub itl_p99_ms: Option<f64>,
    pub running: f64,
    pub waiting: f64,
    pub kv_cache_usage: f64,
    pub errors_per_second: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct ExpertView {
    pub expert: usize,
    pub ready: u32,
    pub draining: u32,
    pub down: u32,
    /// The autoscaling signal; null until the expert's capacity is known
    /// (and in the in-process mode).
    pub desired: Option<u32>,
    pub rows_per_second: Option<f64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub resends: u64,
    pub rerouted_rows: u64,
    pub replicas: Vec<ReplicaView>,
}

#[derive(Debug, Serialize)]
pub struct ReplicaView {
    pub endpoint: String,
    pub state: &'static str,
    pub busy_fraction: Option<f64>,
    pub in_flight_rows: u64,
}

/// Two snapshots and the time between them.
struct Window<'a> {
    now: &'a Snapshot,
    then: &'a Snapshot,
    seconds: f64,
}

impl Window<'_> {
    fn increase(
        &self,
        name: &str,
        keep: impl Fn(&moe_telemetry::snapshot::Labels) -> bool + Copy,
    ) -> f64 {
        (self.now.sum(name, keep) - self.then.sum(name, keep)).max(0.0)
    }

    fn rate(
        &self,
        name: &str,
        keep: impl Fn(&moe_telemetry::snapshot::Labels) -> bool + Copy,
    ) -> Option<f64> {
        (self.seconds > 0.0).then(|| self.increase(name, keep) / self.seconds)
    }

    fn histogram(
        &self,
        name: &str,
        keep: impl Fn(&moe_telemetry::snapshot::Labels) -> bool + Copy,
    ) -> Buckets {
        self.now
            .histogram(name, keep)
            .since(&self.then.histogram(name, keep))
    }
}

fn millis(buckets: &Buckets, q: f64) -> Option<f64> {
    buckets.quantile(q).map(|seconds| seconds * 1000.0)
}

fn is_expert(expert: usize) -> impl Fn(&moe_telemetry::snapshot::Labels) -> bool + Copy {
    move |labels| labels.get("expert").and_then(|e| e.parse::<usize>().ok()) == Some(expert)
}

fn all(_: &moe_telemetry::snapshot::Labels) -> bool {
    true
}

impl Dashboard {
    pub fn new(
        telemetry: Arc<Telemetry>,
        stats: Arc<RouterStats>,
        sets: Option<Arc<ReplicaSets>>,
        (mode, policy): (ExpertMode, AutoscalePolicy),
        (num_experts, num_layers): (usize, usize),
    ) -> Self {
        Self {
            telemetry,
            policy,
            autoscale: Mutex::new(AutoscaleState {
                demand: vec![ExpertDemand::default(); num_experts],
                last_work: HashMap::new(),
                desired: vec![None; num_experts],
            }),
            stats,
            sets,
            mode,
            num_experts,
            num_layers,
            history: Mutex::new(VecDeque::new()),
        }
    }

    /// Takes a snapshot a second for as long as the process runs, and keeps
    /// the gauges computed from windows (imbalance, desired replicas)
    /// current.
    pub async fn run(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(SAMPLE_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            self.sample();
            self.advance_autoscaling();
            let view = self.view();
            let metrics = &self.stats.metrics;
            // Nothing routed in the window is no imbalance, not the last one.
            metrics.imbalance(view.imbalance.unwrap_or(1.0));
            for expert in &view.experts {
                if let Some(desired) = expert.desired {
                    metrics.desired_replicas(expert.expert, f64::from(desired));
                }
            }
        }
    }

    fn sample(&self) {
        let Some(metrics) = self.telemetry.collect() else {
            return;
        };
        let now = Instant::now();
        let mut history = self.history();
        history.push_back((now, Snapshot::from_metrics(&metrics)));
        while history
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > LONG_WINDOW + SAMPLE_EVERY)
        {
            history.pop_front();
        }
    }

    /// Folds the last second into each expert's demand and capacity, and
    /// computes its desired replicas ([`crate::autoscale`]).
    fn advance_autoscaling(&self) {
        let Some(sets) = &self.sets else {
            return;
        };
        let routed: Vec<f64>;
        let seconds;
        {
            let mut history = self.history();
            let [.., (then_at, then), (now_at, now)] = history.make_contiguous() else {
                return;
            };
            seconds = now_at.duration_since(*then_at).as_secs_f64();
            routed = (0..self.num_experts)
                .map(|expert| {
                    let rows = |snapshot: &Snapshot| {
                        snapshot.sum(names::EXPERT_ROWS.name, is_expert(expert))
                    };
                    (rows(now) - rows(then)).max(0.0)
                })
                .collect();
        }
        let reports = sets.reports();
        let mut state = lock(&self.autoscale);
        let mut seen: Vec<Observation> = routed
            .iter()
            .map(|&rows_routed| Observation {
                seconds,
                rows_routed,
                ..Observation::default()
            })
            .collect();
        let mut shards: Vec<Vec<std::ops::Range<usize>>> = vec![Vec::new(); self.num_experts];
        state
            .last_work
            .retain(|uri, _| reports.iter().any(|report| &report.uri == uri));
        for report in &reports {
            if let Some(ranges) = shards.get_mut(report.expert)
                && !ranges.contains(&report.layers)
            {
                ranges.push(report.layers.clone());
            }
            let Some(work) = report.work else { continue };
            let previous = state.last_work.insert(report.uri.clone(), work);
            // A counter that went down is a restarted process: its first
            // report is not a difference.
            if let (Some(previous), Some(observation)) = (previous, seen.get_mut(report.expert))
                && work.rows_served >= previous.rows_served
                && work.busy_seconds >= previous.busy_seconds
            {
                observation.rows_served += (work.rows_served - previous.rows_served) as f64;
                observation.busy_seconds += work.busy_seconds - previous.busy_seconds;
            }
        }
        let state = &mut *state;
        for (expert, observation) in seen.into_iter().enumerate() {
            state.demand[expert].observe(observation, &self.policy);
            let shards = shards[expert].len().max(1) as u32;
            state.desired[expert] = state.demand[expert].desired(shards, &self.policy);
        }
    }

    fn history(&self) -> std::sync::MutexGuard<'_, VecDeque<(Instant, Snapshot)>> {
        lock(&self.history)
    }

    pub fn view(&self) -> DashboardView {
        let history = self.history();
        let empty = (Instant::now(), Snapshot::default());
        let (now_at, now) = history.back().unwrap_or(&empty);
        let window = |length: Duration| {
            let (then_at, then) = history
                .iter()
                .find(|(at, _)| now_at.duration_since(*at) <= length)
                .map(|(at, snapshot)| (at, snapshot))
                .unwrap_or((now_at, now));
            Window {
                now,
                then,
                seconds: now_at.duration_since(*then_at).as_secs_f64(),
            }
        };
        let long = window(LONG_WINDOW);
        let short = window(SHORT_WINDOW);

        let mut heatmap = vec![vec![0u64; self.num_layers]; self.num_experts];
        for (series, earlier) in paired(long.now, long.then, names::EXPERT_ROWS.name) {
            let index = |key| {
                series
                    .get(key)
                    .and_then(|value| value.parse::<usize>().ok())
            };
            if let (Some(expert), Some(layer)) = (index("expert"), index("layer"))
                && let Some(cell) = heatmap.get_mut(expert).and_then(|row| row.get_mut(layer))
            {
                *cell = (series.value() - earlier).max(0.0) as u64;
            }
        }
        let totals: Vec<u64> = heatmap.iter().map(|row| row.iter().sum()).collect();
        let sum: u64 = totals.iter().sum();
        let imbalance = (sum > 0).then(|| {
            let mean = sum as f64 / self.num_experts.max(1) as f64;
            *totals.iter().max().unwrap_or(&0) as f64 / mean
        });

        let ttft = long.histogram(names::TIME_TO_FIRST_TOKEN.name, all);
        let itl = long.histogram(names::TIME_PER_OUTPUT_TOKEN.name, all);
        let scalar = |name: &str| now.sum(name, all);
        let requests = RequestsView {
            rate_per_second: short.rate(names::REQUESTS.name, all),
            tokens_per_second: short
                .rate(names::TOKENS.name, |labels| labels.is("type", "generated")),
            ttft_p50_ms: millis(&ttft, 0.5),
            ttft_p99_ms: millis(&ttft, 0.99),
            itl_p50_ms: millis(&itl, 0.5),
            itl_p99_ms: millis(&itl, 0.99),
            running: scalar(names::RUNNING.name),
            waiting: scalar(names::WAITING.name),
            kv_cache_usage: scalar(names::KV_CACHE_USAGE.name),
            errors_per_second: short.rate(names::REQUESTS.name, |labels| {
                labels.is("finish_reason", "error")
            }),
        };

        let reports = self
            .sets
            .as_ref()
            .map(|sets| sets.reports())
            .unwrap_or_default();
        let desired = lock(&self.autoscale).desired.clone();
        let experts = (0..self.num_experts)
            .map(|expert| {
                let latency = long.histogram(names::EXPERT_CALL_DURATION.name, is_expert(expert));
                let mut view = ExpertView {
                    expert,
                    ready: 0,
                    draining: 0,
                    down: 0,
                    desired: None,
                    rows_per_second: short.rate(names::EXPERT_ROWS.name, is_expert(expert)),
                    latency_p50_ms: millis(&latency, 0.5),
                    latency_p99_ms: millis(&latency, 0.99),
                    resends: long.increase(names::EXPERT_RESENDS.name, is_expert(expert)) as u64,
                    rerouted_rows: long
                        .increase(names::EXPERT_REROUTED_ROWS.name, is_expert(expert))
                        as u64,
                    replicas: Vec::new(),
                };
                for report in reports.iter().filter(|report| report.expert == expert) {
                    let Some(state) = state_label(report.state) else {
                        continue;
                    };
                    match state {
                        "ready" => view.ready += 1,
                        "draining" => view.draining += 1,
                        _ => view.down += 1,
                    }
                    view.replicas.push(ReplicaView {
                        endpoint: report.uri.clone(),
                        state,
                        busy_fraction: report.busy_fraction,
                        in_flight_rows: report.load.in_flight_rows,
                    });
                }
                view.desired = desired.get(expert).copied().flatten();
                view
            })
            .collect();

        DashboardView {
            mode: self.mode.to_string(),
            num_experts: self.num_experts,
            num_layers: self.num_layers,
            window_seconds: long.seconds,
            rate_window_seconds: short.seconds,
            heatmap,
            imbalance,
            requests,
            experts,
        }
    }
}

/// A scalar series of `name` now, with its labels, and its value in
/// `then` (0 if it did not exist yet).
fn paired<'a>(
    now: &'a Snapshot,
    then: &'a Snapshot,
    name: &'a str,
) -> impl Iterator<Item = (SeriesRef<'a>, f64)> + 'a {
    now.series(name).iter().map(move |series| {
        let earlier = then
            .series(name)
            .iter()
            .find(|old| old.labels == series.labels)
            .map(|old| SeriesRef(old).value())
            .unwrap_or(0.0);
        (SeriesRef(series), earlier)
    })
}

struct SeriesRef<'a>(&'a moe_telemetry::snapshot::Series);

impl SeriesRef<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .labels
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.as_str())
    }

    fn value(&self) -> f64 {
        match self.0.point {
            moe_telemetry::snapshot::Point::Scalar(value) => value,
            moe_telemetry::snapshot::Point::Histogram(_) => 0.0,
        }
    }
}

/// Nothing is left half-updated behind these locks, so a poisoned one is
/// still sound to use.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}
