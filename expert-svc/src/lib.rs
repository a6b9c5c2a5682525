//! One expert of a Mixture-of-Experts model, served over gRPC.
//!
//! An expert service loads one expert's SwiGLU matrices for a range of
//! layers and nothing else. Every message queued for the same layer, from
//! whichever stream, shares one forward pass. Experts keep no per-request
//! state, so any replica can serve any message.

mod config;
mod error;
mod forward_queue;
pub mod metrics;
mod server;
mod service;
mod skinny_matmul;
mod weights;

pub use config::{Args, Config, parse_layers};
pub use error::ExpertError;
pub use forward_queue::ForwardQueue;
pub use server::{HEALTH_SERVICE, run, shutdown_signal};
pub use service::ExpertService;
pub use weights::ExpertWeights;
