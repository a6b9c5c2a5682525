//! Which replica of an expert takes a message: power of two choices over a
//! cost that counts the router's own rows in flight to each replica and its
//! peak-EWMA latency (Envoy's and linkerd2-proxy's `latency × (pending +
//! 1)`). Counting the router's own in-flight rows is what keeps p2c from
//! herding every message of a layer onto the replica that looked least
//! loaded a moment ago. A plain function over plain values, so that its
//! policy is unit-tested.

use std::time::Duration;

use rand::Rng;

use super::peak_ewma::DEFAULT_LATENCY;

/// One replica as the picker sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReplicaLoad {
    /// Ready to take work: connected, checked, not draining.
    pub ready: bool,
    /// Rows this router has sent it and not had back.
    pub in_flight_rows: u64,
    /// Its peak-EWMA latency.
    pub latency: Duration,
}

impl ReplicaLoad {
    /// What sending it more work is expected to cost; lower is better.
    /// The latency counts as at least [`DEFAULT_LATENCY`], so that rows
    /// piling up on a replica that stopped answering (whose estimate has
    /// decayed, nothing having come back) still make it dear.
    pub fn cost(&self) -> f64 {
        self.latency.max(DEFAULT_LATENCY).as_secs_f64() * (self.in_flight_rows as f64 + 1.0)
    }
}

/// The index of the replica to send to, or `None` when none is ready: two
/// distinct ready replicas drawn at random, the cheaper of the two, a tie
/// broken at random.
pub fn pick(replicas: &[ReplicaLoad], rng: &mut impl Rng) -> Option<usize> {
    let ready: Vec<usize> = (0..replicas.len())
        .filter(|&index| replicas[index].ready)
        .collect();
    match ready.len() {
        0 => None,
        1 => Some(ready[0]),
        n => {
            let first = rng.random_range(0..n);
            let second = (first + rng.random_range(1..n)) % n;
            let (a, b) = (ready[first], ready[second]);
            let (cost_a, cost_b) = (replicas[a].cost(), replicas[b].cost());
            Some(if cost_a < cost_b {
                a
            } else if cost_b < cost_a {
                b
            } else if rng.random_bool(0.5) {
                a
            } else {
                b
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn replica(in_flight_rows: u64, latency_ms: u64) -> ReplicaLoad {
        ReplicaLoad {
            ready: true,
            in_flight_rows,
            latency: Duration::from_millis(latency_ms),
        }
    }

    /// How many of `draws` picks went to each replica.
    fn shares(replicas: &[ReplicaLoad], draws: usize) -> Vec<usize> {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut counts = vec![0; replicas.len()];
        for _ in 0..draws {
            counts[pick(replicas, &mut rng).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn of_two_the_less_loaded_is_always_picked() {
        assert_eq!(shares(&[replica(8, 5), replica(2, 5)], 1000), [0, 1000]);
    }

    #[test]
    fn a_replica_whose_latency_rises_loses_share() {
        let replicas = |slow_ms| [replica(4, slow_ms), replica(4, 5), replica(4, 5)];
        let even = shares(&replicas(5), 3000)[0];
        let slower = shares(&replicas(20), 3000)[0];
        assert!(
            (800..1200).contains(&even),
            "{even} of 3000 when all are alike"
        );
        assert_eq!(slower, 0, "the slow one loses every draw it is in");
        // Cost is latency × (in-flight + 1): an idle slower replica still
        // wins over a busy fast one.
        let idle_but_slow = shares(&[replica(0, 20), replica(8, 5)], 1000);
        assert_eq!(idle_but_slow, [1000, 0]);
    }

    #[test]
    fn ties_are_broken_at_random() {
        let counts = shares(&[replica(3, 5), replica(3, 5)], 2000);
        assert!(
            counts.iter().all(|&count| (850..1150).contains(&count)),
            "{counts:?}"
        );
    }

    #[test]
    fn a_replica_that_is_not_ready_is_never_picked() {
        let draining = ReplicaLoad {
            ready: false,
            ..replica(0, 1)
        };
        assert_eq!(
            shares(&[draining, replica(50, 50), replica(60, 50)], 1000)[0],
            0
        );
        assert_eq!(shares(&[draining, replica(9, 9)], 10), [0, 10]);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert_eq!(pick(&[draining, draining], &mut rng), None);
        assert_eq!(pick(&[], &mut rng), None);
    }
}
