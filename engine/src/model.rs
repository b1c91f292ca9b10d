//! The Llama-family decoder: embedding, RMSNorm, rotary embeddings, grouped-query attention with a
//! KV cache, SwiGLU MLP, tied or untied `lm_head`. It is tensor-parallel from the ground up: every
//! block is split into shards, one per device (attention heads and MLP columns for q/k/v/gate/up,
//! rows for o/down); the partial outputs are copied to the main device and added. With one device
//! there is one shard and no copy. LoRA deltas come in through [`LoraBatch`], per batch row.

use tch::{Device, Kind, Tensor};

use crate::kv_cache::{KvCache, ShardLayout};
use crate::lora::{LoraBatch, Proj};
use crate::model_config::LlamaConfig;
use crate::weights::{WeightMap, WeightsError};

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

/// cos and signed sin gathered for a step's positions, `[batch, 1, tokens, head_dim]`.
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

    /// The tables at `positions` (`[batch, tokens]`, on this rope's device).
    fn at(&self, positions: &Tensor) -> RopeAt {
        let (b, t) = positions.size2().expect("positions are 2-d");
        let flat = positions.reshape([-1]);
        RopeAt {
            cos: self.cos.index_select(0, &flat).reshape([b, 1, t, -1]),
            sin: self.sin.index_select(0, &flat).reshape([b, 1, t, -1]),
        }
    }
}

impl RopeAt {
    /// `x`: `[batch, heads, tokens, head_dim]`. HF's `x·cos + rotate_half(x)·sin`.
    fn apply(&self, x: &Tensor) -> Tensor {
        let half = x.size()[3] / 2;
        x * &self.cos + x.roll([half], [3]) * &self.sin
    }
}

/// One device's part of a decoder block.
struct BlockShard {
    device: Device,
    heads: i64,
    kv_heads: i64,
    /// q, k and v stacked by rows: one matmul, split after.
    qkv: Tensor,
    o: Tensor,
    /// gate and up stacked by rows.
    gate_up: Tensor,
    down: Tensor,
}

struct Block {
    input_norm: RmsNorm,
    post_norm: RmsNorm,
    shards: Vec<BlockShard>,
}

/// The per-shard tensors a step builds once and every layer reads.
struct StepTables {
    rope: Vec<RopeAt>,
    masks: Vec<Option<Tensor>>,
    write_at: Vec<Option<(Tensor, Tensor)>>,
}

impl StepTables {
    fn ctx<'a>(
        &'a self,
        layer: usize,
        starts: &'a [i64],
        keys: i64,
        head_dim: i64,
        lora: Option<&'a LoraBatch>,
    ) -> StepCtx<'a> {
        StepCtx {
            layer,
            rope: &self.rope,
            write_at: &self.write_at,
            masks: &self.masks,
            starts,
            keys,
            head_dim,
            lora,
        }
    }
}

/// What a forward pass needs besides tokens, already on the devices.
struct StepCtx<'a> {
    layer: usize,
    /// Rotary tables at this step's positions, per shard device.
    rope: &'a [RopeAt],
    /// Decode steps: (rows, positions) where the new key/value of each row goes, per shard.
    write_at: &'a [Option<(Tensor, Tensor)>],
    /// `[batch, 1, tokens, keys]` boolean mask per shard device, or `None` when causal-only.
    masks: &'a [Option<Tensor>],
    /// Row start positions (tokens already cached).
    starts: &'a [i64],
    /// Keys each row attends to after this step: `max(starts) + tokens`.
    keys: i64,
    head_dim: i64,
    lora: Option<&'a LoraBatch>,
}

fn linear(x: &Tensor, w: &Tensor, ctx: &StepCtx, proj: Proj, shard: usize) -> Tensor {
    let y = x.linear::<Tensor>(w, None);
    match ctx.lora.and_then(|l| l.get(ctx.layer, proj, shard)) {
        Some(slice) => y + slice.apply(x),
        None => y,
    }
}

