//! A client's deadline (`grpc-timeout`) holds for the whole Generate
//! stream: the router ends the request with DEADLINE_EXCEEDED when it
//! passes, and frees its sequence and KV cache.

use std::time::{Duration, Instant};

use moe_e2e::{collect, greedy, start, stats, tiny_checkpoint, within};
use moe_proto::ExpertMode;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passed_deadline_ends_the_stream_and_frees_the_sequence() {
    let model = tiny_checkpoint();
    let cluster = start(model.path(), ExpertMode::Distributed).await;
    let uri = cluster.router_uri();
    let mut client = moe_e2e::client::connect(&uri).await.unwrap();

    // 1000 tokens take the tiny cluster well over a second.
    let mut request = tonic::Request::new(greedy(&[4, 5, 6], 1000));
    request.set_timeout(Duration::from_millis(200));
    let sent = Instant::now();
    let stream = within("the request is admitted", client.generate(request))
        .await
        .expect("admitted")
        .into_inner();
    within("the sequence runs", async {
        while stats(&uri).await.running_sequences != 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let status = collect(stream)
        .await
        .expect_err("the deadline passes before 1000 tokens");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("deadline passed after"),
        "the router, not the client library, ended it: {status:?}"
    );
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "ended after {:?}",
        sent.elapsed()
    );

    // The sequence is freed: nothing runs any more, long before the 1001
    // steps that generating every token would take.
    let freed = within("the sequence is freed", async {
        loop {
            let now = stats(&uri).await;
            if now.running_sequences == 0 {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        freed.steps < 1000,
        "{} steps: the sequence ran on",
        freed.steps
    );

    // Counted once, as what it was: an error with its code.
    let http = cluster.router_http().expect("the router serves HTTP");
    let (_, metrics) = moe_e2e::http::get(http, "/metrics").await.unwrap();
    let requests: Vec<&str> = metrics
        .lines()
        .filter(|line| line.starts_with("moe_requests_total{") && !line.ends_with(" 0"))
        .collect();
    assert_eq!(
        requests,
        ["moe_requests_total{code=\"DEADLINE_EXCEEDED\",finish_reason=\"error\"} 1"]
    );
}
