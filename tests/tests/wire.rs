//! What crosses the wire between router and experts, from the router's
//! Stats counters: one message per expert that received rows, per layer
//! and micro-batch, and nothing but the rows' values besides a small
//! per-message frame, both ways, in the wire dtype asked for.

use moe_e2e::{greedy, quiet_options, tiny_checkpoint};
use moe_proto::v1::{StatsRequest, StatsResponse};

async fn stats(uri: &str) -> StatsResponse {
    let mut client = moe_e2e::client::connect(uri).await.unwrap();
    client.stats(StatsRequest {}).await.unwrap().into_inner()
}

async fn check_traffic(wire_dtype: &str, element_bytes: u64) {
    let dir = tiny_checkpoint();
    let mut options = quiet_options(dir.path());
    options.router_args = vec![format!("--wire-dtype={wire_dtype}")];
    let cluster = moe::launcher::Cluster::start(&options).await.unwrap();
    let uri = cluster.router_uri();
    let before = stats(&uri).await;
    let prompts: Vec<Vec<u32>> = (0..4u32)
        .map(|i| (0..9 + 5 * i).map(|t| 3 + t * 7 % 500).collect())
        .collect();
    let requests = prompts
        .iter()
        .map(|prompt| moe_e2e::generate(&uri, greedy(prompt, 6)));
    for completion in futures::future::join_all(requests).await {
        assert_eq!(completion.unwrap().token_ids.len(), 6);
    }
    let after = stats(&uri).await;
    let delta = |f: fn(&StatsResponse) -> u64| f(&after) - f(&before);
    assert_eq!(after.wire_dtype.as_deref(), Some(wire_dtype));
    let (layers, hidden, top_k) = (4, 64, 2);
    // Every token of every step goes to top_k experts at every layer.
    assert_eq!(
        delta(|s| s.expert_rows),
        delta(|s| s.step_tokens) * layers * top_k
    );
    assert_eq!(delta(|s| s.expert_messages), delta(|s| s.experts_hit));
    let payload = delta(|s| s.expert_rows) * hidden * element_bytes;
    let messages = delta(|s| s.expert_messages);
    for (direction, bytes) in [
        ("sent", delta(|s| s.wire_bytes_sent)),
        ("received", delta(|s| s.wire_bytes_received)),
    ] {
        // The rows' values, plus at most 48 bytes of framing per message
        // (ids, layer, dtype, shape, protobuf tags, gRPC prefix).
        assert!(bytes >= payload, "{direction}: {bytes} < {payload}");
        assert!(
            bytes <= payload + 48 * messages,
            "{direction}: {bytes} for {payload} in {messages} messages"
        );
    }
    cluster.shutdown(std::time::Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f32_traffic_is_the_rows_and_one_message_per_expert() {
    check_traffic("f32", 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_on_the_wire_halves_the_payload() {
    check_traffic("bf16", 2).await;
}
