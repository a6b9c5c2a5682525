//! Utilisation: the model FLOPs a run did per second, against the matrix
//! product rate this machine reaches with candle (f32) at the model's own
//! shapes. A product is 2·m·n·k FLOPs; norms, softmax and rotary are left
//! out (they are a rounding error next to the products).

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use moe_proto::v1::ModelInfoResponse;
use serde::Serialize;

/// The dimensions that set a token's FLOPs.
#[derive(Debug, Clone, Copy)]
pub struct ModelShape {
    pub layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub experts: usize,
    pub top_k: usize,
    pub vocab: usize,
}

impl From<&ModelInfoResponse> for ModelShape {
    fn from(info: &ModelInfoResponse) -> Self {
        Self {
            layers: info.num_layers as usize,
            hidden: info.hidden_size as usize,
            intermediate: info.intermediate_size as usize,
            heads: info.num_attention_heads as usize,
            kv_heads: info.num_key_value_heads as usize,
            head_dim: info.head_dim as usize,
            experts: info.num_experts as usize,
            top_k: info.num_experts_per_tok as usize,
            vocab: info.vocab_size as usize,
        }
    }
}

impl From<&moe_model::ModelConfig> for ModelShape {
    fn from(config: &moe_model::ModelConfig) -> Self {
        Self {
            layers: config.num_hidden_layers,
            hidden: config.hidden_size,
            intermediate: config.intermediate_size,
            heads: config.num_attention_heads,
            kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
            experts: config.num_local_experts,
            top_k: config.num_experts_per_tok,
            vocab: config.vocab_size,
        }
    }
}

impl ModelShape {
    /// Products of one token through every layer, without attention over
    /// the context and without the LM head: projections, gate, and the
    /// top-k experts' SwiGLU.
    fn layer_flops_per_token(&self) -> f64 {
        let (d, hd) = (self.hidden as f64, self.head_dim as f64);
        let attention_projections = d * hd * (2.0 * self.heads as f64 + 2.0 * self.kv_heads as f64);
        let gate = d * self.experts as f64;
        let experts = self.top_k as f64 * 3.0 * d * self.intermediate as f64;
        2.0 * self.layers as f64 * (attention_projections + gate + experts)
    }

    /// Scores and weighted values of one token at `position` (0-based).
    fn attention_flops(&self, position: usize) -> f64 {
        let context = (position + 1) as f64;
        2.0 * 2.0 * self.layers as f64 * (self.heads * self.head_dim) as f64 * context
    }

    fn lm_head_flops(&self) -> f64 {
        2.0 * (self.hidden * self.vocab) as f64
    }

    /// FLOPs of one request: the prompt's forward pass and one forward step
    /// per generated token after the first, with the LM head once per
    /// generated token.
    pub fn request_flops(&self, prompt_tokens: usize, generated: usize) -> f64 {
        if generated == 0 {
            return 0.0;
        }
        let positions = prompt_tokens + generated - 1;
        let attention: f64 = (0..positions).map(|p| self.attention_flops(p)).sum();
        positions as f64 * self.layer_flops_per_token()
            + attention
            + generated as f64 * self.lm_head_flops()
    }

