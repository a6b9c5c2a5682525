//! The distributed path reproduces Hugging Face transformers: for each
//! fixture (made by `fixtures/make_fixtures.py` with MixtralForCausalLM), the
//! same greedy tokens and log-probabilities within 1e-4, served by
//! router-svc and one expert-svc process per expert over real gRPC, on
//! loopback TCP (how `moe up` connects them) and on Unix sockets.

use moe::launcher::ExpertTransport;
use moe_e2e::{Reference, assert_same_run, fixture, generate, greedy, start_over};

const TOLERANCE: f32 = 1e-4;

async fn replay(name: &str, transport: ExpertTransport) {
    let model = fixture(name);
    let reference = Reference::load(&model);
    let cluster = start_over(&model, transport).await;
    assert!(!cluster.experts.is_empty());
    for (i, case) in reference.prompts.iter().enumerate() {
        let completion = generate(
            &cluster.router_uri(),
            greedy(&case.prompt, case.tokens.len() as u32),
        )
        .await
        .unwrap_or_else(|status| panic!("{name} prompt {i}: {status}"));
        let label = format!(
            "{name} over {transport:?}, prompt {i} ({} tokens, {})",
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
    replay("e16_top2_mqa", ExpertTransport::Tcp).await;
}

/// 6 experts, top-3, grouped-query attention, sharded safetensors;
/// transformers 4 config.json; experts on Unix sockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_experts_top3_gqa_sharded() {
    replay("e6_top3_gqa_sharded", ExpertTransport::Unix).await;
}

/// 4 experts, top-1, full multi-head attention, tied embeddings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_experts_top1_mha_tied() {
    replay("e4_top1_mha_tied", ExpertTransport::Tcp).await;
}
