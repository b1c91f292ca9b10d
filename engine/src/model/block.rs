//! One decoder block, as the [`Architecture`](super::config::Architecture) describes it: norms
//! (before attention and the MLP, and after them where the family has them), q|k|v with their
//! biases and q/k norms, RoPE, attention (the layer's window and rotary table, the model's scale and
//! soft-cap), and the gated MLP with the family's activation. Split into shards, one per device:
//! attention heads and MLP columns for q/k/v/gate/up, rows for o/down. LoRA deltas come in per
//! batch row through [`LoraBatch`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tch::{Device, Tensor};

use super::attention::{attend, Scoring, ShardTables};
use super::config::Activation;
use super::norm::RmsNorm;
use super::rope::RopeAt;
use crate::kv_cache::KvCache;
use crate::linear::Linear;
use crate::lora::{LoraBatch, Proj};

/// One device's part of a decoder block.
pub(crate) struct BlockShard {
    pub(crate) device: Device,
    pub(crate) heads: i64,
    pub(crate) kv_heads: i64,
    /// q, k and v stacked by rows: one matmul, split after.
    pub(crate) qkv: Linear,
    pub(crate) o: Linear,
    /// gate and up stacked by rows.
    pub(crate) gate_up: Linear,
    pub(crate) down: Linear,
    /// RMSNorm over each head of q and of k before RoPE (Qwen3, Gemma 3).
    pub(crate) q_norm: Option<RmsNorm>,
    pub(crate) k_norm: Option<RmsNorm>,
}

pub(crate) struct Block {
    /// Before attention.
    pub(crate) input_norm: RmsNorm,
    /// On attention's output, before the residual add (Gemma 2 and 3).
    pub(crate) post_attn_norm: Option<RmsNorm>,
    /// Before the MLP (Llama's `post_attention_layernorm`, Gemma's `pre_feedforward_layernorm`).
    pub(crate) pre_mlp_norm: RmsNorm,
    /// On the MLP's output, before the residual add (Gemma 2 and 3).
    pub(crate) post_mlp_norm: Option<RmsNorm>,
    pub(crate) shards: Vec<BlockShard>,
    /// Which of the model's attention windows (`attention::Windows`) the layer uses.
    pub(crate) window: usize,
    /// Which of the model's rotary tables it uses.
    pub(crate) rope: usize,
}

/// What one layer's forward needs besides its input.
pub(crate) struct StepCtx<'a> {
    pub(crate) layer: usize,
    pub(crate) tables: &'a [ShardTables],
    pub(crate) head_dim: i64,
    pub(crate) lora: Option<&'a LoraBatch>,
    pub(crate) scoring: Scoring,
    pub(crate) activation: Activation,
    pub(crate) window: usize,
    pub(crate) rope: usize,
}

fn linear(x: &Tensor, w: &Linear, ctx: &StepCtx, proj: Proj, shard: usize) -> Tensor {
    let y = w.apply(x);
    match ctx.lora.and_then(|l| l.get(ctx.layer, proj, shard)) {
        Some(slice) => y + slice.apply(x),
        None => y,
    }
}

/// One matmul for several projections of the same input (stacked by rows in `w`), each with its
/// own LoRA delta added to its part of the output.
fn fused_linear(
    x: &Tensor,
    w: &Linear,
    ctx: &StepCtx,
    parts: &[(Proj, i64)],
    shard: usize,
) -> Tensor {
    let y = w.apply(x);
    let Some(lora) = ctx.lora else {
        return y;
    };
    let slices: Vec<_> = parts
        .iter()
        .map(|(p, _)| lora.get(ctx.layer, *p, shard))
        .collect();
    if slices.iter().all(Option::is_none) {
        return y;
    }
    let sizes: Vec<i64> = parts.iter().map(|(_, n)| *n).collect();
    let outs: Vec<Tensor> = y
        .split_with_sizes(sizes.as_slice(), -1)
        .into_iter()
        .zip(slices)
        .map(|(out, slice)| match slice {
            Some(s) => out + s.apply(x),
            None => out,
        })
        .collect();
    Tensor::cat(&outs, -1)
}

