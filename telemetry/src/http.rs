//! The HTTP side every service has, on its own port beside gRPC:
//! `/metrics` in Prometheus's text format, and `/livez` and `/readyz` for
//! probes that cannot speak TLS to the gRPC port (kubelet's gRPC probes).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::server::{HealthReporter, HealthService};

use crate::Telemetry;

/// Prometheus's text exposition format.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `/metrics`, for a service to serve alone or merge into its own routes.
pub fn metrics_routes(telemetry: Arc<Telemetry>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(telemetry)
}

async fn metrics(State(telemetry): State<Arc<Telemetry>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, PROMETHEUS_TEXT)],
        telemetry.prometheus_text(),
    )
}

/// `/livez` (200 while the process answers) and `/readyz` (200 while its
/// gRPC health says `service` is SERVING, 503 with the status otherwise):
/// the gRPC health of `health`, readable in plain HTTP.
pub fn health_routes(health: HealthReporter, service: &'static str) -> Router {
    let health = Arc::new(HealthService::from_health_reporter(health));
    Router::new()
        .route("/livez", get(|| async { "alive\n" }))
        .route("/readyz", get(move || readiness(health, service)))
}

async fn readiness(health: Arc<HealthService>, service: &str) -> (StatusCode, String) {
    let asked = tonic::Request::new(HealthCheckRequest {
        service: service.to_owned(),
    });
    match health.check(asked).await {
        Ok(answer) => match answer.get_ref().status() {
            ServingStatus::Serving => (StatusCode::OK, "SERVING\n".to_owned()),
            status => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{}\n", status.as_str_name()),
            ),
        },
        // NOT_FOUND until the service has started.
        Err(status) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", status.message()),
        ),
    }
}

/// Serves `routes` on `listener` for the life of the process.
pub fn serve(listener: TcpListener, routes: Router) {
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, routes).await {
            tracing::warn!(%err, "the HTTP server stopped");
        }
    });
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::*;

    async fn get_status(routes: &Router, path: &str) -> (StatusCode, String) {
        let request = Request::get(path).body(Body::empty()).unwrap();
        let response = routes.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn readyz_follows_the_grpc_health_of_the_service() {
        let health = HealthReporter::new();
        let routes = health_routes(health.clone(), "moe.v1.Expert");
        let (status, body) = get_status(&routes, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(
            body.contains("not registered"),
            "before the service starts: {body}"
        );
        assert_eq!(get_status(&routes, "/livez").await.0, StatusCode::OK);

        health
            .set_service_status("moe.v1.Expert", tonic_health::ServingStatus::Serving)
            .await;
        assert_eq!(
            get_status(&routes, "/readyz").await,
            (StatusCode::OK, "SERVING\n".to_owned())
        );

        health
            .set_service_status("moe.v1.Expert", tonic_health::ServingStatus::NotServing)
            .await;
        assert_eq!(
            get_status(&routes, "/readyz").await,
            (StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING\n".to_owned())
        );
        assert_eq!(get_status(&routes, "/livez").await.0, StatusCode::OK);
    }
}
