//! Decode steps in one pass of plain Rust over a packed model (issue 14). A step of decode rows
//! only (one token per sequence, up to [`INT_DOT_ROWS`] sequences), on one CPU device in float32,
//! runs every layer over flat float32 buffers: projections through the integer kernels
//! ([`crate::packed::Linear::apply_rows`]), each row's LoRA delta (its adapter's rank columns of
//! the step's [`LoraBatch`]), RMSNorm, RoPE, SwiGLU and attention as loops here, keys and values
//! written into and read from the KV pool in place.
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

use super::{Llama, Table};
use crate::int_dot::{self, OutPtr};
use crate::kv_cache::KvCache;
use crate::lora::Proj;
use crate::lora_bank::{LoraBatch, LoraSlice};
use crate::packed::{Int4Mode, INT_DOT_ROWS};
use crate::step::StepBatch;

/// Whether a model loaded this way can take fused decode steps: one CPU device, float32, weights
/// held for inference (the packed modes; the dequantised reference path keeps torch's ops).
pub(super) fn supported(int4: Int4Mode, devices: &[Device], kind: Kind) -> bool {
    matches!(int4, Int4Mode::IntDot | Int4Mode::Kernel(_))
        && devices == [Device::Cpu]
        && kind == Kind::Float
}

impl Llama {
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
    /// its rows, `[rows, vocab]` float32.
    pub(super) fn fused_decode_step(
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
        let mut h = vec![0f32; m * hidden];
        let mut qkv = vec![0f32; m * qkv_cols];
        let mut attn = vec![0f32; m * q_cols];
        let mut proj = vec![0f32; m * hidden];
        let mut gate_up = vec![0f32; m * 2 * inter];
        let mut act = vec![0f32; m * inter];
        let rope = &self.ropes[0];
        // SAFETY: the rotary tables are contiguous float32 CPU tensors (`Rope::new`, a float32
        // model on the CPU: `supported`), owned by `self`, never written after load.
        let (cos, sin) = unsafe { (int_dot::floats(&rope.cos), int_dot::floats(&rope.sin)) };
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
            rms_norm(&x, &block.input_norm, &mut h);
            shard.qkv.apply_rows(&h, m, &mut qkv);
            let qkv_parts = [(Proj::Q, 0), (Proj::K, q_cols), (Proj::V, q_cols + kv_cols)];
            add_lora(&deltas(layer, &qkv_parts), &h, m, &mut qkv);
            let started = Instant::now();
            for (row, out) in rows.iter().zip(qkv.chunks_exact_mut(qkv_cols)) {
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
                &mut attn,
            );
            attention += started.elapsed();
            shard.o.apply_rows(&attn, m, &mut proj);
            add_lora(&deltas(layer, &[(Proj::O, 0)]), &attn, m, &mut proj);
            add(&mut x, &proj);
            rms_norm(&x, &block.post_norm, &mut h);
            shard.gate_up.apply_rows(&h, m, &mut gate_up);
            let gate_up_parts = [(Proj::Gate, 0), (Proj::Up, inter)];
            add_lora(&deltas(layer, &gate_up_parts), &h, m, &mut gate_up);
            for (gu, out) in gate_up
                .chunks_exact(2 * inter)
                .zip(act.chunks_exact_mut(inter))
            {
                let (gate, up) = gu.split_at(inter);
                crate::vec_exp::silu_mul(gate, up, out);
            }
            shard.down.apply_rows(&act, m, &mut proj);
            add_lora(&deltas(layer, &[(Proj::Down, 0)]), &act, m, &mut proj);
            add(&mut x, &proj);
        }
        self.attention_ns
            .fetch_add(attention.as_nanos() as u64, Ordering::Relaxed);
        rms_norm(&x, &self.norm, &mut h);
        let logits = Tensor::empty([m as i64, c.vocab_size as i64], (Kind::Float, Device::Cpu));
        // SAFETY: a new contiguous float32 CPU tensor of `m × vocab` values, written only here.
        self.lm_head
            .project_rows(&h, m, unsafe { int_dot::floats_mut(&logits) });
        logits
    }
}

impl Table {
    /// Rows `ids` into `out` (`[ids, hidden]` float32) on the CPU.
    fn lookup_rows(&self, ids: &[i64], out: &mut [f32]) {
        match self {
            Table::Q8(t) => t.lookup_rows(ids, out),
            Table::Dense(t) => {
                let rows = t.index_select(0, &Tensor::from_slice(ids));
                rows.to_kind(Kind::Float).copy_data(out, out.len());
            }
        }
    }

    /// `x · tableᵀ` for `m` rows of float32 values, into `out` (`[m, rows]`).
    fn project_rows(&self, x: &[f32], m: usize, out: &mut [f32]) {
        match self {
            Table::Q8(t) if t.kernel_takes(m) => t.kernel_rows(x, m, out),
            _ => {
                let y = self.project(&Tensor::from_slice(x).view([m as i64, -1]));
                y.to_kind(Kind::Float)
                    .contiguous()
                    .copy_data(out, out.len());
            }
        }
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

/// `x · rsqrt(mean(x²) + eps) · weight`, row by row (`x`, `out`: `[rows, hidden]`).
fn rms_norm(x: &[f32], norm: &super::RmsNorm, out: &mut [f32]) {
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
    int_dot::split_rows(rows, 1, |first, n| {
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

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Attention of every row over its slot's keys `0 ..= pos`, all query heads of a key/value head
/// together, split between threads by (row, key/value head); into `out` (`[rows, heads·d]`).
fn attend(
    dims: &AttentionDims,
    rows: &[Row],
    qkv: &[f32],
    qkv_cols: usize,
    pool: Pool,
    out: &mut [f32],
) {
    let (heads, kv_heads, d) = (dims.heads, dims.kv_heads, dims.d);
    let group = heads / kv_heads;
    let out_ptr = OutPtr(out.as_mut_ptr());
    int_dot::split_rows(rows.len() * kv_heads, 1, |first, n| {
        let mut scores = Vec::new();
        for unit in first..first + n {
            let (r, g) = (unit / kv_heads, unit % kv_heads);
            let row = &rows[r];
            let keys = row.pos + 1;
            let base = dims.at(row, g, 0);
            // SAFETY: positions `0 ..= pos` of this slot's head `g` are inside the pool, and
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
                attend_head(q, k, v, &mut scores, o);
            }
        }
    });
}

/// One query head over `keys` keys and values (`k`, `v`: `[keys, d]`): softmax(q·kᵀ/√d)·v into
/// `out`.
fn attend_head(q: &[f32], k: &[f32], v: &[f32], scores: &mut [f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::simd() {
        // SAFETY: the CPU has AVX2 and FMA (`simd`).
        return unsafe { attend_head_avx2(q, k, v, scores, out) };
    }
    attend_head_portable(q, k, v, scores, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_head_avx2(q: &[f32], k: &[f32], v: &[f32], scores: &mut [f32], out: &mut [f32]) {
    attend_head_portable(q, k, v, scores, out)
}

#[inline(always)]
fn attend_head_portable(q: &[f32], k: &[f32], v: &[f32], scores: &mut [f32], out: &mut [f32]) {
    let d = q.len();
    let scale = 1.0 / (d as f32).sqrt();
    let mut max = f32::NEG_INFINITY;
    for (s, key) in scores.iter_mut().zip(k.chunks_exact(d)) {
        *s = dot(q, key) * scale;
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

/// `a · b` in eight independent lanes (so it vectorises), then their sum.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}
