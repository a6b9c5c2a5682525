use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use moe::bench::{self, Faults, ModelShape, Peak, Prompt, RunMode, RunReport, Workload};
use moe::launcher::{Cluster, ClusterOptions, ExpertTransport, ReplicaCount};
use moe_model::{Kernels, ModelConfig};
use moe_proto::ExpertMode;
use moe_proto::v1::ModelInfoRequest;
use serde::Serialize;
use tokenizers::Tokenizer;

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).multiple(true).args(["addr", "model"])))]
pub struct BenchArgs {
    /// A running router to load (e.g. http://127.0.0.1:50051).
    #[arg(long)]
    pub addr: Option<String>,
    /// With --addr: how to reach a secured router.
    #[command(flatten)]
    pub access: super::generate::AccessArgs,
    /// A checkpoint directory: start a cluster on it on loopback (as `moe
    /// up` does), load it, and stop it. With --addr or --openai, only its
    /// tokenizer and config are used, to make text prompts.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Also run the same workload in the in-process mode (the experts
    /// inside the router's process), and report distributed / in-process
    /// throughput.
    #[arg(
        long,
        requires = "model",
        conflicts_with = "addr",
        alias = "compare-local"
    )]
    pub compare_in_process: bool,
    /// With --compare-in-process: runs of each mode, alternating the order
    /// (distributed then in-process, in-process then distributed, ...) with
    /// both clusters up throughout, so that the machine's drift over the
    /// run (other tenants, warm-up) weighs on both modes alike.
    #[arg(long, default_value_t = 2, requires = "compare_in_process",
        value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
    /// Load an OpenAI-compatible completions server at this root URL
    /// instead (mistral.rs, vLLM...), with the same prompts; needs --model.
    #[arg(long, requires = "model", conflicts_with = "compare_in_process")]
    pub openai: Option<String>,
    /// The model name to put in OpenAI requests.
    #[arg(long, default_value = "default")]
    pub openai_model: String,
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 128)]
    pub requests: usize,
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Seed of the prompt choice: the same seed sends the same prompts.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// gemm threads per expert process, for clusters this command starts.
    #[arg(long, default_value_t = 1)]
    pub expert_threads: usize,
    /// How the router reaches the expert processes, for clusters this
    /// command starts.
    #[arg(long, value_enum, default_value_t = ExpertTransport::Tcp)]
    pub expert_transport: ExpertTransport,
    /// Expert processes per expert: N for every expert, E=N for expert E
    /// (repeatable); the router balances each expert's messages over them.
    #[arg(long = "replicas", value_name = "N|E=N")]
    pub replicas: Vec<ReplicaCount>,
    /// Extra flags for router-svc, e.g. --router-arg=--wire-dtype=bf16.
    #[arg(long = "router-arg", allow_hyphen_values = true)]
    pub router_args: Vec<String>,
    /// `--kernels` of every process of the clusters this command starts:
    /// `fast` or `generic`.
    #[arg(long, default_value_t = Kernels::Fast)]
    pub kernels: Kernels,
    /// A test tool: SIGKILLs a random expert replica every SECS seconds
    /// during the measured run, to measure latency under faults; the
    /// launcher restarts it. Distributed clusters this command starts
    /// only; failed requests are counted, not fatal.
    #[arg(long, value_name = "SECS", requires = "model", conflicts_with_all = ["addr", "openai"],
        value_parser = parse_seconds)]
    pub kill_every: Option<Duration>,
}

/// A positive, finite number of seconds, fractions allowed.
fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    // NaN, infinities and negatives are try_from_secs_f64's to refuse.
    if seconds == 0.0 {
        return Err(format!("{text:?}: expected more than 0 seconds"));
    }
    Duration::try_from_secs_f64(seconds).map_err(|err| format!("{text:?}: {err}"))
}

