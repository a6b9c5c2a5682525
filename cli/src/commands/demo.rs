use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use moe::launcher::{Cluster, ClusterOptions};
use moe_model::synth::{self, Preset};
use moe_proto::v1::{DescribeRequest, GenerateRequest, generate_request::Prompt};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Checkpoint directory; a tiny one is written there when absent.
    #[arg(long, default_value = "moe-models/tiny")]
    pub model: PathBuf,
    #[arg(long, default_value = "Licensed under the Apache License, Version 2.0")]
    pub prompt: String,
    #[arg(long, default_value_t = 48)]
    pub max_tokens: u32,
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if !args.model.join(moe_model::CONFIG_FILE).is_file() {
        println!("writing a tiny checkpoint to {}", args.model.display());
        synth::write_checkpoint(&args.model, Preset::Tiny, 0)?;
    }
    let started = Instant::now();
    let options = ClusterOptions {
        log_filter: "warn".into(),
        ..ClusterOptions::new(&args.model)?
    };
    let cluster = Cluster::start(&options).await?;
    println!(
        "cluster up in {:.1}s: router-svc at {} + {} expert-svc processes",
        started.elapsed().as_secs_f64(),
        cluster.router_uri(),
        cluster.experts.len()
    );
    if let Some(http) = cluster.router_http() {
        println!("dashboard (while the demo runs): http://{http}/dashboard");
    }
    let result = converse(&cluster, &args).await;
    cluster.shutdown(Duration::from_secs(10)).await;
    println!("cluster stopped");
    result
}

async fn converse(cluster: &Cluster, args: &DemoArgs) -> anyhow::Result<()> {
    let mut client = moe::client::connect(&cluster.router_uri()).await?;
    let request = GenerateRequest {
        prompt: Some(Prompt::Text(args.prompt.clone())),
        max_tokens: Some(args.max_tokens),
        temperature: Some(args.temperature),
        seed: Some(args.seed),
        ..Default::default()
    };
    print!("\n{}", args.prompt);
    let started = Instant::now();
    let completion = moe::client::generate(&mut client, request, |message| {
        print!("{}", message.text);
        let _ = std::io::stdout().flush();
    })
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "\n\n{} tokens in {:.2}s ({:.1} tokens/s), finish: {}",
        completion.usage.completion_tokens,
        seconds,
        completion.usage.completion_tokens as f64 / seconds,
        completion.finish_reason
    );
    println!("\nrows each expert process served:");
    for process in &cluster.experts {
        let channel = moe_proto::transport::connect(&process.uri()).await?;
        let mut expert = moe_proto::transport::expert_client(channel);
        let described = expert.describe(DescribeRequest {}).await?.into_inner();
        println!(
            "  expert {:>2}  pid {:>7}  {:>6} rows in {} forward passes",
            described.expert,
            process.pid().unwrap_or(0),
            described.rows_served,
            described.forward_passes
        );
    }
    Ok(())
}
