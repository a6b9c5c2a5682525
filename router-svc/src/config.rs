//! Command-line flags, turned into one validated [`Config`] before anything
//! is loaded or connected.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use clap::builder::BoolishValueParser;
use moe_proto::{ExpertMode, ListenAddr, WireDType};

use crate::RouterError;
use crate::endpoints::{self, ExpertEndpoint};
use crate::scheduler::SchedulerConfig;

/// Serve a Mixture-of-Experts model: the public API, attention and gate
/// here, the experts in their own processes (or in this one).
#[derive(Debug, Parser)]
#[command(name = "router-svc", version)]
pub struct Args {
    /// Checkpoint directory (config.json, safetensors, tokenizer.json).
    #[arg(long, env = "MOE_MODEL")]
    pub model: PathBuf,
    /// Address of the public gRPC API: HOST:PORT (port 0 picks a free
    /// port) or unix:PATH.
    #[arg(long, env = "MOE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: ListenAddr,
    /// An expert endpoint: E=URI, or E@A..B=URI for layers A..B only.
    /// Repeat for every expert (and replica); the variable takes a
    /// comma-separated list.
    #[arg(
        long = "expert",
        value_name = "SPEC",
        env = "MOE_EXPERTS",
        value_delimiter = ','
    )]
    pub experts: Vec<String>,
    /// A JSON cluster file listing the expert endpoints.
    #[arg(long, env = "MOE_CLUSTER")]
    pub cluster: Option<PathBuf>,
    /// Run every expert inside this process (the in-process mode: same
    /// kernels, no network).
    #[arg(long, env = "MOE_IN_PROCESS", alias = "local-experts", value_parser = BoolishValueParser::new())]
    pub in_process: bool,
    /// `cpu` or `cuda:N`, for attention (and the experts, in-process).
    #[arg(long, env = "MOE_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Tokens per step at most (decodes plus prompt chunks).
    #[arg(long, env = "MOE_MAX_BATCH_TOKENS", default_value_t = 1024)]
    pub max_batch_tokens: usize,
    /// Steps of at least this many tokens run as two micro-batches, one's
    /// attention overlapping the other's experts; 0 never splits.
    /// Decode-only steps always run whole (splitting them would read every
    /// expert's weights twice).
    #[arg(long, env = "MOE_PIPELINE_MIN_TOKENS", default_value_t = 256)]
    pub pipeline_min_tokens: usize,
    /// Sequences running at once at most.
    #[arg(long, env = "MOE_MAX_RUNNING", default_value_t = 128)]
    pub max_running: usize,
    /// Requests waiting for a running slot at most; more get
    /// RESOURCE_EXHAUSTED at once.
    #[arg(long, env = "MOE_QUEUE_CAPACITY", default_value_t = 1024)]
    pub queue_capacity: usize,
    /// KV cache bytes the running sequences may reserve: each reserves
    /// what its prompt and max_tokens can fill; beyond it requests wait in
    /// the queue. Unset: --max-running is the only bound.
    #[arg(long, env = "MOE_KV_CACHE_BYTES")]
    pub kv_cache_bytes: Option<u64>,
    /// Seconds an expert may take to return one message's result.
    #[arg(long, env = "MOE_EXPERT_TIMEOUT_SECS", default_value_t = 30)]
    pub expert_timeout_secs: u64,
    /// Element type of hidden states on the wire: f32, bf16 or f16.
    #[arg(long, env = "MOE_WIRE_DTYPE", default_value = "f32")]
    pub wire_dtype: WireDType,
    /// Seconds to let running requests finish after SIGTERM.
    #[arg(long, env = "MOE_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,
    /// Run this process's threads as SCHED_BATCH (Linux), so that its
    /// wake-ups do not preempt expert processes on the same cores.
    #[arg(long, env = "MOE_SCHED_BATCH", value_parser = BoolishValueParser::new())]
    pub sched_batch: bool,
}

/// Where the experts are.
#[derive(Debug, Clone)]
pub enum ExpertPlacement {
    /// expert-svc processes at these endpoints.
    Distributed(Vec<ExpertEndpoint>),
    /// In this process.
    InProcess,
}

impl ExpertPlacement {
    pub fn mode(&self) -> ExpertMode {
        match self {
            Self::Distributed(_) => ExpertMode::Distributed,
            Self::InProcess => ExpertMode::InProcess,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub model: PathBuf,
    pub listen: ListenAddr,
    pub experts: ExpertPlacement,
    pub device: String,
    pub scheduler: SchedulerConfig,
    pub expert_timeout: Duration,
    pub wire_dtype: WireDType,
    pub shutdown_grace: Duration,
}

impl TryFrom<Args> for Config {
    type Error = RouterError;

    fn try_from(args: Args) -> Result<Self, RouterError> {
        let sources = usize::from(args.in_process)
            + usize::from(!args.experts.is_empty())
            + usize::from(args.cluster.is_some());
        if sources != 1 {
            return Err(RouterError::invalid(
                "say where the experts are with exactly one of --in-process, --expert or --cluster",
            ));
        }
        let experts = if args.in_process {
            ExpertPlacement::InProcess
        } else if let Some(path) = &args.cluster {
            ExpertPlacement::Distributed(endpoints::read_cluster_file(path)?)
        } else {
            ExpertPlacement::Distributed(
                args.experts
                    .iter()
                    .map(|flag| endpoints::parse_flag(flag))
                    .collect::<Result<_, _>>()?,
            )
        };
        for (name, value) in [
            ("--max-batch-tokens", args.max_batch_tokens),
            ("--max-running", args.max_running),
            ("--queue-capacity", args.queue_capacity),
        ] {
            if value == 0 {
                return Err(RouterError::invalid(format!("{name} must be positive")));
            }
        }
        Ok(Self {
            model: args.model,
            listen: args.listen,
            experts,
            device: args.device,
            scheduler: SchedulerConfig {
                max_batch_tokens: args.max_batch_tokens,
                pipeline_min_tokens: args.pipeline_min_tokens,
                max_running: args.max_running,
                queue_capacity: args.queue_capacity,
                kv_cache_bytes: args.kv_cache_bytes,
            },
            expert_timeout: Duration::from_secs(args.expert_timeout_secs),
            wire_dtype: args.wire_dtype,
            shutdown_grace: Duration::from_secs(args.shutdown_grace_secs),
        })
    }
}
