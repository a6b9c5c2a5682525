//! The step executor: one batched forward step over the new rows of many
//! sequences, layer by layer, handing each layer's MoE input to a
//! [`MoeLayer`].

use std::future::Future;

use candle_core::{DType, Device, Tensor};
use candle_nn::ops::rms_norm;
use moe_model::{Checkpoint, Kernels, ModelConfig};
use tracing::Instrument;

use crate::attention::attend;
use crate::decode_attention::{DecodeRow, Heads, attend_decode_rows};
use crate::generic_attention;
use crate::rotary::Rotary;
use crate::{AttentionError, SequenceCache, SharedWeights, StepError};

/// The sparse half of every layer, as the step executor sees it.
pub trait MoeLayer: Sync {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Takes `[rows, hidden]` post-attention-norm hidden states of `layer`
    /// and returns `[rows, hidden]`: the weighted sum of the outputs of the
    /// experts each row is routed to.
    fn forward(
        &self,
        layer: usize,
        hidden: &Tensor,
    ) -> impl Future<Output = Result<Tensor, Self::Error>> + Send;
}

/// The new tokens of one sequence in a step: a whole prompt, a chunk of
/// one, or the single token of a decode.
pub struct SequenceChunk<'a> {
    pub cache: &'a mut SequenceCache,
    pub tokens: &'a [u32],
}

pub struct Engine {
    config: ModelConfig,
    weights: SharedWeights,
    rotary: Rotary,
    device: Device,
    /// Decode attention through the CPU kernel (fast) or candle (generic).
    kernels: Kernels,
}

impl Engine {
    /// Loads the shared weights onto `device`, to run the fast kernels
    /// where it has them; [`Engine::with_kernels`] chooses. In f32:
    /// [`Engine::load_as`] takes another dtype.
    pub fn load(checkpoint: &Checkpoint, device: &Device) -> Result<Self, AttentionError> {
        Self::load_as(checkpoint, device, DType::F32)
    }

    /// [`Engine::load`] with the weights in `dtype`, which the attention
    /// half computes in. The MoE half gets and returns f32 rows (the gate
    /// routes in f32, the wire and the dispatcher carry f32), and the
    /// logits are f32; the KV cache holds f32.
    pub fn load_as(
        checkpoint: &Checkpoint,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, AttentionError> {
        let config = checkpoint.config().clone();
        Ok(Self {
            weights: SharedWeights::load_as(checkpoint, device, dtype)?,
            rotary: Rotary::new(&config, device, dtype)?,
            config,
            device: device.clone(),
            kernels: Kernels::Fast.for_device(device),
        })
    }

    /// The same engine, computing with `kernels`: on any device but the
    /// CPU, the generic ones whatever is asked.
    pub fn with_kernels(self, kernels: Kernels) -> Self {
        Self {
            kernels: kernels.for_device(&self.device),
            ..self
        }
    }

    /// The kernels its steps run.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn new_cache(&self) -> SequenceCache {
        SequenceCache::new(
            self.config.num_hidden_layers,
            self.config.num_key_value_heads,
            self.config.head_dim,
        )
    }

