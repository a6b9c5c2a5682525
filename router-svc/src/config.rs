//! Command-line flags, turned into one validated [`Config`] before anything
//! is loaded or connected.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use clap::builder::BoolishValueParser;
use moe_model::{Kernels, WeightDType};
use moe_proto::limits::ConnectionAge;
use moe_proto::tls::{ClientTlsFiles, Identity, ServerTlsFiles};
use moe_proto::{ExpertMode, ListenAddr, ServerLimits, WireDType};
use moe_telemetry::LogFormat;

use crate::RouterError;
use crate::autoscale::AutoscalePolicy;
use crate::dispatch::FailoverPolicy;
use crate::endpoints;
use crate::replicas::discovery::Sources;
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
    /// A JSON cluster file listing the expert endpoints; re-read when it
    /// changes, so replicas can be added and removed while the router runs.
    #[arg(long, env = "MOE_CLUSTER")]
    pub cluster: Option<PathBuf>,
    /// How often `dns:///NAME:PORT` endpoints are resolved again (also
    /// soon after a replica cannot be reached), e.g. 5s or 500ms.
    #[arg(long, env = "MOE_RESOLVE_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub resolve_interval: Duration,
    /// The DNS server (HOST:PORT) that resolves `dns:` endpoints;
    /// otherwise the system's resolver configuration.
    #[arg(long, env = "MOE_DNS_SERVER")]
    pub dns_server: Option<SocketAddr>,
    /// Times one expert message may be sent again to another replica
    /// after its replica failed or did not answer in time.
    #[arg(long, env = "MOE_EXPERT_RETRIES", default_value_t = 2)]
    pub expert_retries: u32,
    /// How long rows wait for an expert that has no ready replica (long
    /// enough to cover a restart) before they fail or are rerouted.
    #[arg(long, env = "MOE_NO_REPLICA_WAIT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub no_replica_wait: Duration,
    /// When an expert has had no ready replica for --no-replica-wait: fail
    /// the requests that need it (UNAVAILABLE), or reroute their rows to
    /// the next-best ready experts by gate score and flag them degraded.
    #[arg(long, env = "MOE_ON_EXPERT_DOWN", value_enum, default_value_t = OnExpertDown::Fail)]
    pub on_expert_down: OnExpertDown,
    /// Run every expert inside this process (the in-process mode: same
    /// kernels, no network).
    #[arg(long, env = "MOE_IN_PROCESS", alias = "local-experts", value_parser = BoolishValueParser::new())]
    pub in_process: bool,
    /// `cpu` or `cuda:N`, for attention (and the experts, in-process).
    #[arg(long, env = "MOE_DEVICE", default_value = "cpu")]
    pub device: String,
    /// `fast` (hand-written CPU kernels where they apply) or `generic`
    /// (candle operations only, as on a GPU, which always gets them), for
    /// attention (and the experts, in-process).
    #[arg(long, env = "MOE_KERNELS", default_value_t = Kernels::Fast)]
    pub kernels: Kernels,
    /// The weights' dtype (attention, and the experts in-process), f32,
    /// f16 or bf16: by default f32 on the CPU and the checkpoint's own on
    /// a GPU (other than f32 on the CPU needs --kernels generic).
    #[arg(long, env = "MOE_DTYPE")]
    pub dtype: Option<WeightDType>,
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
    /// The largest request the public API decodes, in bytes; a larger one
    /// is refused (RESOURCE_EXHAUSTED) from its length before it is read.
    /// The default holds a prompt of 4 MiB of text or ~800k token ids;
    /// prompts are bounded by the context as well (docs/tuning.md).
    #[arg(long, env = "MOE_MAX_REQUEST_BYTES", default_value_t = 4 << 20)]
    pub max_request_bytes: usize,
    /// HTTP/2 streams (requests) one client connection may have open at
    /// once; more wait in the client.
    #[arg(long, env = "MOE_MAX_CONCURRENT_STREAMS", default_value_t = moe_proto::limits::DEFAULT_MAX_CONCURRENT_STREAMS)]
    pub max_concurrent_streams: u32,
    /// Client connections held at once; more wait to be accepted (in the
    /// kernel's backlog) until one closes.
    #[arg(long, env = "MOE_MAX_CONNECTIONS", default_value_t = moe_proto::limits::DEFAULT_ROUTER_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// After this long a client connection is asked to go (HTTP/2 GOAWAY):
    /// its running streams finish, its client opens a new one for the
    /// next. Idle connections held open then make room for others.
    /// "off": never.
    #[arg(long, env = "MOE_MAX_CONNECTION_AGE", default_value = "5m")]
    pub max_connection_age: ConnectionAge,
    /// A running request whose client has taken none of its output for this
    /// long is cancelled, freeing its running slot, e.g. 30s.
    #[arg(long, env = "MOE_STALLED_CLIENT_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub stalled_client_timeout: Duration,
    /// Seconds an expert may take to return one message's result.
    #[arg(long, env = "MOE_EXPERT_TIMEOUT_SECS", default_value_t = 30)]
    pub expert_timeout_secs: u64,
    /// Element type of hidden states on the wire: f32, bf16 or f16.
    #[arg(long, env = "MOE_WIRE_DTYPE", default_value = "f32")]
    pub wire_dtype: WireDType,
    /// Seconds to let running requests finish after SIGTERM.
    #[arg(long, env = "MOE_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,
    /// The busy fraction the autoscaling signal sizes each expert's
    /// replicas for (`moe_expert_desired_replicas`).
    #[arg(long, env = "MOE_AUTOSCALE_TARGET_UTILISATION", default_value_t = 0.7)]
    pub autoscale_target_utilisation: f64,
    /// The fewest replicas the autoscaling signal asks for.
    #[arg(long, env = "MOE_AUTOSCALE_MIN_REPLICAS", default_value_t = 1)]
    pub autoscale_min_replicas: u32,
    /// The most replicas the autoscaling signal asks for.
    #[arg(long, env = "MOE_AUTOSCALE_MAX_REPLICAS", default_value_t = 8)]
    pub autoscale_max_replicas: u32,
    /// The time constant the signal smooths routed rows over, e.g. 10s.
    #[arg(long, env = "MOE_AUTOSCALE_SMOOTHING", default_value = "10s", value_parser = humantime::parse_duration)]
    pub autoscale_smoothing: Duration,
    /// Serve `/metrics`, the live `/dashboard` and its JSON over HTTP on
    /// HOST:PORT (port 0 picks a free port); off when unset.
    #[arg(long, env = "MOE_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Log lines as `text`, or as `json` (one object a line, with trace
    /// and span ids when traced).
    #[arg(long, env = "MOE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Run this process's threads as SCHED_BATCH (Linux), so that its
    /// wake-ups do not preempt expert processes on the same cores.
    #[arg(long, env = "MOE_SCHED_BATCH", value_parser = BoolishValueParser::new())]
    pub sched_batch: bool,
    /// Serve the public API over TLS with this certificate chain (PEM;
    /// re-read when it changes). Needs --tls-key.
    #[arg(long, env = "MOE_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "MOE_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Dial every expert over TLS and trust only certificates this CA
    /// (PEM) signed, named for the endpoint's host (a dns: endpoint's
    /// NAME); `https://` endpoints need it.
    #[arg(long, env = "MOE_EXPERT_TLS_CA", value_name = "FILE")]
    pub expert_tls_ca: Option<PathBuf>,
    /// The client certificate (PEM) presented to experts (mutual TLS).
    /// Needs --expert-tls-key and --expert-tls-ca.
    #[arg(long, env = "MOE_EXPERT_TLS_CERT", value_name = "FILE", requires_all = ["expert_tls_key", "expert_tls_ca"])]
    pub expert_tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --expert-tls-cert.
    #[arg(
        long,
        env = "MOE_EXPERT_TLS_KEY",
        value_name = "FILE",
        requires = "expert_tls_cert"
    )]
    pub expert_tls_key: Option<PathBuf>,
    /// Require `authorization: Bearer KEY` on the public API, KEY one of
    /// this file's lines (blank lines and # comments ignored; re-read when
    /// it changes); others get UNAUTHENTICATED.
    #[arg(long, env = "MOE_API_KEYS_FILE", value_name = "FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Require the API key for gRPC health and reflection too (otherwise
    /// open, for probes that cannot send one).
    #[arg(long, env = "MOE_AUTH_HEALTH", value_parser = BoolishValueParser::new(), requires = "api_keys_file")]
    pub auth_health: bool,
}

