//! The decoder: embedding, a stack of [`Block`]s as the model's [`Architecture`] describes them,
//! final norm, tied or untied `lm_head` (and the final soft-cap where the family has one). It is
//! tensor-parallel from the ground up: every block is split into shards, one per device; the
//! partial outputs are copied to the main device and added. With one device there is one shard
//! and no copy. LoRA deltas come in through [`LoraBatch`], per batch row.
//!
//! * [`config`]: a checkpoint resolved into dimensions and one [`Architecture`] description.
//! * [`block`]: the one block implementation; [`attention`]: step tables, masks, attention;
//!   [`norm`], [`rope`]: RMSNorm and rotary tables.
//! * `fused_decode`: decode steps as plain loops over a packed model, reading the same
//!   description.
//!
//! Every weight is a [`Linear`]; how each is held is decided once, by [`HoldPolicy`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tch::{Device, Kind, Tensor};

use crate::kv_cache::{KvCache, ShardLayout};
use crate::linear::{HoldPolicy, Linear};
use crate::lora::LoraBatch;
use crate::packed::{tensor_bytes, Int4Mode};
use crate::step::{LogitRows, Segment, StepBatch};
use crate::weights::{LinearWeight, WeightMap, WeightsError};

mod attention;
mod block;
mod config;
mod fused_decode;
mod norm;
mod rope;

use attention::{Scoring, ShardTables, Windows};
use block::{Block, BlockShard, StepCtx};
pub use config::{
    Activation, Architecture, ConfigError, Family, LayerAttention, ModelConfig, RopeScaling,
    SUPPORTED,
};
use norm::RmsNorm;
use rope::Rope;

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

/// A causal language model of one of the [`config::Family`]s, possibly split over several
/// devices.
pub struct Model {
    config: ModelConfig,
    kind: Kind,
    main: Device,
    embed: Linear,
    /// The embedding's output times this, in the model's dtype (Gemma's `sqrt(hidden)`).
    embed_scale: Option<Tensor>,
    lm_head: Linear,
    norm: RmsNorm,
    blocks: Vec<Block>,
    /// `ropes[shard][table]`.
    ropes: Vec<Vec<Rope>>,
    windows: Windows,
    layouts: Vec<ShardLayout>,
    /// Time spent in attention by packed steps, in nanoseconds (for the step breakdown).
    attention_ns: AtomicU64,
    /// Whether decode steps can take the fused path (`HoldPolicy::fuses_decode`).
    fused_supported: bool,
    /// Whether they do (on where supported; [`Model::set_fused_decode`]).
    fused_decode: AtomicBool,
    /// Steps taken the fused way so far.
    fused_steps: AtomicU64,
}

/// The names of a block's norms in a Hugging Face checkpoint: Llama's `post_attention_layernorm`
/// is the norm before the MLP; Gemma's is the one after attention, with
/// `pre_feedforward_layernorm` before the MLP and `post_feedforward_layernorm` after it.
fn norm_names(
    sandwich: bool,
) -> (
    &'static str,
    Option<&'static str>,
    &'static str,
    Option<&'static str>,
) {
    if sandwich {
        (
            "input_layernorm",
            Some("post_attention_layernorm"),
            "pre_feedforward_layernorm",
            Some("post_feedforward_layernorm"),
        )
    } else {
        ("input_layernorm", None, "post_attention_layernorm", None)
    }
}

