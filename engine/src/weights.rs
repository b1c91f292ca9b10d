//! Model weights by Hugging Face name, loaded on the CPU from a safetensors model directory (one
//! file or shards with `model.safetensors.index.json`) or from a GGUF file (dequantised, with
//! llama.cpp's Q/K row permutation undone), then taken one by one with their shape checked.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use crate::dequant::{dequantize, DequantError};
use crate::gguf::{GgufError, GgufFile};
use crate::model::ModelConfig;
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
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ]
    .iter()
    .any(|p| name.ends_with(p))
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
            let text = std::fs::read_to_string(&index).map_err(|source| WeightsError::Io {
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
    /// with `pack`, the Q4_0 / Q4_1 / Q4_K projections, kept 4-bit, and the Q8_0 ones, kept 8-bit
    /// ([`WeightMap::take_linear`]),
    /// and a Q8_0 embedding or `lm_head`, kept 8-bit ([`WeightMap::take_table`]).
    pub fn from_gguf(g: &GgufFile, config: &ModelConfig, pack: bool) -> Result<Self, WeightsError> {
        let mut tensors = HashMap::new();
        let mut packed = HashMap::new();
        let mut tables = HashMap::new();
        for info in &g.tensors {
            let Some(name) = hf_name(&info.name) else {
                tracing::debug!(tensor = %info.name, "GGUF tensor not used by the model");
                continue;
            };
            let bytes = g.read_tensor_bytes(info)?;
            let heads = if name.ends_with("self_attn.q_proj.weight") {
                Some(config.num_attention_heads as i64)
            } else if name.ends_with("self_attn.k_proj.weight") {
                Some(config.num_key_value_heads as i64)
            } else {
                None
            };
            if pack && is_projection(&name) && info.shape.len() == 2 {
                let (rows, cols) = (info.shape[0], info.shape[1]);
                let unpermute = |t: &Tensor| match heads {
                    Some(h) => unpermute_rope_rows(t, h),
                    None => t.shallow_clone(),
                };
                let kept =
                    if let Some(w) = Int4Weight::from_gguf(info.ggml_type, &bytes, rows, cols) {
                        Some(LinearWeight::Int4(w.map_rows(unpermute)))
                    } else {
                        Q8Weight::from_gguf(info.ggml_type, &bytes, rows, cols)
                            .map(|w| LinearWeight::Int8(w.map_rows(unpermute)))
                    };
                if let Some(w) = kept {
                    packed.insert(name, w);
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
            let mut t = Tensor::from_slice(&values).reshape(&shape);
            if name.ends_with("self_attn.q_proj.weight") {
                t = unpermute_rope_rows(&t, config.num_attention_heads as i64);
            } else if name.ends_with("self_attn.k_proj.weight") {
                t = unpermute_rope_rows(&t, config.num_key_value_heads as i64);
            }
            tensors.insert(name, t);
        }
        Ok(Self {
            tensors,
            packed,
            tables,
        })
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
    let bytes = std::fs::read(path).map_err(|source| WeightsError::Io {
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

/// GGUF tensor name → Hugging Face name (`None` for tensors the model does not use).
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
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
            hf_name("blk.12.attn_q.weight").as_deref(),
            Some("model.layers.12.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }
}
