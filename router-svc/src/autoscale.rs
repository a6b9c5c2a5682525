//! How many replicas each expert should have: the autoscaling signal the
//! router exports as `moe.expert.desired_replicas`, from what only it
//! knows before any expert is busy (the rows the gate sends each expert)
//! and what the replicas show they can do (rows per second of busy time).
//!
//! ```text
//! demand    = rows routed to the expert per second, smoothed (EWMA, --autoscale-smoothing)
//! capacity  = rows one replica computes per second of busy time (Δ rows served / Δ busy seconds, its replicas together)
//! desired   = clamp(ceil(demand / (capacity × target utilisation × shards)), min, max)
//! ```
//!
//! `shards` is how many layer ranges the expert is cut into (1 unless it is
//! sharded by layers): demand counts an expert's rows at every layer, a
//! shard's replica computes only its layers' rows, so each shard needs its
//! share (shards assumed even). Until a replica has been busy long enough
//! to measure, capacity is unknown and so is the signal (`None`): an
//! autoscaler keeps what it has, as an HPA does without its metric.
//! Capacity measured at light load is an underestimate (a larger product
//! costs less per row), so the signal errs towards more replicas.
//! Stabilisation (how fast to follow the signal) is the autoscaler's
//! business: the HPA's behaviour, or `moe up --autoscale`'s.

use std::time::Duration;

/// The knobs, from router-svc's `--autoscale-*` flags.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoscalePolicy {
    /// The busy fraction each replica should run at (0-1].
    pub target_utilisation: f64,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// The demand's smoothing time constant.
    pub smoothing: Duration,
}

impl Default for AutoscalePolicy {
    fn default() -> Self {
        Self {
            target_utilisation: 0.7,
            min_replicas: 1,
            max_replicas: 8,
            smoothing: Duration::from_secs(10),
        }
    }
}

/// Busy time a capacity measurement spans at least: less is noise. A
/// lightly loaded expert gathers it over several intervals.
const MIN_BUSY_SECONDS: f64 = 0.01;

/// One expert's smoothed demand and learned capacity.
#[derive(Debug, Clone, Default)]
pub struct ExpertDemand {
    /// Rows per second, smoothed; `None` before the first observation.
    demand: Option<f64>,
    /// Rows per busy second of one replica.
    capacity: Option<f64>,
    /// Served rows and busy seconds not yet measured (too little busy
    /// time so far).
    pending_rows: f64,
    pending_busy: f64,
}

/// What was observed of an expert over the last interval.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Observation {
    /// How long the interval was.
    pub seconds: f64,
    /// Rows the gate routed to the expert in it.
    pub rows_routed: f64,
    /// Rows its replicas computed in it, and the busy seconds that took
    /// them, summed over its replicas (what they report).
    pub rows_served: f64,
    pub busy_seconds: f64,
}

impl ExpertDemand {
    /// Folds in one interval.
    pub fn observe(&mut self, seen: Observation, policy: &AutoscalePolicy) {
        if seen.seconds <= 0.0 {
            return;
        }
        let rate = seen.rows_routed / seen.seconds;
        let weight = 1.0 - (-seen.seconds / policy.smoothing.as_secs_f64().max(1e-3)).exp();
        self.demand = Some(match self.demand {
            Some(demand) => demand + weight * (rate - demand),
            None => rate,
        });
        self.pending_rows += seen.rows_served;
        self.pending_busy += seen.busy_seconds;
        if self.pending_busy >= MIN_BUSY_SECONDS && self.pending_rows > 0.0 {
            let measured = self.pending_rows / self.pending_busy;
            (self.pending_rows, self.pending_busy) = (0.0, 0.0);
            // Capacity changes slowly (hardware, batch sizes): the same
            // smoothing, so that one odd interval does not swing it.
            self.capacity = Some(match self.capacity {
                Some(capacity) => capacity + weight * (measured - capacity),
                None => measured,
            });
        }
    }

    pub fn demand(&self) -> Option<f64> {
        self.demand
    }

    pub fn capacity(&self) -> Option<f64> {
        self.capacity
    }

