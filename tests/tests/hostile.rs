//! Garbage on the wire: random bytes, truncated and malformed HTTP/2
//! frames, truncated, undecodable and oversized protobuf messages, and
//! wrong content types, written to both services' ports. Each answers with
//! an error or closes that connection, and keeps serving everyone else: a
//! normal generation after each case gives the reference tokens, and the
//! expert keeps answering Describe and Forward.

use std::time::{Duration, Instant};

use bytes::Bytes;
use moe_e2e::raw::{PREFACE, RawH2, TcpOutcome, authority, grpc_frame, h2_frame, write_raw};
use moe_e2e::{describe, generate, greedy, start_expert, start_with, tiny_checkpoint, within};
use moe_proto::v1::{
    DType, ExpertBatch, GenerateRequest, Tensor, TokenIds, generate_request::Prompt,
};
use prost::Message;
use rand::{Rng, SeedableRng};
use tonic::Code;

const GENERATE: &str = "/moe.v1.Inference/Generate";
const FORWARD: &str = "/moe.v1.Expert/Forward";
const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";
const GRPC: &str = "application/grpc";
/// How long a server may take to refuse or close.
const PROMPTLY: Duration = Duration::from_secs(5);

/// What a raw TCP peer sends: random bytes, and HTTP/2 that breaks off or
/// breaks the protocol.
fn tcp_cases() -> Vec<(&'static str, Vec<u8>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(15);
    let random: Vec<u8> = (0..4096).map(|_| rng.random()).collect();
    let settings = h2_frame(4, 0, 0, &[]);
    let with_preface = |frames: &[Vec<u8>]| {
        let mut bytes = PREFACE.to_vec();
        for frame in frames {
            bytes.extend(frame);
        }
        bytes
    };
    let mut truncated_settings = with_preface(&[]);
    truncated_settings.extend(&settings[..5]);
    let mut oversized_frame = with_preface(std::slice::from_ref(&settings));
    oversized_frame.extend([0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 1]);
    vec![
        ("random bytes", random),
        (
            "HTTP/1.1",
            b"POST /moe.v1.Inference/Generate HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        ("a truncated preface", PREFACE[..10].to_vec()),
        ("a truncated SETTINGS frame", truncated_settings),
        ("a frame over the size limit", oversized_frame),
        (
            "HEADERS with a garbage header block",
            with_preface(&[settings.clone(), h2_frame(1, 4, 1, &[0xff; 24])]),
        ),
        (
            "DATA on stream 0",
            with_preface(&[settings.clone(), h2_frame(0, 1, 0, b"hello")]),
        ),
        (
            "a truncated HEADERS frame",
            with_preface(&[settings, h2_frame(1, 4, 1, &[0x82, 0x86])[..11].to_vec()]),
        ),
    ]
}

async fn write_tcp_cases(addr: &str, after_each: impl AsyncFn(&str)) {
    for (case, bytes) in tcp_cases() {
        let outcome = write_raw(addr, &bytes, PROMPTLY).await;
        assert!(
            matches!(outcome, TcpOutcome::AnsweredAndClosed | TcpOutcome::Closed),
            "{case}"
        );
        after_each(case).await;
    }
}

/// A case for the router: its name, the path and content-type it goes
/// to, its body, and the code and words the refusal must carry.
type RouterCase = (
    &'static str,
    &'static str,
    &'static str,
    Bytes,
    Option<(Code, &'static str)>,
);

fn token_request(ids: Vec<u32>) -> GenerateRequest {
    GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds { ids })),
        max_tokens: Some(4),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_refuses_garbage_and_keeps_serving() {
    let model = tiny_checkpoint();
    let cluster = start_with(model.path(), |_| {}).await;
    let uri = cluster.router_uri();
    let addr = authority(&uri).to_owned();
    let reference = generate(&uri, greedy(&[3, 4, 5], 8)).await.unwrap();
    let serves = async |case: &str| {
        let completion = generate(&uri, greedy(&[3, 4, 5], 8))
            .await
            .unwrap_or_else(|status| panic!("after {case}: {status}"));
        assert_eq!(completion.token_ids, reference.token_ids, "after {case}");
    };
    write_tcp_cases(&addr, serves).await;

    let mut h2 = RawH2::connect(&addr, 1 << 20).await;
    let valid = grpc_frame(&greedy(&[3, 4, 5], 2).encode_to_vec());
    // Field 1 (text) and field 8 (a stop string) holding invalid UTF-8.
    let bad_text = grpc_frame(&[0x0a, 2, 0xff, 0xfe]);
    let mut bad_stop = token_request(vec![3]).encode_to_vec();
    bad_stop.extend([0x42, 2, 0xc3, 0x28]);
    let mut truncated = grpc_frame(&valid[5..]).to_vec();
    truncated[1..5].copy_from_slice(&100u32.to_be_bytes());
    let mut compressed = valid.to_vec();
    compressed[0] = 1;
    let cases: Vec<RouterCase> = vec![
        ("text/plain", GENERATE, "text/plain", valid.clone(), None),
        (
            "JSON",
            GENERATE,
            "application/json",
            Bytes::from_static(b"{}"),
            None,
        ),
        (
            "an unknown method",
            "/moe.v1.Inference/Nope",
            GRPC,
            valid.clone(),
            Some((Code::Unimplemented, "")),
        ),
        (
            "the expert's API",
            FORWARD,
            GRPC,
            valid.clone(),
            Some((Code::Unimplemented, "")),
        ),
        (
            "invalid UTF-8 text",
            GENERATE,
            GRPC,
            bad_text,
            Some((Code::InvalidArgument, "UTF-8")),
        ),
        (
            "invalid UTF-8 stop",
            GENERATE,
            GRPC,
            grpc_frame(&bad_stop),
            Some((Code::InvalidArgument, "UTF-8")),
        ),
        (
            "undecodable protobuf",
            GENERATE,
            GRPC,
            grpc_frame(&[0xff; 16]),
            Some((Code::InvalidArgument, "not a valid message")),
        ),
        (
            "a truncated message",
            GENERATE,
            GRPC,
            Bytes::from(truncated),
            Some((Code::InvalidArgument, "not a valid message")),
        ),
        (
            "an undecodable health check",
            HEALTH_CHECK,
            GRPC,
            grpc_frame(&[0xff; 16]),
            Some((Code::InvalidArgument, "not a valid message")),
        ),
        (
            "the compressed flag",
            GENERATE,
            GRPC,
            Bytes::from(compressed),
            Some((Code::InvalidArgument, "compressed")),
        ),
        (
            "a 128 MB length prefix",
            GENERATE,
            GRPC,
            Bytes::from([&[0u8][..], &(128u32 << 20).to_be_bytes()].concat()),
            Some((Code::ResourceExhausted, "--max-request-bytes")),
        ),
        (
            "5 MiB of token ids",
            GENERATE,
            GRPC,
            grpc_frame(&token_request(vec![1; 5 << 20]).encode_to_vec()),
            Some((Code::ResourceExhausted, "--max-request-bytes")),
        ),
        (
            "a 3.9 MB text prompt",
            GENERATE,
            GRPC,
            grpc_frame(
                &GenerateRequest {
                    prompt: Some(Prompt::Text("hello ".repeat(650_000))),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
            Some((
                Code::InvalidArgument,
                "prompt text is 3900000 bytes; at most 16384",
            )),
        ),
    ];
    for (case, path, content_type, body, expected) in cases {
        let started = Instant::now();
        let answer = within(case, h2.call(path, content_type, body)).await;
        assert!(answer.is_error(), "{case}: {answer:?}");
        if let Some((code, says)) = expected {
            assert_eq!(answer.code, Some(code), "{case}: {answer:?}");
            assert!(answer.message.contains(says), "{case}: {answer:?}");
        }
        assert!(
            started.elapsed() < PROMPTLY,
            "{case}: took {:?}",
            started.elapsed()
        );
        serves(case).await;
    }
    cluster.shutdown(Duration::from_secs(5)).await;
}

fn rows(count: usize, width: usize) -> Tensor {
    Tensor {
        dtype: DType::DtypeF32 as i32,
        shape: vec![count as u64, width as u64],
        data: vec![0u8; count * width * 4].into(),
    }
}

/// Describe answers and a valid Forward message gets its rows back.
async fn assert_expert_serves(uri: &str, case: &str) {
    let info = describe(uri).await;
    let hidden = info.hidden_size as usize;
    let channel = moe_proto::transport::connect(uri)
        .await
        .expect("expert reachable");
    let message = ExpertBatch {
        request_id: 7,
        layer: 0,
        hidden: Some(rows(3, hidden)),
        ..Default::default()
    };
    let mut results = within(case, async {
        moe_proto::transport::expert_client(channel)
            .forward(tokio_stream::iter([message]))
            .await
            .unwrap_or_else(|status| panic!("after {case}: {status}"))
            .into_inner()
    })
    .await;
    let result = within(case, results.message())
        .await
        .unwrap_or_else(|status| panic!("after {case}: {status}"))
        .expect("a result");
    match result.result {
        Some(moe_proto::v1::expert_result::Result::Output(tensor)) => {
            assert_eq!(tensor.shape, [3, hidden as u64], "after {case}")
        }
        other => panic!("after {case}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expert_refuses_garbage_and_keeps_serving() {
    let model = tiny_checkpoint();
    let expert = start_expert(model.path(), 0, "0..4").await;
    let uri = expert.uri();
    let addr = authority(&uri).to_owned();
    assert_expert_serves(&uri, "nothing").await;
    write_tcp_cases(&addr, async |case: &str| {
        assert_expert_serves(&uri, case).await
    })
    .await;

    let mut h2 = RawH2::connect(&addr, 1 << 20).await;
    let hidden = describe(&uri).await.hidden_size as usize;
    let valid = ExpertBatch {
        request_id: 1,
        layer: 0,
        hidden: Some(rows(2, hidden)),
        ..Default::default()
    }
    .encode_to_vec();
    let mut truncated = grpc_frame(&valid).to_vec();
    truncated.truncate(20);
    let cases: Vec<(&str, &str, &str, Bytes, Option<Code>)> = vec![
        (
            "text/plain",
            FORWARD,
            "text/plain",
            grpc_frame(&valid),
            None,
        ),
        (
            "the public API",
            GENERATE,
            GRPC,
            grpc_frame(&[]),
            Some(Code::Unimplemented),
        ),
        (
            "undecodable protobuf",
            FORWARD,
            GRPC,
            grpc_frame(&[0xff; 16]),
            Some(Code::InvalidArgument),
        ),
        (
            "a truncated message",
            FORWARD,
            GRPC,
            Bytes::from(truncated),
            Some(Code::InvalidArgument),
        ),
        (
            "undecodable Describe",
            "/moe.v1.Expert/Describe",
            GRPC,
            grpc_frame(&[0xff; 4]),
            Some(Code::InvalidArgument),
        ),
        (
            "an undecodable health check",
            HEALTH_CHECK,
            GRPC,
            grpc_frame(&[0xff; 16]),
            Some(Code::InvalidArgument),
        ),
    ];
    for (case, path, content_type, body, expected) in cases {
        let answer = within(case, h2.call(path, content_type, body)).await;
        assert!(answer.is_error(), "{case}: {answer:?}");
        if let Some(code) = expected {
            assert_eq!(answer.code, Some(code), "{case}: {answer:?}");
        }
        assert_expert_serves(&uri, case).await;
    }
    drop(expert);
}

/// One 192 MB Forward message is refused from its length prefix: the
/// expert neither buffers it nor stops serving its other streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expert_refuses_a_192_mb_message_without_reading_it() {
    let model = tiny_checkpoint();
    let expert = start_expert(model.path(), 1, "0..4").await;
    let uri = expert.uri();
    let pid = expert.pid().expect("a running expert");
    let before = moe_e2e::raw::resident_bytes(pid);
    let mut h2 = RawH2::connect(authority(&uri), 1 << 20).await;
    let (response, mut body) = h2.open(FORWARD, GRPC).await.expect("stream opens");
    let mut prefix = vec![0u8];
    prefix.extend((192u32 << 20).to_be_bytes());
    body.send_data(Bytes::from(prefix), false).unwrap();
    // As much of the body as the windows let through, 1 MiB at a time.
    for _ in 0..16 {
        body.send_data(Bytes::from(vec![0u8; 1 << 20]), false)
            .unwrap();
    }
    let answer = within("the refusal", moe_e2e::raw::read_answer(response)).await;
    assert_eq!(answer.code, Some(Code::ResourceExhausted), "{answer:?}");
    assert!(answer.message.contains("--max-rows"), "{answer:?}");
    assert_expert_serves(&uri, "a 192 MB message").await;
    let grown = moe_e2e::raw::resident_bytes(pid).saturating_sub(before);
    assert!(grown < 64 << 20, "the expert grew by {grown} bytes");
    drop(expert);
}

/// The services a process's reflection (v1) lists.
async fn reflected(uri: &str) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let channel = moe_proto::transport::connect(uri).await.expect("reachable");
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection answers")
        .into_inner();
    match answers
        .message()
        .await
        .expect("a listing")
        .and_then(|a| a.message_response)
    {
        Some(MessageResponse::ListServicesResponse(list)) => {
            let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            names.sort();
            names
        }
        other => panic!("{other:?}"),
    }
}

/// Reflection lists what each process serves and nothing else (before,
/// both listed moe.v1.Inference and moe.v1.Expert, and one of the two
/// answered UNIMPLEMENTED).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_only_what_each_process_serves() {
    let model = tiny_checkpoint();
    let cluster = start_with(model.path(), |_| {}).await;
    let expert = start_expert(model.path(), 0, "0..4").await;
    let common = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    for (uri, own) in [
        (cluster.router_uri(), "moe.v1.Inference"),
        (expert.uri(), "moe.v1.Expert"),
    ] {
        let mut expected: Vec<String> =
            common.iter().chain([&own]).map(|s| s.to_string()).collect();
        expected.sort();
        assert_eq!(reflected(&uri).await, expected, "{uri}");
    }
    drop(expert);
    cluster.shutdown(Duration::from_secs(5)).await;
}
