//! The shape of a Llama-family model, read from a Hugging Face `config.json` or from GGUF metadata,
//! resolved into one runtime [`LlamaConfig`] with every default filled in.

use serde::Deserialize;

use crate::gguf::GgufFile;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config.json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("GGUF metadata: {0}")]
    Gguf(#[from] crate::gguf::GgufError),
    #[error("unsupported architecture `{0}` (supported: llama, mistral without sliding window)")]
    Architecture(String),
    #[error("config field `{field}`: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

/// The runtime configuration of a Llama-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// `config.json` as Hugging Face writes it (the fields a Llama decoder needs).
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    /// transformers < 5.
    #[serde(default)]
    rope_theta: Option<f64>,
    /// transformers 5: `rope_parameters: {rope_type, rope_theta}`.
    #[serde(default)]
    rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    bos_token_id: Option<u32>,
    #[serde(default)]
    eos_token_id: Option<OneOrMany>,
    #[serde(default)]
    sliding_window: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct RopeParameters {
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_type: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    4096
}

impl LlamaConfig {
    /// Parses a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self, ConfigError> {
        let c: HfConfig = serde_json::from_str(text)?;
        if let Some(t) = c.model_type.as_deref() {
            if !matches!(t, "llama" | "mistral") {
                return Err(ConfigError::Architecture(t.to_string()));
            }
        }
        if c.sliding_window.is_some() {
            return Err(ConfigError::Invalid {
                field: "sliding_window",
                message: "sliding-window attention is not supported".into(),
            });
        }
        let rope_type = c
            .rope_parameters
            .as_ref()
            .and_then(|p| p.rope_type.clone())
            .or_else(|| {
                c.rope_scaling
                    .as_ref()
                    .and_then(|s| s.get("rope_type").or_else(|| s.get("type")))
                    .and_then(|t| t.as_str().map(String::from))
            });
        if let Some(t) = rope_type.filter(|t| t != "default") {
            return Err(ConfigError::Invalid {
                field: "rope_scaling",
                message: format!("rope type `{t}` is not supported (only default RoPE)"),
            });
        }
        let rope_theta = c
            .rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(c.rope_theta)
            .unwrap_or(10000.0);
        let eos_token_ids = match c.eos_token_id {
            Some(OneOrMany::One(id)) => vec![id],
            Some(OneOrMany::Many(ids)) => ids,
            None => vec![],
        };
        let heads = c.num_attention_heads;
        let config = Self {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: c.num_key_value_heads.unwrap_or(heads),
            head_dim: c.head_dim.unwrap_or(c.hidden_size / heads.max(1)),
            rms_norm_eps: c.rms_norm_eps,
            rope_theta,
            max_position_embeddings: c.max_position_embeddings,
            tie_word_embeddings: c.tie_word_embeddings,
            bos_token_id: c.bos_token_id,
            eos_token_ids,
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads `llama.*` metadata of a GGUF file. Ties the embeddings when there is no `output.weight`.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, ConfigError> {
        let arch = g.architecture()?.to_string();
        if !matches!(arch.as_str(), "llama" | "mistral") {
            return Err(ConfigError::Architecture(arch));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let u = |k: &str| g.get_u64(&key(k)).map(|v| v as usize);
        let hidden = u("embedding_length")?;
        let heads = u("attention.head_count")?;
        let kv_heads = u("attention.head_count_kv").unwrap_or(heads);
        let vocab = match u("vocab_size") {
            Ok(v) => v,
            Err(_) => g.get_array("tokenizer.ggml.tokens")?.len(),
        };
        let head_dim = u("attention.key_length").unwrap_or(hidden / heads.max(1));
        let config = Self {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: u("feed_forward_length")?,
            num_hidden_layers: u("block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: g.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
            rope_theta: g.get_f64(&key("rope.freq_base")).unwrap_or(10000.0),
            max_position_embeddings: u("context_length").unwrap_or(4096),
            tie_word_embeddings: g.tensor("output.weight").is_none(),
            bos_token_id: g
                .get_u64("tokenizer.ggml.bos_token_id")
                .ok()
                .map(|v| v as u32),
            eos_token_ids: g
                .get_u64("tokenizer.ggml.eos_token_id")
                .ok()
                .map(|v| vec![v as u32])
                .unwrap_or_default(),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, message: String| ConfigError::Invalid { field, message };
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return Err(invalid("num_attention_heads", "must be at least 1".into()));
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(invalid(
                "num_key_value_heads",
                format!(
                    "{} attention heads are not a multiple of {} key/value heads",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(invalid(
                "head_dim",
                format!("{} is odd; RoPE needs pairs", self.head_dim),
            ));
        }
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be at least 1".into()));
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
        let c = LlamaConfig::from_hf_json(SMOL).unwrap();
        assert_eq!(
            (c.head_dim, c.rope_theta, c.gqa_groups()),
            (64, 100000.0, 3)
        );
        let v5 = SMOL.replace(
            r#""rope_theta":100000.0"#,
            r#""rope_parameters":{"rope_type":"default","rope_theta":500000.0}"#,
        );
        assert_eq!(LlamaConfig::from_hf_json(&v5).unwrap().rope_theta, 500000.0);
    }

    #[test]
    fn rejects_what_it_cannot_run() {
        let bad_gqa = SMOL.replace(r#""num_key_value_heads":3"#, r#""num_key_value_heads":4"#);
        let err = LlamaConfig::from_hf_json(&bad_gqa).unwrap_err();
        assert!(err.to_string().contains("num_key_value_heads"), "{err}");
        let gpt2 = SMOL.replace(r#""model_type":"llama""#, r#""model_type":"gpt2""#);
        assert!(matches!(
            LlamaConfig::from_hf_json(&gpt2),
            Err(ConfigError::Architecture(_))
        ));
        let yarn = SMOL.replace(
            r#""rope_theta":100000.0"#,
            r#""rope_scaling":{"rope_type":"yarn","factor":4.0}"#,
        );
        assert!(LlamaConfig::from_hf_json(&yarn)
            .unwrap_err()
            .to_string()
            .contains("yarn"));
    }
}
