//! The transport settings every moe-serve hop shares, set explicitly on both
//! sides: message size limits (tonic's 4 MiB default is too small for a
//! prefill step), HTTP/2 windows, TCP_NODELAY and keepalives; and the
//! serve-then-drain sequence both services follow.

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::server::NamedService;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::{Router, TcpIncoming};
use tonic::transport::{Channel, Endpoint, Server};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tower::Layer;

use crate::client_fault::{ClientFault, ClientFaultLayer};
use crate::limits::ServerLimits;
use crate::v1::expert_client::ExpertClient;
use crate::v1::expert_server::{Expert, ExpertServer};
use crate::v1::inference_client::InferenceClient;
use crate::v1::inference_server::{Inference, InferenceServer};
use crate::{Listener, MAX_MESSAGE_BYTES};

/// The public API's server: it decodes requests of `limits`' size at most
/// (`--max-request-bytes`), answers undecodable ones as the client's fault,
/// and sends up to [`MAX_MESSAGE_BYTES`].
pub fn inference_server<T: Inference>(
    service: T,
    limits: &ServerLimits,
) -> ClientFault<InferenceServer<T>> {
    let server = InferenceServer::new(service)
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    ClientFaultLayer {
        limit: "--max-request-bytes",
    }
    .layer(server)
}

/// An expert's server: it decodes messages of `limits`' size at most
/// (`--max-rows` rows of the model's width), and sends as large.
pub fn expert_server<T: Expert>(service: T, limits: &ServerLimits) -> ClientFault<ExpertServer<T>> {
    let server = ExpertServer::new(service)
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(limits.max_message_bytes);
    ClientFaultLayer {
        limit: "--max-rows rows of the model's width",
    }
    .layer(server)
}

/// A client of the public API, with [`MAX_MESSAGE_BYTES`] both ways.
pub fn inference_client(channel: Channel) -> InferenceClient<Channel> {
    InferenceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// A client of an expert, with [`MAX_MESSAGE_BYTES`] both ways.
pub fn expert_client(channel: Channel) -> ExpertClient<Channel> {
    ExpertClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// HTTP/2 flow-control windows. A prefill step sends each expert hundreds
/// of KiB per layer, and HTTP/2's 64 KiB default would stall every message
/// on window updates. Adaptive windows start there too and grow only after
/// round trips; fixed large windows let a layer's message go out at once,
/// which matters across a network (docs/decisions.md).
const STREAM_WINDOW_BYTES: u32 = 16 << 20;
const CONNECTION_WINDOW_BYTES: u32 = 64 << 20;

/// Server-side settings: large HTTP/2 windows and keepalives that notice a
/// peer that vanished without closing its connection.
pub fn server_builder() -> Server {
    Server::builder()
        .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES))
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .tcp_nodelay(true)
}

/// Request headers (gRPC metadata) a server takes: a trace parent and a
/// bearer token need a few hundred bytes.
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// Accepted connections from an already-bound listener, without Nagle's
/// delay (a decode step is many small messages).
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// A client endpoint with the same windows and keepalives as the servers.
/// `uri` is `http://host:port`.
pub fn endpoint(uri: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(uri.to_owned())?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true))
}

/// Connects to `uri` with [`endpoint`]'s settings.
pub async fn connect(uri: &str) -> Result<Channel, tonic::transport::Error> {
    endpoint(uri)?.connect().await
}

/// gRPC server reflection listing `services` (the process's own API, health
/// and reflection: only what it serves), in both protocol versions: grpcurl
/// and Python's grpcio still speak only v1alpha.
fn reflection(
    services: &[&str],
) -> (
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
) {
    let builder = || {
        let builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            );
        REFLECTED_ALWAYS
            .iter()
            .chain(services)
            .fold(builder, |builder, name| builder.with_service_name(*name))
    };
    (
        builder()
            .build_v1()
            .expect("the moe.v1 descriptors are valid"),
        builder()
            .build_v1alpha()
            .expect("the moe.v1 descriptors are valid"),
    )
}

/// What every process serves besides its own API, as reflection names it.
const REFLECTED_ALWAYS: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// A server carrying what every moe-serve service serves besides its own
/// API: gRPC health (returned, for the caller to flip) and reflection.
/// Reflection lists no moe.v1 service: [`server_for`] is what a process
/// that serves one uses.
pub fn server_with_health_and_reflection() -> (HealthReporter, Router) {
    let health = HealthReporter::new();
    let server = server_with(&[], &ServerLimits::default(), &health, open);
    (health, server)
}

