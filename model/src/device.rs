//! `--device` values: `cpu` or `cuda:N`.

use candle_core::Device;

use crate::ModelError;

/// Opens the device a flag names. `cuda:N` needs a build with the `cuda`
/// feature; without it candle says so, and so does the error.
pub fn parse_device(spec: &str) -> Result<Device, ModelError> {
    let invalid = |why: String| ModelError::Config(format!("--device {spec:?}: {why}"));
    match spec {
        "cpu" => Ok(Device::Cpu),
        _ => {
            let ordinal = spec
                .strip_prefix("cuda:")
                .ok_or_else(|| invalid("expected cpu or cuda:N".into()))?
                .parse::<usize>()
                .map_err(|err| invalid(err.to_string()))?;
            Device::new_cuda(ordinal).map_err(|err| invalid(err.to_string()))
        }
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
}
