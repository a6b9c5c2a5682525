//! `moe`: init a checkpoint, bring a cluster up, generate, demo.

mod commands;

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    moe_proto::transport::init_logging("warn");
    commands::Cli::parse().run().await
}
