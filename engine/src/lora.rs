//! LoRA adapters in PEFT's on-disk format, and their unmerged, per-row application in a batch.
//!
//! * [`LoraAdapter::load`] reads `adapter_config.json` + `adapter_model.safetensors` (keys such as
//!   `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`, A `[r, in]`, B `[out, r]`)
//!   and rejects what it cannot apply faithfully (DoRA, trained biases, `modules_to_save`,
//!   unknown targets, wrong shapes).
//! * [`LoraAdapter::place`] shards it like the base model and folds the scaling into B.
//! * [`LoraBatch`] is one decode step's view: for every (layer, projection, shard) the A and B of
//!   the batch's adapters concatenated along the rank (`[R, in]`, `[out, R]`) plus a `[rows, 1, R]`
//!   mask that keeps each row on its own adapter's slice. Each LoRA projection is then two GEMMs
//!   for the whole batch, whatever mix of adapters (and rows with none) it holds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::model::ModelConfig;
use crate::weights::{parse_safetensors, WeightsError};

pub use crate::lora_bank::{LoraBatch, LoraSlice};

/// The seven projections of a Llama block that LoRA may target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::Q,
        Proj::K,
        Proj::V,
        Proj::O,
        Proj::Gate,
        Proj::Up,
        Proj::Down,
    ];

    /// PEFT's module name (`q_proj`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Proj::Q => "q_proj",
            Proj::K => "k_proj",
            Proj::V => "v_proj",
            Proj::O => "o_proj",
            Proj::Gate => "gate_proj",
            Proj::Up => "up_proj",
            Proj::Down => "down_proj",
        }
    }

    /// The module path inside a decoder layer (`self_attn.q_proj`, `mlp.gate_proj`, ...).
    pub fn module(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }

    pub fn from_name(name: &str) -> Option<Proj> {
        Proj::ALL.into_iter().find(|p| p.name() == name)
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// `(in_features, out_features)` in the full (unsharded) model.
    pub fn dims(self, c: &ModelConfig) -> (i64, i64) {
        let h = c.hidden_size as i64;
        let q = (c.num_attention_heads * c.head_dim) as i64;
        let kv = (c.num_key_value_heads * c.head_dim) as i64;
        let i = c.intermediate_size as i64;
        match self {
            Proj::Q => (h, q),
            Proj::K | Proj::V => (h, kv),
            Proj::O => (q, h),
            Proj::Gate | Proj::Up => (h, i),
            Proj::Down => (i, h),
        }
    }

    /// Column-parallel projections split their output; row-parallel ones (o, down) their input.
    fn splits_output(self) -> bool {
        !matches!(self, Proj::O | Proj::Down)
    }
}

/// A module's projections, each with its first row and its rows in the module's output.
pub type Parts = Vec<(Proj, i64, i64)>;

/// A module a PEFT adapter targets: one projection, or a fused checkpoint module (Phi-3's
/// `qkv_proj` and `gate_up_proj`), whose LoRA is one A and one B over the parts' stacked outputs.
/// Tessera applies a fused module's LoRA as one slice per part: the shared A and that part's rows
/// of B, which computes the same delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Module {
    One(Proj),
    Qkv,
    GateUp,
}

