//! Continuous batching.
//!
//! One actor owns the engine and every running sequence. Each step it
//! admits queued requests while there is room, drops the cancelled, and
//! builds one batch: a decode token for each running sequence, then prompt
//! chunks under a token budget ([`plan`]). A request that arrives while
//! others run joins at the next step; a finished or cancelled one leaves,
//! and dropping it frees its KV cache. The rules live in plain values
//! ([`running`], [`plan`], [`finish`]); this file drives them.

mod finish;
mod micro_batch;
mod plan;
mod running;

use std::sync::Arc;
use std::time::Duration;

use attention_svc::{Engine, SequenceChunk};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::Instrument;

use crate::RouterError;
use crate::dispatch::StepMoe;
use crate::sampling::Sampler;
use crate::stats::RouterStats;

pub use finish::Finish;
pub use running::KvBudget;
use running::{ModelLimits, Running};

/// What the scheduler tells a request's stream.
#[derive(Debug)]
pub enum SequenceEvent {
    /// `degraded`: experts whose rows of this sequence went to next-best
    /// experts since the previous event (usually none).
    Token {
        id: u32,
        logprob: f32,
        degraded: Vec<u32>,
    },
    Finished {
        finish: Finish,
        degraded: Vec<u32>,
    },
    Failed(RouterError),
}

/// A validated request, ready to run.
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampler: Sampler,
    pub stop_at_eos: bool,
    /// Bounded: a sequence whose client reads slowly waits (it is left out
    /// of steps) rather than buffering without limit. Closed means cancelled.
    pub events: mpsc::Sender<SequenceEvent>,
    /// The request's `generate` span: the parent of the steps it takes
    /// part in, when it is traced.
    pub span: tracing::Span,
}

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Tokens (decode tokens plus prompt chunks) in one step at most.
    pub max_batch_tokens: usize,
    /// Steps of at least this many tokens that carry prompt tokens run as
    /// two micro-batches; 0 never splits.
    pub pipeline_min_tokens: usize,
    /// Sequences running at once at most; more wait in the queue.
    pub max_running: usize,
    /// Requests waiting for a running slot at most; more are refused.
    pub queue_capacity: usize,
    /// KV cache the running sequences may reserve, in bytes; `None` leaves
    /// `max_running` the only bound.
    pub kv_cache_bytes: Option<u64>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 1024,
            pipeline_min_tokens: 256,
            max_running: 128,
            queue_capacity: 1024,
            kv_cache_bytes: None,
        }
    }
}

/// A request waiting for a running slot. It holds one of the queue's
/// places until it is admitted or dropped, so that a request whose client
/// left gives its place back as soon as the scheduler sees it, not only
/// once it reaches the head of the queue.
struct Queued {
    request: GenerationRequest,
    _place: OwnedSemaphorePermit,
}

/// A cloneable handle to submit requests.
#[derive(Clone)]
pub struct SchedulerHandle {
    queue: mpsc::Sender<Queued>,
    /// `queue_capacity` places: the bound on waiting requests.
    places: Arc<Semaphore>,
    capacity: usize,
    budget: KvBudget,
}

impl SchedulerHandle {
    /// A handle on a queue of `capacity` places, and the queue's receiving
    /// end for the scheduler.
    fn new(capacity: usize, budget: KvBudget) -> (Self, mpsc::Receiver<Queued>) {
        let (queue, receiver) = mpsc::channel(capacity);
        let handle = Self {
            queue,
            places: Arc::new(Semaphore::new(capacity)),
            capacity,
            budget,
        };
        (handle, receiver)
    }

    /// Queues `request`, or refuses it out loud: when the queue is full, or
    /// when the request alone needs more KV cache than the budget.
    pub fn submit(&self, request: GenerationRequest) -> Result<(), RouterError> {
        if let Some(why) = self.budget.refuses(&request) {
            return Err(RouterError::InvalidArgument(why));
        }
        let full = || format!("the queue is full ({} waiting); retry later", self.capacity);
        let place = self
            .places
            .clone()
            .try_acquire_owned()
            .map_err(|_| RouterError::Overloaded(full()))?;
        self.queue
            .try_send(Queued {
                request,
                _place: place,
            })
            .map_err(|err| RouterError::refused(err, full))
    }
}

