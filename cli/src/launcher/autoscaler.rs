//! `moe up --autoscale`: the per-expert control loop Kubernetes runs with
//! an HPA, on one host. Once a second it reads each expert's
//! desired-replicas signal from the router (`/api/dashboard`, the same
//! gauge the HPAs read through Prometheus), stabilises it as the HPA would
//! ([`super::scaling`]), and starts or stops expert processes to match.
//!
//! The router learns the replicas from a cluster file this loop rewrites:
//! a new replica is added once it listens (the router takes it once it has
//! checked it); a replica to stop is removed from the file first, so that
//! the router sends it nothing new, then gets SIGTERM and drains what it
//! holds, as a pod would.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use moe_proto::ListenAddr;
use serde::Deserialize;
use tokio::sync::{broadcast, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::ClusterOptions;
use super::scaling::{ScalePolicy, Stabiliser};
use super::supervisor::{ExpertEvent, ExpertSlot, Supervisor};

/// How often the signal is read.
const PERIOD: Duration = Duration::from_secs(1);
/// The longest a removed replica waits for the router to drop it (the
/// router re-reads the cluster file every 500 ms) before it drains anyway.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(10);
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// One expert process the loop started, and how to stop it alone.
struct Extra {
    slot: ExpertSlot,
    stop: watch::Sender<Option<Duration>>,
    task: JoinHandle<()>,
}

/// The loop, running; [`Autoscaler::shutdown`] stops it and its processes.
pub struct Autoscaler {
    task: JoinHandle<()>,
    stop: watch::Sender<bool>,
    replicas: watch::Receiver<Vec<usize>>,
}

/// What the loop needs of the cluster it scales.
pub(super) struct Scaled {
    pub options: ClusterOptions,
    pub policy: ScalePolicy,
    pub router_http: SocketAddr,
    pub cluster_file: PathBuf,
    /// The replicas the cluster started with (and keeps), per expert.
    pub initial: Vec<Vec<ExpertSlot>>,
    pub events: broadcast::Sender<ExpertEvent>,
}

#[derive(Deserialize)]
struct Signal {
    experts: Vec<ExpertSignal>,
}

#[derive(Deserialize)]
struct ExpertSignal {
    expert: usize,
    /// Null until the router knows the expert's capacity.
    desired: Option<usize>,
}

impl Autoscaler {
    pub(super) fn spawn(scaled: Scaled) -> Self {
        let (stop, stopped) = watch::channel(false);
        let counts: Vec<usize> = scaled.initial.iter().map(Vec::len).collect();
        let (publish, replicas) = watch::channel(counts);
        let task = tokio::spawn(run(scaled, stopped, publish));
        Self {
            task,
            stop,
            replicas,
        }
    }

    /// Expert processes per expert now, as the loop last changed them.
    pub fn replicas(&self) -> watch::Receiver<Vec<usize>> {
        self.replicas.clone()
    }

    /// Stops the loop and drains the processes it started.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        let _ = self.task.await;
    }
}

async fn run(
    scaled: Scaled,
    mut stopped: watch::Receiver<bool>,
    publish: watch::Sender<Vec<usize>>,
) {
    let experts = scaled.initial.len();
    let mut extras: Vec<Vec<Extra>> = (0..experts).map(|_| Vec::new()).collect();
    let mut stabilisers: Vec<Stabiliser> = (0..experts).map(|_| Stabiliser::default()).collect();
    let mut next_replica: Vec<usize> = scaled.initial.iter().map(Vec::len).collect();
    // Replicas on their way out: removed from the file, then drained.
    let mut leaving = JoinSet::new();
    let mut ticks = tokio::time::interval(PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopped.wait_for(|stop| *stop) => break,
        }
        let signal = match read_signal(scaled.router_http).await {
            Ok(signal) => signal,
            Err(err) => {
                tracing::debug!(%err, "no autoscaling signal this time");
                continue;
            }
        };
        let now = Instant::now();
        let mut removed = Vec::new();
        let mut changed = false;
        for ExpertSignal { expert, desired } in signal.experts {
            // No signal yet (capacity unknown): keep what there is, as an
            // HPA does without its metric.
            let (Some(desired), Some(started)) = (desired, extras.get_mut(expert)) else {
                continue;
            };
            let kept = scaled.initial[expert].len();
            let current = kept + started.len();
            let target = stabilisers[expert]
                .next(now, desired, current, &scaled.policy)
                .max(kept);
            while kept + started.len() < target {
                match start_extra(&scaled, expert, next_replica[expert]).await {
                    Ok(extra) => {
                        next_replica[expert] += 1;
                        started.push(extra);
                    }
                    Err(err) => {
                        tracing::warn!(expert, error = %format!("{err:#}"), "cannot start a replica");
                        break;
                    }
                }
            }
            while kept + started.len() > target {
                removed.extend(started.pop());
            }
            let now_running = kept + started.len();
            if now_running != current {
                changed = true;
                let _ = scaled.events.send(ExpertEvent::Scaled {
                    expert,
                    from: current,
                    to: now_running,
                    desired,
                });
            }
        }
        if changed {
            write_cluster_file(&scaled, &extras).await;
            let counts = (0..experts)
                .map(|expert| scaled.initial[expert].len() + extras[expert].len())
                .collect();
            publish.send_replace(counts);
        }
        if !removed.is_empty() {
            leaving.spawn(leave(scaled.router_http, removed, stopped.clone()));
        }
    }
    while leaving.join_next().await.is_some() {}
    let all: Vec<Extra> = extras.into_iter().flatten().collect();
    stop_all(all).await;
}

