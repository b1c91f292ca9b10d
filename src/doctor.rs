//! `tessera doctor`: what this machine has and what Tessera would run with.

use std::fmt::Write as _;
use std::path::Path;

use tessera_actors::inventory::{split, Inventory};
use tessera_engine::gguf::GgufFile;

use crate::config::Config;

const GIB: f64 = (1u64 << 30) as f64;

/// The report as text.
pub fn report(config: &Config) -> String {
    let mut out = String::new();
    let inv = Inventory::detect();
    let w = &mut out;

    let _ = writeln!(w, "tessera {}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(w, "torch (libtorch): {}", env!("LIBTORCH_LINKED_VERSION"));
    let _ = writeln!(w, "libtorch lib dir: {}", env!("LIBTORCH_LINKED_LIB"));
    let _ = writeln!(w, "CUDA available: {}", inv.cuda_available);
    let _ = writeln!(w, "CUDA devices: {}", inv.gpus.len());
    for g in &inv.gpus {
        let name = g.name.as_deref().unwrap_or("(name unknown)");
        match (g.memory_total_bytes, g.memory_free_bytes) {
            (Some(total), Some(free)) => {
                let _ = writeln!(
                    w,
                    "  cuda:{}: {name}, {:.1} GiB total, {:.1} GiB free",
                    g.index,
                    total as f64 / GIB,
                    free as f64 / GIB
                );
            }
            _ => {
                let _ = writeln!(w, "  cuda:{}: {name}", g.index);
            }
        }
    }
    if let (Some(e), false) = (&inv.nvml_error, inv.gpus.is_empty()) {
        let _ = writeln!(w, "  (NVML unavailable: {e})");
    }
    let h = &inv.host;
    let _ = writeln!(w, "host: {} ({})", h.hostname, h.os);
    let _ = writeln!(w, "CPU: {} cores, {}", h.cpu_cores, h.cpu_brand);
    let _ = writeln!(
        w,
        "RAM: {:.1} GiB total, {:.1} GiB available",
        h.memory_total_bytes as f64 / GIB,
        h.memory_available_bytes as f64 / GIB
    );
    let s = split(
        &inv.devices(),
        config.resources.inference_gpu_fraction,
        config.resources.training_gpu_fraction,
    );
    let names = |d: &[_]| {
        d.iter()
            .map(|d: &tessera_actors::inventory::Device| d.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        w,
        "device split: inference [{}], training [{}]",
        names(&s.inference),
        names(&s.training)
    );
    let _ = writeln!(w, "model: {}", describe_model(&config.model_path()));
    let _ = writeln!(w, "\nconfig in effect:\n{}", config.to_toml_masked());
    out
}

fn describe_model(path: &Path) -> String {
    let shown = path.display();
    if !path.exists() {
        return format!("{shown} (missing: run scripts/fetch-model.sh or set model.path)");
    }
    if path.is_dir() {
        return format!("{shown} (Hugging Face directory)");
    }
    match GgufFile::open(path) {
        Ok(g) => {
            let arch = g.architecture().unwrap_or("?").to_string();
            let key = |k: &str| {
                g.arch_key(k)
                    .ok()
                    .and_then(|k| g.get_u64(&k).ok())
                    .map_or("?".to_string(), |v| v.to_string())
            };
            let vocab = g
                .get_array("tokenizer.ggml.tokens")
                .map_or("?".to_string(), |t| t.len().to_string());
            format!(
                "{shown} (GGUF v{}, {arch}, {} layers, hidden {}, vocab {vocab}, {} tensors)",
                g.version,
                key("block_count"),
                key("embedding_length"),
                g.tensors.len()
            )
        }
        Err(e) => format!("{shown} (unreadable: {e})"),
    }
}
