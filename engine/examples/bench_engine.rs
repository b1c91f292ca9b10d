//! Engine throughput on a real model, printed as JSON for `scripts/bench-engine.sh`:
//! single-stream decode tokens/s (and its fraction of the batch-1 bandwidth roofline), the same with
//! an adapter, N concurrent streams, N streams over 8 adapters, adapter load. Every measured shape
//! is warmed up first; each figure is the median of `--runs` runs, each after a printed
//! load-average check.
//!
//! `cargo run --release -p tessera-engine --example bench_engine -- MODEL ADAPTER_DIR
//!     [--device cpu|cuda:0] [--dtype float32|bfloat16|float16] [--threads N] [--runs 3]
//!     [--streams 32] [--new-tokens 128] [--quantization dequantize|packed|auto]`
//! writes 8 random r=16 adapters (PEFT format) under ADAPTER_DIR for the Python reference to reuse.
//! The engine thread's OpenMP pool follows `OMP_NUM_THREADS` (read when torch loads), so the
//! script exports it; `--threads` must agree with it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;
use tch::{Device, Kind, Tensor};
use tessera_engine::engine::{Engine, EngineConfig, GenerateRequest};
use tessera_engine::lora::{LoraAdapter, Proj};
use tessera_engine::model::ModelConfig;
use tessera_engine::scheduler::SchedulerConfig;
use tessera_engine::{Event, SamplingParams};

const ADAPTERS: usize = 8;
pub const PROMPT: &str = "Write a short story about a robot who learns to paint.";

