//! Choosing the next token from a row of logits: repetition penalty, temperature, top-k, top-p,
//! greedy when the temperature is 0, a seeded RNG per sequence, and log-probabilities as OpenAI
//! reports them (of the model's distribution, before sampling transforms).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// How a sequence is generated. Every field has the default vLLM and OpenAI users expect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    pub max_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    pub top_p: f64,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1.0 means none; > 1 discourages tokens already in the prompt or output (CTRL / HF style).
    pub repetition_penalty: f64,
    pub seed: Option<u64>,
    /// Generation stops when the text ends with one of these; the stop string is not returned.
    pub stop: Vec<String>,
    /// Extra token ids that end generation (the model's end tokens always do, unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// How many top log-probabilities to return per generated token (0: none).
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: 16,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            seed: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            top_logprobs: 0,
        }
    }
}

/// The most top log-probabilities a request may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid `{field}`: {message}")]
pub struct ParamError {
    pub field: &'static str,
    pub message: String,
}

impl SamplingParams {
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            max_tokens,
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks every field's range; the error names the field.
    pub fn validate(&self) -> Result<(), ParamError> {
        let err = |field, message: String| Err(ParamError { field, message });
        if self.max_tokens == 0 {
            return err("max_tokens", "must be at least 1".into());
        }
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return err(
                "temperature",
                format!("must be >= 0, got {}", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return err("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return err(
                "repetition_penalty",
                format!("must be > 0, got {}", self.repetition_penalty),
            );
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return err(
                "top_logprobs",
                format!("at most {MAX_TOP_LOGPROBS}, got {}", self.top_logprobs),
            );
        }
        // Every stop string is matched against the text at each step: bound their number and size.
        const MAX_STOP_STRINGS: usize = 16;
        const MAX_STOP_BYTES: usize = 256;
        const MAX_STOP_TOKEN_IDS: usize = 64;
        if self.stop.len() > MAX_STOP_STRINGS {
            return err(
                "stop",
                format!(
                    "at most {MAX_STOP_STRINGS} stop strings, got {}",
                    self.stop.len()
                ),
            );
        }
        if self.stop.iter().any(String::is_empty) {
            return err("stop", "stop strings must not be empty".into());
        }
        if let Some(long) = self.stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return err(
                "stop",
                format!(
                    "each stop string is at most {MAX_STOP_BYTES} bytes, got one of {}",
                    long.len()
                ),
            );
        }
        if self.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
            return err(
                "stop_token_ids",
                format!(
                    "at most {MAX_STOP_TOKEN_IDS} stop token ids, got {}",
                    self.stop_token_ids.len()
                ),
            );
        }
        Ok(())
    }
}

/// One chosen token with its log-probability and, if asked, the top alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Per-sequence sampling state.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_entropy(),
        };
        Self { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token. `history` is the prompt plus what was generated so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Sampled {
        let logprobs = log_softmax(logits);
        let mut scores = logits.to_vec();
        if self.params.repetition_penalty != 1.0 {
            let p = self.params.repetition_penalty as f32;
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(s) = scores.get_mut(t as usize) {
                    *s = if *s > 0.0 { *s / p } else { *s * p };
                }
            }
        }
        let token = if self.params.temperature == 0.0 {
            argmax(&scores)
        } else {
            self.draw(&mut scores)
        };
        let top = if self.params.top_logprobs > 0 {
            top_k_indices(&logprobs, self.params.top_logprobs)
                .into_iter()
                .map(|i| (i as u32, logprobs[i]))
                .collect()
        } else {
            Vec::new()
        };
        Sampled {
            token: token as u32,
            logprob: logprobs[token],
            top_logprobs: top,
        }
    }

    fn draw(&mut self, scores: &mut [f32]) -> usize {
        let t = self.params.temperature as f32;
        let k = match self.params.top_k {
            0 => scores.len(),
            k => k.min(scores.len()),
        };
        let mut candidates = top_k_indices(scores, k);
        let max = scores[candidates[0]];
        let mut probs: Vec<f32> = candidates
            .iter()
            .map(|&i| ((scores[i] - max) / t).exp())
            .collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.params.top_p < 1.0 {
            let mut cumulative = 0.0;
            let mut keep = probs.len();
            for (n, p) in probs.iter().enumerate() {
                cumulative += p;
                if cumulative >= self.params.top_p as f32 {
                    keep = n + 1;
                    break;
                }
            }
            candidates.truncate(keep);
            probs.truncate(keep);
            let total: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        let mut u: f32 = self.rng.gen();
        for (i, p) in candidates.iter().zip(&probs) {
            if u < *p {
                return *i;
            }
            u -= p;
        }
        *candidates.last().expect("at least one candidate")
    }
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// Indices of the `k` largest values, largest first (ties: lower index first).
fn top_k_indices(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    let cmp = |a: &usize, b: &usize| v[*b].total_cmp(&v[*a]).then(a.cmp(b));
    if k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
    }
    idx.sort_unstable_by(cmp);
    idx
}

fn log_softmax(v: &[f32]) -> Vec<f32> {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = v.iter().map(|x| f64::from(x - max).exp()).sum();
    let log_sum = sum.ln() as f32 + max;
    v.iter().map(|x| x - log_sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f64) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(7),
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_the_argmax_and_reports_logprobs() {
        let mut s = Sampler::new(SamplingParams {
            top_logprobs: 2,
            ..params(0.0)
        });
        let out = s.sample(&[0.0, 3.0, 1.0, 2.0], &[]);
        assert_eq!(out.token, 1);
        let expected = 3.0 - (1f32 + 3f32.exp() + 1f32.exp() + 2f32.exp()).ln();
        assert!((out.logprob - expected).abs() < 1e-5);
        assert_eq!(
            out.top_logprobs.iter().map(|t| t.0).collect::<Vec<_>>(),
            vec![1, 3]
        );
    }

    #[test]
    fn same_seed_same_draws_and_top_k_limits_choices() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let draw = |p: SamplingParams| {
            let mut s = Sampler::new(p);
            (0..40)
                .map(|_| s.sample(&logits, &[]).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(params(1.0)), draw(params(1.0)));
        let top2 = draw(SamplingParams {
            top_k: 2,
            ..params(1.0)
        });
        // The two largest logits are at indices 6 and 13 (value 1.8, lowest indices first).
        assert!(top2.iter().all(|t| *t == 6 || *t == 13), "{top2:?}");
        let nucleus = draw(SamplingParams {
            top_p: 0.01,
            ..params(1.0)
        });
        assert!(nucleus.iter().all(|t| *t == 6), "{nucleus:?}");
    }

    #[test]
    fn repetition_penalty_discourages_seen_tokens() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..params(0.0)
        });
        assert_eq!(s.sample(&[1.0, 1.5, 0.2], &[1]).token, 0);
    }

    #[test]
    fn validation_names_the_field() {
        let bad = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().field, "top_p");
        let bad = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().field, "temperature");
    }
}
