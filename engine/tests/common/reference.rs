//! Where the tests find the default model (SmolLM2's GGUF, `scripts/fetch-model.sh`) and the
//! reference transformers + PEFT made from it (`scripts/make-reference.sh`): token ids, logits,
//! greedy continuations and a seeded PEFT adapter. Shared by the engine's and the binary's tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// Tessera's cache: `$TESSERA_CACHE`, else `~/.cache/tessera`.
pub fn cache() -> PathBuf {
    match std::env::var_os("TESSERA_CACHE") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/tessera"),
    }
}

/// `$NAME` when set and not empty, else `fallback`.
fn env_or(name: &str, fallback: PathBuf) -> PathBuf {
    match std::env::var_os(name) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => fallback,
    }
}

/// The SmolLM2 GGUF: `$TESSERA_MODEL_PATH` (set by scripts/test.sh), else the models cache.
pub fn smollm2_path() -> PathBuf {
    let path = env_or(
        "TESSERA_MODEL_PATH",
        cache().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    );
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-model.sh (scripts/test.sh does)",
        path.display()
    );
    path
}

/// The reference directory: `$TESSERA_REFERENCE_DIR` (set by scripts/test.sh), else the newest
/// one made (`<cache>/reference/smollm2`).
pub fn reference_dir() -> PathBuf {
    let dir = env_or("TESSERA_REFERENCE_DIR", cache().join("reference/smollm2"));
    assert!(
        dir.join("expected.json").exists(),
        "no reference at {}: make it with `export TESSERA_REFERENCE_DIR=$(scripts/make-reference.sh)` \
         (transformers + PEFT, a few minutes once; scripts/test.sh does it)",
        dir.display()
    );
    dir
}

/// Gemma 3 270M's GGUF (`scripts/fetch-gemma3.sh`): `$TESSERA_GEMMA3_PATH`, else the models cache.
pub fn gemma3_path() -> PathBuf {
    let path = env_or(
        "TESSERA_GEMMA3_PATH",
        cache().join("models/gemma-3-270m-q4_k_m.gguf"),
    );
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-gemma3.sh (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Gemma 3's reference (`expected.json`): `$TESSERA_GEMMA3_REFERENCE_DIR`, else the newest made.
pub fn gemma3_reference() -> serde_json::Value {
    let dir = env_or(
        "TESSERA_GEMMA3_REFERENCE_DIR",
        cache().join("reference/gemma3"),
    );
    let path = dir.join("expected.json");
    assert!(
        path.exists(),
        "no reference at {}: make it with `export TESSERA_GEMMA3_REFERENCE_DIR=$(scripts/make-reference.sh gemma3)`",
        dir.display()
    );
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The reference outputs (`expected.json` in [`reference_dir`]).
pub fn reference() -> serde_json::Value {
    let path = reference_dir().join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The reference's PEFT adapter directory (its first: `adapters[0]`).
pub fn reference_adapter() -> PathBuf {
    let r = reference();
    reference_dir().join(r["adapters"][0]["path"].as_str().unwrap())
}
