/// Failures of the shared half itself: loading or math.
#[derive(Debug, thiserror::Error)]
pub enum AttentionError {
    #[error(transparent)]
    Model(#[from] moe_model::ModelError),
    #[error("tensor math failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("token id {token} is outside the vocabulary (vocab_size {vocab_size})")]
    TokenOutOfVocabulary { token: u32, vocab_size: usize },
    #[error("a chunk of {needed} positions is empty or exceeds max_position_embeddings ({max})")]
    ContextOverflow { needed: usize, max: usize },
}

/// A step fails either here or in the experts; the caller needs to know
/// which, because an expert's failure is reported to the client by name.
#[derive(Debug, thiserror::Error)]
pub enum StepError<E> {
    #[error(transparent)]
    Attention(#[from] AttentionError),
    #[error(transparent)]
    Moe(E),
}

impl<E> From<candle_core::Error> for StepError<E> {
    fn from(err: candle_core::Error) -> Self {
        Self::Attention(err.into())
    }
}
