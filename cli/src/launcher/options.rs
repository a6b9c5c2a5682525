//! How to start a cluster: the launcher's options and the values its
//! flags parse into.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use moe_model::Kernels;
use moe_proto::ExpertMode;

use super::scaling::ScalePolicy;
use crate::pki::LocalPki;

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
    /// The router's `--http-listen` (metrics, dashboard); port 0 picks one.
    pub http_listen: Option<SocketAddr>,
    /// Follow each expert's desired-replicas signal (`moe up --autoscale`):
    /// the router reads its replicas from a cluster file the launcher
    /// rewrites, starting with `min_replicas` per expert.
    pub autoscale: Option<ScalePolicy>,
    /// Environment variables for every child (e.g. `OTEL_*`).
    pub env: Vec<(String, String)>,
    /// Give each expert process a `/metrics` port (one it picks, kept
    /// across restarts).
    pub expert_metrics: bool,
    /// `--kernels` of every process: the router and each expert.
    pub kernels: Kernels,
    /// How long to wait for every process to be ready.
    pub ready_timeout: Duration,
    /// `RUST_LOG` for the children when the caller's environment sets none.
    pub log_filter: String,
    /// Restart an expert process that exits unasked, on the same address
    /// (with backoff). Off for tests of what the router does when an
    /// expert is gone for good.
    pub restart_experts: bool,
    /// CUDA devices to place the processes on ([`ClusterOptions::expert_device`]);
    /// empty: everything on the CPU.
    pub gpus: Vec<usize>,
    /// TLS on the public API and mutual TLS between router and experts,
    /// with these certificates (`moe up --tls`); None: plaintext.
    pub tls: Option<LocalPki>,
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
            http_listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            env: Vec::new(),
            autoscale: None,
            expert_metrics: true,
            kernels: Kernels::Fast,
            ready_timeout: Duration::from_secs(120),
            log_filter: "info".into(),
            restart_experts: true,
            gpus: Vec::new(),
            tls: None,
        })
    }

    /// The `--metrics-listen` of a newly started expert process.
    pub fn expert_metrics_listen(&self) -> Option<SocketAddr> {
        self.expert_metrics
            .then(|| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// The `--device` of replica `replica` of `expert`: round-robin over
    /// `gpus` by expert, each further replica of an expert one GPU on, so
    /// that an expert's replicas do not share a GPU while there are others.
    /// None (the CPU) without GPUs.
    pub fn expert_device(&self, expert: usize, replica: usize) -> Option<String> {
        let gpu = self.gpus.get((expert + replica) % self.gpus.len().max(1))?;
        Some(format!("cuda:{gpu}"))
    }

    /// The router's `--device`: the first GPU (its attention, KV cache and
    /// gate, and in the in-process mode every expert, run there).
    pub fn router_device(&self) -> Option<String> {
        self.gpus.first().map(|gpu| format!("cuda:{gpu}"))
    }
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

    #[test]
    fn gpus_are_assigned_round_robin_and_the_router_gets_the_first() {
        let mut options = ClusterOptions {
            model: "/nowhere".into(),
            router_listen: "127.0.0.1:0".parse().unwrap(),
            bin_dir: "/nowhere".into(),
            expert_threads: 1,
            expert_transport: ExpertTransport::Tcp,
            mode: ExpertMode::Distributed,
            replicas: Vec::new(),
            router_args: Vec::new(),
            http_listen: None,
            env: Vec::new(),
            autoscale: None,
            expert_metrics: false,
            kernels: Kernels::Fast,
            ready_timeout: Duration::from_secs(1),
            log_filter: "warn".into(),
            restart_experts: true,
            gpus: Vec::new(),
            tls: None,
        };
        assert_eq!(options.expert_device(3, 0), None);
        assert_eq!(options.router_device(), None);
        options.gpus = vec![2, 5, 7];
        let devices: Vec<_> = (0..5)
            .map(|expert| options.expert_device(expert, 0).unwrap())
            .collect();
        assert_eq!(devices, ["cuda:2", "cuda:5", "cuda:7", "cuda:2", "cuda:5"]);
        assert_eq!(options.expert_device(0, 1).as_deref(), Some("cuda:5"));
        assert_eq!(options.router_device().as_deref(), Some("cuda:2"));
    }
}
