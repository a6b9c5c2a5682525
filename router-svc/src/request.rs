//! Checks a client's GenerateRequest and turns it into what the scheduler
//! runs. Every refusal is INVALID_ARGUMENT naming the field at fault.

use moe_model::ModelConfig;
use moe_proto::v1::{GenerateRequest, generate_request::Prompt};
use tokenizers::Tokenizer;

use crate::RouterError;
use crate::sampling::SamplingParams;

/// Tokens generated when a request names no `max_tokens`.
pub const DEFAULT_MAX_TOKENS: usize = 256;
/// At most this many stop strings per request.
pub const MAX_STOP_STRINGS: usize = 16;
/// Bytes of one stop string at most.
pub const MAX_STOP_BYTES: usize = 256;
/// Bytes of prompt text per token of the context at most: a text longer
/// than the context times this cannot fit (tokenizers average about 4
/// bytes a token), and is refused before it is tokenised.
pub const MAX_PROMPT_BYTES_PER_TOKEN: usize = 16;

/// A request that passed every check.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub logprobs: bool,
    pub stop_at_eos: bool,
}

pub fn validate(
    request: GenerateRequest,
    config: &ModelConfig,
    tokenizer: Option<&Tokenizer>,
) -> Result<ValidRequest, RouterError> {
    let prompt = prompt_tokens(request.prompt, config, tokenizer)?;
    let max_tokens = max_tokens(request.max_tokens, prompt.len(), config)?;
    let sampling = sampling(
        request.temperature,
        request.top_p,
        request.top_k,
        request.seed,
    )?;
    check_stop(&request.stop)?;
    Ok(ValidRequest {
        prompt,
        max_tokens,
        sampling,
        stop: request.stop,
        logprobs: request.logprobs,
        stop_at_eos: !request.ignore_eos,
    })
}

fn check_stop(stop: &[String]) -> Result<(), RouterError> {
    if stop.len() > MAX_STOP_STRINGS {
        return Err(RouterError::invalid(format!(
            "stop holds {} strings; at most {MAX_STOP_STRINGS} are allowed",
            stop.len()
        )));
    }
    if let Some(index) = stop.iter().position(String::is_empty) {
        return Err(RouterError::invalid(format!(
            "stop[{index}] is empty; stop strings must not be empty"
        )));
    }
    if let Some((index, long)) = stop
        .iter()
        .enumerate()
        .find(|(_, stop)| stop.len() > MAX_STOP_BYTES)
    {
        return Err(RouterError::invalid(format!(
            "stop[{index}] is {} bytes; a stop string holds at most {MAX_STOP_BYTES}",
            long.len()
        )));
    }
    Ok(())
}

/// Refuses prompt text too long to fit the context, before it is
/// tokenised (which takes time and memory in proportion to it).
pub fn check_text_len(text: &str, config: &ModelConfig) -> Result<(), RouterError> {
    let context = config.max_position_embeddings;
    let limit = context.saturating_mul(MAX_PROMPT_BYTES_PER_TOKEN);
    if text.len() > limit {
        return Err(RouterError::invalid(format!(
            "prompt text is {} bytes; at most {limit} are taken ({MAX_PROMPT_BYTES_PER_TOKEN} bytes per token of the {context}-token context)",
            text.len()
        )));
    }
    Ok(())
}

/// The prompt's token ids: given, or from the text through the tokenizer.
fn prompt_tokens(
    prompt: Option<Prompt>,
    config: &ModelConfig,
    tokenizer: Option<&Tokenizer>,
) -> Result<Vec<u32>, RouterError> {
    let tokens = match prompt {
        Some(Prompt::Text(text)) => {
            if text.is_empty() {
                return Err(RouterError::invalid(
                    "prompt is empty: text must hold at least one character",
                ));
            }
            check_text_len(&text, config)?;
            let tokenizer = tokenizer.ok_or_else(|| {
                RouterError::FailedPrecondition(
                    "this checkpoint has no tokenizer.json: send token_ids instead of text".into(),
                )
            })?;
            let encoding = tokenizer.encode(text.as_str(), false).map_err(|err| {
                RouterError::invalid(format!("prompt text cannot be tokenised: {err}"))
            })?;
            encoding.get_ids().to_vec()
        }
        Some(Prompt::TokenIds(ids)) => ids.ids,
        None => {
            return Err(RouterError::invalid(
                "prompt is empty: set text or token_ids",
            ));
        }
    };
    if tokens.is_empty() {
        return Err(RouterError::invalid("prompt is empty: it holds no tokens"));
    }
    let context = config.max_position_embeddings;
    if tokens.len() >= context {
        return Err(RouterError::invalid(format!(
            "prompt is {} tokens; the context length is {context}, which must leave room for at least one generated token",
            tokens.len()
        )));
    }
    if let Some((index, id)) = tokens
        .iter()
        .enumerate()
        .find(|(_, id)| **id as usize >= config.vocab_size)
    {
        return Err(RouterError::invalid(format!(
            "token_ids[{index}] = {id} is outside the vocabulary (vocab_size {})",
            config.vocab_size
        )));
    }
    Ok(tokens)
}

