//! The replicas of each expert: which exist ([`set`], fed by
//! [`discovery`]), whether each may take work ([`supervisor`], [`link`]),
//! and which one takes each message ([`picker`], over the load tracked
//! here).

pub mod backoff;
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

use peak_ewma::PeakEwma;
use picker::ReplicaLoad;

/// One replica's load as this router causes and sees it.
#[derive(Debug)]
pub struct LoadTracker {
    in_flight_rows: AtomicU64,
    latency: Mutex<PeakEwma>,
}

impl Default for LoadTracker {
    fn default() -> Self {
        Self {
            in_flight_rows: AtomicU64::new(0),
            latency: Mutex::new(PeakEwma::new(Instant::now())),
        }
    }
}

impl LoadTracker {
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
        self.tracker
            .latency()
            .observe(now.duration_since(self.started), now);
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
