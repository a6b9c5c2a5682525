//! Slow and silent clients: one that opens many streams and never reads,
//! one that sends its request a byte at a time, and large prompts, do not
//! stop anyone else from being served.

use std::time::{Duration, Instant};

use moe_e2e::raw::{PREFACE, RawH2, authority, grpc_frame, h2_frame, trickle};
use moe_e2e::{client, generate, greedy, start_in, stats, tiny_checkpoint, within};
use moe_proto::ExpertMode;
use moe_proto::v1::{GenerateRequest, generate_request::Prompt};
use prost::Message;

/// One connection whose receive window never opens takes at most
/// --max-concurrent-streams streams, and each of its sequences gives its
/// running slot back after --stalled-client-timeout: a normal client is
/// served. (Before: 129 such streams held all 128 running slots forever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_does_not_hold_every_slot() {
    let model = tiny_checkpoint();
    let cluster = start_in(
        model.path(),
        ExpertMode::InProcess,
        &[
            "--max-running=4",
            "--max-concurrent-streams=8",
            "--stalled-client-timeout=2s",
        ],
    )
    .await;
    let uri = cluster.router_uri();
    let reference = generate(&uri, greedy(&[3, 4, 5], 6)).await.unwrap();

    let mut silent = RawH2::connect(authority(&uri), 0).await;
    let long = grpc_frame(&greedy(&[3, 4, 5], 500).encode_to_vec());
    let mut held = Vec::new();
    for _ in 0..8 {
        let (response, mut body) = silent
            .open("/moe.v1.Inference/Generate", "application/grpc")
            .await
            .expect("a stream within the limit opens");
        body.send_data(long.clone(), true).unwrap();
        held.push((response, body));
    }
    within("the silent streams take every running slot", async {
        while stats(&uri).await.running_sequences < 4 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    within(
        "the router's SETTINGS bound the connection's streams to 8",
        async {
            while silent.max_streams() != 8 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        },
    )
    .await;

    let started = Instant::now();
    let completion = generate(&uri, greedy(&[3, 4, 5], 6)).await.expect("served");
    assert_eq!(completion.token_ids, reference.token_ids);
    // Two rounds of four stalled sequences, 2 s each, and their steps.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "waited {:?}",
        started.elapsed()
    );
    drop(held);
    cluster.shutdown(Duration::from_secs(5)).await;
}

/// Connections that send the HTTP/2 preface and a request a byte at a time
/// hold nothing another client needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_by_byte_clients_do_not_stop_others() {
    let model = tiny_checkpoint();
    let cluster = start_in(model.path(), ExpertMode::InProcess, &[]).await;
    let uri = cluster.router_uri();
    let reference = generate(&uri, greedy(&[3, 4, 5], 6)).await.unwrap();
    let mut slow = PREFACE.to_vec();
    slow.extend(h2_frame(4, 0, 0, &[]));
    slow.extend(h2_frame(1, 4, 1, &[0x83, 0x86, 0x84, 0x41, 0x01, b'x']));
    let addr = authority(&uri).to_owned();
    let trickling: Vec<_> = (0..16)
        .map(|_| {
            let (addr, slow) = (addr.clone(), slow.clone());
            tokio::spawn(async move { trickle(&addr, &slow, Duration::from_millis(100)).await })
        })
        .collect();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = Instant::now();
        let completion = generate(&uri, greedy(&[3, 4, 5], 6)).await.expect("served");
        assert_eq!(completion.token_ids, reference.token_ids);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
    for task in trickling {
        task.abort();
    }
    cluster.shutdown(Duration::from_secs(5)).await;
}

