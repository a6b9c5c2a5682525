//! The HTTP side every service has: `/metrics` in Prometheus's text
//! format, served on its own port beside gRPC.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

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

/// Serves `routes` on `listener` for the life of the process.
pub fn serve(listener: TcpListener, routes: Router) {
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, routes).await {
            tracing::warn!(%err, "the HTTP server stopped");
        }
    });
}
