//! How busy a replica is, from the busy seconds it reports (Describe's
//! `busy_seconds`, a counter of time spent computing) polled about once a
//! second: the fraction of the last few seconds it spent computing.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Samples older than this no longer count.
const WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct BusySamples {
    samples: VecDeque<(Instant, f64)>,
}

impl BusySamples {
    /// The replica reported `busy_seconds` in all at `at`. A counter that
    /// went down (the process restarted) starts the window again.
    pub fn record(&mut self, at: Instant, busy_seconds: f64) {
        if self
            .samples
            .back()
            .is_some_and(|&(_, last)| busy_seconds < last)
        {
            self.samples.clear();
        }
        self.samples.push_back((at, busy_seconds));
        while self
            .samples
            .front()
            .is_some_and(|&(then, _)| at.duration_since(then) > WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// The fraction of the window spent computing (0-1), once two samples
    /// span some time.
    pub fn fraction(&self) -> Option<f64> {
        let (&(first_at, first), &(last_at, last)) = (self.samples.front()?, self.samples.back()?);
        let span = last_at.duration_since(first_at).as_secs_f64();
        (span > 0.0).then(|| ((last - first) / span).clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(fraction: Option<f64>, expected: f64) -> bool {
        fraction.is_some_and(|fraction| (fraction - expected).abs() < 1e-9)
    }

    #[test]
    fn the_fraction_is_busy_time_over_wall_time_in_the_window() {
        let start = Instant::now();
        let mut busy = BusySamples::default();
        assert_eq!(busy.fraction(), None);
        busy.record(start, 5.0);
        assert_eq!(busy.fraction(), None, "one sample spans no time");
        busy.record(start + Duration::from_secs(2), 6.0);
        assert!(close(busy.fraction(), 0.5), "{:?}", busy.fraction());
        // Old samples leave the window: at 13 s only those of the last
        // 10 s count, 6.0 busy seconds at 12 s and 6.9 at 13 s.
        busy.record(start + Duration::from_secs(12), 6.0);
        busy.record(start + Duration::from_secs(13), 6.9);
        assert!(close(busy.fraction(), 0.9), "{:?}", busy.fraction());
    }

    #[test]
    fn a_restarted_replica_starts_the_window_again() {
        let start = Instant::now();
        let mut busy = BusySamples::default();
        busy.record(start, 100.0);
        busy.record(start + Duration::from_secs(1), 0.2);
        assert_eq!(busy.fraction(), None);
        busy.record(start + Duration::from_secs(2), 0.7);
        assert!(close(busy.fraction(), 0.5), "{:?}", busy.fraction());
    }
}
