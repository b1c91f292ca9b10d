//! Opens a model path — a Hugging Face directory or a GGUF file — into a [`Llama`] placed on its
//! devices and the matching [`Tokenizer`]. Also picks the runtime dtype for a device.

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::gguf::{GgmlType, GgufError, GgufFile};
use crate::model::{ConfigError, ModelConfig};
use crate::model::{Model, ModelError};
use crate::packed::Int4Mode;
use crate::tokenizer::{Tokenizer, TokenizerError};
use crate::weights::{WeightMap, WeightsError};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model path {0} does not exist")]
    NotFound(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file and not a directory with config.json")]
    UnknownFormat { path: PathBuf },
    #[error("{path}: {source}")]
    Config { path: PathBuf, source: ConfigError },
    #[error("{path}: a packed base needs a GGUF file with Q4_0, Q4_1 or Q4_K projections; this model has none")]
    NothingPacked { path: PathBuf },
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// What [`load`] returns.
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// A short name for logs and `/v1/models` (the directory or file stem).
    pub name: String,
    /// The dtype it runs in and how that was chosen (for logs and `/cluster`).
    pub dtype: String,
    /// How its weights are held (4-bit, 8-bit, dequantised) and their size (for `/cluster`).
    pub weights: String,
}

/// The dtype Tessera runs on `device` with: float32 on the CPU (its bf16 GEMM is very slow),
/// bfloat16 on CUDA.
pub fn default_kind(device: Device) -> Kind {
    match device {
        Device::Cpu => Kind::Float,
        _ => Kind::BFloat16,
    }
}

/// The dtype to serve with on `device` when the configuration says `auto`, and why: bfloat16 on
/// CUDA; on the CPU, bfloat16 only where a short probe measures its GEMM faster than float32's at
/// a batched decode's shape (CPUs with AMX or AVX512-BF16 units; elsewhere bf16 is far slower).
/// The probe runs once per process.
pub fn auto_kind(device: Device) -> (Kind, String) {
    if device != Device::Cpu {
        return (Kind::BFloat16, "bfloat16 (auto: CUDA)".into());
    }
    static PROBE: std::sync::OnceLock<(Kind, String)> = std::sync::OnceLock::new();
    PROBE.get_or_init(probe_cpu_bf16).clone()
}

/// Times `linear` of a `[32, 576]` input by a `[1536, 576]` weight (an MLP projection of a small
/// model at 32 rows) in float32 and bfloat16: the best of a few runs after a warm-up.
fn probe_cpu_bf16() -> (Kind, String) {
    let _guard = tch::no_grad_guard();
    let best = |kind: Kind| {
        let x = Tensor::randn([32, 576], (Kind::Float, Device::Cpu)).to_kind(kind);
        let w = Tensor::randn([1536, 576], (Kind::Float, Device::Cpu)).to_kind(kind);
        let mut best = f64::INFINITY;
        for i in 0..6 {
            let started = std::time::Instant::now();
            let y = x.linear::<Tensor>(&w, None);
            let _ = y.size();
            if i > 0 {
                best = best.min(started.elapsed().as_secs_f64());
            }
        }
        best
    };
    let f32_s = best(Kind::Float);
    let bf16_s = best(Kind::BFloat16);
    let ratio = f32_s / bf16_s;
    let kind = if ratio > 1.25 {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    let reason = format!(
        "{} (auto: bf16 GEMM probe {:.2}x float32 on this CPU)",
        if kind == Kind::Float {
            "float32"
        } else {
            "bfloat16"
        },
        ratio
    );
    tracing::info!(f32_us = f32_s * 1e6, bf16_us = bf16_s * 1e6, choice = %reason, "CPU dtype probe");
    (kind, reason)
}

/// How a GGUF file's 4-bit weights are held (`model.quantization`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    /// Dequantised to the model's dtype at load (the reference path).
    #[default]
    Dequantize,
    /// Q4_0 / Q4_1 / Q4_K projections stay 4-bit (and Q8_0 ones 8-bit on the CPU) on CPU
    /// devices (Tessera's integer kernel or torch's int4 kernel, whichever a probe measures
    /// faster) or CUDA devices (torch's CUDA int4 kernel), a tensor parallel model's shards each
    /// packed; other types, and shards whose columns split a 32-column group, are dequantised
    /// (the weights line of the log and `/cluster` counts the projections kept packed).
    Packed,
    /// On CPUs, packed when a kernel measures faster than the float matmul at decode here; on
    /// CUDA devices, packed.
    Auto,
}

