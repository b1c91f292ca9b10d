//! The decode batch an engine runs, chosen at start from its memory and the measured time of a
//! decode step (issue 26, target 3). A fixed `max_batch_size` of 32 left half of 64 clients
//! waiting on a CPU where a 64-row step cost less per token; a larger fixed one would make every
//! step slow on a machine where it does not. So the engine times decode steps of 8, 16, 32, …
//! rows (up to `batching.max_batch_size`, and as many as the KV budget gives
//! [`MIN_KV_PER_ROW`] tokens each), on a scratch cache at a typical context, and runs the largest
//! batch whose step stays within `batching.max_step_ms` (the time per output token a client
//! sees) and whose tokens per second beat the best smaller batch's by [`MIN_GAIN`].

use std::time::{Duration, Instant};

use crate::model::Model;
use crate::step::{LogitRows, Segment, StepBatch};

/// The smallest batch measured; a cap at or below it is taken as it is.
pub const SMALLEST: usize = 8;

/// KV tokens each row of the chosen batch must find in `max_kv_tokens` on average.
pub const MIN_KV_PER_ROW: i64 = 256;

/// How much more tokens/s a larger batch must give than the best smaller one to be taken (a
/// larger batch makes every step, and so every client's next token, slower).
pub const MIN_GAIN: f64 = 0.1;

/// Keys each measured row attends over (a short chat's context).
const CONTEXT: i64 = 128;

/// Timed steps per size (the fastest counts: what else runs on the machine only adds time, and
/// a choice made at a noisy moment would stay), after one untimed.
const RUNS: usize = 3;

/// How to choose.
#[derive(Debug, Clone, Copy)]
pub struct BatchSizing {
    /// The largest batch allowed (`batching.max_batch_size`).
    pub cap: usize,
    /// The longest a decode step may take (`batching.max_step_ms`).
    pub max_step: Duration,
    /// The replica's KV budget in tokens (`batching.max_kv_tokens`).
    pub max_kv_tokens: i64,
}

/// What was measured and chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    pub chosen: usize,
    /// Each measured size with its step's fastest time.
    pub steps: Vec<(usize, Duration)>,
    /// Why the sizes above the chosen one were not taken.
    pub why: String,
}

impl BatchSizing {
    /// The sizes to measure, ascending: 8, 16, 32, … below the cap (and the KV budget's), then
    /// that bound; only the bound when it is [`SMALLEST`] or less.
    pub fn candidates(&self) -> Vec<usize> {
        let by_kv = (self.max_kv_tokens / MIN_KV_PER_ROW).max(1) as usize;
        let bound = self.cap.min(by_kv).max(1);
        let mut sizes: Vec<usize> = std::iter::successors(Some(SMALLEST), |n| Some(n * 2))
            .take_while(|&n| n < bound)
            .collect();
        sizes.push(bound);
        sizes
    }

    /// Measures steps on `model` and chooses ([`BatchSizing::choose`]).
    pub fn calibrate(&self, model: &Model) -> Calibration {
        self.choose(|n| time_step(model, n))
    }

    /// Chooses from `step(n)`, the time of a decode step of `n` rows, measured in ascending
    /// order, stopping at the first size over the bound.
    pub fn choose(&self, mut step: impl FnMut(usize) -> Duration) -> Calibration {
        let sizes = self.candidates();
        let rate = |n: usize, t: Duration| n as f64 / t.as_secs_f64().max(1e-9);
        let mut steps = Vec::new();
        let mut chosen: Option<(usize, f64)> = None;
        let mut why = String::new();
        for &n in &sizes {
            let t = step(n);
            steps.push((n, t));
            if t > self.max_step && chosen.is_some() {
                why = format!(
                    "a {n}-row step took {:.1} ms, over batching.max_step_ms ({} ms)",
                    t.as_secs_f64() * 1e3,
                    self.max_step.as_millis()
                );
                break;
            }
            match chosen {
                Some((best, r)) if rate(n, t) < r * (1.0 + MIN_GAIN) => {
                    why = format!(
                        "{n} rows gave {:.0} tokens/s, not {:.0}% more than {best} rows' {r:.0}",
                        rate(n, t),
                        MIN_GAIN * 100.0
                    );
                }
                _ => chosen = Some((n, rate(n, t))),
            }
        }
        let chosen = chosen.map_or(sizes[0], |(n, _)| n);
        if why.is_empty() {
            why = if chosen == self.cap {
                "batching.max_batch_size".into()
            } else {
                format!("the KV budget (batching.max_kv_tokens / {MIN_KV_PER_ROW})")
            };
        }
        Calibration { chosen, steps, why }
    }
}

