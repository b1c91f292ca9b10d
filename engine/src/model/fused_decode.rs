//! Decode steps in one pass of plain Rust over a packed model (issue 14). A step of decode rows
//! only (one token per sequence, up to [`INT_DOT_ROWS`] sequences), on one CPU device in float32,
//! runs every layer over flat float32 buffers: projections through the integer kernels
//! ([`crate::linear::Linear::apply_rows`]), each row's LoRA delta (its adapter's rank columns of
//! the step's [`LoraBatch`]), RMSNorm, q/k norms, RoPE, the gated activation and attention (the
//! layer's window, the model's scale and soft-cap) as loops here, keys and values written into
//! and read from the KV pool in place. It reads the same [`Architecture`](super::Architecture)
//! as the op-by-op block.
//!
//! Why: the op-by-op path makes about forty torch calls a layer, and on the small CPUs here their
//! dispatch cost more than the 4-bit matmuls themselves (SmolLM2: ~15 of ~25 ms a token). This
//! makes none, except where a projection has no integer kernel (one `linear` for it).
//!
//! It computes the op-by-op path's formulas in the same dtype, with sums in another order; its
//! tests compare the two step by step (`engine/tests/fused_decode.rs`).

use std::sync::atomic::Ordering;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::config::Activation;
use super::norm::RmsNorm;
use super::Model;
use crate::float_dot::dot;
use crate::int_dot::{self, OutPtr};
use crate::kv_cache::KvCache;
use crate::lora::Proj;
use crate::lora_bank::{LoraBatch, LoraSlice};
use crate::packed::INT_DOT_ROWS;
use crate::step::StepBatch;

impl Model {
    /// Whether `step` takes the fused path: decode rows only, at most [`INT_DOT_ROWS`] of them,
    /// positions inside the rotary tables, LoRA (if any) computable row by row on the CPU, and
    /// fused steps on for this model.
    pub(super) fn fuses(&self, step: &StepBatch, lora: Option<&LoraBatch>) -> bool {
        let m = step.segments.len();
        lora.is_none_or(LoraBatch::by_rows_on_cpu)
            && self.fused_decode.load(Ordering::Relaxed)
            && m > 0
            && m as i64 <= INT_DOT_ROWS
            && step.decode == m
            && step
                .segments
                .iter()
                .all(|s| s.start >= 0 && (s.start as usize) < self.config.max_position_embeddings)
    }

    /// One decode step the fused way (`step` and `lora` as [`Llama::fuses`] takes): the logits of
    /// its rows, `[rows, vocab]` float32. The step runs inside one parallel region of torch's
    /// threads ([`crate::threads::one_region`]): its ~200 splits wake no thread.
    pub(super) fn fused_decode_step(
        &self,
        step: &StepBatch,
        cache: &mut KvCache,
        lora: Option<&LoraBatch>,
    ) -> Tensor {
        crate::threads::one_region(|| self.fused_decode_layers(step, cache, lora))
    }

