//! What the end-to-end tests share: checkpoints, clusters of real
//! processes, and requests.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use moe::client::Completion;
use moe::launcher::{Cluster, ClusterOptions, ExpertTransport, Process};
use moe_proto::v1::inference_client::InferenceClient;
use moe_proto::v1::{
    DescribeRequest, DescribeResponse, GenerateRequest, GenerateResponse, StatsRequest,
    StatsResponse, TokenIds, generate_request::Prompt,
};
use moe_proto::{ExpertMode, ListenAddr};
use serde::Deserialize;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

mod binaries;
pub mod dns;
pub mod http;
pub mod load;
pub mod raw;

pub use moe::client;
pub use tonic_health::pb::health_check_response::ServingStatus;

/// How long a test waits for anything that should take well under a
/// second: a process to become ready, a stream to end, a message.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// `future`'s output, or a panic saying `what` did not happen within
/// [`PATIENCE`]: nothing a test waits for can hang CI.
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {PATIENCE:?}"))
}

/// A committed fixture checkpoint made by `tests/fixtures/make_fixtures.py`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// A fresh tiny checkpoint (the `moe init` default) in a temporary directory.
pub fn tiny_checkpoint() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    moe_model::synth::write_checkpoint(dir.path(), moe_model::synth::Preset::Tiny, 0)
        .expect("tiny checkpoint");
    dir
}

/// The reference outputs transformers recorded for a fixture.
#[derive(Debug, Deserialize)]
pub struct Reference {
    pub generator: String,
    pub prompts: Vec<ReferencePrompt>,
}

#[derive(Debug, Deserialize)]
pub struct ReferencePrompt {
    pub prompt: Vec<u32>,
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
}

impl Reference {
    pub fn load(checkpoint: &Path) -> Self {
        let text =
            std::fs::read_to_string(checkpoint.join("reference.json")).expect("reference.json");
        serde_json::from_str(&text).expect("valid reference.json")
    }
}

/// Launcher options for `model` with quiet children (warnings only).
///
/// Panics, saying how to run the tests, when the service binaries are
/// missing or were built from other sources than the ones in the tree.
pub fn quiet_options(model: &Path) -> ClusterOptions {
    let options = ClusterOptions::new(model).unwrap_or_else(|err| {
        panic!(
            "{err:#}\nThe end-to-end tests run this tree's service binaries: \
             run them with `cargo test --workspace`, which builds those first."
        )
    });
    binaries::assert_built_from_these_sources(&options.bin_dir);
    ClusterOptions {
        log_filter: "warn".into(),
        ..options
    }
}

/// A cluster in `mode`: one expert-svc per expert, or the in-process mode.
pub async fn start(model: &Path, mode: ExpertMode) -> Cluster {
    start_in(model, mode, &[]).await
}

/// A cluster on [`quiet_options`] as `configure` changes them, e.g.
/// `start_with(model, |o| o.restart_experts = false)` for experts that
/// stay dead once killed.
pub async fn start_with(model: &Path, configure: impl FnOnce(&mut ClusterOptions)) -> Cluster {
    let mut options = quiet_options(model);
    configure(&mut options);
    Cluster::start(&options).await.expect("cluster starts")
}

/// A cluster in `mode` whose router gets `router_args` besides the usual.
pub async fn start_in(model: &Path, mode: ExpertMode, router_args: &[&str]) -> Cluster {
    let options = ClusterOptions {
        mode,
        router_args: router_args.iter().map(|arg| arg.to_string()).collect(),
        ..quiet_options(model)
    };
    Cluster::start(&options).await.expect("cluster starts")
}

/// A distributed cluster whose router reaches its experts over `transport`.
pub async fn start_over(model: &Path, transport: ExpertTransport) -> Cluster {
    let options = ClusterOptions {
        expert_transport: transport,
        ..quiet_options(model)
    };
    Cluster::start(&options).await.expect("cluster starts")
}

/// A distributed cluster whose router gets `router_args` besides the usual.
pub async fn start_with_router_args(model: &Path, router_args: &[&str]) -> Cluster {
    start_in(model, ExpertMode::Distributed, router_args).await
}

/// A router-svc for `model` on a free loopback port, started as the
/// launcher starts its router, with `args` saying where its experts are
/// (and any other flag). Does not wait for it to be ready.
pub async fn spawn_router(model: &Path, args: &[String]) -> Process {
    let options = quiet_options(model);
    let mut command = tokio::process::Command::new(options.bin_dir.join("router-svc"));
    command
        .arg("--model")
        .arg(model)
        .args(["--listen", "127.0.0.1:0", "--sched-batch"])
        .args(args);
    moe::launcher::spawn("router-svc".into(), command, &options)
        .await
        .expect("router-svc starts")
}

/// [`spawn_router`], then waits until its health says SERVING: every
/// expert it was given answered.
pub async fn start_router(model: &Path, args: &[String]) -> Process {
    let router = spawn_router(model, args).await;
    HealthWatch::open(&router.uri())
        .await
        .until(ServingStatus::Serving)
        .await;
    router
}

/// One expert-svc process serving `expert` for `layers` (e.g. "0..2") on
/// a free loopback port, started as the launcher starts its experts.
pub async fn start_expert(model: &Path, expert: usize, layers: &str) -> Process {
    start_expert_with(model, expert, layers, |_| {}).await
}

/// [`start_expert`] on [`quiet_options`] as `configure` changes them, e.g.
/// `|o| o.kernels = Kernels::Generic`.
pub async fn start_expert_with(
    model: &Path,
    expert: usize,
    layers: &str,
    configure: impl FnOnce(&mut ClusterOptions),
) -> Process {
    let listen: ListenAddr = "127.0.0.1:0".parse().expect("a loopback address");
    let mut options = quiet_options(model);
    configure(&mut options);
    moe::launcher::start_expert(&options, expert, Some(layers), &listen)
        .await
        .expect("expert starts")
}

