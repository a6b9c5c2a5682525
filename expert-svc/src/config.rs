//! Command-line flags, turned into one validated [`Config`] before anything
//! is loaded or bound.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use moe_model::{Kernels, WeightDType};
use moe_proto::ListenAddr;
use moe_proto::limits::ConnectionAge;
use moe_proto::tls::{Identity, ServerTlsFiles};
use moe_telemetry::LogFormat;

/// Serve one expert of a Mixture-of-Experts checkpoint over gRPC.
#[derive(Debug, Parser)]
#[command(name = "expert-svc", version)]
pub struct Args {
    /// Checkpoint directory (config.json and safetensors).
    #[arg(long, env = "MOE_MODEL")]
    pub model: PathBuf,
    /// Which expert this process serves.
    #[arg(long, env = "MOE_EXPERT")]
    pub expert: usize,
    /// Layers to serve, as A..B (end excluded); all layers when absent.
    #[arg(long, env = "MOE_LAYERS")]
    pub layers: Option<String>,
    /// Address to listen on: HOST:PORT (port 0 picks a free port), or
    /// unix:PATH for a router on the same machine.
    #[arg(long, env = "MOE_LISTEN", default_value = "127.0.0.1:50061")]
    pub listen: ListenAddr,
    /// `cpu` or `cuda:N`.
    #[arg(long, env = "MOE_DEVICE", default_value = "cpu")]
    pub device: String,
    /// `fast` (hand-written CPU kernels where they apply) or `generic`
    /// (candle operations only, as on a GPU, which always gets them).
    #[arg(long, env = "MOE_KERNELS", default_value_t = Kernels::Fast)]
    pub kernels: Kernels,
    /// The weights' dtype, f32, f16 or bf16: by default f32 on the CPU and
    /// the checkpoint's own on a GPU (other than f32 on the CPU needs
    /// --kernels generic).
    #[arg(long, env = "MOE_DTYPE")]
    pub dtype: Option<WeightDType>,
    /// Serve `/metrics` over HTTP on HOST:PORT (port 0 picks a free
    /// port); off when unset.
    #[arg(long, env = "MOE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Log lines as `text`, or as `json` (one object a line, with trace
    /// and span ids when traced).
    #[arg(long, env = "MOE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Seconds to finish in-flight messages after SIGTERM before exiting.
    #[arg(long, env = "MOE_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,
    /// Rows one Forward message may hold at most: a larger message is
    /// refused (RESOURCE_EXHAUSTED) from its length, before it is read. A
    /// router sends at most one row per token of a step, so this must be at
    /// least its --max-batch-tokens.
    #[arg(long, env = "MOE_MAX_ROWS", default_value_t = moe_proto::limits::DEFAULT_MAX_ROWS)]
    pub max_rows: usize,
    /// HTTP/2 streams one connection may have open at once (a router
    /// needs one Forward stream and a health watch per connection).
    #[arg(long, env = "MOE_MAX_CONCURRENT_STREAMS", default_value_t = moe_proto::limits::DEFAULT_MAX_CONCURRENT_STREAMS)]
    pub max_concurrent_streams: u32,
    /// Connections held at once; more wait to be accepted (in the kernel's
    /// backlog) until one closes. Each router holds one.
    #[arg(long, env = "MOE_MAX_CONNECTIONS", default_value_t = moe_proto::limits::DEFAULT_EXPERT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// After this long a connection is asked to go (HTTP/2 GOAWAY): its
    /// streams finish, new ones go on a new connection. Off by default: a
    /// router holds its connection for good.
    #[arg(long, env = "MOE_MAX_CONNECTION_AGE", default_value = "off")]
    pub max_connection_age: ConnectionAge,
    /// Serve over mutual TLS with this certificate chain (PEM; re-read
    /// when it changes). Needs --tls-key and --tls-ca.
    #[arg(long, env = "MOE_TLS_CERT", value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "MOE_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Accept only clients (routers) with a certificate this CA (PEM)
    /// signed; others cannot connect.
    #[arg(long, env = "MOE_TLS_CA", value_name = "FILE", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub model: PathBuf,
    pub expert: usize,
    pub layers: Option<Range<usize>>,
    pub listen: ListenAddr,
    pub device: String,
    pub kernels: Kernels,
    /// None: the device's default ([`WeightDType::resolve`]).
    pub dtype: Option<WeightDType>,
    pub shutdown_grace: Duration,
    /// `--max-rows`.
    pub max_rows: usize,
    /// `--max-concurrent-streams`.
    pub max_concurrent_streams: u32,
    /// `--max-connections`.
    pub max_connections: usize,
    /// `--max-connection-age`.
    pub max_connection_age: Option<Duration>,
    /// Mutual TLS: this process's certificate and its clients' CA.
    pub tls: Option<ServerTlsFiles>,
}

impl TryFrom<Args> for Config {
    type Error = String;

    fn try_from(args: Args) -> Result<Self, Self::Error> {
        let layers = args.layers.as_deref().map(parse_layers).transpose()?;
        if args.max_rows == 0 || args.max_concurrent_streams == 0 || args.max_connections == 0 {
            return Err(
                "--max-rows, --max-concurrent-streams and --max-connections must be positive"
                    .into(),
            );
        }
        Ok(Self {
            model: args.model,
            expert: args.expert,
            layers,
            listen: args.listen,
            device: args.device,
            kernels: args.kernels,
            dtype: args.dtype,
            shutdown_grace: Duration::from_secs(args.shutdown_grace_secs),
            max_rows: args.max_rows,
            max_concurrent_streams: args.max_concurrent_streams,
            max_connections: args.max_connections,
            max_connection_age: args.max_connection_age.0,
            tls: match (args.tls_cert, args.tls_key, args.tls_ca) {
                (Some(cert), Some(key), Some(ca)) => Some(ServerTlsFiles {
                    identity: Identity { cert, key },
                    client_ca: Some(ca),
                }),
                (None, None, None) => None,
                _ => return Err("--tls-cert, --tls-key and --tls-ca go together".into()),
            },
        })
    }
}

/// Parses `A..B` into a non-empty range.
pub fn parse_layers(text: &str) -> Result<Range<usize>, String> {
    let invalid = || format!("--layers {text:?}: expected A..B with A < B, e.g. 0..4");
    let (start, end) = text.split_once("..").ok_or_else(invalid)?;
    let start: usize = start.trim().parse().map_err(|_| invalid())?;
    let end: usize = end.trim().parse().map_err(|_| invalid())?;
    if start >= end {
        return Err(invalid());
    }
    Ok(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_ranges() {
        assert_eq!(parse_layers("0..4"), Ok(0..4));
        assert_eq!(parse_layers("2..3"), Ok(2..3));
        assert!(parse_layers("3..3").is_err());
        assert!(parse_layers("4").is_err());
        assert!(parse_layers("a..b").is_err());
    }
}