/// One matmul for several projections of the same input, split by output size, each with its own
/// LoRA delta.
fn fused_linear<const N: usize>(
    x: &Tensor,
    w: &Tensor,
    ctx: &StepCtx,
    parts: [(Proj, i64); N],
    shard: usize,
) -> [Tensor; N] {
    let y = x.linear::<Tensor>(w, None);
    let sizes: Vec<i64> = parts.iter().map(|(_, n)| *n).collect();
    let mut outs = y.split_with_sizes(sizes.as_slice(), -1).into_iter();
    parts.map(|(proj, _)| {
        let out = outs.next().expect("one output per part");
        match ctx.lora.and_then(|l| l.get(ctx.layer, proj, shard)) {
            Some(slice) => out + slice.apply(x),
            None => out,
        }
    })
}

impl BlockShard {
    fn attention(
        &self,
        x: &Tensor,
        ctx: &StepCtx,
        shard: usize,
        cache: Option<&mut KvCache>,
    ) -> Tensor {
        let (b, t, _) = x.size3().expect("hidden states are 3-d");
        let d = ctx.head_dim;
        let (qd, kvd) = (self.heads * d, self.kv_heads * d);
        let [q, k, v] = fused_linear(
            x,
            &self.qkv,
            ctx,
            [(Proj::Q, qd), (Proj::K, kvd), (Proj::V, kvd)],
            shard,
        );
        let q = q.reshape([b, t, self.heads, d]).transpose(1, 2);
        let k = k.reshape([b, t, self.kv_heads, d]).transpose(1, 2);
        let v = v.reshape([b, t, self.kv_heads, d]);
        let rope = &ctx.rope[shard];
        let q = rope.apply(&q);
        let k = rope.apply(&k).transpose(1, 2); // back to [b, t, kv_heads, d]

        let Some(cache) = cache else {
            // Training: the whole sequence at once, plain causal attention, no cache.
            let out = Tensor::scaled_dot_product_attention::<Tensor>(
                &q,
                &k.transpose(1, 2),
                &v.transpose(1, 2),
                None,
                0.0,
                true,
                None,
                self.heads != self.kv_heads,
            );
            let out = out.transpose(1, 2).reshape([b, t, self.heads * d]);
            return linear(&out, &self.o, ctx, Proj::O, shard);
        };
        let kv = cache.layer(shard, ctx.layer);
        if let Some((rows, pos)) = &ctx.write_at[shard] {
            let idx = [Some(rows), Some(pos)];
            let _ = kv.k.index_put_(&idx, &k.squeeze_dim(1), false);
            let _ = kv.v.index_put_(&idx, &v.squeeze_dim(1), false);
        } else {
            for (row, &start) in ctx.starts.iter().enumerate() {
                let row = row as i64;
                kv.k.narrow(0, row, 1)
                    .narrow(1, start, t)
                    .copy_(&k.narrow(0, row, 1));
                kv.v.narrow(0, row, 1)
                    .narrow(1, start, t)
                    .copy_(&v.narrow(0, row, 1));
            }
        }
        let keys = kv.k.narrow(0, 0, b).narrow(1, 0, ctx.keys).transpose(1, 2);
        let values = kv.v.narrow(0, 0, b).narrow(1, 0, ctx.keys).transpose(1, 2);
        let gqa = self.heads != self.kv_heads;
        let out = match &ctx.masks[shard] {
            Some(mask) => Tensor::scaled_dot_product_attention(
                &q,
                &keys,
                &values,
                Some(mask),
                0.0,
                false,
                None,
                gqa,
            ),
            None => Tensor::scaled_dot_product_attention::<Tensor>(
                &q,
                &keys,
                &values,
                None,
                0.0,
                t > 1,
                None,
                gqa,
            ),
        };
        let out = out.transpose(1, 2).reshape([b, t, self.heads * d]);
        linear(&out, &self.o, ctx, Proj::O, shard)
    }

