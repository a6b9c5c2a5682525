//! `--dtype`: an expert whose weights are bf16 or f16 computes in that
//! dtype and answers in the rows' own (f32 from the wire), close to the f32
//! expert; the CPU refuses another dtype with the fast kernels.

use candle_core::{DType, Device, Tensor};
use expert_svc::ExpertWeights;
use moe_model::synth::{self, Preset};
use moe_model::{Checkpoint, Kernels, WeightDType};

fn max_abs(tensor: &Tensor) -> f32 {
    tensor
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn half_precision_weights_answer_f32_rows_close_to_the_f32_expert() {
    let dir = tempfile::tempdir().unwrap();
    synth::write_checkpoint(dir.path(), Preset::Tiny, 3).unwrap();
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let hidden = checkpoint.config().hidden_size;
    let f32_expert = ExpertWeights::load(&checkpoint, 1, 0..2, &Device::Cpu).unwrap();
    for dtype in [DType::BF16, DType::F16] {
        let expert = ExpertWeights::load_as(&checkpoint, 1, 0..2, &Device::Cpu, dtype)
            .unwrap()
            .with_kernels(Kernels::Generic);
        assert_eq!(
            expert.describe(&checkpoint, "cpu").weight_dtype,
            dtype.as_str()
        );
        for rows in [1, 7, 33] {
            let x = Tensor::randn(0f32, 1.0, (rows, hidden), &Device::Cpu).unwrap();
            let expected = f32_expert.forward(1, &x).unwrap();
            let got = expert.forward(1, &x).unwrap();
            assert_eq!(got.dtype(), DType::F32, "answered in the rows' dtype");
            assert_eq!(got.dims(), expected.dims());
            // bf16 keeps 8 bits of mantissa: relative error of a few 1e-3
            // per rounding, a few roundings deep.
            let error = max_abs(&(&got - &expected).unwrap());
            let scale = max_abs(&expected);
            assert!(
                error <= 0.05 * scale,
                "{dtype:?}, {rows} rows: max error {error} against values up to {scale}"
            );
        }
    }
    let f32_describe = f32_expert.describe(&checkpoint, "cpu");
    assert_eq!(f32_describe.weight_dtype, "f32");
}

#[test]
fn the_cpu_refuses_half_precision_with_the_fast_kernels() {
    let config = Preset::Tiny.config(64);
    let err = WeightDType::resolve(
        Some(WeightDType::BF16),
        &Device::Cpu,
        &config,
        Kernels::Fast,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("--dtype bf16"), "{err}");
    assert!(err.contains("--kernels generic"), "{err}");
}