/// Loads the model at `path` onto `devices` (tensor parallel over them) in `kind`
/// (`None`: [`auto_kind`] of the first device), its 4-bit weights dequantised.
pub fn load(path: &Path, devices: &[Device], kind: Option<Kind>) -> Result<LoadedModel, LoadError> {
    load_with(path, devices, kind, Quantization::Dequantize)
}

/// [`load`], with the 4-bit weights held as `quantization` says.
pub fn load_with(
    path: &Path,
    devices: &[Device],
    kind: Option<Kind>,
    quantization: Quantization,
) -> Result<LoadedModel, LoadError> {
    load_holding(path, devices, kind, || {
        let all_cpu = devices.iter().all(|d| *d == Device::Cpu);
        let all_cuda = devices.iter().all(|d| d.is_cuda());
        if quantization != Quantization::Dequantize && !all_cpu && !all_cuda {
            tracing::warn!(devices = ?devices, ?quantization, "packed 4-bit weights run on CPU devices or CUDA ones, not on a mix; dequantising");
        }
        match quantization {
            Quantization::Dequantize => Int4Mode::Dense,
            // torch's CUDA int4 kernel takes bfloat16 activations; where it exists it is used
            // (decode on a GPU is bound by reading weights).
            _ if all_cuda => Int4Mode::Kernel(Kind::BFloat16),
            _ if !all_cpu => Int4Mode::Dense,
            Quantization::Packed => crate::packed::probe().best().0,
            Quantization::Auto => crate::packed::probe()
                .packed_if_faster()
                .unwrap_or(Int4Mode::Dense),
        }
    })
}

/// A base model for fine-tuning on `device`: with `packed_base`, a GGUF file's 4-bit projections
/// stay 4-bit and are dequantised one layer at a time as training uses them (QLoRA); an error when
/// it has none.
pub fn load_for_training(
    path: &Path,
    device: Device,
    kind: Option<Kind>,
    packed_base: bool,
) -> Result<LoadedModel, LoadError> {
    let mode = if packed_base {
        Int4Mode::PerUse
    } else {
        Int4Mode::Dense
    };
    let loaded = load_holding(path, &[device], kind, || mode)?;
    if packed_base && loaded.model.weight_bytes().1 == 0 {
        return Err(LoadError::NothingPacked {
            path: path.to_path_buf(),
        });
    }
    Ok(loaded)
}

/// Loads a safetensors directory or a GGUF file; `int4` says how a GGUF's 4-bit weights are held
/// (called for GGUF files only).
fn load_holding(
    path: &Path,
    devices: &[Device],
    kind: Option<Kind>,
    int4: impl FnOnce() -> Int4Mode,
) -> Result<LoadedModel, LoadError> {
    if !path.exists() {
        return Err(LoadError::NotFound(path.to_path_buf()));
    }
    let (kind, dtype) = match kind {
        Some(kind) => (kind, format!("{kind:?} (configured)")),
        None => auto_kind(devices.first().copied().unwrap_or(Device::Cpu)),
    };
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let started = std::time::Instant::now();
    let mut mode = Int4Mode::Dense;
    let (weights, config, tokenizer) = if path.is_dir() {
        let config_path = path.join("config.json");
        if !config_path.exists() {
            return Err(LoadError::UnknownFormat {
                path: path.to_path_buf(),
            });
        }
        let text = crate::regular_file::read_to_string(
            &config_path,
            Some(crate::regular_file::MAX_JSON_BYTES),
        )
        .map_err(|source| LoadError::Io {
            path: config_path.clone(),
            source,
        })?;
        let config = ModelConfig::from_hf_json(&text).map_err(|source| LoadError::Config {
            path: config_path,
            source,
        })?;
        let tokenizer = Tokenizer::from_hf_dir(path, &config.eos_token_ids)?;
        (
            WeightMap::from_safetensors_dir(path)?.split_fused(&config),
            config,
            tokenizer,
        )
    } else if is_gguf(path)? {
        let g = GgufFile::open(path)?;
        let config = ModelConfig::from_gguf(&g).map_err(|source| LoadError::Config {
            path: path.to_path_buf(),
            source,
        })?;
        let tokenizer = Tokenizer::from_gguf(&g)?;
        mode = int4();
        (
            WeightMap::from_gguf(&g, &config, mode != Int4Mode::Dense)?,
            config,
            tokenizer,
        )
    } else {
        return Err(LoadError::UnknownFormat {
            path: path.to_path_buf(),
        });
    };
    let model = Model::load(weights, config, devices, kind, mode)?;
    let (weight_bytes, packed, projections) = model.weight_bytes();
    let weights = describe_weights(&model, mode, weight_bytes, packed, projections);
    tracing::info!(
        model = %path.display(),
        tp = devices.len(),
        kind = ?kind,
        weight_mib = weight_bytes >> 20,
        packed_projections = packed,
        projections,
        weights = %weights,
        layers = model.config().num_hidden_layers,
        load_ms = started.elapsed().as_millis() as u64,
        "model loaded"
    );
    Ok(LoadedModel {
        model,
        tokenizer,
        name,
        dtype,
        weights,
    })
}

