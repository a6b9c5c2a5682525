use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use expert_svc::{Args, Config};
use moe_telemetry::Telemetry;
use tonic_health::server::HealthReporter;

fn main() -> anyhow::Result<()> {
    moe_model::pin_compute_threads();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve())
}

async fn serve() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = Arc::new(Telemetry::init("expert-svc", args.log_format, "info")?);
    // Made before the weights load, so that `/readyz` says "not yet" meanwhile.
    let health = HealthReporter::new();
    if let Some(addr) = args.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--metrics-listen)"))?;
        // Printed before the gRPC line, which launchers wait for.
        println!("expert-svc metrics on {}", listener.local_addr()?);
        let routes = moe_telemetry::http::metrics_routes(telemetry.clone()).merge(
            moe_telemetry::http::health_routes(health.clone(), expert_svc::HEALTH_SERVICE),
        );
        moe_telemetry::http::serve(listener, routes);
    }
    let config = Config::try_from(args).map_err(anyhow::Error::msg)?;
    let tls = (config.tls.clone())
        .map(moe_proto::tls::server)
        .transpose()
        .context("--tls-cert/--tls-key/--tls-ca")?;
    let listener = moe_proto::Listener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?
        .with_tls(tls);
    // Launchers and tests read this line to learn the port when given :0.
    println!("expert-svc listening on {}", listener.local_addr()?);
    let served = expert_svc::run(
        config,
        listener,
        &telemetry.meter(),
        health,
        expert_svc::shutdown_signal(),
    )
    .await;
    telemetry.shutdown();
    Ok(served?)
}
