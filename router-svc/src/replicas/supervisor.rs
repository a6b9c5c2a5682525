//! One task per replica: connect, check `Describe` on that connection,
//! then follow its gRPC health (`Watch`) — SERVING takes work, NOT_SERVING
//! drains — until the connection breaks or the actor reports it lost; then
//! back off and start over. A replica is never sent a message on a
//! connection that was not checked.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use moe_model::ModelConfig;
use moe_proto::dial_once::DialTls;
use moe_proto::tls::{ClientTls, rustls};
use moe_proto::v1::{DescribeRequest, DescribeResponse, expert_server};
use moe_proto::{dial_once, transport};
use tokio::sync::{Notify, watch};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use super::backoff::Backoff;
use super::link::{Link, ReplicaState, Session, Work};
use crate::stats::RouterStats;

/// What every replica must report.
pub struct Expected {
    pub config: ModelConfig,
    pub fingerprint: String,
    /// `--expert-tls-ca`: every replica is dialled over TLS and must show
    /// a certificate that CA signed for its name.
    pub tls: Option<Arc<ClientTls>>,
}

/// Which replica this is.
pub struct Supervised {
    pub label: Arc<str>,
    pub uri: String,
    /// The name its TLS certificate must carry, when not the URI's host.
    pub tls_name: Option<String>,
    pub expert: usize,
    pub layers: Range<usize>,
}

/// How long one connection attempt or Describe may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs until `removed` turns true.
pub async fn supervise(
    replica: Supervised,
    link: Arc<Link>,
    expected: Arc<Expected>,
    stats: Arc<RouterStats>,
    mut removed: watch::Receiver<bool>,
    connection_failed: Arc<Notify>,
) {
    let mut backoff = Backoff::default();
    let mut generation = 0u64;
    let mut last_problem = String::new();
    loop {
        link.set_state(ReplicaState::Connecting);
        let outcome = tokio::select! {
            outcome = session(&replica, &link, &expected, &mut generation, &mut backoff) => outcome,
            _ = removed.wait_for(|removed| *removed) => break,
        };
        let (state, problem) = match outcome {
            Ended::Lost(problem) => (ReplicaState::Down, problem),
            Ended::Refused(problem) => {
                stats.record_replica_refused();
                (ReplicaState::Refused, problem)
            }
        };
        link.set_problem(Some(problem.clone()));
        link.close(state);
        if state == ReplicaState::Down {
            connection_failed.notify_one();
        }
        if problem != last_problem {
            tracing::warn!(replica = %replica.label, %state, %problem, "replica out of service");
            last_problem = problem;
        }
        let wait = backoff.next(&mut rand::rng());
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = removed.wait_for(|removed| *removed) => break,
        }
    }
    link.close(ReplicaState::Removed);
}

enum Ended {
    /// Unreachable, or the connection broke.
    Lost(String),
    /// Reachable but serving something else.
    Refused(String),
}

/// One connection's life: check it, then serve while its health says so.
async fn session(
    replica: &Supervised,
    link: &Arc<Link>,
    expected: &Expected,
    generation: &mut u64,
    backoff: &mut Backoff,
) -> Ended {
    let channel = match connect(replica, expected.tls.as_ref()).await {
        Ok(channel) => channel,
        Err(ended) => return ended,
    };
    match describe(&channel).await {
        Ok(described) => {
            if let Err(problem) = check(replica, &described, expected) {
                return Ended::Refused(problem);
            }
        }
        Err(problem) => return Ended::Lost(problem),
    }
    let mut health = match HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: expert_server::SERVICE_NAME.to_owned(),
        })
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => return Ended::Lost(format!("health watch: {}", status.message())),
    };
    *generation += 1;
    let this = *generation;
    let work_poll = tokio::spawn(poll_work(channel.clone(), link.clone()));
    let _stop_polling = AbortOnDrop(work_poll);
    let mut opened = false;
    loop {
        let update = tokio::select! {
            biased;
            () = link.lost(this) => return Ended::Lost("its Forward stream failed".into()),
            update = health.message() => update,
        };
        match update {
            Ok(Some(HealthCheckResponse { status })) if status == ServingStatus::Serving as i32 => {
                if !opened {
                    tracing::info!(replica = %replica.label, generation = this, "replica ready");
                    link.set_problem(None);
                    opened = true;
                    backoff.reset();
                }
                link.open(Session {
                    generation: this,
                    channel: channel.clone(),
                });
            }
            Ok(Some(_)) if !opened => {
                // Not serving yet (still starting): wait for SERVING.
            }
            Ok(Some(_)) => {
                // Keep the session: the replica finishes what it was sent.
                tracing::info!(replica = %replica.label, "replica draining");
                link.set_state(ReplicaState::Draining);
            }
            Ok(None) => return Ended::Lost("it closed its health stream".into()),
            Err(status) => return Ended::Lost(format!("health stream: {}", status.message())),
        }
    }
}

