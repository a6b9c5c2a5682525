//! Replicas join and leave while the router runs: those a cluster file
//! lists (re-read when it changes), and those a DNS name resolves to
//! (resolved again every `--resolve-interval`). A new one takes rows once
//! checked; a removed one takes no new rows; nothing fails meanwhile.

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use moe::launcher::Process;
use moe_e2e::dns::TestDns;
use moe_e2e::{
    describe, generate, greedy, start_expert, start_router, stats, tiny_checkpoint, within,
};
use moe_proto::ListenAddr;

const LAYERS: &str = "0..4";

/// One process for each expert but expert 0.
async fn experts_but_the_first(model: &Path) -> Vec<Process> {
    let mut experts = Vec::new();
    for expert in 1..16 {
        experts.push(start_expert(model, expert, LAYERS).await);
    }
    experts
}

fn cluster_file(path: &Path, endpoints: &[(usize, String)]) {
    let entries: Vec<serde_json::Value> = endpoints
        .iter()
        .map(|(expert, uri)| serde_json::json!({"expert": expert, "endpoint": uri}))
        .collect();
    // Written whole and renamed into place, as a supervisor would.
    let staging = path.with_extension("new");
    std::fs::write(
        &staging,
        serde_json::json!({ "experts": entries }).to_string(),
    )
    .unwrap();
    std::fs::rename(staging, path).unwrap();
}

/// Generates until `replica` has served a row; how long that took.
async fn until_it_serves(router: &str, replica: &str) -> Duration {
    let started = Instant::now();
    within("the new replica serves rows", async {
        while describe(replica).await.rows_served == 0 {
            generate(router, greedy(&[7, 8, 9], 8))
                .await
                .expect("nothing fails");
        }
    })
    .await;
    started.elapsed()
}

/// Waits until the router no longer lists `replica`, then checks that
/// requests succeed and it serves no new rows.
async fn assert_left(router: &str, replica: &str) {
    within("the router drops the replica", async {
        while stats(router)
            .await
            .replicas
            .iter()
            .any(|r| r.endpoint == replica)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let served = describe(replica).await.rows_served;
    for _ in 0..3 {
        generate(router, greedy(&[1, 2, 3], 8))
            .await
            .expect("nothing fails");
    }
    assert_eq!(
        describe(replica).await.rows_served,
        served,
        "a removed replica got rows"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_added_to_and_removed_from_the_cluster_file_join_and_leave() {
    let model = tiny_checkpoint();
    let first = start_expert(model.path(), 0, LAYERS).await;
    let others = experts_but_the_first(model.path()).await;
    let mut endpoints: Vec<(usize, String)> = vec![(0, first.uri())];
    endpoints.extend(
        others
            .iter()
            .enumerate()
            .map(|(index, p)| (index + 1, p.uri())),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cluster.json");
    cluster_file(&path, &endpoints);
    let router = start_router(
        model.path(),
        &["--cluster".into(), path.display().to_string()],
    )
    .await;
    let uri = router.uri();
    generate(&uri, greedy(&[1, 2], 4))
        .await
        .expect("the cluster serves");

    let second = start_expert(model.path(), 0, LAYERS).await;
    endpoints.push((0, second.uri()));
    cluster_file(&path, &endpoints);
    let took = until_it_serves(&uri, &second.uri()).await;
    eprintln!("a replica added to the cluster file served rows {took:?} after the file changed");
    assert!(took < Duration::from_secs(2), "took {took:?}");

    endpoints.retain(|(_, endpoint)| *endpoint != first.uri());
    cluster_file(&path, &endpoints);
    assert_left(&uri, &first.uri()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_follow_the_addresses_a_dns_name_resolves_to() {
    let model = tiny_checkpoint();
    let dns = TestDns::start().await;
    // Two replicas of expert 0 on the same port of two loopback addresses,
    // as two pods behind one headless Service.
    let first = start_expert(model.path(), 0, LAYERS).await;
    let ListenAddr::Tcp(first_addr) = first.addr else {
        panic!("a TCP expert")
    };
    let port = first_addr.port();
    let second_addr: ListenAddr = format!("127.0.0.2:{port}").parse().unwrap();
    let second = moe::launcher::start_expert(
        &moe_e2e::quiet_options(model.path()),
        0,
        Some(LAYERS),
        &second_addr,
    )
    .await
    .expect("a second replica on 127.0.0.2");
    let others = experts_but_the_first(model.path()).await;

    let name = "expert-0.moe.test.";
    let address = |text: &str| text.parse::<IpAddr>().unwrap();
    dns.set(name, vec![address("127.0.0.1")]);
    let mut args = vec![
        "--expert".to_owned(),
        format!("0=dns:///{name}:{port}"),
        "--dns-server".into(),
        dns.addr().to_string(),
        "--resolve-interval".into(),
        "200ms".into(),
    ];
    for (index, process) in others.iter().enumerate() {
        args.extend([
            "--expert".to_owned(),
            format!("{}={}", index + 1, process.uri()),
        ]);
    }
    let router = start_router(model.path(), &args).await;
    let uri = router.uri();
    generate(&uri, greedy(&[1, 2], 4))
        .await
        .expect("the cluster serves");
    assert_eq!(
        describe(&second.uri()).await.rows_served,
        0,
        "not resolved yet"
    );

    dns.set(name, vec![address("127.0.0.1"), address("127.0.0.2")]);
    let took = until_it_serves(&uri, &second.uri()).await;
    eprintln!("a replica added to the DNS name served rows {took:?} after the record changed");

    dns.set(name, vec![address("127.0.0.2")]);
    assert_left(&uri, &first.uri()).await;
}