    /// The products this model runs, as (rows, inner, columns): an expert's
    /// fused gate/up and its down projection for a full batch, and a query
    /// projection.
    fn product_shapes(&self, rows: usize) -> [(usize, usize, usize); 3] {
        [
            (rows, self.hidden, 2 * self.intermediate),
            (rows, self.intermediate, self.hidden),
            (rows, self.hidden, self.heads * self.head_dim),
        ]
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Peak {
    pub flops_per_s: f64,
    /// The (rows, inner, columns) product that reached it.
    pub shape: (usize, usize, usize),
}

/// The best f32 matrix-product rate candle reaches on this machine's CPU
/// at `shape`'s products (256 rows: a well-batched step), using every core.
pub fn measure_peak(shape: &ModelShape) -> candle_core::Result<Peak> {
    let mut best = Peak {
        flops_per_s: 0.0,
        shape: (0, 0, 0),
    };
    for (m, k, n) in shape.product_shapes(256) {
        let a = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
        let b = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        let bt = b.t()?;
        a.matmul(&bt)?; // warm-up: first-touch pages and thread pool start
        let started = Instant::now();
        let mut runs = 0u32;
        while started.elapsed() < Duration::from_millis(300) {
            a.matmul(&bt)?;
            runs += 1;
        }
        let rate = 2.0 * (m * k * n) as f64 * runs as f64 / started.elapsed().as_secs_f64();
        if rate > best.flops_per_s {
            best = Peak {
                flops_per_s: rate,
                shape: (m, k, n),
            };
        }
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> ModelShape {
        ModelShape {
            layers: 2,
            hidden: 8,
            intermediate: 16,
            heads: 4,
            kv_heads: 2,
            head_dim: 2,
            experts: 4,
            top_k: 2,
            vocab: 10,
        }
    }

    #[test]
    fn request_flops_counts_every_product() {
        let s = shape();
        // Per layer per token: q,o 2*8*8 + k,v 2*8*4 + gate 8*4 + 2 experts
        // * 3*8*16 = 128 + 64 + 32 + 768 = 992 MACs.
        let layer = 2.0 * 2.0 * 992.0;
        assert_eq!(s.layer_flops_per_token(), layer);
        // 2 prompt tokens + 2 generated: positions 0, 1, 2 go through the
        // layers, the LM head runs twice.
        let attention = |p: f64| 2.0 * 2.0 * 2.0 * 8.0 * (p + 1.0);
        let expected =
            3.0 * layer + attention(0.0) + attention(1.0) + attention(2.0) + 2.0 * 2.0 * 80.0;
        assert_eq!(s.request_flops(2, 2), expected);
        assert_eq!(s.request_flops(5, 0), 0.0);
    }

    /// The f32 product rate of `(m, k, n)` timed here, independently of
    /// [`measure_peak`]: the best of several runs of a few products each.
    fn product_rate(m: usize, k: usize, n: usize) -> f64 {
        let a = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 1.0, (k, n), &Device::Cpu).unwrap();
        a.matmul(&b).unwrap();
        let mut best = Duration::MAX;
        for _ in 0..20 {
            let started = Instant::now();
            for _ in 0..10 {
                a.matmul(&b).unwrap();
            }
            best = best.min(started.elapsed() / 10);
        }
        2.0 * (m * k * n) as f64 / best.as_secs_f64()
    }

    /// The peak is the rate of one of the model's products (at 256 rows),
    /// a plausible rate for a CPU (1e8 to 1e13 FLOP/s), and within a
    /// factor of ten of that product's rate timed here by other means. The
    /// bounds are wide because a busy shared machine can slow either
    /// measurement several times: the test catches a wrong shape, unit or
    /// FLOP count, not a slow machine.
    #[test]
    fn peak_is_the_rate_of_a_model_product() {
        let model = moe_model::synth::Preset::Tiny.config(512);
        let shape = ModelShape::from(&model);
        let peak = measure_peak(&shape).unwrap();
        assert!(
            shape.product_shapes(256).contains(&peak.shape),
            "{:?} is not one of the model's products",
            peak.shape
        );
        assert_eq!(peak.shape.0, 256);
        assert!(
            (1e8..1e13).contains(&peak.flops_per_s),
            "{} FLOP/s is not a CPU's rate",
            peak.flops_per_s
        );
        let (m, k, n) = peak.shape;
        let timed = product_rate(m, k, n);
        let ratio = peak.flops_per_s / timed;
        assert!(
            (0.1..10.0).contains(&ratio),
            "measured peak {:.3e} FLOP/s, the same product timed here {timed:.3e}",
            peak.flops_per_s
        );
    }
}