/// The tokens to generate: as asked, or the default that fits the context.
fn max_tokens(
    asked: Option<u32>,
    prompt_tokens: usize,
    config: &ModelConfig,
) -> Result<usize, RouterError> {
    let context = config.max_position_embeddings;
    let max_tokens = match asked {
        Some(0) => return Err(RouterError::invalid("max_tokens must be at least 1")),
        Some(n) => n as usize,
        None => {
            let room = context.saturating_sub(prompt_tokens);
            if room == 0 {
                return Err(RouterError::invalid(format!(
                    "prompt ({prompt_tokens} tokens) fills the context length ({context}): no room for a generated token (max_tokens is unset; it defaults to {DEFAULT_MAX_TOKENS} or what the context leaves, if less)"
                )));
            }
            DEFAULT_MAX_TOKENS.min(room)
        }
    };
    if prompt_tokens.saturating_add(max_tokens) > context {
        return Err(RouterError::invalid(format!(
            "prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the context length ({context})"
        )));
    }
    Ok(max_tokens)
}

/// Sampling parameters, defaults filled in (a random seed when unset).
fn sampling(
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: i32,
    seed: Option<u64>,
) -> Result<SamplingParams, RouterError> {
    let temperature = temperature.unwrap_or(1.0);
    if !(temperature >= 0.0 && temperature.is_finite()) {
        return Err(RouterError::invalid(format!(
            "temperature must be >= 0, got {temperature}"
        )));
    }
    let top_p = top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(RouterError::invalid(format!(
            "top_p must be in (0, 1], got {top_p}"
        )));
    }
    if top_k < 0 {
        return Err(RouterError::invalid(format!(
            "top_k must be >= 0, got {top_k}"
        )));
    }
    Ok(SamplingParams {
        temperature,
        top_p,
        top_k: top_k as usize,
        seed: seed.unwrap_or_else(rand::random),
    })
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;
    use moe_proto::v1::TokenIds;

    fn config() -> ModelConfig {
        moe_model::synth::Preset::Tiny.config(100)
    }

    fn ids(ids: Vec<u32>) -> GenerateRequest {
        GenerateRequest {
            prompt: Some(Prompt::TokenIds(TokenIds { ids })),
            ..Default::default()
        }
    }

    fn error(request: GenerateRequest) -> String {
        validate(request, &config(), None).unwrap_err().to_string()
    }

    #[test]
    fn defaults() {
        let valid = validate(ids(vec![1, 2]), &config(), None).unwrap();
        assert_eq!(valid.max_tokens, DEFAULT_MAX_TOKENS);
        assert_eq!(valid.sampling.temperature, 1.0);
        assert_eq!(valid.sampling.top_p, 1.0);
        assert!(valid.stop_at_eos);
    }

    #[test]
    fn each_bad_field_is_named() {
        assert!(error(ids(vec![])).contains("prompt is empty"));
        assert!(error(GenerateRequest::default()).contains("prompt is empty"));
        assert!(error(ids(vec![1, 100])).contains("token_ids[1] = 100"));
        let long = GenerateRequest {
            max_tokens: Some(1023),
            ..ids(vec![1, 2])
        };
        assert!(error(long).contains("exceeds the context length (1024)"));
        let cold = GenerateRequest {
            temperature: Some(-0.5),
            ..ids(vec![1])
        };
        assert!(error(cold).contains("temperature"));
        let p = GenerateRequest {
            top_p: Some(1.5),
            ..ids(vec![1])
        };
        assert!(error(p).contains("top_p"));
        let k = GenerateRequest {
            top_k: -1,
            ..ids(vec![1])
        };
        assert!(error(k).contains("top_k"));
    }
}