    fn fused_decode_layers(
        &self,
        step: &StepBatch,
        cache: &mut KvCache,
        lora: Option<&LoraBatch>,
    ) -> Tensor {
        let c = &self.config;
        let m = step.segments.len();
        let (hidden, inter) = (c.hidden_size, c.intermediate_size);
        let (heads, kv_heads, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (q_cols, kv_cols) = (heads * d, kv_heads * d);
        let qkv_cols = q_cols + 2 * kv_cols;
        let mut x = vec![0f32; m * hidden];
        self.embed.lookup_rows(&step.tokens, &mut x);
        if let Some(scale) = &self.embed_scale {
            let scale = scale.double_value(&[]) as f32;
            x.iter_mut().for_each(|v| *v *= scale);
        }
        let arch = &c.arch;
        let scoring = self.scoring();
        let scale = scoring.scale.unwrap_or(1.0 / (c.head_dim as f64).sqrt()) as f32;
        let softcap = scoring.softcap.map(|c| c as f32);
        let mut h = vec![0f32; m * hidden];
        let mut qkv = vec![0f32; m * qkv_cols];
        let mut attn = vec![0f32; m * q_cols];
        let mut proj = vec![0f32; m * hidden];
        let mut gate_up = vec![0f32; m * 2 * inter];
        let mut act = vec![0f32; m * inter];
        // SAFETY: the rotary tables are contiguous float32 CPU tensors (`Rope::new`, a float32
        // model on the CPU: `HoldPolicy::fuses_decode`), owned by `self`, never written after load.
        let tables: Vec<(&[f32], &[f32])> = self.ropes[0]
            .iter()
            .map(|r| unsafe { (int_dot::floats(&r.cos), int_dot::floats(&r.sin)) })
            .collect();
        let rows: Vec<Row> = step
            .segments
            .iter()
            .map(|s| Row {
                slot: s.slot as usize,
                pos: s.start as usize,
            })
            .collect();
        let dims = AttentionDims {
            heads,
            kv_heads,
            d,
            capacity: cache.capacity() as usize,
            slot_stride: kv_heads * cache.capacity() as usize * d,
        };
        let mut attention = std::time::Duration::ZERO;
        // Each projection's LoRA slices in this layer, with where their outputs start.
        let deltas = |layer: usize, parts: &[(Proj, usize)]| -> Vec<(&LoraSlice, usize)> {
            lora.map_or_else(Vec::new, |l| {
                parts
                    .iter()
                    .filter_map(|&(p, at)| Some((l.get(layer, p, 0)?, at)))
                    .collect()
            })
        };
        for (layer, block) in self.blocks.iter().enumerate() {
            let shard = &block.shards[0];
            let (cos, sin) = tables[block.rope];
            let window = self.windows.kinds[block.window];
            rms_norm(&x, &block.input_norm, &mut h);
            shard.qkv.apply_rows(&h, m, &mut qkv);
            let qkv_parts = [(Proj::Q, 0), (Proj::K, q_cols), (Proj::V, q_cols + kv_cols)];
            add_lora(&deltas(layer, &qkv_parts), &h, m, &mut qkv);
            let started = Instant::now();
            for (row, out) in rows.iter().zip(qkv.chunks_exact_mut(qkv_cols)) {
                let (q, rest) = out.split_at_mut(q_cols);
                if let (Some(qn), Some(kn)) = (&shard.q_norm, &shard.k_norm) {
                    rms_norm_in_place(q, qn);
                    rms_norm_in_place(&mut rest[..kv_cols], kn);
                }
                let at = row.pos * d;
                let (cos, sin) = (&cos[at..at + d], &sin[at..at + d]);
                for head in out[..q_cols + kv_cols].chunks_exact_mut(d) {
                    rotate(head, cos, sin);
                }
            }
            let kv = cache.layer(0, layer);
            // SAFETY: the pool's tensors are contiguous float32 CPU ones of `[slots, kv_heads,
            // capacity, d]` (`KvCache::new` / `ensure` with this model's kind and device), with
            // room for every row's slot and position (`forward_step` ensured it); the `&mut`
            // borrow of the pool keeps anything else from touching them during the step.
            let (keys, values) = unsafe {
                (
                    int_dot::floats_mut(&kv.k).as_mut_ptr(),
                    int_dot::floats_mut(&kv.v).as_mut_ptr(),
                )
            };
            for (row, out) in rows.iter().zip(qkv.chunks_exact(qkv_cols)) {
                for g in 0..kv_heads {
                    let at = dims.at(row, g, row.pos);
                    let (k, v) = (
                        &out[q_cols + g * d..q_cols + (g + 1) * d],
                        &out[q_cols + kv_cols + g * d..q_cols + kv_cols + (g + 1) * d],
                    );
                    // SAFETY: `at .. at + d` is inside the pool (above).
                    unsafe {
                        std::ptr::copy_nonoverlapping(k.as_ptr(), keys.add(at), d);
                        std::ptr::copy_nonoverlapping(v.as_ptr(), values.add(at), d);
                    }
                }
            }
            attend(
                &dims,
                &rows,
                &qkv,
                qkv_cols,
                Pool {
                    keys: keys as *const f32,
                    values: values as *const f32,
                },
                Scores {
                    scale,
                    softcap,
                    window,
                },
                &mut attn,
            );
            attention += started.elapsed();
            shard.o.apply_rows(&attn, m, &mut proj);
            add_lora(&deltas(layer, &[(Proj::O, 0)]), &attn, m, &mut proj);
            if let Some(n) = &block.post_attn_norm {
                rms_norm_in_place(&mut proj, n);
            }
            add(&mut x, &proj);
            rms_norm(&x, &block.pre_mlp_norm, &mut h);
            shard.gate_up.apply_rows(&h, m, &mut gate_up);
            let gate_up_parts = [(Proj::Gate, 0), (Proj::Up, inter)];
            add_lora(&deltas(layer, &gate_up_parts), &h, m, &mut gate_up);
            for (gu, out) in gate_up
                .chunks_exact(2 * inter)
                .zip(act.chunks_exact_mut(inter))
            {
                let (gate, up) = gu.split_at(inter);
                match arch.activation {
                    Activation::Silu => crate::vec_exp::silu_mul(gate, up, out),
                    Activation::GeluTanh => gelu_tanh_mul(gate, up, out),
                }
            }
            shard.down.apply_rows(&act, m, &mut proj);
            add_lora(&deltas(layer, &[(Proj::Down, 0)]), &act, m, &mut proj);
            if let Some(n) = &block.post_mlp_norm {
                rms_norm_in_place(&mut proj, n);
            }
            add(&mut x, &proj);
        }
        self.attention_ns
            .fetch_add(attention.as_nanos() as u64, Ordering::Relaxed);
        rms_norm(&x, &self.norm, &mut h);
        let logits = Tensor::empty([m as i64, c.vocab_size as i64], (Kind::Float, Device::Cpu));
        // SAFETY: a new contiguous float32 CPU tensor of `m × vocab` values, written only here.
        self.lm_head
            .apply_rows(&h, m, unsafe { int_dot::floats_mut(&logits) });
        self.cap_logits(logits)
    }
}

/// One decode row: its KV slot and the position of its token.
struct Row {
    slot: usize,
    pos: usize,
}

/// The shape of attention and of one layer of the pool.
struct AttentionDims {
    heads: usize,
    kv_heads: usize,
    d: usize,
    capacity: usize,
    /// Values per slot in one layer's keys (or values).
    slot_stride: usize,
}

impl AttentionDims {
    /// Where key/value head `g` of `row`'s slot holds position `pos`.
    fn at(&self, row: &Row, g: usize, pos: usize) -> usize {
        row.slot * self.slot_stride + (g * self.capacity + pos) * self.d
    }
}

/// One layer's keys and values in the pool, read by the threads of [`attend`].
#[derive(Clone, Copy)]
struct Pool {
    keys: *const f32,
    values: *const f32,
}
// SAFETY: read only while `attend` runs, written by no one then.
unsafe impl Send for Pool {}
unsafe impl Sync for Pool {}

impl Pool {
    /// Keys and values of `n` values from `at` (methods, so closures capture the `Sync` whole).
    ///
    /// # Safety
    /// `at .. at + n` must be inside the layer, unwritten while the slices live.
    unsafe fn read(self, at: usize, n: usize) -> (&'static [f32], &'static [f32]) {
        (
            std::slice::from_raw_parts(self.keys.add(at), n),
            std::slice::from_raw_parts(self.values.add(at), n),
        )
    }
}

/// `x · rsqrt(mean(x²) + eps) · weight` over each run of the weight's length, in place (the
/// q/k norms over each head, the norms after attention and the MLP over each row).
fn rms_norm_in_place(x: &mut [f32], norm: &RmsNorm) {
    let copy = x.to_vec();
    rms_norm(&copy, norm, x);
}

/// `x · rsqrt(mean(x²) + eps) · weight`, row by row (`x`, `out`: `[rows, hidden]`).
fn rms_norm(x: &[f32], norm: &RmsNorm, out: &mut [f32]) {
    // SAFETY: the norm's weight is a contiguous float32 CPU tensor (a float32 CPU model), owned
    // by the model, never written after load.
    let w = unsafe { int_dot::floats(&norm.weight) };
    let n = w.len();
    for (xs, os) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let mean = xs.iter().map(|v| v * v).sum::<f32>() / n as f32;
        let r = 1.0 / (mean + norm.eps as f32).sqrt();
        for ((o, &v), &w) in os.iter_mut().zip(xs).zip(w) {
            *o = v * r * w;
        }
    }
}

