use std::path::PathBuf;

/// Why a checkpoint cannot be served. Each variant names the file or tensor
/// at fault, because these messages are what an operator sees at start.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config.json: {0}")]
    Config(String),
    /// An expert or layer that the checkpoint does not have was asked for.
    #[error("{0}")]
    NotInCheckpoint(String),
    /// A `--device` value that this build or machine cannot open.
    #[error("--device {spec:?}: {why}")]
    Device { spec: String, why: String },
    /// A `--dtype` that this device or these kernels cannot compute in.
    #[error("--dtype {dtype}: {why}")]
    DType { dtype: &'static str, why: String },
    #[error("checkpoint {dir} has no model.safetensors nor model.safetensors.index.json")]
    NoWeights { dir: PathBuf },
    #[error("invalid {path}: {message}")]
    Index { path: PathBuf, message: String },
    #[error("checkpoint is missing tensor {name}")]
    MissingTensor { name: String },
    #[error("tensor {name} has shape {actual:?}, but config.json implies {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
