//! Continuous batching.
//!
//! One actor owns the engine and every running sequence. Each step it admits
//! new requests, drops the cancelled, and builds one batch: a decode token
//! for each running sequence, then prompt chunks under a token budget. A
//! request that arrives while others run joins at the next step; a finished
//! or cancelled one leaves, and dropping it frees its KV cache.
//!
//! A large step runs as two micro-batches driven together (MegaScale-Infer's
//! ping-pong): while one waits for its experts, the other's attention runs
//! on this thread, so neither the router nor the experts sit idle for a
//! whole phase.

use std::collections::VecDeque;
use std::sync::Arc;

use attention_svc::{Engine, MoeLayer, SequenceCache, SequenceChunk};
use tokio::sync::mpsc;

use crate::RouterError;
use crate::sampling::Sampler;
use crate::stats::RouterStats;

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Length,
    Eos,
}

/// What the scheduler tells a request's stream.
#[derive(Debug)]
pub enum SequenceEvent {
    Token { id: u32, logprob: f32 },
    Finished(Finish),
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
}

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Tokens (decode tokens plus prompt tokens) in one step at most.
    pub max_batch_tokens: usize,
    /// Steps of at least this many tokens run as two micro-batches; 0 never
    /// splits.
    pub pipeline_min_tokens: usize,
    /// Sequences running at once at most; more wait in the queue.
    pub max_running: usize,
    /// Requests waiting for admission at most; more are refused.
    pub queue_capacity: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 1024,
            pipeline_min_tokens: 256,
            max_running: 128,
            queue_capacity: 1024,
        }
    }
}

/// A cloneable handle to submit requests.
#[derive(Clone)]
pub struct SchedulerHandle {
    submissions: mpsc::Sender<GenerationRequest>,
    capacity: usize,
}

impl SchedulerHandle {
    /// Queues `request`, or refuses it out loud when the queue is full.
    pub fn submit(&self, request: GenerationRequest) -> Result<(), RouterError> {
        self.submissions.try_send(request).map_err(|err| match err {
            mpsc::error::TrySendError::Full(_) => RouterError::Overloaded(format!(
                "{} requests already waiting; retry later",
                self.capacity
            )),
            mpsc::error::TrySendError::Closed(_) => RouterError::ShuttingDown,
        })
    }
}

/// Starts the scheduler on a thread of its own (steps are CPU-bound and
/// must not stall the runtime's I/O), driving its async parts on `runtime`.
pub fn spawn<M>(
    engine: Arc<Engine>,
    moe: Arc<M>,
    config: SchedulerConfig,
    stats: Arc<RouterStats>,
    runtime: tokio::runtime::Handle,
) -> std::io::Result<SchedulerHandle>
where
    M: MoeLayer<Error = RouterError> + Send + 'static,
{
    let (submissions, receiver) = mpsc::channel(config.queue_capacity);
    let capacity = config.queue_capacity;
    std::thread::Builder::new()
        .name("scheduler".into())
        .spawn(move || {
            let _pool = join_compute_pool();
            runtime.block_on(Scheduler::new(engine, config, stats).run(receiver, moe.as_ref()))
        })?;
    Ok(SchedulerHandle {
        submissions,
        capacity,
    })
}

/// Makes the calling thread worker 0 of a compute pool of
/// `RAYON_NUM_THREADS` threads, so that the step's parallel kernels (gemm,
/// decode attention) run on this thread and `threads - 1` helpers rather
/// than being handed to the global pool and waited for.
///
/// Measured on 2 cores with 16 expert processes: handing off left two idle
/// pool threads yielding the core to each other (rayon spins with
/// `sched_yield` before it sleeps) for ~0.2 ms after every parallel
/// operation, while expert threads waited for that core; this pool leaves
/// one helper to spin, whose yields go to the experts. Distributed c32
/// throughput went from 188 to 206–210 tokens/s.
///
/// The pool lives as long as the returned value. Should it fail to build,
/// the step's kernels run on the global pool as before.
fn join_compute_pool() -> Option<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .use_current_thread()
        .thread_name(|index| format!("router-compute-{index}"))
        .build()
        .inspect_err(|err| tracing::warn!(%err, "no compute pool; using the global one"))
        .ok()
}

struct Sequence {
    request: GenerationRequest,
    cache: SequenceCache,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    generated: usize,
    /// The last sampled token, input of the next decode step.
    last_token: Option<u32>,
    done: bool,
}

impl Sequence {
    fn is_decoding(&self) -> bool {
        self.last_token.is_some()
    }