/// The fastest of [`RUNS`] decode steps of `n` rows (each at [`CONTEXT`] keys, on a scratch cache).
fn time_step(model: &Model, n: usize) -> Duration {
    let mut cache = model.new_cache(n as i64, CONTEXT + 1);
    let vocab = model.config().vocab_size as i64;
    let step = StepBatch::new(
        (0..n as i64).map(|i| (i * 7919) % vocab).collect(),
        (0..n as i64)
            .map(|slot| Segment {
                slot,
                start: CONTEXT,
                len: 1,
            })
            .collect(),
        LogitRows::Last,
    );
    let mut run = || {
        let started = Instant::now();
        let logits = tch::no_grad(|| model.forward_step(&step, &mut cache, None));
        // On a GPU the forward is asynchronous: the copy waits for it.
        let _ = logits.double_value(&[0, 0]);
        started.elapsed()
    };
    run();
    (0..RUNS).map(|_| run()).min().expect("RUNS > 0")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizing(cap: usize, max_step_ms: u64, max_kv_tokens: i64) -> BatchSizing {
        BatchSizing {
            cap,
            max_step: Duration::from_millis(max_step_ms),
            max_kv_tokens,
        }
    }

    #[test]
    fn candidates_double_from_eight_up_to_the_cap_and_the_kv_budget() {
        assert_eq!(sizing(128, 100, 65536).candidates(), [8, 16, 32, 64, 128]);
        assert_eq!(sizing(100, 100, 65536).candidates(), [8, 16, 32, 64, 100]);
        assert_eq!(sizing(128, 100, 8192).candidates(), [8, 16, 32]);
        assert_eq!(sizing(4, 100, 65536).candidates(), [4]);
        assert_eq!(sizing(8, 100, 65536).candidates(), [8]);
        assert_eq!(sizing(128, 100, 10).candidates(), [1]);
    }

    /// A step of `n` rows taking `fixed + n · per_row` ms.
    fn cost(fixed: f64, per_row: f64) -> impl Fn(usize) -> Duration {
        move |n| Duration::from_secs_f64((fixed + n as f64 * per_row) / 1e3)
    }

    #[test]
    fn the_largest_batch_within_the_step_bound_that_still_pays_is_chosen() {
        // Weight-bound steps (a fixed cost, little per row): every doubling pays, up to the
        // bound on the step: 64 rows take 42 ms, 128 rows 74 ms (over 60).
        let c = sizing(128, 60, 65536).choose(cost(10.0, 0.5));
        assert_eq!(c.chosen, 64, "{c:?}");
        assert!(c.why.contains("128-row step took 74.0 ms"), "{}", c.why);
        assert_eq!(c.steps.len(), 5);
        // Within the bound all the way: the cap.
        let c = sizing(128, 1000, 65536).choose(cost(10.0, 0.5));
        assert_eq!((c.chosen, c.why.as_str()), (128, "batching.max_batch_size"));
        // Steps with more cost per row: 64 rows gain 6% over 32, 128 rows 9%: 32 it is.
        let c = sizing(128, 1000, 65536).choose(cost(4.0, 1.0));
        assert_eq!(c.chosen, 32, "{c:?}");
        assert!(c.why.contains("not 10% more than 32 rows'"), "{}", c.why);
        // The smallest size is taken even over the bound (some batch must run).
        let c = sizing(128, 5, 65536).choose(cost(10.0, 0.5));
        assert_eq!(c.chosen, 8, "{c:?}");
        // The KV budget bounds it.
        let c = sizing(128, 1000, 8192).choose(cost(10.0, 0.5));
        assert_eq!(c.chosen, 32, "{c:?}");
        assert!(c.why.contains("KV budget"), "{}", c.why);
    }

    #[test]
    fn sizes_are_measured_in_ascending_order_and_not_past_the_first_over_the_bound() {
        let mut seen = Vec::new();
        sizing(256, 30, 65536).choose(|n| {
            seen.push(n);
            cost(10.0, 0.5)(n)
        });
        assert_eq!(seen, [8, 16, 32, 64]);
    }
}
