//! `--device` values: `cpu` or `cuda:N`.

use candle_core::Device;

use crate::ModelError;

/// Opens the device a flag names. `cuda:N` needs a build with this crate's
/// `cuda` feature (candle's CUDA backend), which the default build does not
/// enable: the error says so rather than letting candle fail later.
pub fn parse_device(spec: &str) -> Result<Device, ModelError> {
    let invalid = |why: String| ModelError::Device {
        spec: spec.to_owned(),
        why,
    };
    match spec {
        "cpu" => Ok(Device::Cpu),
        _ => {
            let ordinal = spec
                .strip_prefix("cuda:")
                .ok_or_else(|| invalid("expected cpu or cuda:N".into()))?
                .parse::<usize>()
                .map_err(|err| invalid(err.to_string()))?;
            if !candle_core::utils::cuda_is_available() {
                return Err(invalid(
                    "this build has no CUDA support: build with the cuda feature \
                     (scripts/cuda-build.sh), or use --device cpu"
                        .into(),
                ));
            }
            Device::new_cuda(ordinal).map_err(|err| invalid(err.to_string()))
        }
    }
}

/// Fixes the CPU compute threads before any thread starts, and returns the
/// number of matrix-product threads.
///
/// - `RAYON_NUM_THREADS` (gemm's threads): without it, candle works the
///   count out again on every matrix product by reading /proc/cpuinfo, a
///   visible share of a decode step (docs/decisions.md). Unset, it
///   becomes the CPUs this process may use; the launcher gives each expert
///   process 1 so that 17 processes do not fight over the cores.
/// - `CANDLE_NUM_THREADS` (candle's pool for element-wise operations):
///   unset, it becomes 1. The pool's workers spin for a while after each
///   operation, and a step is many small operations: on a machine shared
///   with the expert processes that spinning took a core from them, for
///   operations too small to gain from a second thread.
///
/// Call it first thing in `main`, while the process has one thread.
pub fn pin_compute_threads() -> usize {
    let positive = |name: &str| {
        std::env::var(name)
            .ok()
            .and_then(|value| value.parse::<usize>().ok())
            .filter(|&threads| threads > 0)
    };
    let threads = positive("RAYON_NUM_THREADS")
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let elementwise = positive("CANDLE_NUM_THREADS").unwrap_or(1);
    // SAFETY: called before the process starts any other thread, so nothing
    // reads the environment concurrently.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", elementwise.to_string());
    }
    threads
}

/// Whether this CPU runs the AVX2 + FMA builds of our hand-written kernels
/// (decode attention, few-row expert forward passes), which are compiled for
/// those instructions and chosen at run time.
pub fn cpu_has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_refuses_nonsense() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        let err = parse_device("tpu").unwrap_err().to_string();
        assert!(err.contains("expected cpu or cuda:N"), "{err}");
        assert!(parse_device("cuda:x").is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_in_a_cpu_build_is_refused_naming_the_build_not_the_config() {
        let err = parse_device("cuda:0").unwrap_err().to_string();
        assert!(err.contains("no CUDA support"), "{err}");
        assert!(!err.contains("config.json"), "{err}");
    }
}
