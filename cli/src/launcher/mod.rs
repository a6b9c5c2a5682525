//! Starts a cluster on loopback: one expert-svc process per expert of the
//! checkpoint (or several: replicas) and one router-svc, each on a port it
//! picks itself, and keeps the expert processes running until the cluster
//! is shut down.
//!
//! Each child prints `... listening on ADDR` on stdout once bound; the
//! launcher reads that line rather than guessing free ports, and waits for
//! the router's gRPC health to say SERVING rather than sleeping. An expert
//! process that exits unasked is started again on the same address (TCP
//! listeners bind with SO_REUSEADDR, and expert-svc replaces its own stale
//! Unix socket), so the router, which knows its experts by address, finds
//! the replacement.

mod autoscaler;
mod backoff;
mod options;
mod process;
mod scaling;
mod supervisor;
#[cfg(test)]
mod supervisor_tests;

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, bail};
use moe_proto::{ExpertMode, ListenAddr};
use tokio::process::Command;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub use autoscaler::Autoscaler;
pub use backoff::RestartBackoff;
pub use options::{ClusterOptions, ExpertTransport, ReplicaCount, binaries_dir, replicas_of};
pub use process::{Process, spawn, start_expert, start_replica};
pub use scaling::{ScalePolicy, Stabiliser};
pub use supervisor::{ExpertEvent, ExpertSlot};

use supervisor::Supervisor;

use crate::client::{Access, BearerToken, channel};
use crate::pki::LocalPki;

/// Events the supervisors report that a slow listener may fall behind on
/// before it misses the oldest.
const EVENT_BACKLOG: usize = 64;

pub struct Cluster {
    pub router: Process,
    /// Every expert process, by expert then replica. A slot keeps its
    /// address across restarts.
    pub experts: Vec<ExpertSlot>,
    events: broadcast::Sender<ExpertEvent>,
    /// The supervisors stop once this holds a grace period, or once it is
    /// dropped with the cluster (killing their processes at once).
    stop: watch::Sender<Option<Duration>>,
    supervisors: Vec<JoinHandle<()>>,
    /// Holds the experts' Unix sockets, removed with the cluster.
    _sockets: Option<tempfile::TempDir>,
    /// With `autoscale`: the loop, and the directory of its cluster file.
    autoscaler: Option<(Autoscaler, tempfile::TempDir)>,
    /// The certificates of a secure cluster, removed with it.
    tls: Option<LocalPki>,
    /// The first key of the router's `--api-keys-file`, if it has one: what
    /// the launcher's own calls (and [`Cluster::access`]) send.
    api_key: Option<String>,
}

