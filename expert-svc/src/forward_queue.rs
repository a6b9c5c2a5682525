//! Messages waiting for the expert, stacked per layer into forward passes.
//!
//! The stream task that reads a message queues it here and then runs
//! everything queued, on its own thread, sending each message's result
//! straight onto its stream (no hand-off to a compute task and back: see
//! docs/decisions.md). Whichever task runs the queue computes the waiting
//! messages of every stream, so messages for the same layer share one
//! forward pass: one matrix product over all their rows, which costs little
//! more than one row's when reading the weights is what bounds it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::metrics::ExpertMetrics;
use crate::{ExpertError, ExpertWeights};

/// Where a message's result goes: the caller encodes it and sends it.
pub type Reply = Box<dyn FnOnce(Result<Tensor, ExpertError>) + Send>;

struct Job {
    layer: usize,
    rows: Tensor,
    reply: Reply,
    queued_at: Instant,
    /// The message's `expert_product` span, when its router traces it:
    /// it ends when the job (and its reply) does.
    _span: tracing::Span,
}

/// Work done since start, for Describe and the demo's per-expert counts.
#[derive(Default)]
pub struct Counters {
    pub rows: AtomicU64,
    pub passes: AtomicU64,
    /// Nanoseconds spent computing passes (Describe's `busy_seconds`).
    pub busy_nanos: AtomicU64,
}

/// Messages that may wait for the expert before new ones are refused.
const QUEUE_CAPACITY: usize = 1024;

pub struct ForwardQueue {
    weights: ExpertWeights,
    waiting: Mutex<Vec<Job>>,
    counters: Counters,
    metrics: Arc<ExpertMetrics>,
    busy: Mutex<BusyClock>,
}

/// Wall time with at least one pass running. Passes of different streams
/// can run at once on different threads; counted once, the busy seconds'
/// rate stays a fraction of wall time (what dashboards and the autoscaler
/// read it as).
#[derive(Debug, Default)]
struct BusyClock {
    running: u32,
    /// Busy time is accounted up to here.
    accounted_to: Option<Instant>,
}

impl BusyClock {
    fn start(&mut self, now: Instant) {
        if self.running == 0 {
            self.accounted_to = Some(now);
        }
        self.running += 1;
    }

    /// A pass ended at `now`: the busy time since last accounted.
    fn end(&mut self, now: Instant) -> Duration {
        let busy = self
            .accounted_to
            .map(|since| now.saturating_duration_since(since))
            .unwrap_or_default();
        self.accounted_to = Some(now);
        self.running = self.running.saturating_sub(1);
        busy
    }
}

impl ForwardQueue {
    pub fn new(weights: ExpertWeights, metrics: Arc<ExpertMetrics>) -> Self {
        Self {
            weights,
            waiting: Mutex::new(Vec::new()),
            counters: Counters::default(),
            metrics,
            busy: Mutex::default(),
        }
    }

    /// Queues the expert's forward pass over `rows` (`[n, hidden]`) of
    /// `layer`, after checking that this expert serves `layer`; `reply`
    /// gets its result once a [`ForwardQueue::run_queued`] ran it.
    pub fn submit(&self, layer: usize, rows: Tensor, reply: Reply) -> Result<(), ExpertError> {
        self.submit_traced(layer, rows, reply, tracing::Span::none())
    }

    /// [`ForwardQueue::submit`], with the span that times the message
    /// until its reply.
    pub fn submit_traced(
        &self,
        layer: usize,
        rows: Tensor,
        reply: Reply,
        span: tracing::Span,
    ) -> Result<(), ExpertError> {
        self.weights.check_layer(layer)?;
        let mut waiting = self.waiting();
        if waiting.len() >= QUEUE_CAPACITY {
            return Err(ExpertError::Overloaded(QUEUE_CAPACITY));
        }
        waiting.push(Job {
            layer,
            rows,
            reply,
            queued_at: Instant::now(),
            _span: span,
        });
        Ok(())
    }

