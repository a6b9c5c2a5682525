use anyhow::Context;
use clap::Parser;
use router_svc::{Args, Config};

fn main() -> anyhow::Result<()> {
    moe_model::pin_compute_threads();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve())
}

async fn serve() -> anyhow::Result<()> {
    moe_proto::transport::init_logging("info");
    let config = Config::try_from(Args::parse())?;
    let listener = moe_proto::Listener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    // Launchers and tests read this line to learn the port when given :0.
    println!("router-svc listening on {}", listener.local_addr()?);
    router_svc::run(config, listener, router_svc::shutdown_signal()).await?;
    Ok(())
}
