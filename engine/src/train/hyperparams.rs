//! A fine-tune job's input: where the data and output are, and the hyperparameters with the names
//! and defaults `POST /fine-tune` takes. Unknown or out-of-range fields are errors naming the field.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::lora::{Module, Proj};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrScheduler {
    Linear,
    Cosine,
    Constant,
}

/// How the frozen base holds a GGUF file's 4-bit weights while training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseQuantization {
    /// Dequantised to float at load (the whole base dense in memory).
    #[default]
    Dequantize,
    /// Kept 4-bit and dequantised one layer at a time as forward and backward reach it (QLoRA's
    /// way): the base takes about a fifth of the memory. Needs a GGUF base with Q4_0, Q4_1 or
    /// Q4_K projections, and implies gradient checkpointing.
    Packed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Hyperparameters {
    pub lora_r: i64,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
    pub learning_rate: f64,
    pub num_epochs: usize,
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub max_seq_length: usize,
    /// Mixed precision on GPUs (bf16 base, f32 LoRA); ignored with a log line on the CPU.
    pub fp16: bool,
    pub gradient_checkpointing: bool,
    /// `"dequantize"` (default) or `"packed"` (QLoRA: the base stays 4-bit).
    pub base_quantization: BaseQuantization,
    pub warmup_ratio: f64,
    pub lr_scheduler: LrScheduler,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
    pub eval_fraction: f64,
    /// Checkpoint every this many optimizer steps (0: only at the end).
    pub save_every_steps: usize,
    /// Keep only the newest this many `checkpoint-<step>/` directories (0: keep all).
    pub save_total_limit: usize,
    /// Skip (and count) invalid dataset lines instead of failing the job.
    pub skip_invalid: bool,
}

impl Default for Hyperparameters {
    fn default() -> Self {
        Self {
            lora_r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            target_modules: Proj::ALL.iter().map(|p| p.name().to_string()).collect(),
            use_rslora: false,
            learning_rate: 2e-4,
            num_epochs: 3,
            batch_size: 4,
            gradient_accumulation_steps: 4,
            max_seq_length: 512,
            fp16: true,
            gradient_checkpointing: true,
            base_quantization: BaseQuantization::Dequantize,
            warmup_ratio: 0.03,
            lr_scheduler: LrScheduler::Linear,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            seed: 42,
            eval_fraction: 0.0,
            save_every_steps: 0,
            save_total_limit: 3,
            skip_invalid: false,
        }
    }
}

/// Upper bounds that keep a job's size sane (a typo must not queue a job for years).
pub const MAX_EPOCHS: usize = 10_000;
pub const MAX_BATCH_SIZE: usize = 4096;
pub const MAX_SEQ_LENGTH: usize = 1 << 20;
/// The most optimizer steps one job may take (`num_epochs` x steps per epoch).
pub const MAX_TOTAL_STEPS: usize = 10_000_000;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid hyperparameter `{field}`: {message}")]
pub struct HyperparameterError {
    pub field: String,
    pub message: String,
}

/// The largest `lora_alpha` a job may ask for (4 × the largest `lora_r`).
pub const MAX_LORA_ALPHA: f64 = 4096.0;

