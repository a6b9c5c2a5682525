//! Process lifecycle: cancellation frees a sequence, readiness waits for
//! the right experts, SIGTERM drains.

use std::time::Duration;

use moe::launcher::ExpertTransport;
use moe_e2e::{
    HealthWatch, ServingStatus, collect, describe, generate, greedy, spawn_router, stalling_client,
    start_expert, start_with, start_with_router_args, tiny_checkpoint, within,
};
use moe_proto::ListenAddr;
use tonic::Code;

async fn rows_served(cluster: &moe::launcher::Cluster) -> u64 {
    let mut total = 0;
    for expert in &cluster.experts {
        total += describe(&expert.uri()).await.rows_served;
    }
    total
}

/// A client that goes away mid-generation frees its sequence: with room for
/// one running sequence, the next request runs, and once it is done the
/// experts compute nothing more (the abandoned sequence is gone, not
/// generating its remaining tokens for nobody).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_frees_its_sequence() {
    let model = tiny_checkpoint();
    let cluster = start_with_router_args(model.path(), &["--max-running=1"]).await;
    let uri = cluster.router_uri();

    let mut client = moe_e2e::client::connect(&uri).await.unwrap();
    let mut stream = client
        .generate(greedy(&[4, 5, 6], 1000))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..3 {
        stream.message().await.unwrap().expect("a token");
    }
    drop(stream);
    drop(client);

    let next = generate(&uri, greedy(&[7, 8], 5))
        .await
        .expect("the freed slot serves the next request");
    assert_eq!(next.token_ids.len(), 5);
    let after = rows_served(&cluster).await;
    // Had the abandoned sequence run to its end, its 1000 tokens alone would
    // have sent 4 layers × top-2 = 8 rows each to the experts.
    assert!(
        after < 8 * 1000,
        "{after} rows: the abandoned sequence ran on"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        rows_served(&cluster).await,
        after,
        "experts still busy for an abandoned sequence"
    );
}

/// The router is not ready until every expert answers with the router's own
/// checkpoint; until then requests get UNAVAILABLE naming what is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_refuses_an_expert_of_another_checkpoint() {
    let model = tiny_checkpoint();
    let other = tempfile::tempdir().unwrap();
    moe_model::synth::write_checkpoint(other.path(), moe_model::synth::Preset::Tiny, 1).unwrap();
    let impostor = start_expert(other.path(), 0, "0..4").await;

    let mut args = vec!["--expert".to_owned(), format!("0={}", impostor.uri())];
    // Experts 1..15 point at a port where nothing listens.
    for expert in 1..16 {
        args.extend([
            "--expert".to_owned(),
            format!("{expert}=http://127.0.0.1:9"),
        ]);
    }
    let router = spawn_router(model.path(), &args).await;
    let uri = router.uri();

    let mut message = String::new();
    for _ in 0..100 {
        let status = generate(&uri, greedy(&[1, 2], 2))
            .await
            .expect_err("not ready");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        message = status.message().to_owned();
        if message.contains("another checkpoint") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        message.contains(&format!("expert 0 at {}", impostor.uri())),
        "{message}"
    );
    assert!(message.contains("serves another checkpoint"), "{message}");
    assert!(
        message.contains("expert 5 at http://127.0.0.1:9"),
        "{message}"
    );
}

/// SIGTERM: the router stops taking requests but finishes the running one,
/// then exits cleanly; an expert drains and exits too, and removes its Unix
/// socket (the launcher's restarts are off, or it would bind it again).
///
/// The running request is read through a [`stalling_client`], so it cannot
/// finish before the test reads it: it is certainly still running when the
/// new request is refused. The router is known to have started draining
/// once its health (watched, not polled) says NOT_SERVING; it closes its
/// listener right after, so a new client's connection is refused or reset,
/// or, should one get through before, its request is refused as "shutting
/// down" (or cancelled by the server's GOAWAY).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_exits() {
    const MAX_TOKENS: usize = 300;
    let model = tiny_checkpoint();
    let mut cluster = start_with(model.path(), |options| {
        options.expert_transport = ExpertTransport::Unix;
        options.restart_experts = false;
    })
    .await;
    let uri = cluster.router_uri();
    let mut client = stalling_client(&uri).await;
    let mut stream = within(
        "the request is admitted",
        client.generate(greedy(&[4, 5, 6], MAX_TOKENS as u32)),
    )
    .await
    .unwrap()
    .into_inner();
    within("the first token", stream.message())
        .await
        .unwrap()
        .expect("first token");
    let mut health = HealthWatch::open(&uri).await;
    health.until(ServingStatus::Serving).await;

    cluster.router.terminate();
    health.until(ServingStatus::NotServing).await;
    // The watch would hold the drain open: a router waits for its streams.
    drop(health);
    match within("a new client", moe_e2e::client::connect(&uri)).await {
        Err(err) => assert!(
            connection_refused(&err),
            "a new client could not connect, but not because it was refused: {err:?}"
        ),
        Ok(mut late) => {
            let status = within(
                "the late request's reply",
                late.generate(greedy(&[1, 2], 3)),
            )
            .await
            .expect_err("a draining router takes no new request");
            match status.code() {
                Code::Unavailable => {
                    assert!(status.message().contains("shutting down"), "{status:?}")
                }
                // The server's GOAWAY raced the request.
                Code::Cancelled => {}
                _ => panic!("a draining router refused with {status:?}"),
            }
        }
    }

    let rest = collect(stream)
        .await
        .expect("the running request completes");
    assert_eq!(1 + rest.token_ids.len(), MAX_TOKENS);
    assert_eq!(rest.finish_reason, "length");
    let status = tokio::time::timeout(Duration::from_secs(20), cluster.router.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "router exit: {status}");

    let expert = &cluster.experts[0];
    let ListenAddr::Unix(socket) = expert.addr.clone() else {
        panic!("expert 0 listens on {}, not a Unix socket", expert.addr)
    };
    assert!(socket.exists(), "{} is missing", socket.display());
    assert!(expert.terminate(), "expert 0 was running");
    let status = tokio::time::timeout(Duration::from_secs(20), expert.wait_exited())
        .await
        .unwrap()
        .expect("expert 0's exit status");
    assert!(status.success(), "expert exit: {status}");
    assert!(!socket.exists(), "{} left behind", socket.display());
}

/// Whether connecting failed because nothing listens at the address.
/// Refused, or reset: a connection that reached the listen backlog just
/// before the listener closed.
fn connection_refused(err: &tonic::transport::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(error) = source {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset
            );
        }
        source = error.source();
    }
    false
}