impl Cluster {
    pub async fn start(options: &ClusterOptions) -> anyhow::Result<Self> {
        let config =
            moe_model::ModelConfig::from_file(&options.model.join(moe_model::CONFIG_FILE))?;
        let sockets = match (options.mode, options.expert_transport) {
            (ExpertMode::Distributed, ExpertTransport::Unix) => Some(
                tempfile::Builder::new()
                    .prefix("moe-sockets-")
                    .tempdir()
                    .context("cannot make a directory for the experts' sockets")?,
            ),
            _ => None,
        };
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        let (stop, _) = watch::channel(None);
        let mut experts = Vec::new();
        let mut supervisors = Vec::new();
        let mut router_args = vec![
            "--model".to_owned(),
            path_arg(&options.model),
            "--listen".into(),
            options.router_listen.to_string(),
            // The experts share these cores: the router's wake-ups on each
            // result should not preempt their forward passes. Passed in the
            // in-process mode too, so that both modes run alike.
            "--sched-batch".into(),
        ];
        match options.mode {
            ExpertMode::InProcess => router_args.push("--in-process".into()),
            ExpertMode::Distributed => {
                for expert in 0..config.num_local_experts {
                    let replicas = match &options.autoscale {
                        Some(policy) => policy.min_replicas.max(1),
                        None => replicas_of(&options.replicas, expert),
                    };
                    for replica in 0..replicas {
                        let listen = match &sockets {
                            Some(dir) => ListenAddr::Unix(
                                dir.path().join(format!("expert-{expert}-{replica}.sock")),
                            ),
                            None => ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 0))),
                        };
                        let (slot, task) = Supervisor::start_replica(
                            options,
                            &events,
                            (expert, replica),
                            &listen,
                            stop.subscribe(),
                        )
                        .await?;
                        if options.autoscale.is_none() {
                            router_args.push("--expert".into());
                            router_args.push(format!("{expert}={}", slot.uri()));
                        }
                        experts.push(slot);
                        supervisors.push(task);
                    }
                }
            }
        }
        // A --device among the caller's router flags wins over --gpus.
        let device_given = (options.router_args.iter())
            .any(|arg| arg == "--device" || arg.starts_with("--device="));
        if let Some(device) = options.router_device().filter(|_| !device_given) {
            router_args.extend(["--device".into(), device]);
        }
        // A --kernels among the caller's router flags wins over the cluster's.
        let kernels_given = (options.router_args.iter())
            .any(|arg| arg == "--kernels" || arg.starts_with("--kernels="));
        if !kernels_given {
            router_args.extend(["--kernels".into(), options.kernels.to_string()]);
        }
        if let Some(http) = options.http_listen {
            router_args.extend(["--http-listen".into(), http.to_string()]);
        }
        if let Some(pki) = &options.tls {
            router_args.extend(pki.router_args());
        }
        let cluster_file = match (&options.autoscale, options.mode) {
            (Some(_), ExpertMode::Distributed) => {
                let dir = tempfile::Builder::new()
                    .prefix("moe-cluster-")
                    .tempdir()
                    .context("cannot make a directory for the cluster file")?;
                let path = dir.path().join("cluster.json");
                std::fs::write(&path, autoscaler::cluster_file_text(experts.iter()))
                    .with_context(|| format!("cannot write {}", path.display()))?;
                router_args.extend(["--cluster".into(), path_arg(&path)]);
                Some((dir, path))
            }
            _ => None,
        };
        router_args.extend(options.router_args.iter().cloned());
        let api_key = first_api_key(&router_args)?;
        let mut command = Command::new(options.bin_dir.join("router-svc"));
        command.args(&router_args);
        let router = spawn("router-svc".into(), command, options).await?;
        let mut cluster = Self {
            router,
            experts,
            events,
            stop,
            supervisors,
            _sockets: sockets,
            autoscaler: None,
            tls: options.tls.clone(),
            api_key,
        };
        cluster.wait_until_serving(options.ready_timeout).await?;
        if let (Some(policy), Some((dir, path))) = (options.autoscale, cluster_file) {
            let router_http = cluster.router_http().context(
                "--autoscale reads the router's signal over HTTP: give it --http-listen",
            )?;
            let mut initial: Vec<Vec<ExpertSlot>> =
                (0..config.num_local_experts).map(|_| Vec::new()).collect();
            for slot in &cluster.experts {
                initial[slot.expert].push(slot.clone());
            }
            let autoscaler = Autoscaler::spawn(autoscaler::Scaled {
                options: options.clone(),
                policy,
                router_http,
                cluster_file: path,
                initial,
                events: cluster.events.clone(),
            });
            cluster.autoscaler = Some((autoscaler, dir));
        }
        Ok(cluster)
    }

    /// What a client dials: `https://` for a secure cluster ([`Cluster::access`]).
    pub fn router_uri(&self) -> String {
        let uri = self.router.uri();
        match (&self.tls, uri.strip_prefix("http://")) {
            (Some(_), Some(rest)) => format!("https://{rest}"),
            _ => uri,
        }
    }

    /// How a client reaches the router: over TLS trusting the cluster's
    /// CA when it has one, with the first key of the router's
    /// `--api-keys-file` when it has one.
    pub fn access(&self) -> Access {
        Access {
            ca: self.tls.as_ref().map(LocalPki::ca),
            api_key: self.api_key.clone(),
        }
    }

    /// The router's HTTP side (`/metrics`, `/dashboard`), when it has one.
    pub fn router_http(&self) -> Option<SocketAddr> {
        self.router.http
    }

    /// Expert processes per expert as `--autoscale` changes them; None
    /// without it.
    pub fn replica_counts(&self) -> Option<watch::Receiver<Vec<usize>>> {
        self.autoscaler
            .as_ref()
            .map(|(autoscaler, _)| autoscaler.replicas())
    }

    /// What happens to the expert processes from now on: exits, restarts,
    /// restarts that failed, scaling.
    pub fn events(&self) -> broadcast::Receiver<ExpertEvent> {
        self.events.subscribe()
    }

    /// Polls the router's gRPC health until SERVING (every expert answered).
    async fn wait_until_serving(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let uri = self.router_uri();
        let Access { ca, api_key } = self.access();
        // With --auth-health, health needs the key too.
        let token = BearerToken::new(api_key.as_deref())?;
        loop {
            let status = async {
                let channel = channel(&uri, ca.as_deref()).await?;
                let mut client = HealthClient::with_interceptor(channel, token.clone());
                let response = client
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await?;
                anyhow::Ok(response.into_inner().status)
            }
            .await;
            if matches!(status, Ok(s) if s == ServingStatus::Serving as i32) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("router at {uri} not serving after {timeout:?}: {status:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the router exits. Only the router's exit ends a
    /// cluster: an expert's is healed by its supervisor.
    pub async fn router_exited(&mut self) -> std::io::Result<ExitStatus> {
        self.router.wait().await
    }

    /// SIGTERM to the router, then to the experts (whose supervisors then
    /// restart nothing); SIGKILL for any that is still running after
    /// `grace`.
    pub async fn shutdown(mut self, grace: Duration) {
        self.router.terminate();
        if tokio::time::timeout(grace, self.router.wait())
            .await
            .is_err()
        {
            let _ = self.router.kill().await;
        }
        // After the router: its requests drain first, then the replicas the
        // autoscaler started.
        if let Some((autoscaler, _dir)) = self.autoscaler.take() {
            autoscaler.shutdown().await;
        }
        self.stop.send_replace(Some(grace));
        for supervisor in self.supervisors.drain(..) {
            let _ = supervisor.await;
        }
    }
}

fn path_arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// The first key of `--api-keys-file` among a router's `args` (either
/// `--api-keys-file FILE` or `--api-keys-file=FILE`), read as the router
/// reads it.
fn first_api_key(args: &[String]) -> anyhow::Result<Option<String>> {
    let file = args.iter().enumerate().find_map(|(index, arg)| {
        match arg.strip_prefix("--api-keys-file") {
            Some("") => args.get(index + 1).cloned(),
            Some(rest) => rest.strip_prefix('=').map(str::to_owned),
            None => None,
        }
    });
    let Some(file) = file else { return Ok(None) };
    let keys = std::fs::read_to_string(&file)
        .with_context(|| format!("cannot read the router's --api-keys-file {file}"))?;
    Ok(moe_proto::api_keys::keys(&keys).next().map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_api_key_is_read_from_either_form_of_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, "# ours\n\n  first \nsecond\n").unwrap();
        let path = file.display().to_string();
        for args in [
            vec![
                "--in-process".to_owned(),
                "--api-keys-file".into(),
                path.clone(),
            ],
            vec![format!("--api-keys-file={path}"), "--auth-health".into()],
        ] {
            assert_eq!(first_api_key(&args).unwrap().as_deref(), Some("first"));
        }
        assert_eq!(first_api_key(&["--in-process".into()]).unwrap(), None);
        let missing = first_api_key(&["--api-keys-file=/nonexistent".into()]).unwrap_err();
        assert!(
            format!("{missing:#}").contains("/nonexistent"),
            "{missing:#}"
        );
    }
}
