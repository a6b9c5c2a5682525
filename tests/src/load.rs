//! Background load for tests that watch a cluster under traffic (the
//! dashboard, Prometheus): workers that generate until stopped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::task::JoinHandle;

use crate::{generate, greedy, within};

pub struct Load {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<u64>>,
}

impl Load {
    /// `workers` loops against the router at `uri`, each generation
    /// `max_tokens` long.
    pub fn start(uri: &str, workers: usize, max_tokens: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..workers as u64)
            .map(|worker| {
                let (uri, stop) = (uri.to_owned(), stop.clone());
                tokio::spawn(async move {
                    let mut round = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        generate(&uri, request(worker, round, max_tokens))
                            .await
                            .expect("a generation under load succeeds");
                        round += 1;
                    }
                    round
                })
            })
            .collect();
        Self { stop, workers }
    }

    /// Stops the loops after their current generations and returns how
    /// many generations they made; panics if any failed.
    pub async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let mut done = 0;
        for worker in self.workers {
            done += within("a load worker stops", worker)
                .await
                .expect("the load worker did not panic");
        }
        done
    }
}

/// Seeded sampling over prompts that differ per worker and round, so that
/// the gate's top-k choices wander over all experts instead of repeating
/// one greedy path.
fn request(worker: u64, round: u64, max_tokens: u32) -> moe_proto::v1::GenerateRequest {
    let prompt: Vec<u32> = (0..8u64)
        .map(|j| ((worker * 131 + round * 17 + j * 29) % 500 + 2) as u32)
        .collect();
    let mut request = greedy(&prompt, max_tokens);
    request.logprobs = false;
    request.temperature = Some(1.0);
    request.seed = Some(worker * 1_000_003 + round);
    request
}
