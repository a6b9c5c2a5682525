//! W3C trace context across the router → expert hop. One Forward stream
//! carries the messages of many requests, so the context rides inside each
//! `ExpertBatch` (its `traceparent` field), not in stream metadata.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The target of every span meant for the tracer. Declare a span with
/// `target: moe_telemetry::TRACE_TARGET`; the ones on the hot path at
/// `debug` level, so that without a tracer (and at the default log level)
/// their callsites are disabled and cost nothing.
pub const TRACE_TARGET: &str = "moe::trace";

/// `span`'s W3C `traceparent`, when the span is sampled; `None` (and no
/// allocation) otherwise.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    let span_context = cx.span().span_context().clone();
    if !span_context.is_valid() || !span_context.is_sampled() {
        return None;
    }
    let mut carrier = HashMap::with_capacity(1);
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` a child of the remote span that `traceparent` names (a
/// malformed one is ignored: the span starts a trace of its own).
pub fn continue_remote(span: &tracing::Span, traceparent: &str) {
    if span.is_disabled() || traceparent.is_empty() {
        return;
    }
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}
