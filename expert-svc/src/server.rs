//! Load, serve, drain.

use std::future::Future;

use moe_model::{Checkpoint, parse_device};
use moe_proto::v1::DescribeResponse;
use moe_proto::v1::expert_server::ExpertServer;
use moe_proto::{Listener, MAX_MESSAGE_BYTES, transport};
use tokio::sync::watch;

use crate::{Config, ExpertError, ExpertService, ExpertWeights, ProductQueue};

pub use moe_proto::transport::shutdown_signal;

/// Loads the expert named by `config` and serves it on `listener` until
/// `shutdown` resolves; then stops reading new messages, answers those in
/// flight, and returns (after `config.shutdown_grace` at the latest).
pub async fn run(
    config: Config,
    listener: Listener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ExpertError> {
    let device = parse_device(&config.device)?;
    let checkpoint = Checkpoint::open(&config.model)?;
    let model = checkpoint.config().clone();
    let layers = config.layers.clone().unwrap_or(0..model.num_hidden_layers);
    let span = tracing::info_span!("expert", expert = config.expert, layers = ?layers);
    let _entered = span.enter();
    let weights = ExpertWeights::load(&checkpoint, config.expert, layers.clone(), &device)?;
    let describe = DescribeResponse {
        expert: config.expert as u32,
        layer_start: layers.start as u32,
        layer_end: layers.end as u32,
        hidden_size: model.hidden_size as u32,
        intermediate_size: model.intermediate_size as u32,
        num_experts: model.num_local_experts as u32,
        weight_dtype: "f32".into(),
        device: config.device.clone(),
        model_fingerprint: checkpoint.fingerprint().to_owned(),
        rows_served: 0,
        products_run: 0,
    };
    drop(checkpoint);
    let (draining, drain_signal) = watch::channel(false);
    let service = ExpertService::new(ProductQueue::new(weights), describe, device, drain_signal);
    let (health, server) = transport::server_with_health_and_reflection();
    health.set_serving::<ExpertServer<ExpertService>>().await;
    tracing::info!(addr = %listener.local_addr()?, "expert ready");

    let grace = config.shutdown_grace;
    let drained = service.shutdown_signal();
    let stop = async move {
        shutdown.await;
        tracing::info!(?grace, "draining");
        health
            .set_not_serving::<ExpertServer<ExpertService>>()
            .await;
        let _ = draining.send(true);
    };
    let server = server.add_service(
        ExpertServer::new(service)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    let server = listener.serve(server, stop);
    Ok(transport::serve_with_grace(server, drained, grace).await?)
}