    fn mlp(&self, x: &Tensor, ctx: &StepCtx, shard: usize) -> Tensor {
        let half = self.gate_up.size()[0] / 2;
        let [gate, up] = fused_linear(
            x,
            &self.gate_up,
            ctx,
            [(Proj::Gate, half), (Proj::Up, half)],
            shard,
        );
        linear(&(gate.silu() * up), &self.down, ctx, Proj::Down, shard)
    }
}

/// A Llama-family causal language model, possibly split over several devices.
pub struct Llama {
    config: LlamaConfig,
    kind: Kind,
    main: Device,
    embed: Tensor,
    lm_head: Tensor,
    norm: RmsNorm,
    blocks: Vec<Block>,
    ropes: Vec<Rope>,
    layouts: Vec<ShardLayout>,
}

impl Llama {
    /// Builds the model from Hugging Face-named weights, sharded over `devices` (the tensor
    /// parallel degree is `devices.len()`; the first device holds embedding, norms and `lm_head`).
    pub fn load(
        mut weights: WeightMap,
        config: LlamaConfig,
        devices: &[Device],
        kind: Kind,
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
        let embed = place(weights.take("model.embed_tokens.weight", &[v, h])?, main);
        let lm_head = if weights.contains("lm_head.weight") {
            place(weights.take("lm_head.weight", &[v, h])?, main)
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
            let mut take = |name: &str, shape: &[i64]| weights.take(&format!("{p}.{name}"), shape);
            let q = take("self_attn.q_proj.weight", &[heads * d, h])?;
            let k = take("self_attn.k_proj.weight", &[kv_heads * d, h])?;
            let vw = take("self_attn.v_proj.weight", &[kv_heads * d, h])?;
            let o = take("self_attn.o_proj.weight", &[h, heads * d])?;
            let gate = take("mlp.gate_proj.weight", &[inter, h])?;
            let up = take("mlp.up_proj.weight", &[inter, h])?;
            let down = take("mlp.down_proj.weight", &[h, inter])?;
            let shards = devices
                .iter()
                .enumerate()
                .map(|(s, &dev)| {
                    let s = s as i64;
                    BlockShard {
                        device: dev,
                        heads: hl,
                        kv_heads: kvl,
                        qkv: place(
                            Tensor::cat(
                                &[
                                    q.narrow(0, s * hl * d, hl * d),
                                    k.narrow(0, s * kvl * d, kvl * d),
                                    vw.narrow(0, s * kvl * d, kvl * d),
                                ],
                                0,
                            ),
                            dev,
                        ),
                        o: place(o.narrow(1, s * hl * d, hl * d), dev),
                        gate_up: place(
                            Tensor::cat(&[gate.narrow(0, s * il, il), up.narrow(0, s * il, il)], 0),
                            dev,
                        ),
                        down: place(down.narrow(1, s * il, il), dev),
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
        })
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

    /// An empty cache for `rows` sequences of up to `capacity` tokens (it grows on demand).
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

    /// Runs `tokens` (`[batch, t]`, int64) through the model. Row `i` uses cache row `i`, already
    /// holding `starts[i]` tokens; the new keys/values are written after them. Either every row
    /// has one token (a decode step) or there may be several rows of `t` tokens each.
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
        let keys = starts.iter().copied().max().unwrap_or(0) + t;
        cache.ensure(b, keys);

        let offsets = Tensor::arange(t, (Kind::Int64, Device::Cpu));
        let positions_cpu = Tensor::from_slice(starts).unsqueeze(1) + offsets.unsqueeze(0); // [b, t]
                                                                                            // A mask is needed when rows start at different places or attend to a cached prefix; one
                                                                                            // fresh row is plain causal attention, one row of one token attends to everything.
        let needs_mask = !(b == 1 && (starts[0] == 0 || t == 1));
        let mask_cpu = needs_mask.then(|| {
            let key_idx = Tensor::arange(keys, (Kind::Int64, Device::Cpu)).view([1, 1, 1, keys]);
            key_idx.le_tensor(&positions_cpu.view([b, 1, t, 1]))
        });
        let tables = self.step_tables(
            &positions_cpu,
            mask_cpu.as_ref(),
            (t == 1).then_some(starts),
        );
        let mut x = self.embed(tokens);
        for (layer, block) in self.blocks.iter().enumerate() {
            let ctx = tables.ctx(layer, starts, keys, self.config.head_dim as i64, lora);
            x = self.block_forward(block, &x, &ctx, Some(&mut *cache));
        }
        let x = match logits {
            Logits::All => x,
            Logits::Last => x.narrow(1, t - 1, 1),
        };
        self.norm.forward(&x).linear::<Tensor>(&self.lm_head, None)
    }

    /// Token embeddings of `tokens` (`[batch, t]`) on the main device: the input of layer 0.
    pub fn embed(&self, tokens: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed, &tokens.to_device(self.main), -1, false, false)
    }

    /// Decoder layer `layer` over whole sequences starting at position 0, without a cache (the
    /// training path; causal attention, so right padding never reaches real tokens).
    pub fn layer_forward(&self, layer: usize, x: &Tensor, lora: Option<&LoraBatch>) -> Tensor {
        let (b, t, _) = x.size3().expect("hidden states are 3-d");
        let positions_cpu = Tensor::arange(t, (Kind::Int64, Device::Cpu))
            .unsqueeze(0)
            .repeat([b, 1]);
        let tables = self.step_tables(&positions_cpu, None, None);
        let starts = vec![0; b as usize];
        let ctx = tables.ctx(layer, &starts, t, self.config.head_dim as i64, lora);
        self.block_forward(&self.blocks[layer], x, &ctx, None)
    }

    /// Per-shard tables of one step: rotary tables at `positions_cpu`, the attention mask, and
    /// (decode steps, rows starting at `decode_starts`) where the new keys/values go.
    fn step_tables(
        &self,
        positions_cpu: &Tensor,
        mask_cpu: Option<&Tensor>,
        decode_starts: Option<&[i64]>,
    ) -> StepTables {
        let rows = positions_cpu.size()[0];
        let per_shard =
            |f: &dyn Fn(Device) -> _| self.layouts.iter().map(|l| f(l.device)).collect();
        StepTables {
            rope: self
                .layouts
                .iter()
                .zip(&self.ropes)
                .map(|(l, r)| r.at(&positions_cpu.to_device(l.device)))
                .collect(),
            masks: per_shard(&|d| mask_cpu.map(|m| m.to_device(d))),
            write_at: self
                .layouts
                .iter()
                .map(|l| {
                    decode_starts.map(|starts| {
                        (
                            Tensor::arange(rows, (Kind::Int64, l.device)),
                            Tensor::from_slice(starts).to_device(l.device),
                        )
                    })
                })
                .collect(),
        }
    }

    /// One decoder block: attention and MLP with their residuals, shards summed on the main device.
    fn block_forward(
        &self,
        block: &Block,
        x: &Tensor,
        ctx: &StepCtx,
        mut cache: Option<&mut KvCache>,
    ) -> Tensor {
        let h = block.input_norm.forward(x);
        let attn = self.all_reduce(block, |s, shard| {
            shard.attention(&h.to_device(shard.device), ctx, s, cache.as_deref_mut())
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
        self.norm.forward(x).linear::<Tensor>(&self.lm_head, None)
    }

    /// Every base weight tensor (for checks that training leaves them untouched).
    pub fn base_tensors(&self) -> Vec<Tensor> {
        let mut out = vec![self.embed.shallow_clone(), self.lm_head.shallow_clone()];
        out.push(self.norm.weight.shallow_clone());
        for b in &self.blocks {
            out.push(b.input_norm.weight.shallow_clone());
            out.push(b.post_norm.weight.shallow_clone());
            for s in &b.shards {
                for w in [&s.qkv, &s.o, &s.gate_up, &s.down] {
                    out.push(w.shallow_clone());
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
