//! A request's relay task: turns its sequence's events into the client's
//! responses (text deltas, stop strings, usage, the finish reason).
//! Returning drops the events' receiver, which cancels the sequence: that is
//! how a client that leaves, or a stop string, frees the sequence and its KV
//! cache.

use std::sync::Arc;
use std::time::Duration;

use moe_proto::v1::{Degraded, FinishReason, GenerateResponse, Usage};
use tokenizers::Tokenizer;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::Status;

use crate::RouterError;
use crate::detokenizer::{IncrementalDecoder, StopMatcher};
use crate::request::ValidRequest;
use crate::scheduler::{Finish, SequenceEvent};
use crate::service::ServedModel;
use crate::stats::RouterStats;

/// Relays `events` to `responses` until the sequence ends, fails, the
/// client goes away, the client's `deadline` passes, or the client takes
/// none of its responses for `stalled_after` (a client that stops reading
/// must not hold a running slot for long: its sequence is cancelled).
pub async fn relay(
    request: ValidRequest,
    mut events: mpsc::Receiver<SequenceEvent>,
    responses: mpsc::Sender<Result<GenerateResponse, Status>>,
    model: Arc<ServedModel>,
    (deadline, stalled_after): (Option<Instant>, Duration),
    mut clock: RequestClock,
) {
    let respond = |response| deliver(&responses, response, stalled_after);
    let mut builder = ResponseBuilder::new(&request, model.tokenizer.as_ref());
    let deadline_passes = async {
        match deadline {
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline_passes);
    loop {
        let event = tokio::select! {
            _ = responses.closed() => return,
            () = &mut deadline_passes => Some(SequenceEvent::Failed(
                RouterError::DeadlineExceeded(format!(
                    "the request's deadline passed after {} generated tokens",
                    builder.completion_tokens
                )),
            )),
            event = events.recv() => event,
        };
        let response = match event {
            Some(SequenceEvent::Token {
                id,
                logprob,
                degraded,
            }) => {
                clock.token();
                builder.degraded(degraded);
                builder.token(id, logprob)
            }
            Some(SequenceEvent::Finished { finish, degraded }) => {
                builder.degraded(degraded);
                builder.finished(finish)
            }
            Some(SequenceEvent::Failed(err)) => {
                clock.end("error", err.code(), None);
                // The sequence is over: cancel it before waiting for the
                // client to take the error.
                drop(events);
                let _ = respond(Err(err.into())).await;
                return;
            }
            None => {
                clock.end("error", RouterError::ShuttingDown.code(), None);
                let _ = respond(Err(RouterError::ShuttingDown.into())).await;
                return;
            }
        };
        let last = response.finish_reason != 0;
        if last {
            let usage = response
                .usage
                .map(|usage| (usage.prompt_tokens, usage.completion_tokens));
            clock.end(
                finish_reason_name(response.finish_reason),
                tonic::Code::Ok,
                usage,
            );
        }
        match respond(Ok(response)).await {
            Delivery::Sent if !last => {}
            Delivery::Sent | Delivery::Gone => return,
            Delivery::Stalled => {
                // Cancel the sequence now, then tell the client why, should
                // it read again soon.
                drop(events);
                let stalled = RouterError::ClientStalled(stalled_after);
                tracing::info!(%stalled, "cancelled a request whose client stopped reading");
                clock.end("cancelled", stalled.code(), None);
                let _ = respond(Err(stalled.into())).await;
                return;
            }
        }
    }
}

/// What became of a response.
enum Delivery {
    Sent,
    /// The client went away.
    Gone,
    /// The client took nothing for the stall timeout.
    Stalled,
}

/// Queues `response` for the client, waiting `stalled_after` at most for
/// it to take earlier ones.
async fn deliver(
    responses: &mpsc::Sender<Result<GenerateResponse, Status>>,
    response: Result<GenerateResponse, Status>,
    stalled_after: Duration,
) -> Delivery {
    match tokio::time::timeout(stalled_after, responses.send(response)).await {
        Ok(Ok(())) => Delivery::Sent,
        Ok(Err(_)) => Delivery::Gone,
        Err(_) => Delivery::Stalled,
    }
}

/// One request's responses, built token by token.
/// A request's times as its metrics need them: arrival, each token, the
/// end. A request dropped before its end (its client went away) counts as
/// cancelled.
pub struct RequestClock {
    arrived: Instant,
    last_token: Option<Instant>,
    stats: Arc<RouterStats>,
    ended: bool,
}

impl RequestClock {
    pub fn new(arrived: Instant, stats: Arc<RouterStats>) -> Self {
        Self {
            arrived,
            last_token: None,
            stats,
            ended: false,
        }
    }

    fn token(&mut self) {
        let now = Instant::now();
        match self.last_token {
            None => self.stats.metrics.first_token(now - self.arrived),
            Some(previous) => self.stats.metrics.next_token(now - previous),
        }
        self.last_token = Some(now);
    }

    fn end(&mut self, finish_reason: &'static str, code: tonic::Code, usage: Option<(u32, u32)>) {
        if !std::mem::replace(&mut self.ended, true) {
            let took = self.arrived.elapsed();
            self.stats
                .metrics
                .request_ended(finish_reason, code, took, usage);
        }
    }
}

impl Drop for RequestClock {
    fn drop(&mut self) {
        self.end("cancelled", tonic::Code::Cancelled, None);
    }
}

fn finish_reason_name(reason: i32) -> &'static str {
    match FinishReason::try_from(reason) {
        Ok(FinishReason::Length) => "length",
        Ok(FinishReason::Stop) => "stop",
        Ok(FinishReason::Eos) => "eos",
        Ok(FinishReason::Cancelled) => "cancelled",
        _ => "error",
    }
}

