//! The closed-loop load generator: `concurrency` clients, each sending its
//! next request as soon as its previous one ends, until every request of
//! the workload has been sent. Times each token's arrival.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use serde::Serialize;

use super::workload::{Prompt, Workload};

/// A server the generator can load.
pub trait Target: Sync {
    /// Sends `prompt` and calls `on_tokens(n)` each time `n` tokens arrive,
    /// returning once the response has ended; an error says why it failed.
    fn generate(
        &self,
        prompt: &Prompt,
        max_tokens: usize,
        on_tokens: &mut (dyn FnMut(usize) + Send),
    ) -> impl Future<Output = Result<(), String>> + Send;
}

/// p50 / p99 / mean of a set of durations, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
}

impl Latency {
    pub fn of(samples: &mut [Duration]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        // Nearest rank: the smallest sample with at least q of them at or
        // below it.
        let rank = |q: f64| ms(samples[((q * samples.len() as f64).ceil() as usize).max(1) - 1]);
        let total: Duration = samples.iter().sum();
        Self {
            p50_ms: rank(0.50),
            p99_ms: rank(0.99),
            mean_ms: ms(total) / samples.len() as f64,
        }
    }
}

/// What one run of the workload measured.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub requests_ok: usize,
    pub requests_failed: usize,
    /// The first failure's message, when any failed.
    pub first_error: Option<String>,
    pub output_tokens: usize,
    pub duration_s: f64,
    pub output_tokens_per_s: f64,
    /// Time to first token.
    pub ttft: Latency,
    /// Inter-token latency: the gaps between a request's tokens.
    pub itl: Latency,
}

struct Outcome {
    ttft: Option<Duration>,
    gaps: Vec<Duration>,
    tokens: usize,
    error: Option<String>,
}

pub async fn closed_loop<T: Target>(
    target: &T,
    workload: &Workload,
    prompts: &[Prompt],
    progress: &ProgressBar,
) -> Measurement {
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let clients = (0..workload.concurrency.max(1)).map(|_| async {
        let mut outcomes = Vec::new();
        loop {
            let index = next.fetch_add(1, Ordering::Relaxed);
            let Some(prompt) = prompts.get(index) else {
                break;
            };
            let outcome = one_request(target, prompt, workload.max_tokens).await;
            progress.inc(1);
            outcomes.push(outcome);
        }
        outcomes
    });
    let outcomes: Vec<Outcome> = futures::future::join_all(clients)
        .await
        .into_iter()
        .flatten()
        .collect();
    let duration = started.elapsed();
    summarise(outcomes, duration)
}

async fn one_request<T: Target>(target: &T, prompt: &Prompt, max_tokens: usize) -> Outcome {
    let sent = Instant::now();
    let mut last: Option<Instant> = None;
    let mut ttft = None;
    let mut gaps = Vec::with_capacity(max_tokens);
    let mut tokens = 0;
    let mut on_tokens = |n: usize| {
        let now = Instant::now();
        match last {
            None => ttft = Some(now - sent),
            Some(previous) => gaps.push(now - previous),
        }
        // Several tokens in one message arrived together: zero gaps.
        gaps.extend(std::iter::repeat_n(Duration::ZERO, n.saturating_sub(1)));
        last = Some(now);
        tokens += n;
    };
    let result = target.generate(prompt, max_tokens, &mut on_tokens).await;
    Outcome {
        ttft,
        gaps,
        tokens,
        error: result.err(),
    }
}

fn summarise(outcomes: Vec<Outcome>, duration: Duration) -> Measurement {
    let mut ttfts = Vec::new();
    let mut gaps = Vec::new();
    let (mut ok, mut failed, mut tokens, mut first_error) = (0, 0, 0, None);
    for outcome in outcomes {
        tokens += outcome.tokens;
        match outcome.error {
            Some(error) => {
                failed += 1;
                first_error.get_or_insert(error);
            }
            None => {
                ok += 1;
                ttfts.extend(outcome.ttft);
                gaps.extend(outcome.gaps);
            }
        }
    }
    let seconds = duration.as_secs_f64();
    Measurement {
        requests_ok: ok,
        requests_failed: failed,
        first_error,
        output_tokens: tokens,
        duration_s: seconds,
        output_tokens_per_s: tokens as f64 / seconds.max(f64::EPSILON),
        ttft: Latency::of(&mut ttfts),
        itl: Latency::of(&mut gaps),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        samples.reverse();
        let latency = Latency::of(&mut samples);
        assert_eq!(latency.p50_ms, 50.0);
        assert_eq!(latency.p99_ms, 99.0);
        assert!((latency.mean_ms - 50.5).abs() < 1e-9);
        assert_eq!(Latency::of(&mut []).p99_ms, 0.0);
        assert_eq!(Latency::of(&mut [Duration::from_millis(7)]).p50_ms, 7.0);
    }

    /// Answers `max_tokens` tokens in messages of two, failing every third
    /// request.
    struct Scripted {
        calls: AtomicUsize,
    }

    impl Target for Scripted {
        async fn generate(
            &self,
            _: &Prompt,
            max_tokens: usize,
            on_tokens: &mut (dyn FnMut(usize) + Send),
        ) -> Result<(), String> {
            if self.calls.fetch_add(1, Ordering::Relaxed) % 3 == 2 {
                return Err("refused".into());
            }
            for _ in 0..max_tokens / 2 {
                tokio::time::sleep(Duration::from_millis(1)).await;
                on_tokens(2);
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn closed_loop_sends_every_request_and_counts_failures() {
        let workload = Workload {
            concurrency: 4,
            requests: 9,
            prompt_tokens: 1,
            max_tokens: 6,
            seed: 0,
        };
        let prompts = workload.random_prompts(10);
        let target = Scripted {
            calls: AtomicUsize::new(0),
        };
        let measured = closed_loop(&target, &workload, &prompts, &ProgressBar::hidden()).await;
        assert_eq!(target.calls.load(Ordering::Relaxed), 9);
        assert_eq!(measured.requests_ok, 6);
        assert_eq!(measured.requests_failed, 3);
        assert_eq!(measured.first_error.as_deref(), Some("refused"));
        assert_eq!(measured.output_tokens, 36);
        assert!(measured.ttft.p50_ms >= 1.0);
        // 5 gaps per request, one in two of them zero.
        assert_eq!(measured.itl.p50_ms, 0.0);
        assert!(measured.itl.p99_ms >= 1.0);
    }
}