impl BlockShard {
    /// q·k·v, q/k norms where the model has them, RoPE on q and k: `(q, k, v)` shaped
    /// `[..., heads, d]`.
    fn qkv(
        &self,
        x: &Tensor,
        ctx: &StepCtx,
        rope: &RopeAt,
        shard: usize,
    ) -> (Tensor, Tensor, Tensor) {
        let d = ctx.head_dim;
        let (qd, kvd) = (self.heads * d, self.kv_heads * d);
        let y = fused_linear(
            x,
            &self.qkv,
            ctx,
            &[(Proj::Q, qd), (Proj::K, kvd), (Proj::V, kvd)],
            shard,
        );
        let lead = &x.size()[..x.dim() - 1];
        let shape = |heads: i64| [lead, &[heads, d]].concat();
        let (q, k) = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => {
                let q = qn.forward(&y.narrow(-1, 0, qd).reshape(shape(self.heads).as_slice()));
                let k = kn.forward(
                    &y.narrow(-1, qd, kvd)
                        .reshape(shape(self.kv_heads).as_slice()),
                );
                (rope.apply(&q), rope.apply(&k))
            }
            _ => {
                // q and k rotated together: one op for both.
                let qk = rope.apply(
                    &y.narrow(-1, 0, qd + kvd)
                        .reshape(shape(self.heads + self.kv_heads).as_slice()),
                );
                (
                    qk.narrow(-2, 0, self.heads),
                    qk.narrow(-2, self.heads, self.kv_heads),
                )
            }
        };
        let v = y
            .narrow(-1, qd + kvd, kvd)
            .reshape(shape(self.kv_heads).as_slice());
        (q, k, v)
    }

    /// Attention of a packed step (`x`: `[tokens, hidden]`), reading and writing the pool.
    pub(crate) fn attention_step(
        &self,
        x: &Tensor,
        ctx: &StepCtx,
        shard: usize,
        pool: &mut KvCache,
        timer: &AtomicU64,
    ) -> Tensor {
        let t = &ctx.tables[shard];
        let (q, k, v) = self.qkv(x, ctx, &t.ropes[ctx.rope], shard);
        let started = Instant::now();
        let d = ctx.head_dim;
        let group = self.heads / self.kv_heads;
        let kv = pool.layer(shard, ctx.layer);
        if let Some((slots, pos)) = &t.write_at {
            let idx = [Some(slots), None, Some(pos)];
            let _ = kv.k.index_put_(&idx, &k, false);
            let _ = kv.v.index_put_(&idx, &v, false);
        }
        let mut outs = Vec::with_capacity(1 + t.chunks.len());
        if let Some(dec) = &t.decode {
            // GQA folded into the query: [rows, kv_heads, group, d] against unexpanded K/V.
            let q = q
                .narrow(0, 0, dec.rows)
                .reshape([dec.rows, self.kv_heads, group, d]);
            let q = match &dec.scatter {
                None => q,
                Some(at) => {
                    Tensor::zeros([dec.span, self.kv_heads, group, d], (q.kind(), q.device()))
                        .index_copy(0, at, &q)
                }
            };
            let keys = kv.k.narrow(0, dec.lo, dec.span).narrow(2, 0, dec.keys);
            let values = kv.v.narrow(0, dec.lo, dec.span).narrow(2, 0, dec.keys);
            let out = attend(
                &q,
                &keys,
                &values,
                Some(&dec.masks[ctx.window]),
                false,
                false,
                ctx.scoring,
            );
            let out = match &dec.scatter {
                None => out,
                Some(at) => out.index_select(0, at),
            };
            outs.push(out.reshape([dec.rows, self.heads * d]));
        }
        let mut offset = t.decode.as_ref().map_or(0, |d| d.rows);
        for c in &t.chunks {
            let q = q
                .narrow(0, offset, c.len)
                .reshape([c.len, self.kv_heads, group, d])
                .permute([1, 2, 0, 3])
                .reshape([1, self.kv_heads, group * c.len, d]);
            let keys = kv.k.narrow(0, c.slot, 1).narrow(2, 0, c.start + c.len);
            let values = kv.v.narrow(0, c.slot, 1).narrow(2, 0, c.start + c.len);
            let out = attend(
                &q,
                &keys,
                &values,
                Some(&c.masks[ctx.window]),
                false,
                false,
                ctx.scoring,
            );
            outs.push(
                out.reshape([self.kv_heads, group, c.len, d])
                    .permute([2, 0, 1, 3])
                    .reshape([c.len, self.heads * d]),
            );
            offset += c.len;
        }
        let out = if outs.len() == 1 {
            outs.pop().expect("one part")
        } else {
            Tensor::cat(&outs, 0)
        };
        timer.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        linear(&out, &self.o, ctx, Proj::O, shard)
    }

    /// Attention over whole sequences from position 0 without a cache (`x`: `[batch, t, hidden]`;
    /// the training path: causal attention, so right padding never reaches real tokens).
    pub(crate) fn attention_train(&self, x: &Tensor, ctx: &StepCtx, shard: usize) -> Tensor {
        let (b, t, _) = x.size3().expect("hidden states are 3-d");
        let tables = &ctx.tables[shard];
        let (q, k, v) = self.qkv(x, ctx, &tables.ropes[ctx.rope], shard);
        let mask = tables.train_masks[ctx.window].as_ref();
        let out = attend(
            &q.transpose(1, 2),
            &k.transpose(1, 2),
            &v.transpose(1, 2),
            mask,
            mask.is_none(),
            self.heads != self.kv_heads,
            ctx.scoring,
        );
        let out = out
            .transpose(1, 2)
            .reshape([b, t, self.heads * ctx.head_dim]);
        linear(&out, &self.o, ctx, Proj::O, shard)
    }

    pub(crate) fn mlp(&self, x: &Tensor, ctx: &StepCtx, shard: usize) -> Tensor {
        let half = self.gate_up.out_features() / 2;
        let gu = fused_linear(
            x,
            &self.gate_up,
            ctx,
            &[(Proj::Gate, half), (Proj::Up, half)],
            shard,
        );
        let gate = gu.narrow(-1, 0, half);
        let up = gu.narrow(-1, half, half);
        let act = match ctx.activation {
            Activation::Silu => gate.silu(),
            Activation::GeluTanh => gate.gelu("tanh"),
        };
        linear(&(act * up), &self.down, ctx, Proj::Down, shard)
    }
}

impl Block {
    /// Its norms (not the shards' q/k norms).
    pub(crate) fn norms(&self) -> impl Iterator<Item = &RmsNorm> {
        [Some(&self.input_norm), self.post_attn_norm.as_ref()]
            .into_iter()
            .chain([Some(&self.pre_mlp_norm), self.post_mlp_norm.as_ref()])
            .flatten()
    }
}

impl BlockShard {
    /// Its four projections.
    pub(crate) fn projections(&self) -> [&Linear; 4] {
        [&self.qkv, &self.o, &self.gate_up, &self.down]
    }

    /// Its q/k norms.
    pub(crate) fn norms(&self) -> impl Iterator<Item = &RmsNorm> {
        self.q_norm.iter().chain(self.k_norm.iter())
    }
}
