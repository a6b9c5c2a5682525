//! An expert process that dies mid-request, with no other replica, ends
//! that request with UNAVAILABLE naming the expert once
//! `--no-replica-wait` has passed; one that hangs ends it with
//! DEADLINE_EXCEEDED after `--expert-timeout-secs`, naming it. Either way
//! the router itself keeps serving. (The launcher's restarts are off
//! here, so that a dead expert stays dead.)

use std::time::{Duration, Instant};

use moe_e2e::{generate, greedy, start_with, start_with_router_args, tiny_checkpoint};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_expert_fails_the_request_fast_and_names_it() {
    let model = tiny_checkpoint();
    let cluster = start_with(model.path(), |options| {
        options.restart_experts = false;
        options.router_args = vec!["--no-replica-wait=1s".into()];
    })
    .await;
    let uri = cluster.router_uri();
    generate(&uri, greedy(&[5, 6, 7], 4))
        .await
        .expect("healthy cluster answers");

    // A long generation is running, its tokens flowing, when expert 3 is
    // killed (SIGKILL, as a crash or an OOM kill would).
    const MAX_TOKENS: usize = 900;
    let mut client = moe_e2e::client::connect(&uri).await.unwrap();
    let mut stream = client
        .generate(greedy(&[9, 10, 11], MAX_TOKENS as u32))
        .await
        .expect("the request is admitted")
        .into_inner();
    let mut tokens = 0;
    while tokens < 5 {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("tokens flow")
            .expect("the healthy cluster generates")
            .expect("a token");
        tokens += message.token_ids.len();
    }
    let killed_at = Instant::now();
    let victim_uri = cluster.experts[3].uri();
    assert!(cluster.experts[3].kill(), "expert 3 was running");

    let status = loop {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("the request ends instead of hanging");
        match message {
            Ok(Some(message)) => {
                tokens += message.token_ids.len();
                assert_eq!(
                    message.finish_reason, 0,
                    "the request finished ({tokens} tokens) without expert 3"
                );
            }
            Ok(None) => panic!("the stream ended without a status after {tokens} tokens"),
            Err(status) => break status,
        }
    };
    assert!(tokens < MAX_TOKENS, "{tokens} tokens");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("expert 3"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains(&victim_uri),
        "{}",
        status.message()
    );
    // Within --no-replica-wait and a second.
    assert!(
        killed_at.elapsed() < Duration::from_secs(2),
        "took {:?}",
        killed_at.elapsed()
    );

    // The router is still up and says the same about new requests.
    let again = generate(&uri, greedy(&[1, 2], 4))
        .await
        .expect_err("expert 3 is still dead");
    assert_eq!(again.code(), Code::Unavailable);
    assert!(again.message().contains("expert 3"), "{}", again.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_expert_fails_the_request_after_the_timeout_and_names_it() {
    let model = tiny_checkpoint();
    let cluster = start_with_router_args(model.path(), &["--expert-timeout-secs=1"]).await;
    let uri = cluster.router_uri();
    generate(&uri, greedy(&[5, 6, 7], 4))
        .await
        .expect("healthy cluster answers");

    // Expert 3 stops answering but keeps its connection open.
    let hung_uri = cluster.experts[3].uri();
    cluster.experts[3].freeze();
    let started = Instant::now();
    let status = tokio::time::timeout(
        Duration::from_secs(10),
        generate(&uri, greedy(&[9, 10, 11], 64)),
    )
    .await
    .expect("the request ends instead of hanging")
    .expect_err("the request cannot complete without expert 3");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let message = status.message();
    assert!(
        message.contains(&format!("expert 3 at {hung_uri}")),
        "{message}"
    );
    assert!(message.contains("did not answer layer"), "{message}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "gave up after {:?}, before the timeout",
        started.elapsed()
    );

    // Once it answers again, so does the cluster.
    cluster.experts[3].resume();
    let completion = generate(&uri, greedy(&[1, 2], 4))
        .await
        .expect("expert 3 is back");
    assert_eq!(completion.token_ids.len(), 4);
}