    /// Room for a token and a final event: otherwise the client is behind
    /// and the sequence sits this step out.
    fn can_emit(&self) -> bool {
        self.request.events.capacity() >= 2
    }

    fn emit(&mut self, event: SequenceEvent) {
        if self.request.events.try_send(event).is_err() {
            // Closed (the client left) or, impossibly, full: either way the
            // sequence cannot continue.
            self.done = true;
        }
    }
}

struct Scheduler {
    engine: Arc<Engine>,
    config: SchedulerConfig,
    stats: Arc<RouterStats>,
    waiting: VecDeque<GenerationRequest>,
    running: Vec<Sequence>,
}

impl Scheduler {
    fn new(engine: Arc<Engine>, config: SchedulerConfig, stats: Arc<RouterStats>) -> Self {
        Self {
            engine,
            config,
            stats,
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    async fn run<M: MoeLayer<Error = RouterError>>(
        mut self,
        mut submissions: mpsc::Receiver<GenerationRequest>,
        moe: &M,
    ) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match submissions.recv().await {
                    Some(request) => self.waiting.push_back(request),
                    None => return,
                }
            }
            while let Ok(request) = submissions.try_recv() {
                self.waiting.push_back(request);
            }
            self.admit();
            let plan = self.plan();
            if plan.is_empty() {
                // Every running sequence waits for its client to read.
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                continue;
            }
            self.step(plan, moe).await;
            self.running.retain(|sequence| !sequence.done);
        }
    }

    /// Drops cancelled requests and moves waiting ones into the running set.
    fn admit(&mut self) {
        self.running
            .retain(|sequence| !sequence.request.events.is_closed());
        self.waiting.retain(|request| !request.events.is_closed());
        while self.running.len() < self.config.max_running {
            let Some(request) = self.waiting.pop_front() else {
                break;
            };
            self.running.push(Sequence {
                request,
                cache: self.engine.new_cache(),
                prefilled: 0,
                generated: 0,
                last_token: None,
                done: false,
            });
        }
    }

    /// The tokens each running sequence contributes to this step, by index
    /// into `running`: decodes first (they are latency-critical), then
    /// prompt chunks in arrival order with what the budget leaves.
    fn plan(&self) -> Vec<(usize, Vec<u32>)> {
        let mut budget = self.config.max_batch_tokens;
        let mut plan = Vec::new();
        for (index, sequence) in self.running.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if let Some(token) = sequence.last_token.filter(|_| sequence.can_emit()) {
                plan.push((index, vec![token]));
                budget -= 1;
            }
        }
        for (index, sequence) in self.running.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if !sequence.is_decoding() && sequence.can_emit() {
                let prompt = &sequence.request.prompt[sequence.prefilled..];
                let take = prompt.len().min(budget);
                plan.push((index, prompt[..take].to_vec()));
                budget -= take;
            }
        }
        plan.sort_by_key(|(index, _)| *index);
        plan
    }

    async fn step<M: MoeLayer<Error = RouterError>>(
        &mut self,
        plan: Vec<(usize, Vec<u32>)>,
        moe: &M,
    ) {
        let rows: usize = plan.iter().map(|(_, tokens)| tokens.len()).sum();
        let _span = tracing::debug_span!("step", sequences = plan.len(), rows).entered();
        self.stats.record_step(rows);
        let mut planned = plan.iter().peekable();
        let mut chunks = Vec::with_capacity(plan.len());
        for (index, sequence) in self.running.iter_mut().enumerate() {
            if let Some((_, tokens)) = planned.next_if(|(planned_index, _)| *planned_index == index)
            {
                chunks.push(SequenceChunk {
                    cache: &mut sequence.cache,
                    tokens,
                });
            }
        }
        let result = run_micro_batches(
            &self.engine,
            &mut chunks,
            rows,
            self.config.pipeline_min_tokens,
            moe,
        )
        .await;
        drop(chunks);
        let logits = match result {
            Ok(logits) => logits,
            Err(err) => {
                tracing::warn!(%err, sequences = plan.len(), "step failed; ending its sequences");
                for (index, _) in &plan {
                    let sequence = &mut self.running[*index];
                    sequence.emit(SequenceEvent::Failed(err.duplicate()));
                    sequence.done = true;
                }
                return;
            }
        };
        let context = self.engine.config().max_position_embeddings;
        let eos = self.engine.config().eos_token_ids.clone();
        for ((index, tokens), logits) in plan.iter().zip(logits) {
            let sequence = &mut self.running[*index];
            if !sequence.is_decoding() {
                sequence.prefilled += tokens.len();
                if sequence.prefilled < sequence.request.prompt.len() {
                    continue;
                }
            }
            let (token, logprob) = sequence.request.sampler.sample(&logits);
            sequence.generated += 1;
            sequence.last_token = Some(token);
            if sequence.request.stop_at_eos && eos.contains(&token) {
                sequence.emit(SequenceEvent::Finished(Finish::Eos));
                sequence.done = true;
                continue;
            }
            sequence.emit(SequenceEvent::Token { id: token, logprob });
            let full_context = sequence.request.prompt.len() + sequence.generated >= context;
            if sequence.generated >= sequence.request.max_tokens || full_context {
                sequence.emit(SequenceEvent::Finished(Finish::Length));
                sequence.done = true;
            }
        }
    }
}