impl Model {
    /// Builds the model from Hugging Face-named weights, sharded over `devices` (the tensor
    /// parallel degree is `devices.len()`; the first device holds embedding, norms and `lm_head`).
    /// Projections the map kept 4-bit or 8-bit are held as [`HoldPolicy`] decides from `int4`.
    pub fn load(
        mut weights: WeightMap,
        config: ModelConfig,
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
        let a = &c.arch;
        let (h, v) = (c.hidden_size as i64, c.vocab_size as i64);
        let d = c.head_dim as i64;
        let (heads, kv_heads, inter) = (
            c.num_attention_heads as i64,
            c.num_key_value_heads as i64,
            c.intermediate_size as i64,
        );
        let policy = HoldPolicy::new(int4, devices, kind);
        let embed = policy.table(
            weights.take_table("model.embed_tokens.weight", &[v, h])?,
            main,
        );
        let lm_head = if weights.contains("lm_head.weight") {
            policy.table(weights.take_table("lm_head.weight", &[v, h])?, main)
        } else if c.tie_word_embeddings {
            embed.shallow_clone()
        } else {
            return Err(WeightsError::Missing {
                name: "lm_head.weight".into(),
            }
            .into());
        };
        // Gemma scales its norms in float32 (and by `1 + w`).
        let gemma_norms = a.norm_weight_offset != 0.0 || a.sandwich_norms;
        let norm =
            |w: &mut WeightMap, name: &str, n: i64, dev: Device| -> Result<RmsNorm, ModelError> {
                Ok(RmsNorm::new(
                    w.take(name, &[n])?,
                    a.norm_weight_offset,
                    c.rms_norm_eps,
                    gemma_norms,
                    kind,
                    dev,
                ))
            };
        let final_norm = norm(&mut weights, "model.norm.weight", h, main)?;
        let n = tp as i64;
        let (hl, kvl, il) = (heads / n, kv_heads / n, inter / n);
        let windows = Windows::new(a.layers.iter().map(|l| l.window));
        let (input, post_attn, pre_mlp, post_mlp) = norm_names(a.sandwich_norms);
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for layer in 0..c.num_hidden_layers {
            let p = format!("model.layers.{layer}");
            let mut take = |name: &str, shape: &[i64]| {
                weights
                    .take_linear(&format!("{p}.{name}"), shape)
                    .map(|w| policy.before_sharding(w))
            };
            let q = take("self_attn.q_proj.weight", &[heads * d, h])?;
            let k = take("self_attn.k_proj.weight", &[kv_heads * d, h])?;
            let vw = take("self_attn.v_proj.weight", &[kv_heads * d, h])?;
            let o = take("self_attn.o_proj.weight", &[h, heads * d])?;
            let gate = take("mlp.gate_proj.weight", &[inter, h])?;
            let up = take("mlp.up_proj.weight", &[inter, h])?;
            let down = take("mlp.down_proj.weight", &[h, inter])?;
            let biases = if a.qkv_bias {
                let mut bias = |name: &str, rows: i64| {
                    weights.take(&format!("{p}.self_attn.{name}.bias"), &[rows])
                };
                Some((
                    bias("q_proj", heads * d)?,
                    bias("k_proj", kv_heads * d)?,
                    bias("v_proj", kv_heads * d)?,
                ))
            } else {
                None
            };
            let qk_norms = if a.qk_norm {
                let mut w =
                    |name: &str| weights.take(&format!("{p}.self_attn.{name}.weight"), &[d]);
                Some((w("q_norm")?, w("k_norm")?))
            } else {
                None
            };
            let shards = devices
                .iter()
                .enumerate()
                .map(|(s, &dev)| {
                    let s = s as i64;
                    let rows = |w: &LinearWeight, n: i64| w.narrow_rows(s * n, n);
                    let cols = |w: &LinearWeight, n: i64| w.narrow_cols(s * n, n);
                    let fuse = |parts: Vec<LinearWeight>| policy.projection(parts, dev);
                    let qkv_bias = biases.as_ref().map(|(bq, bk, bv)| {
                        Tensor::cat(
                            &[
                                bq.narrow(0, s * hl * d, hl * d),
                                bk.narrow(0, s * kvl * d, kvl * d),
                                bv.narrow(0, s * kvl * d, kvl * d),
                            ],
                            0,
                        )
                        .to_kind(kind)
                        .to_device(dev)
                    });
                    let head_norm = |w: &Tensor| {
                        RmsNorm::new(
                            w.shallow_clone(),
                            a.norm_weight_offset,
                            c.rms_norm_eps,
                            gemma_norms,
                            kind,
                            dev,
                        )
                    };
                    BlockShard {
                        device: dev,
                        heads: hl,
                        kv_heads: kvl,
                        qkv: fuse(vec![
                            rows(&q, hl * d),
                            rows(&k, kvl * d),
                            rows(&vw, kvl * d),
                        ])
                        .with_bias(qkv_bias),
                        o: fuse(vec![cols(&o, hl * d)]),
                        gate_up: fuse(vec![rows(&gate, il), rows(&up, il)]),
                        down: fuse(vec![cols(&down, il)]),
                        q_norm: qk_norms.as_ref().map(|(qn, _)| head_norm(qn)),
                        k_norm: qk_norms.as_ref().map(|(_, kn)| head_norm(kn)),
                    }
                })
                .collect();
            let mut optional = |name: Option<&str>| -> Result<Option<RmsNorm>, ModelError> {
                name.map(|n| norm(&mut weights, &format!("{p}.{n}.weight"), h, main))
                    .transpose()
            };
            let post_attn_norm = optional(post_attn)?;
            let post_mlp_norm = optional(post_mlp)?;
            blocks.push(Block {
                input_norm: norm(&mut weights, &format!("{p}.{input}.weight"), h, main)?,
                post_attn_norm,
                pre_mlp_norm: norm(&mut weights, &format!("{p}.{pre_mlp}.weight"), h, main)?,
                post_mlp_norm,
                shards,
                window: windows.of_layer[layer],
                rope: a.layers[layer].rope,
            });
        }
        let ropes = devices
            .iter()
            .map(|&dev| {
                a.ropes
                    .iter()
                    .map(|r| Rope::new(r, c.head_dim, c.max_position_embeddings, dev, kind))
                    .collect()
            })
            .collect();
        let layouts = devices
            .iter()
            .map(|&device| ShardLayout {
                device,
                kv_heads: kvl,
            })
            .collect();
        let embed_scale = a
            .embedding_scale
            .map(|s| Tensor::from(s as f32).to_kind(kind).to_device(main));
        let fused = policy.fuses_decode(devices.len());
        Ok(Self {
            config,
            kind,
            main,
            embed,
            embed_scale,
            lm_head,
            norm: final_norm,
            blocks,
            ropes,
            windows,
            layouts,
            attention_ns: AtomicU64::new(0),
            fused_supported: fused,
            fused_decode: AtomicBool::new(fused),
            fused_steps: AtomicU64::new(0),
        })
    }

