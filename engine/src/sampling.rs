//! Choosing the next token from a row of logits: repetition penalty, temperature, top-k, top-p,
//! greedy when the temperature is 0, a seeded RNG per sequence, and log-probabilities as OpenAI
//! reports them (of the model's distribution, before sampling transforms).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

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

    /// Picks the next token from one row of logits (on the host). `history` is the prompt plus
    /// what was generated so far. The engine samples on the device with [`sample_batch`]; this is
    /// the same rule, kept for callers that hold a single row.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Sampled {
        let row = Tensor::from_slice(logits).unsqueeze(0);
        let mut rows = [RowSampling {
            sampler: self,
            history,
        }];
        sample_batch(&row, &mut rows).pop().expect("one row")
    }

    /// The uniform draw of this step (from the sequence's seeded generator).
    fn uniform(&mut self) -> f64 {
        self.rng.gen::<f64>()
    }
}

/// One row of a batch to sample: its sampler and, when a repetition penalty applies, the tokens
/// seen so far (prompt and generated).
pub struct RowSampling<'a> {
    pub sampler: &'a mut Sampler,
    pub history: &'a [u32],
}

/// Samples one token for every row of `logits` (`[rows, vocab]`, on the model's device) in
/// batched tensor ops: greedy rows take one batched `argmax`; rows with a temperature draw by
/// inverse CDF over their (top-k, top-p) candidates with a uniform number from the row's seeded
/// generator, so seeds stay reproducible. Only ids and log-probabilities come back to the host
/// (and the top log-probabilities of the rows that ask for them).
pub fn sample_batch(logits: &Tensor, rows: &mut [RowSampling]) -> Vec<Sampled> {
    let logits = if logits.kind() == Kind::Float {
        logits.shallow_clone()
    } else {
        logits.to_kind(Kind::Float)
    };
    let plain_greedy = |r: &RowSampling| {
        let p = r.sampler.params();
        p.temperature == 0.0 && p.repetition_penalty == 1.0
    };
    if rows
        .iter()
        .all(|r| plain_greedy(r) && r.sampler.params().top_logprobs == 0)
    {
        if let Some(picked) = greedy_on_host(&logits) {
            return picked;
        }
    }
    let chosen = if rows.iter().all(plain_greedy) {
        logits.argmax(1, false)
    } else {
        let batch_argmax = rows
            .iter()
            .any(plain_greedy)
            .then(|| logits.argmax(1, false));
        let picks: Vec<Tensor> = rows
            .iter_mut()
            .enumerate()
            .map(|(i, r)| {
                if let Some(greedy) = batch_argmax.as_ref().filter(|_| plain_greedy(r)) {
                    return greedy.narrow(0, i as i64, 1);
                }
                let scores = penalised(&logits.get(i as i64), r);
                let params = r.sampler.params().clone();
                if params.temperature == 0.0 {
                    scores.argmax(0, true)
                } else {
                    let u = r.sampler.uniform();
                    draw(&scores, &params, u)
                }
            })
            .collect();
        Tensor::cat(&picks, 0)
    };
    let chosen = chosen.to_kind(Kind::Int64);
    let lse = logits.logsumexp([1], false);
    let logprob = logits.gather(1, &chosen.unsqueeze(1), false).squeeze_dim(1) - &lse;
    let ids: Vec<i64> = Vec::try_from(chosen.to_device(Device::Cpu)).expect("int64 ids");
    let lps: Vec<f32> = Vec::try_from(logprob.to_device(Device::Cpu)).expect("float logprobs");
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            let k = r.sampler.params().top_logprobs as i64;
            let top_logprobs = if k > 0 {
                let (vals, idx) = logits.get(i as i64).topk(k, 0, true, true);
                let vals: Vec<f32> =
                    Vec::try_from((vals - lse.get(i as i64)).to_device(Device::Cpu))
                        .expect("float logprobs");
                let idx: Vec<i64> = Vec::try_from(idx.to_device(Device::Cpu)).expect("int64 ids");
                idx.into_iter().map(|t| t as u32).zip(vals).collect()
            } else {
                Vec::new()
            };
            Sampled {
                token: ids[i] as u32,
                logprob: lps[i],
                top_logprobs,
            }
        })
        .collect()
}

/// Greedy picks and their log-probabilities (`x_max − logsumexp`) for float32 CPU logits, read in
/// place with the rows split over torch's threads; `None` elsewhere, or where a row has no finite
/// maximum or sum (torch's ops then decide). Torch's argmax and logsumexp of one 49k-entry row
/// took ~0.3 ms on the EPYC here (a few percent of a packed decode step); this takes a tenth.
/// The same token (the first of equal maxima, as torch's argmax), the log-probability within a
/// few float32 ulp.
fn greedy_on_host(logits: &Tensor) -> Option<Vec<Sampled>> {
    if logits.device() != Device::Cpu || logits.kind() != Kind::Float {
        return None;
    }
    let logits = logits.contiguous();
    let (rows, vocab) = logits.size2().ok()?;
    let (rows, vocab) = (rows as usize, vocab as usize);
    if vocab == 0 {
        return None;
    }
    // SAFETY: a contiguous float32 CPU tensor, alive and unwritten while this reads it.
    let values = unsafe { crate::int_dot::floats(&logits) };
    let mut picks = vec![(u32::MAX, f32::NAN); rows];
    let out = PickPtr(picks.as_mut_ptr());
    crate::int_dot::split_rows(rows, 1, |first, n| {
        for r in first..first + n {
            let row = &values[r * vocab..(r + 1) * vocab];
            let max = row_max(row);
            let pick = match row.iter().position(|&v| v == max) {
                Some(token) if max.is_finite() => (
                    token as u32,
                    -(crate::vec_exp::sum_exp(row, max).ln()) as f32,
                ),
                _ => (u32::MAX, f32::NAN),
            };
            // SAFETY: row `r` belongs to this share only, and `picks` outlives the split.
            unsafe { *out.at(r) = pick };
        }
    });
    picks
        .into_iter()
        .map(|(token, logprob)| {
            (token != u32::MAX && logprob.is_finite()).then(|| Sampled {
                token,
                logprob,
                top_logprobs: Vec::new(),
            })
        })
        .collect()
}