/// What `--json` prints.
#[derive(Debug, Serialize)]
struct Report {
    workload: Workload,
    cpus: usize,
    /// How the router reached the experts, when this command started them.
    #[serde(skip_serializing_if = "Option::is_none")]
    expert_transport: Option<ExpertTransport>,
    /// The kernels of the clusters this command started.
    #[serde(skip_serializing_if = "Option::is_none")]
    kernels: Option<&'static str>,
    matmul_peak: Peak,
    runs: Vec<RunReport>,
    /// Distributed / in-process output tokens per second
    /// (--compare-in-process),
    /// over all rounds: each mode's tokens over its time.
    #[serde(skip_serializing_if = "Option::is_none")]
    ratio: Option<f64>,
    /// The same ratio within each round, to show the spread.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ratio_per_round: Vec<f64>,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let workload = Workload {
        concurrency: args.concurrency,
        requests: args.requests,
        prompt_tokens: args.prompt_tokens,
        max_tokens: args.max_tokens,
        seed: args.seed,
    };
    let (shape, prompts) = shape_and_prompts(&args, &workload).await?;
    // Before any server starts, so nothing else competes for the cores.
    let peak = bench::measure_peak(&shape)?;
    let (mut expert_transport, mut kernels) = (None, None);
    let runs = if let Some(base) = &args.openai {
        let target = bench::OpenAi::new(base, &args.openai_model)?;
        bench::warm_up(&target, &prompts).await?;
        vec![bench::run(RunMode::OpenAi, &target, &workload, &prompts, &shape, &peak).await]
    } else if let Some(addr) = &args.addr {
        let target = (addr.as_str(), &args.access.access());
        vec![bench::run_grpc(target, &workload, &prompts, &shape, &peak, None).await?]
    } else {
        expert_transport = Some(args.expert_transport);
        kernels = Some(args.kernels.name());
        run_on_clusters(&args, &workload, &prompts, &shape, &peak).await?
    };
    let (ratio, ratio_per_round) = if args.compare_in_process {
        (Some(ratio(&runs)), runs.chunks(2).map(ratio).collect())
    } else {
        (None, Vec::new())
    };
    let report = Report {
        workload,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        expert_transport,
        kernels,
        matmul_peak: peak,
        runs,
        ratio,
        ratio_per_round,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    // Under --kill-every, failures are what is being measured.
    let failed: usize = report
        .runs
        .iter()
        .filter(|r| r.faults.is_none())
        .map(|r| r.measurement.requests_failed)
        .sum();
    anyhow::ensure!(failed == 0, "{failed} requests failed");
    Ok(())
}

/// The model's shape and the prompts: from the checkpoint when given
/// (text prompts cut from the corpus), else from the router's ModelInfo
/// (random token ids).
async fn shape_and_prompts(
    args: &BenchArgs,
    workload: &Workload,
) -> anyhow::Result<(ModelShape, Vec<Prompt>)> {
    if let Some(dir) = &args.model {
        let config = ModelConfig::from_file(&dir.join(moe_model::CONFIG_FILE))?;
        let path = dir.join(moe_model::TOKENIZER_FILE);
        let tokenizer = Tokenizer::from_file(&path)
            .map_err(|err| anyhow::anyhow!("{}: {err}", path.display()))?;
        return Ok((
            ModelShape::from(&config),
            workload.prompts_from_corpus(&tokenizer)?,
        ));
    }
    let addr = args
        .addr
        .as_deref()
        .context("--addr or --model is required")?;
    let mut client = moe::client::connect_with(addr, &args.access.access()).await?;
    let info = client.model_info(ModelInfoRequest {}).await?.into_inner();
    Ok((
        ModelShape::from(&info),
        workload.random_prompts(info.vocab_size),
    ))
}

const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Distributed over in-process throughput: each mode's output tokens over
/// its total time, across `runs`.
fn ratio(runs: &[RunReport]) -> f64 {
    let rate = |mode: ExpertMode| {
        let (tokens, seconds) = runs
            .iter()
            .filter(|run| run.mode == RunMode::MoeServe(mode))
            .fold((0.0, 0.0), |(tokens, seconds), run| {
                (
                    tokens + run.measurement.output_tokens as f64,
                    seconds + run.measurement.duration_s,
                )
            });
        tokens / seconds.max(f64::EPSILON)
    };
    rate(ExpertMode::Distributed) / rate(ExpertMode::InProcess)
}

/// Starts a distributed cluster on `--model` (and an in-process one with
/// --compare-in-process), runs the workload on each (`--rounds` times,
/// alternating the order), and stops them.
async fn run_on_clusters(
    args: &BenchArgs,
    workload: &Workload,
    prompts: &[Prompt],
    shape: &ModelShape,
    peak: &Peak,
) -> anyhow::Result<Vec<RunReport>> {
    let distributed = start_cluster(args, ExpertMode::Distributed).await?;
    let in_process = if args.compare_in_process {
        Some(start_cluster(args, ExpertMode::InProcess).await?)
    } else {
        None
    };
    let rounds = if in_process.is_some() { args.rounds } else { 1 };
    let mut runs = Vec::new();
    for round in 0..rounds as usize {
        let mut order: Vec<&Cluster> = std::iter::once(&distributed).chain(&in_process).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for cluster in order {
            // Only the distributed cluster has expert processes to kill.
            let faults = args.kill_every.map(|kill_every| Faults {
                experts: &cluster.experts,
                kill_every,
                seed: args.seed,
            });
            let faults = faults.as_ref().filter(|f| !f.experts.is_empty());
            let mut run = bench::run_grpc(
                (&cluster.router_uri(), &cluster.access()),
                workload,
                prompts,
                shape,
                peak,
                faults,
            )
            .await?;
            run.round = in_process.is_some().then_some(round);
            runs.push(run);
        }
    }
    if let Some(in_process) = in_process {
        in_process.shutdown(SHUTDOWN_GRACE).await;
    }
    distributed.shutdown(SHUTDOWN_GRACE).await;
    Ok(runs)
}

