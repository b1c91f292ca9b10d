//! Replica autoscaling of a deployment, Ray Serve's way (run by the deployment manager per
//! autoscaled deployment, see [`crate::deployments::manager`]): the desired number of
//! replicas is the ongoing requests (what the router counts in flight: queued, waiting or
//! generating) over `target_ongoing_requests`, rounded up and kept within
//! `[min_replicas, max_replicas]` (at most the node's inference slots). A replica is added once
//! the desired count has stayed above the current one for `upscale_delay`, and one is removed
//! once it has stayed below for `downscale_delay`: the newest replica stops taking requests
//! (draining), finishes the ones it holds, then stops and frees its slot. Every decision is logged
//! with its inputs and counted (`/metrics`, `/models`, the dashboard).
//!
//! With `min_replicas` 0 an idle deployment drains to no replica (`idle`); a request for it then
//! waits in a bounded queue ([`crate::deployments::Deployments::cold_waiter`]) while the manager
//! starts one at once (no upscale delay: someone is waiting), and the cold start is counted.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq)]
pub struct AutoscalingConfig {
    pub min_replicas: usize,
    /// At most this many (and at most the node's inference slots).
    pub max_replicas: usize,
    pub target_ongoing_requests: f64,
    pub upscale_delay: Duration,
    pub downscale_delay: Duration,
}

/// Replicas wanted for `ongoing` requests (0 only where `min_replicas` is 0: scale to zero).
pub fn desired(ongoing: usize, config: &AutoscalingConfig) -> usize {
    let want = (ongoing as f64 / config.target_ongoing_requests.max(1e-9)).ceil() as usize;
    want.clamp(config.min_replicas, config.max_replicas.max(1))
}

/// Which way to scale now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    Up,
    Down,
}

/// Turns desired counts over time into decisions: a direction must hold for its delay.
#[derive(Debug, Default)]
pub struct Decider {
    above_since: Option<Instant>,
    below_since: Option<Instant>,
}

impl Decider {
    pub fn decide(
        &mut self,
        now: Instant,
        current: usize,
        desired: usize,
        config: &AutoscalingConfig,
    ) -> Option<Scale> {
        if desired > current {
            self.below_since = None;
            let since = *self.above_since.get_or_insert(now);
            if now.duration_since(since) >= config.upscale_delay {
                self.above_since = None;
                return Some(Scale::Up);
            }
        } else if desired < current {
            self.above_since = None;
            let since = *self.below_since.get_or_insert(now);
            if now.duration_since(since) >= config.downscale_delay {
                self.below_since = None;
                return Some(Scale::Down);
            }
        } else {
            self.above_since = None;
            self.below_since = None;
        }
        None
    }
}

/// What `/metrics` and `/cluster` show of the autoscaler.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AutoscalerStats {
    pub replicas: usize,
    pub desired: usize,
    pub ongoing: usize,
    pub min_replicas: usize,
    pub max_replicas: usize,
    pub scale_ups: u64,
    pub scale_downs: u64,
    /// The latest decision, in words, with its inputs.
    pub last_decision: Option<String>,
    /// Requests waiting for a replica to start from zero (`min_replicas` 0).
    #[serde(default)]
    pub waiting: usize,
    /// Starts from zero replicas so far, and how long the latest took until a replica served.
    #[serde(default)]
    pub cold_starts: u64,
    #[serde(default)]
    pub last_cold_start_s: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AutoscalingConfig {
        AutoscalingConfig {
            min_replicas: 1,
            max_replicas: 3,
            target_ongoing_requests: 4.0,
            upscale_delay: Duration::from_secs(2),
            downscale_delay: Duration::from_secs(10),
        }
    }

    #[test]
    fn desired_is_ongoing_over_target_within_bounds() {
        let c = config();
        assert_eq!(desired(0, &c), 1);
        assert_eq!(desired(4, &c), 1);
        assert_eq!(desired(5, &c), 2);
        assert_eq!(desired(12, &c), 3);
        assert_eq!(desired(1000, &c), 3);
        let to_zero = AutoscalingConfig {
            min_replicas: 0,
            ..c
        };
        assert_eq!(desired(0, &to_zero), 0);
        assert_eq!(desired(1, &to_zero), 1);
    }

    #[test]
    fn a_direction_must_hold_for_its_delay() {
        let c = config();
        let t0 = Instant::now();
        let mut d = Decider::default();
        assert_eq!(d.decide(t0, 1, 2, &c), None);
        assert_eq!(d.decide(t0 + Duration::from_secs(1), 1, 2, &c), None);
        // A dip resets the clock.
        assert_eq!(d.decide(t0 + Duration::from_millis(1500), 1, 1, &c), None);
        assert_eq!(d.decide(t0 + Duration::from_secs(3), 1, 2, &c), None);
        assert_eq!(
            d.decide(t0 + Duration::from_secs(5), 1, 2, &c),
            Some(Scale::Up)
        );
        assert_eq!(d.decide(t0 + Duration::from_secs(6), 2, 1, &c), None);
        assert_eq!(d.decide(t0 + Duration::from_secs(15), 2, 1, &c), None);
        assert_eq!(
            d.decide(t0 + Duration::from_secs(16), 2, 1, &c),
            Some(Scale::Down)
        );
    }
}