/// Starts the scheduler on a thread of its own (steps are CPU-bound and
/// must not stall the runtime's I/O), driving its async parts on `runtime`.
pub fn spawn<M>(
    engine: Arc<Engine>,
    moe: M,
    config: SchedulerConfig,
    stats: Arc<RouterStats>,
    runtime: tokio::runtime::Handle,
) -> std::io::Result<SchedulerHandle>
where
    M: StepMoe + Send + 'static,
{
    let model = engine.config();
    let budget = KvBudget {
        bytes_per_token: (model.num_hidden_layers
            * model.num_key_value_heads
            * model.head_dim
            * 2
            * std::mem::size_of::<f32>()) as u64,
        limit: config.kv_cache_bytes,
    };
    let (handle, queue) = SchedulerHandle::new(config.queue_capacity, budget);
    std::thread::Builder::new()
        .name("scheduler".into())
        .spawn(move || {
            let _pool = join_compute_pool();
            runtime.block_on(Scheduler::new(engine, config, budget, stats).run(queue, &moe))
        })?;
    Ok(handle)
}

/// Makes the calling thread worker 0 of a compute pool of
/// `RAYON_NUM_THREADS` threads, so that the step's parallel kernels (gemm,
/// decode attention) run on this thread and `threads - 1` helpers rather
/// than being handed to the global pool and waited for: waiting left the
/// global pool's idle threads spinning on cores the experts needed
/// (docs/decisions.md).
///
/// The pool lives as long as the returned value. Should it fail to build,
/// the step's kernels run on the global pool.
fn join_compute_pool() -> Option<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .use_current_thread()
        .thread_name(|index| format!("router-compute-{index}"))
        .build()
        .inspect_err(|err| tracing::warn!(%err, "no compute pool; using the global one"))
        .ok()
}

struct Scheduler {
    engine: Arc<Engine>,
    config: SchedulerConfig,
    stats: Arc<RouterStats>,
    running: Running,
}

impl Scheduler {
    fn new(
        engine: Arc<Engine>,
        config: SchedulerConfig,
        budget: KvBudget,
        stats: Arc<RouterStats>,
    ) -> Self {
        let model = engine.config();
        let limits = ModelLimits {
            context: model.max_position_embeddings,
            eos_tokens: model.eos_token_ids.clone(),
        };
        Self {
            running: Running::new(config.max_running, limits, budget),
            engine,
            config,
            stats,
        }
    }

    async fn run<M: StepMoe>(mut self, mut queue: mpsc::Receiver<Queued>, moe: &M) {
        loop {
            let first = if self.running.is_idle() {
                match queue.recv().await {
                    Some(request) => Some(request),
                    None => return,
                }
            } else {
                None
            };
            let engine = &self.engine;
            self.running.admit(first, &mut queue, || engine.new_cache());
            self.report_batch();
            let chunks = self.running.plan(self.config.max_batch_tokens);
            if chunks.is_empty() {
                // Every running sequence waits for its client to read.
                tokio::time::sleep(Duration::from_millis(2)).await;
                continue;
            }
            self.step(&chunks, moe).await;
            self.running.remove_finished();
            self.report_batch();
        }
    }

    fn report_batch(&self) {
        self.stats.set_running(self.running.len());
        self.stats.metrics.batch(
            self.running.len(),
            self.running.waiting_len(),
            self.running.kv_cache_usage(),
        );
    }

    async fn step<M: StepMoe>(&mut self, chunks: &[plan::Chunk], moe: &M) {
        let rows: usize = chunks.iter().map(|chunk| chunk.tokens.len()).sum();
        let decode_tokens = chunks.iter().filter(|chunk| chunk.decode).count();
        let span = self.running.step_span(chunks);
        let started = std::time::Instant::now();
        self.stats.record_step(chunks.len(), rows);
        let mut sequence_chunks: Vec<SequenceChunk<'_>> = self
            .running
            .caches(chunks)
            .map(|(cache, tokens)| SequenceChunk { cache, tokens })
            .collect();
        let result = micro_batch::run_micro_batches(
            &self.engine,
            &mut sequence_chunks,
            chunks.iter().all(|chunk| chunk.decode),
            self.config.pipeline_min_tokens,
            moe,
        )
        .instrument(span)
        .await;
        drop(sequence_chunks);
        self.stats
            .metrics
            .step(started.elapsed(), rows - decode_tokens, decode_tokens);
        match result {
            Ok(outcome) => {
                if !outcome.failed.is_empty() {
                    tracing::warn!(
                        failed = outcome.failed.len(),
                        sequences = chunks.len(),
                        "an expert could not serve some rows; ending their sequences"
                    );
                }
                self.running.settle(chunks, outcome);
            }
            Err(err) => {
                tracing::warn!(%err, sequences = chunks.len(), "step failed; ending its sequences");
                self.running.fail(chunks, || err.duplicate());
            }
        }
    }
}
