//! The distributed mode: each message goes to one ready replica of its
//! expert, chosen by load. A message whose replica fails is sent again to
//! another, and one whose replica is slow to answer is also sent to another
//! (a hedge: the first answer wins), so that a replica lost or stalled
//! mid-step costs the step a re-send rather than its requests. Experts hold
//! no per-request state, so any replica can answer any message; replicas of
//! one expert are expected to compute alike (the same checkpoint, which the
//! supervisor checks, on the same kind of device and dtype).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use moe_proto::tensor_codec;
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};

use super::{DispatchSettings, ExpertBackend};
use crate::RouterError;
use crate::metrics::Resend;
use crate::replicas::set::{Replica, ReplicaSets, Tried};
use crate::stats::RouterStats;

/// How hard the router tries before a message fails.
#[derive(Debug, Clone)]
pub struct FailoverPolicy {
    /// Re-sends of one message at most.
    pub retries: u32,
    /// How long a message waits for its expert to have a ready replica.
    pub no_replica_wait: Duration,
}

/// Over a sliding window of [`BUDGET_WINDOW`], re-sends may add at most
/// [`BUDGET_RATIO`] to the messages that succeeded, plus
/// [`BUDGET_FLOOR_PER_SEC`] a second: as gRPC's retry throttling, retries
/// cannot multiply an overload.
const BUDGET_WINDOW: Duration = Duration::from_secs(10);
const BUDGET_RATIO: f32 = 0.1;
const BUDGET_FLOOR_PER_SEC: u32 = 20;

/// A message not answered within this many times its replica's latency
/// estimate, and never less than [`HEDGE_FLOOR`], is also sent to another
/// ready replica (when one is, and the retry budget allows); the first
/// answer wins. Every try may take the full `--expert-timeout-secs`.
const HEDGE_LATENCY_FACTOR: u32 = 8;
const HEDGE_FLOOR: Duration = Duration::from_secs(1);

pub struct DistributedExperts {
    sets: Arc<ReplicaSets>,
    /// Per expert and layer: a message has already waited out
    /// `no_replica_wait` for it, and it has had no ready replica since.
    /// Messages for it fail (or reroute) at once rather than each waiting
    /// again.
    given_up: Vec<Vec<AtomicBool>>,
    settings: DispatchSettings,
    policy: FailoverPolicy,
    budget: TpsBudget,
    stats: Arc<RouterStats>,
}

impl DistributedExperts {
    pub fn new(
        sets: Arc<ReplicaSets>,
        settings: DispatchSettings,
        policy: FailoverPolicy,
        stats: Arc<RouterStats>,
    ) -> Self {
        Self {
            given_up: (0..sets.num_experts())
                .map(|_| {
                    (0..sets.num_layers())
                        .map(|_| AtomicBool::new(false))
                        .collect()
                })
                .collect(),
            sets,
            settings,
            policy,
            budget: TpsBudget::new(BUDGET_WINDOW, BUDGET_FLOOR_PER_SEC, BUDGET_RATIO),
            stats,
        }
    }

    fn no_replica(
        &self,
        expert: usize,
        layer: usize,
        last_error: Option<RouterError>,
    ) -> RouterError {
        let tried = last_error.map_or_else(String::new, |err| format!("; last try: {err}"));
        RouterError::NoReplica {
            expert,
            message: format!(
                "expert {expert} has had no ready replica for layer {layer} for {:?} ({}){tried}",
                self.policy.no_replica_wait,
                self.sets.states_of(expert)
            ),
        }
    }
}

impl ExpertBackend for DistributedExperts {
    fn has_ready_replica(&self, expert: usize, layer: usize) -> bool {
        self.sets.ready_count(expert, layer) > 0
    }

