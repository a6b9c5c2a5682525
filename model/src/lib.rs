//! What router-svc and expert-svc share: the model config, the checkpoint
//! layout and loading, and the deterministic synthetic checkpoints that
//! `moe init` writes.

mod checkpoint;
mod config;
mod device;
mod dtype;
mod error;
mod kernels;
pub mod layout;
pub mod synth;

pub use checkpoint::{CONFIG_FILE, Checkpoint, INDEX_FILE, SINGLE_FILE, TOKENIZER_FILE};
pub use config::ModelConfig;
pub use device::{cpu_has_avx2_fma, parse_device, pin_compute_threads};
pub use dtype::WeightDType;
pub use error::ModelError;
pub use kernels::Kernels;
