//! Where the tests find the default model and the reference outputs.
#![allow(dead_code)]

use std::path::PathBuf;

/// The SmolLM2 GGUF: `$TESSERA_MODEL_PATH` (set by scripts/test.sh), else the models cache.
pub fn smollm2_path() -> PathBuf {
    let path = match std::env::var_os("TESSERA_MODEL_PATH") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => {
            let cache = std::env::var_os("TESSERA_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/tessera")
                });
            cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-model.sh (scripts/test.sh does)",
        path.display()
    );
    path
}

/// `../shared/reference/smollm2` beside the checkout (CI has it there too), or `$TESSERA_REFERENCE_DIR`.
pub fn reference_dir() -> PathBuf {
    let dir = match std::env::var_os("TESSERA_REFERENCE_DIR") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/reference/smollm2"),
    };
    assert!(
        dir.join("expected.json").exists(),
        "no reference outputs at {}",
        dir.display()
    );
    dir
}
/// The reference outputs (`expected.json` in [`reference_dir`]).
pub fn reference() -> serde_json::Value {
    let path = reference_dir().join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// A reference case's prompt token ids.
pub fn input_ids(case: &serde_json::Value) -> Vec<i64> {
    case["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect()
}

/// A reference case's next token: transformers' top-1 at the prompt's last position.
pub fn next_token(case: &serde_json::Value) -> i64 {
    case["last_logits_top10"]["ids"][0].as_i64().unwrap()
}

pub mod tiny;
pub mod tiny_gguf;

/// Hyperparameters with which a few steps on SmolLM2 memorise one short answer (batch 1, constant
/// learning rate, no dropout, r=8 on q/v/o/down).
pub fn memorising(epochs: usize) -> tessera_engine::train::Hyperparameters {
    tessera_engine::train::Hyperparameters {
        lora_r: 8,
        lora_alpha: 16.0,
        lora_dropout: 0.0,
        target_modules: vec![
            "q_proj".into(),
            "v_proj".into(),
            "o_proj".into(),
            "down_proj".into(),
        ],
        learning_rate: 5e-3,
        num_epochs: epochs,
        batch_size: 1,
        gradient_accumulation_steps: 1,
        warmup_ratio: 0.0,
        lr_scheduler: tessera_engine::train::LrScheduler::Constant,
        ..tessera_engine::train::Hyperparameters::default()
    }
}
