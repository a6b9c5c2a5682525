//! Ways of laying out the work that must not change what is generated: a
//! large step split into two micro-batches, experts listed in a cluster
//! file, one expert's layers split across two processes. Each generates
//! what the in-process mode generates, and the counters show that the
//! layout was really used.

use std::path::Path;
use std::time::Duration;

use moe_e2e::client::Completion;
use moe_e2e::{
    assert_same_completion, collect, describe, generate, greedy, start, start_expert, start_in,
    start_router, stats, tiny_checkpoint, within,
};
use moe_proto::ExpertMode;
use moe_proto::v1::{GenerateRequest, ModelInfoRequest};

const TOLERANCE: f32 = 1e-4;
/// Layers of the tiny checkpoint: a micro-batch dispatches once per layer.
const LAYERS: u64 = 4;

fn prompt(length: u32, seed: u32) -> Vec<u32> {
    (0..length)
        .map(|j| (seed * 37 + j * 11) % 500 + 2)
        .collect()
}

/// A few greedy requests of different prompt lengths.
fn requests() -> Vec<GenerateRequest> {
    [(5, 1), (40, 2), (17, 3)]
        .into_iter()
        .map(|(length, seed)| greedy(&prompt(length, seed), 12))
        .collect()
}

/// Each request run alone in the in-process mode, with `router_args`.
async fn in_process(
    model: &Path,
    requests: &[GenerateRequest],
    router_args: &[&str],
) -> Vec<Completion> {
    let in_process = start_in(model, ExpertMode::InProcess, router_args).await;
    let mut completions = Vec::new();
    for request in requests {
        completions.push(
            generate(&in_process.router_uri(), request.clone())
                .await
                .expect("in-process generation"),
        );
    }
    completions
}

/// Runs `requests` one at a time against the router at `uri` and checks
/// each against `reference`.
async fn assert_generates(
    label: &str,
    uri: &str,
    requests: &[GenerateRequest],
    reference: &[Completion],
) {
    for (i, (request, expected)) in requests.iter().zip(reference).enumerate() {
        let completion = generate(uri, request.clone())
            .await
            .unwrap_or_else(|status| panic!("{label}, request {i}: {status}"));
        assert_same_completion(
            &format!("{label}, request {i}"),
            &completion,
            expected,
            TOLERANCE,
        );
    }
}

