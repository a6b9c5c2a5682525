//! A malformed tensor from a peer is refused with INVALID_ARGUMENT naming
//! what is wrong, on the same stream, and the expert keeps serving: the
//! stream's other messages and new streams are served.

use moe_e2e::{start_expert, tiny_checkpoint};
use moe_proto::v1::expert_result::Result as Outcome;
use moe_proto::v1::{DType, DescribeRequest, ExpertBatch, ExpertResult, Tensor};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

/// Width of the tiny checkpoint's hidden states.
const HIDDEN: usize = 64;

fn f32_tensor(rows: usize, width: usize) -> Tensor {
    let values: Vec<f32> = (0..rows * width).map(|i| (i % 7) as f32 * 0.1).collect();
    Tensor {
        dtype: DType::DtypeF32 as i32,
        shape: vec![rows as u64, width as u64],
        data: values
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>()
            .into(),
    }
}

fn batch(request_id: u64, layer: u32, hidden: Tensor) -> ExpertBatch {
    ExpertBatch {
        request_id,
        layer,
        hidden: Some(hidden),
        ..Default::default()
    }
}

/// Sends `message` on a fresh stream, then a valid one on the same stream,
/// and returns both results.
async fn send_then_valid(channel: Channel, message: ExpertBatch) -> (ExpertResult, ExpertResult) {
    let (sender, receiver) = mpsc::channel(4);
    let mut results = moe_proto::transport::expert_client(channel)
        .forward(ReceiverStream::new(receiver))
        .await
        .expect("stream opens")
        .into_inner();
    sender.send(message).await.unwrap();
    let first = results
        .message()
        .await
        .expect("stream alive")
        .expect("a result");
    sender
        .send(batch(99, 1, f32_tensor(3, HIDDEN)))
        .await
        .unwrap();
    let second = results
        .message()
        .await
        .expect("stream still alive")
        .expect("a result");
    (first, second)
}

fn refusal(result: &ExpertResult) -> (Code, String) {
    match &result.result {
        Some(Outcome::Error(status)) => (Code::from_i32(status.code), status.message.clone()),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn assert_refused(message: ExpertBatch, expected: &str) {
    let model = tiny_checkpoint();
    let expert = start_expert(model.path(), 2, "0..2").await;
    let channel = moe_proto::transport::connect(&expert.uri()).await.unwrap();
    let request_id = message.request_id;
    let (first, second) = send_then_valid(channel.clone(), message).await;
    assert_eq!(first.request_id, request_id);
    let (code, text) = refusal(&first);
    assert_eq!(code, Code::InvalidArgument, "{text}");
    assert!(
        text.contains(expected),
        "{text:?} does not mention {expected:?}"
    );

    // The same stream serves the next message...
    assert_eq!(second.request_id, 99);
    match second.result {
        Some(Outcome::Output(output)) => assert_eq!(output.shape, vec![3, HIDDEN as u64]),
        other => panic!("expected an output, got {other:?}"),
    }
    // ...and the process still serves new calls.
    let described = moe_proto::transport::expert_client(channel)
        .describe(DescribeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described.expert, 2);
    assert_eq!(described.rows_served, 3);
}

#[tokio::test]
async fn wrong_byte_length() {
    let mut tensor = f32_tensor(2, HIDDEN);
    tensor.data = tensor.data.slice(..tensor.data.len() - 3);
    assert_refused(batch(1, 0, tensor), "needs 512 bytes, got 509").await;
}

#[tokio::test]
async fn wrong_width() {
    assert_refused(batch(2, 0, f32_tensor(2, HIDDEN + 1)), "must be [rows, 64]").await;
}

#[tokio::test]
async fn unknown_layer() {
    assert_refused(
        batch(3, 7, f32_tensor(1, HIDDEN)),
        "layer 7 is not served here",
    )
    .await;
}

#[tokio::test]
async fn unknown_dtype() {
    let mut tensor = f32_tensor(1, HIDDEN);
    tensor.dtype = 17;
    assert_refused(batch(4, 0, tensor), "dtype 17").await;
}

#[tokio::test]
async fn missing_tensor() {
    let message = ExpertBatch {
        request_id: 5,
        layer: 0,
        hidden: None,
        ..Default::default()
    };
    assert_refused(message, "tensor is missing").await;
}
