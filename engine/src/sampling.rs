//! Choosing the next token from a row of logits: a grammar's mask of allowed tokens, `min_tokens`,
//! `logit_bias`, the repetition, frequency and presence penalties (vLLM's definitions and order),
//! temperature, top-k, top-p, greedy when the temperature is 0, a seeded RNG per sequence, and
//! log-probabilities as OpenAI and vLLM report them (of the model's distribution, before any of
//! these transforms).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::constraint::Constraint;

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
    /// Subtracted once from the score of every token already generated (OpenAI / vLLM).
    pub presence_penalty: f64,
    /// Subtracted from a token's score once per time it was generated (OpenAI / vLLM).
    pub frequency_penalty: f64,
    /// Added to the scores of these token ids (OpenAI's `logit_bias`).
    pub logit_bias: Vec<(u32, f32)>,
    /// End tokens and stop strings do not end the sequence before this many tokens.
    pub min_tokens: usize,
    /// A grammar the output must follow (structured outputs).
    pub constraint: Option<Constraint>,
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
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            min_tokens: 0,
            constraint: None,
        }
    }
}

/// The most top log-probabilities a request may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;
/// The most `logit_bias` entries a request may give (OpenAI's limit).
pub const MAX_LOGIT_BIAS: usize = 300;

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
        for (field, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return err(field, format!("must be in [-2, 2], got {v}"));
            }
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            return err(
                "logit_bias",
                format!(
                    "at most {MAX_LOGIT_BIAS} entries, got {}",
                    self.logit_bias.len()
                ),
            );
        }
        if let Some((token, bias)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return err(
                "logit_bias",
                format!("biases are in [-100, 100], got {bias} for token {token}"),
            );
        }
        if self.min_tokens > self.max_tokens {
            return err(
                "min_tokens",
                format!(
                    "must not exceed max_tokens ({}), got {}",
                    self.max_tokens, self.min_tokens
                ),
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
    /// what was generated so far (it also counts as the output for the frequency and presence
    /// penalties). The engine samples on the device with [`sample_batch`]; this is
    /// the same rule, kept for callers that hold a single row.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> Sampled {
        let row = Tensor::from_slice(logits).unsqueeze(0);
        let mut rows = [RowSampling {
            history,
            output: history,
            ..RowSampling::plain(self)
        }];
        sample_batch(&row, &mut rows).pop().expect("one row")
    }

    /// Skips the draws `tokens` sampled tokens took (one each with a temperature, none when
    /// greedy), so a generation resumed elsewhere draws what it would have drawn.
    pub fn skip_draws(&mut self, tokens: usize) {
        if self.params.temperature != 0.0 {
            for _ in 0..tokens {
                self.uniform();
            }
        }
    }

    /// The uniform draw of this step (from the sequence's seeded generator).
    fn uniform(&mut self) -> f64 {
        self.rng.gen::<f64>()
    }
}

/// One row of a batch to sample: its sampler and what its transforms read.
pub struct RowSampling<'a> {
    pub sampler: &'a mut Sampler,
    /// The tokens seen so far (prompt and generated) when a repetition penalty applies.
    pub history: &'a [u32],
    /// The tokens generated so far (frequency and presence penalties).
    pub output: &'a [u32],
    /// Token ids that may not be picked now (the end tokens before `min_tokens`).
    pub banned: &'a [u32],
    /// The grammar's allowed tokens: a bitset over the vocabulary (bit `t % 32` of word `t / 32`).
    pub allowed: Option<&'a [u32]>,
}

impl<'a> RowSampling<'a> {
    /// A row with no history, output, ban or grammar.
    pub fn plain(sampler: &'a mut Sampler) -> Self {
        Self {
            sampler,
            history: &[],
            output: &[],
            banned: &[],
            allowed: None,
        }
    }

    /// Whether any transform changes this row's scores.
    fn transforms(&self) -> bool {
        let p = self.sampler.params();
        p.repetition_penalty != 1.0
            || (!self.output.is_empty()
                && (p.presence_penalty != 0.0 || p.frequency_penalty != 0.0))
            || !p.logit_bias.is_empty()
            || !self.banned.is_empty()
            || self.allowed.is_some()
    }

    /// Greedy on the model's own scores: one batched argmax serves it.
    fn plain_greedy(&self) -> bool {
        self.sampler.params().temperature == 0.0 && !self.transforms()
    }
}

