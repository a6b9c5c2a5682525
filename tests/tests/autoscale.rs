//! `moe up --autoscale` end to end: on a checkpoint whose gate sends
//! nearly every token to experts 3 and 7, a step of load makes those two
//! gain replicas (and no other expert), the step down (to one request a
//! second) makes them shrink back once the scale-down window has passed,
//! their replicas stopped while requests keep coming, and not one request
//! fails or changes its output throughout.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use moe_e2e::client::Completion;
use moe_e2e::{generate, greedy, start_with, within};
use moe_model::synth::{self, Preset};
use moe_proto::v1::GenerateRequest;
use moe_proto::v1::generate_request::Prompt;

const HOT: [usize; 2] = [3, 7];
const UP_WINDOW: Duration = Duration::from_secs(2);
const DOWN_WINDOW: Duration = Duration::from_secs(6);
const MAX_REPLICAS: usize = 3;

/// Six greedy requests of different prompts.
fn workload() -> Vec<GenerateRequest> {
    (0..6u32)
        .map(|i| {
            let prompt: Vec<u32> = (0..4 + 3 * i).map(|j| (i * 31 + j * 7) % 400 + 3).collect();
            let mut request = greedy(&prompt, 24);
            request.ignore_eos = true;
            request
        })
        .collect()
}

fn prompt_of(request: &GenerateRequest) -> Vec<u32> {
    match &request.prompt {
        Some(Prompt::TokenIds(ids)) => ids.ids.clone(),
        _ => Vec::new(),
    }
}

async fn run_all(uri: &str, requests: &[GenerateRequest]) -> Vec<Completion> {
    let mut completions = Vec::new();
    for request in requests {
        completions.push(
            generate(uri, request.clone())
                .await
                .expect("request succeeds"),
        );
    }
    completions
}

async fn dashboard(http: std::net::SocketAddr) -> serde_json::Value {
    let (status, body) = moe_e2e::http::get(http, "/api/dashboard").await.unwrap();
    assert_eq!(status, 200);
    serde_json::from_str(&body).unwrap()
}

/// Clients that send the workload over and over, each answer checked
/// against the one the cluster gave before scaling.
#[derive(Clone)]
struct Clients {
    uri: String,
    requests: Vec<GenerateRequest>,
    reference: Vec<Completion>,
    served: Arc<AtomicUsize>,
}

impl Clients {
    /// One client, sending requests `first`, `first + stride`, ... with
    /// `pause` between them, until `stop`.
    fn spawn(
        &self,
        first: usize,
        stride: usize,
        pause: Duration,
        stop: Arc<AtomicBool>,
    ) -> tokio::task::JoinHandle<Result<(), String>> {
        let clients = self.clone();
        tokio::spawn(async move {
            let mut index = first;
            while !stop.load(Ordering::Relaxed) {
                let which = index % clients.requests.len();
                let request = &clients.requests[which];
                let completion = generate(&clients.uri, request.clone())
                    .await
                    .map_err(|status| format!("request {index} failed: {status}"))?;
                if completion.token_ids != clients.reference[which].token_ids {
                    return Err(format!(
                        "prompt {:?} changed its output under scaling",
                        prompt_of(request)
                    ));
                }
                clients.served.fetch_add(1, Ordering::Relaxed);
                index += stride;
                tokio::time::sleep(pause).await;
            }
            Ok(())
        })
    }
}

async fn stop_all(stop: &AtomicBool, clients: Vec<tokio::task::JoinHandle<Result<(), String>>>) {
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap().unwrap_or_else(|why| panic!("{why}"));
    }
}

