//! `--dtype`: the attention half with bf16 or f16 weights (prompt chunks,
//! then decodes, through the KV cache) gives logits close to the f32
//! engine's, hands the MoE half f32 rows, and returns f32 logits.

use std::convert::Infallible;
use std::future::Future;
use std::task::{Context, Poll, Waker};

use attention_svc::{Engine, MoeLayer, SequenceCache, SequenceChunk};
use candle_core::{DType, Device, Tensor};
use moe_model::synth::{self, Preset};
use moe_model::{Checkpoint, Kernels, ModelConfig};

/// A MoE half that halves its input, and checks it is given f32 rows.
struct Halve;

impl MoeLayer for Halve {
    type Error = Infallible;

    async fn forward(&self, _layer: usize, hidden: &Tensor) -> Result<Tensor, Infallible> {
        assert_eq!(hidden.dtype(), DType::F32, "the MoE half gets f32 rows");
        Ok((hidden * 0.5).expect("halving"))
    }
}

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

/// Two sequences: prompts (one chunked), then decodes; every step's logits.
fn run(engine: &Engine) -> Vec<Tensor> {
    let steps: [[&[u32]; 2]; 4] = [
        [&[3, 9, 27, 11, 4], &[5, 6, 7]],
        [&[2], &[8, 9, 10, 11]],
        [&[12], &[13]],
        [&[14], &[15]],
    ];
    let mut caches: Vec<SequenceCache> = (0..2).map(|_| engine.new_cache()).collect();
    steps
        .iter()
        .map(|step| {
            let mut chunks: Vec<SequenceChunk<'_>> = caches
                .iter_mut()
                .zip(step)
                .map(|(cache, tokens)| SequenceChunk { cache, tokens })
                .collect();
            block_on(engine.step(&mut chunks, &Halve)).unwrap()
        })
        .collect()
}

#[test]
fn half_precision_attention_is_close_to_f32() {
    let dir = tempfile::tempdir().unwrap();
    let config = ModelConfig {
        num_hidden_layers: 2,
        num_key_value_heads: 2,
        ..Preset::Tiny.config(64)
    };
    synth::write_config(dir.path(), &config).unwrap();
    synth::write_weights(dir.path(), &config, 11).unwrap();
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let reference = run(&Engine::load(&checkpoint, &Device::Cpu).unwrap());
    for dtype in [DType::BF16, DType::F16] {
        for kernels in [Kernels::Fast, Kernels::Generic] {
            let engine = Engine::load_as(&checkpoint, &Device::Cpu, dtype)
                .unwrap()
                .with_kernels(kernels);
            for (step, (got, expected)) in run(&engine).iter().zip(&reference).enumerate() {
                assert_eq!(got.dtype(), DType::F32, "logits are f32");
                assert_eq!(got.dims(), expected.dims());
                let error = (got - expected)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                // Logits of unit scale, two layers of 8-bit-mantissa
                // roundings.
                assert!(
                    error <= 0.1,
                    "{dtype:?} with {kernels} kernels, step {step}: logits off by {error}"
                );
            }
        }
    }
}