/// Two prompts of 200 tokens prefilled in one step: 400 tokens, over the
/// default `--pipeline-min-tokens 256`, so the step runs as two
/// micro-batches of one prompt each. It generates what the in-process mode
/// generates without ever splitting (`--pipeline-min-tokens=0`).
///
/// For both prompts to be in one step, they must both be waiting when the
/// scheduler next admits: the test stops every expert (SIGSTOP), sends a
/// one-token request whose step then cannot finish, waits until Stats
/// shows that step has started, queues the two prompts (each request's
/// response headers come back once it is queued), and lets the experts go
/// on. The one-token request then finishes, and the next step takes both
/// prompts. Every micro-batch dispatches once per layer, so the one split
/// step shows as exactly one extra set of 4 dispatches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_step_runs_as_two_micro_batches_and_generates_the_same() {
    let model = tiny_checkpoint();
    let prompts = [greedy(&prompt(200, 7), 8), greedy(&prompt(200, 8), 8)];
    let reference = in_process(model.path(), &prompts, &["--pipeline-min-tokens=0"]).await;

    let cluster = start(model.path(), ExpertMode::Distributed).await;
    let uri = cluster.router_uri();
    let before = stats(&uri).await;
    for expert in &cluster.experts {
        expert.freeze();
    }
    let opener = tokio::spawn({
        let uri = uri.clone();
        async move { generate(&uri, greedy(&[3], 1)).await }
    });
    tokio::time::timeout(Duration::from_secs(30), async {
        while stats(&uri).await.steps == before.steps {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the one-token request's step starts");
    let mut client = moe_e2e::client::connect(&uri).await.unwrap();
    let mut streams = Vec::new();
    for request in &prompts {
        let queued = within("a prompt is queued", client.generate(request.clone())).await;
        streams.push(queued.expect("queued").into_inner());
    }
    for expert in &cluster.experts {
        expert.resume();
    }
    let mut completions = Vec::new();
    for stream in streams {
        completions.push(collect(stream).await.expect("generation succeeds"));
    }
    let opened = within("the one-token request ends", opener)
        .await
        .expect("task")
        .expect("the one-token request");
    assert_eq!(opened.token_ids.len(), 1);

    for (i, (completion, expected)) in completions.iter().zip(&reference).enumerate() {
        assert_same_completion(
            &format!("prompt {i}, micro-batched"),
            completion,
            expected,
            TOLERANCE,
        );
    }
    let after = stats(&uri).await;
    let steps = after.steps - before.steps;
    let dispatches = after.moe_dispatches - before.moe_dispatches;
    let tokens = after.step_tokens - before.step_tokens;
    assert_eq!(
        tokens,
        1 + 400 + 2 * 7,
        "the opener, both prompts, their decodes"
    );
    assert_eq!(
        dispatches,
        LAYERS * (steps + 1),
        "{steps} steps took {dispatches} dispatches: one step, the two prompts', \
         should have run as two micro-batches"
    );
}

/// A router-svc given its experts by `--cluster FILE` (some entries with
/// `layers`, some without) uses them: it generates what the in-process mode
/// generates, and every row the experts computed came from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_takes_its_experts_from_a_cluster_file() {
    let model = tiny_checkpoint();
    let requests = requests();
    let reference = in_process(model.path(), &requests, &[]).await;
    // Expert processes as the launcher starts them; their own router stays
    // idle.
    let cluster = start(model.path(), ExpertMode::Distributed).await;
    let entries: Vec<serde_json::Value> = cluster
        .experts
        .iter()
        .enumerate()
        .map(|(expert, process)| match expert % 2 {
            0 => serde_json::json!({"expert": expert, "endpoint": process.uri(), "layers": "0..4"}),
            _ => serde_json::json!({"expert": expert, "endpoint": process.uri()}),
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cluster.json");
    std::fs::write(&file, serde_json::json!({ "experts": entries }).to_string()).unwrap();

    let router = start_router(
        model.path(),
        &["--cluster".into(), file.display().to_string()],
    )
    .await;
    let uri = router.uri();
    let mut client = moe_e2e::client::connect(&uri).await.unwrap();
    let info = within("ModelInfo answers", client.model_info(ModelInfoRequest {}))
        .await
        .unwrap();
    assert_eq!(info.into_inner().expert_mode, "distributed");
    assert_generates("cluster file", &uri, &requests, &reference).await;

    let sent = stats(&uri).await.expert_rows;
    let mut served = 0;
    for expert in &cluster.experts {
        served += describe(&expert.uri()).await.rows_served;
    }
    assert!(sent > 0);
    assert_eq!(
        served, sent,
        "rows the experts served, rows the router sent"
    );
}

/// Expert 0 served by two processes, one for layers 0..2 and one for
/// 2..4 (`--expert 0@0..2=URI --expert 0@2..4=URI`), the others by one
/// process each: the router generates what the in-process mode generates,
/// and the rows it sent expert 0 are exactly those the two slices served,
/// each some.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_expert_split_by_layers_across_two_processes() {
    let model = tiny_checkpoint();
    let requests = requests();
    let reference = in_process(model.path(), &requests, &[]).await;
    let slices = [
        start_expert(model.path(), 0, "0..2").await,
        start_expert(model.path(), 0, "2..4").await,
    ];
    let mut args = vec![
        "--expert".to_owned(),
        format!("0@0..2={}", slices[0].uri()),
        "--expert".to_owned(),
        format!("0@2..4={}", slices[1].uri()),
    ];
    let mut others = Vec::new();
    for expert in 1..16 {
        let process = start_expert(model.path(), expert, "0..4").await;
        args.extend(["--expert".to_owned(), format!("{expert}={}", process.uri())]);
        others.push(process);
    }
    let router = start_router(model.path(), &args).await;
    let uri = router.uri();
    assert_generates("layer slices", &uri, &requests, &reference).await;

    let routed_to_0 = stats(&uri).await.rows_by_expert[0];
    let mut served = Vec::new();
    for (slice, layers) in slices.iter().zip([0..2, 2..4]) {
        let described = describe(&slice.uri()).await;
        assert_eq!(
            (described.expert, described.layer_start..described.layer_end),
            (0, layers)
        );
        served.push(described.rows_served);
    }
    assert!(
        served.iter().all(|&rows| rows > 0),
        "a slice did nothing: {served:?}"
    );
    assert_eq!(
        served.iter().sum::<u64>(),
        routed_to_0,
        "rows the router sent expert 0, and rows its slices served"
    );
}
