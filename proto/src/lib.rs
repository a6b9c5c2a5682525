//! moe-serve's wire contract.
//!
//! The `.proto` sources live under `proto/moe/v1/`; this crate compiles them
//! (with protox, no system `protoc`), re-exports the generated client and
//! server code, and owns the tensor codec that every hop uses.

#[cfg(not(target_endian = "little"))]
compile_error!("the tensor codec sends host memory as little-endian bytes");

pub mod api_keys;
pub mod client_fault;
pub mod connection_cap;
pub mod dial_once;
pub mod expert_mode;
pub mod limits;
pub mod listen;
pub mod reload;
pub mod tensor_codec;
pub mod tls;
pub mod transport;

/// Generated code of the `moe.v1` package.
pub mod v1 {
    tonic::include_proto!("moe.v1");
}

/// The encoded descriptor set of every moe.v1 file, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/moe_descriptor.bin"));

/// Largest message either side of a moe-serve hop accepts or sends.
///
/// tonic's default is 4 MiB, which a prefill step of a large model exceeds
/// (2048 rows × 8192 × 4 bytes is 64 MiB), so every client and server sets it.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

pub use expert_mode::ExpertMode;
pub use limits::ServerLimits;
pub use listen::{ListenAddr, Listener};
pub use tensor_codec::{CodecError, WireDType};
