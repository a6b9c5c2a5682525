//! One error enum for the router, mapped to gRPC codes in one place.

use tokio::sync::mpsc::error::TrySendError;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// A request field is wrong; the message names it.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("not ready: {0}")]
    NotReady(String),
    #[error("the router is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Overloaded(String),
    /// An expert could not answer; the message names it and its endpoint.
    #[error("{0}")]
    ExpertUnavailable(String),
    /// An expert had no ready replica for `--no-replica-wait`.
    #[error("{message}")]
    NoReplica { expert: usize, message: String },
    #[error("{0}")]
    ExpertTimeout(String),
    /// The client's own deadline (`grpc-timeout`) passed.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The client took none of its responses for `--stalled-client-timeout`.
    #[error(
        "cancelled: the client took none of its output for {0:?} (the router's --stalled-client-timeout)"
    )]
    ClientStalled(std::time::Duration),
    #[error("internal error: {0}")]
    Internal(String),
    #[error(transparent)]
    Model(#[from] moe_model::ModelError),
    #[error(transparent)]
    Attention(#[from] attention_svc::AttentionError),
    #[error("tensor math failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

impl RouterError {
    /// A request field or flag is wrong; `message` names it.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidArgument(message.into())
    }

    /// A full or closed bounded queue, refused out loud: a full one is
    /// RESOURCE_EXHAUSTED with `full()` saying which queue, a closed one
    /// means the process is shutting down.
    pub fn refused<T>(err: TrySendError<T>, full: impl FnOnce() -> String) -> Self {
        match err {
            TrySendError::Full(_) => Self::Overloaded(full()),
            TrySendError::Closed(_) => Self::ShuttingDown,
        }
    }

    /// The one place where the router's failures become gRPC codes.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::NotReady(_)
            | Self::ShuttingDown
            | Self::ExpertUnavailable(_)
            | Self::NoReplica { .. } => Code::Unavailable,
            Self::Overloaded(_) => Code::ResourceExhausted,
            Self::ExpertTimeout(_) | Self::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Self::ClientStalled(_) => Code::Cancelled,
            Self::Internal(_)
            | Self::Model(_)
            | Self::Attention(_)
            | Self::Candle(_)
            | Self::Io(_)
            | Self::Transport(_) => Code::Internal,
        }
    }

    /// Whether the failure belongs to the rows of one expert message (the
    /// sequences that sent them fail, the step goes on), rather than to
    /// the whole step.
    pub fn ends_only_its_rows(&self) -> bool {
        self.another_replica_may_answer() || matches!(self, Self::NoReplica { .. })
    }

    /// Whether a replica's failure to answer a message says nothing of the
    /// expert's other replicas, so that one of them may answer it.
    pub fn another_replica_may_answer(&self) -> bool {
        matches!(
            self,
            Self::ExpertUnavailable(_) | Self::ExpertTimeout(_) | Self::Overloaded(_)
        )
    }

    /// The same failure, its message followed by `note` in parentheses
    /// (for the failures that a re-send answers; others are returned as
    /// they are).
    pub fn with_note(self, note: &str) -> Self {
        let noted = |message: String| format!("{message} ({note})");
        match self {
            Self::ExpertUnavailable(m) => Self::ExpertUnavailable(noted(m)),
            Self::ExpertTimeout(m) => Self::ExpertTimeout(noted(m)),
            Self::Overloaded(m) => Self::Overloaded(noted(m)),
            other => other,
        }
    }

    /// A copy for each of the requests one failure ends (a failed step ends
    /// every sequence in it).
    pub fn duplicate(&self) -> Self {
        match self {
            Self::InvalidArgument(m) => Self::InvalidArgument(m.clone()),
            Self::FailedPrecondition(m) => Self::FailedPrecondition(m.clone()),
            Self::NotReady(m) => Self::NotReady(m.clone()),
            Self::ShuttingDown => Self::ShuttingDown,
            Self::Overloaded(m) => Self::Overloaded(m.clone()),
            Self::ExpertUnavailable(m) => Self::ExpertUnavailable(m.clone()),
            Self::NoReplica { expert, message } => Self::NoReplica {
                expert: *expert,
                message: message.clone(),
            },
            Self::ExpertTimeout(m) => Self::ExpertTimeout(m.clone()),
            Self::DeadlineExceeded(m) => Self::DeadlineExceeded(m.clone()),
            Self::ClientStalled(after) => Self::ClientStalled(*after),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<RouterError> for Status {
    fn from(err: RouterError) -> Self {
        Status::new(err.code(), err.to_string())
    }
}

impl<E: Into<RouterError>> From<attention_svc::StepError<E>> for RouterError {
    fn from(err: attention_svc::StepError<E>) -> Self {
        match err {
            attention_svc::StepError::Attention(err) => err.into(),
            attention_svc::StepError::Moe(err) => err.into(),
        }
    }
}
