//! Starts a cluster on loopback: one expert-svc process per expert of the
//! checkpoint and one router-svc, each on a port it picks itself.
//!
//! Each child prints `... listening on ADDR` on stdout once bound; the
//! launcher reads that line rather than guessing free ports, and waits for
//! the router's gRPC health to say SERVING rather than sleeping.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use moe_proto::{ExpertMode, ListenAddr};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// How the router reaches the expert processes it starts. Both carry the
/// same gRPC and measured alike on one machine (docs/decisions.md); TCP
/// is the default because it is how experts on other machines are reached,
/// so it is what the benchmarks measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpertTransport {
    /// Loopback TCP, each expert on a port it picks.
    Tcp,
    /// Unix domain sockets in a private temporary directory.
    Unix,
}

/// The flag value that names it.
impl std::fmt::Display for ExpertTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let value = clap::ValueEnum::to_possible_value(self).expect("no variant is skipped");
        f.write_str(value.get_name())
    }
}

/// How many expert-svc processes serve each expert: `--replicas N` sets
/// every expert's count, `--replicas E=N` one expert's (it wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaCount {
    Every(usize),
    Expert { expert: usize, replicas: usize },
}

impl std::str::FromStr for ReplicaCount {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let count = |value: &str| match value.trim().parse::<usize>() {
            Ok(count) if count > 0 => Ok(count),
            _ => Err(format!(
                "--replicas {text:?}: expected a count of at least 1, as N or E=N"
            )),
        };
        match text.split_once('=') {
            None => Ok(Self::Every(count(text)?)),
            Some((expert, replicas)) => Ok(Self::Expert {
                expert: expert.trim().parse().map_err(|_| {
                    format!("--replicas {text:?}: {expert:?} is not an expert number")
                })?,
                replicas: count(replicas)?,
            }),
        }
    }
}

/// The replicas of `expert` under `counts` (1 unless a count says
/// otherwise; a later count wins over an earlier one of the same kind).
pub fn replicas_of(counts: &[ReplicaCount], expert: usize) -> usize {
    let for_expert = counts.iter().rev().find_map(|count| match *count {
        ReplicaCount::Expert {
            expert: e,
            replicas,
        } if e == expert => Some(replicas),
        _ => None,
    });
    let for_every = counts.iter().rev().find_map(|count| match *count {
        ReplicaCount::Every(replicas) => Some(replicas),
        _ => None,
    });
    for_expert.or(for_every).unwrap_or(1)
}

/// How to start a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub model: PathBuf,
    /// Where the router listens; port 0 picks one.
    pub router_listen: SocketAddr,
    /// Directory holding the expert-svc and router-svc binaries.
    pub bin_dir: PathBuf,
    /// gemm threads per expert process. 17 processes each with a thread per
    /// core would fight over the cores; experts get 1 by default, the router
    /// keeps the default (one per core) for attention.
    pub expert_threads: usize,
    /// How the router reaches the experts.
    pub expert_transport: ExpertTransport,
    /// Distributed (one expert-svc per expert) or in-process (the router
    /// runs the experts itself; no expert processes).
    pub mode: ExpertMode,
    /// Processes per expert in the distributed mode; the router spreads
    /// each expert's messages over them by load.
    pub replicas: Vec<ReplicaCount>,
    /// Extra flags for router-svc.
    pub router_args: Vec<String>,
    /// How long to wait for every process to be ready.
    pub ready_timeout: Duration,
    /// `RUST_LOG` for the children when the caller's environment sets none.
    pub log_filter: String,
}

impl ClusterOptions {
    pub fn new(model: impl Into<PathBuf>) -> anyhow::Result<Self> {
        Ok(Self {
            model: model.into(),
            router_listen: "127.0.0.1:0".parse()?,
            bin_dir: binaries_dir()?,
            expert_threads: 1,
            expert_transport: ExpertTransport::Tcp,
            mode: ExpertMode::Distributed,
            replicas: Vec::new(),
            router_args: Vec::new(),
            ready_timeout: Duration::from_secs(120),
            log_filter: "info".into(),
        })
    }
}

/// One running child process.
pub struct Process {
    pub name: String,
    pub addr: ListenAddr,
    child: Child,
}

impl Process {
    /// What a client dials to reach this process.
    pub fn uri(&self) -> String {
        self.addr.uri()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends SIGTERM: the process drains and exits.
    pub fn terminate(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Sends SIGSTOP: the process stops answering without closing its
    /// connections, as a hung one would. [`Process::resume`] undoes it.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Sends SIGCONT to a frozen process.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on a pid we spawned and have not reaped.
            unsafe {
                libc::kill(pid as libc::pid_t, signal);
            }
        }
    }

    /// Waits for the process to exit.
    pub async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait().await
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub async fn kill(&mut self) -> std::io::Result<()> {
        self.child.kill().await
    }
}

pub struct Cluster {
    pub router: Process,
    pub experts: Vec<Process>,
    /// Holds the experts' Unix sockets, removed with the cluster.
    _sockets: Option<tempfile::TempDir>,
}

/// The directory of the running executable, or its parent: `moe` lives
/// beside expert-svc and router-svc, a test binary one level below them.
pub fn binaries_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("executable has no directory")?;
    for candidate in [Some(dir), dir.parent()].into_iter().flatten() {
        if candidate.join("router-svc").is_file() && candidate.join("expert-svc").is_file() {
            return Ok(candidate.to_owned());
        }
    }
    bail!(
        "router-svc and expert-svc are not next to {}: build them with `cargo build --workspace`",
        exe.display()
    )
}

