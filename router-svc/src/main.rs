use anyhow::Context;
use clap::Parser;
use router_svc::{Args, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = Config::try_from(Args::parse())?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    // Launchers and tests read this line to learn the port when given :0.
    println!("router-svc listening on {}", listener.local_addr()?);
    router_svc::run(config, listener, router_svc::shutdown_signal()).await?;
    Ok(())
}
