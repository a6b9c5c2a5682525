//! Several replicas of one expert: the router spreads an expert's messages
//! over them by load (power of two choices over latency × in-flight rows),
//! so a replica that answers slowly gets fewer rows than its twin, and
//! nothing changes in what is generated.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use moe::launcher::Process;
use moe_e2e::{describe, generate, greedy, start_expert, start_router, tiny_checkpoint, within};

/// Two replicas of expert 0 and one process for each other expert, and a
/// router over all of them.
async fn twins_of_expert_0(model: &std::path::Path) -> ([Process; 2], Vec<Process>, Process) {
    let twins = [
        start_expert(model, 0, "0..4").await,
        start_expert(model, 0, "0..4").await,
    ];
    let mut args = Vec::new();
    for twin in &twins {
        args.extend(["--expert".to_owned(), format!("0={}", twin.uri())]);
    }
    let mut others = Vec::new();
    for expert in 1..16 {
        let process = start_expert(model, expert, "0..4").await;
        args.extend(["--expert".to_owned(), format!("{expert}={}", process.uri())]);
        others.push(process);
    }
    let router = start_router(model, &args).await;
    (twins, others, router)
}

async fn rows_served(process: &Process) -> u64 {
    describe(&process.uri()).await.rows_served
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_answers_slowly_gets_fewer_rows_and_nothing_fails() {
    let model = tiny_checkpoint();
    let (twins, _others, router) = twins_of_expert_0(model.path()).await;
    let uri = router.uri();
    let request = || greedy(&[11, 12, 13, 14], 300);

    // Both healthy: the run is the reference. Which twin took more of it
    // depends on the first calls' latencies (opening a stream costs more);
    // that one is made slow, so that the test sees the share move.
    let reference = within("the fault-free run", generate(&uri, request()))
        .await
        .expect("the fault-free run completes");
    let before = [rows_served(&twins[0]).await, rows_served(&twins[1]).await];
    let (slow_index, fast_index) = if before[0] >= before[1] {
        (0, 1)
    } else {
        (1, 0)
    };

    // The busier twin stalls again and again (SIGSTOP, SIGCONT) while the
    // same request runs: a message sent to it waits until it resumes.
    let running = Arc::new(AtomicBool::new(true));
    let slow = &twins[slow_index];
    let stutter = async {
        while running.load(Ordering::Relaxed) {
            slow.freeze();
            tokio::time::sleep(Duration::from_millis(30)).await;
            slow.resume();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    };
    let run = async {
        let completion = generate(&uri, request()).await;
        running.store(false, Ordering::Relaxed);
        completion
    };
    let (completion, ()) = within("the run with a slow twin", async {
        tokio::join!(run, stutter)
    })
    .await;
    slow.resume();
    let completion = completion.expect("a slow replica fails nothing");
    assert_eq!(completion.token_ids, reference.token_ids);

    let slow_rows = rows_served(&twins[slow_index]).await - before[slow_index];
    let fast_rows = rows_served(&twins[fast_index]).await - before[fast_index];
    assert!(
        slow_rows * 4 < fast_rows,
        "the slow twin served {slow_rows} rows (before: {before:?}), its twin {fast_rows}"
    );
}

/// `moe up --replicas 0=2`: the launcher starts two processes for expert 0
/// and the router sends expert 0's rows to them and to nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_launcher_starts_replicas_and_the_router_uses_them() {
    let model = tiny_checkpoint();
    let options = moe::launcher::ClusterOptions {
        replicas: vec!["0=2".parse().unwrap()],
        ..moe_e2e::quiet_options(model.path())
    };
    let cluster = within(
        "the cluster starts",
        moe::launcher::Cluster::start(&options),
    )
    .await
    .expect("cluster starts");
    assert_eq!(cluster.experts.len(), 17, "16 experts, expert 0 twice");
    let uri = cluster.router_uri();
    for prompt in [[1u32, 2, 3], [7, 8, 9], [20, 21, 22]] {
        within("a generation", generate(&uri, greedy(&prompt, 40)))
            .await
            .expect("generates");
    }
    let mut served_for_0 = 0;
    for process in &cluster.experts {
        let described = describe(&process.uri()).await;
        if described.expert == 0 {
            served_for_0 += described.rows_served;
        }
    }
    let routed_to_0 = moe_e2e::stats(&uri).await.rows_by_expert[0];
    assert!(routed_to_0 > 0);
    assert_eq!(
        served_for_0, routed_to_0,
        "expert 0's rows went to its replicas"
    );
    let names: Vec<&str> = cluster.experts.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(&names[..2], ["expert-svc 0", "expert-svc 0 (replica 1)"]);
}
