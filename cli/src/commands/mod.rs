mod bench;
mod demo;
mod generate;
mod init;
mod k8s;
mod up;

use clap::{Parser, Subcommand};

/// moe-serve: sparse Mixture-of-Experts models served as gRPC microservices.
#[derive(Debug, Parser)]
#[command(name = "moe", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a small deterministic checkpoint (no download needed).
    Init(init::InitArgs),
    /// Start one expert process per expert and the router, on loopback.
    Up(up::UpArgs),
    /// Stream a completion from a running router.
    Generate(generate::GenerateArgs),
    /// init (when absent) + up + one generate + shutdown.
    Demo(demo::DemoArgs),
    /// Closed-loop load: throughput, latency, utilisation, wire traffic.
    Bench(bench::BenchArgs),
    /// Write Kubernetes manifests (a kustomize directory) for a checkpoint.
    K8s(k8s::K8sArgs),
}

impl Cli {
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Init(args) => init::run(args),
            Command::Up(args) => up::run(args).await,
            Command::Generate(args) => generate::run(args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::K8s(args) => k8s::run(args),
        }
    }
}
