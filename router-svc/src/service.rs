//! The public `moe.v1.Inference` service.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use moe_model::ModelConfig;
use moe_proto::ExpertMode;
use moe_proto::v1::{
    GenerateRequest, GenerateResponse, ModelInfoRequest, ModelInfoResponse, StatsRequest,
    StatsResponse, inference_server,
};
use tokenizers::Tokenizer;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::RouterError;
use crate::readiness::Readiness;
use crate::relay::relay;
use crate::request::{ValidRequest, validate};
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
    draining: watch::Receiver<bool>,
}

impl InferenceService {
    pub fn new(
        model: Arc<ServedModel>,
        scheduler: SchedulerHandle,
        readiness: Readiness,
        stats: Arc<RouterStats>,
        draining: watch::Receiver<bool>,
    ) -> Self {
        Self {
            model,
            scheduler,
            readiness,
            stats,
            draining,
        }
    }

    fn admit(
        &self,
        request: GenerateRequest,
    ) -> Result<(ValidRequest, mpsc::Receiver<SequenceEvent>), RouterError> {
        if *self.draining.borrow() {
            return Err(RouterError::ShuttingDown);
        }
        if let Err(why) = &*self.readiness.borrow() {
            return Err(RouterError::NotReady(why.clone()));
        }
        let valid = validate(request, &self.model.config, self.model.tokenizer.as_ref())?;
        let (events, receiver) = mpsc::channel(EVENTS_CAPACITY);
        self.scheduler.submit(GenerationRequest {
            prompt: valid.prompt.clone(),
            max_tokens: valid.max_tokens,
            sampler: Sampler::new(valid.sampling),
            stop_at_eos: valid.stop_at_eos,
            events,
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
        let (valid, events) = self.admit(request.into_inner())?;
        let (responses, stream) = mpsc::channel(RESPONSES_CAPACITY);
        tokio::spawn(relay(valid, events, responses, self.model.clone()));
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
        Ok(Response::new(self.stats.snapshot()))
    }
}
