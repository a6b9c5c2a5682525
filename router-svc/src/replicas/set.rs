//! Every expert's replicas, as their sources list them now: replicas join
//! (and start being checked) and leave (taking no new work, dropped once
//! their messages end) while the router runs.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::{Arc, RwLock};

use tokio::sync::{Notify, watch};

use super::link::{Link, ReplicaState};
use super::picker::{self, ReplicaLoad};
use super::supervisor::{self, Expected, Supervised};
use crate::dispatch::{DispatchSettings, EndpointClient};
use crate::replicas::LoadTracker;
use crate::stats::{ReplicaReport, RouterStats};

/// A replica as its source names it: which expert, which layers, where.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReplicaKey {
    pub expert: usize,
    pub layers: Range<usize>,
    pub uri: String,
    /// The name its TLS certificate must carry: a `dns:///NAME:PORT`
    /// replica's NAME (its URI holds the address NAME resolved to); None,
    /// the URI's host.
    pub tls_name: Option<String>,
}

pub struct Replica {
    pub key: ReplicaKey,
    pub client: EndpointClient,
    pub link: Arc<Link>,
    removed: watch::Sender<bool>,
}

impl Replica {
    /// What an error or a log line calls it.
    pub fn label(&self) -> &str {
        self.client.label()
    }
}

/// A message already tried on this replica's session: a retry goes
/// elsewhere, unless the replica has reconnected since.
#[derive(Clone)]
pub struct Tried {
    replica: Arc<Replica>,
    generation: u64,
}

impl Tried {
    pub fn new(replica: Arc<Replica>, generation: u64) -> Self {
        Self {
            replica,
            generation,
        }
    }
}

pub struct ReplicaSets {
    per_expert: Vec<RwLock<Vec<Arc<Replica>>>>,
    num_layers: usize,
    changed: Arc<watch::Sender<u64>>,
    settings: Arc<DispatchSettings>,
    expected: Arc<Expected>,
    stats: Arc<RouterStats>,
    /// Notified when a replica cannot be reached, so that discovery looks
    /// again (a DNS name may point elsewhere by now).
    pub connection_failed: Arc<Notify>,
}

impl ReplicaSets {
    pub fn new(
        num_experts: usize,
        settings: DispatchSettings,
        expected: Expected,
        stats: Arc<RouterStats>,
    ) -> Self {
        Self {
            per_expert: (0..num_experts).map(|_| RwLock::default()).collect(),
            num_layers: expected.config.num_hidden_layers,
            changed: Arc::new(watch::Sender::new(0)),
            settings: Arc::new(settings),
            expected: Arc::new(expected),
            stats,
            connection_failed: Arc::default(),
        }
    }

    pub fn num_experts(&self) -> usize {
        self.per_expert.len()
    }

    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// Makes the sets those of `desired`: new replicas are started (and
    /// take work once checked), missing ones stop taking work.
    pub fn reconcile(&self, desired: &[ReplicaKey]) {
        let wanted: HashSet<&ReplicaKey> = desired.iter().collect();
        let mut changed = false;
        for (expert, set) in self.per_expert.iter().enumerate() {
            let mut set = write(set);
            set.retain(|replica| {
                let keep = wanted.contains(&replica.key);
                if !keep {
                    tracing::info!(
                        replica = replica.label(),
                        "replica no longer listed; removing"
                    );
                    replica.removed.send_replace(true);
                    replica.link.close(ReplicaState::Removed);
                    changed = true;
                }
                keep
            });
            for key in desired.iter().filter(|key| key.expert == expert) {
                if !set.iter().any(|replica| replica.key == *key) {
                    tracing::info!(expert, layers = ?key.layers, uri = %key.uri, "replica added");
                    set.push(self.start(key.clone()));
                    changed = true;
                }
            }
        }
        if changed {
            self.changed.send_modify(|version| *version += 1);
        }
    }

    fn start(&self, key: ReplicaKey) -> Arc<Replica> {
        let metrics = &self.stats.metrics;
        let link = Arc::new(Link::recording(
            self.changed.clone(),
            LoadTracker::recording(metrics.bind_call_duration(key.expert, &key.uri)),
            metrics.bind_failovers(key.expert),
        ));
        let label: Arc<str> = format!("expert {} at {}", key.expert, key.uri).into();
        let client = EndpointClient::spawn(
            label.clone(),
            link.clone(),
            self.settings.clone(),
            self.stats.clone(),
        );
        let (removed, removed_signal) = watch::channel(false);
        tokio::spawn(supervisor::supervise(
            Supervised {
                label,
                uri: key.uri.clone(),
                tls_name: key.tls_name.clone(),
                expert: key.expert,
                layers: key.layers.clone(),
            },
            link.clone(),
            self.expected.clone(),
            self.stats.clone(),
            removed_signal,
            self.connection_failed.clone(),
        ));
        Arc::new(Replica {
            key,
            client,
            link,
            removed,
        })
    }

