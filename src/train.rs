//! `tessera train`: one LoRA fine-tune in the foreground. A progress line on a terminal, JSON
//! progress lines otherwise; Ctrl-C cancels cleanly (the last checkpoint is kept); exits 0 only
//! when the adapter is written.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Map, Value};
use tessera_engine::loader::{default_kind, load_for_training};
use tessera_engine::train::{
    train, BaseQuantization, Hyperparameters, TrainJob, TrainOptions, TrainOutcome,
};

use crate::config::Config;

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Base model: a GGUF file or Hugging Face directory (default: model.path of the config).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// JSONL dataset: {"text"}, {"prompt", "completion"} or {"messages"} per line.
    #[arg(long)]
    pub dataset: PathBuf,
    /// Directory for the adapter, checkpoints and training_summary.json.
    #[arg(long)]
    pub output: PathBuf,
    /// Hyperparameters as a JSON object; `--<name> value` flags override single ones.
    #[arg(long)]
    pub hyperparameters: Option<String>,
    /// Continue from the latest checkpoint under --output.
    #[arg(long)]
    pub resume: bool,
    /// Device: cpu, cuda or cuda:N (default: cuda:0 when there is one).
    #[arg(long)]
    pub device: Option<String>,
    /// `--lora_r 8 --learning_rate 1e-4 ...`: any hyperparameter by name.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "--NAME VALUE"
    )]
    pub overrides: Vec<String>,
}

/// The hyperparameters of `--hyperparameters` with the `--<name> value` pairs applied.
pub fn hyperparameters(args: &TrainArgs) -> anyhow::Result<Hyperparameters> {
    let mut map: Map<String, Value> = match &args.hyperparameters {
        Some(text) => {
            serde_json::from_str(text).context("--hyperparameters: expected a JSON object")?
        }
        None => Map::new(),
    };
    let mut rest = args.overrides.iter();
    while let Some(flag) = rest.next() {
        let Some(name) = flag.strip_prefix("--") else {
            bail!("unexpected argument `{flag}` (hyperparameters are given as --<name> value)");
        };
        let (name, value) = match name.split_once('=') {
            Some((n, v)) => (n.to_string(), v.to_string()),
            None => {
                let v = rest
                    .next()
                    .with_context(|| format!("--{name} needs a value"))?;
                (name.to_string(), v.clone())
            }
        };
        let name = name.replace('-', "_");
        // Numbers, booleans and lists parse as JSON; anything else is a string.
        let value = serde_json::from_str(&value).unwrap_or(Value::String(value));
        let value = match (name.as_str(), value) {
            ("target_modules", Value::String(s)) => {
                json!(s.split(',').map(str::trim).collect::<Vec<_>>())
            }
            (_, v) => v,
        };
        map.insert(name, value);
    }
    Ok(Hyperparameters::from_json(Value::Object(map))?)
}

pub fn run(args: TrainArgs, config: &Config) -> anyhow::Result<()> {
    let hyperparameters = hyperparameters(&args)?;
    let model_path = args.model.clone().unwrap_or_else(|| config.model_path());
    let device = match args.device.as_deref() {
        None if tch::Cuda::is_available() => tch::Device::Cuda(0),
        None => tch::Device::Cpu,
        Some(spec) => *tessera_engine::loader::parse_devices(spec)
            .map_err(|e| anyhow::anyhow!("--device: {e}"))?
            .first()
            .context("--device: empty")?,
    };
    let kind = if hyperparameters.fp16 {
        default_kind(device)
    } else {
        tch::Kind::Float
    };
    let packed_base = hyperparameters.base_quantization == BaseQuantization::Packed;
    let loaded = load_for_training(&model_path, device, Some(kind), packed_base)
        .with_context(|| format!("loading {}", model_path.display()))?;
    let job = TrainJob {
        dataset_path: args.dataset.clone(),
        output_path: args.output.clone(),
        base_model: Some(model_path.clone()),
        hyperparameters,
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::Relaxed) {
            std::process::exit(130);
        }
        eprintln!("\ncancelling after this step (Ctrl-C again to quit at once)");
    })
    .context("installing the Ctrl-C handler")?;
    let options = TrainOptions {
        resume: args.resume,
        cancel,
        base_model_name: model_path.display().to_string(),
        checkpoint_on_cancel: Arc::new(AtomicBool::new(true)),
        max_dataset_bytes: Some(config.training.max_dataset_bytes),
        ..TrainOptions::default()
    };
    let terminal = std::io::stderr().is_terminal();
    let outcome = train(&loaded.model, &loaded.tokenizer, &job, &options, |p| {
        if terminal {
            let eval = p
                .eval_loss
                .map(|l| format!(" eval {l:.4}"))
                .unwrap_or_default();
            eprint!(
                "\r[{:>5}/{}] epoch {} loss {:.4}{eval} lr {:.2e} |g| {:.3} {:.0} tok/s ETA {:.0}s   ",
                p.step, p.total_steps, p.epoch, p.loss, p.learning_rate, p.grad_norm, p.tokens_per_s, p.eta_s
            );
            let _ = std::io::stderr().flush();
        } else {
            println!("{}", serde_json::to_string(p).expect("progress is JSON"));
        }
    })?;
    if terminal {
        eprintln!();
    }
    match outcome {
        TrainOutcome::Completed(summary) => {
            tracing::info!(
                output = %args.output.display(),
                steps = summary.steps,
                final_loss = summary.final_loss,
                elapsed_s = summary.elapsed_s,
                "adapter written"
            );
            Ok(())
        }
        TrainOutcome::Cancelled {
            step,
            last_checkpoint,
        } => {
            let kept = last_checkpoint
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "none".into());
            bail!("cancelled at step {step}; last checkpoint: {kept} (rerun with --resume to continue)")
        }
    }
}
