//! A checkpoint resolved into what Tessera runs: the decoder's dimensions and one
//! [`Architecture`] description (norms, activation, biases, q/k norms, each layer's attention
//! window and rotary table, soft-caps, embedding scale, fused checkpoint modules), read from a
//! Hugging Face `config.json` (`model_type`) or from GGUF metadata (`general.architecture`) with
//! every default of the family filled in. The model code reads only this description, never the
//! family's name.
//!
//! Families (transformers' `modeling_*.py` and llama.cpp's converter are the references):
//! Llama (with Llama 3's `rope_scaling`), Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 (text) and
//! Phi-3. What a family does that Tessera cannot run is refused with the feature's name.

use serde_json::Value as Json;

use crate::gguf::GgufFile;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config.json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("GGUF metadata: {0}")]
    Gguf(#[from] crate::gguf::GgufError),
    #[error("unsupported architecture `{0}` (supported: {SUPPORTED})")]
    Architecture(String),
    #[error("config field `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("`{field}`: {feature} is not supported")]
    Unsupported {
        field: &'static str,
        feature: String,
    },
}

/// The families Tessera runs, as `model_type` / `general.architecture` name them.
pub const SUPPORTED: &str = "llama, mistral, qwen2, qwen3, gemma2, gemma3 (text), phi3";

/// Where a checkpoint comes from: decides names and defaults at load, never the forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma2,
    Gemma3,
    Phi3,
}

impl Family {
    /// From a Hugging Face `model_type` or a GGUF `general.architecture`.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma2" => Family::Gemma2,
            "gemma3" | "gemma3_text" => Family::Gemma3,
            "phi3" => Family::Phi3,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3",
            Family::Phi3 => "phi3",
        }
    }

    fn is_gemma(self) -> bool {
        matches!(self, Family::Gemma2 | Family::Gemma3)
    }
}

/// The MLP's activation on the gate: `act(gate) · up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU (Llama, Mistral, Qwen, Phi-3).
    Silu,
    /// GeGLU with tanh-approximated GELU (Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
}

/// How a rotary table's frequencies are made.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (`rope_type: linear`).
    Linear {
        factor: f64,
    },
    /// Llama 3.x (`rope_type: llama3`): low frequencies divided by `factor`, high ones kept,
    /// a smooth ramp between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Per-frequency divisors as llama.cpp's converter stores Llama 3's scaling in a GGUF file
    /// (`rope_freqs.weight`, `head_dim / 2` values): `inv_freq[i] / factors[i]`.
    Factors(Vec<f32>),
}

/// One rotary table.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// Attention of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerAttention {
    /// Keys within this many positions of the query, the query's own included (transformers'
    /// `kv_idx > q_idx - window`); `None`: every earlier key.
    pub window: Option<usize>,
    /// Which of [`Architecture::ropes`] the layer rotates q and k with.
    pub rope: usize,
}

/// Everything that differs between the families, resolved: the one block implementation reads
/// this and nothing else.
#[derive(Debug, Clone, PartialEq)]
pub struct Architecture {
    pub family: Family,
    pub activation: Activation,
    /// Gemma's RMSNorm scales by `1 + w`: Hugging Face checkpoints store `w`, GGUF files `1 + w`
    /// (llama.cpp's converter adds the 1). Added at load, so every norm is plain `x̂ · w` after.
    pub norm_weight_offset: f32,
    /// Norms after attention and after the MLP too, before each residual add (Gemma 2 and 3).
    pub sandwich_norms: bool,
    /// Biases on q, k and v (Qwen2).
    pub qkv_bias: bool,
    /// RMSNorm over each head of q and k before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// The embedding's output multiplied by this (Gemma: `sqrt(hidden)`, rounded to the dtype).
    pub embedding_scale: Option<f64>,
    /// What `q·k` is multiplied by before the softmax (`1 / sqrt(head_dim)`, or Gemma's
    /// `query_pre_attn_scalar^-0.5`).
    pub attention_scale: f64,
    /// `cap · tanh(scores / cap)` on attention scores (Gemma 2).
    pub attn_softcap: Option<f64>,
    /// `cap · tanh(logits / cap)` on the final logits (Gemma 2).
    pub final_softcap: Option<f64>,
    /// One entry per layer.
    pub layers: Vec<LayerAttention>,
    /// The distinct rotary tables the layers use.
    pub ropes: Vec<Rope>,
    /// The checkpoint holds q|k|v as one `qkv_proj` and gate|up as one `gate_up_proj` (Phi-3);
    /// PEFT adapters then name those fused modules.
    pub fused_checkpoint_modules: bool,
}