/// TLS and authentication: the public API's certificate, the experts' CA
/// and the router's client certificate, the API keys.
#[derive(Debug, Clone, Default)]
pub struct Security {
    pub tls: Option<ServerTlsFiles>,
    pub expert_tls: Option<ClientTlsFiles>,
    pub api_keys: Option<PathBuf>,
    /// Health and reflection need the key too.
    pub auth_health: bool,
}

impl Security {
    fn from_args(args: &Args) -> Self {
        let identity = |cert: &Option<PathBuf>, key: &Option<PathBuf>| {
            Some(Identity {
                cert: cert.clone()?,
                key: key.clone()?,
            })
        };
        Self {
            tls: identity(&args.tls_cert, &args.tls_key).map(|identity| ServerTlsFiles {
                identity,
                client_ca: None,
            }),
            expert_tls: args.expert_tls_ca.clone().map(|ca| ClientTlsFiles {
                ca,
                identity: identity(&args.expert_tls_cert, &args.expert_tls_key),
            }),
            api_keys: args.api_keys_file.clone(),
            auth_health: args.auth_health,
        }
    }
}

/// What happens to rows whose expert has no ready replica: `Fail`, the
/// requests that need it end with UNAVAILABLE naming it; `Reroute`, its
/// rows go to their next-best ready experts and the requests are flagged
/// degraded. (The variants carry no doc comments so that `--help` keeps
/// its one-line form.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnExpertDown {
    Fail,
    Reroute,
}

