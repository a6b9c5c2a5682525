//! The launcher heals its expert processes: one that is killed, or that
//! someone else terminates (a rolling restart), comes back on the same
//! address, over TCP or a Unix socket, and the cluster generates what it
//! generated before.

use moe::launcher::{Cluster, ExpertSlot, ExpertTransport};
use moe_e2e::{PATIENCE, describe, generate, greedy, start_with, tiny_checkpoint, within};
use tonic::Code;

/// Replaces `slot`'s process with `stop` (a kill or a SIGTERM) and checks
/// the replacement: same address, another pid, the same expert.
async fn replace(slot: &ExpertSlot, stop: fn(&ExpertSlot) -> bool) {
    let (uri, pid, restarts) = (slot.uri(), slot.pid(), slot.restarts());
    assert!(stop(slot), "{} was running", slot.name);
    let now = within("the replacement listens", slot.wait_restarted(restarts))
        .await
        .expect("restarted");
    assert_eq!(now, restarts + 1);
    assert_eq!(slot.uri(), uri);
    assert_ne!(slot.pid(), pid);
    assert_eq!(describe(&uri).await.expert, slot.expert as u32);
}

/// The reference generation again. A request may fail (UNAVAILABLE)
/// while the router's connection to a replaced process is itself being
/// replaced; the router says nothing else a test could wait on, so this
/// retries for at most [`PATIENCE`].
async fn generates_again(cluster: &Cluster, expected: &[u32]) {
    let uri = cluster.router_uri();
    let request = greedy(&[5, 6, 7], expected.len() as u32);
    within("the cluster generates again", async {
        loop {
            match generate(&uri, request.clone()).await {
                Ok(completion) => return assert_eq!(completion.token_ids, expected),
                Err(status) if status.code() == Code::Unavailable => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await
                }
                Err(status) => panic!("{status:?}"),
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_or_terminated_replica_comes_back_on_its_port() {
    let model = tiny_checkpoint();
    let cluster = start_with(model.path(), |options| {
        options.replicas = vec!["0=2".parse().unwrap()];
    })
    .await;
    let reference = generate(&cluster.router_uri(), greedy(&[5, 6, 7], 16))
        .await
        .expect("a healthy cluster generates");
    let twin = &cluster.experts[1];
    assert_eq!(
        (twin.name.as_str(), twin.expert, twin.replica),
        ("expert-svc 0 (replica 1)", 0, 1)
    );
    replace(twin, ExpertSlot::kill).await;
    replace(twin, ExpertSlot::terminate).await;
    let lone = &cluster.experts[5];
    assert_eq!((lone.expert, lone.replica), (4, 0));
    replace(lone, ExpertSlot::kill).await;
    generates_again(&cluster, &reference.token_ids).await;
    cluster.shutdown(PATIENCE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_expert_comes_back_on_its_unix_socket() {
    let model = tiny_checkpoint();
    let cluster = start_with(model.path(), |options| {
        options.expert_transport = ExpertTransport::Unix;
    })
    .await;
    let reference = generate(&cluster.router_uri(), greedy(&[5, 6, 7], 16))
        .await
        .expect("a healthy cluster generates");
    // The killed process leaves its socket file behind; the replacement
    // binds the same path regardless.
    replace(&cluster.experts[2], ExpertSlot::kill).await;
    generates_again(&cluster, &reference.token_ids).await;
}
