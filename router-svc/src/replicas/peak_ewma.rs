//! A replica's latency as the picker sees it: a peak-sensitive moving
//! average (the PeakEwma of tower and linkerd2-proxy). A slower call than
//! the estimate raises it at once; faster ones pull it down gradually, with
//! a weight that decays with the time since the last observation; and as in
//! tower, the estimate also decays toward zero while nothing is observed,
//! so a replica that lost traffic after one slow call is tried again. A
//! replica that turns slow loses traffic on its first slow call, and wins
//! it back only once it has been fast, or unobserved, for a while.

use std::time::{Duration, Instant};

/// The estimate before any call has been observed: a guess at one message's
/// round trip, so that a new replica is neither shunned nor flooded.
pub const DEFAULT_LATENCY: Duration = Duration::from_millis(1);
/// How quickly old observations stop counting. A router sends each expert
/// a message per layer per step, hundreds a second, so a quarter of a
/// second holds many observations (tower's 10 s default is for HTTP
/// request rates).
pub const DECAY: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy)]
pub struct PeakEwma {
    /// Seconds.
    estimate: f64,
    updated: Instant,
    decay: Duration,
}

impl PeakEwma {
    pub fn new(now: Instant) -> Self {
        Self::with(DEFAULT_LATENCY, DECAY, now)
    }

    pub fn with(initial: Duration, decay: Duration, now: Instant) -> Self {
        Self {
            estimate: initial.as_secs_f64(),
            updated: now,
            decay,
        }
    }

    /// Takes in one call's latency, observed at `now`.
    pub fn observe(&mut self, latency: Duration, now: Instant) {
        let latency = latency.as_secs_f64();
        if latency > self.decayed(now) {
            self.estimate = latency;
        } else {
            let weight = self.weight(now);
            self.estimate = self.estimate * weight + latency * (1.0 - weight);
        }
        self.updated = now;
    }

    /// The estimate at `now`: the last one, decayed toward zero for the
    /// time nothing was observed.
    pub fn estimate(&self, now: Instant) -> Duration {
        Duration::from_secs_f64(self.decayed(now))
    }

    fn decayed(&self, now: Instant) -> f64 {
        self.estimate * self.weight(now)
    }

    /// How much the last estimate still counts at `now`.
    fn weight(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        (-elapsed / self.decay.as_secs_f64()).exp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn a_slow_call_raises_the_estimate_at_once() {
        let start = Instant::now();
        let mut ewma = PeakEwma::with(Duration::from_millis(2), SECOND * 10, start);
        let now = start + Duration::from_millis(1);
        ewma.observe(Duration::from_millis(50), now);
        assert_eq!(ewma.estimate(now), Duration::from_millis(50));
    }

    #[test]
    fn fast_calls_pull_it_down_gradually() {
        let start = Instant::now();
        let mut ewma = PeakEwma::with(Duration::from_millis(50), SECOND * 10, start);
        let now = start + SECOND;
        ewma.observe(Duration::from_millis(2), now);
        let after_one = ewma.estimate(now);
        assert!(
            after_one < Duration::from_millis(50) && after_one > Duration::from_millis(40),
            "{after_one:?}: one second is a tenth of the decay"
        );
        for second in 2..60 {
            ewma.observe(Duration::from_millis(2), start + SECOND * second);
        }
        let settled = ewma.estimate(start + SECOND * 59);
        assert!(settled < Duration::from_millis(3), "{settled:?}");
    }

    #[test]
    fn an_unobserved_estimate_decays_toward_zero() {
        let start = Instant::now();
        let mut ewma = PeakEwma::with(Duration::from_millis(1), DECAY, start);
        ewma.observe(Duration::from_millis(40), start);
        assert_eq!(ewma.estimate(start), Duration::from_millis(40));
        let later = ewma.estimate(start + DECAY * 4);
        assert!(later < Duration::from_millis(1), "{later:?}");
    }
}