/// Waits until the router no longer lists `removed` (it has re-read the
/// cluster file and sends them nothing new), at most [`LEAVE_TIMEOUT`] and
/// not past the loop's end; then drains and stops them.
async fn leave(router: SocketAddr, removed: Vec<Extra>, mut stopped: watch::Receiver<bool>) {
    let endpoints: Vec<String> = removed.iter().map(|extra| extra.slot.uri()).collect();
    let gone = async {
        loop {
            if let Ok(listed) = read_endpoints(router).await
                && !endpoints.iter().any(|endpoint| listed.contains(endpoint))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        waited = tokio::time::timeout(LEAVE_TIMEOUT, gone) => if waited.is_err() {
            tracing::warn!(?endpoints, "the router still lists replicas it was told to drop; stopping them anyway");
        },
        _ = stopped.wait_for(|stop| *stop) => {}
    }
    stop_all(removed).await;
}

/// Every replica endpoint the router lists now.
async fn read_endpoints(router: SocketAddr) -> anyhow::Result<Vec<String>> {
    let (status, body) = crate::http::get(router, "/api/dashboard").await?;
    anyhow::ensure!(status == 200, "the router answered {status}");
    let view: serde_json::Value = serde_json::from_str(&body)?;
    Ok(view["experts"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|expert| expert["replicas"].as_array().into_iter().flatten())
        .filter_map(|replica| replica["endpoint"].as_str().map(str::to_owned))
        .collect())
}

async fn read_signal(router: SocketAddr) -> anyhow::Result<Signal> {
    let (status, body) = crate::http::get(router, "/api/dashboard").await?;
    anyhow::ensure!(status == 200, "the router answered {status}");
    Ok(serde_json::from_str(&body)?)
}

/// Starts replica `replica` of `expert` under a supervisor of its own
/// (restarted if it dies, stopped alone when scaled down).
async fn start_extra(scaled: &Scaled, expert: usize, replica: usize) -> anyhow::Result<Extra> {
    let listen = ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 0)));
    let (stop, stop_signal) = watch::channel(None);
    let (slot, task) = Supervisor::start_replica(
        &scaled.options,
        &scaled.events,
        (expert, replica),
        &listen,
        stop_signal,
    )
    .await?;
    Ok(Extra { slot, stop, task })
}

async fn stop_all(extras: Vec<Extra>) {
    for extra in &extras {
        extra.stop.send_replace(Some(DRAIN_GRACE));
    }
    for extra in extras {
        let _ = extra.task.await;
        drop(extra.slot);
    }
}

/// Rewrites the router's cluster file: every kept and started replica.
/// Written aside and renamed, so that the router never reads half a file.
async fn write_cluster_file(scaled: &Scaled, extras: &[Vec<Extra>]) {
    let text = cluster_file_text(
        scaled
            .initial
            .iter()
            .zip(extras)
            .flat_map(|(kept, started)| kept.iter().chain(started.iter().map(|extra| &extra.slot))),
    );
    let aside = scaled.cluster_file.with_extension("json.new");
    let written = async {
        tokio::fs::write(&aside, text).await?;
        tokio::fs::rename(&aside, &scaled.cluster_file).await
    };
    if let Err(err) = written.await {
        tracing::warn!(%err, path = %scaled.cluster_file.display(), "cannot rewrite the cluster file");
    }
}

/// A cluster file (router-svc's `--cluster`) listing `slots`.
pub(super) fn cluster_file_text<'a>(slots: impl Iterator<Item = &'a ExpertSlot>) -> String {
    let experts: Vec<serde_json::Value> = slots
        .map(|slot| serde_json::json!({"expert": slot.expert, "endpoint": slot.uri()}))
        .collect();
    serde_json::json!({ "experts": experts }).to_string()
}