    /// How every layer scores attention (the scale where it is not SDPA's default, the soft-cap).
    fn scoring(&self) -> Scoring {
        let c = &self.config;
        let default = 1.0 / (c.head_dim as f64).sqrt();
        let scale = c.arch.attention_scale;
        Scoring {
            scale: (scale != default).then_some(scale),
            softcap: c.arch.attn_softcap,
        }
    }

    /// The context of layer `layer`'s forward.
    fn ctx<'a>(
        &self,
        layer: usize,
        tables: &'a [ShardTables],
        lora: Option<&'a LoraBatch>,
    ) -> StepCtx<'a> {
        let block = &self.blocks[layer];
        StepCtx {
            layer,
            tables,
            head_dim: self.config.head_dim as i64,
            lora,
            scoring: self.scoring(),
            activation: self.config.arch.activation,
            window: block.window,
            rope: block.rope,
        }
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

    pub fn config(&self) -> &ModelConfig {
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
        let group = self.config.gqa_groups() as i64;
        let tables =
            attention::step_tables(step, &self.ropes, &self.devices(), group, &self.windows);
        let tokens = Tensor::from_slice(&step.tokens);
        let mut x = self.embed(&tokens);
        for layer in 0..self.blocks.len() {
            let ctx = self.ctx(layer, &tables, lora);
            x = self.block_forward(
                &self.blocks[layer],
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
        let x = self.embed.lookup(&tokens.to_device(self.main), self.kind);
        match &self.embed_scale {
            Some(scale) => x * scale,
            None => x,
        }
    }

    /// Decoder layer `layer` over whole sequences starting at position 0, without a cache (the
    /// training path; causal attention, so right padding never reaches real tokens).
    pub fn layer_forward(&self, layer: usize, x: &Tensor, lora: Option<&LoraBatch>) -> Tensor {
        let (b, t, _) = x.size3().expect("hidden states are 3-d");
        let tables = attention::train_tables(b, t, &self.ropes, &self.devices(), &self.windows);
        let ctx = self.ctx(layer, &tables, lora);
        self.block_forward(
            &self.blocks[layer],
            x,
            |s, shard, h| shard.attention_train(h, &ctx, s),
            &ctx,
        )
    }

    /// One decoder block: attention (`attend`, per shard) and MLP, each with its norms and
    /// residual, shards summed on the main device.
    fn block_forward(
        &self,
        block: &Block,
        x: &Tensor,
        mut attend: impl FnMut(usize, &BlockShard, &Tensor) -> Tensor,
        ctx: &StepCtx,
    ) -> Tensor {
        let post = |norm: &Option<RmsNorm>, y: Tensor| match norm {
            Some(n) => n.forward(&y),
            None => y,
        };
        let h = block.input_norm.forward(x);
        let attn = self.all_reduce(block, |s, shard| {
            attend(s, shard, &h.to_device(shard.device))
        });
        let x = x + post(&block.post_attn_norm, attn);
        let h = block.pre_mlp_norm.forward(&x);
        let mlp = self.all_reduce(block, |s, shard| {
            shard.mlp(&h.to_device(shard.device), ctx, s)
        });
        x + post(&block.post_mlp_norm, mlp)
    }

    /// Final norm and `lm_head`: hidden states to logits (soft-capped where the model is).
    pub fn head(&self, x: &Tensor) -> Tensor {
        self.cap_logits(self.lm_head.apply(&self.norm.forward(x)))
    }

    /// The final soft-cap, `cap · tanh(logits / cap)`, where the model has one (Gemma 2); the
    /// logits as they are otherwise. Differentiable (training's head applies it under autograd).
    pub fn cap_logits(&self, logits: Tensor) -> Tensor {
        match self.config.arch.final_softcap {
            Some(cap) => (logits / cap).tanh() * cap,
            None => logits,
        }
    }

    /// `lm_head`, frozen, for training's head ([`Linear::frozen_logits`],
    /// [`Linear::input_grad`]): a packed base's Q8_0 table is then read by blocks and never
    /// held whole in float.
    pub fn frozen_head(&self) -> &Linear {
        &self.lm_head
    }

    /// The final norm ahead of `lm_head` (under autograd when `x` requires grad).
    pub fn final_norm(&self, x: &Tensor) -> Tensor {
        self.norm.forward(x)
    }

    /// Whether the embedding is held as a Q8_0 table (packed models).
    pub fn has_q8_embedding(&self) -> bool {
        self.embed.is_8bit()
    }

    /// How many projections are held 8-bit (Q8_0).
    pub fn eight_bit_projections(&self) -> usize {
        self.blocks
            .iter()
            .flat_map(|b| &b.shards)
            .flat_map(BlockShard::projections)
            .filter(|w| w.is_8bit())
            .count()
    }

    /// Bytes the weights hold (embedding, `lm_head` when not tied, norms, projections), and how
    /// many of the projections are packed (4-bit or 8-bit) out of how many.
    pub fn weight_bytes(&self) -> (u64, usize, usize) {
        let mut bytes = self.embed.bytes() + tensor_bytes(&self.norm.weight);
        if !self.lm_head.same(&self.embed) {
            bytes += self.lm_head.bytes();
        }
        let (mut packed, mut total) = (0, 0);
        for block in &self.blocks {
            bytes += block.norms().map(|n| tensor_bytes(&n.weight)).sum::<u64>();
            for s in &block.shards {
                bytes += s.norms().map(|n| tensor_bytes(&n.weight)).sum::<u64>();
                for w in s.projections() {
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
            out.extend(b.norms().map(|n| n.weight.shallow_clone()));
            for s in &b.shards {
                out.extend(s.norms().map(|n| n.weight.shallow_clone()));
                for w in s.projections() {
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