/// A process's gRPC health (the whole process: service ""), followed as
/// it changes rather than polled.
pub struct HealthWatch {
    uri: String,
    updates: tonic::Streaming<HealthCheckResponse>,
}

impl HealthWatch {
    pub async fn open(uri: &str) -> Self {
        let channel = moe_proto::transport::connect(uri)
            .await
            .unwrap_or_else(|err| panic!("{uri} is not reachable: {err}"));
        let updates = HealthClient::new(channel)
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap_or_else(|status| panic!("{uri} does not serve health: {status}"))
            .into_inner();
        Self {
            uri: uri.to_owned(),
            updates,
        }
    }

    /// Waits until the process reports `status`; panics if it does not
    /// within [`PATIENCE`] or the watch ends first.
    pub async fn until(&mut self, status: ServingStatus) {
        let Self { uri, updates } = self;
        let what = format!("{uri} reports {status:?}");
        within(&what, async {
            loop {
                match updates.message().await {
                    Ok(Some(update)) if update.status == status as i32 => return,
                    Ok(Some(_)) => {}
                    other => panic!("{uri}'s health watch ended before {status:?}: {other:?}"),
                }
            }
        })
        .await
    }
}

/// HTTP/2 receive window of a [`stalling_client`]'s streams.
const STALLING_WINDOW_BYTES: u32 = 1024;

/// A client of the public API whose streams' HTTP/2 receive window holds
/// a kilobyte. A generation whose responses it stops reading stalls after
/// a bounded number of tokens (about a hundred: its responses fill that
/// window, then the router's bounded per-request buffers, then the
/// scheduler leaves the sequence out of its steps) and goes on once they
/// are read. Tests use it to keep a request running, and its running
/// slot taken, for as long as they need, without relying on timing.
pub async fn stalling_client(uri: &str) -> InferenceClient<Channel> {
    let channel = moe_proto::transport::endpoint(uri)
        .expect("a valid router URI")
        .initial_stream_window_size(STALLING_WINDOW_BYTES)
        .connect()
        .await
        .unwrap_or_else(|err| panic!("{uri} is not reachable: {err}"));
    moe_proto::transport::inference_client(channel)
}

/// Reads a Generate stream to its end, within [`PATIENCE`], as
/// [`client::generate`] collects one.
pub async fn collect(
    mut stream: tonic::Streaming<GenerateResponse>,
) -> Result<Completion, tonic::Status> {
    within("the generation ends", async {
        let mut completion = Completion::default();
        while let Some(message) = stream.message().await? {
            completion.token_ids.extend(&message.token_ids);
            completion.logprobs.extend(&message.logprobs);
            completion.text.push_str(&message.text);
            if message.finish_reason != 0 {
                completion.finish_reason = client::finish_reason_name(message.finish_reason);
            }
        }
        Ok(completion)
    })
    .await
}

/// The router's counters now.
pub async fn stats(uri: &str) -> StatsResponse {
    within("Stats answers", async {
        let mut client = client::connect(uri).await.expect("router reachable");
        client.stats(StatsRequest {}).await.expect("Stats answers")
    })
    .await
    .into_inner()
}

/// What an expert process says about itself, counters included.
pub async fn describe(uri: &str) -> DescribeResponse {
    within("Describe answers", async {
        let channel = moe_proto::transport::connect(uri)
            .await
            .expect("expert reachable");
        let mut client = moe_proto::transport::expert_client(channel);
        client
            .describe(DescribeRequest {})
            .await
            .expect("Describe answers")
    })
    .await
    .into_inner()
}

/// Greedy decoding of `max_tokens` tokens past any end-of-sequence token,
/// with log-probabilities.
pub fn greedy(prompt: &[u32], max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds {
            ids: prompt.to_vec(),
        })),
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        logprobs: true,
        ignore_eos: true,
        ..Default::default()
    }
}

/// One generation, collected; a generation still going after [`PATIENCE`]
/// ends with DEADLINE_EXCEEDED.
pub async fn generate(uri: &str, request: GenerateRequest) -> Result<Completion, tonic::Status> {
    let run = async {
        let mut client = client::connect(uri)
            .await
            .map_err(|err| tonic::Status::unavailable(err.to_string()))?;
        client::generate(&mut client, request, |_| {}).await
    };
    tokio::time::timeout(PATIENCE, run)
        .await
        .unwrap_or_else(|_| {
            Err(tonic::Status::deadline_exceeded(format!(
                "the test gave up after {PATIENCE:?}"
            )))
        })
}

/// Asserts two runs chose the same tokens with log-probabilities within
/// `tolerance`.
pub fn assert_same_run(
    label: &str,
    tokens: &[u32],
    logprobs: &[f32],
    expected_tokens: &[u32],
    expected_logprobs: &[f32],
    tolerance: f32,
) {
    assert_eq!(tokens, expected_tokens, "{label}: tokens differ");
    assert_eq!(
        logprobs.len(),
        expected_logprobs.len(),
        "{label}: logprob count"
    );
    for (i, (got, want)) in logprobs.iter().zip(expected_logprobs).enumerate() {
        assert!(
            (got - want).abs() <= tolerance,
            "{label}: logprob of token {i} is {got}, expected {want} (±{tolerance})"
        );
    }
}

/// [`assert_same_run`] for two completions.
pub fn assert_same_completion(
    label: &str,
    completion: &Completion,
    expected: &Completion,
    tolerance: f32,
) {
    assert_same_run(
        label,
        &completion.token_ids,
        &completion.logprobs,
        &expected.token_ids,
        &expected.logprobs,
        tolerance,
    );
}
