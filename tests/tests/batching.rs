//! Continuous batching does not change what any sequence generates, and the
//! distributed path generates what the in-process mode does.

use std::time::Duration;

use moe_e2e::{assert_same_run, generate, greedy, start, tiny_checkpoint};
use moe_proto::ExpertMode;
use moe_proto::v1::GenerateRequest;

const TOLERANCE: f32 = 1e-4;

/// Eight requests of different prompt lengths and kinds (greedy, seeded
/// sampling with top-k/top-p), as (request, delay before sending).
fn workload() -> Vec<(GenerateRequest, Duration)> {
    (0..8u32)
        .map(|i| {
            let length = [3, 70, 1, 25, 9, 48, 2, 33][i as usize];
            let prompt: Vec<u32> = (0..length).map(|j| (i * 37 + j * 11) % 500 + 2).collect();
            let mut request = greedy(&prompt, 12 + 3 * i);
            if i % 2 == 1 {
                request.temperature = Some(0.9);
                request.top_k = 40;
                request.top_p = Some(0.95);
                request.seed = Some(u64::from(i) * 1000 + 7);
            }
            (request, Duration::from_millis(u64::from(i) * 25))
        })
        .collect()
}

/// Sends every request of the workload concurrently, each after its delay,
/// so that they join a batch that is already running.
async fn run_concurrently(uri: &str) -> Vec<(Vec<u32>, Vec<f32>)> {
    let calls = workload().into_iter().map(|(request, delay)| {
        let uri = uri.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            generate(&uri, request).await.expect("generation succeeds")
        })
    });
    futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|joined| {
            let completion = joined.expect("task");
            (completion.token_ids, completion.logprobs)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_concurrent_equals_in_process_one_at_a_time() {
    let model = tiny_checkpoint();
    let local = start(model.path(), ExpertMode::InProcess).await;
    // The reference: each request alone, in the in-process mode.
    let mut alone = Vec::new();
    for (request, _) in workload() {
        let completion = generate(&local.router_uri(), request)
            .await
            .expect("generation succeeds");
        alone.push((completion.token_ids, completion.logprobs));
    }
    let local_batched = run_concurrently(&local.router_uri()).await;

    let distributed = start(model.path(), ExpertMode::Distributed).await;
    assert_eq!(distributed.experts.len(), 16);
    let distributed_batched = run_concurrently(&distributed.router_uri()).await;

    for (i, (tokens, logprobs)) in alone.iter().enumerate() {
        assert_eq!(tokens.len(), 12 + 3 * i, "request {i} length");
        let (t, l) = &local_batched[i];
        assert_same_run(
            &format!("request {i}, in-process batched"),
            t,
            l,
            tokens,
            logprobs,
            TOLERANCE,
        );
        let (t, l) = &distributed_batched[i];
        assert_same_run(
            &format!("request {i}, distributed batched"),
            t,
            l,
            tokens,
            logprobs,
            TOLERANCE,
        );
    }
}