/// HF's rotate-half RoPE on one head: `x·cos + roll(x, d/2)·sin` (`sin` carries the sign), each
/// product rounded, then the sum: torch's three ops.
fn rotate(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * cos[i] + b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/// Adds each row's LoRA delta `scale · (x·Aᵀ)·Bᵀ` of every slice in `slices` to its part of
/// `out` (`[rows, cols]`; a slice's part starts at the column paired with it): `x·Aᵀ` over the
/// row's rank columns only, then `·Bᵀ` over them, as the op-by-op path's masked GEMMs compute it
/// (a masked column adds an exact zero there). Rows split between threads.
fn add_lora(slices: &[(&LoraSlice, usize)], x: &[f32], rows: usize, out: &mut [f32]) {
    if slices.is_empty() || rows == 0 {
        return;
    }
    let (inputs, cols) = (x.len() / rows, out.len() / rows);
    let parts: Vec<Part> = slices
        .iter()
        .map(|&(slice, at)| {
            let view = slice.by_rows().expect("fused steps take inference batches");
            // SAFETY: A and B are contiguous float32 CPU tensors (`by_rows_on_cpu`), held by the
            // step's batch and read only while it runs.
            let (a, b) = unsafe { (int_dot::floats(view.a), int_dot::floats(view.b)) };
            Part {
                a,
                b,
                total: a.len() / inputs,
                columns: view.columns,
                at,
            }
        })
        .collect();
    let out_ptr = OutPtr(out.as_mut_ptr());
    crate::threads::split_rows(rows, 1, |first, n| {
        let mut xa = Vec::new();
        for row in first..first + n {
            let x = &x[row * inputs..(row + 1) * inputs];
            // SAFETY: row `row` of `out` belongs to this share only.
            let out = unsafe { std::slice::from_raw_parts_mut(out_ptr.at(row * cols), cols) };
            for p in &parts {
                let Some((offset, rank)) = p.columns[row] else {
                    continue;
                };
                xa.resize(rank, 0.0);
                row_delta(p, x, offset, &mut xa, &mut out[p.at..]);
            }
        }
    });
}

/// One LoRA slice of [`add_lora`] as flat values.
struct Part<'a> {
    /// `[total, inputs]`.
    a: &'a [f32],
    /// `[outputs, total]`.
    b: &'a [f32],
    total: usize,
    columns: &'a [Option<(usize, usize)>],
    /// The first column of its output in the projection's.
    at: usize,
}

