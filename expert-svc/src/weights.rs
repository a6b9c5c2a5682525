//! One expert's SwiGLU weights for a range of layers: the kernel that both
//! the expert service and the router's in-process mode run, in either of
//! its implementations ([`Kernels`]): the fast one, few-row products
//! through [`skinny_matmul`] on a CPU with AVX2/FMA, or the generic one,
//! candle tensor operations only, which runs on any device.

use std::ops::Range;

use candle_core::{DType, Device, Storage, Tensor};
use moe_model::{Checkpoint, Kernels, ModelError, layout};
use moe_proto::v1::DescribeResponse;

use crate::ExpertError;
use crate::skinny_matmul::{self, skinny_matmul};

/// Kept as `[in, out]` ([`Checkpoint::load_transposed`]), so that products
/// stream the weights in order.
struct LayerWeights {
    /// w1 (gate) and w3 (up) side by side: `[hidden, 2 * intermediate]`,
    /// so one matrix product computes both.
    gate_up: Tensor,
    /// w2: `[intermediate, hidden]`.
    down: Tensor,
}

/// The one owner of which layers an expert serves: every message's layer is
/// checked here before it indexes anything, and Describe reports it.
pub struct ExpertWeights {
    expert: usize,
    layers: Range<usize>,
    intermediate_size: usize,
    weights: Vec<LayerWeights>,
    /// Whether few-row products can go through [`skinny_matmul`]: f32
    /// weights on a CPU that has its instructions.
    skinny: bool,
    /// They do only with the fast kernels.
    kernels: Kernels,
}

impl ExpertWeights {
    /// Checks and loads `expert`'s matrices for `layers`, touching no other
    /// tensor of the checkpoint. It runs the fast kernels where `device`
    /// has them; [`ExpertWeights::with_kernels`] chooses. In f32:
    /// [`ExpertWeights::load_as`] takes another dtype.
    pub fn load(
        checkpoint: &Checkpoint,
        expert: usize,
        layers: Range<usize>,
        device: &Device,
    ) -> Result<Self, ModelError> {
        Self::load_as(checkpoint, expert, layers, device, DType::F32)
    }

    /// [`ExpertWeights::load`] with the weights in `dtype`, which forward
    /// passes compute in (rows of another dtype are converted on the way
    /// in and out). The fast kernels compute in f32 only.
    pub fn load_as(
        checkpoint: &Checkpoint,
        expert: usize,
        layers: Range<usize>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        let config = checkpoint.config();
        if expert >= config.num_local_experts {
            return Err(ModelError::NotInCheckpoint(format!(
                "expert {expert} does not exist: the checkpoint has {} experts",
                config.num_local_experts
            )));
        }
        if layers.is_empty() || layers.end > config.num_hidden_layers {
            return Err(ModelError::NotInCheckpoint(format!(
                "layers {}..{} are not a non-empty range within the checkpoint's 0..{}",
                layers.start, layers.end, config.num_hidden_layers
            )));
        }
        checkpoint.verify(&layout::expert_tensors(config, expert, layers.clone()))?;
        let weights: Vec<LayerWeights> = layers
            .clone()
            .map(|layer| {
                let load = |matrix| {
                    let name = layout::expert(layer, expert, matrix);
                    checkpoint.load_transposed_as(&name, device, dtype)
                };
                Ok(LayerWeights {
                    gate_up: Tensor::cat(&[load("w1")?, load("w3")?], 1)?,
                    down: load("w2")?,
                })
            })
            .collect::<Result<_, ModelError>>()?;
        let skinny = device.is_cpu()
            && skinny_matmul::available()
            && weights.iter().all(|w| w.gate_up.dtype() == DType::F32);
        Ok(Self {
            expert,
            layers,
            intermediate_size: config.intermediate_size,
            weights,
            skinny,
            kernels: Kernels::Fast.for_device(device),
        })
    }

    /// The same weights, computed with `kernels`: on any device but the
    /// CPU, the generic ones whatever is asked.
    pub fn with_kernels(self, kernels: Kernels) -> Self {
        let device = self.weights[0].down.device().clone();
        Self {
            kernels: kernels.for_device(&device),
            ..self
        }
    }

    /// The kernels its forward passes run.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Whether this expert serves `layer`; the error names what it serves.
    pub fn check_layer(&self, layer: usize) -> Result<(), ExpertError> {
        self.layer_weights(layer)
            .map(drop)
            .ok_or(ExpertError::Layer {
                layer,
                start: self.layers.start,
                end: self.layers.end,
            })
    }

    fn layer_weights(&self, layer: usize) -> Option<&LayerWeights> {
        if !self.layers.contains(&layer) {
            return None;
        }
        self.weights.get(layer - self.layers.start)
    }

    /// What Describe reports about this expert (its work counters aside).
    pub fn describe(&self, checkpoint: &Checkpoint, device: &str) -> DescribeResponse {
        let config = checkpoint.config();
        DescribeResponse {
            expert: self.expert as u32,
            layer_start: self.layers.start as u32,
            layer_end: self.layers.end as u32,
            hidden_size: config.hidden_size as u32,
            intermediate_size: config.intermediate_size as u32,
            num_experts: config.num_local_experts as u32,
            weight_dtype: self.weights[0].down.dtype().as_str().into(),
            device: device.to_owned(),
            model_fingerprint: checkpoint.fingerprint().to_owned(),
            rows_served: 0,
            forward_passes: 0,
            busy_seconds: 0.0,
        }
    }

