//! How long a supervisor waits before reconnecting to a replica: doubling
//! from [`FIRST`] up to [`CAP`], each wait drawn from its upper half so
//! that replicas lost together (a node, a network blip) do not all knock
//! again at the same instant.

use std::time::Duration;

use rand::Rng;

/// The first wait: short, because a replica restarted by its supervisor or
/// by Kubernetes is usually back within a fraction of a second.
pub const FIRST: Duration = Duration::from_millis(50);
pub const CAP: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The wait after one more failure in a row.
    pub fn next(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = FIRST.saturating_mul(1 << self.failures.min(16)).min(CAP);
        self.failures = self.failures.saturating_add(1);
        let half = ceiling / 2;
        half + half.mul_f64(rng.random::<f64>())
    }

    /// A connection worked: the next failure starts from the first wait.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_with_jitter_in_the_upper_half() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut backoff = Backoff::default();
        let mut ceiling = FIRST;
        for _ in 0..10 {
            let wait = backoff.next(&mut rng);
            assert!(
                wait >= ceiling / 2 && wait <= ceiling,
                "{wait:?} vs {ceiling:?}"
            );
            ceiling = (ceiling * 2).min(CAP);
        }
        assert!(backoff.next(&mut rng) >= CAP / 2);
        backoff.reset();
        assert!(backoff.next(&mut rng) <= FIRST);
    }

    #[test]
    fn replicas_failing_together_do_not_retry_in_step() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let waits: Vec<Duration> = (0..8)
            .map(|_| {
                let mut backoff = Backoff::default();
                backoff.next(&mut rng);
                backoff.next(&mut rng)
            })
            .collect();
        let distinct: std::collections::HashSet<_> = waits.iter().collect();
        assert!(distinct.len() > 4, "{waits:?}");
    }
}
