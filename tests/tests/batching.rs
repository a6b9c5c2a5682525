//! Continuous batching does not change what any sequence generates, and the
//! distributed path generates what the in-process mode does; and the steps
//! really did batch several sequences. With the fast kernels and with the
//! generic ones.

use std::time::Duration;

use moe_e2e::client::Completion;
use moe_e2e::{
    assert_same_completion, collect, generate, greedy, start_with, stats, tiny_checkpoint, within,
};
use moe_model::Kernels;
use moe_proto::ExpertMode;
use moe_proto::v1::{GenerateRequest, StatsResponse};

const TOLERANCE: f32 = 1e-4;

/// Tokens of request 0, the anchor: far more than the others together, so
/// that it is still generating when they arrive and until they are done.
const ANCHOR_TOKENS: u32 = 600;

/// Tokens request `i` generates (`ignore_eos`: exactly that many).
fn max_tokens(i: usize) -> u32 {
    if i == 0 {
        ANCHOR_TOKENS
    } else {
        12 + 3 * i as u32
    }
}

/// Eight requests of different prompt lengths and kinds (greedy, seeded
/// sampling with top-k/top-p): request 0 is the long greedy anchor.
fn workload() -> Vec<GenerateRequest> {
    (0..8u32)
        .map(|i| {
            let length = [3, 70, 1, 25, 9, 48, 2, 33][i as usize];
            let prompt: Vec<u32> = (0..length).map(|j| (i * 37 + j * 11) % 500 + 2).collect();
            let mut request = greedy(&prompt, max_tokens(i as usize));
            if i % 2 == 1 {
                request.temperature = Some(0.9);
                request.top_k = 40;
                request.top_p = Some(0.95);
                request.seed = Some(u64::from(i) * 1000 + 7);
            }
            request
        })
        .collect()
}

/// Starts the anchor, waits for its first token (it is running), then
/// sends the others 5 ms apart, so that each joins a batch that is already
/// running; returns every completion and the router's counters from just
/// before to just after.
async fn run_concurrently(uri: &str) -> (Vec<Completion>, StatsResponse, StatsResponse) {
    let before = stats(uri).await;
    let mut requests = workload().into_iter();
    let mut client = moe_e2e::client::connect(uri).await.unwrap();
    let anchor = client.generate(requests.next().expect("the anchor"));
    let mut anchor = within("the anchor's answer", anchor)
        .await
        .expect("the anchor is admitted")
        .into_inner();
    let first = within("the anchor's first token", anchor.message())
        .await
        .expect("the anchor runs")
        .expect("a first token");
    let others = requests.enumerate().map(|(i, request)| {
        let uri = uri.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5 * i as u64)).await;
            generate(&uri, request).await.expect("generation succeeds")
        })
    });
    let others = futures::future::join_all(others);
    let (rest, others) = futures::join!(collect(anchor), others);
    let rest = rest.expect("the anchor completes");
    let mut anchor = Completion {
        token_ids: first.token_ids,
        logprobs: first.logprobs,
        ..rest.clone()
    };
    anchor.token_ids.extend(rest.token_ids);
    anchor.logprobs.extend(rest.logprobs);
    let mut completions = vec![anchor];
    completions.extend(others.into_iter().map(|joined| joined.expect("task")));
    (completions, before, stats(uri).await)
}

/// What the counters say about the concurrent run: every token came from
/// exactly one step, and most steps that ran one of the later requests
/// ran the anchor too.
///
/// Each request generates exactly its `max_tokens` (`ignore_eos`), one per
/// step it takes part in (its prompt fits one step), so `step_sequences`
/// grows by their sum. The later requests were sent after the anchor's
/// first token and are done long before its last, so every step that ran
/// one of them ran the anchor as well, except a step the anchor sat out
/// because its tokens were not being delivered fast enough (the router
/// leaves out of a step a sequence whose bounded buffer of undelivered
/// tokens is full). Ideally, then, the steps were the anchor's and no
/// more; unbatched, they would be one per token of every request.
/// Allowing for a loaded machine, the test asks that at least half of the
/// later requests' tokens came from steps shared with the anchor: with no
/// batching there would be none.
fn assert_batched(mode: &str, before: &StatsResponse, after: &StatsResponse) {
    let steps = after.steps - before.steps;
    let sequences = after.step_sequences - before.step_sequences;
    let all_tokens: u64 = (0..8).map(|i| u64::from(max_tokens(i))).sum();
    let later_tokens = all_tokens - u64::from(ANCHOR_TOKENS);
    assert_eq!(sequences, all_tokens, "{mode}: one step per token");
    assert!(
        steps <= u64::from(ANCHOR_TOKENS) + later_tokens / 2,
        "{mode}: {steps} steps for {all_tokens} tokens of 8 requests: the later {later_tokens} \
         tokens did not share the anchor's steps (or the anchor finished before them)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_concurrent_equals_in_process_one_at_a_time() {
    concurrent_equals_one_at_a_time(Kernels::Fast).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distributed_concurrent_equals_in_process_one_at_a_time_generic_kernels() {
    concurrent_equals_one_at_a_time(Kernels::Generic).await;
}

async fn concurrent_equals_one_at_a_time(kernels: Kernels) {
    let model = tiny_checkpoint();
    let start = |mode| {
        start_with(model.path(), move |options| {
            options.mode = mode;
            options.kernels = kernels;
        })
    };
    let in_process = start(ExpertMode::InProcess).await;
    // The reference: each request alone, in the in-process mode.
    let mut alone = Vec::new();
    for request in workload() {
        let completion = generate(&in_process.router_uri(), request)
            .await
            .expect("generation succeeds");
        alone.push(completion);
    }
    let (in_process_batched, before, after) = run_concurrently(&in_process.router_uri()).await;
    assert_batched(&format!("in-process, {kernels} kernels"), &before, &after);

    let distributed = start(ExpertMode::Distributed).await;
    assert_eq!(distributed.experts.len(), 16);
    let (distributed_batched, before, after) = run_concurrently(&distributed.router_uri()).await;
    assert_batched(&format!("distributed, {kernels} kernels"), &before, &after);

    for (i, reference) in alone.iter().enumerate() {
        assert_eq!(
            reference.token_ids.len(),
            max_tokens(i) as usize,
            "request {i} length"
        );
        assert_same_completion(
            &format!("request {i}, in-process batched, {kernels} kernels"),
            &in_process_batched[i],
            reference,
            TOLERANCE,
        );
        assert_same_completion(
            &format!("request {i}, distributed batched, {kernels} kernels"),
            &distributed_batched[i],
            reference,
            TOLERANCE,
        );
    }
}
