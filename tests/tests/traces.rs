//! Traces and metrics leave the processes over OTLP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and one request's trace crosses
//! from the router to the experts: generate → step → moe_dispatch →
//! expert_call (router) → expert_product (expert), the last linked through
//! the `traceparent` inside each `ExpertBatch`. The collector is a real
//! OTLP/gRPC server built on opentelemetry-proto's tonic service.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moe_e2e::{generate, greedy, start_with, tiny_checkpoint, within};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::resource::v1::Resource;

/// One span as the collector received it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
}

#[derive(Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
    /// (service, metric name) pairs received.
    metrics: Arc<Mutex<HashSet<(String, String)>>>,
}

fn service_name(resource: Option<&Resource>) -> String {
    resource
        .into_iter()
        .flat_map(|resource| &resource.attributes)
        .find(|attribute| attribute.key == "service.name")
        .and_then(|attribute| attribute.value.as_ref()?.value.as_ref())
        .map(|value| match value {
            Value::StringValue(name) => name.clone(),
            other => format!("{other:?}"),
        })
        .unwrap_or_default()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = service_name(resource_spans.resource.as_ref());
            for scope in resource_spans.scope_spans {
                spans.extend(scope.spans.into_iter().map(|span| Received {
                    service: service.clone(),
                    name: span.name,
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    parent_span_id: span.parent_span_id,
                }));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut metrics = self.metrics.lock().unwrap();
        for resource_metrics in request.into_inner().resource_metrics {
            let service = service_name(resource_metrics.resource.as_ref());
            for scope in resource_metrics.scope_metrics {
                for metric in scope.metrics {
                    metrics.insert((service.clone(), metric.name));
                }
            }
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// Serves OTLP/gRPC on a free loopback port; the endpoint to give the
/// services.
async fn start_collector(collector: Collector) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .add_service(MetricsServiceServer::new(collector))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

/// The chain from a router `generate` span down to an expert's
/// `expert_product` span, all in one trace, each a child of the one
/// before; `None` while some link has not arrived.
fn chain(spans: &[Received]) -> Option<Vec<Received>> {
    let by_id: HashMap<&[u8], &Received> = spans
        .iter()
        .map(|span| (span.span_id.as_slice(), span))
        .collect();
    let product = spans.iter().find(|span| {
        span.name == "expert_product" && {
            let mut names = Vec::new();
            let mut current = *span;
            while let Some(parent) = by_id.get(current.parent_span_id.as_slice()) {
                if parent.trace_id != span.trace_id {
                    return false;
                }
                names.push(parent.name.as_str());
                current = parent;
            }
            names == ["expert_call", "moe_dispatch", "step", "generate"]
        }
    })?;
    let mut chain = vec![product.clone()];
    let mut current = product;
    while let Some(parent) = by_id.get(current.parent_span_id.as_slice()) {
        chain.push((*parent).clone());
        current = parent;
    }
    chain.reverse();
    Some(chain)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_requests_trace_links_generate_step_dispatch_and_the_expert_call_to_the_experts_product()
 {
    let collector = Collector::default();
    let endpoint = start_collector(collector.clone()).await;
    let checkpoint = tiny_checkpoint();
    let cluster = start_with(checkpoint.path(), |options| {
        options.env = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "1.0"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "500"),
        ]
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .into();
    })
    .await;

    let completion = generate(&cluster.router_uri(), greedy(&[5, 17, 42], 4))
        .await
        .expect("the request succeeds");
    assert_eq!(completion.token_ids.len(), 4);

    let chain = within("the whole trace reaches the collector", async {
        loop {
            if let Some(chain) = chain(&collector.spans.lock().unwrap()) {
                return chain;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let services: Vec<&str> = chain.iter().map(|span| span.service.as_str()).collect();
    assert_eq!(
        services,
        [
            "router-svc",
            "router-svc",
            "router-svc",
            "router-svc",
            "expert-svc"
        ],
        "{chain:#?}"
    );
    let root = &chain[0];
    assert!(
        root.parent_span_id.is_empty(),
        "generate is the trace's root: {root:?}"
    );

    // Metrics go over OTLP too, from both kinds of process.
    within("both services' metrics reach the collector", async {
        loop {
            {
                let metrics = collector.metrics.lock().unwrap();
                let has = |service: &str, name: &str| {
                    metrics.contains(&(service.to_owned(), name.to_owned()))
                };
                if has("router-svc", "moe.expert.rows")
                    && has("router-svc", "gen_ai.server.time_to_first_token")
                    && has("expert-svc", "moe.expert.replica.busy")
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let spans = collector.spans.lock().unwrap().len();
    println!(
        "trace {}: {} ({spans} spans received in all)",
        hex(&root.trace_id),
        chain
            .iter()
            .map(|span| format!("{}:{}", span.service, span.name))
            .collect::<Vec<_>>()
            .join(" → ")
    );
    cluster.shutdown(Duration::from_secs(5)).await;
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
