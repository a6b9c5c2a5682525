//! Whether the router can serve: at start, it admits requests once every
//! (expert, layer) has had a ready replica; from then on its gRPC health
//! follows coverage — NOT_SERVING (with the reason in its log) while some
//! expert has no ready replica, SERVING again once it has — so that a
//! load balancer or Kubernetes sends clients elsewhere meanwhile. Requests
//! that still arrive are admitted, and their rows wait for the replica
//! (`--no-replica-wait`) like those of running requests.

use std::sync::Arc;

use moe_proto::transport;
use moe_proto::v1::inference_server::InferenceServer;
use tokio::sync::watch;
use tonic_health::server::HealthReporter;

use crate::replicas::set::ReplicaSets;
use crate::service::InferenceService;

/// `Ok(())` once the router has been ready; before that, why not.
pub type Readiness = watch::Receiver<Result<(), String>>;

pub fn ready() -> Readiness {
    watch::channel(Ok(())).1
}

pub fn not_ready(why: &str) -> (watch::Sender<Result<(), String>>, Readiness) {
    watch::channel(Err(why.to_owned()))
}

/// Publishes the replicas' coverage, as it changes, on `startup` (until
/// the first time it is complete) and on the health service (unless
/// draining, which owns the health status from then on).
pub async fn follow_coverage(
    sets: Arc<ReplicaSets>,
    startup: watch::Sender<Result<(), String>>,
    health: HealthReporter,
    draining: watch::Receiver<bool>,
) {
    let mut changes = sets.subscribe();
    let mut last_missing: Option<Vec<String>> = None;
    loop {
        let coverage = sets.coverage();
        let starting = startup.borrow().is_err();
        if starting && !coverage.is_complete() {
            // Clients turned away at start learn the latest reason.
            let _previous = startup.send_replace(Err(coverage.explain()));
        }
        if last_missing.as_ref() != Some(&coverage.missing) {
            let why = coverage.explain();
            if coverage.is_complete() {
                tracing::info!("every expert has a ready replica; serving");
            } else if starting {
                // Replicas answer one by one at start: only a loss is news.
                tracing::debug!(%why, "not serving yet");
            } else {
                tracing::warn!(%why, "not serving");
            }
            if starting {
                let now = if coverage.is_complete() {
                    Ok(())
                } else {
                    Err(why)
                };
                let _previous = startup.send_replace(now);
            }
            if !*draining.borrow() {
                transport::set_serving::<InferenceServer<InferenceService>>(
                    &health,
                    coverage.is_complete(),
                )
                .await;
                if *draining.borrow() {
                    // The drain began meanwhile: it owns the status.
                    transport::set_serving::<InferenceServer<InferenceService>>(&health, false)
                        .await;
                }
            }
            last_missing = Some(coverage.missing);
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// Marks the service SERVING at once (its experts are in this process),
/// unless it has started draining by then.
pub async fn serve_in_process(health: HealthReporter, draining: watch::Receiver<bool>) {
    if !*draining.borrow() {
        transport::set_serving::<InferenceServer<InferenceService>>(&health, true).await;
    }
}
