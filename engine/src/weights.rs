//! Model weights by Hugging Face name, loaded on the CPU from a safetensors model directory (one
//! file or shards with `model.safetensors.index.json`) or from a GGUF file (dequantised, with
//! llama.cpp's Q/K row permutation undone on Llama-architecture files), then taken one by one with
//! their shape checked. Fused checkpoint modules (Phi-3's `qkv_proj` and `gate_up_proj`, a GGUF
//! `attn_qkv`) are split into q, k, v and gate, up by rows, so the model sees one naming.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use crate::dequant::{dequantize, DequantError};
use crate::gguf::{GgufError, GgufFile};
use crate::model::{Family, ModelConfig};
use crate::packed::Int4Weight;
use crate::q8_weight::Q8Weight;

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{path}: invalid model.safetensors.index.json: {message}")]
    Index { path: PathBuf, message: String },
    #[error("{dir}: no model.safetensors and no model.safetensors.index.json")]
    NoWeights { dir: PathBuf },
    #[error("tensor `{name}` has unsupported dtype {dtype}")]
    Dtype { name: String, dtype: String },
    #[error("missing tensor `{name}`")]
    Missing { name: String },
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape {
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Dequant(#[from] DequantError),
}

/// Tensors by Hugging Face name, on the CPU in their stored float type (GGUF: float32), and the
/// linear weights kept 4-bit or 8-bit when asked ([`WeightMap::from_gguf`] with `pack`).
pub struct WeightMap {
    tensors: HashMap<String, Tensor>,
    packed: HashMap<String, LinearWeight>,
    tables: HashMap<String, Q8Weight>,
}

/// An embedding or `lm_head` as stored: float, or Q8_0.
pub enum TableWeight {
    Dense(Tensor),
    Q8(Q8Weight),
}

impl TableWeight {
    /// Float32 values (a Q8_0 table dequantised).
    pub fn dense(self) -> Tensor {
        match self {
            TableWeight::Dense(t) => t,
            TableWeight::Q8(t) => t.dequantize(Kind::Float),
        }
    }
}

/// A linear layer's weight as stored: float, 4-bit, or Q8_0.
pub enum LinearWeight {
    Dense(Tensor),
    Int4(Int4Weight),
    Int8(Q8Weight),
}

impl LinearWeight {
    /// Float32 values (a 4-bit weight dequantised).
    pub fn dense(self) -> Tensor {
        match self {
            LinearWeight::Dense(t) => t,
            LinearWeight::Int4(w) => w.dequantize(Kind::Float),
            LinearWeight::Int8(w) => w.dequantize(Kind::Float),
        }
    }

    /// The 4-bit weight, if it is one.
    pub fn as_int4(&self) -> Option<&Int4Weight> {
        match self {
            LinearWeight::Int4(w) => Some(w),
            _ => None,
        }
    }

    /// The Q8_0 weight, if it is one.
    pub fn as_int8(&self) -> Option<&Q8Weight> {
        match self {
            LinearWeight::Int8(w) => Some(w),
            _ => None,
        }
    }

    /// The same rows reordered by `f` (a function of a `[rows, n]` matrix that permutes rows).
    pub fn map_rows(self, f: impl Fn(&Tensor) -> Tensor) -> LinearWeight {
        match self {
            LinearWeight::Dense(t) => LinearWeight::Dense(f(&t)),
            LinearWeight::Int4(w) => LinearWeight::Int4(w.map_rows(f)),
            LinearWeight::Int8(w) => LinearWeight::Int8(w.map_rows(f)),
        }
    }

    /// Output rows `start .. start + len` (a column-parallel shard), held as it is.
    pub fn narrow_rows(&self, start: i64, len: i64) -> LinearWeight {
        match self {
            LinearWeight::Dense(t) => LinearWeight::Dense(t.narrow(0, start, len)),
            LinearWeight::Int4(w) => LinearWeight::Int4(w.narrow_rows(start, len)),
            LinearWeight::Int8(w) => LinearWeight::Int8(w.narrow_rows(start, len)),
        }
    }

    /// Input columns `start .. start + len` (a row-parallel shard): held as it is where the
    /// columns fall on the quantisation's 32-column groups, dequantised where they do not.
    pub fn narrow_cols(&self, start: i64, len: i64) -> LinearWeight {
        let dense = |t: Tensor| LinearWeight::Dense(t.narrow(1, start, len));
        match self {
            LinearWeight::Dense(t) => dense(t.shallow_clone()),
            LinearWeight::Int4(w) => w
                .narrow_cols(start, len)
                .map_or_else(|| dense(w.dequantize(Kind::Float)), LinearWeight::Int4),
            LinearWeight::Int8(w) => w
                .narrow_cols(start, len)
                .map_or_else(|| dense(w.dequantize(Kind::Float)), LinearWeight::Int8),
        }
    }
}

fn check_shape(name: &str, found: Vec<i64>, expected: &[i64]) -> Result<(), WeightsError> {
    if found == expected {
        return Ok(());
    }
    Err(WeightsError::Shape {
        name: name.to_string(),
        expected: expected.to_vec(),
        found,
    })
}

/// Projections that [`WeightMap::from_gguf`] may keep 4-bit or 8-bit.
fn is_projection(name: &str) -> bool {
    [
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "self_attn.qkv_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
        "mlp.gate_up_proj.weight",
    ]
    .iter()
    .any(|p| name.ends_with(p))
}

/// The parts of a fused checkpoint tensor (`…qkv_proj.weight|bias`, `…gate_up_proj.weight`) as
/// (name, first row, rows); `None` for any other tensor.
fn fused_parts(name: &str, c: &ModelConfig) -> Option<Vec<(String, i64, i64)>> {
    let d = c.head_dim as i64;
    let (q, kv, ff) = (
        c.num_attention_heads as i64 * d,
        c.num_key_value_heads as i64 * d,
        c.intermediate_size as i64,
    );
    let (prefix, suffix, parts): (&str, &str, Vec<(&str, i64)>) =
        if let Some((p, s)) = name.split_once("self_attn.qkv_proj.") {
            (p, s, vec![("q_proj", q), ("k_proj", kv), ("v_proj", kv)])
        } else if let Some((p, s)) = name.split_once("mlp.gate_up_proj.") {
            (p, s, vec![("gate_proj", ff), ("up_proj", ff)])
        } else {
            return None;
        };
    let module = if parts.len() == 3 { "self_attn" } else { "mlp" };
    let mut start = 0;
    Some(
        parts
            .into_iter()
            .map(|(part, rows)| {
                start += rows;
                (
                    format!("{prefix}{module}.{part}.{suffix}"),
                    start - rows,
                    rows,
                )
            })
            .collect(),
    )
}

/// How many heads a q or k projection's rows hold (the rows llama.cpp's converter permutes on
/// Llama-architecture files), `None` for other tensors.
fn rope_heads(name: &str, c: &ModelConfig) -> Option<i64> {
    if !matches!(c.arch.family, Family::Llama | Family::Mistral) {
        return None;
    }
    if name.ends_with("self_attn.q_proj.weight") {
        Some(c.num_attention_heads as i64)
    } else if name.ends_with("self_attn.k_proj.weight") {
        Some(c.num_key_value_heads as i64)
    } else {
        None
    }
}

impl WeightMap {
    pub fn new(tensors: HashMap<String, Tensor>) -> Self {
        Self {
            tensors,
            packed: HashMap::new(),
            tables: HashMap::new(),
        }
    }

    /// Loads `model.safetensors`, or every shard listed in `model.safetensors.index.json`.
    pub fn from_safetensors_dir(dir: &Path) -> Result<Self, WeightsError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            let text = crate::regular_file::read_to_string(
                &index,
                Some(crate::regular_file::MAX_JSON_BYTES),
            )
            .map_err(|source| WeightsError::Io {
                path: index.clone(),
                source,
            })?;
            let bad = |message: String| WeightsError::Index {
                path: index.clone(),
                message,
            };
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| bad("no `weight_map` object".into()))?;
            let mut files: Vec<PathBuf> = map
                .values()
                .filter_map(|v| v.as_str())
                .map(|f| dir.join(f))
                .collect();
            files.sort();
            files.dedup();
            files
        } else {
            return Err(WeightsError::NoWeights {
                dir: dir.to_path_buf(),
            });
        };
        let mut tensors = HashMap::new();
        for file in files {
            tensors.extend(read_safetensors(&file)?);
        }
        Ok(Self::new(tensors))
    }

    /// Every tensor of a GGUF file under its Hugging Face name: dequantised to float32, except,
    /// with `pack`, the Q4_0 / Q4_1 / Q4_K projections, kept 4-bit, and the Q8_0 (and Q5_0)
    /// ones, kept 8-bit ([`WeightMap::take_linear`]), and a Q8_0 embedding or `lm_head`, kept
    /// 8-bit ([`WeightMap::take_table`]).
    pub fn from_gguf(g: &GgufFile, config: &ModelConfig, pack: bool) -> Result<Self, WeightsError> {
        let mut tensors = HashMap::new();
        let mut packed = HashMap::new();
        let mut tables = HashMap::new();
        for info in &g.tensors {
            let Some(name) = hf_name(&info.name, config.arch.family) else {
                tracing::debug!(tensor = %info.name, "GGUF tensor not used by the model");
                continue;
            };
            let bytes = g.read_tensor_bytes(info)?;
            let rows = info.shape.first().copied().unwrap_or(1) as i64;
            let pieces =
                fused_parts(&name, config).unwrap_or_else(|| vec![(name.clone(), 0, rows)]);
            if pack && is_projection(&name) && info.shape.len() == 2 {
                let (rows, cols) = (info.shape[0], info.shape[1]);
                let whole = Int4Weight::from_gguf(info.ggml_type, &bytes, rows, cols)
                    .map(LinearWeight::Int4)
                    .or_else(|| {
                        Q8Weight::from_gguf(info.ggml_type, &bytes, rows, cols)
                            .map(LinearWeight::Int8)
                    });
                if let Some(whole) = whole {
                    for (part, start, len) in pieces {
                        let w = whole.narrow_rows(start, len);
                        let w = match rope_heads(&part, config) {
                            Some(h) => w.map_rows(|t| unpermute_rope_rows(t, h)),
                            None => w,
                        };
                        packed.insert(part, w);
                    }
                    continue;
                }
            }
            let is_table = name == "model.embed_tokens.weight" || name == "lm_head.weight";
            if pack && is_table && info.shape.len() == 2 {
                if let Some(t) =
                    Q8Weight::from_gguf(info.ggml_type, &bytes, info.shape[0], info.shape[1])
                {
                    tables.insert(name, t);
                    continue;
                }
            }
            let values = dequantize(&info.name, info.ggml_type, &bytes, info.numel())?;
            let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
            let whole = Tensor::from_slice(&values).reshape(&shape);
            for (part, start, len) in pieces {
                let t = whole.narrow(0, start, len).contiguous();
                let t = match rope_heads(&part, config) {
                    Some(h) => unpermute_rope_rows(&t, h),
                    None => t,
                };
                tensors.insert(part, t);
            }
        }
        Ok(Self {
            tensors,
            packed,
            tables,
        })
    }

    /// Splits the fused checkpoint tensors of a Hugging Face directory (Phi-3's `qkv_proj` and
    /// `gate_up_proj`) into their parts by rows.
    pub fn split_fused(mut self, config: &ModelConfig) -> Self {
        let fused: Vec<String> = self
            .tensors
            .keys()
            .filter(|n| fused_parts(n, config).is_some())
            .cloned()
            .collect();
        for name in fused {
            let t = self.tensors.remove(&name).expect("listed above");
            for (part, start, len) in fused_parts(&name, config).expect("fused") {
                self.tensors
                    .insert(part, t.narrow(0, start, len).contiguous());
            }
        }
        self
    }

    /// Removes a linear layer's weight, 4-bit or 8-bit when it was kept so, checking its shape.
    pub fn take_linear(&mut self, name: &str, shape: &[i64]) -> Result<LinearWeight, WeightsError> {
        if let Some(w) = self.packed.remove(name) {
            let found = match &w {
                LinearWeight::Int4(w) => vec![w.rows(), w.cols()],
                LinearWeight::Int8(w) => vec![w.rows(), w.cols()],
                LinearWeight::Dense(t) => t.size(),
            };
            check_shape(name, found, shape)?;
            return Ok(w);
        }
        self.take(name, shape).map(LinearWeight::Dense)
    }

    /// Removes an embedding or `lm_head`, Q8_0 when it was kept so, checking its shape.
    pub fn take_table(&mut self, name: &str, shape: &[i64]) -> Result<TableWeight, WeightsError> {
        if let Some(t) = self.tables.remove(name) {
            check_shape(name, vec![t.rows(), t.cols()], shape)?;
            return Ok(TableWeight::Q8(t));
        }
        self.take(name, shape).map(TableWeight::Dense)
    }

    /// Removes a tensor, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[i64]) -> Result<Tensor, WeightsError> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| WeightsError::Missing {
                name: name.to_string(),
            })?;
        check_shape(name, t.size(), shape)?;
        Ok(t)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
            || self.packed.contains_key(name)
            || self.tables.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }
}

