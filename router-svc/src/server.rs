//! Load, connect, serve, drain.

use std::future::Future;
use std::sync::Arc;

use attention_svc::Engine;
use moe_model::{Checkpoint, parse_device};
use moe_proto::v1::inference_server::InferenceServer;
use moe_proto::{Listener, transport};
use tokenizers::Tokenizer;
use tokio::sync::watch;
use tonic_health::server::HealthReporter;

use crate::config::{Config, ExpertPlacement};
use crate::dispatch::{
    DistributedExperts, EndpointClient, Experts, InProcessExperts, MoeDispatcher,
    remote::DispatchSettings,
};
use crate::gate::Gate;
use crate::readiness::{self, Expected, Readiness};
use crate::scheduler;
use crate::service::{InferenceService, ServedModel};
use crate::stats::RouterStats;
use crate::{RouterError, endpoints};

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
    let mode = config.experts.mode();
    let model = Arc::new(ServedModel {
        config: checkpoint.config().clone(),
        fingerprint: checkpoint.fingerprint().to_owned(),
        tokenizer: load_tokenizer(&checkpoint)?,
        expert_mode: mode,
    });
    let (health, server) = transport::server_with_health_and_reflection();
    transport::set_serving::<InferenceServer<InferenceService>>(&health, false).await;

    let wire_dtype = match config.experts {
        ExpertPlacement::Distributed(_) => Some(config.wire_dtype),
        ExpertPlacement::InProcess => None,
    };
    let stats = Arc::new(RouterStats::new(
        checkpoint.config().num_local_experts,
        wire_dtype,
    ));
    let (experts, readiness) = connect_experts(&config, &checkpoint, engine.device(), &stats)?;
    let moe = MoeDispatcher::new(gate, experts, stats.clone());
    let scheduler = scheduler::spawn(
        engine,
        moe,
        config.scheduler.clone(),
        stats.clone(),
        tokio::runtime::Handle::current(),
    )?;
    drop(checkpoint);
    let (draining, drain_signal) = transport::drain_switch();
    tokio::spawn(report_health(
        readiness.clone(),
        health.clone(),
        drain_signal.clone(),
    ));
    let service = InferenceService::new(model, scheduler, readiness, stats, drain_signal);
    tracing::info!(addr = %listener.local_addr()?, %mode, "router serving");
    let server = server.add_service(transport::inference_server(service));
    Ok(
        transport::serve_then_drain::<InferenceServer<InferenceService>>(
            server,
            listener,
            shutdown,
            health,
            draining,
            config.shutdown_grace,
        )
        .await?,
    )
}

/// The experts the config places: in-process ones are ready at once;
/// distributed ones once each endpoint has answered Describe correctly,
/// which a background task checks.
fn connect_experts(
    config: &Config,
    checkpoint: &Checkpoint,
    device: &candle_core::Device,
    stats: &Arc<RouterStats>,
) -> Result<(Experts, Readiness), RouterError> {
    let model = checkpoint.config();
    let endpoints = match &config.experts {
        ExpertPlacement::InProcess => {
            let experts = InProcessExperts::load(checkpoint, device)?;
            return Ok((Experts::InProcess(experts), watch::channel(Ok(())).1));
        }
        ExpertPlacement::Distributed(endpoints) => endpoints,
    };
    let settings = DispatchSettings {
        timeout: config.expert_timeout,
        wire_dtype: config.wire_dtype,
        hidden_size: model.hidden_size,
    };
    let layout = endpoints::layout(endpoints, model.num_local_experts, model.num_hidden_layers)?;
    let mut clients = Vec::with_capacity(layout.len());
    let mut to_check = Vec::new();
    for (expert, served) in layout.into_iter().enumerate() {
        let mut per_expert = Vec::with_capacity(served.len());
        for (layers, endpoint) in served {
            let client =
                EndpointClient::spawn(expert, &endpoint.uri, settings.clone(), stats.clone())?;
            to_check.push((expert, layers.clone(), client.clone()));
            per_expert.push((layers, client));
        }
        clients.push(per_expert);
    }
    let (state, readiness) = readiness::not_ready("no expert has answered yet");
    let (model, fingerprint) = (model.clone(), checkpoint.fingerprint().to_owned());
    tokio::spawn(async move {
        let expected = Expected {
            config: &model,
            fingerprint: &fingerprint,
        };
        readiness::wait_for_experts(to_check, expected, state).await;
    });
    Ok((
        Experts::Distributed(DistributedExperts::new(clients)),
        readiness,
    ))
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

/// Marks the service SERVING once ready, for Kubernetes readiness probes,
/// unless it has started draining by then.
async fn report_health(
    mut readiness: Readiness,
    health: HealthReporter,
    draining: watch::Receiver<bool>,
) {
    if readiness.wait_for(Result::is_ok).await.is_ok() && !*draining.borrow() {
        transport::set_serving::<InferenceServer<InferenceService>>(&health, true).await;
    }
}
