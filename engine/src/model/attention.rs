//! Attention over the KV pool for one packed step, and over whole sequences for training: the
//! per-step tables every layer reads (rotary tables at the tokens' positions, where each token's
//! key and value go, the masks of each attention window the model's layers use), and the one
//! attention function, which takes the layer's scale and soft-cap.

use tch::{Device, Kind, Tensor};

use super::rope::{Rope, RopeAt};
use crate::step::{Segment, StepBatch};

/// The decode rows of a step, attended as one batch: slots `lo .. lo + span` of the pool, the
/// rows' queries scattered there when the slots are not exactly the decode rows in order.
pub(crate) struct DecodeAttention {
    pub(crate) lo: i64,
    pub(crate) span: i64,
    pub(crate) rows: i64,
    /// `[rows]`: each decode row's slot − `lo`, when the slots are not `0..rows` in order.
    pub(crate) scatter: Option<Tensor>,
    /// Keys every slot of the span attends over (the longest row's).
    pub(crate) keys: i64,
    /// `[span, 1, 1, keys]` per attention window of the model ([`Windows`]): which keys each
    /// slot sees.
    pub(crate) masks: Vec<Tensor>,
}

/// One prompt chunk, attended on its own against its slot.
pub(crate) struct ChunkAttention {
    pub(crate) slot: i64,
    pub(crate) start: i64,
    pub(crate) len: i64,
    /// `[group·len, start + len]` per attention window: causal over the chunk, and the keys
    /// before it within the window.
    pub(crate) masks: Vec<Tensor>,
}

/// The per-shard tensors a step builds once and every layer reads.
pub(crate) struct ShardTables {
    /// One per rotary table of the model.
    pub(crate) ropes: Vec<RopeAt>,
    /// `(slot, position)` of every token: where its key/value is written.
    pub(crate) write_at: Option<(Tensor, Tensor)>,
    pub(crate) decode: Option<DecodeAttention>,
    pub(crate) chunks: Vec<ChunkAttention>,
    /// Training: `[t, t]` masks per window (`None`: plain causal, SDPA's own).
    pub(crate) train_masks: Vec<Option<Tensor>>,
}

/// The distinct attention windows of a model's layers (`None`: full causal attention), and which
/// one each layer uses.
pub(crate) struct Windows {
    pub(crate) kinds: Vec<Option<usize>>,
    pub(crate) of_layer: Vec<usize>,
}

impl Windows {
    pub(crate) fn new(layers: impl Iterator<Item = Option<usize>>) -> Self {
        let mut kinds: Vec<Option<usize>> = Vec::new();
        let of_layer = layers
            .map(|w| match kinds.iter().position(|k| *k == w) {
                Some(i) => i,
                None => {
                    kinds.push(w);
                    kinds.len() - 1
                }
            })
            .collect();
        Self { kinds, of_layer }
    }
}

/// Whether key `key` is visible from a query at `pos` under `window`.
fn visible(key: &Tensor, pos: &Tensor, window: Option<usize>) -> Tensor {
    let causal = key.le_tensor(pos);
    match window {
        None => causal,
        Some(w) => causal.logical_and(&key.gt_tensor(&(pos - w as i64))),
    }
}

/// Per-shard tables of one step, built once and read by every layer: rotary tables at the
/// tokens' positions, where each token's key/value goes, and the attention masks of every window.
pub(crate) fn step_tables(
    step: &StepBatch,
    ropes: &[Vec<Rope>],
    devices: &[Device],
    group: i64,
    windows: &Windows,
) -> Vec<ShardTables> {
    let positions = Tensor::from_slice(&step.positions());
    let slots = Tensor::from_slice(&step.token_slots());
    let decode = &step.segments[..step.decode];
    let cpu = (Kind::Int64, Device::Cpu);
    let decode_cpu = (!decode.is_empty()).then(|| {
        let lo = decode.iter().map(|s| s.slot).min().expect("rows");
        let hi = decode.iter().map(|s| s.slot).max().expect("rows") + 1;
        let keys = decode.iter().map(|s| s.start + 1).max().expect("rows");
        let dense = decode
            .iter()
            .enumerate()
            .all(|(i, s)| s.slot == lo + i as i64);
        // Slots of the span without a decode row see key 0 only (their output is dropped; a
        // fully masked row would be NaN).
        let mut pos = vec![0i64; (hi - lo) as usize];
        let mut real = vec![false; (hi - lo) as usize];
        for s in decode {
            pos[(s.slot - lo) as usize] = s.start;
            real[(s.slot - lo) as usize] = true;
        }
        let key = Tensor::arange(keys, cpu).view([1, 1, 1, keys]);
        let at = Tensor::from_slice(&pos).view([-1, 1, 1, 1]);
        let is_real = Tensor::from_slice(&real).view([-1, 1, 1, 1]);
        let masks: Vec<Tensor> = windows
            .kinds
            .iter()
            .map(|&w| {
                // A slot without a row sees key 0 alone.
                let idle = key.eq(0).logical_and(&is_real.logical_not());
                visible(&key, &at, w)
                    .logical_and(&is_real)
                    .logical_or(&idle)
            })
            .collect();
        let scatter = (!dense)
            .then(|| Tensor::from_slice(&decode.iter().map(|s| s.slot - lo).collect::<Vec<_>>()));
        (lo, hi - lo, keys, masks, scatter)
    });
    let chunk_masks: Vec<(Segment, Vec<Tensor>)> = step.segments[step.decode..]
        .iter()
        .map(|s| {
            // Query row (g, i) is token start + i: it sees keys up to start + i.
            let q_pos = (Tensor::arange(s.len, cpu).repeat([group]) + s.start).unsqueeze(1);
            let keys = Tensor::arange(s.start + s.len, cpu).unsqueeze(0);
            let masks = windows
                .kinds
                .iter()
                .map(|&w| visible(&keys, &q_pos, w))
                .collect();
            (*s, masks)
        })
        .collect();
    devices
        .iter()
        .zip(ropes)
        .map(|(&dev, ropes)| {
            let at = positions.to_device(dev);
            ShardTables {
                ropes: ropes.iter().map(|r| r.at(&at)).collect(),
                write_at: Some((slots.to_device(dev), positions.to_device(dev))),
                decode: decode_cpu.as_ref().map(|(lo, span, keys, masks, scatter)| {
                    DecodeAttention {
                        lo: *lo,
                        span: *span,
                        rows: decode.len() as i64,
                        scatter: scatter.as_ref().map(|s| s.to_device(dev)),
                        keys: *keys,
                        masks: masks.iter().map(|m| m.to_device(dev)).collect(),
                    }
                }),
                chunks: chunk_masks
                    .iter()
                    .map(|(s, masks)| ChunkAttention {
                        slot: s.slot,
                        start: s.start,
                        len: s.len,
                        masks: masks.iter().map(|m| m.to_device(dev)).collect(),
                    })
                    .collect(),
                train_masks: Vec::new(),
            }
        })
        .collect()
}

