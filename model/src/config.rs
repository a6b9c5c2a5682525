//! The model's shape, read from a Hugging Face `config.json`.
//!
//! transformers 4.x and 5.x spell a few fields differently (`rope_theta` vs
//! `rope_parameters.rope_theta`, `torch_dtype` vs `dtype`); both are accepted
//! here so that no other crate has to care.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// The subset of a Mixtral-style config.json that the math depends on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub num_local_experts: usize,
    pub num_experts_per_tok: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The checkpoint's storage dtype as config.json names it ("float32").
    pub dtype: String,
}

/// config.json as transformers writes it, every version's spelling optional.
#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    num_local_experts: usize,
    num_experts_per_tok: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

#[derive(Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

/// Elements (times 64 bytes of headroom) one product of a config's sizes
/// may reach.
const MAX_ELEMENTS: usize = 1 << 46;

/// Mixtral's default when config.json names no theta at all.
const DEFAULT_ROPE_THETA: f64 = 1e6;

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&text).map_err(|err| match err {
            ModelError::Config(message) => {
                ModelError::Config(format!("{}: {message}", path.display()))
            }
            other => other,
        })
    }

    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|err| ModelError::Config(err.to_string()))?;
        let rope_theta = match (&raw.rope_parameters, raw.rope_theta) {
            (Some(params), _) if params.rope_type.as_deref().is_some_and(|t| t != "default") => {
                return Err(ModelError::Config(format!(
                    "rope_parameters.rope_type {:?} is not supported (only \"default\")",
                    params.rope_type.as_deref().unwrap_or_default()
                )));
            }
            (
                Some(RopeParameters {
                    rope_theta: Some(theta),
                    ..
                }),
                _,
            ) => *theta,
            (_, Some(theta)) => theta,
            _ => DEFAULT_ROPE_THETA,
        };
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        let head_dim = raw
            .head_dim
            .unwrap_or(raw.hidden_size / raw.num_attention_heads.max(1));
        let config = Self {
            model_type: raw.model_type.unwrap_or_else(|| "mixtral".into()),
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: raw.max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            num_local_experts: raw.num_local_experts,
            num_experts_per_tok: raw.num_experts_per_tok,
            tie_word_embeddings: raw.tie_word_embeddings,
            bos_token_id: raw.bos_token_id,
            eos_token_ids: match raw.eos_token_id {
                None => vec![],
                Some(OneOrMany::One(id)) => vec![id],
                Some(OneOrMany::Many(ids)) => ids,
            },
            dtype: raw
                .dtype
                .or(raw.torch_dtype)
                .unwrap_or_else(|| "float32".into()),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ModelError> {
        let fail = |message: String| Err(ModelError::Config(message));
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("max_position_embeddings", self.max_position_embeddings),
            ("num_local_experts", self.num_local_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
        ] {
            if value == 0 {
                return fail(format!("{name} must be positive"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return fail(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return fail(format!(
                "head_dim ({}) must be even and positive for rotary embeddings",
                self.head_dim
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return fail(format!("rope_theta ({}) must be positive", self.rope_theta));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return fail(format!(
                "rms_norm_eps ({}) must be zero or positive",
                self.rms_norm_eps
            ));
        }
        // Every size a process multiplies (weights' element counts, the KV
        // cache per position, the experts' rows) must fit: an absurd config
        // is refused here, not by an overflow later.
        let elements = [
            [self.vocab_size, self.hidden_size, 1],
            [self.num_attention_heads, self.head_dim, self.hidden_size],
            [
                self.hidden_size,
                self.intermediate_size,
                self.num_local_experts,
            ],
            [
                self.num_hidden_layers,
                self.num_key_value_heads,
                self.head_dim,
            ],
            [self.max_position_embeddings, self.hidden_size, 1],
        ];
        if elements.iter().any(|sizes| {
            sizes
                .iter()
                .try_fold(64usize, |product, &size| product.checked_mul(size))
                .is_none_or(|product| product > MAX_ELEMENTS)
        }) {
            return fail(
                "the sizes are too large: a product of them overflows (sizes up to 2^40 elements are taken)"
                    .into(),
            );
        }
        if self.num_experts_per_tok > self.num_local_experts {
            return fail(format!(
                "num_experts_per_tok ({}) exceeds num_local_experts ({})",
                self.num_experts_per_tok, self.num_local_experts
            ));
        }
        Ok(())
    }

    /// Width of the query projection: heads × head_dim.
    pub fn q_width(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of each of the key and value projections.
    pub fn kv_width(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// The config.json this crate writes for a synthetic checkpoint, in the
    /// transformers 4.x spelling (which mistral.rs also reads).
    pub fn to_hf_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["MixtralForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids.first(),
            "torch_dtype": self.dtype,
            "sliding_window": null,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "router_aux_loss_coef": 0.0,
            "output_router_logits": false,
        })
    }
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    const V4: &str = r#"{
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": 100, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "num_local_experts": 16, "num_experts_per_tok": 2, "sliding_window": null,
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32", "head_dim": null
    }"#;

    #[test]
    fn reads_transformers_4_spelling() {
        let config = ModelConfig::from_json(V4).unwrap();
        assert_eq!(config.rope_theta, 10000.0);
        assert_eq!(config.head_dim, 8);
        assert_eq!(config.num_key_value_heads, 1);
        assert_eq!(config.eos_token_ids, vec![2]);
        assert_eq!(config.dtype, "float32");
    }

    #[test]
    fn reads_transformers_5_spelling() {
        let v5 = V4
            .replace(
                r#""rope_theta": 10000.0"#,
                r#""rope_parameters": {"rope_theta": 500.0, "rope_type": "default"}"#,
            )
            .replace(r#""torch_dtype""#, r#""dtype""#)
            .replace(r#""eos_token_id": 2"#, r#""eos_token_id": [2, 5]"#);
        let config = ModelConfig::from_json(&v5).unwrap();
        assert_eq!(config.rope_theta, 500.0);
        assert_eq!(config.eos_token_ids, vec![2, 5]);
    }

    #[test]
    fn refuses_inconsistent_shapes() {
        let bad = V4.replace(r#""num_key_value_heads": 1"#, r#""num_key_value_heads": 3"#);
        let err = ModelConfig::from_json(&bad).unwrap_err().to_string();
        assert!(err.contains("num_key_value_heads (3)"), "{err}");
        let bad = V4.replace(
            r#""num_experts_per_tok": 2"#,
            r#""num_experts_per_tok": 17"#,
        );
        let err = ModelConfig::from_json(&bad).unwrap_err().to_string();
        assert!(err.contains("num_experts_per_tok (17)"), "{err}");
    }

    #[test]
    fn written_config_reads_back() {
        let config = ModelConfig::from_json(V4).unwrap();
        let again = ModelConfig::from_json(&config.to_hf_json().to_string()).unwrap();
        assert_eq!(config, again);
    }
}
