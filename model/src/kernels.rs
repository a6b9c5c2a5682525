//! `--kernels` values: which implementation of the hot operations (the
//! expert product, attention over the KV cache, the in-process combine) a
//! process runs.
//!
//! `fast` is the hand-written CPU kernels where they apply (few-row expert
//! products and decode attention, compiled for AVX2/FMA; see
//! docs/decisions.md), candle elsewhere. `generic` is candle tensor
//! operations only, so it runs on any candle device: it is what a GPU runs,
//! and on the CPU it lets the tests prove those kernels correct.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// The hand-written CPU kernels where they apply; CPU only.
    #[default]
    Fast,
    /// Candle tensor operations only: runs on every candle device.
    Generic,
}

impl Kernels {
    /// What a process asked for `self` runs on `device`: the fast kernels
    /// exist only for the CPU, so any other device gets the generic ones.
    pub fn for_device(self, device: &Device) -> Self {
        self.on(device.is_cpu())
    }

    fn on(self, cpu: bool) -> Self {
        if cpu { self } else { Self::Generic }
    }

    /// The flag value that names it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Fast => "fast",
            Self::Generic => "generic",
        }
    }
}

impl FromStr for Kernels {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "fast" => Ok(Self::Fast),
            "generic" => Ok(Self::Generic),
            other => Err(format!(
                "unknown kernels {other:?}: expected fast or generic"
            )),
        }
    }
}

impl fmt::Display for Kernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_nonsense_is_refused() {
        for kernels in [Kernels::Fast, Kernels::Generic] {
            assert_eq!(kernels.name().parse::<Kernels>(), Ok(kernels));
            assert_eq!(kernels.to_string(), kernels.name());
        }
        let err = "avx2".parse::<Kernels>().unwrap_err();
        assert!(err.contains("expected fast or generic"), "{err}");
        assert_eq!(Kernels::default(), Kernels::Fast);
    }

    #[test]
    fn the_cpu_runs_what_was_asked_any_other_device_the_generic_kernels() {
        assert_eq!(Kernels::Fast.for_device(&Device::Cpu), Kernels::Fast);
        assert_eq!(Kernels::Generic.for_device(&Device::Cpu), Kernels::Generic);
        // A CUDA device (this build may have none to open).
        assert_eq!(Kernels::Fast.on(false), Kernels::Generic);
        assert_eq!(Kernels::Generic.on(false), Kernels::Generic);
    }
}
