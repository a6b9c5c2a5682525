//! The tensor codec's speed, in bytes of f32 hidden states per second: a
//! prefill layer's message to one expert (1024 rows of d_model 512, 2 MiB),
//! as the router encodes it (a row buffer, f32 zero-copy or converted to
//! bf16) and decodes the result, and as an expert does (candle tensors).
//!
//! `cargo bench -p moe-proto --bench codec`

use std::hint::black_box;

use candle_core::{Device, Tensor};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use moe_proto::{WireDType, tensor_codec};

const ROWS: usize = 1024;
const WIDTH: usize = 512;

fn codec(c: &mut Criterion) {
    let values: Vec<f32> = (0..ROWS * WIDTH)
        .map(|i| (i % 977) as f32 * 0.01 - 4.0)
        .collect();
    let tensor = Tensor::from_vec(values.clone(), (ROWS, WIDTH), &Device::Cpu).unwrap();
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Bytes((ROWS * WIDTH * 4) as u64));
    for dtype in [WireDType::F32, WireDType::BF16] {
        let name = dtype.name();
        group.bench_with_input(
            BenchmarkId::new("encode_rows", name),
            &dtype,
            |b, &dtype| {
                // The buffer is handed over, so each iteration gets a fresh one
                // (made outside the timing).
                b.iter_batched(
                    || values.clone(),
                    |values| black_box(tensor_codec::encode_rows(values, WIDTH, dtype)),
                    BatchSize::LargeInput,
                )
            },
        );
        let message = tensor_codec::encode_rows(values.clone(), WIDTH, dtype);
        group.bench_with_input(
            BenchmarkId::new("decode_rows_f32", name),
            &message,
            |b, m| b.iter(|| black_box(tensor_codec::decode_rows_f32(Some(m), WIDTH).unwrap())),
        );
        group.bench_with_input(
            BenchmarkId::new("encode_tensor", name),
            &dtype,
            |b, &dtype| b.iter(|| black_box(tensor_codec::encode(&tensor, dtype).unwrap())),
        );
        group.bench_with_input(BenchmarkId::new("decode_tensor", name), &message, |b, m| {
            b.iter(|| black_box(tensor_codec::decode_rows(Some(m), WIDTH, &Device::Cpu).unwrap()))
        });
    }
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
