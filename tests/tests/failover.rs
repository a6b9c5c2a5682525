//! Replicas lost under load: killed at random, restarted in turn, or
//! replaced by a process of another checkpoint. Experts keep no state
//! between messages, so the router sends a failed message to another
//! replica and the step goes on: no request fails, and every output is the
//! one a run without faults gives (the same tokens; log-probabilities
//! within the batching tolerance, as batches form differently).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use moe::client::Completion;
use moe::launcher::{Cluster, ReplicaCount};
use moe_e2e::{
    HealthWatch, ServingStatus, assert_same_completion, describe, generate, greedy, start_with,
    stats, within,
};
use rand::Rng;

/// These tests each run dozens of processes: one at a time, or the two
/// cores would time them out.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// As in the batching tests: a batch of another shape sums in another order.
const TOLERANCE: f32 = 1e-4;
const REQUESTS: u32 = 16;
const TOKENS: u32 = 200;

fn request(index: u32) -> moe_proto::v1::GenerateRequest {
    greedy(&[index + 1, 2 * index + 3, 40 - index], TOKENS)
}

/// The requests, all at once; each one's outcome.
async fn run_all(uri: &str) -> Vec<Result<Completion, tonic::Status>> {
    futures::future::join_all((0..REQUESTS).map(|index| generate(uri, request(index)))).await
}

fn assert_unchanged(
    label: &str,
    runs: Vec<Result<Completion, tonic::Status>>,
    reference: &[Completion],
) {
    let failed: Vec<String> = runs
        .iter()
        .filter_map(|run| run.as_ref().err().map(|status| format!("{status:?}")))
        .collect();
    assert!(
        failed.is_empty(),
        "{label}: {} requests failed: {failed:?}",
        failed.len()
    );
    for (index, (run, expected)) in runs.into_iter().zip(reference).enumerate() {
        assert_same_completion(
            &format!("{label}, request {index}"),
            &run.unwrap(),
            expected,
            TOLERANCE,
        );
    }
}

/// Kills the chaos test waits for, so that some catch messages in flight.
const MIN_KILLS: u32 = 12;

async fn two_replicas_each(model: &std::path::Path) -> (Cluster, Vec<Completion>) {
    let cluster = start_with(model, |options| {
        options.replicas = vec![ReplicaCount::Every(2)]
    })
    .await;
    let reference = run_all(&cluster.router_uri())
        .await
        .into_iter()
        .map(|run| run.expect("the fault-free run completes"))
        .collect();
    (cluster, reference)
}

/// The router's view of the replica at `uri`.
async fn state_in_router(router: &str, uri: &str) -> Option<String> {
    stats(router)
        .await
        .replicas
        .into_iter()
        .find(|replica| replica.endpoint == uri)
        .map(|replica| replica.state)
}

