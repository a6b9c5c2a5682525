//! Load, connect, serve, drain.

use std::future::Future;
use std::sync::Arc;

use attention_svc::Engine;
use moe_model::{Checkpoint, WeightDType, parse_device};
use moe_proto::tls::ClientTls;
use moe_proto::v1::inference_server::InferenceServer;
use moe_proto::{Listener, transport};
use moe_telemetry::Telemetry;
use tokenizers::Tokenizer;
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::service::interceptor::InterceptedService;
use tonic_health::server::HealthReporter;

use crate::config::{Config, ExpertPlacement};
use crate::dispatch::{
    DispatchSettings, DistributedExperts, Experts, InProcessExperts, MoeDispatcher,
};
use crate::gate::Gate;
use crate::http::{self, Dashboard};
use crate::metrics::{self, RouterMetrics};
use crate::readiness;
use crate::replicas::discovery;
use crate::replicas::set::ReplicaSets;
use crate::replicas::supervisor::Expected;
use crate::scheduler;
use crate::security::Secured;
use crate::service::{InferenceService, ServedModel};
use crate::stats::RouterStats;
use crate::{RouterError, endpoints};

/// Where the router's metrics go and where its HTTP side listens.
pub struct Observability {
    pub telemetry: Arc<Telemetry>,
    /// `--http-listen`, already bound.
    pub http: Option<TcpListener>,
}

/// Loads the model, starts the scheduler and serves the public API on
/// `listener` until `shutdown` resolves; then refuses new requests, lets
/// running ones finish, and returns (after `config.shutdown_grace` at most).
pub async fn run(
    config: Config,
    listener: Listener,
    observability: Observability,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RouterError> {
    let secured = Secured::load(&config.security)?;
    let device = parse_device(&config.device)?;
    let checkpoint = Checkpoint::open(&config.model)?;
    let dtype = WeightDType::resolve(config.dtype, &device, checkpoint.config(), config.kernels)?;
    let engine = Arc::new(
        Engine::load_as(&checkpoint, &device, dtype.dtype())?.with_kernels(config.kernels),
    );
    let kernels = engine.kernels();
    if kernels != config.kernels {
        tracing::info!(device = %config.device, "the fast kernels are CPU-only: running the generic ones");
    }
    let gate = Gate::load(&checkpoint, &device)?;
    let mode = config.experts.mode();
    let model = Arc::new(ServedModel {
        config: checkpoint.config().clone(),
        fingerprint: checkpoint.fingerprint().to_owned(),
        tokenizer: load_tokenizer(&checkpoint)?,
        expert_mode: mode,
    });
    let health = HealthReporter::new();
    let server = transport::server_for_guarded::<InferenceServer<InferenceService>>(
        &config.limits,
        &health,
        secured.health.clone(),
    );
    transport::set_serving::<InferenceServer<InferenceService>>(&health, false).await;

    let wire_dtype = match config.experts {
        ExpertPlacement::Distributed(_) => Some(config.wire_dtype),
        ExpertPlacement::InProcess => None,
    };
    let shape = (
        checkpoint.config().num_local_experts,
        checkpoint.config().num_hidden_layers,
    );
    let meter = observability.telemetry.meter();
    let stats = Arc::new(RouterStats::new(
        shape.0,
        wire_dtype,
        RouterMetrics::new(&meter, shape.0, shape.1),
    ));
    let (draining, drain_signal) = transport::drain_switch();
    let (experts, replicas) = connect_experts(
        &config,
        &checkpoint,
        (&device, dtype),
        &stats,
        secured.expert_tls.clone(),
    )?;
    let readiness = match &replicas {
        Some(sets) => {
            let (startup, readiness) = readiness::not_ready("no expert has answered yet");
            tokio::spawn(readiness::follow_coverage(
                sets.clone(),
                startup,
                health.clone(),
                drain_signal.clone(),
            ));
            readiness
        }
        None => {
            tokio::spawn(readiness::serve_in_process(
                health.clone(),
                drain_signal.clone(),
            ));
            readiness::ready()
        }
    };
    let _replica_gauges = replicas
        .as_ref()
        .map(|sets| metrics::observe_replicas(&meter, sets.clone()));
    let dashboard = Arc::new(Dashboard::new(
        observability.telemetry.clone(),
        stats.clone(),
        replicas.clone(),
        (mode, config.autoscale),
        shape,
    ));
    tokio::spawn(dashboard.clone().run());
    if let Some(http) = observability.http {
        let routes = http::routes(observability.telemetry, dashboard).merge(
            moe_telemetry::http::health_routes(
                health.clone(),
                <InferenceServer<InferenceService> as NamedService>::NAME,
            ),
        );
        moe_telemetry::http::serve(http, routes);
    }
    let moe = MoeDispatcher::new(gate, experts, stats.clone(), config.on_expert_down);
    let scheduler = scheduler::spawn(
        engine,
        moe,
        config.scheduler.clone(),
        stats.clone(),
        tokio::runtime::Handle::current(),
    )?;
    drop(checkpoint);
    let service = InferenceService::new(
        model,
        scheduler,
        readiness,
        stats,
        replicas,
        drain_signal,
        config.stalled_client_timeout,
    );
    tracing::info!(addr = %listener.local_addr()?, %mode, %kernels, %dtype, "router serving");
    let server = server.add_service(InterceptedService::new(
        transport::inference_server(service, &config.limits),
        secured.inference.clone(),
    ));
    let listener = listener.with_tls(secured.tls.clone());
    Ok(
        transport::serve_then_drain::<InferenceServer<InferenceService>>(
            server,
            listener,
            config.limits.max_connections,
            shutdown,
            health,
            draining,
            config.shutdown_grace,
        )
        .await?,
    )
}

/// The experts the config places: in this process, or replicas that
/// discovery keeps current and that each take work once checked.
fn connect_experts(
    config: &Config,
    checkpoint: &Checkpoint,
    (device, dtype): (&candle_core::Device, WeightDType),
    stats: &Arc<RouterStats>,
    tls: Option<Arc<ClientTls>>,
) -> Result<(Experts, Option<Arc<ReplicaSets>>), RouterError> {
    let model = checkpoint.config();
    let sources = match &config.experts {
        ExpertPlacement::InProcess => {
            let experts =
                InProcessExperts::load_as(checkpoint, device, config.kernels, dtype.dtype())?;
            return Ok((Experts::InProcess(experts), None));
        }
        ExpertPlacement::Distributed(sources) => sources,
    };
    let listed = sources.listed()?;
    endpoints::layout(&listed, model.num_local_experts, model.num_hidden_layers)?;
    let settings = DispatchSettings {
        timeout: config.expert_timeout,
        wire_dtype: config.wire_dtype,
        hidden_size: model.hidden_size,
    };
    let expected = Expected {
        config: model.clone(),
        fingerprint: checkpoint.fingerprint().to_owned(),
        tls,
    };
    let sets = Arc::new(ReplicaSets::new(
        model.num_local_experts,
        settings.clone(),
        expected,
        stats.clone(),
    ));
    tokio::spawn(discovery::run(
        sources.clone(),
        listed,
        model.num_hidden_layers,
        sets.clone(),
    ));
    let experts = DistributedExperts::new(
        sets.clone(),
        settings,
        config.failover.clone(),
        stats.clone(),
    );
    Ok((Experts::Distributed(experts), Some(sets)))
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