    /// The replicas each of the expert's `shards` should have; `None`
    /// while capacity is not known.
    pub fn desired(&self, shards: u32, policy: &AutoscalePolicy) -> Option<u32> {
        let (demand, capacity) = (self.demand?, self.capacity?);
        if capacity <= 0.0 {
            return None;
        }
        let per_replica = capacity * policy.target_utilisation * f64::from(shards.max(1));
        let replicas = (demand / per_replica).ceil() as u32;
        Some(replicas.clamp(policy.min_replicas, policy.max_replicas))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: AutoscalePolicy = AutoscalePolicy {
        target_utilisation: 0.5,
        min_replicas: 1,
        max_replicas: 10,
        smoothing: Duration::from_secs(5),
    };

    /// One second in which `rows` were routed and a replica serving
    /// `capacity` rows per busy second served them all.
    fn second(rows: f64, capacity: f64) -> Observation {
        Observation {
            seconds: 1.0,
            rows_routed: rows,
            rows_served: rows,
            busy_seconds: rows / capacity,
        }
    }

    /// The desired replicas after each of `series`' seconds.
    fn run(expert: &mut ExpertDemand, series: &[Observation]) -> Vec<u32> {
        series
            .iter()
            .map(|seen| {
                expert.observe(*seen, &POLICY);
                expert.desired(1, &POLICY).unwrap_or(1)
            })
            .collect()
    }

    #[test]
    fn a_step_up_raises_the_signal_within_a_few_time_constants() {
        let mut expert = ExpertDemand::default();
        // 100 rows/s at 1000 rows per busy second: 10% busy, one replica.
        let before = run(&mut expert, &[second(100.0, 1000.0); 20]);
        assert!(before.iter().all(|&d| d == 1), "{before:?}");
        // 2000 rows/s needs 2000 / (1000 × 0.5) = 4 replicas.
        let after = run(&mut expert, &[second(2000.0, 1000.0); 30]);
        assert!(after[0] < 4, "smoothed, not at once: {after:?}");
        assert_eq!(*after.last().unwrap(), 4, "{after:?}");
        let reached = after.iter().position(|&d| d == 4).unwrap();
        assert!(reached <= 15, "about three time constants: {after:?}");
    }

    #[test]
    fn a_step_down_lowers_it_again() {
        let mut expert = ExpertDemand::default();
        run(&mut expert, &[second(2000.0, 1000.0); 30]);
        let after = run(&mut expert, &[second(100.0, 1000.0); 40]);
        assert_eq!(*after.last().unwrap(), 1, "{after:?}");
        assert!(
            after.windows(2).all(|w| w[1] <= w[0]),
            "monotone: {after:?}"
        );
    }

    #[test]
    fn a_one_second_spike_moves_it_little() {
        let mut expert = ExpertDemand::default();
        run(&mut expert, &[second(400.0, 1000.0); 20]);
        // Ten times the load for one second: 4000 rows/s alone would ask
        // for 8; smoothed over 5 s it moves the demand a fifth of the way.
        let spike = run(&mut expert, &[second(4000.0, 1000.0)]);
        assert!(spike[0] <= 3, "{spike:?}");
        let after = run(&mut expert, &[second(400.0, 1000.0); 20]);
        assert_eq!(*after.last().unwrap(), 1);
    }

    #[test]
    fn slower_replicas_need_more_of_them() {
        let (mut fast, mut slow) = (ExpertDemand::default(), ExpertDemand::default());
        let fast_replicas = run(&mut fast, &[second(1000.0, 1000.0); 40]);
        let slow_replicas = run(&mut slow, &[second(1000.0, 250.0); 40]);
        assert_eq!(*fast_replicas.last().unwrap(), 2);
        assert_eq!(*slow_replicas.last().unwrap(), 8);
    }

    #[test]
    fn one_slow_replica_among_fast_ones_lowers_the_pooled_capacity() {
        // 2000 rows/s over two replicas: a fast one (1000 rows per busy
        // second) takes 1600, a slow one (250) 400; both are busy 1.6 s a
        // second. Capacity is pooled: 2000 rows / 3.2 busy s = 625 per
        // replica, so ceil(2000 / (625 × 0.5)) = 7 replicas of that mix,
        // between all fast (4) and all slow (16, held to 10).
        let mixed = Observation {
            seconds: 1.0,
            rows_routed: 2000.0,
            rows_served: 2000.0,
            busy_seconds: 1600.0 / 1000.0 + 400.0 / 250.0,
        };
        let mut expert = ExpertDemand::default();
        let desired = run(&mut expert, &[mixed; 40]);
        let capacity = expert.capacity().unwrap();
        assert!((capacity - 625.0).abs() < 1e-6, "{capacity}");
        assert_eq!(*desired.last().unwrap(), 7, "{desired:?}");
    }

    #[test]
    fn a_lightly_loaded_expert_measures_its_capacity_over_several_intervals() {
        let mut expert = ExpertDemand::default();
        // 1 row/s at 1000 rows per busy second: 0.001 busy seconds a
        // second, a measurement every 10 s.
        run(&mut expert, &[second(1.0, 1000.0); 5]);
        assert_eq!(expert.capacity(), None);
        run(&mut expert, &[second(1.0, 1000.0); 6]);
        let capacity = expert.capacity().unwrap();
        assert!((capacity - 1000.0).abs() < 1e-6, "{capacity}");
    }

    #[test]
    fn each_layer_shard_gets_its_share() {
        let mut expert = ExpertDemand::default();
        // 4000 rows/s over all layers at 1000 rows per busy second: 8
        // replicas' worth at 50%, so 2 for each of 4 shards.
        run(&mut expert, &[second(4000.0, 1000.0); 40]);
        assert_eq!(expert.desired(1, &POLICY), Some(8));
        assert_eq!(expert.desired(4, &POLICY), Some(2));
    }

    #[test]
    fn unknown_capacity_gives_no_signal_and_bounds_hold() {
        let mut expert = ExpertDemand::default();
        // Routed rows but nothing served yet: no capacity to divide by.
        expert.observe(
            Observation {
                seconds: 1.0,
                rows_routed: 500.0,
                ..Observation::default()
            },
            &POLICY,
        );
        assert_eq!(
            expert.desired(1, &POLICY),
            None,
            "no signal without capacity"
        );
        let huge = run(&mut expert, &[second(1e7, 1000.0); 30]);
        assert_eq!(*huge.last().unwrap(), 10, "at most max");
    }
}
