use anyhow::Context;
use clap::Parser;
use router_svc::{Args, Config};

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
    moe_proto::transport::init_logging("info");
    if let Some(Err(err)) = batch {
        tracing::warn!(%err, "--sched-batch: cannot make the threads SCHED_BATCH; running without");
    }
    let config = Config::try_from(args)?;
    let listener = moe_proto::Listener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    // Launchers and tests read this line to learn the port when given :0.
    println!("router-svc listening on {}", listener.local_addr()?);
    router_svc::run(config, listener, router_svc::shutdown_signal()).await?;
    Ok(())
}