/// Eight concurrent 3.9 MB prompts are refused from their length, before
/// tokenising, and a small request beside them is not delayed. (Before:
/// they took 9.4 s of the router's CPU first.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_prompts_do_not_delay_a_small_request() {
    let model = tiny_checkpoint();
    let cluster = start_in(model.path(), ExpertMode::InProcess, &[]).await;
    let uri = cluster.router_uri();
    let large = GenerateRequest {
        prompt: Some(Prompt::Text("hello ".repeat(650_000))),
        max_tokens: Some(4),
        ..Default::default()
    };
    let h2 = RawH2::connect(authority(&uri), 1 << 20).await;
    let body = grpc_frame(&large.encode_to_vec());
    let refusals = (0..8).map(|_| {
        let (mut h2, body) = (h2.clone(), body.clone());
        async move {
            h2.call("/moe.v1.Inference/Generate", "application/grpc", body)
                .await
        }
    });
    let started = Instant::now();
    let (refused, small) = tokio::join!(
        futures::future::join_all(refusals),
        generate(&uri, greedy(&[3, 4, 5], 5))
    );
    assert_eq!(small.expect("served").token_ids.len(), 5);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    for answer in refused {
        assert_eq!(
            answer.code,
            Some(tonic::Code::InvalidArgument),
            "{answer:?}"
        );
        assert!(answer.message.contains("prompt text is"), "{answer:?}");
    }
    cluster.shutdown(Duration::from_secs(5)).await;
}

/// A router holds at most --max-connections connections: one more waits to
/// be accepted until one of them closes, and those it holds are served
/// meanwhile. (Before: every connection was accepted, each with its
/// streams and buffers.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_wait_until_one_closes() {
    let model = tiny_checkpoint();
    let cluster = start_in(
        model.path(),
        ExpertMode::InProcess,
        &["--max-connections=2"],
    )
    .await;
    let uri = cluster.router_uri();
    let request = greedy(&[3, 4, 5], 4);
    let connect = async || {
        within("a connection within the cap", client::connect(&uri))
            .await
            .expect("connects")
    };
    let serve = async |connection: &mut client::Client| {
        within(
            "a request on a held connection",
            client::generate(connection, request.clone(), |_| {}),
        )
        .await
        .expect("served")
    };
    let mut first = connect().await;
    let reference = serve(&mut first).await;
    let mut second = connect().await;
    assert_eq!(serve(&mut second).await.token_ids, reference.token_ids);

    let third = tokio::spawn({
        let (uri, request) = (uri.clone(), request.clone());
        async move { generate(&uri, request).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !third.is_finished(),
        "a third connection was served while two were open"
    );
    assert_eq!(serve(&mut first).await.token_ids, reference.token_ids);

    drop(second);
    let third = within("the third connection is served once one closes", third)
        .await
        .expect("the task ran")
        .expect("served");
    assert_eq!(third.token_ids, reference.token_ids);
    cluster.shutdown(Duration::from_secs(5)).await;
}

/// At --max-connections, a connection merely held open is asked to go
/// after --max-connection-age (GOAWAY: an idle one closes at once), and a
/// client waiting to connect takes its place. (Without the age, a client
/// that opens the cap's worth of idle connections locks everyone out.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_held_open_makes_room_after_its_age() {
    let model = tiny_checkpoint();
    let cluster = start_in(
        model.path(),
        ExpertMode::InProcess,
        &["--max-connections=1", "--max-connection-age=1s"],
    )
    .await;
    let uri = cluster.router_uri();
    let request = greedy(&[3, 4, 5], 4);
    let reference = generate(&uri, request.clone()).await.expect("served");

    let mut idle = RawH2::connect(authority(&uri), 1 << 20).await;
    let answer = within(
        "the connection that will idle is served once",
        idle.call(
            "/moe.v1.Inference/Generate",
            "application/grpc",
            grpc_frame(&request.encode_to_vec()),
        ),
    )
    .await;
    assert!(!answer.is_error(), "{answer:?}");

    let completion = generate(&uri, request)
        .await
        .expect("served once the idle connection has gone");
    assert_eq!(completion.token_ids, reference.token_ids);
    drop(idle);
    cluster.shutdown(Duration::from_secs(5)).await;
}