impl Hyperparameters {
    /// Parses JSON, refusing unknown fields by name.
    pub fn from_json(value: serde_json::Value) -> Result<Self, HyperparameterError> {
        let h: Self = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            // serde names the unknown field in its message: surface it as the field.
            let field = inner
                .strip_prefix("unknown field `")
                .and_then(|r| r.split('`').next())
                .map(str::to_string)
                .unwrap_or(path);
            HyperparameterError {
                field,
                message: inner,
            }
        })?;
        h.validate()?;
        Ok(h)
    }

    pub fn validate(&self) -> Result<(), HyperparameterError> {
        let err = |field: &str, message: String| {
            Err(HyperparameterError {
                field: field.to_string(),
                message,
            })
        };
        if !(1..=1024).contains(&self.lora_r) {
            return err(
                "lora_r",
                format!("must be in 1..=1024, got {}", self.lora_r),
            );
        }
        // The adapter's scale is alpha / r (or / sqrt(r)): PEFT's configurations stay near 2r, and
        // a scale in the thousands only makes a run diverge.
        if !(self.lora_alpha > 0.0 && self.lora_alpha <= MAX_LORA_ALPHA) {
            return err(
                "lora_alpha",
                format!("must be in (0, {MAX_LORA_ALPHA}], got {}", self.lora_alpha),
            );
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return err(
                "lora_dropout",
                format!("must be in [0, 1), got {}", self.lora_dropout),
            );
        }
        if self.target_modules.is_empty() {
            return err("target_modules", "must name at least one module".into());
        }
        for m in &self.target_modules {
            if Module::from_name(m).is_none() {
                return err(
                    "target_modules",
                    format!("unknown module `{m}` (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; Phi-3's qkv_proj, gate_up_proj)"),
                );
            }
        }
        if !(self.learning_rate > 0.0 && self.learning_rate < 1.0) {
            return err(
                "learning_rate",
                format!("must be in (0, 1), got {}", self.learning_rate),
            );
        }
        for (field, v, max) in [
            ("num_epochs", self.num_epochs, MAX_EPOCHS),
            ("batch_size", self.batch_size, MAX_BATCH_SIZE),
            (
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps,
                MAX_BATCH_SIZE,
            ),
        ] {
            if !(1..=max).contains(&v) {
                return err(field, format!("must be in 1..={max}, got {v}"));
            }
        }
        if !(2..=MAX_SEQ_LENGTH).contains(&self.max_seq_length) {
            return err(
                "max_seq_length",
                format!(
                    "must be in 2..={MAX_SEQ_LENGTH} (and within the model's context), got {}",
                    self.max_seq_length
                ),
            );
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return err(
                "warmup_ratio",
                format!("must be in [0, 1), got {}", self.warmup_ratio),
            );
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return err(
                "weight_decay",
                format!("must be >= 0, got {}", self.weight_decay),
            );
        }
        if !(self.max_grad_norm >= 0.0 && self.max_grad_norm.is_finite()) {
            return err(
                "max_grad_norm",
                format!("must be >= 0 (0: no clipping), got {}", self.max_grad_norm),
            );
        }
        if !(0.0..0.5).contains(&self.eval_fraction) {
            return err(
                "eval_fraction",
                format!("must be in [0, 0.5), got {}", self.eval_fraction),
            );
        }
        Ok(())
    }

    /// The projections `target_modules` names (a fused module's name stands for its parts).
    pub fn targets(&self) -> Vec<Proj> {
        let named = |p: Proj| {
            self.target_modules
                .iter()
                .any(|m| match Module::from_name(m) {
                    Some(Module::One(q)) => q == p,
                    Some(Module::Qkv) => matches!(p, Proj::Q | Proj::K | Proj::V),
                    Some(Module::GateUp) => matches!(p, Proj::Gate | Proj::Up),
                    None => false,
                })
        };
        Proj::ALL.into_iter().filter(|&p| named(p)).collect()
    }

    /// LoRA's multiplier: alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.lora_r as f64).sqrt()
        } else {
            self.lora_alpha / self.lora_r as f64
        }
    }
}

/// One fine-tune job, as `POST /fine-tune` and `tessera train` describe it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainJob {
    pub dataset_path: PathBuf,
    pub output_path: PathBuf,
    #[serde(default)]
    pub base_model: Option<PathBuf>,
    #[serde(default)]
    pub hyperparameters: Hyperparameters,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_are_the_documented_ones() {
        let h = Hyperparameters::from_json(json!({})).unwrap();
        assert_eq!(
            (h.lora_r, h.lora_alpha, h.num_epochs, h.batch_size),
            (16, 32.0, 3, 4)
        );
        assert_eq!(h.targets().len(), 7);
        assert_eq!(h.save_total_limit, 3);
        assert_eq!(h.scale(), 2.0);
    }

    #[test]
    fn errors_name_the_field() {
        for (value, field) in [
            (json!({"lora_rank": 8}), "lora_rank"),
            (json!({"lora_r": 0}), "lora_r"),
            (json!({"lora_alpha": 1e30}), "lora_alpha"),
            (json!({"lora_alpha": 0}), "lora_alpha"),
            (json!({"learning_rate": -1.0}), "learning_rate"),
            (json!({"batch_size": "four"}), "batch_size"),
            (
                json!({"target_modules": ["q_proj", "lm_head"]}),
                "target_modules",
            ),
            (json!({"lr_scheduler": "step"}), "lr_scheduler"),
            (json!({"eval_fraction": 0.9}), "eval_fraction"),
            (json!({"num_epochs": 1_000_000_000u64}), "num_epochs"),
            (json!({"batch_size": 1u64 << 40}), "batch_size"),
            (json!({"max_seq_length": usize::MAX}), "max_seq_length"),
        ] {
            let e = Hyperparameters::from_json(value.clone()).unwrap_err();
            assert_eq!(e.field, field, "{value}: {e}");
        }
    }
}