/// Reads every tensor of a safetensors file onto the CPU (f32, f16 and bf16 are kept as they are).
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>, WeightsError> {
    let bytes = crate::regular_file::read(path, None).map_err(|source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_safetensors(path, &bytes)
}

/// Every tensor of a safetensors file already read into memory (`path` names it in errors).
pub fn parse_safetensors(path: &Path, bytes: &[u8]) -> Result<Vec<(String, Tensor)>, WeightsError> {
    let st =
        safetensors::SafeTensors::deserialize(bytes).map_err(|e| WeightsError::Safetensors {
            path: path.to_path_buf(),
            message: format!("{e:?}"),
        })?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let kind = match view.dtype() {
            safetensors::Dtype::F32 => Kind::Float,
            safetensors::Dtype::F16 => Kind::Half,
            safetensors::Dtype::BF16 => Kind::BFloat16,
            other => {
                return Err(WeightsError::Dtype {
                    name,
                    dtype: format!("{other:?}"),
                })
            }
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::from_data_size(view.data(), &shape, kind);
        out.push((name, t));
    }
    Ok(out)
}

/// llama.cpp's converter reorders the rows of each Q/K head from HF's rotate-half layout to
/// interleaved pairs; this puts them back: `[heads, 2, d/2] ← [heads, d/2, 2]` per head.
fn unpermute_rope_rows(w: &Tensor, heads: i64) -> Tensor {
    let size = w.size();
    let (rows, cols) = (size[0], size[1]);
    w.reshape([heads, rows / heads / 2, 2, cols])
        .transpose(1, 2)
        .reshape([rows, cols])
}

/// GGUF tensor name → Hugging Face name under `family`'s checkpoint naming (`None` for tensors
/// the model does not use, such as `rope_freqs.weight`, which the configuration reads).
fn hf_name(gguf: &str, family: Family) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let gemma = matches!(family, Family::Gemma2 | Family::Gemma3);
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = part.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        // Llama's norm before the MLP; Gemma's `pre_feedforward_layernorm`.
        "ffn_norm" if gemma => "pre_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "post_attention_norm" => "post_attention_layernorm",
        "post_ffw_norm" => "post_feedforward_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_qkv" => "self_attn.qkv_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        // Phi-3 stores gate|up as one `ffn_up`.
        "ffn_up" if family == Family::Phi3 => "mlp.gate_up_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    if !matches!(kind, "weight" | "bias") {
        return None;
    }
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(heads, 2, d/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let (heads, d, cols) = (3i64, 8i64, 5i64);
        let w = Tensor::arange(heads * d * cols, (Kind::Float, tch::Device::Cpu))
            .reshape([heads * d, cols]);
        let permuted = w
            .reshape([heads, 2, d / 2, cols])
            .transpose(1, 2)
            .reshape([heads * d, cols]);
        let back = unpermute_rope_rows(&permuted, heads);
        assert!(back.equal(&w));
    }

    #[test]
    fn gguf_names_map_to_hf_names() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight", Family::Llama).as_deref(),
            Some("model.layers.12.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name("token_embd.weight", Family::Llama).as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(hf_name("rope_freqs.weight", Family::Llama), None);
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight", Family::Gemma3).as_deref(),
            Some("model.layers.0.pre_feedforward_layernorm.weight")
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight", Family::Qwen2).as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(
            hf_name("blk.3.attn_q.bias", Family::Qwen2).as_deref(),
            Some("model.layers.3.self_attn.q_proj.bias")
        );
        assert_eq!(
            hf_name("blk.1.ffn_up.weight", Family::Phi3).as_deref(),
            Some("model.layers.1.mlp.gate_up_proj.weight")
        );
    }
}
