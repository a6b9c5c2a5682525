//! What the end-to-end tests share: checkpoints, clusters of real
//! processes, and requests.

use std::path::{Path, PathBuf};

use moe::client::Completion;
use moe::launcher::{Cluster, ClusterOptions, ExpertTransport};
use moe_proto::v1::{GenerateRequest, TokenIds, generate_request::Prompt};
use moe_proto::{ExpertMode, ListenAddr};
use serde::Deserialize;

pub use moe::client;

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
pub fn quiet_options(model: &Path) -> ClusterOptions {
    ClusterOptions {
        log_filter: "warn".into(),
        ..ClusterOptions::new(model).expect("binaries built")
    }
}

/// A cluster in `mode`: one expert-svc per expert, or the in-process mode.
pub async fn start(model: &Path, mode: ExpertMode) -> Cluster {
    let options = ClusterOptions {
        mode,
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
    let options = ClusterOptions {
        router_args: router_args.iter().map(|arg| arg.to_string()).collect(),
        ..quiet_options(model)
    };
    Cluster::start(&options).await.expect("cluster starts")
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

pub async fn generate(uri: &str, request: GenerateRequest) -> Result<Completion, tonic::Status> {
    let mut client = client::connect(uri)
        .await
        .map_err(|err| tonic::Status::unavailable(err.to_string()))?;
    client::generate(&mut client, request, |_| {}).await
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

/// One expert-svc process serving `expert` for `layers` (e.g. "0..2") on
/// a free loopback port, started as the launcher starts its experts.
pub async fn start_expert(model: &Path, expert: usize, layers: &str) -> moe::launcher::Process {
    let listen: ListenAddr = "127.0.0.1:0".parse().expect("a loopback address");
    moe::launcher::start_expert(&quiet_options(model), expert, Some(layers), &listen)
        .await
        .expect("expert starts")
}