/// Tables for whole sequences of `t` tokens from position 0, `b` rows (training).
pub(crate) fn train_tables(
    b: i64,
    t: i64,
    ropes: &[Vec<Rope>],
    devices: &[Device],
    windows: &Windows,
) -> Vec<ShardTables> {
    let cpu = (Kind::Int64, Device::Cpu);
    let positions = Tensor::arange(t, cpu).unsqueeze(0).repeat([b, 1]);
    let q = Tensor::arange(t, cpu).unsqueeze(1);
    let k = Tensor::arange(t, cpu).unsqueeze(0);
    devices
        .iter()
        .zip(ropes)
        .map(|(&dev, ropes)| {
            let at = positions.to_device(dev);
            ShardTables {
                ropes: ropes.iter().map(|r| r.at(&at)).collect(),
                write_at: None,
                decode: None,
                chunks: Vec::new(),
                train_masks: windows
                    .kinds
                    .iter()
                    .map(|&w| w.map(|_| visible(&k, &q, w).to_device(dev)))
                    .collect(),
            }
        })
        .collect()
}

/// How a layer scores queries against keys.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scoring {
    /// What `q·k` is multiplied by; `None`: `1 / sqrt(head_dim)` (SDPA's own).
    pub(crate) scale: Option<f64>,
    /// `cap · tanh(scores / cap)` before the mask.
    pub(crate) softcap: Option<f64>,
}

/// Softmax attention of `q` (`[..., q, d]`) over `k`, `v` (`[..., keys, d]`, broadcast over the
/// leading dimensions; `gqa`: `q` has a multiple of `k`'s heads in dimension -3), with `mask`
/// (true: visible, broadcast to `[..., q, keys]`) or plain causal (`causal`). torch's SDPA unless
/// the scores are soft-capped, which it cannot do: then transformers' eager computation (scores in
/// the input dtype, softmax in float32).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
    gqa: bool,
    scoring: Scoring,
) -> Tensor {
    let Some(cap) = scoring.softcap else {
        return Tensor::scaled_dot_product_attention(
            q,
            k,
            v,
            mask,
            0.0,
            causal,
            scoring.scale,
            gqa,
        );
    };
    let (k, v) = if gqa {
        let n = q.size()[q.dim() - 3] / k.size()[k.dim() - 3];
        (
            k.repeat_interleave_self_int(n, Some(k.dim() as i64 - 3), None),
            v.repeat_interleave_self_int(n, Some(v.dim() as i64 - 3), None),
        )
    } else {
        (k.shallow_clone(), v.shallow_clone())
    };
    let d = q.size()[q.dim() - 1];
    let scale = scoring.scale.unwrap_or(1.0 / (d as f64).sqrt());
    let scores = q.matmul(&k.transpose(-1, -2)) * scale;
    let scores = (scores / cap).tanh() * cap;
    let (nq, nk) = (q.size()[q.dim() - 2], k.size()[k.dim() - 2]);
    let causal_mask;
    let mask = match mask {
        Some(m) => Some(m),
        None if causal => {
            let cpu = (Kind::Int64, q.device());
            causal_mask = Tensor::arange(nk, cpu)
                .unsqueeze(0)
                .le_tensor(&Tensor::arange(nq, cpu).unsqueeze(1));
            Some(&causal_mask)
        }
        None => None,
    };
    let scores = match mask {
        Some(m) => scores.masked_fill(&m.logical_not(), f64::NEG_INFINITY),
        None => scores,
    };
    scores.softmax(-1, Kind::Float).to_kind(q.kind()).matmul(&v)
}