struct ResponseBuilder<'a> {
    tokenizer: Option<&'a Tokenizer>,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    logprobs: bool,
    prompt_tokens: u32,
    completion_tokens: u32,
    /// Experts whose rows went to next-best experts, ascending.
    missing_experts: Vec<u32>,
}

impl<'a> ResponseBuilder<'a> {
    fn new(request: &ValidRequest, tokenizer: Option<&'a Tokenizer>) -> Self {
        Self {
            tokenizer,
            decoder: IncrementalDecoder::new(&request.prompt),
            stops: StopMatcher::new(request.stop.clone()),
            logprobs: request.logprobs,
            prompt_tokens: request.prompt.len() as u32,
            completion_tokens: 0,
            missing_experts: Vec::new(),
        }
    }

    fn degraded(&mut self, missing: Vec<u32>) {
        for expert in missing {
            if let Err(at) = self.missing_experts.binary_search(&expert) {
                self.missing_experts.insert(at, expert);
            }
        }
    }

    /// Said on the last response of a request that was served degraded.
    fn degradation(&self) -> Option<Degraded> {
        (!self.missing_experts.is_empty()).then(|| Degraded {
            missing_experts: self.missing_experts.clone(),
        })
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
        }
    }

    /// A generated token: its text (what a stop string does not hold
    /// back), and the `stop` finish when it completes a stop string.
    fn token(&mut self, id: u32, logprob: f32) -> GenerateResponse {
        self.completion_tokens += 1;
        let delta = self
            .tokenizer
            .map(|tokenizer| self.decoder.push(tokenizer, id))
            .unwrap_or_default();
        let (text, stopped) = self.stops.push(&delta);
        GenerateResponse {
            token_ids: vec![id],
            text,
            logprobs: if self.logprobs { vec![logprob] } else { vec![] },
            finish_reason: if stopped {
                FinishReason::Stop as i32
            } else {
                0
            },
            usage: stopped.then(|| self.usage()),
            degraded: stopped.then(|| self.degradation()).flatten(),
        }
    }

    /// The last response: any text held back, the finish reason, usage.
    fn finished(&mut self, finish: Finish) -> GenerateResponse {
        GenerateResponse {
            text: self.stops.flush(),
            finish_reason: match finish {
                Finish::Length => FinishReason::Length,
                Finish::Eos => FinishReason::Eos,
            } as i32,
            usage: Some(self.usage()),
            degraded: self.degradation(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::SamplingParams;

    fn request(stop: &[&str], logprobs: bool) -> ValidRequest {
        ValidRequest {
            prompt: vec![1, 2, 3],
            max_tokens: 10,
            sampling: SamplingParams {
                temperature: 0.0,
                top_p: 1.0,
                top_k: 0,
                seed: 0,
            },
            stop: stop.iter().map(|s| s.to_string()).collect(),
            logprobs,
            stop_at_eos: true,
        }
    }

    #[test]
    fn tokens_then_length_with_usage() {
        let request = request(&[], true);
        let mut builder = ResponseBuilder::new(&request, None);
        let first = builder.token(7, -0.5);
        assert_eq!(first.token_ids, [7]);
        assert_eq!(first.logprobs, [-0.5]);
        assert_eq!(first.finish_reason, 0);
        assert!(first.usage.is_none());
        builder.token(8, -0.25);
        let last = builder.finished(Finish::Length);
        assert_eq!(last.finish_reason, FinishReason::Length as i32);
        assert!(last.token_ids.is_empty());
        let usage = last.usage.unwrap();
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (3, 2));
    }

    #[test]
    fn eos_finishes_with_eos_and_logprobs_only_when_asked() {
        let request = request(&[], false);
        let mut builder = ResponseBuilder::new(&request, None);
        assert!(builder.token(7, -0.5).logprobs.is_empty());
        let last = builder.finished(Finish::Eos);
        assert_eq!(last.finish_reason, FinishReason::Eos as i32);
        assert_eq!(last.usage.unwrap().completion_tokens, 1);
    }

    #[test]
    fn a_stop_string_finishes_with_stop() {
        let tokenizer = moe_model::synth::train_tokenizer(300).unwrap();
        let request = request(&["the"], false);
        let mut builder = ResponseBuilder::new(&request, Some(&tokenizer));
        let ids = tokenizer.encode("and the rest", false).unwrap();
        let mut stopped = None;
        let mut text = String::new();
        for &id in ids.get_ids() {
            let response = builder.token(id, 0.0);
            text.push_str(&response.text);
            if response.finish_reason != 0 {
                stopped = Some(response);
                break;
            }
        }
        let stopped = stopped.expect("the stop string ends the sequence");
        assert_eq!(stopped.finish_reason, FinishReason::Stop as i32);
        assert!(stopped.usage.is_some());
        assert!(
            !text.contains("the"),
            "{text:?}: the stop string is not sent"
        );
    }
}
