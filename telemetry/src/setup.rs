//! The process-wide telemetry: logs to stderr (text or JSON), metrics to a
//! Prometheus registry (and over OTLP when asked), traces over OTLP when
//! asked.
//!
//! OTLP is on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the per-signal
//! `_METRICS_`/`_TRACES_` variable) is set; the exporters read the other
//! standard `OTEL_*` variables themselves. Traces are sampled parent-based
//! by ratio, and the ratio is 0 unless `OTEL_TRACES_SAMPLER` says
//! otherwise. With no endpoint the trace spans are not even built; with
//! one, they are built and then dropped unsampled at ratio 0 (set only the
//! `_METRICS_` endpoint to export metrics alone).

use std::sync::Arc;

use opentelemetry::metrics::{Meter, MeterProvider};
use opentelemetry::trace::TracerProvider;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{
    InstrumentKind, ManualReader, PeriodicReader, Pipeline, SdkMeterProvider, Temporality,
};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use prometheus::{Encoder, TextEncoder};
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

use crate::json_log::JsonWithTraceIds;
use crate::trace_context::TRACE_TARGET;

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP exporter: {0}")]
    Otlp(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("Prometheus exporter: {0}")]
    Prometheus(String),
}

/// Everything a service records through, alive for the whole process.
pub struct Telemetry {
    meter_provider: SdkMeterProvider,
    tracer_provider: Option<SdkTracerProvider>,
    registry: prometheus::Registry,
    window: Arc<ManualReader>,
}

impl Telemetry {
    /// Sets up logging, metrics and traces for `service` (its OpenTelemetry
    /// `service.name` unless `OTEL_SERVICE_NAME` says otherwise).
    /// `default_filter` applies when `RUST_LOG` is unset. Must run inside
    /// a tokio runtime (the OTLP exporters use tonic).
    pub fn init(
        service: &'static str,
        log_format: LogFormat,
        default_filter: &str,
    ) -> Result<Self, TelemetryError> {
        // The builder reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES;
        // naming the service over it only when the operator did not.
        let resource = if std::env::var_os("OTEL_SERVICE_NAME").is_some() {
            Resource::builder().build()
        } else {
            Resource::builder().with_service_name(service).build()
        };
        let registry = prometheus::Registry::new();
        let prometheus = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .without_target_info()
            .scope_info_enabled(false)
            .build()
            .map_err(|err| TelemetryError::Prometheus(err.to_string()))?;
        let window = Arc::new(ManualReader::builder().build());
        let mut meters = SdkMeterProvider::builder()
            .with_resource(resource.clone())
            .with_reader(prometheus)
            .with_reader(SharedReader(window.clone()));
        if otlp_configured("METRICS") {
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .build()?;
            meters = meters.with_reader(PeriodicReader::builder(exporter).build());
        }
        let meter_provider = meters.build();

        let tracer_provider = if otlp_configured("TRACES") {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()?;
            let mut builder = SdkTracerProvider::builder()
                .with_resource(resource)
                .with_batch_exporter(exporter);
            if std::env::var_os("OTEL_TRACES_SAMPLER").is_none() {
                builder = builder.with_sampler(Sampler::ParentBased(Box::new(
                    Sampler::TraceIdRatioBased(0.0),
                )));
            }
            Some(builder.build())
        } else {
            None
        };
        init_logging(
            service,
            log_format,
            default_filter,
            tracer_provider.as_ref(),
        );
        Ok(Self {
            meter_provider,
            tracer_provider,
            registry,
            window,
        })
    }

    /// The meter every instrument of this process is made from.
    pub fn meter(&self) -> Meter {
        self.meter_provider.meter("moe-serve")
    }

    /// Whether spans go anywhere (an OTLP endpoint is set).
    pub fn tracing(&self) -> bool {
        self.tracer_provider.is_some()
    }

    /// Every metric in Prometheus's text format, as `/metrics` serves it.
    pub fn prometheus_text(&self) -> String {
        let mut text = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut text) {
            tracing::warn!(%err, "cannot encode the metrics");
        }
        String::from_utf8(text).unwrap_or_default()
    }

    /// Every metric's cumulative value now, for views computed in process
    /// (the dashboard's windows).
    pub fn collect(&self) -> Option<ResourceMetrics> {
        let mut metrics = ResourceMetrics::default();
        match self.window.collect(&mut metrics) {
            Ok(()) => Some(metrics),
            Err(err) => {
                tracing::warn!(%err, "cannot collect the metrics");
                None
            }
        }
    }

    /// Sends what the exporters still hold (at exit).
    pub fn shutdown(&self) {
        if let Some(tracer) = &self.tracer_provider
            && let Err(err) = tracer.shutdown()
        {
            tracing::debug!(%err, "trace exporter shutdown");
        }
        if let Err(err) = self.meter_provider.shutdown() {
            tracing::debug!(%err, "metric exporter shutdown");
        }
    }
}

/// Whether an OTLP endpoint is set for `signal` (`METRICS` or `TRACES`).
fn otlp_configured(signal: &str) -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|value| !value.trim().is_empty());
    set("OTEL_EXPORTER_OTLP_ENDPOINT") || set(&format!("OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"))
}

/// Log lines filtered by `RUST_LOG` (or `default_filter`); spans of
/// [`TRACE_TARGET`] go to the tracer, whatever the log filter, when there
/// is one.
fn init_logging(
    service: &'static str,
    format: LogFormat,
    default_filter: &str,
    tracer: Option<&SdkTracerProvider>,
) {
    // The trace spans are for the tracer, not the log: without this they
    // would be built (and prefix every line) at the default level.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(default_filter))
        .add_directive(
            format!("{TRACE_TARGET}=off")
                .parse()
                .expect("a valid directive"),
        );
    let span_events = if std::env::var_os("MOE_LOG_SPAN_TIMES").is_some_and(|v| v == "1") {
        fmt::format::FmtSpan::CLOSE
    } else {
        fmt::format::FmtSpan::NONE
    };
    let logs = match format {
        LogFormat::Text => fmt::layer()
            .with_span_events(span_events)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => fmt::layer()
            .event_format(JsonWithTraceIds)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    // A second init (tests that start several services in one process)
    // keeps the first subscriber.
    let registry = tracing_subscriber::registry().with(logs.with_filter(filter));
    let _ = match tracer {
        Some(provider) => registry
            .with(
                tracing_opentelemetry::layer()
                    .with_tracer(provider.tracer(service))
                    .with_filter(Targets::new().with_target(TRACE_TARGET, tracing::Level::TRACE)),
            )
            .try_init(),
        // No layer at all rather than an empty one, so that the trace
        // spans' callsites stay disabled and cost nothing.
        None => registry.try_init(),
    };
}

/// The in-process window reader, shared with the provider that owns it.
#[derive(Debug)]
struct SharedReader(Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: std::sync::Weak<Pipeline>) {
        self.0.register_pipeline(pipeline)
    }

    fn collect(&self, metrics: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(metrics)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }

    fn temporality(&self, _kind: InstrumentKind) -> Temporality {
        Temporality::Cumulative
    }
}
