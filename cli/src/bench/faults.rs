//! `moe bench --kill-every`: SIGKILLs a random expert process at a steady
//! rate while the measured requests run, so that the report shows what
//! crashes cost in latency and failed requests while the launcher heals
//! the cluster. A test tool: it needs a cluster the bench started itself.

use std::convert::Infallible;
use std::sync::Mutex;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::launcher::ExpertSlot;

/// How long a killed process may take to be back after the run: as long
/// as the launcher gives a process to start.
const HEAL_TIMEOUT: Duration = Duration::from_secs(120);

/// Which processes to kill and how often.
pub struct Faults<'a> {
    pub experts: &'a [ExpertSlot],
    pub kill_every: Duration,
    /// The same seed picks the same sequence of victims.
    pub seed: u64,
}

/// What the faults of one run were.
#[derive(Debug, Clone, Serialize)]
pub struct FaultReport {
    pub kill_every_s: f64,
    /// Processes SIGKILLed during the measured requests.
    pub kills: usize,
    /// Replacements that came up, the last after the run: the bench waits
    /// for every killed process's replacement before it goes on.
    pub restarts: u32,
}

/// The kills of one run: for each, the victim's slot and how many times
/// that slot had restarted then, which its replacement will raise.
#[derive(Debug, Default)]
pub struct KillLog(Mutex<Vec<(usize, u32)>>);

impl KillLog {
    pub fn len(&self) -> usize {
        self.kills().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn kills(&self) -> std::sync::MutexGuard<'_, Vec<(usize, u32)>> {
        // A panic while holding it cannot leave the list half-written.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Faults<'_> {
    /// Every `kill_every`, SIGKILLs one of the expert processes running
    /// then, chosen at random, and logs it in `log`; never returns (the
    /// measured run ends it by dropping it). A tick that finds every
    /// process down (all being restarted) kills nothing.
    pub async fn kill_randomly(&self, log: &KillLog) -> Infallible {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let start = tokio::time::Instant::now() + self.kill_every;
        let mut ticks = tokio::time::interval_at(start, self.kill_every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let running: Vec<usize> = (0..self.experts.len())
                .filter(|&index| self.experts[index].pid().is_some())
                .collect();
            if running.is_empty() {
                continue;
            }
            let index = running[rng.random_range(0..running.len())];
            let victim = &self.experts[index];
            let restarts = victim.restarts();
            if victim.kill() {
                log.kills().push((index, restarts));
                tracing::info!(expert = %victim.name, "--kill-every: SIGKILL");
            }
        }
    }

    /// Waits until every process `log` says was killed has a replacement,
    /// so that what follows (another round, the report) sees a whole
    /// cluster. (Waiting for a pid is not enough: a process just killed
    /// keeps its pid until its supervisor has seen it exit.)
    pub async fn wait_healed(&self, log: &KillLog) -> anyhow::Result<()> {
        let kills = log.kills().clone();
        for (index, slot) in self.experts.iter().enumerate() {
            let Some(last) = kills
                .iter()
                .filter(|(i, _)| *i == index)
                .map(|(_, r)| *r)
                .max()
            else {
                continue;
            };
            let restarted = tokio::time::timeout(HEAL_TIMEOUT, slot.wait_restarted(last)).await;
            anyhow::ensure!(
                matches!(restarted, Ok(Ok(_))),
                "{} did not come back within {HEAL_TIMEOUT:?} of the run's end",
                slot.name
            );
        }
        Ok(())
    }

    /// Replacements so far, over every slot.
    pub fn restarts(&self) -> u32 {
        self.experts.iter().map(ExpertSlot::restarts).sum()
    }
}
