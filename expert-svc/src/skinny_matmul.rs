//! Products of a few rows with a large `[in, out]` weight matrix, on CPU.
//!
//! At decode an expert sees a handful of rows per layer, and its product is
//! bound by reading the weights (8.6 MB a layer at the small preset's
//! shapes). candle's gemm packs the weight matrix into panels on every call
//! at 2-16 rows, which reads and writes it once more (docs/decisions.md).
//! This kernel reads each weight once, in order, and keeps the few output
//! rows in cache (L2) while it does.

/// At most this many rows go through [`skinny_matmul`]; above it the
/// product is compute-bound and gemm's packing pays for itself.
pub const MAX_ROWS: usize = 8;

/// Weight rows combined per update of the output rows.
const UNROLL: usize = 8;

/// Output columns updated together: two AVX2 registers.
const LANES: usize = 16;

/// Whether this CPU has what the vectorised kernel needs.
pub fn available() -> bool {
    moe_model::cpu_has_avx2_fma()
}

/// `x` (`[rows, inner]`) times `weights` (`[inner, columns]`), row-major,
/// into a new `[rows, columns]`. Callers check [`available`] first.
pub fn skinny_matmul(x: &[f32], rows: usize, weights: &[f32], columns: usize) -> Vec<f32> {
    let inner = weights.len() / columns;
    assert_eq!(x.len(), rows * inner, "x is not [rows, inner]");
    let mut output = vec![0f32; rows * columns];
    #[cfg(target_arch = "x86_64")]
    {
        assert!(available(), "skinny_matmul needs AVX2 and FMA");
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        unsafe { accumulate_avx2(x, rows, inner, weights, columns, &mut output) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    accumulate(x, rows, inner, weights, columns, &mut output);
    output
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn accumulate_avx2(
    x: &[f32],
    rows: usize,
    inner: usize,
    weights: &[f32],
    columns: usize,
    output: &mut [f32],
) {
    // Compiled with AVX2 and FMA enabled, the portable loop below becomes
    // 8-wide fused multiply-adds.
    accumulate(x, rows, inner, weights, columns, output)
}

#[inline(always)]
fn accumulate(
    x: &[f32],
    rows: usize,
    inner: usize,
    weights: &[f32],
    columns: usize,
    output: &mut [f32],
) {
    // Weight rows are read in order, UNROLL at a time: each output row is
    // then updated once per UNROLL weight rows rather than once per row,
    // which keeps the few output rows' traffic (in L2) below the weights'
    // (from memory).
    let mut k = 0;
    while k + UNROLL <= inner {
        let block: [&[f32]; UNROLL] =
            std::array::from_fn(|i| &weights[(k + i) * columns..(k + i + 1) * columns]);
        for row in 0..rows {
            let scales: [f32; UNROLL] = std::array::from_fn(|i| x[row * inner + k + i]);
            let out = &mut output[row * columns..(row + 1) * columns];
            let lanes = columns / LANES * LANES;
            for (c, out) in out[..lanes].chunks_exact_mut(LANES).enumerate() {
                let out: &mut [f32; LANES] = out.try_into().expect("chunk of LANES");
                let mut sum = *out;
                for (scale, weight_row) in scales.iter().zip(&block) {
                    let w: &[f32; LANES] = weight_row[c * LANES..(c + 1) * LANES]
                        .try_into()
                        .expect("chunk of LANES");
                    for lane in 0..LANES {
                        sum[lane] = scale.mul_add(w[lane], sum[lane]);
                    }
                }
                *out = sum;
            }
            for j in lanes..columns {
                for (scale, weight_row) in scales.iter().zip(&block) {
                    out[j] = scale.mul_add(weight_row[j], out[j]);
                }
            }
        }
        k += UNROLL;
    }
    for k in k..inner {
        let weight_row = &weights[k * columns..(k + 1) * columns];
        for row in 0..rows {
            let scale = x[row * inner + k];
            let out = &mut output[row * columns..(row + 1) * columns];
            for (o, w) in out.iter_mut().zip(weight_row) {
                *o = scale.mul_add(*w, *o);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// Row, inner and column counts whose columns are and are not
    /// multiples of the block, and whose inner count is and is not a
    /// multiple of the unrolling.
    const SHAPES: [(usize, usize, usize); 5] = [
        (1, 8, 5),
        (3, 64, 256),
        (16, 100, 600),
        (7, 512, 2816),
        (2, 13, 17),
    ];

    /// Random `x` and `weights` of a shape, and their product as candle
    /// computes it.
    fn case(rows: usize, inner: usize, columns: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let device = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (rows, inner), &device).unwrap();
        let w = Tensor::randn(0f32, 1.0, (inner, columns), &device).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (flat(&x), flat(&w), flat(&x.matmul(&w).unwrap()))
    }

    fn assert_matches(label: &str, got: &[f32], expected: &[f32]) {
        assert_eq!(got.len(), expected.len(), "{label}: length");
        for (g, e) in got.iter().zip(expected) {
            assert!(
                (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                "{label}: {g} vs {e}"
            );
        }
    }

    /// The loop itself, as every CPU runs it: the portable path, and the
    /// code the AVX2 build compiles.
    #[test]
    fn portable_kernel_matches_candle_matmul() {
        for (rows, inner, columns) in SHAPES {
            let (x, w, expected) = case(rows, inner, columns);
            let mut got = vec![0f32; rows * columns];
            accumulate(&x, rows, inner, &w, columns, &mut got);
            assert_matches(&format!("{rows}x{inner}x{columns}"), &got, &expected);
        }
    }

    /// The entry point callers use. Whether this CPU has AVX2 and FMA is
    /// known only at run time, and libtest cannot skip a test at run time
    /// (`#[ignore]` is decided at compile time, and the compile-time
    /// `target_feature` cfgs are off in a default build, so a
    /// `cfg_attr(ignore)` would skip this test everywhere). So it asserts
    /// what the entry point promises on either kind of CPU: with AVX2 and
    /// FMA (or off x86_64, where it runs the portable loop) the same
    /// products as candle; without them on x86_64, a refusal naming what is
    /// missing rather than a wrong answer.
    #[test]
    fn skinny_matmul_matches_candle_matmul_or_refuses_without_avx2() {
        if cfg!(target_arch = "x86_64") && !available() {
            let (x, w, _) = case(3, 64, 256);
            let refusal = std::panic::catch_unwind(|| skinny_matmul(&x, 3, &w, 256))
                .expect_err("without AVX2 and FMA, skinny_matmul refuses");
            let message = refusal
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| refusal.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            assert!(message.contains("needs AVX2 and FMA"), "{message}");
        } else {
            for (rows, inner, columns) in SHAPES {
                let (x, w, expected) = case(rows, inner, columns);
                let got = skinny_matmul(&x, rows, &w, columns);
                assert_matches(&format!("{rows}x{inner}x{columns}"), &got, &expected);
            }
        }
    }
}