/// Runs `chunks` as one batch, or, from `min_tokens` tokens on, as two
/// micro-batches of about half the tokens each, polled together on this
/// thread. Returns each chunk's logits, in order.
async fn run_micro_batches<M: MoeLayer<Error = RouterError>>(
    engine: &Engine,
    chunks: &mut [SequenceChunk<'_>],
    rows: usize,
    min_tokens: usize,
    moe: &M,
) -> Result<Vec<Vec<f32>>, RouterError> {
    let logits = |tensor: candle_core::Tensor| -> Result<Vec<Vec<f32>>, RouterError> {
        Ok(tensor.to_vec2::<f32>()?)
    };
    let split = split_point(chunks, rows, min_tokens);
    if split == 0 {
        return logits(engine.step(chunks, moe).await?);
    }
    let (first, second) = chunks.split_at_mut(split);
    let (first, second) = futures::join!(engine.step(first, moe), engine.step(second, moe));
    let mut all = logits(first?)?;
    all.extend(logits(second?)?);
    Ok(all)
}

/// Where to cut `chunks` into two micro-batches of about `rows / 2` tokens
/// each, or 0 to run them as one: below `min_tokens` (0 disables), or when
/// no cut between chunks leaves each side a quarter of the tokens.
fn split_point(chunks: &[SequenceChunk<'_>], rows: usize, min_tokens: usize) -> usize {
    if min_tokens == 0 || rows < min_tokens || chunks.len() < 2 {
        return 0;
    }
    let half = rows / 2;
    let mut before = 0;
    for (index, chunk) in chunks.iter().enumerate() {
        let after = before + chunk.tokens.len();
        if after >= half {
            // Cut before this chunk or after it, whichever is more even.
            let (cut, first) = if after - half <= half - before {
                (index + 1, after)
            } else {
                (index, before)
            };
            // A micro-batch of under a quarter of the tokens overlaps too
            // little to pay for the second pass over the experts.
            let smaller = first.min(rows - first);
            return if smaller * 4 < rows { 0 } else { cut };
        }
        before = after;
    }
    0
}

#[cfg(test)]
mod tests {
    use attention_svc::SequenceCache;

    use super::*;

    fn split_of(lengths: &[usize], min_tokens: usize) -> usize {
        let tokens: Vec<Vec<u32>> = lengths.iter().map(|&n| vec![0; n]).collect();
        let mut caches: Vec<SequenceCache> = lengths
            .iter()
            .map(|_| SequenceCache::new(1, 1, 1))
            .collect();
        let chunks: Vec<SequenceChunk<'_>> = caches
            .iter_mut()
            .zip(&tokens)
            .map(|(cache, tokens)| SequenceChunk { cache, tokens })
            .collect();
        split_point(&chunks, lengths.iter().sum(), min_tokens)
    }

    #[test]
    fn small_steps_and_single_chunks_are_not_split() {
        assert_eq!(split_of(&[1; 32], 256), 0);
        assert_eq!(split_of(&[300], 256), 0);
        assert_eq!(split_of(&[200, 200], 0), 0);
    }

    #[test]
    fn large_steps_split_near_half_the_tokens() {
        assert_eq!(split_of(&[200, 200], 256), 1);
        assert_eq!(split_of(&[1, 1, 1, 1, 500, 500], 256), 5);
        // Decodes first, then two prompt chunks.
        let mut lengths = vec![1; 32];
        lengths.extend([128, 128, 128, 128, 128, 128, 128, 96]);
        let cut = split_of(&lengths, 256);
        let first: usize = lengths[..cut].iter().sum();
        let total: usize = lengths.iter().sum();
        assert!(
            (first as i64 - total as i64 / 2).abs() <= 64,
            "{first} of {total}"
        );
        // One chunk holds nearly everything: no useful split.
        assert_eq!(split_of(&[1, 1000], 256), 0);
    }
}
