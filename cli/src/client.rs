//! A client of the public API: one Generate call, collected.

use std::path::{Path, PathBuf};

use anyhow::Context;
use moe_proto::transport;
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::{FinishReason, GenerateRequest, GenerateResponse};
use serde::Serialize;
use tonic::Status;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

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

/// A client of the public API that sends a bearer token, when it has one.
pub type Client = InferenceClient<InterceptedService<Channel, BearerToken>>;

/// How a client reaches a secured router: the CA its certificate comes
/// from (TLS), and the API key it presents.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Trust only this CA (PEM) and speak TLS; None: plaintext.
    pub ca: Option<PathBuf>,
    /// Sent as `authorization: Bearer KEY` on every call.
    pub api_key: Option<String>,
}

/// Adds `authorization: Bearer KEY` to every call, when it has a key.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    pub fn new(key: Option<&str>) -> anyhow::Result<Self> {
        key.map(|key| {
            let mut value: MetadataValue<Ascii> = format!("Bearer {key}")
                .parse()
                .map_err(|_| anyhow::anyhow!("the API key must be printable ASCII"))?;
            value.set_sensitive(true);
            anyhow::Ok(value)
        })
        .transpose()
        .map(Self)
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A plaintext client without a key.
pub async fn connect(uri: &str) -> Result<Client, tonic::transport::Error> {
    Ok(with_token(
        transport::connect(uri).await?,
        BearerToken::default(),
    ))
}

/// A client of the router at `uri` as `access` says: TLS trusting its CA
/// (an `http://` URI is dialled as `https://`), and its API key.
pub async fn connect_with(uri: &str, access: &Access) -> anyhow::Result<Client> {
    let token = BearerToken::new(access.api_key.as_deref())?;
    Ok(with_token(channel(uri, access.ca.as_deref()).await?, token))
}

/// A channel to `uri`: plaintext, or TLS trusting only the CA in `ca`.
pub async fn channel(uri: &str, ca: Option<&Path>) -> anyhow::Result<Channel> {
    let Some(ca) = ca else {
        return Ok(transport::connect(uri).await?);
    };
    let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
    let uri = match uri.strip_prefix("http://") {
        Some(rest) => format!("https://{rest}"),
        None => uri.to_owned(),
    };
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
    let channel = transport::endpoint(&uri)?
        .tls_config(tls)?
        .connect()
        .await
        .with_context(|| format!("cannot connect to {uri} over TLS"))?;
    Ok(channel)
}

fn with_token(channel: Channel, token: BearerToken) -> Client {
    InferenceClient::with_interceptor(channel, token)
        .max_decoding_message_size(moe_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(moe_proto::MAX_MESSAGE_BYTES)
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
    client: &mut Client,
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