/// Starts a cluster on `--model` in `mode`, as `moe up` does.
async fn start_cluster(args: &BenchArgs, mode: ExpertMode) -> anyhow::Result<Cluster> {
    let model = args.model.as_ref().context("--model is required")?;
    let options = ClusterOptions {
        router_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        expert_threads: args.expert_threads,
        expert_transport: args.expert_transport,
        mode,
        replicas: args.replicas.clone(),
        router_args: args.router_args.clone(),
        kernels: args.kernels,
        log_filter: "warn".into(),
        ..ClusterOptions::new(model)?
    };
    Cluster::start(&options).await
}

fn print_table(report: &Report) {
    let w = &report.workload;
    println!(
        "workload: {} requests, concurrency {}, {} prompt tokens, {} max tokens, seed {} ({} CPUs)",
        w.requests, w.concurrency, w.prompt_tokens, w.max_tokens, w.seed, report.cpus
    );
    if let Some(transport) = report.expert_transport {
        println!("experts reached over {transport}");
    }
    if let Some(kernels) = report.kernels {
        println!("kernels: {kernels}");
    }
    println!(
        "matmul peak: {:.1} GFLOP/s (candle f32, {}x{}x{})",
        report.matmul_peak.flops_per_s / 1e9,
        report.matmul_peak.shape.0,
        report.matmul_peak.shape.1,
        report.matmul_peak.shape.2
    );
    println!(
        "{:<14} {:>9} {:>7} {:>9} {:>9} {:>8} {:>8} {:>9} {:>6}",
        "mode", "tok/s", "failed", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "GFLOP/s", "util"
    );
    for run in &report.runs {
        let m = &run.measurement;
        let mode = match run.round {
            Some(round) => format!("{} #{}", run.mode, round + 1),
            None => run.mode.to_string(),
        };
        println!(
            "{:<14} {:>9.1} {:>7} {:>7.0}ms {:>7.0}ms {:>6.1}ms {:>6.1}ms {:>9.2} {:>5.1}%",
            mode,
            m.output_tokens_per_s,
            m.requests_failed,
            m.ttft.p50_ms,
            m.ttft.p99_ms,
            m.itl.p50_ms,
            m.itl.p99_ms,
            run.model_flops_per_s / 1e9,
            run.utilisation * 100.0
        );
        if let Some(faults) = &run.faults {
            println!(
                "  faults: {} expert processes killed (one every {:.1}s), {} restarted; {} of {} requests failed",
                faults.kills,
                faults.kill_every_s,
                faults.restarts,
                m.requests_failed,
                m.requests_ok + m.requests_failed
            );
        }
        if let Some(error) = &m.first_error {
            println!("  first failure: {error}");
        }
        if let Some(wire) = &run.wire {
            println!(
                "  wire ({}): {:.0} bytes/token/layer, minimum {:.0} (+{:.2}%); {:.1} messages/step, bound {:.1}",
                wire.dtype,
                wire.bytes_per_token_layer,
                wire.min_bytes_per_token_layer,
                wire.overhead * 100.0,
                wire.messages_per_step,
                wire.message_bound_per_step
            );
        }
    }
    if let Some(ratio) = report.ratio {
        let rounds: Vec<String> = report
            .ratio_per_round
            .iter()
            .map(|ratio| format!("{ratio:.3}"))
            .collect();
        println!(
            "distributed / in-process throughput: {ratio:.3} (by round: {})",
            rounds.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_every_takes_positive_fractional_seconds() {
        assert_eq!(parse_seconds("0.25"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_seconds("3"), Ok(Duration::from_secs(3)));
        for bad in ["0", "-1", "nan", "inf", "soon", ""] {
            assert!(parse_seconds(bad).is_err(), "{bad:?}");
        }
    }
}