/// One row's delta of one part: `xa = A_r·x` over the row's rank columns `offset ..` (as many as
/// `xa` holds), then `out[o] += B[o, offset ..]·xa` for each of B's rows.
fn row_delta(part: &Part, x: &[f32], offset: usize, xa: &mut [f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::simd() {
        // SAFETY: the CPU has AVX2 and FMA (`simd`).
        return unsafe { row_delta_avx2(part, x, offset, xa, out) };
    }
    row_delta_portable(part, x, offset, xa, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_delta_avx2(part: &Part, x: &[f32], offset: usize, xa: &mut [f32], out: &mut [f32]) {
    row_delta_portable(part, x, offset, xa, out)
}

#[inline(always)]
fn row_delta_portable(part: &Part, x: &[f32], offset: usize, xa: &mut [f32], out: &mut [f32]) {
    let (inputs, rank) = (x.len(), xa.len());
    let a = &part.a[offset * inputs..(offset + rank) * inputs];
    for (v, a_row) in xa.iter_mut().zip(a.chunks_exact(inputs)) {
        *v = dot(a_row, x);
    }
    for (o, b_row) in out.iter_mut().zip(part.b.chunks_exact(part.total)) {
        *o += dot(&b_row[offset..offset + rank], xa);
    }
}

/// `gelu_tanh(gate)·up` into `out`: torch's `gelu(approximate="tanh")`,
/// `0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³)))`, times the up projection.
fn gelu_tanh_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    const BETA: f32 = std::f32::consts::SQRT_2 * std::f32::consts::FRAC_2_SQRT_PI * 0.5;
    const KAPPA: f32 = 0.044715;
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        let inner = BETA * (g + KAPPA * g * g * g);
        *o = 0.5 * g * (1.0 + inner.tanh()) * u;
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// How a layer scores: the scale of `q·k`, the soft-cap, the window.
#[derive(Clone, Copy)]
struct Scores {
    scale: f32,
    softcap: Option<f32>,
    window: Option<usize>,
}

/// Attention of every row over its slot's keys up to `pos` (within the window), all query heads
/// of a key/value head together, split between threads by (row, key/value head); into `out`
/// (`[rows, heads·d]`).
fn attend(
    dims: &AttentionDims,
    rows: &[Row],
    qkv: &[f32],
    qkv_cols: usize,
    pool: Pool,
    how: Scores,
    out: &mut [f32],
) {
    let (heads, kv_heads, d) = (dims.heads, dims.kv_heads, dims.d);
    let group = heads / kv_heads;
    let out_ptr = OutPtr(out.as_mut_ptr());
    crate::threads::split_rows(rows.len() * kv_heads, 1, |first, n| {
        let mut scores = Vec::new();
        for unit in first..first + n {
            let (r, g) = (unit / kv_heads, unit % kv_heads);
            let row = &rows[r];
            let first = how.window.map_or(0, |w| (row.pos + 1).saturating_sub(w));
            let keys = row.pos + 1 - first;
            let base = dims.at(row, g, first);
            // SAFETY: positions `first ..= pos` of this slot's head `g` are inside the pool, and
            // nothing writes the pool while `attend` runs.
            let (k, v) = unsafe { pool.read(base, keys * d) };
            for j in 0..group {
                let hq = g * group + j;
                let q = &qkv[r * qkv_cols + hq * d..r * qkv_cols + (hq + 1) * d];
                // SAFETY: head `hq` of row `r` belongs to this unit only.
                let o = unsafe {
                    std::slice::from_raw_parts_mut(out_ptr.at(r * heads * d + hq * d), d)
                };
                scores.resize(keys, 0.0);
                attend_head(q, k, v, how, &mut scores, o);
            }
        }
    });
}

/// One query head over `keys` keys and values (`k`, `v`: `[keys, d]`):
/// softmax(cap(q·kᵀ·scale))·v into `out`.
fn attend_head(q: &[f32], k: &[f32], v: &[f32], how: Scores, scores: &mut [f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::simd() {
        // SAFETY: the CPU has AVX2 and FMA (`simd`).
        return unsafe { attend_head_avx2(q, k, v, how, scores, out) };
    }
    attend_head_portable(q, k, v, how, scores, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_head_avx2(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    how: Scores,
    scores: &mut [f32],
    out: &mut [f32],
) {
    attend_head_portable(q, k, v, how, scores, out)
}

#[inline(always)]
fn attend_head_portable(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    how: Scores,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let d = q.len();
    let mut max = f32::NEG_INFINITY;
    for (s, key) in scores.iter_mut().zip(k.chunks_exact(d)) {
        *s = dot(q, key) * how.scale;
        if let Some(cap) = how.softcap {
            *s = (*s / cap).tanh() * cap;
        }
        max = max.max(*s);
    }
    let mut total = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        total += *s;
    }
    out.fill(0.0);
    for (&p, value) in scores.iter().zip(v.chunks_exact(d)) {
        for (o, &x) in out.iter_mut().zip(value) {
            *o += p * x;
        }
    }
    let inv = 1.0 / total;
    for o in out.iter_mut() {
        *o *= inv;
    }
}
