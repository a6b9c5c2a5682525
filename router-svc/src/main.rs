use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use moe_telemetry::Telemetry;
use router_svc::{Args, Config, Observability};

fn main() -> anyhow::Result<()> {
    moe_model::pin_compute_threads();
    let args = Args::parse();
    // Before any thread starts, so that every thread inherits it.
    let batch = args
        .sched_batch
        .then(router_svc::cpu_policy::schedule_as_batch);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(args, batch))
}

async fn serve(args: Args, batch: Option<std::io::Result<()>>) -> anyhow::Result<()> {
    let telemetry = Arc::new(Telemetry::init("router-svc", args.log_format, "info")?);
    if let Some(Err(err)) = batch {
        tracing::warn!(%err, "--sched-batch: cannot make the threads SCHED_BATCH; running without");
    }
    let http = match args.http_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (--http-listen)"))?;
            // Printed before the gRPC line, which launchers wait for.
            println!("router-svc http on {}", listener.local_addr()?);
            Some(listener)
        }
        None => None,
    };
    let config = Config::try_from(args)?;
    let listener = moe_proto::Listener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    // Launchers and tests read this line to learn the port when given :0.
    println!("router-svc listening on {}", listener.local_addr()?);
    let observability = Observability {
        telemetry: telemetry.clone(),
        http,
    };
    let served = router_svc::run(
        config,
        listener,
        observability,
        router_svc::shutdown_signal(),
    )
    .await;
    telemetry.shutdown();
    Ok(served?)
}