impl Architecture {
    /// Whether any layer attends within a window.
    pub fn has_windows(&self) -> bool {
        self.layers.iter().any(|l| l.window.is_some())
    }
}

/// The runtime configuration of a decoder: its dimensions and its [`Architecture`].
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub arch: Architecture,
}

/// Reads fields of a `config.json` object with their names in errors.
struct Hf<'a>(&'a serde_json::Map<String, Json>);

impl Hf<'_> {
    fn get(&self, key: &str) -> Option<&Json> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn usize(&self, key: &'static str) -> Result<Option<usize>, ConfigError> {
        self.get(key)
            .map(|v| {
                v.as_u64().map(|n| n as usize).ok_or_else(|| {
                    invalid(key, format!("expected a non-negative integer, got {v}"))
                })
            })
            .transpose()
    }

    fn need_usize(&self, key: &'static str) -> Result<usize, ConfigError> {
        self.usize(key)?
            .ok_or_else(|| invalid(key, "missing".into()))
    }

    fn f64(&self, key: &'static str) -> Result<Option<f64>, ConfigError> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| invalid(key, format!("expected a number, got {v}")))
            })
            .transpose()
    }

    fn bool(&self, key: &'static str) -> Result<Option<bool>, ConfigError> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| invalid(key, format!("expected true or false, got {v}")))
            })
            .transpose()
    }

    fn str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Json::as_str)
    }

    fn token_ids(&self, key: &'static str) -> Result<Vec<u32>, ConfigError> {
        let bad = |v: &Json| {
            invalid(
                key,
                format!("expected a token id or a list of them, got {v}"),
            )
        };
        match self.get(key) {
            None => Ok(vec![]),
            Some(Json::Array(ids)) => ids
                .iter()
                .map(|v| v.as_u64().map(|n| n as u32).ok_or_else(|| bad(v)))
                .collect(),
            Some(v) => Ok(vec![v.as_u64().ok_or_else(|| bad(v))? as u32]),
        }
    }
}

fn invalid(field: &'static str, message: String) -> ConfigError {
    ConfigError::Invalid { field, message }
}

fn unsupported(field: &'static str, feature: impl Into<String>) -> ConfigError {
    ConfigError::Unsupported {
        field,
        feature: feature.into(),
    }
}

/// One rotary table from a `rope_parameters` / `rope_scaling` object (`theta` from elsewhere
/// when the object has none).
fn rope_from_json(p: Option<&Json>, theta: f64) -> Result<Rope, ConfigError> {
    let field = "rope_parameters";
    let get = |k: &str| p.and_then(|p| p.get(k)).filter(|v| !v.is_null());
    let theta = get("rope_theta").and_then(Json::as_f64).unwrap_or(theta);
    let num = |k: &'static str| {
        get(k)
            .and_then(Json::as_f64)
            .ok_or_else(|| invalid(field, format!("rope scaling needs `{k}`")))
    };
    let kind = get("rope_type")
        .or_else(|| get("type"))
        .and_then(Json::as_str);
    let scaling = match kind {
        None | Some("default") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear {
            factor: num("factor")?,
        },
        Some("llama3") => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        Some(other) => {
            return Err(unsupported(
                "rope_scaling",
                format!("rope type `{other}` (supported: default, linear, llama3)"),
            ))
        }
    };
    Ok(Rope { theta, scaling })
}

/// Per-family defaults of what a `config.json` may leave out (transformers' config classes).
struct Defaults {
    rope_theta: f64,
    tie_word_embeddings: bool,
    rms_norm_eps: f64,
}

