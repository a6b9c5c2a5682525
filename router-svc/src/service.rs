//! The public `moe.v1.Inference` service.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::Instrument;

use futures::Stream;
use moe_model::ModelConfig;
use moe_proto::ExpertMode;
use moe_proto::v1::generate_request::Prompt;
use moe_proto::v1::{
    GenerateRequest, GenerateResponse, ModelInfoRequest, ModelInfoResponse, StatsRequest,
    StatsResponse, inference_server,
};
use tokenizers::Tokenizer;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::RouterError;
use crate::readiness::Readiness;
use crate::relay::{RequestClock, relay};
use crate::replicas::set::ReplicaSets;
use crate::request::{ValidRequest, check_text_len, validate};
use crate::sampling::Sampler;
use crate::scheduler::{GenerationRequest, SchedulerHandle, SequenceEvent};
use crate::stats::RouterStats;

/// Events a sequence may have waiting for its relay task.
const EVENTS_CAPACITY: usize = 32;
/// Responses waiting for the client to read them.
const RESPONSES_CAPACITY: usize = 16;

/// What the service knows about the model it serves.
pub struct ServedModel {
    pub config: ModelConfig,
    pub fingerprint: String,
    pub tokenizer: Option<Tokenizer>,
    pub expert_mode: ExpertMode,
}

#[derive(Clone)]
pub struct InferenceService {
    model: Arc<ServedModel>,
    scheduler: SchedulerHandle,
    readiness: Readiness,
    stats: Arc<RouterStats>,
    /// The experts' replicas, in the distributed mode.
    replicas: Option<Arc<ReplicaSets>>,
    draining: watch::Receiver<bool>,
    /// `--stalled-client-timeout`.
    stalled_client_timeout: Duration,
    /// Text prompts tokenised at once at most (each on the blocking pool):
    /// tokenising takes CPU in proportion to the text, and must neither
    /// hold a runtime worker nor take every core.
    tokenisers: Arc<Semaphore>,
}

impl InferenceService {
    pub fn new(
        model: Arc<ServedModel>,
        scheduler: SchedulerHandle,
        readiness: Readiness,
        stats: Arc<RouterStats>,
        replicas: Option<Arc<ReplicaSets>>,
        draining: watch::Receiver<bool>,
        stalled_client_timeout: Duration,
    ) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Self {
            model,
            scheduler,
            readiness,
            stats,
            replicas,
            draining,
            stalled_client_timeout,
            tokenisers: Arc::new(Semaphore::new((cores / 2).max(1))),
        }
    }

    /// Checks `request`; a text prompt is measured first, then tokenised
    /// off the runtime's workers.
    async fn validated(&self, request: GenerateRequest) -> Result<ValidRequest, RouterError> {
        let Some(Prompt::Text(text)) = &request.prompt else {
            return validate(request, &self.model.config, None);
        };
        check_text_len(text, &self.model.config)?;
        let permit = self
            .tokenisers
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| RouterError::ShuttingDown)?;
        let model = self.model.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            validate(request, &model.config, model.tokenizer.as_ref())
        })
        .await
        .map_err(|err| RouterError::Internal(format!("tokenising the prompt failed: {err}")))?
    }

    async fn admit(
        &self,
        request: GenerateRequest,
        span: &tracing::Span,
    ) -> Result<(ValidRequest, mpsc::Receiver<SequenceEvent>), RouterError> {
        if *self.draining.borrow() {
            return Err(RouterError::ShuttingDown);
        }
        if let Err(why) = &*self.readiness.borrow() {
            return Err(RouterError::NotReady(why.clone()));
        }
        let valid = self.validated(request).await?;
        let (events, receiver) = mpsc::channel(EVENTS_CAPACITY);
        self.scheduler.submit(GenerationRequest {
            prompt: valid.prompt.clone(),
            max_tokens: valid.max_tokens,
            sampler: Sampler::new(valid.sampling),
            stop_at_eos: valid.stop_at_eos,
            events,
            span: span.clone(),
        })?;
        Ok((valid, receiver))
    }
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl inference_server::Inference for InferenceService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let arrived = Instant::now();
        let span = tracing::info_span!(target: moe_telemetry::TRACE_TARGET, "generate");
        if let Some(traceparent) = request
            .metadata()
            .get("traceparent")
            .and_then(|value| value.to_str().ok())
        {
            moe_telemetry::continue_remote(&span, traceparent);
        }
        let admitted = match client_deadline(request.metadata()) {
            Ok(deadline) => self
                .admit(request.into_inner(), &span)
                .await
                .map(|admitted| (deadline, admitted)),
            Err(err) => Err(err),
        };
        let (deadline, (valid, events)) = admitted.inspect_err(|err| {
            let metrics = &self.stats.metrics;
            metrics.request_ended("error", err.code(), arrived.elapsed(), None);
        })?;
        let (responses, stream) = mpsc::channel(RESPONSES_CAPACITY);
        tokio::spawn(
            relay(
                valid,
                events,
                responses,
                self.model.clone(),
                (deadline, self.stalled_client_timeout),
                RequestClock::new(arrived, self.stats.clone()),
            )
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(stream))))
    }

    async fn model_info(
        &self,
        _: Request<ModelInfoRequest>,
    ) -> Result<Response<ModelInfoResponse>, Status> {
        let config = &self.model.config;
        Ok(Response::new(ModelInfoResponse {
            model_type: config.model_type.clone(),
            num_layers: config.num_hidden_layers as u32,
            hidden_size: config.hidden_size as u32,
            num_experts: config.num_local_experts as u32,
            num_experts_per_tok: config.num_experts_per_tok as u32,
            num_attention_heads: config.num_attention_heads as u32,
            num_key_value_heads: config.num_key_value_heads as u32,
            vocab_size: config.vocab_size as u32,
            max_position_embeddings: config.max_position_embeddings as u32,
            model_fingerprint: self.model.fingerprint.clone(),
            expert_mode: self.model.expert_mode.to_string(),
            intermediate_size: config.intermediate_size as u32,
            head_dim: config.head_dim as u32,
        }))
    }

    async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        let mut snapshot = self.stats.snapshot();
        if let Some(sets) = &self.replicas {
            snapshot.replicas = sets.reports().into_iter().map(Into::into).collect();
        }
        Ok(Response::new(snapshot))
    }
}

/// When the client's deadline passes, from its `grpc-timeout` header (the
/// gRPC wire format: at most 8 digits and a unit, H M S m u n). tonic
/// enforces it only until the response starts, and a Generate stream
/// outlives that, so the relay enforces it to the end.
fn client_deadline(metadata: &MetadataMap) -> Result<Option<Instant>, RouterError> {
    let Some(value) = metadata.get("grpc-timeout") else {
        return Ok(None);
    };
    let timeout = value
        .to_str()
        .ok()
        .and_then(parse_grpc_timeout)
        .ok_or_else(|| RouterError::invalid(format!("grpc-timeout {value:?} is malformed")))?;
    Ok(Some(Instant::now() + timeout))
}

fn parse_grpc_timeout(text: &str) -> Option<Duration> {
    let split = text.len().checked_sub(1)?;
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value * 3600),
        "M" => Duration::from_secs(value * 60),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_as_the_wire_format_says() {
        assert_eq!(parse_grpc_timeout("200m"), Some(Duration::from_millis(200)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "123456789m", "10x", "-5S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
