//! Messages that wait for the expert while it computes are stacked into one
//! forward pass per layer, and each caller still gets exactly its own rows
//! back, equal to what it gets when its message runs alone; with the fast
//! kernels and with the generic ones.

use moe_e2e::{start_expert_with, tiny_checkpoint};
use moe_model::Kernels;
use moe_proto::transport;
use moe_proto::v1::expert_result::Result as Outcome;
use moe_proto::v1::{DType, DescribeRequest, DescribeResponse, ExpertBatch, Tensor};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Width of the tiny checkpoint's hidden states.
const HIDDEN: usize = 64;
/// Rows of the message that keeps the expert busy while the others arrive
/// (the most an expert takes in one message, by default: `--max-rows`).
const BUSY_ROWS: usize = 8_192;
const SMALL_MESSAGES: usize = 8;

/// `rows` rows whose values depend on `seed`, so that results that came
/// back to the wrong caller would not match.
fn rows(rows: usize, seed: usize) -> Tensor {
    let data: Vec<u8> = (0..rows * HIDDEN)
        .flat_map(|i| ((((i + seed * 31) % 17) as f32 - 8.0) * 0.05).to_le_bytes())
        .collect();
    Tensor {
        dtype: DType::DtypeF32 as i32,
        shape: vec![rows as u64, HIDDEN as u64],
        data: data.into(),
    }
}

/// Sends `messages` on one stream back to back and returns the results'
/// bytes by request id (1, 2, ...).
async fn forward_all(channel: &Channel, messages: Vec<(u32, Tensor)>) -> Vec<Vec<u8>> {
    let count = messages.len();
    let (sender, receiver) = mpsc::channel(count);
    let mut results = transport::expert_client(channel.clone())
        .forward(ReceiverStream::new(receiver))
        .await
        .expect("stream opens")
        .into_inner();
    for (index, (layer, hidden)) in messages.into_iter().enumerate() {
        let batch = ExpertBatch {
            request_id: index as u64 + 1,
            layer,
            hidden: Some(hidden),
            ..Default::default()
        };
        sender.send(batch).await.unwrap();
    }
    let mut by_id = vec![Vec::new(); count];
    for _ in 0..count {
        let result = results.message().await.unwrap().expect("a result");
        match result.result {
            Some(Outcome::Output(tensor)) => {
                by_id[result.request_id as usize - 1] = tensor.data.to_vec()
            }
            other => panic!("request {} refused: {other:?}", result.request_id),
        }
    }
    by_id
}

async fn describe(channel: &Channel) -> DescribeResponse {
    transport::expert_client(channel.clone())
        .describe(DescribeRequest {})
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn waiting_messages_share_one_forward_pass_and_keep_their_own_rows() {
    stack_messages(Kernels::Fast).await;
}

#[tokio::test]
async fn waiting_messages_share_one_forward_pass_and_keep_their_own_rows_generic_kernels() {
    stack_messages(Kernels::Generic).await;
}

async fn stack_messages(kernels: Kernels) {
    let model = tiny_checkpoint();
    let expert = start_expert_with(model.path(), 5, "0..2", |o| o.kernels = kernels).await;
    let channel = moe_proto::transport::connect(&expert.uri()).await.unwrap();

    // Each small message alone: the reference results.
    let mut alone = Vec::new();
    for seed in 0..SMALL_MESSAGES {
        alone.extend(forward_all(&channel, vec![(1, rows(1 + seed % 3, seed))]).await);
    }
    let before = describe(&channel).await;
    assert_eq!(before.forward_passes, SMALL_MESSAGES as u64);

    // A large pass for layer 0, then the small ones for layer 1 while it
    // runs.
    let mut messages = vec![(0, rows(BUSY_ROWS, 99))];
    messages.extend((0..SMALL_MESSAGES).map(|seed| (1, rows(1 + seed % 3, seed))));
    let results = forward_all(&channel, messages).await;
    assert_eq!(results[0].len(), BUSY_ROWS * HIDDEN * 4);
    for (seed, (stacked, reference)) in results[1..].iter().zip(&alone).enumerate() {
        assert_eq!(stacked, reference, "small message {seed}");
    }

    let after = describe(&channel).await;
    let passes = after.forward_passes - before.forward_passes;
    let messages = 1 + SMALL_MESSAGES as u64;
    // Two passes (the large one, then the small ones stacked), or three
    // if some small ones were already queued when the large one started:
    // those share a pass, and the rest share the next.
    assert!(passes <= 3, "{messages} messages took {passes} passes");
    let small_rows: u64 = (0..SMALL_MESSAGES).map(|seed| 1 + seed as u64 % 3).sum();
    assert_eq!(
        after.rows_served - before.rows_served,
        BUSY_ROWS as u64 + small_rows
    );
}
