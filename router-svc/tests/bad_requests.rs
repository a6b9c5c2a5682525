//! Bad client input gets INVALID_ARGUMENT naming the field, and the router
//! process keeps serving: after each refusal a valid request succeeds.

use moe_e2e::{generate, greedy, start, tiny_checkpoint};
use moe_proto::ExpertMode;
use moe_proto::v1::{GenerateRequest, TokenIds, generate_request::Prompt};
use tonic::Code;

/// Starts a router (in-process experts: validation happens before any
/// expert is involved), sends `request`, checks the refusal names
/// `field`, then checks the same process still generates.
async fn assert_refused(request: GenerateRequest, field: &str) {
    let model = tiny_checkpoint();
    let cluster = start(model.path(), ExpertMode::InProcess).await;
    let uri = cluster.router_uri();
    let status = generate(&uri, request)
        .await
        .expect_err("the request is refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains(field),
        "{:?} does not name {field:?}",
        status.message()
    );
    let completion = generate(&uri, greedy(&[3, 4, 5], 5))
        .await
        .expect("still serving");
    assert_eq!(completion.token_ids.len(), 5);
}

fn text(prompt: &str) -> GenerateRequest {
    GenerateRequest {
        prompt: Some(Prompt::Text(prompt.into())),
        max_tokens: Some(4),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_text_prompt() {
    assert_refused(text(""), "prompt is empty").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_token_prompt() {
    let request = GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds { ids: vec![] })),
        ..Default::default()
    };
    assert_refused(request, "prompt is empty").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_plus_max_tokens_beyond_context() {
    // The tiny checkpoint's context is 1024 positions.
    assert_refused(greedy(&[7; 1000], 25), "exceeds the context length (1024)").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_id_outside_vocabulary() {
    assert_refused(greedy(&[1, 2, 100_000], 4), "token_ids[2] = 100000").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_temperature() {
    let request = GenerateRequest {
        temperature: Some(-0.1),
        ..text("hello")
    };
    assert_refused(request, "temperature").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_p_outside_unit_interval() {
    let request = GenerateRequest {
        top_p: Some(1.5),
        ..text("hello")
    };
    assert_refused(request, "top_p must be in (0, 1], got 1.5").await;
    let zero = GenerateRequest {
        top_p: Some(0.0),
        ..text("hello")
    };
    assert_refused(zero, "top_p").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_top_k() {
    let request = GenerateRequest {
        top_k: -3,
        ..text("hello")
    };
    assert_refused(request, "top_k must be >= 0, got -3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_that_fills_the_context_says_so() {
    // 1024 ids, max_tokens unset: the prompt alone fills the context.
    let request = GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds { ids: vec![7; 1024] })),
        ..Default::default()
    };
    assert_refused(
        request,
        "prompt is 1024 tokens; the context length is 1024, which must leave room",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_stop_string_is_named() {
    let request = GenerateRequest {
        stop: vec!["ok".into(), String::new()],
        ..text("hello")
    };
    assert_refused(request, "stop[1] is empty; stop strings must not be empty").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_stop_string_is_named() {
    let request = GenerateRequest {
        stop: vec!["x".repeat(300)],
        ..text("hello")
    };
    assert_refused(
        request,
        "stop[0] is 300 bytes; a stop string holds at most 256",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_stop_strings_are_named() {
    let request = GenerateRequest {
        stop: (0..17).map(|i| format!("stop {i}")).collect(),
        ..text("hello")
    };
    assert_refused(request, "stop holds 17 strings; at most 16 are allowed").await;
}
