//! The Llama-family decoder: embedding, RMSNorm, rotary embeddings, grouped-query attention with a
//! KV cache, SwiGLU MLP, tied or untied `lm_head`. It is tensor-parallel from the ground up: every
//! block is split into shards, one per device (attention heads and MLP columns for q/k/v/gate/up,
//! rows for o/down); the partial outputs are copied to the main device and added. With one device
//! there is one shard and no copy. LoRA deltas come in through [`LoraBatch`], per batch row.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::kv_cache::{KvCache, ShardLayout};
use crate::lora::{LoraBatch, Proj};
use crate::model_config::LlamaConfig;
use crate::packed::{tensor_bytes, Int4Mode, Int4Weight, Linear};
use crate::q8_weight::Q8Weight;
use crate::step::{LogitRows, Segment, StepBatch};
use crate::weights::{LinearWeight, TableWeight, WeightMap, WeightsError};

mod fused_decode;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("tensor parallel degree {tp}: {what} ({count}) is not divisible by it")]
    TensorParallel {
        tp: usize,
        what: &'static str,
        count: usize,
    },
    #[error("no devices given")]
    NoDevices,
}

/// Which positions to compute logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Every position: `[batch, tokens, vocab]`.
    All,
    /// The last position of each row: `[batch, 1, vocab]`.
    Last,
}

struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// As transformers' `LlamaRMSNorm`: normalise in float32, scale in the model's dtype.
    fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        if kind == Kind::Float {
            // One fused op; in float32 it is the same computation.
            let h = self.weight.size()[0];
            return x.rms_norm([h], Some(&self.weight), self.eps);
        }
        let xf = x.to_kind(Kind::Float);
        let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = xf * (var + self.eps).rsqrt();
        &self.weight * normed.to_kind(kind)
    }
}

/// Precomputed cos/sin for every position, `[max_positions, head_dim]` (halves duplicated). The
/// sin table carries rotate-half's sign (`[-sin, sin]`), so rotating is one `roll`.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

/// cos and signed sin gathered for a step's positions, shaped to broadcast over the heads axis:
/// `[tokens, 1, head_dim]` for a packed step, `[batch, t, 1, head_dim]` for training.
struct RopeAt {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(config: &LlamaConfig, device: Device, kind: Kind) -> Self {
        let d = config.head_dim as i64;
        let positions = config.max_position_embeddings as i64;
        let opts = (Kind::Float, Device::Cpu);
        // transformers: 1 / theta ** (arange(0, d, 2).float() / d), in float32.
        let exponents = Tensor::arange_start_step(0, d, 2, (Kind::Int64, Device::Cpu))
            .to_kind(Kind::Float)
            / d as f64;
        let inv_freq = Tensor::pow_scalar(config.rope_theta, &exponents).reciprocal();
        let t = Tensor::arange(positions, opts);
        let freqs = t.outer(&inv_freq);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let sin = freqs.sin();
        Self {
            cos: emb.cos().to_kind(kind).to_device(device),
            sin: Tensor::cat(&[&sin.neg(), &sin], -1)
                .to_kind(kind)
                .to_device(device),
        }
    }

    /// The tables at `positions` (any shape, on this rope's device), with a heads axis of 1
    /// inserted before `head_dim`.
    fn at(&self, positions: &Tensor) -> RopeAt {
        let mut shape = positions.size();
        let flat = positions.reshape([-1]);
        shape.extend([1, -1]);
        RopeAt {
            cos: self.cos.index_select(0, &flat).reshape(shape.as_slice()),
            sin: self.sin.index_select(0, &flat).reshape(shape.as_slice()),
        }
    }
}

impl RopeAt {
    /// `x`: `[..., heads, head_dim]`. HF's `x·cos + rotate_half(x)·sin`.
    fn apply(&self, x: &Tensor) -> Tensor {
        let half = x.size()[x.dim() - 1] / 2;
        x * &self.cos + x.roll([half], [-1]) * &self.sin
    }
}

