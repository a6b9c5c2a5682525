//! The shared-parameter half of a Mixture-of-Experts transformer:
//! embeddings, attention with its KV cache, norms and the LM head, and the
//! step executor that runs one batched forward step layer by layer.
//!
//! Between a layer's attention and the next layer the executor hands the
//! MoE input to a [`MoeLayer`] and takes back its output. Whether the experts
//! run in this process or behind the network is the `MoeLayer`'s business:
//! this crate knows nothing of gRPC.

mod attention;
mod decode_attention;
mod engine;
mod error;
mod generic_attention;
mod kv_cache;
mod rotary;
mod weights;

pub use engine::{Engine, MoeLayer, SequenceChunk};
pub use error::{AttentionError, StepError};
pub use kv_cache::SequenceCache;
pub use weights::SharedWeights;