/// A server for the service `S` (added by the caller) within `limits`,
/// with the gRPC health `health` reports (made before the server, so that
/// the HTTP probes can follow it from the start) and with reflection that
/// lists `S` and no other moe.v1 service.
pub fn server_for<S: NamedService>(limits: &ServerLimits, health: &HealthReporter) -> Router {
    server_with(&[S::NAME], limits, health, open)
}

/// [`server_for`], with `guard` checking every health and reflection call
/// (the router's `--auth-health`).
pub fn server_for_guarded<S: NamedService>(
    limits: &ServerLimits,
    health: &HealthReporter,
    guard: impl Interceptor + Clone + Send + Sync + 'static,
) -> Router {
    server_with(&[S::NAME], limits, health, guard)
}

/// Lets every call through.
fn open(request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    Ok(request)
}

fn server_with(
    services: &[&str],
    limits: &ServerLimits,
    health: &HealthReporter,
    guard: impl Interceptor + Clone + Send + Sync + 'static,
) -> Router {
    let health_service = HealthServer::new(HealthService::from_health_reporter(health.clone()));
    let (reflection_v1, reflection_v1alpha) = reflection(services);
    // Health and reflection decode with tonic's default limit (4 MiB).
    let blamed = ClientFaultLayer {
        limit: "4 MiB for health and reflection",
    };
    let builder = server_builder().max_concurrent_streams(limits.max_concurrent_streams);
    let mut builder = match limits.max_connection_age {
        Some(age) => builder.max_connection_age(age),
        None => builder,
    };
    builder
        .add_service(InterceptedService::new(
            blamed.layer(health_service),
            guard.clone(),
        ))
        .add_service(InterceptedService::new(
            blamed.layer(reflection_v1),
            guard.clone(),
        ))
        .add_service(InterceptedService::new(
            blamed.layer(reflection_v1alpha),
            guard,
        ))
}

/// Logs to stderr, filtered by `RUST_LOG` or else `default_filter`
/// (stdout is kept for the one `listening on ADDR` line launchers read).
///
/// `MOE_LOG_SPAN_TIMES=1` also logs every enabled span as it closes, with
/// its busy and idle time: with `RUST_LOG=debug` that is a per-step,
/// per-layer time profile (attention, MoE dispatch, expert forward passes).
pub fn init_logging(default_filter: &str) {
    let span_events = if std::env::var_os("MOE_LOG_SPAN_TIMES").is_some_and(|v| v == "1") {
        tracing_subscriber::fmt::format::FmtSpan::CLOSE
    } else {
        tracing_subscriber::fmt::format::FmtSpan::NONE
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_span_events(span_events)
        .with_writer(std::io::stderr)
        .init();
}

/// Resolves on SIGTERM (what Kubernetes sends) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(term) => term,
            Err(err) => {
                tracing::warn!(%err, "cannot listen for SIGTERM; only Ctrl-C stops this process");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Sets the health of `S` and the overall health ("", what a Kubernetes
/// gRPC probe asks by default) together.
pub async fn set_serving<S: NamedService>(health: &HealthReporter, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    health.set_service_status("", status).await;
    health.set_service_status(S::NAME, status).await;
}

/// A process's drain switch: false while serving, true from the moment it
/// starts draining. Services hold the receiver and stop taking new work
/// when it turns.
pub fn drain_switch() -> (watch::Sender<bool>, watch::Receiver<bool>) {
    watch::channel(false)
}

/// Serves `server` on `listener` (at most `max_connections` connections at
/// once) until `shutdown` resolves, then drains:
/// reports `S` (and the process) NOT_SERVING, flips `draining`, stops
/// accepting connections, and waits for open streams to end, for no longer
/// than `grace`. Long-lived streams (an expert's Forward, a long Generate)
/// would otherwise hold the shutdown open for as long as their callers
/// like.
pub async fn serve_then_drain<S: NamedService>(
    server: Router,
    listener: Listener,
    max_connections: usize,
    shutdown: impl Future<Output = ()>,
    health: HealthReporter,
    draining: watch::Sender<bool>,
    grace: Duration,
) -> Result<(), tonic::transport::Error> {
    let mut drained = draining.subscribe();
    let stop = async move {
        shutdown.await;
        tracing::info!(
            ?grace,
            "draining: taking no new work, finishing what is running"
        );
        set_serving::<S>(&health, false).await;
        let _ = draining.send(true);
    };
    let deadline = async move {
        let _ = drained.wait_for(|draining| *draining).await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = listener.serve(server, max_connections, stop) => result,
        _ = deadline => {
            tracing::warn!(?grace, "grace period elapsed with streams still open; exiting");
            Ok(())
        }
    }
}
