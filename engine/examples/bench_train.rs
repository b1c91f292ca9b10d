//! LoRA SFT throughput on a real model, printed as JSON for `scripts/bench-train.sh`: tokens/s
//! and peak RSS, r=16 on all 7 projections, sequences of 256, batch 4. The timed steps are the
//! second to the last but one: the first warms up, the last writes the final checkpoint.
//!
//! `cargo run --release -p tessera-engine --example bench_train -- MODEL DATASET.jsonl OUT_DIR
//!     [on|off|packed] [--threads N]` (`on|off` turns layer recomputation on or off, default off as
//!     PEFT's; `packed` trains on the GGUF's 4-bit base kept packed, QLoRA's way, with recompute).

use std::path::PathBuf;
use std::time::Instant;

use serde_json::json;
use tch::{Device, Kind};
use tessera_engine::loader::load_for_training;
use tessera_engine::train::{
    train, BaseQuantization, Hyperparameters, LrScheduler, TrainJob, TrainOptions,
};

fn peak_rss_mib() -> f64 {
    status_mib("VmHWM:")
}

fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model = PathBuf::from(&args[1]);
    let dataset = PathBuf::from(&args[2]);
    let out = PathBuf::from(&args[3]);
    let mode = args.get(4).map(String::as_str).unwrap_or("off");
    let packed = mode == "packed";
    let checkpointing = mode == "on" || packed;
    if let Some(i) = args.iter().position(|a| a == "--threads") {
        let n: i32 = args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .expect("--threads N");
        tch::set_num_threads(n);
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!(
        "bench: tessera trainer, {} threads, load average {} before the run",
        tch::get_num_threads(),
        load.split_whitespace().next().unwrap_or("?")
    );
    let loaded = load_for_training(&model, Device::Cpu, Some(Kind::Float), packed)?;
    let (weight_bytes, _, _) = loaded.model.weight_bytes();
    let (rss_loaded, peak_loading) = (status_mib("VmRSS:"), peak_rss_mib());
    let job = TrainJob {
        dataset_path: dataset,
        output_path: out,
        base_model: None,
        hyperparameters: Hyperparameters {
            lora_r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            num_epochs: 1,
            batch_size: 4,
            gradient_accumulation_steps: 1,
            max_seq_length: 256,
            warmup_ratio: 0.0,
            lr_scheduler: LrScheduler::Constant,
            gradient_checkpointing: checkpointing,
            base_quantization: if packed {
                BaseQuantization::Packed
            } else {
                BaseQuantization::Dequantize
            },
            ..Hyperparameters::default()
        },
    };
    // On a thread of its own, as the trainer actor runs a job (so it allocates in the arena such
    // a thread gets, not the main thread's heap).
    let marks = std::thread::Builder::new()
        .name("tessera-bench-trainer".into())
        .spawn(move || {
            let mut marks = Vec::new();
            let start = Instant::now();
            train(
                &loaded.model,
                &loaded.tokenizer,
                &job,
                &TrainOptions::default(),
                |p| marks.push((start.elapsed().as_secs_f64(), p.step)),
            )
            .map(|_| marks)
        })?
        .join()
        .expect("the training thread panicked")?;
    // Tokens of steps 2..n-1 over their time (the first warms up, the last saves a checkpoint).
    let tokens_per_step = 4.0 * 256.0;
    assert!(marks.len() >= 3, "the dataset needs at least 3 steps");
    let (t1, s1) = marks[0];
    let (tn, sn) = marks[marks.len() - 2];
    println!(
        "{}",
        json!({
            "tokens_per_s": tokens_per_step * (sn - s1) as f64 / (tn - t1),
            "steps": marks.len(),
            "timed_steps": sn - s1,
            "threads": tch::get_num_threads(),
            "peak_rss_mib": peak_rss_mib(),
            "rss_after_load_mib": rss_loaded,
            "peak_rss_loading_mib": peak_loading,
            "gradient_checkpointing": checkpointing,
            "packed_base": packed,
            "weight_mib": weight_bytes as f64 / (1 << 20) as f64,
            "allocator": tessera_engine::allocator::name(),
        })
    );
    Ok(())
}