/// One device's part of a decoder block.
struct BlockShard {
    device: Device,
    heads: i64,
    kv_heads: i64,
    /// q, k and v stacked by rows: one matmul, split after.
    qkv: Linear,
    o: Linear,
    /// gate and up stacked by rows.
    gate_up: Linear,
    down: Linear,
}

struct Block {
    input_norm: RmsNorm,
    post_norm: RmsNorm,
    shards: Vec<BlockShard>,
}

/// The decode rows of a step, attended as one batch: slots `lo .. lo + span` of the pool, the
/// rows' queries scattered there when the slots are not exactly the decode rows in order.
struct DecodeAttention {
    lo: i64,
    span: i64,
    rows: i64,
    /// `[rows]`: each decode row's slot − `lo`, when the slots are not `0..rows` in order.
    scatter: Option<Tensor>,
    /// Keys every slot of the span attends over (the longest row's).
    keys: i64,
    /// `[span, 1, 1, keys]`: which keys each slot sees.
    mask: Tensor,
}

/// One prompt chunk, attended on its own against its slot.
struct ChunkAttention {
    slot: i64,
    start: i64,
    len: i64,
    /// `[group·len, start + len]`: causal over the chunk, everything before it.
    mask: Tensor,
}

/// The per-shard tensors a step builds once and every layer reads.
struct ShardTables {
    rope: RopeAt,
    /// `(slot, position)` of every token: where its key/value is written.
    write_at: Option<(Tensor, Tensor)>,
    decode: Option<DecodeAttention>,
    chunks: Vec<ChunkAttention>,
}