/// `--name value` from the command line.
fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn number(args: &[String], name: &str, default: usize) -> anyhow::Result<usize> {
    flag(args, name).map_or(Ok(default), |v| {
        v.parse()
            .map_err(|_| anyhow::anyhow!("{name}: `{v}` is not a number"))
    })
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Prints the 1-minute load average before a measurement; warns above half the cores.
fn load_check(label: &str) {
    let load: f64 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN);
    let n = cores();
    let warn = if load > 0.5 * n as f64 {
        "  WARNING: machine busy (> 0.5 x cores), figures will be low"
    } else {
        ""
    };
    eprintln!("bench: load average {load:.2} on {n} cores before {label}{warn}");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Memory read bandwidth in GB/s: the median time of `sum` over 1 GiB of float32.
fn bandwidth_gb_s(device: Device) -> f64 {
    let n = 1i64 << 28;
    let x = Tensor::ones([n], (Kind::Float, device));
    let _ = x.sum(Kind::Float);
    sync(device);
    let times = (0..5)
        .map(|_| {
            let t = Instant::now();
            let _ = x.sum(Kind::Float);
            sync(device);
            t.elapsed().as_secs_f64()
        })
        .collect();
    (n * 4) as f64 / median(times) / 1e9
}

/// Bytes of weights one decode step reads: every layer, the final norm and the output matrix (the
/// embedding table only through one row per token).
fn decode_weight_bytes(c: &ModelConfig, kind: Kind) -> f64 {
    let (h, i) = (c.hidden_size as f64, c.intermediate_size as f64);
    let q = (c.num_attention_heads * c.head_dim) as f64;
    let kv = (c.num_key_value_heads * c.head_dim) as f64;
    let layer = h * (q + 2.0 * kv) + q * h + 3.0 * h * i + 2.0 * h;
    let params = c.num_hidden_layers as f64 * layer + h + c.vocab_size as f64 * h;
    params * kind.elt_size_in_bytes() as f64
}

fn parse_kind(name: &str) -> anyhow::Result<Kind> {
    Ok(match name {
        "float32" | "f32" => Kind::Float,
        "bfloat16" | "bf16" => Kind::BFloat16,
        "float16" | "f16" => Kind::Half,
        other => anyhow::bail!("--dtype: `{other}` is not float32, bfloat16 or float16"),
    })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model_path = PathBuf::from(args.get(1).expect("MODEL path"));
    let adapter_root = PathBuf::from(args.get(2).expect("ADAPTER_DIR"));
    let device = match flag(&args, "--device") {
        Some(d) => tessera_engine::loader::parse_devices(&d).map_err(anyhow::Error::msg)?,
        None => vec![Device::Cpu],
    };
    let kind = flag(&args, "--dtype").map(|k| parse_kind(&k)).transpose()?;
    let threads = number(&args, "--threads", cores())?;
    let runs = number(&args, "--runs", 3)?.max(1);
    let streams = number(&args, "--streams", 32)?;
    let new_tokens = number(&args, "--new-tokens", 128)?;
    tch::set_num_threads(threads as i32);
    let omp = std::env::var("OMP_NUM_THREADS").ok();
    if omp.as_deref() != Some(threads.to_string().as_str()) {
        eprintln!(
            "bench: WARNING: OMP_NUM_THREADS is {omp:?}, not {threads}: the engine thread may use another count"
        );
    }
    eprintln!(
        "bench: tessera engine, {} intra-op threads (OMP_NUM_THREADS {omp:?})",
        tch::get_num_threads()
    );
    load_check("the memory bandwidth probe");
    let bandwidth = bandwidth_gb_s(device[0]);
    let quantization: tessera_engine::loader::Quantization = match flag(&args, "--quantization") {
        None => Default::default(),
        Some(q) => serde_json::from_value(json!(q)).map_err(|_| {
            anyhow::anyhow!("--quantization: `{q}` is not dequantize, packed or auto")
        })?,
    };
    let started = Instant::now();
    let loaded = tessera_engine::loader::load_with(&model_path, &device, kind, quantization)?;
    let load_s = started.elapsed().as_secs_f64();
    let (resident_weight_bytes, packed_projections, projections) = loaded.model.weight_bytes();
    let rss_after_load = rss_bytes();
    let config = loaded.model.config().clone();
    let kind = loaded.model.kind();
    let prompt = loaded.tokenizer.encode(PROMPT, true)?;
    let engine_config = EngineConfig {
        scheduler: SchedulerConfig {
            max_batch_size: streams,
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
    // (tokens/s over the whole run, decode tokens/s after the first token) of `n` streams.
    let run = |n: usize, tokens_each: usize, with_adapters: bool| -> anyhow::Result<(f64, f64)> {
        let params = SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(tokens_each)
        };
        let started = Instant::now();
        let gens: Vec<_> = (0..n)
            .map(|i| {
                engine.submit(GenerateRequest {
                    resume: Vec::new(),
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
                    Event::Error { message, .. } => anyhow::bail!(message),
                }
            }
        }
        let total = started.elapsed().as_secs_f64();
        let decode = first_token
            .map(|t| t.elapsed().as_secs_f64())
            .unwrap_or(total);
        Ok((tokens as f64 / total, (tokens - n) as f64 / decode))
    };
    // The median over `runs` of one figure, each run after a load check.
    let measure = |label: &str, f: &dyn Fn() -> anyhow::Result<f64>| -> anyhow::Result<f64> {
        let mut values = Vec::new();
        for r in 0..runs {
            load_check(&format!("{label} (run {}/{runs})", r + 1));
            values.push(f()?);
        }
        Ok(median(values))
    };
    eprintln!("bench: warm-up (1 stream, {streams} streams, {streams} streams over adapters)");
    run(1, new_tokens, false)?;
    run(1, 8, true)?;
    run(streams, 8, false)?;
    run(streams, 8, true)?; // also loads the adapters once, like a warm server
    let single = measure("tessera single stream", &|| {
        run(1, new_tokens, false).map(|r| r.1)
    })?;
    let single_adapter = measure("tessera single stream, adapter", &|| {
        run(1, new_tokens, true).map(|r| r.1)
    })?;
    let batch = measure(&format!("tessera {streams} streams"), &|| {
        run(streams, new_tokens, false).map(|r| r.0)
    })?;
    let mixed = measure(&format!("tessera {streams} streams, 8 adapters"), &|| {
        run(streams, new_tokens, true).map(|r| r.0)
    })?;
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
        sync(device[0]);
        loads.push(t.elapsed().as_secs_f64() * 1e3);
        drop(placed);
    }
    let weight_bytes = decode_weight_bytes(&config, kind);
    let roofline = bandwidth * 1e9 / weight_bytes;
    println!(
        "{}",
        json!({
            "device": format!("{:?}", device),
            "dtype": format!("{kind:?}"),
            "threads": threads,
            "runs": runs,
            "streams": streams,
            "load_model_s": load_s,
            "bandwidth_gb_s": bandwidth,
            "weight_bytes": weight_bytes,
            "roofline_tok_s": roofline,
            "single_stream_decode_tok_s": single,
            "roofline_fraction": single / roofline,
            "single_stream_adapter_decode_tok_s": single_adapter,
            "batch32_tok_s": batch,
            "batch32_8_adapters_tok_s": mixed,
            "adapter_load_ms": median(loads),
            "new_tokens": new_tokens,
            "prompt_tokens": prompt.len(),
            "quantization": format!("{quantization:?}").to_lowercase(),
            "resident_weight_bytes": resident_weight_bytes,
            "packed_projections": packed_projections,
            "projections": projections,
            "rss_after_load_bytes": rss_after_load,
            "peak_rss_bytes": peak_rss_bytes(),
            "allocator": tessera_engine::allocator::name(),
        })
    );
    Ok(())
}

/// This process's peak resident memory (Linux `VmHWM`), 0 where unknown.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// This process's resident memory (Linux `/proc/self/statm`), 0 where unknown.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// A random PEFT adapter of rank `r` on q, k, v and o (B not zero, so it does change outputs).
fn write_adapter(dir: &Path, c: &ModelConfig, r: i64, seed: i64) -> anyhow::Result<PathBuf> {
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
