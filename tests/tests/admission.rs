//! Admission: with every running slot taken and `--queue-capacity`
//! requests already waiting, a request is refused at once with
//! RESOURCE_EXHAUSTED, and the requests admitted before it still complete.

use std::time::Duration;

use moe_e2e::{collect, generate, greedy, stalling_client, start_in, tiny_checkpoint, within};
use moe_proto::ExpertMode;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_at_once_and_the_admitted_requests_complete() {
    const RUNNING_TOKENS: usize = 300;
    let model = tiny_checkpoint();
    // Admission happens before any expert is involved: in-process will do.
    let cluster = start_in(
        model.path(),
        ExpertMode::InProcess,
        &["--max-running=1", "--queue-capacity=1"],
    )
    .await;
    let uri = cluster.router_uri();

    // The running request, read through a stalling client: it cannot
    // finish, and free the one running slot, before the test reads it.
    let mut stalled = stalling_client(&uri).await;
    let running = stalled.generate(greedy(&[4, 5, 6], RUNNING_TOKENS as u32));
    let mut running = within("the first request's answer", running)
        .await
        .expect("the first request is admitted")
        .into_inner();
    let first = within("the first request's first token", running.message())
        .await
        .expect("it runs")
        .expect("a first token");

    // The waiting request: its response headers come back once the router
    // has queued it, and it waits there for the slot.
    let mut client = moe_e2e::client::connect(&uri).await.unwrap();
    let waiting = within(
        "the second request's answer",
        client.generate(greedy(&[7, 8], 5)),
    )
    .await
    .expect("the second request is queued")
    .into_inner();

    // The queue is full: the third is refused without waiting for a slot
    // (which the stalled request would never free).
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        client.generate(greedy(&[9, 10], 5)),
    )
    .await
    .expect("refused at once, not queued")
    .expect_err("no room in the queue");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("the queue is full (1 waiting)"),
        "{:?} does not say the queue is full",
        refused.message()
    );

    // Both admitted requests complete: the running one once it is read, the
    // waiting one in the slot that frees.
    let rest = collect(running)
        .await
        .expect("the running request completes");
    assert_eq!(first.token_ids.len() + rest.token_ids.len(), RUNNING_TOKENS);
    assert_eq!(rest.finish_reason, "length");
    let waited = collect(waiting)
        .await
        .expect("the queued request completes");
    assert_eq!(waited.token_ids.len(), 5);
    assert_eq!(waited.finish_reason, "length");

    // With the queue empty again, a new request is taken.
    let after = generate(&uri, greedy(&[9, 10], 5))
        .await
        .expect("room again");
    assert_eq!(after.token_ids.len(), 5);
}

/// `--kv-cache-bytes`: a request waits while the running ones hold the KV
/// cache it would need (so no step ever batches the two), and one that
/// could never fit is refused, naming the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kv_cache_budget_holds_requests_back_and_refuses_what_cannot_fit() {
    // More than a stalling client lets through: the first request is still
    // running when the second arrives.
    const TOKENS: usize = 300;
    let model = tiny_checkpoint();
    let info = {
        let probe = start_in(model.path(), ExpertMode::InProcess, &[]).await;
        let mut client = moe_e2e::client::connect(&probe.router_uri()).await.unwrap();
        client
            .model_info(moe_proto::v1::ModelInfoRequest {})
            .await
            .unwrap()
            .into_inner()
    };
    let bytes_per_token =
        u64::from(info.num_layers * info.num_key_value_heads * info.head_dim) * 2 * 4;
    // Room for one request of 3 + TOKENS positions, not two.
    let budget = bytes_per_token * (3 + TOKENS as u64) * 3 / 2;
    let cluster = start_in(
        model.path(),
        ExpertMode::InProcess,
        &[&format!("--kv-cache-bytes={budget}")],
    )
    .await;
    let uri = cluster.router_uri();

    let mut stalled = stalling_client(&uri).await;
    let mut first = within(
        "the first request",
        stalled.generate(greedy(&[4, 5, 6], TOKENS as u32)),
    )
    .await
    .expect("admitted")
    .into_inner();
    within("its first token", first.message())
        .await
        .expect("it runs")
        .expect("a first token");
    let second = tokio::spawn({
        let uri = uri.clone();
        async move { generate(&uri, greedy(&[7, 8, 9], TOKENS as u32)).await }
    });

    let too_large = generate(&uri, greedy(&[1, 2, 3], 600))
        .await
        .expect_err("more KV cache than the whole budget");
    assert_eq!(too_large.code(), Code::InvalidArgument, "{too_large:?}");
    assert!(
        too_large.message().contains("bytes of KV cache")
            && too_large.message().contains(&budget.to_string()),
        "{too_large:?}"
    );

    let rest = collect(first).await.expect("the first request completes");
    assert_eq!(1 + rest.token_ids.len(), TOKENS);
    let second = within("the second request", second)
        .await
        .unwrap()
        .expect("the second request runs once the first is done");
    assert_eq!(second.token_ids.len(), TOKENS);
    let stats = moe_e2e::stats(&uri).await;
    assert_eq!(
        stats.step_sequences, stats.steps,
        "a step batched both requests: the second did not wait for KV cache"
    );
}
