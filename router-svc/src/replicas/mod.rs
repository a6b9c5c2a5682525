//! The replicas of each expert: which exist ([`set`], fed by
//! [`discovery`]), whether each may take work ([`supervisor`], [`link`]),
//! and which one takes each message ([`picker`], over the load tracked
//! here).

pub mod backoff;
pub mod busy;
pub mod discovery;
pub mod dns;
pub mod link;
pub mod peak_ewma;
pub mod picker;
pub mod set;
pub mod supervisor;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use opentelemetry::metrics::BoundHistogram;
use peak_ewma::PeakEwma;
use picker::ReplicaLoad;

/// One replica's load as this router causes and sees it.
pub struct LoadTracker {
    in_flight_rows: AtomicU64,
    latency: Mutex<PeakEwma>,
    /// The replica's `moe.expert.call.duration` series.
    call_duration: Option<BoundHistogram<f64>>,
}

impl Default for LoadTracker {
    fn default() -> Self {
        Self {
            in_flight_rows: AtomicU64::new(0),
            latency: Mutex::new(PeakEwma::new(Instant::now())),
            call_duration: None,
        }
    }
}

impl std::fmt::Debug for LoadTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadTracker")
            .field("in_flight_rows", &self.in_flight_rows)
            .finish_non_exhaustive()
    }
}

impl LoadTracker {
    /// A tracker that also records each answered call's latency in
    /// `call_duration`.
    pub fn recording(call_duration: BoundHistogram<f64>) -> Self {
        Self {
            call_duration: Some(call_duration),
            ..Self::default()
        }
    }

    pub fn in_flight_rows(&self) -> u64 {
        self.in_flight_rows.load(Ordering::Relaxed)
    }

    /// What the picker weighs.
    pub fn load(&self) -> ReplicaLoad {
        ReplicaLoad {
            ready: true,
            in_flight_rows: self.in_flight_rows.load(Ordering::Relaxed),
            latency: self.latency().estimate(Instant::now()),
        }
    }

    /// Counts `rows` as in flight until the returned guard is dropped.
    pub fn start(self: &Arc<Self>, rows: u64) -> InFlight {
        self.in_flight_rows.fetch_add(rows, Ordering::Relaxed);
        InFlight {
            tracker: self.clone(),
            rows,
            started: Instant::now(),
        }
    }

    /// The estimate, locked. Nothing can be left half-updated in it, so a
    /// poisoned lock is still sound to use.
    fn latency(&self) -> std::sync::MutexGuard<'_, PeakEwma> {
        self.latency
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// Rows on their way to a replica and back. Dropped, they no longer count
/// as in flight, whether the call succeeded, failed or was abandoned.
#[must_use]
pub struct InFlight {
    tracker: Arc<LoadTracker>,
    rows: u64,
    started: Instant,
}

impl InFlight {
    /// The call came back: its latency joins the replica's estimate.
    pub fn succeeded(self) {
        let now = Instant::now();
        let took = now.duration_since(self.started);
        if let Some(histogram) = &self.tracker.call_duration {
            histogram.record(took.as_secs_f64());
        }
        self.tracker.latency().observe(took, now);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.tracker
            .in_flight_rows
            .fetch_sub(self.rows, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_count_as_in_flight_until_the_call_ends_however_it_ends() {
        let tracker = Arc::new(LoadTracker::default());
        let first = tracker.start(3);
        let second = tracker.start(5);
        assert_eq!(tracker.load().in_flight_rows, 8);
        first.succeeded();
        assert_eq!(tracker.load().in_flight_rows, 5);
        drop(second);
        assert_eq!(tracker.load().in_flight_rows, 0);
    }
}
