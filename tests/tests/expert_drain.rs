//! An expert-svc that gets SIGTERM in the middle of a forward pass drains:
//! it reports NOT_SERVING (on gRPC health and on `/readyz`, which probes
//! that speak no TLS read), sends a correct result for every message it had
//! read, ends its Forward stream itself, and exits 0.
//!
//! Linux only: the test learns that the expert is computing from its CPU
//! time in `/proc`.
#![cfg(target_os = "linux")]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::SinkExt;
use futures::channel::mpsc;
use moe_e2e::{HealthWatch, ServingStatus, http, start_expert_with, within};
use moe_model::synth;
use moe_proto::transport;
use moe_proto::v1::expert_result::Result as Outcome;
use moe_proto::v1::{DType, ExpertBatch, ExpertResult, Tensor};
use tonic::transport::Channel;

/// Width of the test checkpoint's hidden states and of its experts: wide
/// experts make a message's forward pass cost far more than reading it
/// (about 6 MFLOP against 1 KiB a row).
const HIDDEN: usize = 256;
const INTERMEDIATE: usize = 4096;
/// Rows of the message whose forward pass SIGTERM interrupts: about a
/// second of one core (the launcher gives an expert one thread).
const LARGE_ROWS: usize = 4096;
/// [`rows`] repeats itself every this many rows.
const PERIOD: usize = 17;
/// CPU time, in clock ticks of 10 ms (Linux's USER_HZ), that the expert
/// must have used since the messages were sent to show that it is
/// computing the large one: more than reading and decoding every message
/// costs (a few milliseconds), a tenth of that pass.
const COMPUTING_TICKS: u64 = 10;

/// One layer, two experts, each expert 256 wide with 4096 hidden units.
fn wide_checkpoint() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = moe_model::ModelConfig {
        hidden_size: HIDDEN,
        intermediate_size: INTERMEDIATE,
        num_hidden_layers: 1,
        num_local_experts: 2,
        num_experts_per_tok: 1,
        ..synth::Preset::Tiny.config(64)
    };
    synth::write_config(dir.path(), &config).expect("config");
    synth::write_weights(dir.path(), &config, 0).expect("weights");
    dir
}

/// `rows` rows whose values depend on `seed`; row `r + PERIOD` equals row
/// `r`, so a large message's result can be checked row by row against a
/// message of `PERIOD` rows.
fn rows(rows: usize, seed: usize) -> Tensor {
    let data: Vec<u8> = (0..rows * HIDDEN)
        .flat_map(|i| ((((i + seed * 31) % PERIOD) as f32 - 8.0) * 0.05).to_le_bytes())
        .collect();
    Tensor {
        dtype: DType::DtypeF32 as i32,
        shape: vec![rows as u64, HIDDEN as u64],
        data: data.into(),
    }
}

fn values(result: ExpertResult) -> Vec<f32> {
    match result.result {
        Some(Outcome::Output(tensor)) => tensor
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect(),
        other => panic!("message {} refused: {other:?}", result.request_id),
    }
}

/// `hidden` sent alone on a stream of its own: the reference result.
async fn forward_alone(channel: &Channel, hidden: Tensor) -> Vec<f32> {
    let (mut sender, receiver) = mpsc::channel(1);
    let mut client = transport::expert_client(channel.clone());
    let mut results = within("the stream opens", client.forward(receiver))
        .await
        .expect("stream opens")
        .into_inner();
    let batch = ExpertBatch {
        request_id: 1,
        layer: 0,
        hidden: Some(hidden),
        ..Default::default()
    };
    sender.send(batch).await.expect("stream open");
    let result = within("a result comes", results.message())
        .await
        .expect("the stream carries on")
        .expect("a result");
    values(result)
}

fn assert_close(label: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{label}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
            "{label}: value {i} is {g}, alone it is {w}"
        );
    }
}

/// CPU time the process has used (user and system), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // After the command name, in parentheses: state, then 10 fields, then
    // utime and stime.
    let (_, fields) = stat.rsplit_once(") ").expect("a stat line");
    let fields: Vec<&str> = fields.split_whitespace().collect();
    let ticks = |index: usize| fields[index].parse::<u64>().expect("a tick count");
    ticks(11) + ticks(12)
}

