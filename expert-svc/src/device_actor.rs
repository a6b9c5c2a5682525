//! The device actor: one task owns the expert's weights and runs every
//! product, so requests from all streams for the same layer are stacked
//! into one matrix product (a batch of 64 rows costs little more than one
//! row when the product is bound by reading the weights).
//!
//! It is a task on the service's runtime, not a thread of its own, and it
//! computes on the runtime's thread. A message then costs one wake-up of
//! the process (the socket) instead of three (socket, device thread, and
//! the answer back): with 16 expert processes on 2 cores, each extra
//! wake-up waits behind the other experts' products. Measured at
//! concurrency 32 on the small preset: 206–208 → 213–215 tokens/s. The
//! runtime is blocked while a product runs; in an expert process that is
//! what it is there for, and products are milliseconds.
//!
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::Tensor;
use tokio::sync::{mpsc, oneshot};

use crate::{ExpertError, ExpertWeights};

struct Job {
    layer: usize,
    rows: Tensor,
    reply: oneshot::Sender<Result<Tensor, ExpertError>>,
}

/// Work done since start, for Describe and the demo's per-expert counts.
#[derive(Default)]
pub struct Counters {
    pub rows: AtomicU64,
    pub products: AtomicU64,
}

/// A cloneable handle on the device actor.
#[derive(Clone)]
pub struct DeviceHandle {
    jobs: mpsc::Sender<Job>,
    counters: Arc<Counters>,
}

/// Messages that may wait for the device before new ones are refused.
const QUEUE_CAPACITY: usize = 1024;

impl DeviceHandle {
    /// Starts the actor on the current runtime. It ends once every handle
    /// is dropped and the queue is empty.
    pub fn spawn(weights: ExpertWeights) -> Self {
        let (jobs, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let counters = Arc::new(Counters::default());
        tokio::spawn(run(weights, receiver, counters.clone()));
        Self { jobs, counters }
    }

    /// Runs the expert on `rows` (`[n, hidden]`) of `layer`, batched with
    /// whatever else is queued for that layer.
    pub async fn forward(&self, layer: usize, rows: Tensor) -> Result<Tensor, ExpertError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .try_send(Job { layer, rows, reply })
            .map_err(|err| match err {
                mpsc::error::TrySendError::Full(_) => ExpertError::Overloaded(QUEUE_CAPACITY),
                mpsc::error::TrySendError::Closed(_) => ExpertError::ShuttingDown,
            })?;
        answer.await.map_err(|_| ExpertError::ShuttingDown)?
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }
}

async fn run(weights: ExpertWeights, mut jobs: mpsc::Receiver<Job>, counters: Arc<Counters>) {
    while let Some(first) = jobs.recv().await {
        // Runs every other ready task and reads the sockets before taking
        // the queue: messages already sent then stack into this product,
        // and the last product's answers go out first.
        tokio::task::yield_now().await;
        let mut by_layer: BTreeMap<usize, Vec<Job>> = BTreeMap::new();
        by_layer.entry(first.layer).or_default().push(first);
        while let Ok(job) = jobs.try_recv() {
            by_layer.entry(job.layer).or_default().push(job);
        }
        for (layer, batch) in by_layer {
            let rows: usize = batch.iter().map(|job| job.rows.dim(0).unwrap_or(0)).sum();
            let _span = tracing::debug_span!("expert_product", layer, rows, messages = batch.len())
                .entered();
            counters.rows.fetch_add(rows as u64, Ordering::Relaxed);
            counters.products.fetch_add(1, Ordering::Relaxed);
            answer(&weights, layer, batch);
        }
    }
}

/// One product for every job of `layer`, each job answered with its rows.
fn answer(weights: &ExpertWeights, layer: usize, batch: Vec<Job>) {
    let result = if batch.len() == 1 {
        weights.forward(layer, &batch[0].rows).map(|out| vec![out])
    } else {
        stacked_forward(weights, layer, &batch)
    };
    match result {
        Ok(outputs) => {
            for (job, output) in batch.into_iter().zip(outputs) {
                // A caller that went away no longer needs its answer.
                let _ = job.reply.send(Ok(output));
            }
        }
        Err(err) => {
            tracing::error!(layer, %err, "expert product failed");
            for job in batch {
                let _ = job
                    .reply
                    .send(Err(ExpertError::Compute(candle_core::Error::Msg(
                        err.to_string(),
                    ))));
            }
        }
    }
}

fn stacked_forward(
    weights: &ExpertWeights,
    layer: usize,
    batch: &[Job],
) -> candle_core::Result<Vec<Tensor>> {
    let inputs: Vec<&Tensor> = batch.iter().map(|job| &job.rows).collect();
    let output = weights.forward(layer, &Tensor::cat(&inputs, 0)?)?;
    let mut offset = 0;
    batch
        .iter()
        .map(|job| {
            let n = job.rows.dim(0)?;
            let part = output.narrow(0, offset, n)?;
            offset += n;
            Ok(part)
        })
        .collect()
}
