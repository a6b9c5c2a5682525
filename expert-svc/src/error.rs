use tonic::{Code, Status};

/// What can go wrong between a message arriving and its result leaving.
#[derive(Debug, thiserror::Error)]
pub enum ExpertError {
    #[error("invalid hidden tensor: {0}")]
    Tensor(#[from] moe_proto::CodecError),
    #[error("layer {layer} is not served here (this process serves layers {start}..{end})")]
    Layer {
        layer: usize,
        start: usize,
        end: usize,
    },
    #[error("expert queue is full ({0} batches waiting)")]
    Overloaded(usize),
    #[error("expert computation failed: {0}")]
    Compute(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] moe_model::ModelError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

impl ExpertError {
    /// The one place where an expert's failures become gRPC codes.
    pub fn code(&self) -> Code {
        match self {
            Self::Tensor(_) | Self::Layer { .. } => Code::InvalidArgument,
            Self::Overloaded(_) => Code::ResourceExhausted,
            Self::Compute(_) | Self::Model(_) | Self::Io(_) | Self::Transport(_) => Code::Internal,
        }
    }

    pub fn to_wire(&self) -> moe_proto::v1::Status {
        moe_proto::v1::Status {
            code: self.code() as i32,
            message: self.to_string(),
        }
    }
}

impl From<ExpertError> for Status {
    fn from(err: ExpertError) -> Self {
        Status::new(err.code(), err.to_string())
    }
}