/// What one layer's forward needs besides its input.
struct StepCtx<'a> {
    layer: usize,
    tables: &'a [ShardTables],
    head_dim: i64,
    lora: Option<&'a LoraBatch>,
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
    /// q·k·v with RoPE applied to the q|k part: `(q, k, v)` shaped `[..., heads, d]`.
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
        let qk = rope.apply(
            &y.narrow(-1, 0, qd + kvd)
                .reshape(shape(self.heads + self.kv_heads).as_slice()),
        );
        let q = qk.narrow(-2, 0, self.heads);
        let k = qk.narrow(-2, self.heads, self.kv_heads);
        let v = y
            .narrow(-1, qd + kvd, kvd)
            .reshape(shape(self.kv_heads).as_slice());
        (q, k, v)
    }

    /// Attention of a packed step (`x`: `[tokens, hidden]`), reading and writing the pool.
    fn attention_step(
        &self,
        x: &Tensor,
        ctx: &StepCtx,
        shard: usize,
        pool: &mut KvCache,
        timer: &AtomicU64,
    ) -> Tensor {
        let t = &ctx.tables[shard];
        let (q, k, v) = self.qkv(x, ctx, &t.rope, shard);
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
            let out = Tensor::scaled_dot_product_attention(
                &q,
                &keys,
                &values,
                Some(&dec.mask),
                0.0,
                false,
                None,
                false,
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
            let out = Tensor::scaled_dot_product_attention(
                &q,
                &keys,
                &values,
                Some(&c.mask),
                0.0,
                false,
                None,
                false,
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
    /// the training path: plain causal attention, so right padding never reaches real tokens).
    fn attention_train(&self, x: &Tensor, ctx: &StepCtx, shard: usize) -> Tensor {
        let (b, t, _) = x.size3().expect("hidden states are 3-d");
        let (q, k, v) = self.qkv(x, ctx, &ctx.tables[shard].rope, shard);
        let out = Tensor::scaled_dot_product_attention::<Tensor>(
            &q.transpose(1, 2),
            &k.transpose(1, 2),
            &v.transpose(1, 2),
            None,
            0.0,
            true,
            None,
            self.heads != self.kv_heads,
        );
        let out = out
            .transpose(1, 2)
            .reshape([b, t, self.heads * ctx.head_dim]);
        linear(&out, &self.o, ctx, Proj::O, shard)
    }

    fn mlp(&self, x: &Tensor, ctx: &StepCtx, shard: usize) -> Tensor {
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
        linear(&(gate.silu() * up), &self.down, ctx, Proj::Down, shard)
    }
}

/// The token table (embedding) or `lm_head`: float, or a GGUF Q8_0 table kept 8-bit (with packed
/// 4-bit projections).
enum Table {
    Dense(Tensor),
    Q8(Q8Weight),
}

impl Table {
    /// Rows `ids` (int64, on the table's device): `[..ids, hidden]` in `kind`.
    fn lookup(&self, ids: &Tensor, kind: Kind) -> Tensor {
        match self {
            Table::Dense(t) => Tensor::embedding(t, ids, -1, false, false),
            Table::Q8(t) => t.lookup(ids, kind),
        }
    }

    /// `x · tableᵀ`.
    fn project(&self, x: &Tensor) -> Tensor {
        match self {
            Table::Dense(t) => x.linear::<Tensor>(t, None),
            Table::Q8(t) => t.matmul_t(x),
        }
    }

    fn shallow_clone(&self) -> Self {
        match self {
            Table::Dense(t) => Table::Dense(t.shallow_clone()),
            Table::Q8(t) => Table::Q8(t.shallow_clone()),
        }
    }

    fn tensors(&self) -> Vec<Tensor> {
        match self {
            Table::Dense(t) => vec![t.shallow_clone()],
            Table::Q8(t) => t.tensors(),
        }
    }

    fn bytes(&self) -> u64 {
        self.tensors().iter().map(tensor_bytes).sum()
    }

    /// Whether two tables are the same storage (a tied `lm_head`).
    fn same(&self, other: &Table) -> bool {
        self.tensors()[0].data_ptr() == other.tensors()[0].data_ptr()
    }
}

/// A frozen `lm_head` ([`Llama::frozen_head`]) as training's head uses it: logits without
/// autograd, and their gradient taken back to the head's input by hand, so a packed base's Q8_0
/// table is read a block of rows at a time both ways (its float copy was 113 MiB for SmolLM2, the
/// largest tensor of a packed trainer's peak).
pub enum FrozenHead {
    Dense(Tensor),
    Q8(Q8Weight),
}

impl FrozenHead {
    /// `x · lm_headᵀ` (`x` `[m, hidden]`, not recorded by autograd): `[m, vocab]` float32.
    pub fn logits(&self, x: &Tensor) -> Tensor {
        tch::no_grad(|| match self {
            FrozenHead::Dense(w) => x.linear::<Tensor>(w, None).to_kind(Kind::Float),
            FrozenHead::Q8(t) => t.matmul_t_blocks(x),
        })
    }

    /// `g · lm_head`: the gradient of [`FrozenHead::logits`] with respect to `x`, given theirs
    /// (`g` `[m, vocab]`); `[m, hidden]` in `kind` (the input's dtype).
    pub fn input_grad(&self, g: &Tensor, kind: Kind) -> Tensor {
        tch::no_grad(|| match self {
            FrozenHead::Dense(w) => g.to_kind(w.kind()).matmul(w).to_kind(kind),
            FrozenHead::Q8(t) => t.matmul_blocks(g).to_kind(kind),
        })
    }
}

/// One shard's weight on `dev` from the parts stacked by rows (q|k|v, gate|up, or one part):
/// one 8-bit weight where every part is 8-bit (CPU only, not for QLoRA, which keeps only 4-bit
/// parts compact), one 4-bit weight held as `int4` says where every part is 4-bit (their rows a
/// multiple of 16, as the kernels take them), and a float matrix otherwise.
fn fuse_parts(parts: Vec<LinearWeight>, dev: Device, kind: Kind, int4: Int4Mode) -> Linear {
    let int8: Option<Vec<&Q8Weight>> = parts.iter().map(LinearWeight::as_int8).collect();
    let int4s: Option<Vec<&Int4Weight>> = parts.iter().map(LinearWeight::as_int4).collect();
    match (int8, int4s) {
        (Some(ws), _) if int4 != Int4Mode::PerUse && dev == Device::Cpu => {
            Linear::Int8(Q8Weight::cat(&ws).to_device(dev))
        }
        (_, Some(ws)) if ws.iter().map(|w| w.rows()).sum::<i64>() % 16 == 0 => {
            let w = Int4Weight::cat(&ws);
            match int4 {
                Int4Mode::Kernel(_) if dev.is_cuda() => w.pack_for_cuda(dev),
                Int4Mode::Kernel(act) => w.pack(act),
                Int4Mode::IntDot => w.for_int_dot(),
                _ => Linear::Int4Dequant(w.to_device(dev)),
            }
        }
        _ => {
            let dense: Vec<Tensor> = parts.into_iter().map(LinearWeight::dense).collect();
            Linear::Dense(
                Tensor::cat(&dense, 0)
                    .to_kind(kind)
                    .to_device(dev)
                    .contiguous(),
            )
        }
    }
}

/// A Llama-family causal language model, possibly split over several devices.
pub struct Llama {
    config: LlamaConfig,
    kind: Kind,
    main: Device,
    embed: Table,
    lm_head: Table,
    norm: RmsNorm,
    blocks: Vec<Block>,
    ropes: Vec<Rope>,
    layouts: Vec<ShardLayout>,
    /// Time spent in attention by packed steps, in nanoseconds (for the step breakdown).
    attention_ns: AtomicU64,
    /// Whether decode steps can take the fused path (`fused_decode::supported`).
    fused_supported: bool,
    /// Whether they do (on where supported; [`Llama::set_fused_decode`]).
    fused_decode: AtomicBool,
    /// Steps taken the fused way so far.
    fused_steps: AtomicU64,
}

impl Llama {
    /// Builds the model from Hugging Face-named weights, sharded over `devices` (the tensor
    /// parallel degree is `devices.len()`; the first device holds embedding, norms and `lm_head`).
    /// Projections the map kept 4-bit are held as `int4` says (packed modes need CPU devices or
    /// CUDA ones, each shard packed; on a mix, or for QLoRA on several devices, they are
    /// dequantised).
    pub fn load(
        mut weights: WeightMap,
        config: LlamaConfig,
        devices: &[Device],
        kind: Kind,
        int4: Int4Mode,
    ) -> Result<Self, ModelError> {
        let tp = devices.len();
        if tp == 0 {
            return Err(ModelError::NoDevices);
        }
        for (what, count) in [
            ("attention heads", config.num_attention_heads),
            ("key/value heads", config.num_key_value_heads),
            ("intermediate size", config.intermediate_size),
        ] {
            if count % tp != 0 {
                return Err(ModelError::TensorParallel { tp, what, count });
            }
        }
        let main = devices[0];
        let c = &config;
        let (h, v) = (c.hidden_size as i64, c.vocab_size as i64);
        let d = c.head_dim as i64;
        let (heads, kv_heads, inter) = (
            c.num_attention_heads as i64,
            c.num_key_value_heads as i64,
            c.intermediate_size as i64,
        );
        let place = |t: Tensor, dev: Device| t.to_kind(kind).to_device(dev).contiguous();
        // Packed projections on CPU devices (and QLoRA's on one device): Q8_0 projections and a
        // Q8_0 embedding / lm_head stay 8-bit too. On CUDA devices 4-bit projections go to
        // torch's CUDA int4 kernel, 8-bit ones and the tables are dequantised. A tensor parallel
        // model packs each shard's rows (q, k, v, gate, up) or columns (o, down).
        let all_cpu = devices.iter().all(|d| *d == Device::Cpu);
        let all_cuda = devices.iter().all(|d| d.is_cuda());
        let compact_8bit = match int4 {
            Int4Mode::Kernel(_) | Int4Mode::IntDot => all_cpu,
            Int4Mode::PerUse => tp == 1,
            Int4Mode::Dense => false,
        };
        let compact = compact_8bit || (matches!(int4, Int4Mode::Kernel(_)) && all_cuda);
        let table = |w: &mut WeightMap, name: &str| -> Result<Table, ModelError> {
            Ok(match w.take_table(name, &[v, h])? {
                TableWeight::Q8(t) if compact_8bit => Table::Q8(t.to_device(main)),
                other => Table::Dense(place(other.dense(), main)),
            })
        };
        let embed = table(&mut weights, "model.embed_tokens.weight")?;
        let lm_head = if weights.contains("lm_head.weight") {
            table(&mut weights, "lm_head.weight")?
        } else if c.tie_word_embeddings {
            embed.shallow_clone()
        } else {
            return Err(WeightsError::Missing {
                name: "lm_head.weight".into(),
            }
            .into());
        };
        let norm = |w: &mut WeightMap, name: &str| -> Result<RmsNorm, ModelError> {
            Ok(RmsNorm {
                weight: place(w.take(name, &[h])?, main),
                eps: c.rms_norm_eps,
            })
        };
        let final_norm = norm(&mut weights, "model.norm.weight")?;
        let n = tp as i64;
        let (hl, kvl, il) = (heads / n, kv_heads / n, inter / n);
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for layer in 0..c.num_hidden_layers {
            let p = format!("model.layers.{layer}");
            let mut take =
                |name: &str, shape: &[i64]| weights.take_linear(&format!("{p}.{name}"), shape);
            let q = take("self_attn.q_proj.weight", &[heads * d, h])?;
            let k = take("self_attn.k_proj.weight", &[kv_heads * d, h])?;
            let vw = take("self_attn.v_proj.weight", &[kv_heads * d, h])?;
            let o = take("self_attn.o_proj.weight", &[h, heads * d])?;
            let gate = take("mlp.gate_proj.weight", &[inter, h])?;
            let up = take("mlp.up_proj.weight", &[inter, h])?;
            let down = take("mlp.down_proj.weight", &[h, inter])?;
            let held = |w: LinearWeight| {
                if compact {
                    w
                } else {
                    LinearWeight::Dense(w.dense())
                }
            };
            let (q, k, vw, o) = (held(q), held(k), held(vw), held(o));
            let (gate, up, down) = (held(gate), held(up), held(down));
            let shards = devices
                .iter()
                .enumerate()
                .map(|(s, &dev)| {
                    let s = s as i64;
                    let rows = |w: &LinearWeight, n: i64| w.narrow_rows(s * n, n);
                    let cols = |w: &LinearWeight, n: i64| w.narrow_cols(s * n, n);
                    let fuse = |parts: Vec<LinearWeight>| fuse_parts(parts, dev, kind, int4);
                    BlockShard {
                        device: dev,
                        heads: hl,
                        kv_heads: kvl,
                        qkv: fuse(vec![
                            rows(&q, hl * d),
                            rows(&k, kvl * d),
                            rows(&vw, kvl * d),
                        ]),
                        o: fuse(vec![cols(&o, hl * d)]),
                        gate_up: fuse(vec![rows(&gate, il), rows(&up, il)]),
                        down: fuse(vec![cols(&down, il)]),
                    }
                })
                .collect();
            blocks.push(Block {
                input_norm: norm(&mut weights, &format!("{p}.input_layernorm.weight"))?,
                post_norm: norm(
                    &mut weights,
                    &format!("{p}.post_attention_layernorm.weight"),
                )?,
                shards,
            });
        }
        let ropes = devices.iter().map(|&dev| Rope::new(c, dev, kind)).collect();
        let layouts = devices
            .iter()
            .map(|&device| ShardLayout {
                device,
                kv_heads: kvl,
            })
            .collect();
        let fused = fused_decode::supported(int4, devices, kind);
        Ok(Self {
            config,
            kind,
            main,
            embed,
            lm_head,
            norm: final_norm,
            blocks,
            ropes,
            layouts,
            attention_ns: AtomicU64::new(0),
            fused_supported: fused,
            fused_decode: AtomicBool::new(fused),
            fused_steps: AtomicU64::new(0),
        })
    }

    /// Turns fused decode steps (`model/fused_decode.rs`) on or off, where the model supports
    /// them (for comparisons: both paths compute the same step). Returns whether they are on.
    pub fn set_fused_decode(&self, on: bool) -> bool {
        let on = on && self.fused_supported;
        self.fused_decode.store(on, Ordering::Relaxed);
        on
    }

    /// Steps taken the fused way (`model/fused_decode.rs`) so far.
    pub fn fused_steps(&self) -> u64 {
        self.fused_steps.load(Ordering::Relaxed)
    }

    /// Time spent in attention (KV writes, SDPA, output gather) by packed steps so far.
    pub fn attention_ns(&self) -> u64 {
        self.attention_ns.load(Ordering::Relaxed)
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn main_device(&self) -> Device {
        self.main
    }

    /// The devices of the shards, in order.
    pub fn devices(&self) -> Vec<Device> {
        self.layouts.iter().map(|l| l.device).collect()
    }

    pub fn tensor_parallel(&self) -> usize {
        self.layouts.len()
    }

    /// An empty cache of `rows` slots of up to `capacity` tokens (it grows on demand).
    pub fn new_cache(&self, rows: i64, capacity: i64) -> KvCache {
        KvCache::new(
            &self.layouts,
            self.blocks.len(),
            rows,
            capacity,
            self.config.head_dim as i64,
            self.kind,
        )
    }

    /// Runs `tokens` (`[batch, t]`, int64) through the model: row `i` uses slot `i` of `cache`,
    /// already holding `starts[i]` tokens; the new keys/values are written after them. Returns
    /// `[batch, t, vocab]` logits ([`Logits::All`]) or `[batch, 1, vocab]` ([`Logits::Last`]).
    /// A convenience over [`Llama::forward_step`] for equal-length rows.
    pub fn forward(
        &self,
        tokens: &Tensor,
        starts: &[i64],
        cache: &mut KvCache,
        lora: Option<&LoraBatch>,
        logits: Logits,
    ) -> Tensor {
        let (b, t) = tokens.size2().expect("tokens are [batch, t]");
        assert_eq!(b as usize, starts.len(), "one start position per row");
        let ids: Vec<i64> =
            Vec::try_from(tokens.to_device(Device::Cpu).reshape([-1])).expect("int64 token ids");
        let segments = starts
            .iter()
            .enumerate()
            .map(|(row, &start)| Segment {
                slot: row as i64,
                start,
                len: t,
            })
            .collect();
        let rows = match logits {
            Logits::All => LogitRows::All,
            Logits::Last => LogitRows::Last,
        };
        let step = StepBatch::new(ids, segments, rows);
        let per_token = lora.map(|l| l.repeat_rows(t));
        let out = self.forward_step(&step, cache, per_token.as_ref());
        match logits {
            Logits::All => out.reshape([b, t, -1]),
            Logits::Last => out.reshape([b, 1, -1]),
        }
    }

    /// One packed step: every segment's tokens through the model in one forward, keys and values
    /// written into the segments' slots. `lora`, when given, has one row per token. Returns the
    /// logits of the step's logit rows, `[rows, vocab]`, on the main device.
    pub fn forward_step(
        &self,
        step: &StepBatch,
        cache: &mut KvCache,
        lora: Option<&LoraBatch>,
    ) -> Tensor {
        cache.ensure(step.slots_needed(), step.max_keys());
        if self.fuses(step, lora) {
            self.fused_steps.fetch_add(1, Ordering::Relaxed);
            return self.fused_decode_step(step, cache, lora);
        }
        let tables = self.step_tables(step);
        let tokens = Tensor::from_slice(&step.tokens);
        let mut x = self.embed.lookup(&tokens.to_device(self.main), self.kind);
        let d = self.config.head_dim as i64;
        for (layer, block) in self.blocks.iter().enumerate() {
            let ctx = StepCtx {
                layer,
                tables: &tables,
                head_dim: d,
                lora,
            };
            x = self.block_forward(
                block,
                &x,
                |s, shard, h| shard.attention_step(h, &ctx, s, cache, &self.attention_ns),
                &ctx,
            );
        }
        let rows = step.logit_rows();
        let x = if rows.len() as i64 == step.num_tokens() {
            x
        } else {
            x.index_select(0, &Tensor::from_slice(&rows).to_device(self.main))
        };
        self.head(&x)
    }

    /// Token embeddings of `tokens` (`[batch, t]`) on the main device: the input of layer 0.
    pub fn embed(&self, tokens: &Tensor) -> Tensor {
        self.embed.lookup(&tokens.to_device(self.main), self.kind)
    }

    /// Decoder layer `layer` over whole sequences starting at position 0, without a cache (the
    /// training path; causal attention, so right padding never reaches real tokens).
    pub fn layer_forward(&self, layer: usize, x: &Tensor, lora: Option<&LoraBatch>) -> Tensor {
        let (b, t, _) = x.size3().expect("hidden states are 3-d");
        let positions = Tensor::arange(t, (Kind::Int64, Device::Cpu))
            .unsqueeze(0)
            .repeat([b, 1]);
        let tables: Vec<ShardTables> = self
            .layouts
            .iter()
            .zip(&self.ropes)
            .map(|(l, r)| ShardTables {
                rope: r.at(&positions.to_device(l.device)),
                write_at: None,
                decode: None,
                chunks: Vec::new(),
            })
            .collect();
        let ctx = StepCtx {
            layer,
            tables: &tables,
            head_dim: self.config.head_dim as i64,
            lora,
        };
        self.block_forward(
            &self.blocks[layer],
            x,
            |s, shard, h| shard.attention_train(h, &ctx, s),
            &ctx,
        )
    }

    /// Per-shard tables of one step, built once and read by every layer: rotary tables at the
    /// tokens' positions, where each token's key/value goes, and the attention masks.
    fn step_tables(&self, step: &StepBatch) -> Vec<ShardTables> {
        let positions = Tensor::from_slice(&step.positions());
        let slots = Tensor::from_slice(&step.token_slots());
        let group = (self.config.num_attention_heads / self.config.num_key_value_heads) as i64;
        let decode = &step.segments[..step.decode];
        let decode_cpu = (!decode.is_empty()).then(|| {
            let lo = decode.iter().map(|s| s.slot).min().expect("rows");
            let hi = decode.iter().map(|s| s.slot).max().expect("rows") + 1;
            let keys = decode.iter().map(|s| s.start + 1).max().expect("rows");
            let dense = decode
                .iter()
                .enumerate()
                .all(|(i, s)| s.slot == lo + i as i64);
            // Slots of the span without a decode row see key 0 only (their output is dropped;
            // a fully masked row would be NaN).
            let mut lens = vec![1i64; (hi - lo) as usize];
            for s in decode {
                lens[(s.slot - lo) as usize] = s.start + 1;
            }
            let mask = Tensor::arange(keys, (Kind::Int64, Device::Cpu))
                .view([1, 1, 1, keys])
                .lt_tensor(&Tensor::from_slice(&lens).view([-1, 1, 1, 1]));
            let scatter = (!dense).then(|| {
                Tensor::from_slice(&decode.iter().map(|s| s.slot - lo).collect::<Vec<_>>())
            });
            (lo, hi - lo, keys, mask, scatter)
        });
        let chunk_masks: Vec<(Segment, Tensor)> = step.segments[step.decode..]
            .iter()
            .map(|s| {
                // Query row (g, i) is token start + i: it sees keys 0 ..= start + i.
                let q_pos =
                    Tensor::arange(s.len, (Kind::Int64, Device::Cpu)).repeat([group]) + s.start;
                let keys = Tensor::arange(s.start + s.len, (Kind::Int64, Device::Cpu));
                (*s, keys.unsqueeze(0).le_tensor(&q_pos.unsqueeze(1)))
            })
            .collect();
        self.layouts
            .iter()
            .zip(&self.ropes)
            .map(|(l, rope)| {
                let dev = l.device;
                ShardTables {
                    rope: rope.at(&positions.to_device(dev)),
                    write_at: Some((slots.to_device(dev), positions.to_device(dev))),
                    decode: decode_cpu.as_ref().map(|(lo, span, keys, mask, scatter)| {
                        DecodeAttention {
                            lo: *lo,
                            span: *span,
                            rows: decode.len() as i64,
                            scatter: scatter.as_ref().map(|s| s.to_device(dev)),
                            keys: *keys,
                            mask: mask.to_device(dev),
                        }
                    }),
                    chunks: chunk_masks
                        .iter()
                        .map(|(s, m)| ChunkAttention {
                            slot: s.slot,
                            start: s.start,
                            len: s.len,
                            mask: m.to_device(dev),
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// One decoder block: attention (`attend`, per shard) and MLP with their residuals, shards
    /// summed on the main device.
    fn block_forward(
        &self,
        block: &Block,
        x: &Tensor,
        mut attend: impl FnMut(usize, &BlockShard, &Tensor) -> Tensor,
        ctx: &StepCtx,
    ) -> Tensor {
        let h = block.input_norm.forward(x);
        let attn = self.all_reduce(block, |s, shard| {
            attend(s, shard, &h.to_device(shard.device))
        });
        let x = x + attn;
        let h = block.post_norm.forward(&x);
        let mlp = self.all_reduce(block, |s, shard| {
            shard.mlp(&h.to_device(shard.device), ctx, s)
        });
        x + mlp
    }

    /// Final norm and `lm_head`: hidden states to logits.
    pub fn head(&self, x: &Tensor) -> Tensor {
        self.lm_head.project(&self.norm.forward(x))
    }

    /// `lm_head`, frozen, for training's head: the float matrix, or the Q8_0 table of a packed
    /// base, which is then read by blocks and never held whole in float.
    pub fn frozen_head(&self) -> FrozenHead {
        match &self.lm_head {
            Table::Dense(t) => FrozenHead::Dense(t.shallow_clone()),
            Table::Q8(t) => FrozenHead::Q8(t.shallow_clone()),
        }
    }

    /// The final norm ahead of `lm_head` (under autograd when `x` requires grad).
    pub fn final_norm(&self, x: &Tensor) -> Tensor {
        self.norm.forward(x)
    }

    /// Whether the embedding is held as a Q8_0 table (packed models).
    pub fn has_q8_embedding(&self) -> bool {
        matches!(self.embed, Table::Q8(_))
    }

    /// How many projections are held 8-bit (Q8_0).
    pub fn eight_bit_projections(&self) -> usize {
        self.blocks
            .iter()
            .flat_map(|b| &b.shards)
            .flat_map(|s| [&s.qkv, &s.o, &s.gate_up, &s.down])
            .filter(|w| w.is_8bit())
            .count()
    }

    /// Bytes the weights hold (embedding, `lm_head` when not tied, norms, projections), and how
    /// many of the projections are packed (4-bit or 8-bit) out of how many.
    pub fn weight_bytes(&self) -> (u64, usize, usize) {
        let b = tensor_bytes;
        let mut bytes = self.embed.bytes() + b(&self.norm.weight);
        if !self.lm_head.same(&self.embed) {
            bytes += self.lm_head.bytes();
        }
        let (mut packed, mut total) = (0, 0);
        for block in &self.blocks {
            bytes += b(&block.input_norm.weight) + b(&block.post_norm.weight);
            for s in &block.shards {
                for w in [&s.qkv, &s.o, &s.gate_up, &s.down] {
                    bytes += w.bytes();
                    total += 1;
                    packed += usize::from(w.is_packed());
                }
            }
        }
        (bytes, packed, total)
    }

    /// Every base weight tensor (for checks that training leaves them untouched).
    pub fn base_tensors(&self) -> Vec<Tensor> {
        let mut out = self.embed.tensors();
        out.extend(self.lm_head.tensors());
        out.push(self.norm.weight.shallow_clone());
        for b in &self.blocks {
            out.push(b.input_norm.weight.shallow_clone());
            out.push(b.post_norm.weight.shallow_clone());
            for s in &b.shards {
                for w in [&s.qkv, &s.o, &s.gate_up, &s.down] {
                    out.extend(w.tensors());
                }
            }
        }
        out
    }

    /// Runs `f` on every shard and sums the partial results on the main device.
    fn all_reduce(&self, block: &Block, mut f: impl FnMut(usize, &BlockShard) -> Tensor) -> Tensor {
        let mut total: Option<Tensor> = None;
        for (s, shard) in block.shards.iter().enumerate() {
            let part = f(s, shard).to_device(self.main);
            total = Some(match total {
                None => part,
                Some(acc) => acc + part,
            });
        }
        total.expect("at least one shard")
    }
}