impl Module {
    /// PEFT's module name (`q_proj`, `qkv_proj`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Module::One(p) => p.name(),
            Module::Qkv => "qkv_proj",
            Module::GateUp => "gate_up_proj",
        }
    }

    /// The module path inside a decoder layer.
    pub fn path(self) -> &'static str {
        match self {
            Module::One(p) => p.module(),
            Module::Qkv => "self_attn.qkv_proj",
            Module::GateUp => "mlp.gate_up_proj",
        }
    }

    pub fn from_name(name: &str) -> Option<Module> {
        match name {
            "qkv_proj" => Some(Module::Qkv),
            "gate_up_proj" => Some(Module::GateUp),
            _ => Proj::from_name(name).map(Module::One),
        }
    }

    fn from_path(path: &str) -> Option<Module> {
        [Module::Qkv, Module::GateUp]
            .into_iter()
            .chain(Proj::ALL.map(Module::One))
            .find(|m| m.path() == path)
    }

    /// Its projections with the first row and the rows of each in the module's output.
    pub fn parts(self, c: &ModelConfig) -> Parts {
        let mut start = 0;
        let projs: &[Proj] = match self {
            Module::One(p) => return vec![(p, 0, p.dims(c).1)],
            Module::Qkv => &[Proj::Q, Proj::K, Proj::V],
            Module::GateUp => &[Proj::Gate, Proj::Up],
        };
        projs
            .iter()
            .map(|&p| {
                let rows = p.dims(c).1;
                start += rows;
                (p, start - rows, rows)
            })
            .collect()
    }

    /// `(in_features, out_features)` of the whole module.
    pub fn dims(self, c: &ModelConfig) -> (i64, i64) {
        let parts = self.parts(c);
        (parts[0].0.dims(c).0, parts.iter().map(|p| p.2).sum())
    }

    /// The modules a checkpoint has for `projs`: fused ones where the family's checkpoint fuses
    /// them (all of q, k, v, or gate and up, then), one per projection otherwise.
    pub fn for_targets(projs: &[Proj], c: &ModelConfig) -> Vec<Module> {
        if !c.arch.fused_checkpoint_modules {
            return projs.iter().map(|&p| Module::One(p)).collect();
        }
        let mut out = Vec::new();
        for &p in projs {
            let m = match p {
                Proj::Q | Proj::K | Proj::V => Module::Qkv,
                Proj::Gate | Proj::Up => Module::GateUp,
                other => Module::One(other),
            };
            if !out.contains(&m) {
                out.push(m);
            }
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("adapter {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("adapter {path}: invalid adapter_config.json: {message}")]
    Config { path: PathBuf, message: String },
    #[error("adapter {path}: {feature} is not supported")]
    Unsupported { path: PathBuf, feature: String },
    #[error("adapter {path}: unknown target module `{module}` (supported: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, and Phi-3's qkv_proj, gate_up_proj)")]
    UnknownTarget { path: PathBuf, module: String },
    #[error("adapter {path}: unexpected tensor `{key}`")]
    UnexpectedKey { path: PathBuf, key: String },
    #[error("adapter {path}: tensor `{key}` has shape {found:?}, expected {expected:?}")]
    Shape {
        path: PathBuf,
        key: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    #[error("adapter {path}: `{key}` has no matching lora_{missing} tensor")]
    Unpaired {
        path: PathBuf,
        key: String,
        missing: &'static str,
    },
    #[error("adapter {path}: no LoRA weights found")]
    Empty { path: PathBuf },
    #[error("adapter {path}: {source}")]
    Weights { path: PathBuf, source: WeightsError },
}

/// `adapter_config.json`: the fields that change what the adapter computes.
#[derive(Debug, Clone, Deserialize)]
struct PeftConfig {
    #[serde(default)]
    peft_type: Option<String>,
    r: i64,
    lora_alpha: f64,
    target_modules: TargetModules,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    rank_pattern: HashMap<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: HashMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum TargetModules {
    List(Vec<String>),
    One(String),
}

/// Identifies one version of an adapter on disk: an overwritten adapter gets a new key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AdapterKey {
    pub path: PathBuf,
    pub modified: Option<SystemTime>,
    pub len: u64,
}

impl AdapterKey {
    /// The canonical path plus the modification times and sizes of the adapter's two files, which
    /// must be regular files (a link to a device or a FIFO is refused without reading it).
    pub fn of(dir: &Path) -> Result<Self, LoraError> {
        let io = |source| LoraError::Io {
            path: dir.to_path_buf(),
            source,
        };
        let path = dir.canonicalize().map_err(io)?;
        let mut modified = None;
        let mut len = 0;
        for file in ["adapter_config.json", "adapter_model.safetensors"] {
            let meta = std::fs::metadata(path.join(file)).map_err(io)?;
            if !meta.is_file() {
                return Err(not_regular(&path.join(file)));
            }
            len += meta.len();
            modified = modified.max(meta.modified().ok());
        }
        Ok(Self {
            path,
            modified,
            len,
        })
    }
}

/// The largest `adapter_config.json` read (PEFT writes about 1 KB).
const MAX_ADAPTER_CONFIG_BYTES: u64 = 1 << 20;

fn not_regular(path: &Path) -> LoraError {
    LoraError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
    }
}

/// Reads a whole file after checking, on the opened handle, that it is a regular file of at most
/// `max` bytes (so a device, a FIFO or a file swapped in after [`AdapterKey::of`] is never read
/// without end).
fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>, LoraError> {
    use std::io::Read;
    let io = |source| LoraError::Io {
        path: path.to_path_buf(),
        source,
    };
    // Opened without blocking (a FIFO's open would wait for a writer) and checked as opened.
    let (file, size) = match crate::regular_file::open(path, Some(max)) {
        Ok(opened) => opened,
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => return Err(not_regular(path)),
        Err(e) => return Err(io(e)),
    };
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(size).read_to_end(&mut bytes).map_err(io)?;
    Ok(bytes)
}

/// A LoRA adapter as loaded from disk (CPU, float32).
pub struct LoraAdapter {
    pub key: AdapterKey,
    pub rank: i64,
    pub alpha: f64,
    pub use_rslora: bool,
    pub targets: Vec<Proj>,
    /// `weights[layer][proj]` = (A `[r, in]`, B `[out, r]`).
    weights: Vec<[Option<(Tensor, Tensor)>; 7]>,
}

impl std::fmt::Debug for LoraAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraAdapter")
            .field("path", &self.key.path)
            .field("rank", &self.rank)
            .field("alpha", &self.alpha)
            .field("use_rslora", &self.use_rslora)
            .field("targets", &self.targets)
            .finish()
    }
}