fn defaults(family: Family) -> Defaults {
    let (rope_theta, tie_word_embeddings, rms_norm_eps) = match family {
        Family::Llama => (10000.0, false, 1e-6),
        Family::Mistral => (10000.0, false, 1e-6),
        Family::Qwen2 => (10000.0, false, 1e-6),
        Family::Qwen3 => (10000.0, false, 1e-6),
        Family::Gemma2 => (10000.0, true, 1e-6),
        Family::Gemma3 => (1_000_000.0, true, 1e-6),
        Family::Phi3 => (10000.0, false, 1e-5),
    };
    Defaults {
        rope_theta,
        tie_word_embeddings,
        rms_norm_eps,
    }
}

/// Which layers attend within a window: `layer_types` when given, else the family's rule.
fn layer_windows(
    family: Family,
    c: &Hf,
    layers: usize,
    window: Option<usize>,
) -> Result<Vec<bool>, ConfigError> {
    if let Some(types) = c.get("layer_types").and_then(Json::as_array) {
        if types.len() != layers {
            return Err(invalid(
                "layer_types",
                format!("{} entries for {layers} layers", types.len()),
            ));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(unsupported("layer_types", format!("layer type {t}"))),
            })
            .collect();
    }
    let every = |on: bool| vec![on; layers];
    Ok(match family {
        Family::Gemma2 => (0..layers).map(|i| (i + 1) % 2 != 0).collect(),
        Family::Gemma3 => {
            let pattern = c.usize("sliding_window_pattern")?.unwrap_or(6).max(1);
            (0..layers).map(|i| (i + 1) % pattern != 0).collect()
        }
        Family::Qwen2 | Family::Qwen3 => {
            // transformers: windows only with `use_sliding_window`, from `max_window_layers` on.
            let on = c.bool("use_sliding_window")?.unwrap_or(false);
            let from = c.usize("max_window_layers")?.unwrap_or(layers);
            (0..layers).map(|i| on && i >= from).collect()
        }
        Family::Mistral | Family::Phi3 => every(window.is_some()),
        Family::Llama => every(false),
    })
}