/// The expert gets, on one stream and in this order, two small messages,
/// a large one, and four small ones; SIGTERM comes once it is computing
/// the large one. Which messages it had read by then is determined as
/// far as it needs to be:
///
/// - a stream's messages are read in order, and the expert computes a
///   message right after reading it, on the same task, so once it is
///   computing the large message it has read it and the two before it;
///   these three must get their results. That it is computing is seen
///   from outside: its CPU time has grown by more than reading every
///   message costs (the only other work it has);
/// - the four after it may or may not have been read when the expert sees
///   SIGTERM (it stops reading then), so each may get no result; but since
///   every message read gets one, those that do form a prefix of the four.
///
/// Every result that comes is compared with the same rows sent alone
/// before. The stream must end cleanly while the test still holds its
/// end open (so the expert ended it), and the process must exit 0 soon
/// after, not at the end of its grace period (10 s). Its health is
/// followed on a Watch stream opened before SIGTERM: a draining process
/// waits for its open streams, so it cannot exit before NOT_SERVING has
/// gone out on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expert_terminated_mid_pass_answers_what_it_read_then_exits() {
    let model = wide_checkpoint();
    let mut expert = start_expert_with(model.path(), 0, "0..1", |o| o.expert_metrics = true).await;
    let probes = expert.http.expect("--metrics-listen");
    let pid = expert.pid().expect("running");
    let channel = transport::connect(&expert.uri()).await.expect("expert up");

    let before: Vec<Tensor> = vec![rows(1, 1), rows(3, 2)];
    let after: Vec<Tensor> = (0..4).map(|i| rows(1 + i % 3, 3 + i)).collect();
    let mut alone = Vec::new();
    for hidden in before.iter().chain(&after) {
        alone.push(forward_alone(&channel, hidden.clone()).await);
    }
    let period = forward_alone(&channel, rows(PERIOD, 0)).await;
    let mut health = HealthWatch::open(&expert.uri()).await;
    health.until(ServingStatus::Serving).await;
    assert_eq!(
        http::get(probes, "/readyz").await.unwrap(),
        (200, "SERVING\n".to_owned())
    );

    // Request ids 1 and 2: before; 3: the large message; 4..=7: after.
    const LARGE: u64 = 3;
    let idle = cpu_ticks(pid);
    let (mut sender, receiver) = mpsc::channel(8);
    let mut client = transport::expert_client(channel.clone());
    let mut results = within("the stream opens", client.forward(receiver))
        .await
        .expect("stream opens")
        .into_inner();
    let messages = before[..]
        .iter()
        .cloned()
        .chain([rows(LARGE_ROWS, 0)])
        .chain(after.iter().cloned());
    for (index, hidden) in messages.enumerate() {
        let batch = ExpertBatch {
            request_id: index as u64 + 1,
            layer: 0,
            hidden: Some(hidden),
            ..Default::default()
        };
        sender.send(batch).await.expect("stream open");
    }
    within("the expert computes the large message", async {
        while cpu_ticks(pid) < idle + COMPUTING_TICKS {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    expert.terminate();
    health.until(ServingStatus::NotServing).await;
    // Draining: the results stream is still open, so the process is too.
    assert_eq!(
        http::get(probes, "/readyz").await.unwrap(),
        (503, "NOT_SERVING\n".to_owned())
    );
    assert_eq!(http::get(probes, "/livez").await.unwrap().0, 200);
    // The watch would hold the drain open: a process waits for its streams.
    drop(health);
    let mut answered = BTreeMap::new();
    within("the expert ends the stream", async {
        while let Some(result) = results
            .message()
            .await
            .expect("the stream ends cleanly, not with an error")
        {
            answered.insert(result.request_id, values(result));
        }
    })
    .await;
    let ended = Instant::now();
    drop((sender, results, client, channel));

    for id in [1, 2, LARGE] {
        assert!(
            answered.contains_key(&id),
            "message {id} was read but got no result"
        );
    }
    for (id, reference) in [1u64, 2].into_iter().zip(&alone) {
        assert_close(&format!("message {id}"), &answered[&id], reference);
    }
    let large = &answered[&LARGE];
    assert_eq!(large.len(), LARGE_ROWS * HIDDEN, "large result");
    for (row, got) in large.chunks_exact(HIDDEN).enumerate() {
        let r = row % PERIOD;
        assert_close(
            &format!("large message, row {row}"),
            got,
            &period[r * HIDDEN..(r + 1) * HIDDEN],
        );
    }
    let later: Vec<u64> = answered.keys().copied().filter(|&id| id > LARGE).collect();
    assert_eq!(
        later,
        (LARGE + 1..=LARGE + later.len() as u64).collect::<Vec<_>>(),
        "a message the expert read after the large one got no result"
    );
    for &id in &later {
        let reference = &alone[before.len() + (id - LARGE - 1) as usize];
        assert_close(&format!("message {id}"), &answered[&id], reference);
    }

    let status = within("the expert exits", expert.wait())
        .await
        .expect("wait");
    assert!(status.success(), "expert exit: {status}");
    assert!(
        ended.elapsed() < Duration::from_secs(5),
        "exited {:?} after its streams ended: at the end of its grace period, not of its work",
        ended.elapsed()
    );
}
