//! Load, serve, drain.

use std::future::Future;
use std::sync::Arc;

use moe_model::{Checkpoint, WeightDType, parse_device};
use moe_proto::v1::expert_server::ExpertServer;
use moe_proto::{Listener, ServerLimits, transport};
use moe_telemetry::Meter;
use tonic::server::NamedService;
use tonic_health::server::HealthReporter;

use crate::metrics::ExpertMetrics;
use crate::{Config, ExpertError, ExpertService, ExpertWeights, ForwardQueue};

pub use moe_proto::transport::shutdown_signal;

/// The name under which the gRPC health (and `/readyz`) says whether this
/// expert takes work.
pub const HEALTH_SERVICE: &str = <ExpertServer<ExpertService> as NamedService>::NAME;

/// Loads the expert named by `config` and serves it on `listener`, its
/// readiness reported through `health`, until `shutdown` resolves; then
/// stops reading new messages, replies to those in flight, and returns
/// (after `config.shutdown_grace` at the latest).
pub async fn run(
    config: Config,
    listener: Listener,
    meter: &Meter,
    health: HealthReporter,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ExpertError> {
    let device = parse_device(&config.device)?;
    let checkpoint = Checkpoint::open(&config.model)?;
    let layers = config
        .layers
        .clone()
        .unwrap_or(0..checkpoint.config().num_hidden_layers);
    let span = tracing::info_span!("expert", expert = config.expert, layers = ?layers);
    let _entered = span.enter();
    let dtype = WeightDType::resolve(config.dtype, &device, checkpoint.config(), config.kernels)?;
    let weights =
        ExpertWeights::load_as(&checkpoint, config.expert, layers, &device, dtype.dtype())?
            .with_kernels(config.kernels);
    let kernels = weights.kernels();
    if kernels != config.kernels {
        tracing::info!(device = %config.device, "the fast kernels are CPU-only: running the generic ones");
    }
    let describe = weights.describe(&checkpoint, &config.device);
    let limits = ServerLimits::expert(
        config.max_rows,
        describe.hidden_size as usize,
        config.max_concurrent_streams,
        config.max_connections,
        config.max_connection_age,
    );
    drop(checkpoint);
    let (draining, drain_signal) = transport::drain_switch();
    let metrics = Arc::new(ExpertMetrics::new(meter, config.expert));
    let service = ExpertService::new(
        ForwardQueue::new(weights, metrics.clone()),
        metrics,
        describe,
        device,
        drain_signal,
    );
    let server = transport::server_for::<ExpertServer<ExpertService>>(&limits, &health);
    transport::set_serving::<ExpertServer<ExpertService>>(&health, true).await;
    tracing::info!(addr = %listener.local_addr()?, %kernels, %dtype, "expert ready");
    let server = server.add_service(transport::expert_server(service, &limits));
    Ok(transport::serve_then_drain::<ExpertServer<ExpertService>>(
        server,
        listener,
        limits.max_connections,
        shutdown,
        health,
        draining,
        config.shutdown_grace,
    )
    .await?)
}
