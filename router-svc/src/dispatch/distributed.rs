//! The distributed mode: each message goes to one ready replica of its
//! expert, chosen by load; a message whose replica fails is sent again to
//! another, so that a replica lost mid-step costs the step a retry rather
//! than its requests. Experts hold no per-request state, so any replica can
//! answer any message, and an answer does not depend on which did.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use moe_proto::tensor_codec;
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};

use super::{DispatchSettings, ExpertBackend};
use crate::RouterError;
use crate::replicas::set::{ReplicaSets, Tried};
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

/// A try that is not the last, while another replica is ready, waits this
/// many times the replica's latency estimate, but never less than
/// [`ATTEMPT_FLOOR`], before the message is sent elsewhere.
const ATTEMPT_LATENCY_FACTOR: u32 = 8;
const ATTEMPT_FLOOR: Duration = Duration::from_secs(1);

pub struct DistributedExperts {
    sets: Arc<ReplicaSets>,
    /// Per expert: a message has already waited out `no_replica_wait` for
    /// it, and it has had no ready replica since. Messages for it fail (or
    /// reroute) at once rather than each waiting again.
    given_up: Vec<AtomicBool>,
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
                .map(|_| AtomicBool::new(false))
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

/// Whether another replica may succeed where this one failed.
fn worth_another_replica(err: &RouterError) -> bool {
    matches!(
        err,
        RouterError::ExpertUnavailable(_)
            | RouterError::ExpertTimeout(_)
            | RouterError::Overloaded(_)
    )
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
        // Encoded once: a re-send shares the same bytes.
        let hidden = tensor_codec::encode_rows(rows, width, self.settings.wire_dtype);
        let mut tried: Vec<Tried> = Vec::new();
        let mut last_error = None;
        let mut wait_until: Option<Instant> = None;
        let mut changes = self.sets.subscribe();
        loop {
            changes.borrow_and_update();
            let Some(replica) = self.sets.pick(expert, layer, &tried) else {
                if let Some(err) = last_error.take_if(|_| self.sets.ready_count(expert, layer) > 0)
                {
                    // Every ready replica had the message and failed it
                    // (one that hangs stays ready): no point waiting.
                    return Err(err);
                }
                let given_up = &self.given_up[expert];
                let deadline =
                    *wait_until.get_or_insert_with(|| Instant::now() + self.policy.no_replica_wait);
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
            self.given_up[expert].store(false, Ordering::Relaxed);
            let last_try = tried.len() as u32 >= self.policy.retries;
            // With no other replica to turn to, waiting less than the full
            // timeout would only fail the message sooner.
            let alone = self.sets.ready_count(expert, layer) <= 1;
            let timeout = if last_try || alone {
                self.settings.timeout
            } else {
                let estimate = replica.link.load().latency * ATTEMPT_LATENCY_FACTOR;
                estimate.max(ATTEMPT_FLOOR).min(self.settings.timeout)
            };
            let generation = replica.link.generation();
            match replica
                .client
                .forward(layer, hidden.clone(), count, timeout)
                .await
            {
                Ok(output) => {
                    self.budget.deposit();
                    return Ok(output);
                }
                Err(err) if !last_try && worth_another_replica(&err) => {
                    if !self.budget.withdraw() {
                        return Err(err.with_note("not re-sent: the retry budget is spent"));
                    }
                    tracing::debug!(replica = replica.label(), %err, layer, "re-sending a message to another replica");
                    self.stats.record_resend();
                    tried.push(Tried::new(replica, generation));
                    last_error = Some(err);
                }
                Err(err) => return Err(err),
            }
        }
    }
}