/// Samples one token for every row of `logits` (`[rows, vocab]`, on the model's device) in
/// batched tensor ops: greedy rows take one batched `argmax`; rows with a temperature draw by
/// inverse CDF over their (top-k, top-p) candidates with a uniform number from the row's seeded
/// generator, so seeds stay reproducible. Rows with transforms (grammar, bans, bias, penalties)
/// pick from their transformed scores; every log-probability is of the model's own scores. Only
/// ids and log-probabilities come back to the host (and the top log-probabilities of the rows
/// that ask for them).
pub fn sample_batch(logits: &Tensor, rows: &mut [RowSampling]) -> Vec<Sampled> {
    let logits = if logits.kind() == Kind::Float {
        logits.shallow_clone()
    } else {
        logits.to_kind(Kind::Float)
    };
    if rows
        .iter()
        .all(|r| r.plain_greedy() && r.sampler.params().top_logprobs == 0)
    {
        if let Some(picked) = greedy_on_host(&logits) {
            return picked;
        }
    }
    let chosen = if rows.iter().all(RowSampling::plain_greedy) {
        logits.argmax(1, false)
    } else {
        let batch_argmax = rows
            .iter()
            .any(RowSampling::plain_greedy)
            .then(|| logits.argmax(1, false));
        let picks: Vec<Tensor> = rows
            .iter_mut()
            .enumerate()
            .map(|(i, r)| {
                if let Some(greedy) = batch_argmax.as_ref().filter(|_| r.plain_greedy()) {
                    return greedy.narrow(0, i as i64, 1);
                }
                let scores = transformed(&logits.get(i as i64), r);
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
    crate::threads::split_rows(rows, 1, |first, n| {
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

/// The row's scores after the transforms, in vLLM's order: the grammar's mask, the bans of
/// `min_tokens` (unless they would leave no allowed token), `logit_bias`, then the penalties:
/// repetition (CTRL / HF: divide positive scores, multiply negative ones, for every token seen),
/// frequency (minus `frequency_penalty` × count in the output) and presence (minus
/// `presence_penalty` for every token in the output).
fn transformed(row: &Tensor, r: &RowSampling) -> Tensor {
    if !r.transforms() {
        return row.shallow_clone();
    }
    let p = r.sampler.params();
    let vocab = row.size()[0];
    let device = row.device();
    let ids = |tokens: &[i64]| Tensor::from_slice(tokens).to_device(device);
    let mut scores = row.copy();
    let mut allowed_bits: Option<Vec<bool>> = None;
    if let Some(bits) = r.allowed {
        let allowed: Vec<bool> = (0..vocab as usize)
            .map(|t| bits.get(t / 32).is_some_and(|w| w & (1 << (t % 32)) != 0))
            .collect();
        let blocked = Tensor::from_slice(&allowed).to_device(device).logical_not();
        scores = scores.masked_fill(&blocked, f64::NEG_INFINITY);
        allowed_bits = Some(allowed);
    }
    let banned: Vec<i64> = r
        .banned
        .iter()
        .map(|&t| i64::from(t))
        .filter(|&t| t < vocab)
        .collect();
    let keeps_a_choice = allowed_bits.as_ref().is_none_or(|allowed| {
        let allowed_count = allowed.iter().filter(|a| **a).count();
        let banned_allowed = banned.iter().filter(|&&t| allowed[t as usize]).count();
        allowed_count > banned_allowed
    });
    if !banned.is_empty() && keeps_a_choice {
        let _ = scores.index_fill_(0, &ids(&banned), f64::NEG_INFINITY);
    }
    if !p.logit_bias.is_empty() {
        let (tokens, biases): (Vec<i64>, Vec<f32>) = p
            .logit_bias
            .iter()
            .filter(|(t, _)| i64::from(*t) < vocab)
            .map(|&(t, b)| (i64::from(t), b))
            .unzip();
        let bias = Tensor::zeros([vocab], (Kind::Float, device)).index_add(
            0,
            &ids(&tokens),
            &Tensor::from_slice(&biases).to_device(device),
        );
        scores += bias;
    }
    if p.repetition_penalty != 1.0 && !r.history.is_empty() {
        let mut seen: Vec<i64> = r
            .history
            .iter()
            .map(|&t| i64::from(t))
            .filter(|&t| t < vocab)
            .collect();
        seen.sort_unstable();
        seen.dedup();
        let seen = ids(&seen);
        let vals = scores.index_select(0, &seen);
        let penalised = (&vals / p.repetition_penalty)
            .where_self(&vals.gt(0.0), &(&vals * p.repetition_penalty));
        scores = scores.index_copy(0, &seen, &penalised);
    }
    if !r.output.is_empty() && (p.frequency_penalty != 0.0 || p.presence_penalty != 0.0) {
        let mut counts: std::collections::BTreeMap<i64, f32> = Default::default();
        for &t in r.output.iter().filter(|&&t| i64::from(t) < vocab) {
            *counts.entry(i64::from(t)).or_default() += 1.0;
        }
        let (tokens, penalty): (Vec<i64>, Vec<f32>) = counts
            .into_iter()
            .map(|(t, c)| {
                (
                    t,
                    (p.frequency_penalty * f64::from(c) + p.presence_penalty) as f32,
                )
            })
            .unzip();
        let _ = scores.index_add_(
            0,
            &ids(&tokens),
            &(-Tensor::from_slice(&penalty)).to_device(device),
        );
    }
    scores
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
    // Never past the last candidate with mass (u·total can round up to the total); candidates
    // without mass (masked by a grammar or a ban) may sit anywhere in vocabulary order.
    let positions = Tensor::arange(probs.size()[0], (Kind::Int64, probs.device()));
    let last = (positions * probs.gt(0.0).to_kind(Kind::Int64)).max();
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

    /// vLLM's definitions on a hand computation: logit bias, then the repetition penalty over
    /// prompt and output, then frequency (× count in the output) and presence (once per token in
    /// the output); a grammar's mask and `min_tokens`' bans take tokens out.
    #[test]
    fn transforms_follow_vllm_definitions() {
        let row = Tensor::from_slice(&[2.0f32, -1.0, 0.5, 3.0, 1.0]);
        let mut sampler = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            logit_bias: vec![(4, 1.5)],
            ..params(0.0)
        });
        let history = [0u32, 1, 3, 3];
        let output = [3u32, 3, 1];
        let r = RowSampling {
            history: &history,
            output: &output,
            banned: &[2],
            allowed: Some(&[0b11011]),
            ..RowSampling::plain(&mut sampler)
        };
        let got: Vec<f32> = Vec::try_from(transformed(&row, &r)).unwrap();
        let want = [
            2.0 / 2.0,                    // seen in the prompt: repetition only
            -2.0 - 0.5 - 0.25,            // negative: multiplied; once in the output
            f32::NEG_INFINITY,            // banned (min_tokens)
            3.0 / 2.0 - 2.0 * 0.5 - 0.25, // twice in the output
            1.0 + 1.5,                    // biased, never seen
        ];
        for (g, w) in got.iter().zip(want) {
            assert!(
                (g - w).abs() < 1e-6 || (g.is_infinite() && w.is_infinite()),
                "{got:?} vs {want:?}"
            );
        }
        // The mask alone: only tokens 1 and 4 allowed; a draw never leaves them, whatever u.
        let mut masked = Sampler::new(params(1.0));
        for u in [0.0, 0.3, 0.999_999] {
            let r = RowSampling {
                allowed: Some(&[0b10010]),
                ..RowSampling::plain(&mut masked)
            };
            let scores = transformed(&row, &r);
            let t = draw(&scores, &params(1.0), u).int64_value(&[0]);
            assert!(t == 1 || t == 4, "u {u}: token {t}");
        }
        // A ban that would leave the grammar no token is not applied.
        let mut s = Sampler::new(params(0.0));
        let r = RowSampling {
            banned: &[2],
            allowed: Some(&[0b00100]),
            ..RowSampling::plain(&mut s)
        };
        assert_eq!(transformed(&row, &r).argmax(0, false).int64_value(&[]), 2);
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
        for (bad, field) in [
            (
                SamplingParams {
                    presence_penalty: 2.5,
                    ..Default::default()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    frequency_penalty: -3.0,
                    ..Default::default()
                },
                "frequency_penalty",
            ),
            (
                SamplingParams {
                    logit_bias: vec![(1, 101.0)],
                    ..Default::default()
                },
                "logit_bias",
            ),
            (
                SamplingParams {
                    min_tokens: 17,
                    ..Default::default()
                },
                "min_tokens",
            ),
        ] {
            assert_eq!(bad.validate().unwrap_err().field, field);
        }
    }
}
