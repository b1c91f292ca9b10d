//! Engine throughput on a real model, printed as JSON for `scripts/bench-engine.sh`:
//! single-stream decode tokens/s, 32 concurrent streams, 32 streams over 8 adapters, adapter load.
//!
//! `cargo run --release -p tessera-engine --example bench_engine -- MODEL ADAPTER_DIR [--device D]`
//! writes 8 random r=16 adapters (PEFT format) under ADAPTER_DIR for the Python reference to reuse.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;
use tch::{Device, Kind, Tensor};
use tessera_engine::engine::{Engine, EngineConfig, GenerateRequest};
use tessera_engine::lora::{LoraAdapter, Proj};
use tessera_engine::model_config::LlamaConfig;
use tessera_engine::scheduler::SchedulerConfig;
use tessera_engine::{Event, SamplingParams};

const NEW_TOKENS: usize = 128;
const STREAMS: usize = 32;
const ADAPTERS: usize = 8;
pub const PROMPT: &str = "Write a short story about a robot who learns to paint.";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model_path = PathBuf::from(args.get(1).expect("MODEL path"));
    let adapter_root = PathBuf::from(args.get(2).expect("ADAPTER_DIR"));
    let device = match args.iter().position(|a| a == "--device") {
        Some(i) => {
            tessera_engine::loader::parse_devices(&args[i + 1]).map_err(anyhow::Error::msg)?
        }
        None => vec![Device::Cpu],
    };
    let started = Instant::now();
    let loaded = tessera_engine::load(&model_path, &device, None)?;
    let load_s = started.elapsed().as_secs_f64();
    let config = loaded.model.config().clone();
    let kind = loaded.model.kind();
    let prompt = loaded.tokenizer.encode(PROMPT, true)?;
    let engine_config = EngineConfig {
        scheduler: SchedulerConfig {
            max_batch_size: STREAMS,
            prefill_token_budget: 4096,
            ..SchedulerConfig::default()
        },
        max_waiting: 1024,
        ..EngineConfig::default()
    };
    let engine = Engine::start(loaded.model, loaded.tokenizer, engine_config);
    let adapters: Vec<PathBuf> = (0..ADAPTERS)
        .map(|i| {
            write_adapter(
                &adapter_root.join(format!("bench_r16_{i}")),
                &config,
                16,
                i as i64,
            )
        })
        .collect::<anyhow::Result<_>>()?;
    let params = SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(NEW_TOKENS)
    };
    let run = |n: usize, with_adapters: bool| -> anyhow::Result<(f64, f64)> {
        let started = Instant::now();
        let gens: Vec<_> = (0..n)
            .map(|i| {
                engine.submit(GenerateRequest {
                    prompt: prompt.clone(),
                    params: params.clone(),
                    adapter: with_adapters.then(|| adapters[i % ADAPTERS].clone()),
                })
            })
            .collect::<Result<_, _>>()?;
        let mut first_token = None;
        let mut tokens = 0;
        for mut g in gens {
            while let Some(ev) = g.blocking_next() {
                match ev {
                    Event::Token { .. } => {
                        tokens += 1;
                        first_token.get_or_insert_with(Instant::now);
                    }
                    Event::Finished { .. } => break,
                    Event::Error { message } => anyhow::bail!(message),
                }
            }
        }
        let total = started.elapsed().as_secs_f64();
        let decode = first_token
            .map(|t| t.elapsed().as_secs_f64())
            .unwrap_or(total);
        Ok((tokens as f64 / total, (tokens - n) as f64 / decode))
    };
    run(1, false)?; // warm-up
    let (_, single_decode) = run(1, false)?;
    let (batch, _) = run(STREAMS, false)?;
    run(ADAPTERS, true)?; // loads the adapters once, like a warm server
    let (mixed, _) = run(STREAMS, true)?;
    // Loading a new adapter: read, check, shard and place (median of 5 fresh adapters).
    let mut loads = Vec::new();
    for i in 0..5 {
        let dir = write_adapter(
            &adapter_root.join(format!("load_{i}")),
            &config,
            16,
            100 + i,
        )?;
        let t = Instant::now();
        let placed = LoraAdapter::load(&dir, &config)?.place(&device, kind);
        if device[0] != Device::Cpu {
            tch::Cuda::synchronize(0);
        }
        loads.push(t.elapsed().as_secs_f64() * 1e3);
        drop(placed);
    }
    loads.sort_by(f64::total_cmp);
    println!(
        "{}",
        json!({
            "device": format!("{:?}", device),
            "dtype": format!("{kind:?}"),
            "load_model_s": load_s,
            "single_stream_decode_tok_s": single_decode,
            "batch32_tok_s": batch,
            "batch32_8_adapters_tok_s": mixed,
            "adapter_load_ms": loads[loads.len() / 2],
            "new_tokens": NEW_TOKENS,
            "prompt_tokens": prompt.len(),
        })
    );
    Ok(())
}

/// A random PEFT adapter of rank `r` on q, k, v and o (B not zero, so it does change outputs).
fn write_adapter(dir: &Path, c: &LlamaConfig, r: i64, seed: i64) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    tch::manual_seed(seed);
    let targets = [Proj::Q, Proj::K, Proj::V, Proj::O];
    let mut tensors = Vec::new();
    for layer in 0..c.num_hidden_layers {
        for p in targets {
            let (inp, out) = p.dims(c);
            let key = format!("base_model.model.model.layers.{layer}.{}", p.module());
            let opts = (Kind::Float, Device::Cpu);
            tensors.push((
                format!("{key}.lora_A.weight"),
                Tensor::randn([r, inp], opts) * 0.01,
            ));
            tensors.push((
                format!("{key}.lora_B.weight"),
                Tensor::randn([out, r], opts) * 0.01,
            ));
        }
    }
    Tensor::write_safetensors(&tensors, dir.join("adapter_model.safetensors"))?;
    let names: Vec<&str> = targets.iter().map(|p| p.name()).collect();
    std::fs::write(
        dir.join("adapter_config.json"),
        json!({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
               "lora_dropout": 0.0, "target_modules": names, "bias": "none",
               "base_model_name_or_path": null})
        .to_string(),
    )?;
    Ok(dir.to_path_buf())
}
