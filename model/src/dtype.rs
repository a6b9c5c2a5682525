//! `--dtype` values: the element type a process keeps its weights in and
//! computes with. The wire's element type (`--wire-dtype`) is separate.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

use crate::{Kernels, ModelConfig, ModelError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDType {
    F32,
    F16,
    BF16,
}

impl WeightDType {
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
        }
    }

    /// The flag value that names it.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
        }
    }

    /// The dtype config.json names (`torch_dtype` or `dtype`: "float32",
    /// "bfloat16", "float16"), if it is one of ours.
    pub fn from_config(name: &str) -> Option<Self> {
        match name {
            "float32" | "float" => Some(Self::F32),
            "float16" | "half" => Some(Self::F16),
            "bfloat16" => Some(Self::BF16),
            _ => None,
        }
    }

    /// What a process on `device` running `kernels` keeps its weights in:
    /// `requested`, or by default f32 on the CPU (what the fast kernels
    /// compute in; bf16 on the CPU also costs a conversion of the whole
    /// weight on every product, docs/tuning.md) and the checkpoint's own
    /// dtype on a GPU (f32 where config.json names none of ours).
    ///
    /// The fast CPU kernels are f32 only, so another dtype on the CPU needs
    /// the generic kernels; that is refused here, before anything loads,
    /// rather than silently run slow.
    pub fn resolve(
        requested: Option<Self>,
        device: &Device,
        config: &ModelConfig,
        kernels: Kernels,
    ) -> Result<Self, ModelError> {
        Self::resolve_on(requested, device.is_cpu(), config, kernels)
    }

    fn resolve_on(
        requested: Option<Self>,
        cpu: bool,
        config: &ModelConfig,
        kernels: Kernels,
    ) -> Result<Self, ModelError> {
        match requested {
            None if cpu => Ok(Self::F32),
            None => Ok(Self::from_config(&config.dtype).unwrap_or(Self::F32)),
            Some(dtype) if dtype != Self::F32 && cpu && kernels == Kernels::Fast => {
                Err(ModelError::DType {
                    dtype: dtype.name(),
                    why: "the fast CPU kernels compute in f32 only: use --dtype f32, or \
                          --kernels generic to run candle's (slow) CPU path in this dtype"
                        .into(),
                })
            }
            Some(dtype) => Ok(dtype),
        }
    }
}

impl FromStr for WeightDType {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::BF16),
            other => Err(format!(
                "unknown dtype {other:?}: expected f32, f16 or bf16"
            )),
        }
    }
}

impl fmt::Display for WeightDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::Preset;

    #[test]
    fn names_round_trip_and_nonsense_is_refused() {
        for dtype in [WeightDType::F32, WeightDType::F16, WeightDType::BF16] {
            assert_eq!(dtype.name().parse::<WeightDType>(), Ok(dtype));
            assert_eq!(dtype.to_string(), dtype.name());
        }
        let err = "fp8".parse::<WeightDType>().unwrap_err();
        assert!(err.contains("expected f32, f16 or bf16"), "{err}");
        assert_eq!(
            WeightDType::from_config("bfloat16"),
            Some(WeightDType::BF16)
        );
        assert_eq!(WeightDType::from_config("float8_e4m3fn"), None);
    }

    /// On the CPU the default stays f32 whatever the checkpoint says, and
    /// another dtype needs the generic kernels.
    #[test]
    fn the_cpu_defaults_to_f32_and_refuses_other_dtypes_with_the_fast_kernels() {
        let config = ModelConfig {
            dtype: "bfloat16".into(),
            ..Preset::Tiny.config(64)
        };
        let resolve =
            |requested, kernels| WeightDType::resolve(requested, &Device::Cpu, &config, kernels);
        assert_eq!(resolve(None, Kernels::Fast).unwrap(), WeightDType::F32);
        assert_eq!(resolve(None, Kernels::Generic).unwrap(), WeightDType::F32);
        assert_eq!(
            resolve(Some(WeightDType::F32), Kernels::Fast).unwrap(),
            WeightDType::F32
        );
        let err = resolve(Some(WeightDType::BF16), Kernels::Fast)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--dtype bf16") && err.contains("--kernels generic"),
            "{err}"
        );
        assert_eq!(
            resolve(Some(WeightDType::BF16), Kernels::Generic).unwrap(),
            WeightDType::BF16
        );
    }

    /// On a GPU (this build may have none to open) the default is the
    /// checkpoint's own dtype, and any dtype may be asked for.
    #[test]
    fn a_gpu_defaults_to_the_checkpoint_dtype() {
        let config = |dtype: &str| ModelConfig {
            dtype: dtype.into(),
            ..Preset::Tiny.config(64)
        };
        let gpu = |requested, dtype: &str| {
            WeightDType::resolve_on(requested, false, &config(dtype), Kernels::Fast).unwrap()
        };
        assert_eq!(gpu(None, "bfloat16"), WeightDType::BF16);
        assert_eq!(gpu(None, "float16"), WeightDType::F16);
        assert_eq!(gpu(None, "float32"), WeightDType::F32);
        assert_eq!(gpu(None, "float8_e4m3fn"), WeightDType::F32);
        assert_eq!(gpu(Some(WeightDType::F32), "bfloat16"), WeightDType::F32);
        assert_eq!(gpu(Some(WeightDType::F16), "float32"), WeightDType::F16);
    }
}
