//! How long the launcher waits before restarting an expert process that
//! exited unasked.
//!
//! A one-off crash should heal within a fraction of a second, since
//! requests that need the expert fail until it is back; a process that
//! dies again and again (a port another program took, a checkpoint that
//! no longer loads) must not spin a core or flood the log. So the delay
//! starts short and doubles with each exit that follows soon after a
//! restart, up to a cap, and a process that stayed up long enough to have
//! been healthy earns the short delay again.

use std::time::Duration;

/// The delay before one slot's next restart. A plain value: the
/// supervisor feeds it each exit's uptime, and tests feed it numbers.
#[derive(Debug, Clone)]
pub struct RestartBackoff {
    next: Duration,
}

impl RestartBackoff {
    /// The delay after a first exit, or after one that ends a healthy run.
    pub const INITIAL: Duration = Duration::from_millis(100);
    /// The longest delay: a crash loop retries this often.
    pub const MAX: Duration = Duration::from_secs(5);
    /// Uptime after which a process counts as having been healthy: short,
    /// because a process killed from outside (an OOM kill, a chaos test)
    /// is not a crash loop, and its replicas' requests wait for it
    /// (router-svc's `--no-replica-wait`, 5 s by default).
    pub const RESET_AFTER: Duration = Duration::from_secs(2);

    /// The delay before restarting a process that exited after `uptime`
    /// (zero for a restart that failed before the process listened).
    pub fn next_delay(&mut self, uptime: Duration) -> Duration {
        if uptime >= Self::RESET_AFTER {
            self.next = Self::INITIAL;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        delay
    }
}

impl Default for RestartBackoff {
    fn default() -> Self {
        Self {
            next: Self::INITIAL,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    #[test]
    fn doubles_while_the_process_keeps_dying_and_stops_at_the_cap() {
        let mut backoff = RestartBackoff::default();
        let delays: Vec<Duration> = (0..9).map(|_| backoff.next_delay(ms(50))).collect();
        let expected = [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000].map(ms);
        assert_eq!(delays, expected);
    }

    #[test]
    fn a_process_that_stayed_up_two_seconds_restarts_fast_again() {
        let mut backoff = RestartBackoff::default();
        for _ in 0..4 {
            backoff.next_delay(Duration::ZERO);
        }
        assert_eq!(backoff.next_delay(ms(1_999)), ms(1600));
        assert_eq!(backoff.next_delay(Duration::from_secs(2)), ms(100));
        assert_eq!(backoff.next_delay(ms(10)), ms(200));
        assert_eq!(backoff.next_delay(Duration::from_secs(60)), ms(100));
    }
}
