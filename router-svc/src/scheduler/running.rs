//! The scheduler's state apart from the engine: the running sequences,
//! how queued requests join them, what each contributes to a step, and
//! what a step's logits do to each. Tested as plain values, as
//! text-generation-inference tests its queue state.

use std::collections::VecDeque;

use attention_svc::SequenceCache;
use tokio::sync::mpsc;

use super::finish::{AfterToken, Finish, Limits};
use super::micro_batch::StepOutcome;
use super::plan::{Candidate, Chunk, Pending, plan_step};
use super::{GenerationRequest, Queued, SequenceEvent};

/// How much KV cache the running sequences may hold, as a bound on
/// admission: each sequence reserves what its prompt and `max_tokens` can
/// fill, so that a running sequence never runs out.
#[derive(Debug, Clone, Copy)]
pub struct KvBudget {
    /// Keys and values of one position over every layer.
    pub bytes_per_token: u64,
    /// `None`: no bound but `--max-running`.
    pub limit: Option<u64>,
}

impl KvBudget {
    #[cfg(test)]
    pub(super) fn unbounded() -> Self {
        Self {
            bytes_per_token: 1,
            limit: None,
        }
    }

    /// What `request` reserves.
    pub fn need(&self, request: &GenerationRequest) -> u64 {
        (request.prompt.len() + request.max_tokens) as u64 * self.bytes_per_token
    }

    fn fits(&self, reserved: u64) -> bool {
        self.limit.is_none_or(|limit| reserved <= limit)
    }

    /// Why `request` can never run under this budget, if it cannot.
    pub fn refuses(&self, request: &GenerationRequest) -> Option<String> {
        let need = self.need(request);
        let limit = self.limit?;
        (need > limit).then(|| {
            format!(
                "prompt ({} tokens) plus max_tokens ({}) needs {need} bytes of KV cache, more than the router's --kv-cache-bytes ({limit})",
                request.prompt.len(),
                request.max_tokens
            )
        })
    }
}

/// One admitted request and its KV cache.
pub(super) struct Sequence {
    pub(super) request: GenerationRequest,
    pub(super) cache: SequenceCache,
    /// Bytes of the KV budget it holds.
    reserved: u64,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    generated: usize,
    /// The last sampled token: the input of the next decode step.
    last_token: Option<u32>,
    /// Experts missing from its steps since its last event (rerouted).
    degraded: Vec<u32>,
    done: bool,
}

/// What the model allows every sequence, from its config.
#[derive(Debug, Clone)]
pub(super) struct ModelLimits {
    pub(super) context: usize,
    pub(super) eos_tokens: Vec<u32>,
}

impl Sequence {
    fn new(request: GenerationRequest, cache: SequenceCache, reserved: u64) -> Self {
        Self {
            request,
            cache,
            reserved,
            prefilled: 0,
            generated: 0,
            last_token: None,
            degraded: Vec::new(),
            done: false,
        }
    }

    fn candidate(&self) -> Candidate<'_> {
        Candidate {
            pending: match self.last_token {
                Some(token) => Pending::Decode(token),
                None => Pending::Prompt(&self.request.prompt[self.prefilled..]),
            },
            // Room for a token and a final event.
            client_ready: self.request.events.capacity() >= 2,
        }
    }

    fn limits(&self, model: &ModelLimits) -> Limits {
        Limits {
            max_tokens: self.request.max_tokens,
            prompt_tokens: self.request.prompt.len(),
            context: model.context,
            stop_at_eos: self.request.stop_at_eos,
        }
    }

    fn is_cancelled(&self) -> bool {
        self.request.events.is_closed()
    }

    fn emit(&mut self, event: SequenceEvent) {
        if self.request.events.try_send(event).is_err() {
            // Closed (the client left) or full, which `client_ready` rules
            // out: either way the sequence cannot go on.
            self.done = true;
        }
    }

    /// Takes in a step that fed it `fed` tokens and produced `logits` for
    /// its last one: a prompt chunk that leaves prompt to go produces
    /// nothing; otherwise the next token is sampled and sent, or ends the
    /// sequence.
    fn advance(&mut self, fed: usize, logits: &[f32], model: &ModelLimits) {
        if self.last_token.is_none() {
            self.prefilled += fed;
            if self.prefilled < self.request.prompt.len() {
                return;
            }
        }
        let (token, logprob) = self.request.sampler.sample(logits);
        self.generated += 1;
        self.last_token = Some(token);
        match self
            .limits(model)
            .after_token(token, self.generated, &model.eos_tokens)
        {
            AfterToken::Continue => self.token(token, logprob),
            AfterToken::SendThenFinish(finish) => {
                self.token(token, logprob);
                self.finish(finish);
            }
            AfterToken::FinishWithoutIt(finish) => self.finish(finish),
        }
    }

    fn token(&mut self, id: u32, logprob: f32) {
        let degraded = std::mem::take(&mut self.degraded);
        self.emit(SequenceEvent::Token {
            id,
            logprob,
            degraded,
        });
    }

    fn finish(&mut self, finish: Finish) {
        let degraded = std::mem::take(&mut self.degraded);
        self.emit(SequenceEvent::Finished { finish, degraded });
        self.done = true;
    }

    /// Some of its rows went to next-best experts because `expert` had no
    /// ready replica.
    fn degrade(&mut self, expert: usize) {
        let expert = expert as u32;
        if !self.degraded.contains(&expert) {
            self.degraded.push(expert);
        }
    }
}