impl LoraAdapter {
    /// Loads a PEFT adapter directory and checks it against the model's shapes.
    pub fn load(dir: &Path, model: &ModelConfig) -> Result<Self, LoraError> {
        let key = AdapterKey::of(dir)?;
        let path = key.path.clone();
        let config_path = path.join("adapter_config.json");
        let text = read_regular(&config_path, MAX_ADAPTER_CONFIG_BYTES)?;
        let cfg: PeftConfig = serde_json::from_slice(&text).map_err(|e| LoraError::Config {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let unsupported = |feature: &str| LoraError::Unsupported {
            path: path.clone(),
            feature: feature.to_string(),
        };
        if let Some(t) = cfg.peft_type.as_deref().filter(|t| *t != "LORA") {
            return Err(unsupported(&format!("peft_type `{t}`")));
        }
        if cfg.use_dora {
            return Err(unsupported("DoRA (use_dora)"));
        }
        if cfg.fan_in_fan_out {
            return Err(unsupported("fan_in_fan_out (Conv1D layers)"));
        }
        if let Some(b) = cfg.bias.as_deref().filter(|b| *b != "none") {
            return Err(unsupported(&format!("bias training (bias = `{b}`)")));
        }
        if cfg.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(unsupported("modules_to_save"));
        }
        if !cfg.rank_pattern.is_empty() || !cfg.alpha_pattern.is_empty() {
            return Err(unsupported("rank_pattern / alpha_pattern"));
        }
        if cfg.r <= 0 {
            return Err(LoraError::Config {
                path,
                message: format!("r must be positive, got {}", cfg.r),
            });
        }
        let names = match &cfg.target_modules {
            TargetModules::List(list) => list.clone(),
            TargetModules::One(s) if s == "all-linear" => Module::for_targets(&Proj::ALL, model)
                .iter()
                .map(|m| m.name().to_string())
                .collect(),
            TargetModules::One(s) => vec![s.clone()],
        };
        let mut modules = Vec::new();
        for name in names {
            let module = Module::from_name(&name).ok_or_else(|| LoraError::UnknownTarget {
                path: path.clone(),
                module: name.clone(),
            })?;
            modules.push(module);
        }

        let file = path.join("adapter_model.safetensors");
        if !file.exists() && path.join("adapter_model.bin").exists() {
            return Err(unsupported(
                "adapter_model.bin (pickle); save with safe_serialization=True",
            ));
        }
        // Bounded by the size the key saw: a file that grew since is refused, not read on.
        let bytes = read_regular(&file, key.len)?;
        let tensors = parse_safetensors(&file, &bytes).map_err(|source| LoraError::Weights {
            path: path.clone(),
            source,
        })?;
        let mut weights: Vec<[Option<(Tensor, Tensor)>; 7]> = (0..model.num_hidden_layers)
            .map(|_| Default::default())
            .collect();
        let mut halves: HashMap<(usize, Module), (Option<Tensor>, Option<Tensor>)> = HashMap::new();
        for (name, tensor) in tensors {
            let unexpected = || LoraError::UnexpectedKey {
                path: path.clone(),
                key: name.clone(),
            };
            let (layer, module, is_a) = parse_key(&name).ok_or_else(unexpected)?;
            if layer >= model.num_hidden_layers || !modules.contains(&module) {
                return Err(unexpected());
            }
            let (fan_in, fan_out) = module.dims(model);
            let expected = if is_a {
                vec![cfg.r, fan_in]
            } else {
                vec![fan_out, cfg.r]
            };
            if tensor.size() != expected {
                return Err(LoraError::Shape {
                    path: path.clone(),
                    key: name,
                    expected,
                    found: tensor.size(),
                });
            }
            let slot = halves.entry((layer, module)).or_default();
            let t = tensor.to_kind(Kind::Float);
            if is_a {
                slot.0 = Some(t);
            } else {
                slot.1 = Some(t);
            }
        }
        if halves.is_empty() {
            return Err(LoraError::Empty { path });
        }
        let mut targets = Vec::new();
        for ((layer, module), pair) in halves {
            let key = format!("layers.{layer}.{}", module.path());
            match pair {
                (Some(a), Some(b)) => {
                    for (proj, start, rows) in module.parts(model) {
                        weights[layer][proj.index()] =
                            Some((a.shallow_clone(), b.narrow(0, start, rows)));
                        if !targets.contains(&proj) {
                            targets.push(proj);
                        }
                    }
                }
                (Some(_), None) => {
                    return Err(LoraError::Unpaired {
                        path,
                        key,
                        missing: "B",
                    })
                }
                (None, _) => {
                    return Err(LoraError::Unpaired {
                        path,
                        key,
                        missing: "A",
                    })
                }
            }
        }
        Ok(Self {
            key,
            rank: cfg.r,
            alpha: cfg.lora_alpha,
            use_rslora: cfg.use_rslora,
            targets,
            weights,
        })
    }

    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// Shards the adapter like a model on `devices` and moves it there in `kind`, scaling folded
    /// into B.
    pub fn place(&self, devices: &[Device], kind: Kind) -> PlacedAdapter {
        let tp = devices.len() as i64;
        let scale = self.scale();
        let mut bytes = 0i64;
        let layers = self
            .weights
            .iter()
            .map(|projs| {
                std::array::from_fn(|p| {
                    let (a, b) = projs[p].as_ref()?;
                    let proj = Proj::ALL[p];
                    let shards = devices
                        .iter()
                        .enumerate()
                        .map(|(s, &dev)| {
                            let s = s as i64;
                            let (a_s, b_s) = if proj.splits_output() {
                                let n = b.size()[0] / tp;
                                (a.shallow_clone(), b.narrow(0, s * n, n))
                            } else {
                                let n = a.size()[1] / tp;
                                (a.narrow(1, s * n, n), b.shallow_clone())
                            };
                            let place = |t: Tensor| t.to_kind(kind).to_device(dev).contiguous();
                            let pair = (place(a_s), place(b_s * scale));
                            bytes += (pair.0.numel() + pair.1.numel()) as i64
                                * kind.elt_size_in_bytes() as i64;
                            pair
                        })
                        .collect();
                    Some(shards)
                })
            })
            .collect();
        PlacedAdapter {
            key: self.key.clone(),
            rank: self.rank,
            layers,
            bytes: bytes as u64,
        }
    }
}

/// `base_model.model.model.layers.{L}.{self_attn|mlp}.{module}.lora_{A|B}.weight` → (L, module,
/// is_A).
fn parse_key(key: &str) -> Option<(usize, Module, bool)> {
    let rest = key.strip_prefix("base_model.model.model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    let (module, tail) = rest.rsplit_once(".lora_")?;
    let is_a = match tail {
        "A.weight" => true,
        "B.weight" => false,
        _ => return None,
    };
    Some((layer, Module::from_path(module)?, is_a))
}

/// (A, B × scale) of one projection, one pair per shard.
type ShardedPair = Vec<(Tensor, Tensor)>;

/// An adapter on the model's devices: `layers[layer][proj]` = per shard (A, B × scale).
pub struct PlacedAdapter {
    pub key: AdapterKey,
    pub rank: i64,
    pub(crate) layers: Vec<[Option<ShardedPair>; 7]>,
    /// Device memory held.
    pub bytes: u64,
}

// SAFETY: a placed adapter's tensors are written once, in `place`, and only read afterwards (as
// matmul operands, or copied by `LoraBatch`); libtorch allows concurrent reads of a tensor. Sharing
// is needed to hand the adapter from the loader thread to the engine thread inside an `Arc`.
unsafe impl Sync for PlacedAdapter {}

/// Dropout whose mask is a hash of (seed, row, column): reproducible, identical when a layer is
/// recomputed or a run resumed, and free of torch's process-global RNG (which concurrent trainers
/// would share). Rows and columns (the last dimension) get 32-bit keys from a strong hash of
/// (seed, index) over two short vectors; each element mixes its row's and column's keys with two
/// xorshift-multiply rounds in wrapping int32 arithmetic, then compares against `p`: about ten
/// int32 passes over the input (where hashing every element in int64 took ~20 int64 passes and
/// was ~15x slower).
pub fn hashed_dropout(x: &Tensor, p: f64, seed: u64) -> Tensor {
    let size = x.size();
    let cols = size.last().copied().unwrap_or(1).max(1);
    let rows = (x.numel() as i64 / cols).max(1);
    let device = x.device();
    let row_key = key32(rows, seed, device).view([rows, 1]);
    let col_key = key32(cols, seed.rotate_left(32) ^ 0x9E37_79B9_7F4A_7C15, device).view([1, cols]);
    let mut h = row_key.bitwise_xor_tensor(&col_key);
    // lowbias32's rounds (constants 0x7feb352d, 0x846ca68b), logical shifts as shift + mask.
    for (shift, mul) in [(16, 0x7feb_352d_i64), (15, 0x846c_a68b_i64 - (1 << 32))] {
        let mut high = h.bitwise_right_shift_tensor_scalar(shift);
        let _ = high.bitwise_and_((1_i64 << (32 - shift)) - 1);
        let _ = h.bitwise_xor_tensor_(&high);
        h *= mul;
    }
    // `h` is uniform over the int32 range: drop where it falls in the lowest fraction `p`.
    let threshold = i32::MIN as i64 + (p * 4_294_967_296.0) as i64;
    let drop = h.lt(threshold).view(size.as_slice());
    (x * (1.0 / (1.0 - p))).masked_fill_(&drop, 0.0)
}

/// 32-bit keys (as int32) of `0..n` under `seed`: three xorshift-multiply rounds in int64 over a
/// short vector, so full-strength mixing costs nothing next to the input.
fn key32(n: i64, seed: u64, device: Device) -> Tensor {
    const LOW: i64 = 0xffff_ffff;
    let mut h = Tensor::arange(n, (Kind::Int64, device));
    h = (h + (seed & 0xffff_ffff) as i64).bitwise_and(LOW);
    for round in 0..3 {
        h = h.bitwise_xor_tensor(&h.bitwise_right_shift_tensor_scalar(16));
        h = (h * 0x045d_9f3b_i64).bitwise_and(LOW);
        if round == 0 {
            h = h.bitwise_xor((seed >> 32) as i64);
        }
    }
    h = h.bitwise_xor_tensor(&h.bitwise_right_shift_tensor_scalar(16));
    (h - (1_i64 << 31)).to_kind(Kind::Int)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_keys_parse() {
        assert_eq!(
            parse_key("base_model.model.model.layers.7.mlp.down_proj.lora_B.weight"),
            Some((7, Module::One(Proj::Down), false))
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
            Some((0, Module::One(Proj::Q), true))
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.2.self_attn.qkv_proj.lora_B.weight"),
            Some((2, Module::Qkv, false))
        );
        assert_eq!(
            parse_key("model.layers.0.self_attn.q_proj.lora_A.weight"),
            None
        );
        assert_eq!(
            parse_key("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"),
            None
        );
    }

    /// The dropped fraction of `y = hashed_dropout(ones)`, per row and per column.
    fn dropped(y: &Tensor) -> (Tensor, Tensor) {
        let m = y.eq(0.0).to_kind(Kind::Float);
        (
            m.mean_dim(1, false, Kind::Float),
            m.mean_dim(0, false, Kind::Float),
        )
    }

    #[test]
    fn hashed_dropout_is_a_seeded_bernoulli_mask() {
        let x = Tensor::ones([1024, 576], (Kind::Float, Device::Cpu));
        let p = 0.1;
        let y = hashed_dropout(&x, p, 0x1234_5678_9abc_def0);
        // Kept values are scaled by 1 / (1 - p); the rest are zero.
        let kept = y.ne(0.0);
        let scaled = y.masked_select(&kept);
        assert!((scaled - 1.0 / (1.0 - p)).abs().max().double_value(&[]) < 1e-6);
        let frac = y
            .eq(0.0)
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        assert!((frac - p).abs() < 0.005, "dropped {frac}");
        // Rows and columns are each dropped at rate p (no stripes): binomial spread only.
        let (rows, cols) = dropped(&y);
        let (row_max, col_max) = (
            (rows - p).abs().max().double_value(&[]),
            (cols - p).abs().max().double_value(&[]),
        );
        assert!(row_max < 0.07 && col_max < 0.06, "{row_max} {col_max}");
        // The same seed repeats the mask exactly (recompute, resume); another seed (high or low
        // half) gives another mask; the leading dimensions fold into rows.
        let again = hashed_dropout(&x.view([4, 256, 576]), p, 0x1234_5678_9abc_def0);
        assert!(again.view([1024, 576]).equal(&y));
        for other in [0x1234_5678_9abc_def1, 0x1234_5679_9abc_def0] {
            let z = hashed_dropout(&x, p, other);
            let both = y.eq(0.0).logical_and(&z.eq(0.0)).to_kind(Kind::Float);
            let overlap = both.mean(Kind::Float).double_value(&[]);
            // Independent masks overlap on p² of the elements.
            assert!((overlap - p * p).abs() < 0.003, "overlap {overlap}");
        }
    }

    #[test]
    fn hashed_dropout_masks_of_neighbouring_rows_are_independent() {
        let x = Tensor::ones([64, 4096], (Kind::Float, Device::Cpu));
        let p = 0.5;
        let m = hashed_dropout(&x, p, 7).eq(0.0).to_kind(Kind::Float);
        // Agreement between row i and row i + 1 (and column j and j + 1) is ~50% for independent
        // masks at p = 0.5.
        let rows = m.narrow(0, 0, 63).eq_tensor(&m.narrow(0, 1, 63));
        let cols = m.narrow(1, 0, 4095).eq_tensor(&m.narrow(1, 1, 4095));
        for agree in [rows, cols] {
            let a = agree
                .to_kind(Kind::Float)
                .mean(Kind::Float)
                .double_value(&[]);
            assert!((a - 0.5).abs() < 0.01, "agreement {a}");
        }
    }
}