    /// `w2(silu(w1 x) * w3 x)` for `x` of shape `[rows, hidden]`.
    pub fn forward(&self, layer: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        let weights = self.layer_weights(layer).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "layer {layer} is not served here (layers {}..{})",
                self.layers.start, self.layers.end
            ))
        })?;
        if self.kernels == Kernels::Fast
            && self.skinny
            && x.dim(0)? <= skinny_matmul::MAX_ROWS
            && x.dtype() == DType::F32
        {
            return self.forward_skinny(weights, x);
        }
        self.forward_generic(weights, x)
    }

    /// The SwiGLU as candle tensor operations only: the generic kernel, on
    /// any device, and the fast kernels' path for many rows (where gemm's
    /// packing pays for itself).
    fn forward_generic(&self, weights: &LayerWeights, x: &Tensor) -> candle_core::Result<Tensor> {
        // In the weights' dtype; answered in the rows' own.
        let rows_dtype = x.dtype();
        let x = x.to_dtype(weights.down.dtype())?;
        let gate_up = x.matmul(&weights.gate_up)?;
        let gate = gate_up.narrow(1, 0, self.intermediate_size)?;
        let up = gate_up.narrow(1, self.intermediate_size, self.intermediate_size)?;
        (gate.silu()? * up)?
            .matmul(&weights.down)?
            .to_dtype(rows_dtype)
    }

    /// The same SwiGLU for a few rows, streaming each weight matrix once.
    fn forward_skinny(&self, weights: &LayerWeights, x: &Tensor) -> candle_core::Result<Tensor> {
        let (rows, hidden) = x.dims2()?;
        let width = self.intermediate_size;
        let input = x.flatten_all()?.to_vec1::<f32>()?;
        let gate_up = with_f32_slice(&weights.gate_up, |w| {
            skinny_matmul(&input, rows, w, 2 * width)
        })?;
        let activated: Vec<f32> = gate_up
            .chunks_exact(2 * width)
            .flat_map(|row| {
                let (gate, up) = row.split_at(width);
                gate.iter().zip(up).map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            })
            .collect();
        let output = with_f32_slice(&weights.down, |w| {
            skinny_matmul(&activated, rows, w, hidden)
        })?;
        Tensor::from_vec(output, (rows, hidden), x.device())
    }
}

/// Runs `f` on a contiguous f32 CPU tensor's elements.
fn with_f32_slice<R>(tensor: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let (storage, layout) = tensor.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(cpu), Some((start, end))) => Ok(f(&cpu.as_slice::<f32>()?[start..end])),
        _ => Err(candle_core::Error::Msg(
            "expected a contiguous f32 tensor on CPU".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use moe_model::ModelConfig;
    use moe_model::synth::{self, Preset};

    use super::*;

    /// One expert of two layers whose widths are not multiples of the
    /// fast kernel's blocks (16 columns, 8 inner rows).
    fn checkpoint(dir: &std::path::Path) -> Checkpoint {
        let config = ModelConfig {
            hidden_size: 92,
            intermediate_size: 203,
            num_hidden_layers: 2,
            num_local_experts: 1,
            num_experts_per_tok: 1,
            ..Preset::Tiny.config(64)
        };
        synth::write_config(dir, &config).unwrap();
        synth::write_weights(dir, &config, 3).unwrap();
        Checkpoint::open(dir).unwrap()
    }

    /// The generic kernel (candle operations only) against the fast one,
    /// on random rows at every size the fast one takes and past it. They
    /// sum in different orders (and the fast one fuses multiply-adds), so
    /// they agree to rounding: |generic - fast| <= 1e-5 + 1e-4 |fast|.
    #[test]
    fn generic_kernel_matches_the_fast_one() {
        let dir = tempfile::tempdir().unwrap();
        let checkpoint = checkpoint(dir.path());
        let load = || ExpertWeights::load(&checkpoint, 0, 0..2, &Device::Cpu).unwrap();
        let fast = load();
        assert_eq!(fast.kernels(), Kernels::Fast);
        let generic = load().with_kernels(Kernels::Generic);
        assert_eq!(generic.kernels(), Kernels::Generic);
        for rows in [1, 2, 3, 5, 8, 9, 33] {
            for layer in 0..2 {
                let x = Tensor::randn(0f32, 1.0, (rows, 92), &Device::Cpu).unwrap();
                let expected = fast.forward(layer, &x).unwrap();
                let got = generic.forward(layer, &x).unwrap();
                assert_eq!(got.dims(), &[rows, 92]);
                let (got, expected) = (
                    got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    expected.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                );
                for (g, e) in got.iter().zip(&expected) {
                    assert!(
                        (g - e).abs() <= 1e-5 + 1e-4 * e.abs(),
                        "{rows} rows, layer {layer}: generic {g} vs fast {e}"
                    );
                }
            }
        }
    }
}
