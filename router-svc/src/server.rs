//! Load, connect, serve, drain.

use std::future::Future;
use std::sync::Arc;

use attention_svc::Engine;
use moe_model::{Checkpoint, parse_device};
use moe_proto::v1::inference_server::InferenceServer;
use moe_proto::{Listener, MAX_MESSAGE_BYTES, transport};
use tokenizers::Tokenizer;
use tokio::sync::watch;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::config::{Config, ExpertPlacement};
use crate::dispatch::{
    EndpointClient, LocalExperts, MoeDispatcher, RemoteExperts, remote::DispatchSettings,
};
use crate::gate::Gate;
use crate::readiness::{self, Expected, Readiness};
use crate::scheduler::{self, SchedulerHandle};
use crate::service::{InferenceService, ServedModel};
use crate::stats::RouterStats;
use crate::{RouterError, cluster};

/// Loads the model, starts the scheduler and serves the public API on
/// `listener` until `shutdown` resolves; then refuses new requests, lets
/// running ones finish, and returns (after `config.shutdown_grace` at most).
pub async fn run(
    config: Config,
    listener: Listener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RouterError> {
    let device = parse_device(&config.device)?;
    let checkpoint = Checkpoint::open(&config.model)?;
    let engine = Arc::new(Engine::load(&checkpoint, &device)?);
    let gate = Gate::load(&checkpoint, &device)?;
    let model = Arc::new(ServedModel {
        config: checkpoint.config().clone(),
        fingerprint: checkpoint.fingerprint().to_owned(),
        tokenizer: load_tokenizer(&checkpoint)?,
        expert_mode: match config.experts {
            ExpertPlacement::Local => "local",
            ExpertPlacement::Remote(_) => "distributed",
        },
    });
    let (health, server) = transport::server_with_health_and_reflection();
    set_serving(&health, false).await;

    let wire_dtype = match config.experts {
        ExpertPlacement::Local => "none",
        ExpertPlacement::Remote(_) => config.wire_dtype.name(),
    };
    let stats = Arc::new(RouterStats::new(
        checkpoint.config().num_local_experts,
        wire_dtype,
    ));
    let (scheduler, readiness) = start(
        &config,
        &checkpoint,
        engine,
        gate,
        stats.clone(),
        tokio::runtime::Handle::current(),
    )?;
    drop(checkpoint);
    tokio::spawn(report_health(readiness.clone(), health.clone()));

    let (draining, drain_signal) = watch::channel(false);
    let service = InferenceService::new(model, scheduler, readiness, stats, drain_signal.clone());
    tracing::info!(addr = %listener.local_addr()?, "router serving");
    let stop = async move {
        shutdown.await;
        tracing::info!("draining: refusing new requests, finishing running ones");
        set_serving(&health, false).await;
        let _ = draining.send(true);
    };
    let server = server.add_service(
        InferenceServer::new(service)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    let server = listener.serve(server, stop);
    Ok(transport::serve_with_grace(server, drain_signal, config.shutdown_grace).await?)
}

/// Builds the MoE backend the config asks for and starts the scheduler
/// over it. Local experts are ready at once; remote ones once each has
/// answered Describe correctly.
fn start(
    config: &Config,
    checkpoint: &Checkpoint,
    engine: Arc<Engine>,
    gate: Gate,
    stats: Arc<RouterStats>,
    runtime: tokio::runtime::Handle,
) -> Result<(SchedulerHandle, Readiness), RouterError> {
    let model = checkpoint.config();
    let num_experts = model.num_local_experts;
    match &config.experts {
        ExpertPlacement::Local => {
            let experts = LocalExperts::load(checkpoint, engine.device())?;
            let moe = Arc::new(MoeDispatcher::new(gate, experts, stats.clone()));
            let scheduler =
                scheduler::spawn(engine, moe, config.scheduler.clone(), stats, runtime)?;
            Ok((scheduler, watch::channel(Ok(())).1))
        }
        ExpertPlacement::Remote(endpoints) => {
            let settings = DispatchSettings {
                timeout: config.expert_timeout,
                wire_dtype: config.wire_dtype,
                hidden_size: model.hidden_size,
            };
            let layout = cluster::layout(endpoints, num_experts, model.num_hidden_layers)?;
            let mut clients = Vec::with_capacity(layout.len());
            let mut to_check = Vec::new();
            for (expert, served) in layout.into_iter().enumerate() {
                let mut per_expert = Vec::with_capacity(served.len());
                for (layers, endpoint) in served {
                    let client = EndpointClient::spawn(
                        expert,
                        &endpoint.uri,
                        settings.clone(),
                        stats.clone(),
                    )?;
                    to_check.push((expert, layers.clone(), client.clone()));
                    per_expert.push((layers, client));
                }
                clients.push(per_expert);
            }
            let moe = Arc::new(MoeDispatcher::new(
                gate,
                RemoteExperts::new(clients),
                stats.clone(),
            ));
            let scheduler =
                scheduler::spawn(engine, moe, config.scheduler.clone(), stats, runtime)?;
            let (state, readiness) = readiness::not_ready("no expert has answered yet");
            let (model, fingerprint) = (model.clone(), checkpoint.fingerprint().to_owned());
            tokio::spawn(async move {
                let expected = Expected {
                    config: &model,
                    fingerprint: &fingerprint,
                };
                readiness::wait_for_experts(to_check, expected, state).await;
            });
            Ok((scheduler, readiness))
        }
    }
}

fn load_tokenizer(checkpoint: &Checkpoint) -> Result<Option<Tokenizer>, RouterError> {
    let path = checkpoint.tokenizer_path();
    if !path.is_file() {
        tracing::warn!(path = %path.display(), "no tokenizer.json: only token-id prompts are accepted");
        return Ok(None);
    }
    Tokenizer::from_file(&path).map(Some).map_err(|err| {
        RouterError::Model(moe_model::ModelError::Tokenizer(format!(
            "{}: {err}",
            path.display()
        )))
    })
}

/// Marks the service SERVING once ready, for Kubernetes readiness probes.
async fn report_health(mut readiness: Readiness, health: HealthReporter) {
    if readiness.wait_for(Result::is_ok).await.is_ok() {
        set_serving(&health, true).await;
    }
}

/// Flips both the overall health ("", what a Kubernetes gRPC probe asks
/// by default) and the Inference service's.
async fn set_serving(health: &HealthReporter, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    health.set_service_status("", status).await;
    health
        .set_service_status(
            <InferenceServer<InferenceService> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
}