/// The largest value of `row` (NaNs skipped), in eight lanes so it vectorises.
fn row_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = row.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    for c in chunks {
        for i in 0..8 {
            lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
        }
    }
    lanes
        .into_iter()
        .fold(tail, |m, v| if v > m { v } else { m })
}

/// Where the threads of [`greedy_on_host`] write their rows' picks.
#[derive(Clone, Copy)]
struct PickPtr(*mut (u32, f32));
// SAFETY: each thread writes only its own rows.
unsafe impl Send for PickPtr {}
unsafe impl Sync for PickPtr {}

impl PickPtr {
    fn at(self, r: usize) -> *mut (u32, f32) {
        self.0.wrapping_add(r)
    }
}

/// The row's scores after the repetition penalty (CTRL / HF: divide positive scores, multiply
/// negative ones, for every token seen).
fn penalised(row: &Tensor, r: &RowSampling) -> Tensor {
    let p = r.sampler.params().repetition_penalty;
    if p == 1.0 || r.history.is_empty() {
        return row.shallow_clone();
    }
    let vocab = row.size()[0];
    let mut seen: Vec<i64> = r
        .history
        .iter()
        .map(|&t| i64::from(t))
        .filter(|&t| t < vocab)
        .collect();
    seen.sort_unstable();
    seen.dedup();
    let ids = Tensor::from_slice(&seen).to_device(row.device());
    let vals = row.index_select(0, &ids);
    let penalised = (&vals / p).where_self(&vals.gt(0.0), &(&vals * p));
    row.copy().index_copy(0, &ids, &penalised)
}

/// Inverse-CDF draw from `scores` (`[vocab]`) with temperature, top-k and top-p, using `u` in
/// [0, 1). Candidates are taken largest first when a cut needs an order (top-k, top-p), in
/// vocabulary order otherwise (no sort for plain temperature sampling).
fn draw(scores: &Tensor, params: &SamplingParams, u: f64) -> Tensor {
    let vocab = scores.size()[0];
    let k = if params.top_k > 0 {
        (params.top_k as i64).min(vocab)
    } else {
        vocab
    };
    let (vals, idx) = if k < vocab || params.top_p < 1.0 {
        // Stable: among equal scores the lower token id comes first.
        let (vals, idx) = scores.sort_stable(true, 0, true);
        (vals.narrow(0, 0, k), idx.narrow(0, 0, k))
    } else {
        (
            scores.shallow_clone(),
            Tensor::arange(vocab, (Kind::Int64, scores.device())),
        )
    };
    let probs = (vals / params.temperature).softmax(0, Kind::Float);
    let probs = if params.top_p < 1.0 {
        // Keep the smallest prefix whose mass reaches top_p: element i stays while the mass
        // before it is below top_p.
        let before = probs.cumsum(0, Kind::Float) - &probs;
        probs.where_self(&before.lt(params.top_p), &probs.zeros_like())
    } else {
        probs
    };
    let cum = probs.cumsum(0, Kind::Float);
    let target = (cum.get(-1) * u).unsqueeze(0);
    let at = target.searchsorted(&cum, false, true, "right", None::<Tensor>);
    // Never past the last candidate with mass (u·total can round up to the total).
    let last = probs.gt(0.0).sum(Kind::Int64) - 1;
    idx.index_select(0, &at.minimum(&last.unsqueeze(0)))
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

    /// Greedy rows read on the host (no top log-probabilities asked) pick what torch's ops pick,
    /// the first of equal maxima included, with the same log-probability; a row without a finite
    /// maximum goes to torch's ops.
    #[test]
    fn greedy_rows_on_the_host_pick_as_torch() {
        let (rows, vocab) = (5i64, 49_157i64);
        let mut rng = crate::test_rng::Lcg::new(3);
        let mut values = rng.units((rows * vocab) as usize);
        for v in values.iter_mut() {
            *v *= 12.0;
        }
        // Row 1: two equal maxima; row 2: a -inf entry.
        values[(vocab + 40_000) as usize] = 50.0;
        values[(vocab + 7) as usize] = 50.0;
        values[(2 * vocab + 3) as usize] = f32::NEG_INFINITY;
        let logits = Tensor::from_slice(&values).reshape([rows, vocab]);
        let got = greedy_on_host(&logits).expect("finite rows");
        let want: Vec<i64> = Vec::try_from(logits.argmax(1, false)).unwrap();
        let lse: Vec<f64> =
            Vec::try_from(logits.to_kind(Kind::Double).logsumexp([1], false)).unwrap();
        for (r, s) in got.iter().enumerate() {
            assert_eq!(s.token as i64, want[r], "row {r}");
            let x = values[r * vocab as usize + s.token as usize] as f64;
            let lp = x - lse[r];
            assert!(
                (s.logprob as f64 - lp).abs() < 1e-5,
                "row {r}: {} vs {lp}",
                s.logprob
            );
        }
        assert_eq!(got[1].token, 7);
        let nan = Tensor::from_slice(&[1.0f32, f32::NAN, 0.5]).unsqueeze(0);
        assert!(greedy_on_host(&nan).is_none());
        assert!(greedy_on_host(&Tensor::full(
            [1, 3],
            f64::NEG_INFINITY,
            (Kind::Float, Device::Cpu)
        ))
        .is_none());
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
