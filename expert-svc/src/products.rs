//! The products waiting for the device, stacked per layer.
//!
//! Messages are not handed to a device task and answered back through
//! another: the stream task that reads a message queues it here and then
//! runs everything queued, on its own thread, answering each message
//! straight onto its stream. Whichever task runs the queue computes the
//! messages of every stream that are waiting, so requests for the same
//! layer still share one matrix product (a batch of 64 rows costs little
//! more than one row when the product is bound by reading the weights).
//!
//! The hand-off cost more than it saved: a decode step sends each expert a
//! message of a few rows per layer, and each hop between tasks (spawn,
//! channel, wake-up, oneshot back) ran with caches that the other experts'
//! products had just flushed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use candle_core::Tensor;

use crate::{ExpertError, ExpertWeights};

/// Where a product's result goes: the caller encodes it and sends it.
pub type Reply = Box<dyn FnOnce(Result<Tensor, ExpertError>) + Send>;

struct Job {
    layer: usize,
    rows: Tensor,
    reply: Reply,
}

/// Work done since start, for Describe and the demo's per-expert counts.
#[derive(Default)]
pub struct Counters {
    pub rows: AtomicU64,
    pub products: AtomicU64,
}

/// Messages that may wait for the device before new ones are refused.
const QUEUE_CAPACITY: usize = 1024;

pub struct ProductQueue {
    weights: ExpertWeights,
    waiting: Mutex<Vec<Job>>,
    counters: Counters,
}

impl ProductQueue {
    pub fn new(weights: ExpertWeights) -> Self {
        Self {
            weights,
            waiting: Mutex::new(Vec::new()),
            counters: Counters::default(),
        }
    }

    /// Queues the expert's product on `rows` (`[n, hidden]`) of `layer`;
    /// `reply` gets its result once a [`ProductQueue::run_waiting`] ran it.
    pub fn submit(&self, layer: usize, rows: Tensor, reply: Reply) -> Result<(), ExpertError> {
        let mut waiting = self.waiting();
        if waiting.len() >= QUEUE_CAPACITY {
            return Err(ExpertError::Overloaded(QUEUE_CAPACITY));
        }
        waiting.push(Job { layer, rows, reply });
        Ok(())
    }

    /// Runs every queued product, one matrix product per layer, and hands
    /// each message its rows of the result. Blocks the calling thread for
    /// as long as the products take.
    pub fn run_waiting(&self) {
        let jobs = std::mem::take(&mut *self.waiting());
        let mut by_layer: BTreeMap<usize, Vec<Job>> = BTreeMap::new();
        for job in jobs {
            by_layer.entry(job.layer).or_default().push(job);
        }
        for (layer, batch) in by_layer {
            let rows: usize = batch.iter().map(|job| job.rows.dim(0).unwrap_or(0)).sum();
            let _span = tracing::debug_span!("expert_product", layer, rows, messages = batch.len())
                .entered();
            self.counters.rows.fetch_add(rows as u64, Ordering::Relaxed);
            self.counters.products.fetch_add(1, Ordering::Relaxed);
            answer(&self.weights, layer, batch);
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The queue, locked. A product that panicked leaves nothing half-done
    /// in it (jobs are taken out before they run), so a poisoned lock is
    /// still sound to use.
    fn waiting(&self) -> MutexGuard<'_, Vec<Job>> {
        self.waiting
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
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
                (job.reply)(Ok(output));
            }
        }
        Err(err) => {
            tracing::error!(layer, %err, "expert product failed");
            for job in batch {
                (job.reply)(Err(ExpertError::Compute(candle_core::Error::Msg(
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

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use moe_model::Checkpoint;
    use moe_model::synth::{self, Preset};

    use super::*;

    fn weights(checkpoint: &Checkpoint) -> ExpertWeights {
        ExpertWeights::load(checkpoint, 2, 0..4, &Device::Cpu).unwrap()
    }

    /// `count` rows of the tiny preset's width whose values depend on `seed`.
    fn rows(count: usize, seed: usize) -> Tensor {
        let values: Vec<f32> = (0..count * 64)
            .map(|i| ((i * 7 + seed * 13) % 23) as f32 * 0.02 - 0.2)
            .collect();
        Tensor::from_vec(values, (count, 64), &Device::Cpu).unwrap()
    }

    #[test]
    fn one_run_stacks_each_layer_into_one_product_and_answers_every_caller() {
        let dir = tempfile::tempdir().unwrap();
        synth::write_checkpoint(dir.path(), Preset::Tiny, 0).unwrap();
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        let queue = ProductQueue::new(weights(&checkpoint));
        let reference = weights(&checkpoint);

        // Callers as several streams would queue them: two layers, mixed.
        let messages = [(1, 1), (2, 3), (1, 2), (1, 3), (3, 1)];
        let (answers, received) = std::sync::mpsc::channel();
        for (caller, &(layer, count)) in messages.iter().enumerate() {
            let answers = answers.clone();
            let reply: Reply = Box::new(move |result| answers.send((caller, result)).unwrap());
            queue.submit(layer, rows(count, caller), reply).unwrap();
        }
        drop(answers);
        queue.run_waiting();

        let counters = queue.counters();
        assert_eq!(
            counters.products.load(Ordering::Relaxed),
            3,
            "one per layer"
        );
        assert_eq!(counters.rows.load(Ordering::Relaxed), 10);
        let mut answered = 0;
        for (caller, result) in received {
            let (layer, count) = messages[caller];
            let alone = reference.forward(layer, &rows(count, caller)).unwrap();
            let stacked = result.unwrap();
            assert_eq!(stacked.dims(), alone.dims(), "caller {caller}");
            let difference = (stacked - alone)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                difference <= 1e-6,
                "caller {caller} got other rows ({difference})"
            );
            answered += 1;
        }
        assert_eq!(answered, messages.len());

        queue.run_waiting();
        assert_eq!(
            counters.products.load(Ordering::Relaxed),
            3,
            "nothing left queued"
        );
    }

    #[test]
    fn a_full_queue_refuses_with_overloaded() {
        let dir = tempfile::tempdir().unwrap();
        synth::write_checkpoint(dir.path(), Preset::Tiny, 0).unwrap();
        let queue = ProductQueue::new(weights(&Checkpoint::open(dir.path()).unwrap()));
        for _ in 0..QUEUE_CAPACITY {
            queue.submit(0, rows(1, 0), Box::new(|_| {})).unwrap();
        }
        let err = queue.submit(0, rows(1, 0), Box::new(|_| {})).unwrap_err();
        assert!(
            matches!(err, ExpertError::Overloaded(QUEUE_CAPACITY)),
            "{err}"
        );
    }
}