/// A moment of the replica timeline: seconds since the load started, and
/// the processes of each expert.
type Moment = (f64, Vec<usize>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_experts_scale_up_under_load_and_back_down_after_it_without_a_failed_request() {
    let checkpoint = tempfile::tempdir().unwrap();
    synth::write_checkpoint_favouring(checkpoint.path(), Preset::Tiny, 0, &HOT).unwrap();
    let cluster = start_with(checkpoint.path(), |options| {
        options.autoscale = Some(moe::launcher::ScalePolicy {
            min_replicas: 1,
            max_replicas: MAX_REPLICAS,
            up_window: UP_WINDOW,
            down_window: DOWN_WINDOW,
        });
        // A tiny expert is idle most of the time on any machine: size
        // replicas for 1% busy, so that the hot experts' few percent ask
        // for more and the cold ones' fraction of a percent does not.
        options.router_args = [
            "--autoscale-target-utilisation=0.01",
            "--autoscale-smoothing=2s",
            "--autoscale-max-replicas=3",
        ]
        .map(str::to_owned)
        .into();
    })
    .await;
    let uri = cluster.router_uri();
    let mut counts = cluster.replica_counts().expect("autoscaling is on");
    let requests = workload();
    let reference = run_all(&uri, &requests).await;

    // Load: four clients without pause.
    let clients = Clients {
        uri: uri.clone(),
        requests: requests.clone(),
        reference: reference.clone(),
        served: Arc::new(AtomicUsize::new(0)),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|worker| clients.spawn(worker, 4, Duration::ZERO, stop.clone()))
        .collect();

    let started = Instant::now();
    let mut timeline: Vec<Moment> = vec![(0.0, counts.borrow().clone())];
    let mut record = |counts: &[usize]| {
        timeline.push((started.elapsed().as_secs_f64(), counts.to_vec()));
    };
    within("the hot experts gain replicas", async {
        loop {
            counts.changed().await.expect("the autoscaler runs");
            let now = counts.borrow_and_update().clone();
            record(&now);
            if HOT.iter().all(|&expert| now[expert] >= 2) {
                return;
            }
        }
    })
    .await;
    let scaled_up_after = started.elapsed();
    // Keep the load on a while: the router takes the new replicas and
    // they serve (each reports busy time).
    let http = cluster.router_http().expect("the router serves HTTP");
    within("the new replicas serve", async {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let view = dashboard(http).await;
            let serving = HOT.iter().all(|&expert| {
                let replicas = view["experts"][expert]["replicas"].as_array().unwrap();
                replicas.len() >= 2
                    && replicas.iter().all(|replica| {
                        replica["state"] == "ready" && replica["busy_fraction"].as_f64() > Some(0.0)
                    })
            });
            if serving {
                return;
            }
        }
    })
    .await;
    // The step down: one request a second, so that replicas are drained
    // and stopped while requests keep coming.
    stop_all(&stop, workers).await;
    let load_ended = started.elapsed();
    record(&counts.borrow().clone());
    let served_at_step_down = clients.served.load(Ordering::Relaxed);
    let trickle_stop = Arc::new(AtomicBool::new(false));
    let trickle = clients.spawn(0, 1, Duration::from_secs(1), trickle_stop.clone());

    within("the hot experts shrink back", async {
        loop {
            let now = counts.borrow_and_update().clone();
            if now.iter().all(|&replicas| replicas == 1) {
                return;
            }
            counts.changed().await.expect("the autoscaler runs");
            record(&counts.borrow().clone());
        }
    })
    .await;
    let scaled_down_after = started.elapsed();
    // The router dropped the stopped replicas too.
    within("the router lists one replica per expert again", async {
        loop {
            let view = dashboard(http).await;
            let listed: Vec<usize> = (0..16)
                .map(|expert| {
                    view["experts"][expert]["replicas"]
                        .as_array()
                        .unwrap()
                        .len()
                })
                .collect();
            if listed.iter().all(|&replicas| replicas == 1) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;

    stop_all(&trickle_stop, vec![trickle]).await;
    let served_while_scaling_down = clients.served.load(Ordering::Relaxed) - served_at_step_down;
    assert!(
        served_while_scaling_down > 0,
        "no request ran while the replicas were stopped"
    );

    let timeline_text: Vec<String> = timeline
        .iter()
        .map(|(at, counts)| format!("{at:5.1}s {counts:?}"))
        .collect();
    println!(
        "load from 0 s to {:.1} s ({} requests), then one a second ({} requests); \
         hot experts at 2+ after {:.1} s; all at 1 after {:.1} s\n{}",
        load_ended.as_secs_f64(),
        served_at_step_down,
        served_while_scaling_down,
        scaled_up_after.as_secs_f64(),
        scaled_down_after.as_secs_f64(),
        timeline_text.join("\n")
    );
    for (at, counts) in &timeline {
        for (expert, &replicas) in counts.iter().enumerate() {
            assert!(
                replicas <= MAX_REPLICAS,
                "{at:.1}s: expert {expert} has {replicas}"
            );
            assert!(
                HOT.contains(&expert) || replicas == 1,
                "cold expert {expert} scaled to {replicas} at {at:.1}s"
            );
        }
    }
    assert!(
        scaled_down_after >= load_ended + DOWN_WINDOW - Duration::from_millis(1500),
        "scaled down before the window passed: load ended at {load_ended:?}, down at {scaled_down_after:?}"
    );
    assert!(served_at_step_down > 0);

    // After scaling down, the same outputs.
    let after = run_all(&uri, &requests).await;
    for (before, after) in reference.iter().zip(&after) {
        assert_eq!(before.token_ids, after.token_ids);
    }
    cluster.shutdown(Duration::from_secs(5)).await;
}
