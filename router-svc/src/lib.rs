//! router-svc: the public face of a moe-serve cluster.
//!
//! It owns admission, the tokenizer, the continuous-batching scheduler,
//! sampling, the gate and the dispatcher, and runs attention in-process
//! through the attention-svc crate. For every layer of every step it sends
//! each expert one message with all of the rows routed to it.

pub mod auth;
pub mod autoscale;
mod config;
pub mod cpu_policy;
mod detokenizer;
pub mod dispatch;
pub mod endpoints;
mod error;
pub mod gate;
mod http;
pub mod metrics;
mod readiness;
mod relay;
pub mod replicas;
mod request;
pub mod sampling;
pub mod scheduler;
mod security;
mod server;
mod service;
pub mod stats;

pub use config::{Args, Config, ExpertPlacement, OnExpertDown, Security};
pub use error::RouterError;
pub use moe_proto::transport::shutdown_signal;
pub use server::{Observability, run};
