//! The names and shapes of a Mixtral checkpoint's tensors, as transformers'
//! `MixtralForCausalLM` saves them. Both services ask for tensors only through
//! these functions, so a process can list exactly what it will read.

use std::ops::Range;

use crate::ModelConfig;

/// A tensor a process needs: its name in the checkpoint and its shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

fn spec(name: String, shape: &[usize]) -> TensorSpec {
    TensorSpec {
        name,
        shape: shape.to_vec(),
    }
}

pub fn embed_tokens() -> String {
    "model.embed_tokens.weight".into()
}

pub fn final_norm() -> String {
    "model.norm.weight".into()
}

pub fn lm_head() -> String {
    "lm_head.weight".into()
}

pub fn layer_prefix(layer: usize) -> String {
    format!("model.layers.{layer}")
}

pub fn input_layernorm(layer: usize) -> String {
    format!("{}.input_layernorm.weight", layer_prefix(layer))
}

pub fn post_attention_layernorm(layer: usize) -> String {
    format!("{}.post_attention_layernorm.weight", layer_prefix(layer))
}

/// `proj` is one of `q_proj`, `k_proj`, `v_proj`, `o_proj`.
pub fn attention(layer: usize, proj: &str) -> String {
    format!("{}.self_attn.{proj}.weight", layer_prefix(layer))
}

pub fn gate(layer: usize) -> String {
    format!("{}.block_sparse_moe.gate.weight", layer_prefix(layer))
}

/// `matrix` is one of `w1` (gate projection), `w2` (down), `w3` (up).
pub fn expert(layer: usize, expert: usize, matrix: &str) -> String {
    format!(
        "{}.block_sparse_moe.experts.{expert}.{matrix}.weight",
        layer_prefix(layer)
    )
}

/// Everything the router's process reads: embeddings, attention, norms, the
/// gate and the LM head. No expert weights.
pub fn shared_tensors(config: &ModelConfig) -> Vec<TensorSpec> {
    let hidden = config.hidden_size;
    let mut specs = vec![spec(embed_tokens(), &[config.vocab_size, hidden])];
    for layer in 0..config.num_hidden_layers {
        specs.extend([
            spec(input_layernorm(layer), &[hidden]),
            spec(attention(layer, "q_proj"), &[config.q_width(), hidden]),
            spec(attention(layer, "k_proj"), &[config.kv_width(), hidden]),
            spec(attention(layer, "v_proj"), &[config.kv_width(), hidden]),
            spec(attention(layer, "o_proj"), &[hidden, config.q_width()]),
            spec(post_attention_layernorm(layer), &[hidden]),
            spec(gate(layer), &[config.num_local_experts, hidden]),
        ]);
    }
    specs.push(spec(final_norm(), &[hidden]));
    if !config.tie_word_embeddings {
        specs.push(spec(lm_head(), &[config.vocab_size, hidden]));
    }
    specs
}

/// One expert's SwiGLU matrices for `layers`.
pub fn expert_tensors(
    config: &ModelConfig,
    expert_id: usize,
    layers: Range<usize>,
) -> Vec<TensorSpec> {
    let (hidden, ffn) = (config.hidden_size, config.intermediate_size);
    layers
        .flat_map(|layer| {
            [
                spec(expert(layer, expert_id, "w1"), &[ffn, hidden]),
                spec(expert(layer, expert_id, "w2"), &[hidden, ffn]),
                spec(expert(layer, expert_id, "w3"), &[ffn, hidden]),
            ]
        })
        .collect()
}