    /// The replica of (`expert`, `layer`) that takes the next message:
    /// power of two choices among the ready ones not yet tried.
    pub fn pick(&self, expert: usize, layer: usize, tried: &[Tried]) -> Option<Arc<Replica>> {
        let set = read(self.per_expert.get(expert)?);
        let mut candidates: Vec<&Arc<Replica>> = Vec::with_capacity(set.len());
        let mut loads: Vec<ReplicaLoad> = Vec::with_capacity(set.len());
        for replica in set.iter() {
            if !replica.key.layers.contains(&layer) {
                continue;
            }
            let generation = replica.link.generation();
            if tried
                .iter()
                .any(|t| Arc::ptr_eq(&t.replica, replica) && t.generation == generation)
            {
                continue;
            }
            candidates.push(replica);
            loads.push(replica.link.load());
        }
        picker::pick(&loads, &mut rand::rng()).map(|index| candidates[index].clone())
    }

    /// How many replicas of (`expert`, `layer`) are ready now.
    pub fn ready_count(&self, expert: usize, layer: usize) -> usize {
        self.per_expert.get(expert).map_or(0, |set| {
            read(set)
                .iter()
                .filter(|replica| {
                    replica.key.layers.contains(&layer)
                        && replica.link.state() == ReplicaState::Ready
                })
                .count()
        })
    }

    /// Resolves at the next change of any replica's state.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Which experts (and layers) have no ready replica now.
    pub fn coverage(&self) -> Coverage {
        let mut coverage = Coverage::default();
        for (expert, set) in self.per_expert.iter().enumerate() {
            let set = read(set);
            let uncovered: Vec<usize> = (0..self.num_layers)
                .filter(|layer| {
                    !set.iter().any(|replica| {
                        replica.key.layers.contains(layer)
                            && replica.link.state() == ReplicaState::Ready
                    })
                })
                .collect();
            if let (Some(&first), Some(&last)) = (uncovered.first(), uncovered.last()) {
                let layers = if uncovered.len() == self.num_layers {
                    String::new()
                } else {
                    format!(" at layers {first}..={last}")
                };
                coverage.missing.push(format!("expert {expert}{layers}"));
                coverage.states.push(describe_states(&set));
            }
        }
        coverage
    }

    /// Each replica of `expert` and its state, for an error message.
    pub fn states_of(&self, expert: usize) -> String {
        self.per_expert
            .get(expert)
            .map_or_else(String::new, |set| describe_states(&read(set)))
    }

    /// Every replica now, for the Stats RPC.
    pub fn reports(&self) -> Vec<ReplicaReport> {
        self.per_expert
            .iter()
            .flat_map(|set| {
                read(set)
                    .iter()
                    .map(|replica| ReplicaReport {
                        expert: replica.key.expert,
                        layers: replica.key.layers.clone(),
                        uri: replica.key.uri.clone(),
                        state: replica.link.state(),
                        load: replica.link.load(),
                        busy_fraction: replica.link.busy_fraction(),
                        work: replica.link.work(),
                        problem: replica.link.problem(),
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// The experts without a ready replica, and what their replicas are doing.
#[derive(Debug, Default)]
pub struct Coverage {
    /// "expert 3", or "expert 3 at layers 0..=7": what changes it is news.
    pub missing: Vec<String>,
    /// Each missing one's replicas and their states, for the log.
    states: Vec<String>,
}

impl Coverage {
    pub fn is_complete(&self) -> bool {
        self.missing.is_empty()
    }

    /// Why the router is not serving, replica by replica.
    pub fn explain(&self) -> String {
        self.missing
            .iter()
            .zip(&self.states)
            .map(|(expert, states)| format!("{expert} has no ready replica ({states})"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn describe_states(set: &[Arc<Replica>]) -> String {
    if set.is_empty() {
        return "none listed".into();
    }
    set.iter()
        .map(|replica| {
            let state = replica.link.state();
            match replica.link.problem() {
                Some(problem) if state != ReplicaState::Ready => {
                    format!("{} {state}: {problem}", replica.label())
                }
                _ => format!("{} {state}", replica.label()),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A set is changed only by `retain` and `push` under the lock, each of
/// which leaves a valid list, so a poisoned lock still holds one.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poison| poison.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|poison| poison.into_inner())
}
