//! The distributed path reproduces Hugging Face transformers: for each
//! fixture (made by `fixtures/make_fixtures.py` with MixtralForCausalLM), the
//! same greedy tokens and log-probabilities within 1e-4, served by
//! router-svc and one expert-svc process per expert over real gRPC, on
//! loopback TCP (how `moe up` connects them) and on Unix sockets.
//!
//! Each fixture runs with the fast kernels (the CPU default) and with the
//! generic ones (candle operations only, what a GPU runs): distributed,
//! and in-process, where the experts' outputs are combined on the device.

use moe::launcher::ExpertTransport;
use moe_e2e::{Reference, assert_same_run, fixture, generate, greedy, start_with};
use moe_model::Kernels;
use moe_proto::ExpertMode;

const TOLERANCE: f32 = 1e-4;

async fn replay(name: &str, transport: ExpertTransport, kernels: Kernels) {
    replay_in(name, ExpertMode::Distributed, transport, kernels).await;
    if kernels == Kernels::Generic {
        replay_in(name, ExpertMode::InProcess, transport, kernels).await;
    }
}

async fn replay_in(name: &str, mode: ExpertMode, transport: ExpertTransport, kernels: Kernels) {
    let model = fixture(name);
    let reference = Reference::load(&model);
    let cluster = start_with(&model, |options| {
        options.mode = mode;
        options.expert_transport = transport;
        options.kernels = kernels;
    })
    .await;
    assert_eq!(cluster.experts.is_empty(), mode == ExpertMode::InProcess);
    for (i, case) in reference.prompts.iter().enumerate() {
        let completion = generate(
            &cluster.router_uri(),
            greedy(&case.prompt, case.tokens.len() as u32),
        )
        .await
        .unwrap_or_else(|status| panic!("{name} prompt {i}: {status}"));
        let label = format!(
            "{name}, {mode} over {transport:?}, {kernels} kernels, prompt {i} ({} tokens, {})",
            case.prompt.len(),
            reference.generator
        );
        assert_same_run(
            &label,
            &completion.token_ids,
            &completion.logprobs,
            &case.tokens,
            &case.logprobs,
            TOLERANCE,
        );
        assert_eq!(completion.finish_reason, "length");
    }
}

/// 16 experts, top-2, multi-query attention; transformers 5 config.json.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_experts_top2_mqa() {
    replay("e16_top2_mqa", ExpertTransport::Tcp, Kernels::Fast).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_experts_top2_mqa_generic_kernels() {
    replay("e16_top2_mqa", ExpertTransport::Tcp, Kernels::Generic).await;
}

/// 6 experts, top-3, grouped-query attention, sharded safetensors;
/// transformers 4 config.json; experts on Unix sockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_experts_top3_gqa_sharded() {
    replay("e6_top3_gqa_sharded", ExpertTransport::Unix, Kernels::Fast).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_experts_top3_gqa_sharded_generic_kernels() {
    replay(
        "e6_top3_gqa_sharded",
        ExpertTransport::Unix,
        Kernels::Generic,
    )
    .await;
}

/// 4 experts, top-1, full multi-head attention, tied embeddings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_experts_top1_mha_tied() {
    replay("e4_top1_mha_tied", ExpertTransport::Tcp, Kernels::Fast).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_experts_top1_mha_tied_generic_kernels() {
    replay("e4_top1_mha_tied", ExpertTransport::Tcp, Kernels::Generic).await;
}
