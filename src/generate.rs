//! `tessera generate`: loads a model (and adapters) into an engine, runs one or more prompts as one
//! continuous batch and prints the text, or with `--json` one JSON object per prompt.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;
use tessera_engine::engine::{Engine, GenerateRequest};
use tessera_engine::loader::{default_kind, parse_devices};
use tessera_engine::{ChatMessage, Event, SamplingParams};

use crate::config::Config;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A GGUF file or Hugging Face directory (default: model.path of the config).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A PEFT adapter directory; once for every prompt, or once per prompt in order (`-`: none).
    #[arg(long)]
    pub adapter: Vec<String>,
    /// A raw prompt (repeatable: the prompts run as one batch).
    #[arg(long, conflicts_with = "messages")]
    pub prompt: Vec<String>,
    /// A chat as JSON, `[{"role": "user", "content": "..."}]`, rendered with the model's template.
    #[arg(long)]
    pub messages: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop strings (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Tensor parallel degree: the model is split over this many devices.
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Devices: `cpu`, `cuda` (cuda:0..tp) or an explicit list such as `cuda:0,cuda:1`.
    #[arg(long)]
    pub device: Option<String>,
    /// Runtime dtype: f32, bf16 or f16 (default: f32 on CPU, bf16 on CUDA).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Report the top-K log-probabilities of every generated position.
    #[arg(long, default_value_t = 0)]
    pub top_logprobs: usize,
    /// Print one JSON object per prompt instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: GenerateArgs, config: &Config) -> anyhow::Result<()> {
    let model_path = args.model.clone().unwrap_or_else(|| config.model_path());
    let devices = devices(&args)?;
    let kind = match args.dtype.as_deref() {
        None => default_kind(devices[0]),
        Some("f32" | "float32") => tch::Kind::Float,
        Some("bf16" | "bfloat16") => tch::Kind::BFloat16,
        Some("f16" | "float16") => tch::Kind::Half,
        Some(other) => bail!("--dtype: unknown `{other}` (use f32, bf16 or f16)"),
    };
    // `--set model.quantization=packed` keeps a GGUF's Q4 projections 4-bit here too.
    let loaded = tessera_engine::loader::load_with(
        &model_path,
        &devices,
        Some(kind),
        config.model.quantization,
    )
    .with_context(|| format!("loading {}", model_path.display()))?;
    let tokenizer = &loaded.tokenizer;
    let prompts: Vec<Vec<u32>> = if let Some(messages) = &args.messages {
        let messages: Vec<ChatMessage> = serde_json::from_str(messages)
            .context("--messages: expected [{\"role\", \"content\"}]")?;
        let text = tokenizer.apply_chat_template(&messages, true)?;
        vec![tokenizer.encode(&text, false)?]
    } else if args.prompt.is_empty() {
        bail!("give --prompt TEXT (repeatable) or --messages JSON");
    } else {
        args.prompt
            .iter()
            .map(|p| tokenizer.encode(p, true))
            .collect::<Result<_, _>>()?
    };
    let adapters: Vec<Option<PathBuf>> = match args.adapter.len() {
        0 => vec![None; prompts.len()],
        1 => vec![adapter_arg(&args.adapter[0]); prompts.len()],
        n if n == prompts.len() => args.adapter.iter().map(|a| adapter_arg(a)).collect(),
        n => bail!(
            "--adapter given {n} times for {} prompts: give it once, or once per prompt",
            prompts.len()
        ),
    };
    let params = SamplingParams {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
        top_logprobs: args.top_logprobs,
        ..SamplingParams::default()
    };
    let mut engine_config = config.engine_config();
    engine_config.max_waiting = engine_config.max_waiting.max(prompts.len());
    let engine = Engine::start(loaded.model, loaded.tokenizer, engine_config);
    let started = std::time::Instant::now();
    let mut generations = Vec::new();
    for (prompt, adapter) in prompts.iter().zip(adapters) {
        let request = GenerateRequest {
            resume: Vec::new(),
            prompt: prompt.clone(),
            params: params.clone(),
            adapter: adapter.clone(),
        };
        generations.push((adapter, engine.submit(request)?));
    }
    let stream = !args.json && generations.len() == 1;
    let mut stdout = std::io::stdout().lock();
    for (i, (adapter, mut generation)) in generations.into_iter().enumerate() {
        let mut ids = Vec::new();
        let mut text = String::new();
        let mut logprobs = Vec::new();
        let (reason, completion_tokens) = loop {
            match generation.blocking_next() {
                Some(Event::Token {
                    sampled,
                    text: piece,
                }) => {
                    if stream {
                        write!(stdout, "{piece}")?;
                        stdout.flush()?;
                    }
                    ids.push(sampled.token);
                    text.push_str(&piece);
                    if args.top_logprobs > 0 {
                        let top: serde_json::Map<String, serde_json::Value> = sampled
                            .top_logprobs
                            .iter()
                            .map(|(id, lp)| (id.to_string(), json!(lp)))
                            .collect();
                        logprobs.push(json!({"token": sampled.token, "logprob": sampled.logprob, "top_logprobs": top}));
                    }
                }
                Some(Event::Finished {
                    text: rest,
                    reason,
                    completion_tokens,
                    ..
                }) => {
                    if stream {
                        writeln!(stdout, "{rest}")?;
                    }
                    text.push_str(&rest);
                    break (reason, completion_tokens);
                }
                Some(Event::Error { message, .. }) => bail!("prompt {i}: {message}"),
                None => bail!("prompt {i}: the engine stopped"),
            }
        };
        if args.json {
            let mut out = json!({
                "prompt_ids": prompts[i],
                "generated_ids": ids,
                "text": text,
                "finish_reason": reason,
                "completion_tokens": completion_tokens,
                "adapter": adapter,
            });
            if args.top_logprobs > 0 {
                out["logprobs"] = json!(logprobs);
            }
            writeln!(stdout, "{out}")?;
        } else if !stream {
            writeln!(stdout, "--- prompt {i} ({reason:?})\n{text}")?;
        }
    }
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "generation done"
    );
    Ok(())
}

fn adapter_arg(a: &str) -> Option<PathBuf> {
    (a != "-" && !a.is_empty()).then(|| PathBuf::from(a))
}

fn devices(args: &GenerateArgs) -> anyhow::Result<Vec<tch::Device>> {
    let spec = args.device.clone().unwrap_or_else(|| {
        if tch::Cuda::is_available() {
            "cuda".into()
        } else {
            "cpu".into()
        }
    });
    let list = match spec.as_str() {
        "cpu" => vec![tch::Device::Cpu; args.tp],
        "cuda" => (0..args.tp).map(tch::Device::Cuda).collect(),
        _ => parse_devices(&spec).map_err(|e| anyhow::anyhow!("--device: {e}"))?,
    };
    if list.is_empty() || args.tp == 0 {
        bail!("--tp must be at least 1");
    }
    if list.len() != args.tp && args.tp != 1 {
        bail!(
            "--device lists {} devices but --tp is {}",
            list.len(),
            args.tp
        );
    }
    Ok(list)
}
