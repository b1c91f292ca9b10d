//! OTP-style restart intensity: a child may fail `max_restarts` times within `window`; each restart
//! waits an exponentially growing backoff; one more failure in the window escalates.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RestartPolicy {
    pub max_restarts: u32,
    pub window_secs: f64,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_restarts: 5,
            window_secs: 60.0,
            backoff_initial_ms: 200,
            backoff_max_ms: 10_000,
        }
    }
}

/// What to do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    RestartAfter(Duration),
    Escalate,
}

/// The failure history of one child.
#[derive(Debug, Default)]
pub struct RestartTracker {
    failures: VecDeque<Instant>,
}

impl RestartTracker {
    pub fn on_failure(&mut self, policy: &RestartPolicy, now: Instant) -> Decision {
        let window = Duration::from_secs_f64(policy.window_secs.max(0.0));
        while let Some(&first) = self.failures.front() {
            if now.duration_since(first) > window {
                self.failures.pop_front();
            } else {
                break;
            }
        }
        if self.failures.len() as u32 >= policy.max_restarts {
            return Decision::Escalate;
        }
        let n = self.failures.len() as u32;
        self.failures.push_back(now);
        let backoff = policy
            .backoff_initial_ms
            .saturating_mul(1u64 << n.min(20))
            .min(policy.backoff_max_ms);
        Decision::RestartAfter(Duration::from_millis(backoff))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_then_escalates_within_the_window() {
        let policy = RestartPolicy {
            max_restarts: 3,
            window_secs: 10.0,
            backoff_initial_ms: 100,
            backoff_max_ms: 250,
        };
        let mut t = RestartTracker::default();
        let t0 = Instant::now();
        let ms = |d| Decision::RestartAfter(Duration::from_millis(d));
        assert_eq!(t.on_failure(&policy, t0), ms(100));
        assert_eq!(t.on_failure(&policy, t0), ms(200));
        assert_eq!(t.on_failure(&policy, t0), ms(250));
        assert_eq!(t.on_failure(&policy, t0), Decision::Escalate);
    }

    #[test]
    fn failures_outside_the_window_are_forgotten() {
        let policy = RestartPolicy {
            max_restarts: 1,
            window_secs: 1.0,
            backoff_initial_ms: 100,
            backoff_max_ms: 1000,
        };
        let mut t = RestartTracker::default();
        let t0 = Instant::now();
        assert!(matches!(
            t.on_failure(&policy, t0),
            Decision::RestartAfter(_)
        ));
        assert_eq!(
            t.on_failure(&policy, t0 + Duration::from_millis(500)),
            Decision::Escalate
        );
        let later = t0 + Duration::from_secs(3);
        assert_eq!(
            t.on_failure(&policy, later),
            Decision::RestartAfter(Duration::from_millis(100))
        );
    }
}