/// The sequences running now, in admission order, and the requests taken
/// off the queue that wait for a running slot.
pub(super) struct Running {
    sequences: Vec<Sequence>,
    /// Still holding their queue places: bounded by the queue's capacity.
    waiting: VecDeque<Queued>,
    max_running: usize,
    model: ModelLimits,
    budget: KvBudget,
}

impl Running {
    pub(super) fn new(max_running: usize, model: ModelLimits, budget: KvBudget) -> Self {
        Self {
            sequences: Vec::new(),
            waiting: VecDeque::new(),
            max_running,
            model,
            budget,
        }
    }

    /// Nothing running and nothing waiting: the scheduler may sleep until
    /// the next request.
    pub(super) fn is_idle(&self) -> bool {
        self.sequences.is_empty() && self.waiting.is_empty()
    }

    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.sequences.is_empty()
    }

    pub(super) fn len(&self) -> usize {
        self.sequences.len()
    }

    pub(super) fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    /// The share of the KV cache the running sequences hold (0-1): of
    /// `--kv-cache-bytes` when set, otherwise of what `--max-running`
    /// sequences of the longest context would hold.
    pub(super) fn kv_cache_usage(&self) -> f64 {
        let reserved: u64 = self.sequences.iter().map(|s| s.reserved).sum();
        let capacity = self.budget.limit.unwrap_or(
            self.max_running as u64 * self.model.context as u64 * self.budget.bytes_per_token,
        );
        if capacity == 0 {
            return 0.0;
        }
        (reserved as f64 / capacity as f64).min(1.0)
    }

    /// The span of a step over `chunks`: a child of the first traced
    /// sequence's request span, following from the others', so that each
    /// request's trace reaches the steps (and expert calls) it took part in.
    pub(super) fn step_span(&self, chunks: &[Chunk]) -> tracing::Span {
        let mut traced = chunks
            .iter()
            .filter_map(|chunk| self.sequences.get(chunk.sequence))
            .map(|sequence| &sequence.request.span)
            .filter(|span| !span.is_disabled());
        let tokens: usize = chunks.iter().map(|chunk| chunk.tokens.len()).sum();
        let span = match traced.next() {
            Some(parent) => tracing::info_span!(
                target: moe_telemetry::TRACE_TARGET,
                parent: parent,
                "step",
                sequences = chunks.len(),
                tokens
            ),
            None => tracing::info_span!(
                target: moe_telemetry::TRACE_TARGET,
                "step",
                sequences = chunks.len(),
                tokens
            ),
        };
        for other in traced {
            span.follows_from(other);
        }
        span
    }

    /// Takes every request off `queue` (after `first`, when given), drops
    /// the cancelled ones (running or waiting; a waiting one gives its
    /// queue place back), then admits waiting requests in arrival order
    /// while there is room: a running slot, and KV cache for the next in
    /// line (which waits rather than be overtaken). An admitted request
    /// leaves the queue and gives its place back.
    pub(super) fn admit(
        &mut self,
        first: Option<Queued>,
        queue: &mut mpsc::Receiver<Queued>,
        mut new_cache: impl FnMut() -> SequenceCache,
    ) {
        self.waiting.extend(first);
        while let Ok(queued) = queue.try_recv() {
            self.waiting.push_back(queued);
        }
        self.waiting
            .retain(|queued| !queued.request.events.is_closed());
        self.sequences.retain(|sequence| !sequence.is_cancelled());
        let mut reserved: u64 = self.sequences.iter().map(|s| s.reserved).sum();
        while self.sequences.len() < self.max_running {
            let Some(next) = self.waiting.front() else {
                break;
            };
            let need = self.budget.need(&next.request);
            if !self.budget.fits(reserved + need) {
                break;
            }
            let Some(queued) = self.waiting.pop_front() else {
                break;
            };
            reserved += need;
            self.sequences
                .push(Sequence::new(queued.request, new_cache(), need));
        }
    }

    /// The next step's chunks, by index into the running sequences.
    pub(super) fn plan(&self, budget: usize) -> Vec<Chunk> {
        let candidates: Vec<Candidate<'_>> =
            self.sequences.iter().map(Sequence::candidate).collect();
        plan_step(&candidates, budget)
    }

    /// The planned sequences' caches with their tokens, in order, for the
    /// engine's step.
    pub(super) fn caches<'a>(
        &'a mut self,
        chunks: &'a [Chunk],
    ) -> impl Iterator<Item = (&'a mut SequenceCache, &'a [u32])> {
        let mut planned = chunks.iter().peekable();
        self.sequences
            .iter_mut()
            .enumerate()
            .filter_map(move |(index, sequence)| {
                planned
                    .next_if(|chunk| chunk.sequence == index)
                    .map(|chunk| (&mut sequence.cache, chunk.tokens.as_slice()))
            })
    }

    /// Takes in a step's outcome: sequences whose rows an expert could not
    /// serve fail, the others advance.
    pub(super) fn settle(&mut self, chunks: &[Chunk], outcome: StepOutcome) {
        for (chunk, expert) in outcome.rerouted {
            self.sequences[chunks[chunk].sequence].degrade(expert);
        }
        let mut failed = outcome.failed;
        for (index, (chunk, logits)) in chunks.iter().zip(&outcome.logits).enumerate() {
            let sequence = &mut self.sequences[chunk.sequence];
            match failed.iter().position(|(failed, _)| *failed == index) {
                Some(position) => {
                    let (_, err) = failed.swap_remove(position);
                    sequence.emit(SequenceEvent::Failed(err));
                    sequence.done = true;
                }
                None => sequence.advance(chunk.tokens.len(), logits, &self.model),
            }
        }
    }

    /// Ends every planned sequence with `error` (the step they were in
    /// failed).
    pub(super) fn fail(&mut self, chunks: &[Chunk], error: impl Fn() -> crate::RouterError) {
        for chunk in chunks {
            let sequence = &mut self.sequences[chunk.sequence];
            sequence.emit(SequenceEvent::Failed(error()));
            sequence.done = true;
        }
    }

    /// Drops the sequences that finished; dropping one frees its KV cache.
    pub(super) fn remove_finished(&mut self) {
        self.sequences.retain(|sequence| !sequence.done);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RouterError;
    use crate::sampling::{Sampler, SamplingParams};
    use crate::scheduler::SchedulerHandle;

    const VOCAB: usize = 8;
    const EOS: u32 = 7;

    fn model() -> ModelLimits {
        ModelLimits {
            context: 32,
            eos_tokens: vec![EOS],
        }
    }

    fn request(
        prompt: Vec<u32>,
        max_tokens: usize,
    ) -> (GenerationRequest, mpsc::Receiver<SequenceEvent>) {
        let (events, receiver) = mpsc::channel(8);
        let request = GenerationRequest {
            prompt,
            max_tokens,
            sampler: Sampler::new(SamplingParams {
                temperature: 0.0,
                top_p: 1.0,
                top_k: 0,
                seed: 0,
            }),
            stop_at_eos: true,
            events,
            span: tracing::Span::none(),
        };
        (request, receiver)
    }

    fn cache() -> SequenceCache {
        SequenceCache::new(1, 1, 1)
    }

    /// Submits `request` through a queue of its own and admits it.
    fn admit_one(running: &mut Running, request: GenerationRequest) {
        let (handle, mut queue) = SchedulerHandle::new(1, KvBudget::unbounded());
        handle.submit(request).unwrap();
        running.admit(None, &mut queue, cache);
    }

    /// Logits whose greedy choice is `token`.
    fn choosing(token: u32) -> Vec<f32> {
        let mut logits = vec![0.0; VOCAB];
        logits[token as usize] = 5.0;
        logits
    }

    fn events(receiver: &mut mpsc::Receiver<SequenceEvent>) -> Vec<String> {
        let mut seen = Vec::new();
        while let Ok(event) = receiver.try_recv() {
            seen.push(match event {
                SequenceEvent::Token { id, degraded, .. } if !degraded.is_empty() => {
                    format!("token {id} without {degraded:?}")
                }
                SequenceEvent::Token { id, .. } => format!("token {id}"),
                SequenceEvent::Finished { finish, .. } => format!("{finish:?}"),
                SequenceEvent::Failed(err) => format!("failed: {err}"),
            });
        }
        seen
    }

    /// Runs steps of `budget` tokens, the model always choosing `token`,
    /// until nothing is planned; returns the chunk sizes of each step.
    fn run(running: &mut Running, budget: usize, token: u32) -> Vec<Vec<usize>> {
        let mut steps = Vec::new();
        loop {
            let chunks = running.plan(budget);
            if chunks.is_empty() {
                return steps;
            }
            steps.push(chunks.iter().map(|chunk| chunk.tokens.len()).collect());
            let logits = vec![choosing(token); chunks.len()];
            running.settle(
                &chunks,
                StepOutcome {
                    logits,
                    ..StepOutcome::default()
                },
            );
            running.remove_finished();
        }
    }

    #[test]
    fn length_finish_after_max_tokens_with_the_prompt_chunked() {
        let mut running = Running::new(4, model(), KvBudget::unbounded());
        let (request, mut receiver) = request((0..10).collect(), 3);
        admit_one(&mut running, request);
        // 10 prompt tokens in chunks of 4, then two decode steps.
        assert_eq!(
            run(&mut running, 4, 3),
            [vec![4], vec![4], vec![2], vec![1], vec![1]]
        );
        assert_eq!(
            events(&mut receiver),
            ["token 3", "token 3", "token 3", "Length"]
        );
        assert!(running.is_empty(), "a finished sequence is dropped");
    }

    #[test]
    fn eos_finish_sends_no_eos_token() {
        let mut running = Running::new(4, model(), KvBudget::unbounded());
        let (request, mut receiver) = request(vec![1, 2], 10);
        admit_one(&mut running, request);
        run(&mut running, 8, EOS);
        assert_eq!(events(&mut receiver), ["Eos"]);
    }

    #[test]
    fn ignore_eos_runs_to_length() {
        let mut running = Running::new(4, model(), KvBudget::unbounded());
        let (mut request, mut receiver) = request(vec![1, 2], 2);
        request.stop_at_eos = false;
        admit_one(&mut running, request);
        run(&mut running, 8, EOS);
        assert_eq!(events(&mut receiver), ["token 7", "token 7", "Length"]);
    }

    #[test]
    fn full_context_finishes_with_length() {
        let mut running = Running::new(4, model(), KvBudget::unbounded());
        // 30 prompt tokens in a context of 32: room for two.
        let (request, mut receiver) = request((0..30).map(|i| i % 5).collect(), 100);
        admit_one(&mut running, request);
        run(&mut running, 64, 3);
        assert_eq!(events(&mut receiver), ["token 3", "token 3", "Length"]);
    }

    #[test]
    fn a_cancelled_sequence_leaves_and_a_cancelled_request_never_runs() {
        let mut running = Running::new(4, model(), KvBudget::unbounded());
        let (handle, mut queue) = SchedulerHandle::new(4, KvBudget::unbounded());
        let (leaving, leaving_events) = request(vec![1], 50);
        let (never, never_events) = request(vec![1], 50);
        let (staying, mut staying_events) = request(vec![1], 2);
        handle.submit(leaving).unwrap();
        running.admit(None, &mut queue, cache);
        run_one_step(&mut running);
        drop(leaving_events);
        drop(never_events);
        handle.submit(never).unwrap();
        handle.submit(staying).unwrap();
        running.admit(None, &mut queue, cache);
        assert_eq!(running.len(), 1, "only the request whose client is there");
        run(&mut running, 8, 3);
        assert_eq!(
            events(&mut staying_events),
            ["token 3", "token 3", "Length"]
        );
    }

    fn run_one_step(running: &mut Running) {
        let chunks = running.plan(8);
        let logits = vec![choosing(3); chunks.len()];
        running.settle(
            &chunks,
            StepOutcome {
                logits,
                ..StepOutcome::default()
            },
        );
        running.remove_finished();
    }

    #[test]
    fn admission_stops_at_max_running_and_the_rest_keep_their_places() {
        let mut running = Running::new(2, model(), KvBudget::unbounded());
        let (handle, mut queue) = SchedulerHandle::new(3, KvBudget::unbounded());
        let mut clients = Vec::new();
        let mut submit = || {
            let (request, events) = request(vec![1], 1);
            clients.push(events);
            handle.submit(request)
        };
        for _ in 0..3 {
            submit().unwrap();
        }
        assert!(
            matches!(submit(), Err(RouterError::Overloaded(ref m)) if m.contains("(3 waiting)")),
            "a fourth request finds the queue full"
        );
        running.admit(None, &mut queue, cache);
        assert_eq!(running.len(), 2);
        // Two were admitted and gave their places back; one still waits.
        submit().unwrap();
        submit().unwrap();
        assert!(submit().is_err(), "three waiting again: full");
        run_one_step(&mut running);
        assert!(running.is_empty(), "both finished after one token");
        running.admit(None, &mut queue, cache);
        assert_eq!(running.len(), 2);
        submit().unwrap();
        submit().unwrap();
        assert!(submit().is_err(), "one waiting and two more: full");
    }

    #[test]
    fn a_request_whose_client_left_gives_its_queue_place_back() {
        let mut running = Running::new(1, model(), KvBudget::unbounded());
        let (handle, mut queue) = SchedulerHandle::new(1, KvBudget::unbounded());
        let (first, _first_events) = request(vec![1], 50);
        handle.submit(first).unwrap();
        running.admit(None, &mut queue, cache);
        let (waiting, waiting_events) = request(vec![1], 50);
        handle.submit(waiting).unwrap();
        let (late, _late_events) = request(vec![1], 50);
        assert!(handle.submit(late).is_err(), "the one place is taken");
        drop(waiting_events);
        running.admit(None, &mut queue, cache);
        let (late, _late_events) = request(vec![1], 50);
        handle
            .submit(late)
            .expect("the cancelled request's place is free");
        assert_eq!(running.len(), 1, "the first still runs");
    }

    #[test]
    fn a_failed_step_ends_only_its_planned_sequences() {
        let mut running = Running::new(4, model(), KvBudget::unbounded());
        let (behind, mut behind_events) = request(vec![1], 5);
        let (planned, mut planned_events) = request(vec![1], 5);
        admit_one(&mut running, behind);
        admit_one(&mut running, planned);
        let chunks = running.plan(8);
        let only_second = [chunks[1].clone()];
        running.fail(&only_second, || crate::RouterError::Internal("boom".into()));
        running.remove_finished();
        assert_eq!(running.len(), 1);
        assert_eq!(
            events(&mut planned_events),
            ["failed: internal error: boom"]
        );
        assert!(events(&mut behind_events).is_empty());
    }

    #[test]
    fn the_kv_budget_bounds_admission_and_is_given_back() {
        // Each request below reserves (2 + 8) × 10 = 100 bytes.
        let budget = KvBudget {
            bytes_per_token: 10,
            limit: Some(250),
        };
        let mut running = Running::new(8, model(), budget);
        let (handle, mut queue) = SchedulerHandle::new(8, budget);
        let mut clients = Vec::new();
        for _ in 0..3 {
            let (request, events) = request(vec![1, 2], 8);
            handle.submit(request).unwrap();
            clients.push(events);
        }
        running.admit(None, &mut queue, cache);
        assert_eq!(running.len(), 2, "two fit in 250 bytes, the third waits");
        drop(clients.remove(0));
        running.admit(None, &mut queue, cache);
        assert_eq!(
            running.len(),
            2,
            "the cancelled one gave its 100 bytes back"
        );
        let (too_large, _events) = request(vec![1; 20], 10);
        let err = handle.submit(too_large).unwrap_err().to_string();
        assert!(
            err.contains("needs 300 bytes of KV cache") && err.contains("(250)"),
            "{err}"
        );
    }

    #[test]
    fn a_failed_expert_call_ends_only_the_sequences_whose_rows_it_held() {
        let mut running = Running::new(4, model(), KvBudget::unbounded());
        let (first, mut first_events) = request(vec![1, 2], 4);
        let (second, mut second_events) = request(vec![3], 4);
        let (third, mut third_events) = request(vec![4], 4);
        for request in [first, second, third] {
            admit_one(&mut running, request);
        }
        let chunks = running.plan(8);
        assert_eq!(chunks.len(), 3);
        running.settle(
            &chunks,
            StepOutcome {
                logits: vec![choosing(3); 3],
                failed: vec![(1, RouterError::ExpertUnavailable("expert 5 is gone".into()))],
                rerouted: vec![(2, 5)],
            },
        );
        running.remove_finished();
        assert_eq!(events(&mut first_events), vec!["token 3"]);
        assert_eq!(events(&mut second_events), vec!["failed: expert 5 is gone"]);
        assert_eq!(events(&mut third_events), vec!["token 3 without [5]"]);
        assert_eq!(running.len(), 2);
    }
}