    async fn run(
        &self,
        expert: usize,
        layer: usize,
        rows: Vec<f32>,
    ) -> Result<Vec<f32>, RouterError> {
        let width = self.settings.hidden_size;
        let count = rows.len() / width;
        // Encoded once: every try shares the same bytes.
        let hidden = tensor_codec::encode_rows(rows, width, self.settings.wire_dtype);
        let send = |replica: Arc<Replica>| {
            let hidden = hidden.clone();
            async move {
                let result = replica
                    .client
                    .forward(layer, hidden, count, self.settings.timeout)
                    .await;
                (replica, result)
            }
        };
        let given_up = &self.given_up[expert][layer];
        let mut tried: Vec<Tried> = Vec::new();
        let mut in_flight = FuturesUnordered::new();
        let mut last_error: Option<RouterError> = None;
        let mut wait_until: Option<Instant> = None;
        // When the newest try is due a hedge; `None`: no hedge for it.
        let mut hedge_at: Option<Instant> = None;
        loop {
            if in_flight.is_empty() {
                let Some(replica) = self.sets.pick(expert, layer, &tried) else {
                    // Subscribed, then looked at again: no change between
                    // the two goes unseen.
                    let mut changes = self.sets.subscribe();
                    if self.sets.pick(expert, layer, &tried).is_some() {
                        continue;
                    }
                    if let Some(err) =
                        last_error.take_if(|_| self.sets.ready_count(expert, layer) > 0)
                    {
                        // Every ready replica had the message and failed it.
                        return Err(err);
                    }
                    let deadline = *wait_until
                        .get_or_insert_with(|| Instant::now() + self.policy.no_replica_wait);
                    if given_up.load(Ordering::Relaxed)
                        || tokio::time::timeout_at(deadline, changes.changed())
                            .await
                            .is_err()
                    {
                        given_up.store(true, Ordering::Relaxed);
                        return Err(self.no_replica(expert, layer, last_error));
                    }
                    continue;
                };
                if given_up.load(Ordering::Relaxed) {
                    given_up.store(false, Ordering::Relaxed);
                }
                hedge_at = self.hedge_time(&replica, tried.len());
                tried.push(Tried::new(replica.clone(), replica.link.generation()));
                in_flight.push(send(replica));
            }
            let hedge_due = async {
                match hedge_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some((replica, result)) = in_flight.next() => match result {
                    Ok(output) => {
                        self.budget.deposit();
                        return Ok(output);
                    }
                    Err(err) if err.another_replica_may_answer() => {
                        tracing::debug!(replica = replica.label(), %err, layer, "expert message failed");
                        last_error = Some(err);
                        if !in_flight.is_empty() {
                            // A hedge is still out: its answer will do.
                            continue;
                        }
                        let err = last_error.take().expect("just set");
                        if tried.len() as u32 > self.policy.retries {
                            return Err(err);
                        }
                        if !self.budget.withdraw() {
                            return Err(err.with_note("not re-sent: the retry budget is spent"));
                        }
                        self.stats.record_resend(expert, Resend::Retry);
                        last_error = Some(err);
                    }
                    Err(err) => return Err(err),
                },
                () = hedge_due => {
                    hedge_at = None;
                    let another = self.sets.pick(expert, layer, &tried);
                    if let Some(replica) = another.filter(|_| self.budget.withdraw()) {
                        tracing::debug!(replica = replica.label(), layer, "hedging a slow expert message");
                        self.stats.record_resend(expert, Resend::Hedge);
                        hedge_at = self.hedge_time(&replica, tried.len());
                        tried.push(Tried::new(replica.clone(), replica.link.generation()));
                        in_flight.push(send(replica));
                    }
                }
            }
        }
    }
}

impl DistributedExperts {
    /// When a try sent to `replica`, the `tries`-th, is also sent elsewhere
    /// if still unanswered; `None` when no try may follow.
    fn hedge_time(&self, replica: &Replica, tries: usize) -> Option<Instant> {
        ((tries as u32) < self.policy.retries).then(|| {
            let estimate = replica.link.load().latency * HEDGE_LATENCY_FACTOR;
            Instant::now() + estimate.max(HEDGE_FLOOR)
        })
    }
}
