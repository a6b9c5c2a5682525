//! Resource requests from the checkpoint's shape. The constants are the
//! documented rules (deploy/README.md, "Sizing"); the numbers they give
//! for the examples are in the generated files.

use std::ops::Range;

use moe_model::ModelConfig;

use super::Dtype;

pub const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// Host memory over the weights: the loader holds a host copy of each
/// tensor (converted to the serving dtype) before it moves to the device,
/// and the mapped checkpoint pages are charged to the pod while it loads.
const WEIGHT_MARGIN_PERCENT: u64 = 110;
/// The runtime, gRPC buffers, the metrics exporter and the allocator's slack.
const FIXED_OVERHEAD: u64 = GIB;
/// An expert needs one core for its stream tasks; loading (page-ins, dtype
/// conversion, host-to-device copies) goes faster with more.
const EXPERT_WEIGHT_BYTES_PER_EXTRA_CORE: u64 = 16 * GIB;
/// The router runs attention on the CPU in these manifests: two cores, and
/// one more per 8 GiB of shared weights, up to 32.
const ROUTER_WEIGHT_BYTES_PER_EXTRA_CORE: u64 = 8 * GIB;
const ROUTER_MAX_CORES: u64 = 32;
/// The router's KV-cache budget (`--kv-cache-bytes`): room for
/// `--max-running` (128) full-context sequences, at most 16 GiB.
const ROUTER_MAX_RUNNING: u64 = 128;
const ROUTER_MAX_KV_BYTES: u64 = 16 * GIB;
/// The checkpoint volume's room over the tensors' bytes.
const VOLUME_MARGIN_PERCENT: u64 = 105;

/// What one pod asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requests {
    pub cpu_cores: u64,
    pub memory_bytes: u64,
}

impl Requests {
    pub fn memory(&self) -> String {
        format!("{}Mi", self.memory_bytes.div_ceil(MIB))
    }

    pub fn cpu(&self) -> String {
        self.cpu_cores.to_string()
    }
}

/// Bytes of one expert's SwiGLU weights (w1, w2, w3: hidden × intermediate
/// each) over `layers`.
pub fn expert_weight_bytes(config: &ModelConfig, layers: &Range<usize>, dtype: Dtype) -> u64 {
    3 * config.hidden_size as u64
        * config.intermediate_size as u64
        * layers.len() as u64
        * dtype.bytes()
}

pub fn expert_requests(weight_bytes: u64) -> Requests {
    Requests {
        cpu_cores: 1 + weight_bytes / EXPERT_WEIGHT_BYTES_PER_EXTRA_CORE,
        memory_bytes: with_margin(weight_bytes) + FIXED_OVERHEAD,
    }
}

/// Parameters every token needs: embeddings, attention, norms, the gates
/// and the LM head (everything but the experts).
pub fn shared_parameters(config: &ModelConfig) -> u64 {
    let hidden = config.hidden_size as u64;
    let q = config.q_width() as u64;
    let kv = config.kv_width() as u64;
    let per_layer = hidden * q // q_proj
        + 2 * hidden * kv // k_proj, v_proj
        + q * hidden // o_proj
        + hidden * config.num_local_experts as u64 // the gate
        + 2 * hidden; // two RMSNorms
    let embeddings = config.vocab_size as u64 * hidden;
    let lm_head = if config.tie_word_embeddings {
        0
    } else {
        embeddings
    };
    embeddings + lm_head + config.num_hidden_layers as u64 * per_layer + hidden
}

/// Parameters of one expert over every layer.
pub fn expert_parameters(config: &ModelConfig) -> u64 {
    3 * config.hidden_size as u64
        * config.intermediate_size as u64
        * config.num_hidden_layers as u64
}

/// `--kv-cache-bytes` for the router.
pub fn router_kv_cache_bytes(config: &ModelConfig, dtype: Dtype) -> u64 {
    let per_token = 2 * config.num_hidden_layers as u64 * config.kv_width() as u64 * dtype.bytes();
    (ROUTER_MAX_RUNNING * config.max_position_embeddings as u64 * per_token)
        .min(ROUTER_MAX_KV_BYTES)
}

pub fn router_requests(config: &ModelConfig, dtype: Dtype) -> Requests {
    let weights = shared_parameters(config) * dtype.bytes();
    Requests {
        cpu_cores: (2 + weights / ROUTER_WEIGHT_BYTES_PER_EXTRA_CORE).min(ROUTER_MAX_CORES),
        memory_bytes: with_margin(weights) + router_kv_cache_bytes(config, dtype) + FIXED_OVERHEAD,
    }
}

/// The checkpoint volume's size in `Gi`: every tensor in the checkpoint's
/// own dtype, with a margin.
pub fn volume_size(config: &ModelConfig, checkpoint_dtype_bytes: u64) -> String {
    let parameters =
        shared_parameters(config) + config.num_local_experts as u64 * expert_parameters(config);
    let bytes = parameters * checkpoint_dtype_bytes * VOLUME_MARGIN_PERCENT / 100;
    format!("{}Gi", bytes.div_ceil(GIB))
}

fn with_margin(bytes: u64) -> u64 {
    bytes * WEIGHT_MARGIN_PERCENT / 100
}

/// Contiguous layer ranges of at most `per_shard` layers covering
/// `0..layers`.
pub fn shards(layers: usize, per_shard: usize) -> Vec<Range<usize>> {
    (0..layers)
        .step_by(per_shard)
        .map(|start| start..(start + per_shard).min(layers))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_contiguous_and_cover_every_layer() {
        assert_eq!(shards(120, 30), vec![0..30, 30..60, 60..90, 90..120]);
        assert_eq!(shards(8, 3), vec![0..3, 3..6, 6..8]);
        assert_eq!(shards(4, 8), vec![0..4]);
    }

    #[test]
    fn an_expert_shard_of_the_gpt4_shape_fits_an_80_gb_gpu() {
        let config = moe_model::ModelConfig::from_json(include_str!(
            "../../../../deploy/models/gpt4-shape/config.json"
        ))
        .unwrap();
        // ~111B MLP parameters per expert.
        let per_expert = expert_parameters(&config);
        assert!(
            (110_000_000_000..112_000_000_000).contains(&per_expert),
            "{per_expert}"
        );
        let shard = expert_weight_bytes(&config, &(0..30), Dtype::Bf16);
        assert_eq!(shard, 55_490_641_920);
        assert!(shard < 80_000_000_000);
    }
}