impl ModelConfig {
    /// Parses a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self, ConfigError> {
        let json: Json = serde_json::from_str(text)?;
        let obj = json
            .as_object()
            .ok_or_else(|| invalid("config.json", "not a JSON object".into()))?;
        let c = Hf(obj);
        // A multimodal Gemma 3 checkpoint nests the text model's config; its vision tower is
        // refused below by its `model_type`.
        let model_type = c.str("model_type").unwrap_or("llama");
        if c.get("vision_config").is_some() {
            return Err(unsupported(
                "vision_config",
                format!("the vision tower of `{model_type}` (only text models run)"),
            ));
        }
        let family = Family::from_name(model_type)
            .ok_or_else(|| ConfigError::Architecture(model_type.to_string()))?;
        let d = defaults(family);
        let hidden = c.need_usize("hidden_size")?;
        let heads = c.need_usize("num_attention_heads")?;
        let layers = c.need_usize("num_hidden_layers")?;
        let head_dim = c.usize("head_dim")?.unwrap_or(hidden / heads.max(1));
        if c.bool("use_bidirectional_attention")? == Some(true) {
            return Err(unsupported(
                "use_bidirectional_attention",
                "bidirectional attention",
            ));
        }
        if c.bool("mlp_bias")? == Some(true) {
            return Err(unsupported("mlp_bias", "biases on the MLP projections"));
        }
        let qkv_bias = match family {
            // Qwen2's attention always has q/k/v biases (and none on o).
            Family::Qwen2 => true,
            _ => c.bool("attention_bias")?.unwrap_or(false),
        };
        if qkv_bias && family != Family::Qwen2 {
            return Err(unsupported(
                "attention_bias",
                format!("attention biases on `{model_type}` (o_proj's bias)"),
            ));
        }
        if let Some(f) = c.f64("partial_rotary_factor")? {
            if f != 1.0 {
                return Err(unsupported(
                    "partial_rotary_factor",
                    format!("rotary embeddings on a part ({f}) of each head"),
                ));
            }
        }
        let act = c
            .str("hidden_activation")
            .or_else(|| c.str("hidden_act"))
            .unwrap_or(if family.is_gemma() {
                "gelu_pytorch_tanh"
            } else {
                "silu"
            });
        let activation = match act {
            "silu" | "swish" => Activation::Silu,
            "gelu_pytorch_tanh" | "gelu_tanh" => Activation::GeluTanh,
            other => {
                return Err(unsupported(
                    "hidden_act",
                    format!("activation `{other}` (supported: silu, gelu_pytorch_tanh)"),
                ))
            }
        };
        // Rotary tables: one, or (Gemma 3) one for full-attention layers and one for sliding ones.
        let theta = c.f64("rope_theta")?.unwrap_or(d.rope_theta);
        let params = c.get("rope_parameters");
        let keyed = params.is_some_and(|p| p.get("full_attention").is_some());
        let full = if keyed {
            rope_from_json(params.and_then(|p| p.get("full_attention")), theta)?
        } else {
            rope_from_json(params.or_else(|| c.get("rope_scaling")), theta)?
        };
        let sliding = if keyed {
            Some(rope_from_json(
                params.and_then(|p| p.get("sliding_attention")),
                10000.0,
            )?)
        } else if family == Family::Gemma3 {
            let local = c.f64("rope_local_base_freq")?.unwrap_or(10000.0);
            Some(Rope {
                theta: local,
                scaling: RopeScaling::None,
            })
        } else {
            None
        };
        let window = c.usize("sliding_window")?.or(match family {
            Family::Gemma2 | Family::Gemma3 => Some(4096),
            _ => None,
        });
        let windowed = layer_windows(family, &c, layers, window)?;
        let mut ropes = vec![full];
        let sliding_rope = match sliding {
            Some(r) if r != ropes[0] => {
                ropes.push(r);
                1
            }
            _ => 0,
        };
        let layer_attention = windowed
            .iter()
            .map(|&w| LayerAttention {
                window: if w { window } else { None },
                rope: if w { sliding_rope } else { 0 },
            })
            .collect();
        let gemma = family.is_gemma();
        let query_scalar = if gemma {
            c.f64("query_pre_attn_scalar")?.unwrap_or(256.0)
        } else {
            head_dim as f64
        };
        let arch = Architecture {
            family,
            activation,
            norm_weight_offset: if gemma { 1.0 } else { 0.0 },
            sandwich_norms: gemma,
            qkv_bias,
            qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3),
            embedding_scale: gemma.then(|| (hidden as f64).sqrt()),
            attention_scale: 1.0 / query_scalar.sqrt(),
            attn_softcap: match family {
                Family::Gemma2 => c.f64("attn_logit_softcapping")?.or(Some(50.0)),
                _ => c.f64("attn_logit_softcapping")?,
            },
            final_softcap: match family {
                Family::Gemma2 => c.f64("final_logit_softcapping")?.or(Some(30.0)),
                _ => c.f64("final_logit_softcapping")?,
            },
            layers: layer_attention,
            ropes,
            fused_checkpoint_modules: family == Family::Phi3,
        };
        let config = Self {
            vocab_size: c.need_usize("vocab_size")?,
            hidden_size: hidden,
            intermediate_size: c.need_usize("intermediate_size")?,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: c.usize("num_key_value_heads")?.unwrap_or(heads),
            head_dim,
            rms_norm_eps: c.f64("rms_norm_eps")?.unwrap_or(d.rms_norm_eps),
            max_position_embeddings: c.usize("max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: c
                .bool("tie_word_embeddings")?
                .unwrap_or(d.tie_word_embeddings),
            bos_token_id: c.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: c.token_ids("eos_token_id")?,
            arch,
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads a GGUF file's metadata under its `general.architecture`, with llama.cpp's meaning
    /// of each key (and its defaults where the converter writes none). Ties the embeddings when
    /// there is no `output.weight`.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, ConfigError> {
        let arch_name = g.architecture()?.to_string();
        let family = Family::from_name(&arch_name)
            .ok_or_else(|| ConfigError::Architecture(arch_name.clone()))?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let u = |k: &str| g.get_u64(&key(k)).map(|v| v as usize);
        let f = |k: &str| g.get_f64(&key(k)).ok();
        let hidden = u("embedding_length")?;
        let heads = u("attention.head_count")?;
        let layers = u("block_count")?;
        let kv_heads = u("attention.head_count_kv").unwrap_or(heads);
        let vocab = match u("vocab_size") {
            Ok(v) => v,
            Err(_) => g.get_array("tokenizer.ggml.tokens")?.len(),
        };
        let head_dim = u("attention.key_length").unwrap_or(hidden / heads.max(1));
        if let Ok(rot) = u("rope.dimension_count") {
            if rot != head_dim {
                return Err(unsupported(
                    "rope.dimension_count",
                    format!("rotary embeddings on {rot} of {head_dim} head dimensions"),
                ));
            }
        }
        let theta = f("rope.freq_base").unwrap_or(defaults(family).rope_theta);
        // Scaling: linear as a key; Llama 3's as the converter's `rope_freqs.weight` tensor
        // (a divisor per frequency).
        let scaling = match g.get_str(&key("rope.scaling.type")).ok() {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: f("rope.scaling.factor").unwrap_or(1.0),
            },
            Some(other) => {
                return Err(unsupported(
                    "rope.scaling.type",
                    format!("rope scaling `{other}` (supported: none, linear, llama3)"),
                ))
            }
        };
        let scaling = match g.tensor("rope_freqs.weight") {
            Some(info) if scaling == RopeScaling::None => {
                let bytes = g.read_tensor_bytes(info)?;
                let values =
                    crate::dequant::dequantize(&info.name, info.ggml_type, &bytes, info.numel())
                        .map_err(|e| invalid("rope_freqs.weight", e.to_string()))?;
                if values.len() != head_dim / 2 {
                    return Err(invalid(
                        "rope_freqs.weight",
                        format!("{} factors for head_dim {head_dim}", values.len()),
                    ));
                }
                RopeScaling::Factors(values)
            }
            _ => scaling,
        };
        let full = Rope { theta, scaling };
        // Sliding windows as llama.cpp reads them: Gemma 2 (window 4096 by default, every
        // other layer), Gemma 3 (when the key is there; 5 sliding : 1 full, or a per-layer array),
        // and the key on other families for every layer. (llama.cpp runs Phi-3's window as full
        // attention; Tessera follows transformers.)
        let window = u("attention.sliding_window").ok().filter(|&w| w > 0);
        let pattern_key = key("attention.sliding_window_pattern");
        let pattern: Option<Vec<bool>> = match g.get(&pattern_key) {
            Some(crate::gguf::Value::Array(a)) => Some(
                a.iter()
                    .map(|v| matches!(v, crate::gguf::Value::Bool(true)))
                    .collect(),
            ),
            _ => None,
        };
        let every_nth = |default: usize| -> Vec<bool> {
            let n = g
                .get(&pattern_key)
                .and_then(crate::gguf::Value::as_u64)
                .map_or(default, |v| v as usize);
            (0..layers).map(|i| n == 0 || i % n < n - 1).collect()
        };
        let (window, windowed) = match family {
            Family::Gemma2 => (
                window.or(Some(4096)),
                pattern.unwrap_or_else(|| every_nth(2)),
            ),
            Family::Gemma3 if window.is_some() => (window, pattern.unwrap_or_else(|| every_nth(6))),
            _ => (window, vec![window.is_some(); layers]),
        };
        if windowed.len() != layers {
            return Err(invalid(
                "attention.sliding_window_pattern",
                format!("{} entries for {layers} layers", windowed.len()),
            ));
        }
        let mut ropes = vec![full.clone()];
        let sliding_theta = match family {
            Family::Gemma3 => Some(f("rope.freq_base_swa").unwrap_or(10000.0)),
            _ => f("rope.freq_base_swa"),
        };
        let sliding_rope = match sliding_theta {
            Some(t) if t != theta || full.scaling != RopeScaling::None => {
                ropes.push(Rope {
                    theta: t,
                    scaling: RopeScaling::None,
                });
                1
            }
            _ => 0,
        };
        let gemma = family.is_gemma();
        // llama.cpp: 1/sqrt(head_dim), except Gemma 2 and 3 27B (hidden / heads).
        let big_gemma = (family == Family::Gemma2 && layers == 46)
            || (family == Family::Gemma3 && layers == 62);
        let query_scalar = if big_gemma {
            (hidden / heads) as f64
        } else {
            head_dim as f64
        };
        let has = |t: &str| g.tensor(t).is_some();
        let arch = Architecture {
            family,
            activation: if gemma {
                Activation::GeluTanh
            } else {
                Activation::Silu
            },
            // The converter stored `1 + w` already.
            norm_weight_offset: 0.0,
            sandwich_norms: gemma,
            qkv_bias: has("blk.0.attn_q.bias"),
            qk_norm: has("blk.0.attn_q_norm.weight"),
            embedding_scale: gemma.then(|| (hidden as f64).sqrt()),
            attention_scale: 1.0 / query_scalar.sqrt(),
            attn_softcap: f("attn_logit_softcapping")
                .or((family == Family::Gemma2).then_some(50.0))
                .filter(|&c| c > 0.0),
            final_softcap: f("final_logit_softcapping")
                .or((family == Family::Gemma2).then_some(30.0))
                .filter(|&c| c > 0.0),
            layers: windowed
                .iter()
                .map(|&w| LayerAttention {
                    window: if w { window } else { None },
                    rope: if w { sliding_rope } else { 0 },
                })
                .collect(),
            ropes,
            fused_checkpoint_modules: family == Family::Phi3,
        };
        if arch.qkv_bias && family != Family::Qwen2 {
            return Err(unsupported(
                "attn_q.bias",
                format!("attention biases on `{arch_name}`"),
            ));
        }
        let mut eos_token_ids: Vec<u32> = g
            .get_u64("tokenizer.ggml.eos_token_id")
            .ok()
            .map(|v| vec![v as u32])
            .unwrap_or_default();
        // An end-of-turn token the file names (Gemma's `<end_of_turn>`) also ends generation.
        if let Ok(eot) = g.get_u64("tokenizer.ggml.eot_token_id") {
            if !eos_token_ids.contains(&(eot as u32)) {
                eos_token_ids.push(eot as u32);
            }
        }
        let config = Self {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: u("feed_forward_length")?,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: g.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
            max_position_embeddings: u("context_length").unwrap_or(4096),
            tie_word_embeddings: g.tensor("output.weight").is_none(),
            bos_token_id: g
                .get_u64("tokenizer.ggml.bos_token_id")
                .ok()
                .map(|v| v as u32),
            eos_token_ids,
            arch,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return Err(invalid("num_attention_heads", "must be at least 1".into()));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(invalid(
                "num_key_value_heads",
                format!(
                    "{} attention heads are not a multiple of {} key/value heads",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(invalid(
                "head_dim",
                format!("{} is odd or zero; RoPE needs pairs", self.head_dim),
            ));
        }
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be at least 1".into()));
            }
        }
        if self.arch.layers.iter().any(|l| l.window == Some(0)) {
            return Err(invalid("sliding_window", "must be at least 1".into()));
        }
        for (field, cap) in [
            ("attn_logit_softcapping", self.arch.attn_softcap),
            ("final_logit_softcapping", self.arch.final_softcap),
        ] {
            if cap.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
                return Err(invalid(field, format!("{cap:?} is not a positive number")));
            }
        }
        Ok(())
    }

    /// Query heads per key/value head.
    pub fn gqa_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOL: &str = r#"{"model_type":"llama","vocab_size":49152,"hidden_size":576,
        "intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,
        "num_key_value_heads":3,"rms_norm_eps":1e-5,"rope_theta":100000.0,
        "max_position_embeddings":8192,"tie_word_embeddings":true,"bos_token_id":1,"eos_token_id":2}"#;

    #[test]
    fn reads_transformers_4_and_5_rope_theta() {
        let c = ModelConfig::from_hf_json(SMOL).unwrap();
        assert_eq!(
            (c.head_dim, c.arch.ropes[0].theta, c.gqa_groups()),
            (64, 100000.0, 3)
        );
        let v5 = SMOL.replace(
            r#""rope_theta":100000.0"#,
            r#""rope_parameters":{"rope_type":"default","rope_theta":500000.0}"#,
        );
        let c = ModelConfig::from_hf_json(&v5).unwrap();
        assert_eq!(
            c.arch.ropes,
            vec![Rope {
                theta: 500000.0,
                scaling: RopeScaling::None
            }]
        );
        assert!(!c.arch.has_windows());
    }

    #[test]
    fn llama3_rope_scaling_is_read() {
        let l3 = SMOL.replace(
            r#""rope_theta":100000.0"#,
            r#""rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":32.0,
                "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}"#,
        );
        let c = ModelConfig::from_hf_json(&l3).unwrap();
        assert!(matches!(
            c.arch.ropes[0].scaling,
            RopeScaling::Llama3 { factor, .. } if factor == 32.0
        ));
    }

    #[test]
    fn gemma3_layers_alternate_windows_and_rotary_tables() {
        let g3 = r#"{"model_type":"gemma3_text","vocab_size":300,"hidden_size":64,
            "intermediate_size":128,"num_hidden_layers":7,"num_attention_heads":4,
            "num_key_value_heads":1,"head_dim":32,"sliding_window":8,"query_pre_attn_scalar":32,
            "rope_parameters":{"full_attention":{"rope_type":"default","rope_theta":1000000.0},
                               "sliding_attention":{"rope_type":"default","rope_theta":10000.0}}}"#;
        let c = ModelConfig::from_hf_json(g3).unwrap();
        let a = &c.arch;
        let windows: Vec<_> = a.layers.iter().map(|l| l.window).collect();
        assert_eq!(
            windows,
            [Some(8), Some(8), Some(8), Some(8), Some(8), None, Some(8)]
        );
        assert_eq!(a.layers[5].rope, 0);
        assert_eq!(a.ropes[a.layers[0].rope].theta, 10000.0);
        assert!(a.qk_norm && a.sandwich_norms && c.tie_word_embeddings);
        assert_eq!(a.norm_weight_offset, 1.0);
        assert_eq!(a.embedding_scale, Some(8.0));
        assert_eq!(a.activation, Activation::GeluTanh);
        assert_eq!((a.attn_softcap, a.final_softcap), (None, None));
    }

    #[test]
    fn rejects_what_it_cannot_run() {
        let bad_gqa = SMOL.replace(r#""num_key_value_heads":3"#, r#""num_key_value_heads":4"#);
        let err = ModelConfig::from_hf_json(&bad_gqa).unwrap_err();
        assert!(err.to_string().contains("num_key_value_heads"), "{err}");
        let gpt2 = SMOL.replace(r#""model_type":"llama""#, r#""model_type":"gpt2""#);
        assert!(matches!(
            ModelConfig::from_hf_json(&gpt2),
            Err(ConfigError::Architecture(_))
        ));
        let yarn = SMOL.replace(
            r#""rope_theta":100000.0"#,
            r#""rope_scaling":{"rope_type":"yarn","factor":4.0}"#,
        );
        let err = ModelConfig::from_hf_json(&yarn).unwrap_err().to_string();
        assert!(
            err.contains("yarn") && err.contains("rope_scaling"),
            "{err}"
        );
        let vision = SMOL.replace(
            r#""model_type":"llama""#,
            r#""model_type":"gemma3","vision_config":{}"#,
        );
        let err = ModelConfig::from_hf_json(&vision).unwrap_err().to_string();
        assert!(err.contains("vision"), "{err}");
        let partial = SMOL.replace(
            r#""model_type":"llama""#,
            r#""model_type":"phi3","partial_rotary_factor":0.5"#,
        );
        let err = ModelConfig::from_hf_json(&partial).unwrap_err().to_string();
        assert!(err.contains("partial_rotary_factor"), "{err}");
    }
}