/// Where the experts are.
#[derive(Debug, Clone)]
pub enum ExpertPlacement {
    /// expert-svc processes that these sources list.
    Distributed(Sources),
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
    pub kernels: Kernels,
    /// None: the device's default ([`WeightDType::resolve`]).
    pub dtype: Option<WeightDType>,
    pub scheduler: SchedulerConfig,
    pub expert_timeout: Duration,
    pub failover: FailoverPolicy,
    pub on_expert_down: OnExpertDown,
    pub wire_dtype: WireDType,
    pub shutdown_grace: Duration,
    pub autoscale: AutoscalePolicy,
    /// The public API's bounds on a client.
    pub limits: ServerLimits,
    /// How long a client may leave its output untaken.
    pub stalled_client_timeout: Duration,
    pub security: Security,
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
        } else {
            ExpertPlacement::Distributed(Sources {
                flags: args
                    .experts
                    .iter()
                    .map(|flag| endpoints::parse_flag(flag))
                    .collect::<Result<_, _>>()?,
                cluster_file: args.cluster.clone(),
                resolve_interval: args.resolve_interval,
                dns_server: args.dns_server,
            })
        };
        for (name, value) in [
            ("--max-batch-tokens", args.max_batch_tokens),
            ("--max-running", args.max_running),
            ("--queue-capacity", args.queue_capacity),
            ("--max-request-bytes", args.max_request_bytes),
            (
                "--max-concurrent-streams",
                args.max_concurrent_streams as usize,
            ),
            ("--max-connections", args.max_connections),
        ] {
            if value == 0 {
                return Err(RouterError::invalid(format!("{name} must be positive")));
            }
        }
        let autoscale = AutoscalePolicy {
            target_utilisation: args.autoscale_target_utilisation,
            min_replicas: args.autoscale_min_replicas,
            max_replicas: args.autoscale_max_replicas,
            smoothing: args.autoscale_smoothing,
        };
        if !(autoscale.target_utilisation > 0.0 && autoscale.target_utilisation <= 1.0) {
            return Err(RouterError::invalid(format!(
                "--autoscale-target-utilisation {} must be in (0, 1]",
                autoscale.target_utilisation
            )));
        }
        if autoscale.min_replicas > autoscale.max_replicas {
            return Err(RouterError::invalid(format!(
                "--autoscale-min-replicas {} is above --autoscale-max-replicas {}",
                autoscale.min_replicas, autoscale.max_replicas
            )));
        }
        Ok(Self {
            security: Security::from_args(&args),
            autoscale,
            model: args.model,
            listen: args.listen,
            experts,
            device: args.device,
            kernels: args.kernels,
            dtype: args.dtype,
            scheduler: SchedulerConfig {
                max_batch_tokens: args.max_batch_tokens,
                pipeline_min_tokens: args.pipeline_min_tokens,
                max_running: args.max_running,
                queue_capacity: args.queue_capacity,
                kv_cache_bytes: args.kv_cache_bytes,
            },
            expert_timeout: Duration::from_secs(args.expert_timeout_secs),
            failover: FailoverPolicy {
                retries: args.expert_retries,
                no_replica_wait: args.no_replica_wait,
            },
            on_expert_down: args.on_expert_down,
            wire_dtype: args.wire_dtype,
            shutdown_grace: Duration::from_secs(args.shutdown_grace_secs),
            limits: ServerLimits {
                max_message_bytes: args.max_request_bytes,
                max_concurrent_streams: args.max_concurrent_streams,
                max_connections: args.max_connections,
                max_connection_age: args.max_connection_age.0,
            },
            stalled_client_timeout: args.stalled_client_timeout,
        })
    }
}
