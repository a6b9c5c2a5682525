//! The router's HTTP side (`--http-listen`): `/metrics`, the live
//! dashboard at `/dashboard`, and the JSON it reads at `/api/dashboard`.

mod dashboard;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::{Html, Redirect};
use axum::routing::get;
use moe_telemetry::Telemetry;

pub use dashboard::{Dashboard, DashboardView};

/// The page, bundled into the binary: it needs nothing from elsewhere.
const DASHBOARD_PAGE: &str = include_str!("assets/dashboard.html");

pub fn routes(telemetry: Arc<Telemetry>, dashboard: Arc<Dashboard>) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::temporary("/dashboard") }))
        .route("/dashboard", get(|| async { Html(DASHBOARD_PAGE) }))
        .route("/api/dashboard", get(view))
        .with_state(dashboard)
        .merge(moe_telemetry::http::metrics_routes(telemetry))
}

async fn view(State(dashboard): State<Arc<Dashboard>>) -> axum::Json<DashboardView> {
    axum::Json(dashboard.view())
}