    /// Runs every queued message, one forward pass per layer, and hands
    /// each message its rows of the result. Blocks the calling thread for
    /// as long as the passes take.
    pub fn run_queued(&self) {
        let jobs = std::mem::take(&mut *self.waiting());
        let mut by_layer: BTreeMap<usize, Vec<Job>> = BTreeMap::new();
        for job in jobs {
            by_layer.entry(job.layer).or_default().push(job);
        }
        for (layer, batch) in by_layer {
            let rows: usize = batch.iter().map(|job| job.rows.dim(0).unwrap_or(0)).sum();
            let _span =
                tracing::debug_span!("forward_pass", layer, rows, messages = batch.len()).entered();
            self.counters.rows.fetch_add(rows as u64, Ordering::Relaxed);
            self.counters.passes.fetch_add(1, Ordering::Relaxed);
            let started = Instant::now();
            lock(&self.busy).start(started);
            for job in &batch {
                self.metrics.waited(started.duration_since(job.queued_at));
            }
            run_pass(&self.weights, layer, batch);
            let ended = Instant::now();
            let busy = lock(&self.busy).end(ended);
            self.metrics.product(rows, ended - started, busy);
            self.counters
                .busy_nanos
                .fetch_add(busy.as_nanos() as u64, Ordering::Relaxed);
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The weights the queue computes with.
    pub fn weights(&self) -> &ExpertWeights {
        &self.weights
    }

    /// The queue, locked. A pass that panicked leaves nothing half-done
    /// in it (jobs are taken out before they run), so a poisoned lock is
    /// still sound to use.
    fn waiting(&self) -> MutexGuard<'_, Vec<Job>> {
        lock(&self.waiting)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// One forward pass for every job of `layer`; each job's reply gets its rows.
fn run_pass(weights: &ExpertWeights, layer: usize, batch: Vec<Job>) {
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
            tracing::error!(layer, %err, "forward pass failed");
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
    fn one_run_stacks_each_layer_into_one_pass_and_replies_to_every_caller() {
        let dir = tempfile::tempdir().unwrap();
        synth::write_checkpoint(dir.path(), Preset::Tiny, 0).unwrap();
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        let queue = ForwardQueue::new(weights(&checkpoint), Arc::new(ExpertMetrics::detached(2)));
        let reference = weights(&checkpoint);

        // Callers as several streams would queue them: two layers, mixed.
        let messages = [(1, 1), (2, 3), (1, 2), (1, 3), (3, 1)];
        let (replies, received) = std::sync::mpsc::channel();
        for (caller, &(layer, count)) in messages.iter().enumerate() {
            let replies = replies.clone();
            let reply: Reply = Box::new(move |result| replies.send((caller, result)).unwrap());
            queue.submit(layer, rows(count, caller), reply).unwrap();
        }
        drop(replies);
        queue.run_queued();

        let counters = queue.counters();
        assert_eq!(counters.passes.load(Ordering::Relaxed), 3, "one per layer");
        assert_eq!(counters.rows.load(Ordering::Relaxed), 10);
        let mut replied = 0;
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
            replied += 1;
        }
        assert_eq!(replied, messages.len());

        queue.run_queued();
        assert_eq!(
            counters.passes.load(Ordering::Relaxed),
            3,
            "nothing left queued"
        );
    }

    #[test]
    fn a_layer_this_expert_does_not_serve_is_refused_before_it_is_queued() {
        let dir = tempfile::tempdir().unwrap();
        synth::write_checkpoint(dir.path(), Preset::Tiny, 0).unwrap();
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        let queue = ForwardQueue::new(
            ExpertWeights::load(&checkpoint, 2, 1..3, &Device::Cpu).unwrap(),
            Arc::new(ExpertMetrics::detached(2)),
        );
        for layer in [0, 3, 1000] {
            let err = queue
                .submit(layer, rows(1, 0), Box::new(|_| {}))
                .unwrap_err();
            assert!(
                matches!(err, ExpertError::Layer { layer: l, start: 1, end: 3 } if l == layer),
                "{err}"
            );
        }
        queue.submit(2, rows(1, 0), Box::new(|_| {})).unwrap();
        queue.run_queued();
        assert_eq!(queue.counters().passes.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn overlapping_passes_count_their_wall_time_once() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut clock = BusyClock::default();
        // A runs 0-10 ms, B 5-20 ms: busy 0-20 ms, not 25 ms.
        clock.start(at(0));
        clock.start(at(5));
        let a = clock.end(at(10));
        let b = clock.end(at(20));
        assert_eq!(a + b, Duration::from_millis(20));
        // Idle 20-30 ms counts nothing; C runs 30-34 ms.
        clock.start(at(30));
        assert_eq!(clock.end(at(34)), Duration::from_millis(4));
    }

    #[test]
    fn a_full_queue_refuses_with_overloaded() {
        let dir = tempfile::tempdir().unwrap();
        synth::write_checkpoint(dir.path(), Preset::Tiny, 0).unwrap();
        let queue = ForwardQueue::new(
            weights(&Checkpoint::open(dir.path()).unwrap()),
            Arc::new(ExpertMetrics::detached(2)),
        );
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