async fn until_ready_in_router(router: &str, uri: &str) {
    within("the replica is ready again in the router", async {
        while state_in_router(router, uri).await.as_deref() != Some("ready") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_killed_at_random_under_load_fail_nothing_and_change_nothing() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let model = moe_e2e::tiny_checkpoint();
    let (cluster, reference) = two_replicas_each(model.path()).await;
    let uri = cluster.router_uri();
    let before = stats(&uri).await;

    // Kills every 200 ms for as long as the load runs; the load runs the
    // workload again until at least MIN_KILLS happened during it (a fast
    // machine finishes one round before enough kills catch messages in
    // flight).
    let running = AtomicBool::new(true);
    let kills = AtomicU32::new(0);
    let chaos = async {
        while running.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let victim = rand::rng().random_range(0..cluster.experts.len());
            if running.load(Ordering::Relaxed) && cluster.experts[victim].kill() {
                kills.fetch_add(1, Ordering::Relaxed);
            }
        }
    };
    let started = Instant::now();
    let load = async {
        let mut rounds = 0;
        while rounds == 0 || kills.load(Ordering::Relaxed) < MIN_KILLS {
            assert_unchanged("under random kills", run_all(&uri).await, &reference);
            rounds += 1;
        }
        running.store(false, Ordering::Relaxed);
        rounds
    };
    let (rounds, ()) = tokio::join!(load, chaos);
    let took = started.elapsed();
    let kills = kills.load(Ordering::Relaxed);

    let after = stats(&uri).await;
    let resent = after.expert_resends - before.expert_resends;
    eprintln!(
        "chaos: {rounds} rounds of {REQUESTS} requests of {TOKENS} tokens in {took:?}, {kills} replicas killed, {resent} messages re-sent, 0 requests lost"
    );
    assert!(
        resent > 0,
        "{kills} kills under load, yet no message was re-sent"
    );

    // How long a killed replica takes to take work again: the launcher's
    // restart, then the router's reconnection and check.
    let slot = &cluster.experts[0];
    let restarts = slot.restarts();
    let killed_at = Instant::now();
    assert!(slot.kill());
    within("the replica restarts", slot.wait_restarted(restarts))
        .await
        .expect("the launcher restarts it");
    until_ready_in_router(&uri, &slot.uri()).await;
    eprintln!(
        "a SIGKILLed replica was ready in the router again {:?} after the kill",
        killed_at.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_only_replica_restarted_within_the_wait_costs_a_pause_not_a_request() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let model = moe_e2e::tiny_checkpoint();
    let cluster = start_with(model.path(), |_| {}).await;
    let uri = cluster.router_uri();
    let reference = generate(&uri, request(1))
        .await
        .expect("the healthy cluster answers");
    let mut health = HealthWatch::open(&uri).await;
    health.until(ServingStatus::Serving).await;

    // Expert 3's only process dies while a request needs it; the launcher
    // brings it back within --no-replica-wait.
    let mut client = moe::client::connect(&uri).await.unwrap();
    let mut stream = client
        .generate(request(1))
        .await
        .expect("admitted")
        .into_inner();
    let first = stream.message().await.expect("a token").expect("a token");
    let restarts = cluster.experts[3].restarts();
    assert!(cluster.experts[3].kill());
    health.until(ServingStatus::NotServing).await;
    within(
        "expert 3 restarts",
        cluster.experts[3].wait_restarted(restarts),
    )
    .await
    .expect("the launcher restarts it");
    health.until(ServingStatus::Serving).await;

    let mut completion = Completion {
        token_ids: first.token_ids,
        logprobs: first.logprobs,
        ..Completion::default()
    };
    while let Some(message) = within("the request goes on", stream.message())
        .await
        .expect("the request outlives the restart")
    {
        completion.token_ids.extend(message.token_ids);
        completion.logprobs.extend(message.logprobs);
    }
    assert_same_completion("across a restart", &completion, &reference, TOLERANCE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_fails_nothing_and_changes_nothing() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let model = moe_e2e::tiny_checkpoint();
    let (cluster, reference) = two_replicas_each(model.path()).await;
    let uri = cluster.router_uri();

    // Every replica in turn: SIGTERM (it drains and exits), the launcher
    // restarts it, and the next goes only once the router uses it again.
    let restarting = AtomicBool::new(true);
    let rolling = async {
        let mut back_after = Vec::new();
        for slot in &cluster.experts {
            let restarts = slot.restarts();
            let terminated_at = Instant::now();
            assert!(slot.terminate(), "{} was running", slot.name);
            within("the replica restarts", slot.wait_restarted(restarts))
                .await
                .expect("the launcher restarts it");
            until_ready_in_router(&uri, &slot.uri()).await;
            back_after.push(terminated_at.elapsed());
        }
        restarting.store(false, Ordering::Relaxed);
        back_after
    };
    // Requests keep coming for as long as the restart takes.
    let load = async {
        let mut rounds = 0;
        while restarting.load(Ordering::Relaxed) || rounds == 0 {
            assert_unchanged(
                &format!("round {rounds} of the rolling restart"),
                run_all(&uri).await,
                &reference,
            );
            rounds += 1;
        }
        rounds
    };
    let (mut back_after, rounds) = tokio::join!(rolling, load);
    back_after.sort();
    eprintln!(
        "rolling restart: {} replicas, {rounds} rounds of {REQUESTS} requests, 0 failed; a replica took work again {:?} after SIGTERM (median), {:?} (max)",
        back_after.len(),
        back_after[back_after.len() / 2],
        back_after.last().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_replaced_by_another_checkpoint_is_refused_and_never_answers() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let model = moe_e2e::tiny_checkpoint();
    let cluster = start_with(model.path(), |options| {
        options.replicas = vec![ReplicaCount::Expert {
            expert: 5,
            replicas: 2,
        }];
        options.restart_experts = false;
    })
    .await;
    let uri = cluster.router_uri();
    let reference = generate(&uri, request(0))
        .await
        .expect("the healthy cluster answers");

    // Expert 5's first replica dies; a process of another checkpoint takes
    // its address.
    let other = tempfile::tempdir().unwrap();
    moe_model::synth::write_checkpoint(other.path(), moe_model::synth::Preset::Tiny, 7).unwrap();
    let victim = cluster
        .experts
        .iter()
        .find(|slot| slot.expert == 5 && slot.replica == 0)
        .unwrap();
    assert!(victim.kill());
    victim.wait_exited().await;
    let options = moe_e2e::quiet_options(other.path());
    let impostor = moe::launcher::start_expert(&options, 5, None, &victim.addr)
        .await
        .expect("the other checkpoint's expert starts on the same address");

    within("the router refuses it", async {
        while stats(&uri).await.replicas_refused == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(
        state_in_router(&uri, &victim.uri()).await.as_deref(),
        Some("refused")
    );
    for _ in 0..2 {
        let completion = generate(&uri, request(0))
            .await
            .expect("the other replica serves");
        assert_same_completion("with an impostor", &completion, &reference, TOLERANCE);
    }
    assert_eq!(
        describe(&impostor.uri()).await.rows_served,
        0,
        "the impostor answered a message"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_reroute_an_expert_without_replicas_costs_quality_not_requests() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let model = moe_e2e::tiny_checkpoint();
    let cluster = start_with(model.path(), |options| {
        options.restart_experts = false;
        options.router_args = ["--on-expert-down=reroute", "--no-replica-wait=500ms"]
            .map(String::from)
            .to_vec();
    })
    .await;
    let uri = cluster.router_uri();
    let full = generate(&uri, greedy(&[3, 4, 5], 16))
        .await
        .expect("the healthy cluster answers");
    assert!(full.missing_experts.is_empty(), "{full:?}");

    assert!(cluster.experts[3].kill());
    cluster.experts[3].wait_exited().await;
    HealthWatch::open(&uri)
        .await
        .until(ServingStatus::NotServing)
        .await;
    let runs = futures::future::join_all((0..4).map(|index| generate(&uri, request(index)))).await;
    for run in runs {
        let completion = run.expect("rerouted rather than failed");
        assert_eq!(completion.token_ids.len(), TOKENS as usize);
        assert_eq!(
            completion.missing_experts,
            vec![3],
            "flagged degraded, naming expert 3"
        );
    }
    assert!(stats(&uri).await.rerouted_rows > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_hangs_costs_a_pause_not_a_request() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let model = moe_e2e::tiny_checkpoint();
    let cluster = start_with(model.path(), |options| {
        options.replicas = vec![ReplicaCount::Expert {
            expert: 0,
            replicas: 2,
        }];
    })
    .await;
    let uri = cluster.router_uri();
    let request = || greedy(&[21, 22, 23], 32);
    let reference = generate(&uri, request())
        .await
        .expect("the healthy cluster answers");
    let before = stats(&uri).await.expert_resends;

    // One of expert 0's replicas stops answering (SIGSTOP) and keeps its
    // connection: what it holds is hedged on its twin after a second.
    let hung = cluster
        .experts
        .iter()
        .find(|slot| slot.expert == 0 && slot.replica == 0)
        .unwrap();
    assert!(hung.freeze());
    let completions = futures::future::join_all((0..4).map(|_| generate(&uri, request()))).await;
    hung.resume();
    for completion in completions {
        let completion = completion.expect("a hung replica fails nothing");
        assert_same_completion("beside a hung replica", &completion, &reference, TOLERANCE);
    }
    assert!(
        stats(&uri).await.expert_resends > before,
        "nothing was hedged, yet one replica of expert 0 hung"
    );
}
