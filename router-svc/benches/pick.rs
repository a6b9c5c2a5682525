//! One pick of the replica picker (power of two choices over latency ×
//! in-flight rows), which runs for every expert message of every layer
//! when an expert has several replicas: it must stay far below the
//! message's own cost (tens of µs).
//!
//! `cargo bench -p router-svc --bench pick`

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use router_svc::replicas::picker::{ReplicaLoad, pick};

fn picks(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for replicas in [2usize, 4, 16] {
        let loads: Vec<ReplicaLoad> = (0..replicas)
            .map(|index| ReplicaLoad {
                ready: index % 5 != 4,
                in_flight_rows: (index * 7 % 11) as u64,
                latency: Duration::from_micros(500 + index as u64 * 37),
            })
            .collect();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        group.bench_with_input(BenchmarkId::from_parameter(replicas), &loads, |b, loads| {
            b.iter(|| black_box(pick(black_box(loads), &mut rng)))
        });
    }
    group.finish();
}

criterion_group!(benches, picks);
criterion_main!(benches);