/// How the weights are held, for logs and `/cluster`: e.g. "93 MiB: 120/120 projections 4-bit
/// (int4 kernel, BFloat16 activations), embedding Q8_0" or "513 MiB, dequantised".
fn describe_weights(
    model: &Model,
    mode: Int4Mode,
    bytes: u64,
    packed: usize,
    projections: usize,
) -> String {
    let mib = bytes >> 20;
    if packed == 0 {
        return match mode {
            Int4Mode::Dense => format!("{mib} MiB, dequantised"),
            _ => format!(
                "{mib} MiB, dequantised (no Q4_0/Q4_1/Q4_K/Q8_0 projection could stay packed)"
            ),
        };
    }
    let eight = model.eight_bit_projections();
    let bits = match (packed - eight, eight) {
        (_, 0) => "4-bit".to_string(),
        (0, _) => "8-bit".to_string(),
        (four, eight) => format!("packed ({four} 4-bit, {eight} 8-bit)"),
    };
    let how = match mode {
        _ if eight == packed => "integer kernel, 16-bit activations".to_string(),
        Int4Mode::Kernel(act) if model.main_device().is_cuda() => {
            format!("CUDA int4 kernel, {act:?} activations")
        }
        Int4Mode::Kernel(act) => format!("int4 kernel, {act:?} activations"),
        Int4Mode::IntDot => "integer kernel, 16-bit activations".to_string(),
        _ => "dequantised per layer as used".to_string(),
    };
    let table = if model.has_q8_embedding() {
        "embedding Q8_0"
    } else {
        "embedding float"
    };
    let rest = if packed < projections {
        format!("; the other {} dequantised", projections - packed)
    } else {
        String::new()
    };
    let shards = match model.tensor_parallel() {
        1 => String::new(),
        tp => format!(" (tensor parallel: each projection counted once per shard, {tp} shards)"),
    };
    format!("{mib} MiB: {packed}/{projections} projections {bits} ({how}), {table}{rest}{shards}")
}

/// Reads only the model's configuration (no weights, no tokenizer): what a caller checks a request
/// against (the context length) before queueing work on the model.
pub fn read_config(path: &Path) -> Result<ModelConfig, LoadError> {
    if !path.exists() {
        return Err(LoadError::NotFound(path.to_path_buf()));
    }
    if path.is_dir() {
        let config_path = path.join("config.json");
        let text = crate::regular_file::read_to_string(
            &config_path,
            Some(crate::regular_file::MAX_JSON_BYTES),
        )
        .map_err(|source| LoadError::Io {
            path: config_path.clone(),
            source,
        })?;
        ModelConfig::from_hf_json(&text).map_err(|source| LoadError::Config {
            path: config_path,
            source,
        })
    } else if is_gguf(path)? {
        let g = GgufFile::open(path)?;
        ModelConfig::from_gguf(&g).map_err(|source| LoadError::Config {
            path: path.to_path_buf(),
            source,
        })
    } else {
        Err(LoadError::UnknownFormat {
            path: path.to_path_buf(),
        })
    }
}

/// How many of a model's layer weights are Q4_0, Q4_1 or Q4_K (what a packed base keeps 4-bit),
/// from the GGUF header alone; 0 for a safetensors directory.
pub fn four_bit_layer_weights(path: &Path) -> Result<usize, LoadError> {
    if !path.exists() {
        return Err(LoadError::NotFound(path.to_path_buf()));
    }
    if path.is_dir() || !is_gguf(path)? {
        return Ok(0);
    }
    let g = GgufFile::open(path)?;
    Ok(g.tensors
        .iter()
        .filter(|t| t.name.starts_with("blk.") && t.shape.len() == 2)
        .filter(|t| matches!(t.ggml_type, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4K))
        .count())
}

fn is_gguf(path: &Path) -> Result<bool, LoadError> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let (mut f, _) = crate::regular_file::open(path, None).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(f.read_exact(&mut magic).is_ok() && &magic == b"GGUF")
}

/// Parses a device list such as `cpu`, `cpu,cpu`, `cuda:0,cuda:1`.
pub fn parse_devices(spec: &str) -> Result<Vec<Device>, String> {
    spec.split(',')
        .map(|d| match d.trim() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown device `{other}` (use cpu, cuda or cuda:N)")),
        })
        .collect()
}
