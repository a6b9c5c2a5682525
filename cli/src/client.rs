//! A client of the public API: one Generate call, collected.

use moe_proto::transport;
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::{FinishReason, GenerateRequest, GenerateResponse};
use serde::Serialize;
use tonic::transport::Channel;

/// A finished generation, as `moe generate --json` prints it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Completion {
    pub token_ids: Vec<u32>,
    /// One per generated token when asked for.
    pub logprobs: Vec<f32>,
    pub text: String,
    pub finish_reason: String,
    pub usage: Usage,
    /// Experts that had no ready replica while the request ran, whose rows
    /// went to next-best experts (`--on-expert-down reroute`); empty when
    /// the request was served in full.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub missing_experts: Vec<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

pub async fn connect(uri: &str) -> Result<InferenceClient<Channel>, tonic::transport::Error> {
    Ok(transport::inference_client(transport::connect(uri).await?))
}

pub fn finish_reason_name(raw: i32) -> String {
    match FinishReason::try_from(raw) {
        Ok(FinishReason::Length) => "length",
        Ok(FinishReason::Stop) => "stop",
        Ok(FinishReason::Eos) => "eos",
        Ok(FinishReason::Cancelled) => "cancelled",
        _ => "unspecified",
    }
    .into()
}

/// Runs one Generate call to its end, handing each message to `on_message`
/// as it arrives (to stream its text, or time its tokens).
pub async fn generate(
    client: &mut InferenceClient<Channel>,
    request: GenerateRequest,
    mut on_message: impl FnMut(&GenerateResponse),
) -> Result<Completion, tonic::Status> {
    let mut stream = client.generate(request).await?.into_inner();
    let mut completion = Completion::default();
    while let Some(message) = stream.message().await? {
        on_message(&message);
        completion.token_ids.extend(&message.token_ids);
        completion.logprobs.extend(&message.logprobs);
        completion.text.push_str(&message.text);
        if message.finish_reason != 0 {
            completion.finish_reason = finish_reason_name(message.finish_reason);
        }
        if let Some(degraded) = &message.degraded {
            completion.missing_experts = degraded.missing_experts.clone();
        }
        if let Some(usage) = message.usage {
            completion.usage = Usage {
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
            };
        }
    }
    if completion.finish_reason.is_empty() {
        return Err(tonic::Status::unavailable(
            "the stream ended without a finish reason",
        ));
    }
    Ok(completion)
}
