//! The router's own share of an MoE layer: gate, gathering each expert's
//! rows, and combining the weighted results, at the small preset's shapes
//! (16 experts, top-2, d_model 512), over a backend that replies at once
//! (it echoes the rows). What is measured is what the router adds on top of
//! the experts' forward passes, at a decode step (32 rows) and a prefill
//! step (1024 rows).
//!
//! `cargo bench -p router-svc --bench dispatch`

use std::hint::black_box;
use std::sync::Arc;

use attention_svc::MoeLayer;
use candle_core::{Device, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use router_svc::dispatch::{ExpertBackend, MoeDispatcher};
use router_svc::gate::Gate;
use router_svc::stats::RouterStats;
use router_svc::{OnExpertDown, RouterError};

const EXPERTS: usize = 16;
const HIDDEN: usize = 512;

struct Echo;

impl ExpertBackend for Echo {
    async fn run(&self, _: usize, _: usize, rows: Vec<f32>) -> Result<Vec<f32>, RouterError> {
        Ok(rows)
    }
}

fn dispatch(c: &mut Criterion) {
    let device = Device::Cpu;
    let gate_weight =
        (Tensor::randn(0f32, 1.0, (EXPERTS, HIDDEN), &device).unwrap() * 0.2).unwrap();
    let dispatcher = MoeDispatcher::new(
        Gate::new(vec![gate_weight], 2).unwrap(),
        Echo,
        Arc::new(RouterStats::new(
            EXPERTS,
            None,
            router_svc::metrics::RouterMetrics::detached(EXPERTS, 1),
        )),
        OnExpertDown::Fail,
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("gate_dispatch_combine");
    for rows in [32usize, 1024] {
        let hidden = Tensor::randn(0f32, 1.0, (rows, HIDDEN), &device).unwrap();
        group.throughput(Throughput::Elements(rows as u64));
        group.bench_with_input(BenchmarkId::from_parameter(rows), &hidden, |b, hidden| {
            b.iter(|| black_box(runtime.block_on(dispatcher.forward(0, hidden)).unwrap()))
        });
    }
    group.finish();
}

criterion_group!(benches, dispatch);
criterion_main!(benches);
