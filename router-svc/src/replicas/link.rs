//! What a replica's supervisor, its endpoint actor and the picker share:
//! the replica's state, the checked connection messages may go on, and its
//! load.
//!
//! Only the supervisor opens a [`Session`], after Describe matched on that
//! very connection; the actor sends only on the current session's channel.
//! That channel never dials again (`moe_proto::dial_once`): when its
//! connection breaks, its stream and health watch fail, the session ends,
//! and the next connection is checked anew.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tonic::transport::Channel;

use opentelemetry::metrics::BoundCounter;

use super::LoadTracker;
use super::busy::BusySamples;
use super::picker::ReplicaLoad;

/// Where a replica is in its life, as the router sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ReplicaState {
    /// Connecting, or checking what it serves.
    Connecting = 0,
    /// Checked and SERVING: takes messages.
    Ready = 1,
    /// Reports NOT_SERVING: finishes what it has, takes nothing new.
    Draining = 2,
    /// Unreachable; reconnected with backoff.
    Down = 3,
    /// Serves something else than the router expects (another checkpoint,
    /// expert or layers); checked again with backoff.
    Refused = 4,
    /// No longer listed by its source; dropped once its messages end.
    Removed = 5,
}

impl ReplicaState {
    fn from_u8(value: u8) -> Self {
        match value {
            1 => Self::Ready,
            2 => Self::Draining,
            3 => Self::Down,
            4 => Self::Refused,
            5 => Self::Removed,
            _ => Self::Connecting,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Ready => "ready",
            Self::Draining => "draining",
            Self::Down => "down",
            Self::Refused => "refused",
            Self::Removed => "removed",
        }
    }
}

impl std::fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A connection whose Describe matched. `generation` tells sessions of the
/// same replica apart, so that a failure reported late cannot end a newer one.
#[derive(Clone)]
pub struct Session {
    pub generation: u64,
    pub channel: Channel,
}

/// What a replica reports of its work since it started (Describe).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Work {
    pub rows_served: u64,
    pub busy_seconds: f64,
}

pub struct Link {
    state: AtomicU8,
    /// Why it is out of service, when it is: what errors and the router's
    /// not-ready answers say of it.
    problem: Mutex<Option<String>>,
    session: watch::Sender<Option<Session>>,
    /// The generation whose connection the actor saw fail.
    lost: watch::Sender<u64>,
    pub load: Arc<LoadTracker>,
    /// The busy seconds the replica reports, sampled.
    busy: Mutex<BusySamples>,
    /// The rows it has served and the busy seconds they took, as it last
    /// reported them (cumulative since it started).
    work: Mutex<Option<Work>>,
    /// Counts the times a ready replica went down (`moe.expert.failovers`).
    failovers: Option<BoundCounter<u64>>,
    /// Bumped on every state change of any replica of the router: wakes
    /// messages waiting for a ready replica, and the coverage check.
    changed: Arc<watch::Sender<u64>>,
}

impl Link {
    pub fn new(changed: Arc<watch::Sender<u64>>) -> Self {
        Self::recording(changed, LoadTracker::default(), None)
    }

    /// A link whose load tracker and failovers feed the router's metrics.
    pub fn recording(
        changed: Arc<watch::Sender<u64>>,
        load: LoadTracker,
        failovers: Option<BoundCounter<u64>>,
    ) -> Self {
        Self {
            state: AtomicU8::new(ReplicaState::Connecting as u8),
            problem: Mutex::new(None),
            session: watch::Sender::new(None),
            lost: watch::Sender::new(0),
            load: Arc::new(load),
            failovers,
            busy: Mutex::default(),
            work: Mutex::default(),
            changed,
        }
    }

    pub fn state(&self) -> ReplicaState {
        ReplicaState::from_u8(self.state.load(Ordering::Acquire))
    }

    pub fn set_state(&self, state: ReplicaState) {
        let previous = self.state.swap(state as u8, Ordering::AcqRel);
        if previous == ReplicaState::Ready as u8
            && state == ReplicaState::Down
            && let Some(failovers) = &self.failovers
        {
            failovers.add(1);
        }
        if previous != state as u8 {
            self.changed.send_modify(|version| *version += 1);
        }
    }

    /// Records why the replica is out of service (`None`: it is not).
    pub fn set_problem(&self, problem: Option<String>) {
        *self.problem.lock().unwrap_or_else(|p| p.into_inner()) = problem;
    }

    pub fn problem(&self) -> Option<String> {
        self.problem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// What the picker weighs.
    pub fn load(&self) -> ReplicaLoad {
        ReplicaLoad {
            ready: self.state() == ReplicaState::Ready,
            ..self.load.load()
        }
    }

    /// The checked connection to send on, if any.
    pub fn session(&self) -> Option<Session> {
        self.session.borrow().clone()
    }

    /// The generation of the current session (0: none).
    pub fn generation(&self) -> u64 {
        self.session
            .borrow()
            .as_ref()
            .map_or(0, |session| session.generation)
    }

    /// A checked connection takes work from now on, unless the actor has
    /// already reported it lost.
    pub fn open(&self, session: Session) {
        if *self.lost.borrow() == session.generation {
            return;
        }
        self.session.send_replace(Some(session));
        self.set_state(ReplicaState::Ready);
    }

    /// Ends the current session, if any, leaving the replica in `state`.
    pub fn close(&self, state: ReplicaState) {
        self.session.send_replace(None);
        self.set_state(state);
    }

    /// The actor's stream on `generation`'s connection failed: the replica
    /// takes nothing more until its supervisor has reconnected and checked
    /// it again.
    pub fn report_lost(&self, generation: u64) {
        if generation != 0 && self.generation() == generation {
            self.close(ReplicaState::Down);
            self.lost.send_replace(generation);
        }
    }

    /// The replica reported its work since it started.
    pub fn record_work(&self, work: Work) {
        lock(&self.busy).record(std::time::Instant::now(), work.busy_seconds);
        *lock(&self.work) = Some(work);
    }

    /// The work the replica last reported.
    pub fn work(&self) -> Option<Work> {
        *lock(&self.work)
    }

    /// The fraction of the last seconds the replica spent computing.
    pub fn busy_fraction(&self) -> Option<f64> {
        lock(&self.busy).fraction()
    }

    /// Resolves once the actor reports `generation` lost.
    pub async fn lost(&self, generation: u64) {
        let mut lost = self.lost.subscribe();
        let _ = lost.wait_for(|&lost| lost == generation).await;
    }
}

/// Nothing can be left half-updated behind these locks, so a poisoned one
/// is still sound to use.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}
