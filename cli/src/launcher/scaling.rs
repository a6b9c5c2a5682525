//! How `moe up --autoscale` follows each expert's desired-replicas signal:
//! the HorizontalPodAutoscaler's stabilisation rules, as a plain value.
//!
//! Every second the router's signal is a recommendation. Scaling up goes
//! to the *lowest* recommendation of the last `up_window` (the load must
//! have asked for it the whole window), scaling down to the *highest* of
//! the last `down_window` (a dip must last before capacity is given back),
//! both within `[min_replicas, max_replicas]`: what `behavior.scaleUp` and
//! `behavior.scaleDown` `stabilizationWindowSeconds` do in the generated
//! HPAs. Their rate policies (2 pods a minute up, 1 every 2 minutes down)
//! are not applied here: they pace pods that need a node and minutes to
//! load, where a local process starts in about a second.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScalePolicy {
    pub min_replicas: usize,
    pub max_replicas: usize,
    pub up_window: Duration,
    pub down_window: Duration,
}

impl Default for ScalePolicy {
    /// The generated HPAs' behaviour.
    fn default() -> Self {
        Self {
            min_replicas: 1,
            max_replicas: 4,
            up_window: Duration::from_secs(30),
            down_window: Duration::from_secs(300),
        }
    }
}

/// One expert's recent recommendations.
#[derive(Debug, Default)]
pub struct Stabiliser {
    recommendations: VecDeque<(Instant, usize)>,
}

impl Stabiliser {
    /// The replicas to run now, given the signal's `desired` at `at` and
    /// the `current` count.
    pub fn next(
        &mut self,
        at: Instant,
        desired: usize,
        current: usize,
        policy: &ScalePolicy,
    ) -> usize {
        let bounded = |replicas: usize| replicas.clamp(policy.min_replicas, policy.max_replicas);
        self.recommendations.push_back((at, bounded(desired)));
        let longest = policy.up_window.max(policy.down_window);
        while self
            .recommendations
            .front()
            .is_some_and(|&(then, _)| at.duration_since(then) > longest)
        {
            self.recommendations.pop_front();
        }
        let within = |window: Duration| {
            self.recommendations
                .iter()
                .filter(move |&&(then, _)| at.duration_since(then) <= window)
                .map(|&(_, replicas)| replicas)
        };
        let up_to = within(policy.up_window).min().unwrap_or(current);
        let down_to = within(policy.down_window).max().unwrap_or(current);
        let target = if up_to > current {
            up_to
        } else if down_to < current {
            down_to
        } else {
            current
        };
        bounded(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: ScalePolicy = ScalePolicy {
        min_replicas: 1,
        max_replicas: 5,
        up_window: Duration::from_secs(3),
        down_window: Duration::from_secs(10),
    };

    /// Feeds one recommendation a second, applying each decision; the
    /// replica count after each second.
    fn follow(desired: &[usize]) -> Vec<usize> {
        let start = Instant::now();
        let mut stabiliser = Stabiliser::default();
        let mut current = 1;
        desired
            .iter()
            .enumerate()
            .map(|(second, &want)| {
                let at = start + Duration::from_secs(second as u64);
                current = stabiliser.next(at, want, current, &POLICY);
                current
            })
            .collect()
    }

    #[test]
    fn scaling_up_waits_until_the_whole_up_window_asked_for_it() {
        let replicas = follow(&[1, 3, 3, 3, 3, 3]);
        assert_eq!(replicas, [1, 1, 1, 1, 3, 3]);
    }

    #[test]
    fn a_short_spike_scales_nothing_and_a_dip_gives_nothing_back_early() {
        assert_eq!(follow(&[1, 4, 1, 1, 1]), [1; 5]);
        // Up to 3, then the signal falls to 1: down only once 10 s of it
        // have passed without a higher recommendation.
        let mut signal = vec![3; 6];
        signal.extend([1; 14]);
        let replicas = follow(&signal);
        assert_eq!(replicas[5], 3);
        let down = replicas.iter().rposition(|&r| r == 3).unwrap() + 1;
        assert_eq!(down, 16, "{replicas:?}");
        assert_eq!(*replicas.last().unwrap(), 1);
    }

    #[test]
    fn bounds_hold_whatever_the_signal_says() {
        assert!(follow(&[9; 8]).iter().all(|&r| r <= 5));
        assert_eq!(*follow(&[9; 8]).last().unwrap(), 5);
        assert!(follow(&[0; 8]).iter().all(|&r| r == 1));
    }
}
