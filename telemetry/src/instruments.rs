//! Instruments built from their catalog entries, so that a name, unit,
//! description and bucket set are written once.

use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter, ObservableGauge};

use crate::catalog::{Kind, MetricSpec};

pub fn histogram(meter: &Meter, spec: &MetricSpec) -> Histogram<f64> {
    debug_assert_eq!(spec.kind, Kind::Histogram, "{}", spec.name);
    meter
        .f64_histogram(spec.name)
        .with_unit(spec.unit)
        .with_description(spec.help)
        .with_boundaries(spec.buckets.to_vec())
        .build()
}

pub fn counter(meter: &Meter, spec: &MetricSpec) -> Counter<f64> {
    debug_assert_eq!(spec.kind, Kind::Counter, "{}", spec.name);
    meter
        .f64_counter(spec.name)
        .with_unit(spec.unit)
        .with_description(spec.help)
        .build()
}

pub fn u64_counter(meter: &Meter, spec: &MetricSpec) -> Counter<u64> {
    debug_assert_eq!(spec.kind, Kind::Counter, "{}", spec.name);
    meter
        .u64_counter(spec.name)
        .with_unit(spec.unit)
        .with_description(spec.help)
        .build()
}

pub fn gauge(meter: &Meter, spec: &MetricSpec) -> Gauge<f64> {
    debug_assert_eq!(spec.kind, Kind::Gauge, "{}", spec.name);
    meter
        .f64_gauge(spec.name)
        .with_unit(spec.unit)
        .with_description(spec.help)
        .build()
}

/// A gauge read at export time from state the service keeps anyway
/// (replica states, in-flight rows), so that nothing is recorded on the
/// hot path for it.
pub fn observable_gauge(
    meter: &Meter,
    spec: &MetricSpec,
    callback: impl Fn(&dyn opentelemetry::metrics::AsyncInstrument<f64>) + Send + Sync + 'static,
) -> ObservableGauge<f64> {
    debug_assert_eq!(spec.kind, Kind::Gauge, "{}", spec.name);
    meter
        .f64_observable_gauge(spec.name)
        .with_unit(spec.unit)
        .with_description(spec.help)
        .with_callback(callback)
        .build()
}
