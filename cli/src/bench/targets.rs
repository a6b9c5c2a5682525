//! The servers `moe bench` can load: a moe-serve router over its gRPC API,
//! and any OpenAI-compatible completions server (mistral.rs, vLLM, ...)
//! over HTTP with server-sent events, so that peers run the same workload
//! through the same generator.

use moe_proto::v1::generate_request::Prompt as WirePrompt;
use moe_proto::v1::{GenerateRequest, TokenIds};

use crate::client::{Access, Client};

use super::load::Target;
use super::workload::Prompt;

/// A moe-serve router. Greedy, ignoring end-of-sequence, so every request
/// produces exactly `max_tokens` tokens.
pub struct Grpc {
    client: Client,
}

impl Grpc {
    pub async fn connect(uri: &str, access: &Access) -> anyhow::Result<Self> {
        Ok(Self {
            client: crate::client::connect_with(uri, access).await?,
        })
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }
}

impl Target for Grpc {
    async fn generate(
        &self,
        prompt: &Prompt,
        max_tokens: usize,
        on_tokens: &mut (dyn FnMut(usize) + Send),
    ) -> Result<(), String> {
        let request = GenerateRequest {
            prompt: Some(WirePrompt::TokenIds(TokenIds {
                ids: prompt.token_ids.clone(),
            })),
            max_tokens: Some(max_tokens as u32),
            temperature: Some(0.0),
            ignore_eos: true,
            ..Default::default()
        };
        let mut client = self.client.clone();
        crate::client::generate(&mut client, request, |message| {
            if !message.token_ids.is_empty() {
                on_tokens(message.token_ids.len());
            }
        })
        .await
        .map(drop)
        .map_err(|status| format!("{:?}: {}", status.code(), status.message()))
    }
}

/// An OpenAI-compatible `/v1/completions` endpoint, streamed. Greedy; the
/// API has no portable way to ignore end-of-sequence, so a request may end
/// early, and only the tokens that arrived are counted.
pub struct OpenAi {
    http: reqwest::Client,
    url: String,
    model: String,
}

impl OpenAi {
    /// `base` is the server's root, e.g. `http://127.0.0.1:8080`.
    pub fn new(base: &str, model: &str) -> anyhow::Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder().build()?,
            url: format!("{}/v1/completions", base.trim_end_matches('/')),
            model: model.into(),
        })
    }
}

impl Target for OpenAi {
    async fn generate(
        &self,
        prompt: &Prompt,
        max_tokens: usize,
        on_tokens: &mut (dyn FnMut(usize) + Send),
    ) -> Result<(), String> {
        let text = prompt
            .text
            .as_deref()
            .ok_or("an OpenAI server needs text prompts: pass --model DIR for its tokenizer")?;
        let body = serde_json::json!({
            "model": self.model,
            "prompt": text,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": true,
        });
        let mut response = self
            .http
            .post(&self.url)
            .json(&body)
            .send()
            .await
            .map_err(|err| err.to_string())?;
        if !response.status().is_success() {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            return Err(format!("{status}: {text}"));
        }
        let mut events = SseLines::default();
        while let Some(chunk) = response.chunk().await.map_err(|err| err.to_string())? {
            for data in events.push(&chunk) {
                if data == "[DONE]" {
                    return Ok(());
                }
                if completion_has_text(&data)? {
                    on_tokens(1);
                }
            }
        }
        Ok(())
    }
}

/// Whether one streamed completion event carries generated text (servers
/// send one event per token; the last may carry only the finish reason).
fn completion_has_text(data: &str) -> Result<bool, String> {
    let event: serde_json::Value =
        serde_json::from_str(data).map_err(|err| format!("bad event {data:?}: {err}"))?;
    if let Some(error) = event.get("error") {
        return Err(format!("server error: {error}"));
    }
    Ok(event["choices"][0]["text"]
        .as_str()
        .is_some_and(|text| !text.is_empty()))
}

/// Splits a server-sent-events byte stream into its `data:` payloads.
#[derive(Default)]
struct SseLines {
    buffer: Vec<u8>,
}

impl SseLines {
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buffer.extend_from_slice(bytes);
        let mut payloads = Vec::new();
        while let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            if let Some(data) = line.trim_end().strip_prefix("data:") {
                payloads.push(data.trim_start().to_owned());
            }
        }
        payloads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_payloads_survive_any_chunking() {
        let stream = b"data: {\"a\":1}\n\n: keep-alive\ndata:{\"b\":2}\r\n\r\ndata: [DONE]\n\n";
        for split in 0..stream.len() {
            let mut lines = SseLines::default();
            let mut payloads = lines.push(&stream[..split]);
            payloads.extend(lines.push(&stream[split..]));
            assert_eq!(
                payloads,
                ["{\"a\":1}", "{\"b\":2}", "[DONE]"],
                "split at {split}"
            );
        }
    }

    #[test]
    fn completion_events() {
        assert!(completion_has_text(r#"{"choices":[{"text":"ab"}]}"#).unwrap());
        assert!(
            !completion_has_text(r#"{"choices":[{"text":"","finish_reason":"length"}]}"#).unwrap()
        );
        assert!(completion_has_text(r#"{"error":{"message":"no"}}"#).is_err());
        assert!(completion_has_text("not json").is_err());
    }
}