/// Asks the replica for its work (rows served, busy seconds) about once a
/// second, for as long as its session lasts: the busy fraction and the
/// capacity the autoscaling signal learns.
async fn poll_work(channel: Channel, link: Arc<Link>) {
    let mut ticks = tokio::time::interval(WORK_POLL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Ok(described) = describe(&channel).await {
            link.record_work(Work {
                rows_served: described.rows_served,
                busy_seconds: described.busy_seconds,
            });
        }
    }
}

/// How often a ready replica's work is read.
const WORK_POLL: Duration = Duration::from_secs(1);

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A connection that is never silently re-dialled (see
/// [`moe_proto::dial_once`]): what was checked on it stays true of it.
/// Over TLS when the router has an experts' CA (whatever the scheme);
/// an `https://` endpoint without one is not dialled.
/// A TLS failure (a certificate refused either way) is a refusal: the
/// replica is there, but not one this router may trust or be trusted by.
async fn connect(replica: &Supervised, tls: Option<&Arc<ClientTls>>) -> Result<Channel, Ended> {
    let uri = replica.uri.as_str();
    let tls = match tls {
        Some(tls) => Some(
            DialTls::new(tls.clone(), uri, replica.tls_name.as_deref()).map_err(Ended::Refused)?,
        ),
        None if uri.starts_with("https://") => {
            return Err(Ended::Refused(
                "an https:// endpoint, but the router has no --expert-tls-ca".into(),
            ));
        }
        None => None,
    };
    match tokio::time::timeout(CHECK_TIMEOUT, dial_once::connect_once(uri, tls)).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(err)) if is_tls_failure(&err) => Err(Ended::Refused(format!(
            "TLS refused: {}",
            error_chain(&err)
        ))),
        Ok(Err(err)) => Err(Ended::Lost(format!(
            "cannot connect: {}",
            error_chain(&err)
        ))),
        Err(_) => Err(Ended::Lost(format!(
            "cannot connect within {CHECK_TIMEOUT:?}"
        ))),
    }
}

/// Whether rustls failed somewhere in `err`'s chain (io errors carry it
/// inside rather than as their source).
fn is_tls_failure(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(err);
    while let Some(err) = cause {
        let inner = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        if err.is::<rustls::Error>() || inner.is_some_and(|inner| inner.is::<rustls::Error>()) {
            return true;
        }
        cause = err.source();
    }
    false
}

async fn describe(channel: &Channel) -> Result<DescribeResponse, String> {
    let mut client = transport::expert_client(channel.clone());
    match tokio::time::timeout(CHECK_TIMEOUT, client.describe(DescribeRequest {})).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(format!("Describe failed: {}", status.message())),
        Err(_) => Err(format!("no answer to Describe within {CHECK_TIMEOUT:?}")),
    }
}

/// The innermost cause reads best ("Connection refused").
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    message
}

/// Whether a replica serves what the router expects of it; if not, what
/// it serves instead.
pub fn check(
    replica: &Supervised,
    described: &DescribeResponse,
    expected: &Expected,
) -> Result<(), String> {
    if described.model_fingerprint != expected.fingerprint {
        return Err(format!(
            "serves another checkpoint (fingerprint {}, router has {})",
            described.model_fingerprint, expected.fingerprint
        ));
    }
    let served = described.layer_start as usize..described.layer_end as usize;
    if described.expert as usize != replica.expert || served != replica.layers {
        return Err(format!(
            "serves expert {} layers {served:?}, but the cluster expects expert {} layers {:?}",
            described.expert, replica.expert, replica.layers
        ));
    }
    let config = &expected.config;
    if described.hidden_size as usize != config.hidden_size
        || described.intermediate_size as usize != config.intermediate_size
        || described.num_experts as usize != config.num_local_experts
    {
        return Err("reports a model shape that differs from the router's".into());
    }
    Ok(())
}
