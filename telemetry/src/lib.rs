//! What every moe-serve service shares to be observed: the metric catalog
//! (names, units, buckets, labels), the OpenTelemetry set-up (Prometheus
//! text and OTLP, traces sampled parent-based), the W3C trace context an
//! expert message carries, and the log formats.

pub mod catalog;
pub mod http;
mod instruments;
mod json_log;
mod setup;
pub mod snapshot;
mod trace_context;

pub use instruments::{counter, gauge, histogram, observable_gauge, u64_counter};
pub use setup::{LogFormat, Telemetry, TelemetryError};
pub use trace_context::{TRACE_TARGET, continue_remote, traceparent};

pub use opentelemetry::KeyValue;
pub use opentelemetry::metrics::Meter;

/// A gRPC code as its name in the spec (`INVALID_ARGUMENT`), a bounded
/// label value.
pub fn grpc_code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