    /// Runs one forward step over every chunk's tokens, appending them to
    /// their sequences' caches, and returns the logits `[chunks, vocab]` of
    /// each chunk's last token.
    pub async fn step<M: MoeLayer>(
        &self,
        chunks: &mut [SequenceChunk<'_>],
        moe: &M,
    ) -> Result<Tensor, StepError<M::Error>> {
        let (tokens, positions) = self.flatten(chunks)?;
        let eps = self.config.rms_norm_eps as f32;
        let mut x = self.weights.embed_tokens.index_select(&tokens, 0)?;
        for (layer, weights) in self.weights.layers.iter().enumerate() {
            let attention_span = tracing::debug_span!("attention", layer).entered();
            let normed = rms_norm(&x, &weights.input_norm, eps)?;
            let attention = self.attention(layer, &normed, &positions, chunks)?;
            let h = (x + attention.matmul(&weights.o_proj)?)?;
            let moe_input = rms_norm(&h, &weights.post_attention_norm, eps)?;
            drop(attention_span);
            let moe_output = moe
                .forward(layer, &moe_input.to_dtype(DType::F32)?)
                .instrument(tracing::debug_span!("moe", layer))
                .await
                .map_err(StepError::Moe)?;
            x = (&h + moe_output.to_dtype(h.dtype())?)?;
        }
        let mut last_rows = Vec::with_capacity(chunks.len());
        let mut end = 0u32;
        for chunk in chunks.iter_mut() {
            chunk.cache.advance(chunk.tokens.len());
            end += chunk.tokens.len() as u32;
            last_rows.push(end - 1);
        }
        let last_rows = Tensor::new(last_rows, &self.device)?;
        let last = rms_norm(
            &x.index_select(&last_rows, 0)?,
            &self.weights.final_norm,
            eps,
        )?;
        Ok(last.matmul(&self.weights.lm_head)?.to_dtype(DType::F32)?)
    }

    /// All chunks' token ids and positions, after checking each chunk fits
    /// the context and names tokens of the vocabulary.
    fn flatten(&self, chunks: &[SequenceChunk<'_>]) -> Result<(Tensor, Tensor), AttentionError> {
        let rows: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let (mut tokens, mut positions) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
        for chunk in chunks {
            let start = chunk.cache.len();
            let needed = start + chunk.tokens.len();
            if chunk.tokens.is_empty() || needed > self.config.max_position_embeddings {
                return Err(AttentionError::ContextOverflow {
                    needed,
                    max: self.config.max_position_embeddings,
                });
            }
            if let Some(&bad) = chunk
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.config.vocab_size)
            {
                return Err(AttentionError::TokenOutOfVocabulary {
                    token: bad,
                    vocab_size: self.config.vocab_size,
                });
            }
            tokens.extend_from_slice(chunk.tokens);
            positions.extend(start as u32..needed as u32);
        }
        Ok((
            Tensor::new(tokens, &self.device)?,
            Tensor::new(positions, &self.device)?,
        ))
    }

    /// Self-attention of every chunk's new rows: projections and rotary
    /// embeddings batched over all rows, the attention proper per sequence.
    fn attention(
        &self,
        layer: usize,
        normed: &Tensor,
        positions: &Tensor,
        chunks: &mut [SequenceChunk<'_>],
    ) -> Result<Tensor, AttentionError> {
        let weights = &self.weights.layers[layer];
        let config = &self.config;
        let rows = normed.dim(0)?;
        let (heads, kv_heads) = (config.num_attention_heads, config.num_key_value_heads);
        let qkv =
            normed
                .matmul(&weights.qkv)?
                .reshape((rows, heads + 2 * kv_heads, config.head_dim))?;
        let q = self
            .rotary
            .apply(&qkv.narrow(1, 0, heads)?.contiguous()?, positions)?;
        let k = self
            .rotary
            .apply(&qkv.narrow(1, heads, kv_heads)?.contiguous()?, positions)?;
        let v = qkv.narrow(1, heads + kv_heads, kv_heads)?;
        let position_width = kv_heads * config.head_dim;
        // The cache holds f32 whatever the weights' dtype.
        let (k, v) = (
            k.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            v.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
        );
        // Every chunk appends its new positions first. Decode rows then go
        // through one kernel together (the CPU one, or candle's with the
        // generic kernels); prompt chunks through candle.
        let mut offset = 0;
        let mut decodes = Vec::new();
        for (index, chunk) in chunks.iter_mut().enumerate() {
            let span = offset * position_width..(offset + chunk.tokens.len()) * position_width;
            chunk
                .cache
                .append(layer, &k[span.clone()], &v[span.clone()]);
            if chunk.tokens.len() == 1 {
                decodes.push((index, offset as u32));
            }
            offset += chunk.tokens.len();
        }
        let decoded = if decodes.is_empty() {
            None
        } else {
            Some(match self.kernels {
                Kernels::Fast => self.attend_decodes(layer, &q, &decodes, chunks)?,
                Kernels::Generic => self.attend_decodes_generic(layer, &q, &decodes, chunks)?,
            })
        };
        if decodes.len() == chunks.len() {
            return Ok(decoded.expect("every chunk is a decode"));
        }
        let mut outputs = Vec::with_capacity(chunks.len());
        let (mut offset, mut decoded_rows) = (0, 0);
        for chunk in chunks.iter() {
            let n = chunk.tokens.len();
            if n == 1 {
                let decoded = decoded.as_ref().expect("decodes were attended");
                outputs.push(decoded.narrow(0, decoded_rows, 1)?);
                decoded_rows += 1;
            } else {
                let (keys, values) = chunk.cache.tensors(layer, kv_heads, &self.device)?;
                let (keys, values) = (keys.to_dtype(q.dtype())?, values.to_dtype(q.dtype())?);
                outputs.push(attend(&q.narrow(0, offset, n)?, &keys, &values)?);
            }
            offset += n;
        }
        Ok(Tensor::cat(&outputs, 0)?)
    }

    /// [`Engine::attend_decodes`] as candle operations only.
    fn attend_decodes_generic(
        &self,
        layer: usize,
        q: &Tensor,
        decodes: &[(usize, u32)],
        chunks: &[SequenceChunk<'_>],
    ) -> Result<Tensor, AttentionError> {
        let rows = Tensor::new(
            decodes.iter().map(|(_, row)| *row).collect::<Vec<_>>(),
            &self.device,
        )?;
        let contexts: Vec<(&[f32], &[f32])> = decodes
            .iter()
            .map(|(index, _)| chunks[*index].cache.layer(layer))
            .collect();
        Ok(generic_attention::attend_decode_rows(
            &q.index_select(&rows, 0)?,
            &contexts,
            self.config.num_key_value_heads,
        )?)
    }

    /// Attention of the decode rows `decodes` (chunk index, row in `q`),
    /// whose keys and values were just appended to their caches.
    fn attend_decodes(
        &self,
        layer: usize,
        q: &Tensor,
        decodes: &[(usize, u32)],
        chunks: &[SequenceChunk<'_>],
    ) -> Result<Tensor, AttentionError> {
        let shape = Heads {
            heads: self.config.num_attention_heads,
            kv_heads: self.config.num_key_value_heads,
            head_dim: self.config.head_dim,
        };
        let width = shape.heads * shape.head_dim;
        let rows = Tensor::new(
            decodes.iter().map(|(_, row)| *row).collect::<Vec<_>>(),
            &self.device,
        )?;
        let queries = (q.index_select(&rows, 0)?.to_dtype(DType::F32)?)
            .flatten_all()?
            .to_vec1::<f32>()?;
        let rows: Vec<DecodeRow<'_>> = decodes
            .iter()
            .zip(queries.chunks_exact(width))
            .map(|((index, _), query)| {
                let (keys, values) = chunks[*index].cache.layer(layer);
                DecodeRow {
                    query,
                    keys,
                    values,
                }
            })
            .collect();
        let mut output = vec![0f32; decodes.len() * width];
        attend_decode_rows(&rows, shape, &mut output);
        Ok(Tensor::from_vec(output, (decodes.len(), width), &self.device)?.to_dtype(q.dtype())?)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::task::{Context, Poll, Waker};

    use moe_model::synth::{self, Preset};

    use super::*;

    /// A MoE half that halves its input, so that each layer's attention
    /// output reaches the next layer and the logits.
    struct Halve;

    impl MoeLayer for Halve {
        type Error = Infallible;

        async fn forward(&self, _layer: usize, hidden: &Tensor) -> Result<Tensor, Infallible> {
            Ok((hidden * 0.5).expect("halving"))
        }
    }

    /// Runs a step whose MoE half never waits.
    fn block_on<F: Future>(future: F) -> F::Output {
        let mut future = std::pin::pin!(future);
        match future
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
        {
            Poll::Ready(output) => output,
            Poll::Pending => panic!("the step waited on nothing"),
        }
    }

    /// Per step, the tokens each sequence adds (none: it sits the step
    /// out): whole prompts, a one-token prompt, a prompt continued in a
    /// second chunk, a sequence that joins late, then decodes.
    const STEPS: [[&[u32]; 4]; 5] = [
        [&[3, 9, 27, 11, 4, 8, 50], &[5], &[7; 12], &[]],
        [&[2], &[6], &[1, 2, 3, 4, 5], &[9, 8, 7]],
        [&[12], &[13], &[14], &[15]],
        [&[16], &[], &[18], &[19]],
        [&[20], &[21], &[22], &[23]],
    ];

    /// Every step's logits, flattened, on `engine`.
    fn run(engine: &Engine) -> Vec<Vec<f32>> {
        let mut caches: Vec<SequenceCache> = (0..4).map(|_| engine.new_cache()).collect();
        STEPS
            .iter()
            .map(|step| {
                let mut chunks: Vec<SequenceChunk<'_>> = caches
                    .iter_mut()
                    .zip(step)
                    .filter(|(_, tokens)| !tokens.is_empty())
                    .map(|(cache, tokens)| SequenceChunk { cache, tokens })
                    .collect();
                block_on(engine.step(&mut chunks, &Halve))
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect()
    }

    /// The whole attention (prompt chunks, chunked prompts and decode
    /// rows in mixed steps) with the generic kernels against the fast
    /// ones, for MQA, GQA and MHA. Prompt chunks take the same candle path
    /// with both; decode rows differ, in summation order only: logits
    /// (of unit scale) within 1e-4.
    #[test]
    fn generic_kernels_give_the_fast_kernels_logits() {
        for kv_heads in [1, 2, 4] {
            let dir = tempfile::tempdir().unwrap();
            let config = ModelConfig {
                num_hidden_layers: 2,
                num_key_value_heads: kv_heads,
                num_local_experts: 2,
                num_experts_per_tok: 1,
                ..Preset::Tiny.config(64)
            };
            synth::write_config(dir.path(), &config).unwrap();
            synth::write_weights(dir.path(), &config, 5).unwrap();
            let checkpoint = Checkpoint::open(dir.path()).unwrap();
            let fast = Engine::load(&checkpoint, &Device::Cpu).unwrap();
            assert_eq!(fast.kernels(), Kernels::Fast);
            let generic = Engine::load(&checkpoint, &Device::Cpu)
                .unwrap()
                .with_kernels(Kernels::Generic);
            assert_eq!(generic.kernels(), Kernels::Generic);
            for (step, (got, expected)) in run(&generic).iter().zip(run(&fast)).enumerate() {
                assert_eq!(got.len(), expected.len());
                for (g, e) in got.iter().zip(&expected) {
                    assert!(
                        (g - e).abs() <= 1e-4,
                        "{kv_heads} kv heads, step {step}: generic {g} vs fast {e}"
                    );
                }
            }
        }
    }
}
