//! One expert's SwiGLU forward at the small preset's shapes (d_model 512,
//! width 1408), at batch sizes 1..256.
//!
//! Each iteration runs the next of the expert's 8 layers, so the weights
//! (8.6 MB a layer, 69 MB in all) come from memory rather than from a cache
//! that a real step, touching 16 experts, would not have: decode-sized
//! batches measure the memory-bound product, large ones the compute-bound
//! one. Throughput is in rows (tokens) per second.
//!
//! Group `expert_forward` runs the fast kernels (the CPU default),
//! `expert_forward_generic` the generic ones (`--kernels generic`: candle
//! operations only, what a GPU runs).
//!
//! `cargo bench -p expert-svc --bench expert_forward`

use std::hint::black_box;

use candle_core::{Device, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use expert_svc::ExpertWeights;
use moe_model::synth::{self, Preset};
use moe_model::{Checkpoint, Kernels, ModelConfig};

/// A checkpoint of the small preset's shapes with a single expert.
fn one_expert_checkpoint(dir: &std::path::Path) -> ModelConfig {
    let config = ModelConfig {
        num_local_experts: 1,
        num_experts_per_tok: 1,
        vocab_size: 512,
        ..Preset::Small.config(512)
    };
    synth::write_config(dir, &config).unwrap();
    synth::write_weights(dir, &config, 0).unwrap();
    config
}

fn expert_forward(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let config = one_expert_checkpoint(dir.path());
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let layers = config.num_hidden_layers;
    for (name, kernels) in [
        ("expert_forward", Kernels::Fast),
        ("expert_forward_generic", Kernels::Generic),
    ] {
        let expert = ExpertWeights::load(&checkpoint, 0, 0..layers, &Device::Cpu)
            .unwrap()
            .with_kernels(kernels);
        let mut group = c.benchmark_group(name);
        for rows in [1usize, 4, 8, 9, 16, 64, 256] {
            let x = Tensor::randn(0f32, 1.0, (rows, config.hidden_size), &Device::Cpu).unwrap();
            group.throughput(Throughput::Elements(rows as u64));
            group.bench_with_input(BenchmarkId::from_parameter(rows), &x, |b, x| {
                let mut layer = 0;
                b.iter(|| {
                    layer = (layer + 1) % layers;
                    black_box(expert.forward(layer, x).unwrap())
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, expert_forward);
criterion_main!(benches);
