use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use moe::launcher::{
    Cluster, ClusterOptions, ExpertEvent, ExpertTransport, ReplicaCount, ScalePolicy,
};
use moe::pki::LocalPki;
use moe_model::Kernels;
use moe_proto::ExpertMode;
use tokio::sync::broadcast::{self, error::RecvError};

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Checkpoint directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Address of the router's public API.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Address of the router's HTTP side: /metrics and the live
    /// /dashboard (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub http_listen: SocketAddr,
    /// Follow each expert's desired-replicas signal: start and stop its
    /// expert processes as the HPA would on Kubernetes.
    #[arg(long)]
    pub autoscale: bool,
    /// With --autoscale: the fewest processes per expert.
    #[arg(long, default_value_t = 1)]
    pub min_replicas: usize,
    /// With --autoscale: the most processes per expert.
    #[arg(long, default_value_t = 4)]
    pub max_replicas: usize,
    /// With --autoscale: scale up only to what the signal asked for this
    /// long (the HPA's scale-up stabilisation window).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub scale_up_window: Duration,
    /// With --autoscale: scale down only once the signal stayed lower this
    /// long (the HPA's scale-down stabilisation window).
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    pub scale_down_window: Duration,
    /// gemm threads per expert process (RAYON_NUM_THREADS).
    #[arg(long, default_value_t = 1)]
    pub expert_threads: usize,
    /// How the router reaches the experts: loopback TCP, or Unix sockets
    /// in a private temporary directory.
    #[arg(long, value_enum, default_value_t = ExpertTransport::Tcp)]
    pub expert_transport: ExpertTransport,
    /// Run the experts inside the router (the in-process mode: no expert
    /// processes, same kernels), e.g. as the baseline of a comparison.
    #[arg(long)]
    pub in_process: bool,
    /// Expert processes per expert: N for every expert, E=N for expert E
    /// (repeatable); the router balances each expert's messages over them.
    #[arg(long = "replicas", value_name = "N|E=N")]
    pub replicas: Vec<ReplicaCount>,
    /// Extra flags passed to router-svc, e.g. --router-arg=--wire-dtype=bf16.
    #[arg(long = "router-arg", allow_hyphen_values = true)]
    pub router_args: Vec<String>,
    /// `--kernels` of every process: `fast` (hand-written CPU kernels) or
    /// `generic` (candle operations only, as on a GPU).
    #[arg(long, default_value_t = Kernels::Fast)]
    pub kernels: Kernels,
    /// CUDA devices, e.g. 0,1: expert processes get `--device cuda:N`
    /// round-robin over them, the router the first (needs binaries built
    /// with the cuda feature, docs/gpu.md).
    #[arg(long, value_name = "N,...", value_delimiter = ',')]
    pub gpus: Vec<usize>,
    /// TLS on the public API and mutual TLS between router and experts,
    /// with a throwaway CA and certificates made for this cluster (the CA's
    /// path is printed, for `moe generate --ca`).
    #[arg(long)]
    pub tls: bool,
}

impl UpArgs {
    pub fn cluster_options(&self) -> anyhow::Result<ClusterOptions> {
        anyhow::ensure!(
            (1..=self.max_replicas).contains(&self.min_replicas),
            "--min-replicas {} must be at least 1 and at most --max-replicas {}",
            self.min_replicas,
            self.max_replicas
        );
        let autoscale = self.autoscale.then_some(ScalePolicy {
            min_replicas: self.min_replicas,
            max_replicas: self.max_replicas,
            up_window: self.scale_up_window,
            down_window: self.scale_down_window,
        });
        let mut router_args = self.router_args.clone();
        if self.autoscale {
            // The signal's bounds are the loop's, unless told otherwise.
            for (flag, value) in [
                ("--autoscale-min-replicas", self.min_replicas),
                ("--autoscale-max-replicas", self.max_replicas),
            ] {
                if !router_args.iter().any(|arg| arg.starts_with(flag)) {
                    router_args.extend([flag.to_owned(), value.to_string()]);
                }
            }
        }
        Ok(ClusterOptions {
            autoscale,
            router_listen: self.listen,
            expert_threads: self.expert_threads,
            expert_transport: self.expert_transport,
            mode: if self.in_process {
                ExpertMode::InProcess
            } else {
                ExpertMode::Distributed
            },
            replicas: self.replicas.clone(),
            router_args,
            http_listen: Some(self.http_listen),
            kernels: self.kernels,
            gpus: self.gpus.clone(),
            tls: self.tls.then(LocalPki::generate).transpose()?,
            ..ClusterOptions::new(&self.model)?
        })
    }
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let options = args.cluster_options()?;
    let mut cluster = Cluster::start(&options).await?;
    println!(
        "moe-serve up: router at {} with {} expert processes, {} (Ctrl-C to stop)",
        cluster.router_uri(),
        cluster.experts.len(),
        options.mode
    );
    if let Some(ca) = &cluster.access().ca {
        println!(
            "  TLS: clients trust the CA in {} (moe generate --addr {} --ca {0} ...)",
            ca.display(),
            cluster.router_uri(),
        );
    }
    if let Some(http) = cluster.router_http() {
        println!("  dashboard: http://{http}/dashboard");
        println!("  metrics:   http://{http}/metrics");
    }
    for expert in &cluster.experts {
        let device = options.expert_device(expert.expert, expert.replica);
        let metrics = expert
            .metrics
            .map(|addr| format!(", metrics http://{addr}/metrics"))
            .unwrap_or_default();
        println!(
            "  {} at {} (pid {}) on {}{metrics}",
            expert.name,
            expert.addr,
            expert.pid().unwrap_or(0),
            device.as_deref().unwrap_or("cpu")
        );
    }
    // An expert that exits is restarted (and said so here); only the
    // router's exit ends the cluster.
    let events = cluster.events();
    tokio::select! {
        _ = moe_proto::transport::shutdown_signal() => println!("stopping"),
        exited = cluster.router_exited() => match exited {
            Ok(status) => eprintln!("router-svc exited ({status}); stopping the cluster"),
            Err(err) => eprintln!("router-svc: {err}; stopping the cluster"),
        },
        never = print_events(events) => match never {},
    }
    cluster.shutdown(Duration::from_secs(10)).await;
    Ok(())
}

/// Prints what happens to the expert processes for as long as the
/// cluster runs.
async fn print_events(mut events: broadcast::Receiver<ExpertEvent>) -> Infallible {
    loop {
        match events.recv().await {
            Ok(event) => println!("{event}"),
            Err(RecvError::Lagged(missed)) => println!("({missed} expert events missed)"),
            // Only once the cluster is gone, which `run` waits for first.
            Err(RecvError::Closed) => return std::future::pending().await,
        }
    }
}
