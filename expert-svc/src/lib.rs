//! One expert of a Mixture-of-Experts model, served over gRPC.
//!
//! An expert service loads one expert's SwiGLU matrices for a range of
//! layers and nothing else. A device actor owns them and batches every
//! request queued for the same layer into one matrix product, whichever
//! stream it came from. Experts keep no per-request state, so any replica
//! can answer any message.

mod config;
mod device_actor;
mod error;
mod server;
mod service;
mod skinny_matmul;
mod weights;

pub use config::{Args, Config, parse_layers};
pub use device_actor::DeviceHandle;
pub use error::ExpertError;
pub use server::{run, shutdown_signal};
pub use service::ExpertService;
pub use weights::ExpertWeights;