impl Cluster {
    pub async fn start(options: &ClusterOptions) -> anyhow::Result<Self> {
        let config =
            moe_model::ModelConfig::from_file(&options.model.join(moe_model::CONFIG_FILE))?;
        let mut experts = Vec::new();
        let sockets = match (options.mode, options.expert_transport) {
            (ExpertMode::Distributed, ExpertTransport::Unix) => Some(
                tempfile::Builder::new()
                    .prefix("moe-sockets-")
                    .tempdir()
                    .context("cannot make a directory for the experts' sockets")?,
            ),
            _ => None,
        };
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
                    for replica in 0..replicas_of(&options.replicas, expert) {
                        let listen = match &sockets {
                            Some(dir) => ListenAddr::Unix(
                                dir.path().join(format!("expert-{expert}-{replica}.sock")),
                            ),
                            None => ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 0))),
                        };
                        let mut process = start_expert(options, expert, None, &listen).await?;
                        if replica > 0 {
                            process.name = format!("expert-svc {expert} (replica {replica})");
                        }
                        router_args.push("--expert".into());
                        router_args.push(format!("{expert}={}", process.uri()));
                        experts.push(process);
                    }
                }
            }
        }
        router_args.extend(options.router_args.iter().cloned());
        let mut command = Command::new(options.bin_dir.join("router-svc"));
        command.args(&router_args);
        let router = spawn("router-svc".into(), command, options).await?;
        let cluster = Self {
            router,
            experts,
            _sockets: sockets,
        };
        cluster.wait_until_serving(options.ready_timeout).await?;
        Ok(cluster)
    }

    pub fn router_uri(&self) -> String {
        self.router.uri()
    }

    /// Polls the router's gRPC health until SERVING (every expert answered).
    async fn wait_until_serving(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let uri = self.router_uri();
        loop {
            let status = async {
                let mut client = HealthClient::new(moe_proto::transport::connect(&uri).await?);
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

    /// Waits until any process exits, and says which and how.
    pub async fn any_exit(&mut self) -> String {
        let mut waits = Vec::new();
        for process in std::iter::once(&mut self.router).chain(self.experts.iter_mut()) {
            let name = process.name.clone();
            waits.push(Box::pin(async move {
                let status = process.child.wait().await;
                format!("{name} exited: {status:?}")
            }));
        }
        futures::future::select_all(waits).await.0
    }

    /// SIGTERM to the router, then to the experts; SIGKILL for any that is
    /// still running after `grace`.
    pub async fn shutdown(mut self, grace: Duration) {
        self.router.terminate();
        let _ = tokio::time::timeout(grace, self.router.child.wait()).await;
        for expert in &self.experts {
            expert.terminate();
        }
        for process in std::iter::once(&mut self.router).chain(self.experts.iter_mut()) {
            if tokio::time::timeout(grace, process.child.wait())
                .await
                .is_err()
            {
                let _ = process.child.kill().await;
            }
        }
    }
}

fn path_arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// Starts one expert-svc process serving `expert` (for `layers`, "A..B",
/// or every layer) on `listen`, with the cluster's thread settings: one
/// gemm thread and one tokio worker unless `options` say otherwise, so
/// that a process per expert does not oversubscribe the cores.
pub async fn start_expert(
    options: &ClusterOptions,
    expert: usize,
    layers: Option<&str>,
    listen: &ListenAddr,
) -> anyhow::Result<Process> {
    let mut command = Command::new(options.bin_dir.join("expert-svc"));
    command
        .args(["--model", &path_arg(&options.model)])
        .args(["--listen", &listen.to_string()])
        .args(["--expert", &expert.to_string()])
        .env("RAYON_NUM_THREADS", options.expert_threads.to_string())
        .env("TOKIO_WORKER_THREADS", "1");
    if let Some(layers) = layers {
        command.args(["--layers", layers]);
    }
    spawn(format!("expert-svc {expert}"), command, options).await
}

/// Spawns `command` and waits for its `listening on ADDR` line. The child
/// dies with its handle (`kill_on_drop`), so no test leaks processes.
pub async fn spawn(
    name: String,
    mut command: Command,
    options: &ClusterOptions,
) -> anyhow::Result<Process> {
    let timeout = options.ready_timeout;
    if std::env::var_os("RUST_LOG").is_none() {
        command.env("RUST_LOG", &options.log_filter);
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(timeout, lines.next_line())
        .await
        .with_context(|| format!("{name} did not start listening within {timeout:?}"))??;
    let Some(addr) = line
        .as_deref()
        .and_then(|l| l.rsplit_once("listening on "))
        .map(|(_, addr)| addr.trim().to_owned())
    else {
        let status = child.wait().await?;
        bail!("{name} exited before listening ({status}); its log above says why");
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Process {
        addr: addr
            .parse()
            .map_err(|err| anyhow::anyhow!("{name} printed a bad address: {err}"))?,
        name,
        child,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_counts_parse_and_the_most_specific_wins() {
        let counts: Vec<ReplicaCount> = ["2", "3=4", "3=5"]
            .iter()
            .map(|text| text.parse().unwrap())
            .collect();
        assert_eq!(replicas_of(&counts, 0), 2);
        assert_eq!(replicas_of(&counts, 3), 5);
        assert_eq!(replicas_of(&[], 7), 1);
        for bad in ["0", "x", "1=0", "a=2", ""] {
            assert!(bad.parse::<ReplicaCount>().is_err(), "{bad:?}");
        }
    }
}
