//! Where a step's time goes: runs `--streams` greedy streams of `--new-tokens` tokens on a model
//! and prints the scheduler's step breakdown (build, forward, attention, sample, stream).
//!
//! `cargo run --release --workspace --example step_breakdown -- MODEL [STREAMS] [NEW_TOKENS]
//!     [dequantize|packed|auto] [unfused]` (`unfused`: decode steps through torch's ops, not
//!     the fused path of a packed model); `STEP_DTYPE=bfloat16` loads the model in bfloat16

use std::path::PathBuf;
use std::time::Instant;

use tessera_engine::engine::{Engine, EngineConfig, GenerateRequest};
use tessera_engine::SamplingParams;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model = PathBuf::from(args.get(1).expect("MODEL path"));
    let streams: usize = args.get(2).map_or(Ok(32), |s| s.parse())?;
    let new_tokens: usize = args.get(3).map_or(Ok(64), |s| s.parse())?;
    let quantization = match args.get(4).map(String::as_str) {
        None | Some("dequantize") => tessera_engine::loader::Quantization::Dequantize,
        Some("packed") => tessera_engine::loader::Quantization::Packed,
        Some("auto") => tessera_engine::loader::Quantization::Auto,
        Some(q) => anyhow::bail!("`{q}` is not dequantize, packed or auto"),
    };
    let loaded = tessera_engine::loader::load_with(
        &model,
        &[tch::Device::Cpu],
        // `STEP_DTYPE=bfloat16`: the model in bfloat16 (float32 otherwise).
        match std::env::var("STEP_DTYPE").as_deref() {
            Ok("bfloat16") => Some(tch::Kind::BFloat16),
            _ => Some(tch::Kind::Float),
        },
        quantization,
    )?;
    let prompt = loaded.tokenizer.encode(
        "Write a short story about a robot who learns to paint.",
        true,
    )?;
    if args.get(5).map(String::as_str) == Some("unfused") {
        loaded.model.set_fused_decode(false);
    }
    eprintln!("weights: {}", loaded.weights);
    let engine = Engine::start(loaded.model, loaded.tokenizer, EngineConfig::default());
    let run = |n: usize| -> anyhow::Result<f64> {
        let started = Instant::now();
        let gens = (0..n)
            .map(|_| {
                engine.submit(GenerateRequest {
                    resume: Vec::new(),
                    prompt: prompt.clone(),
                    params: SamplingParams {
                        ignore_eos: true,
                        ..SamplingParams::greedy(new_tokens)
                    },
                    adapter: None,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        for g in gens {
            g.wait().map_err(anyhow::Error::msg)?;
        }
        Ok(started.elapsed().as_secs_f64())
    };
    run(streams)?; // warm-up
    let before = engine.stats();
    let wall = run(streams)?;
    let after = engine.stats();
    let steps = (after.decode_steps - before.decode_steps).max(1) as f64;
    let ms = |a: u64, b: u64| (a - b) as f64 / 1e6 / steps;
    let (t, b) = (after.time, before.time);
    println!(
        "{streams} streams x {new_tokens} tokens: {:.1} tok/s, {steps} steps, per step (ms): \
         build {:.2}  forward {:.2} (of which attention {:.2})  sample {:.2}  stream {:.2}  \
         total wall {:.2}",
        (streams * new_tokens) as f64 / wall,
        ms(t.build_ns, b.build_ns),
        ms(t.forward_ns, b.forward_ns),
        ms(t.attention_ns, b.attention_ns),
        ms(t.sample_ns, b.sample_ns),
        ms(t.stream_ns, b.stream_ns),
        wall * 1e3 / steps,
    );
    Ok(())
}
