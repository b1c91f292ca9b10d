//! The command line: global options and one subcommand per role (clap derive).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "tessera",
    version,
    about = "Serve and fine-tune LLMs on a cluster: a head node, worker nodes, one binary.",
    long_about = None
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// A TOML file overriding any subset of config/default.toml.
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Override one setting: `--set server.port=9000` (repeatable; wins over file and environment).
    #[arg(long = "set", global = true, value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Log format: `json` (bunyan) for machines, `pretty` for humans, `auto` (the default):
    /// pretty on a terminal, json otherwise.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormatArg>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormatArg {
    Auto,
    Json,
    Pretty,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a head node: the actor tree and the HTTP facade.
    Head(HeadArgs),
    /// Join this machine to a head as a worker node.
    Worker(WorkerArgs),
    /// Generate text with the engine, no server: one or more prompts as one continuous batch.
    Generate(crate::generate::GenerateArgs),
    /// Fine-tune a LoRA adapter in the foreground (SFT on a JSONL dataset).
    Train(crate::train::TrainArgs),
    /// Chat with a running head (POST /chat): tokens stream to stdout as they arrive.
    Chat(ChatArgs),
    /// Submit a fine-tune job to a running head (POST /fine-tune) and print its id.
    FineTune(FineTuneArgs),
    /// List a head's fine-tune jobs, show or cancel one, or follow its progress.
    Jobs(JobsArgs),
    /// A running head's cluster (like `ray status`): health, nodes, deployments, replicas, jobs.
    Status(StatusArgs),
    /// Deploy, list or delete a running head's models (POST/GET/DELETE /models).
    Models(ModelsArgs),
    /// Print what this machine has: torch, CUDA devices, CPU, RAM, the model, the config in effect.
    Doctor,
}

#[derive(Debug, Args)]
pub struct HeadArgs {
    /// Address the HTTP facade binds to (server.bind).
    #[arg(long)]
    pub bind: Option<String>,
    /// Port of the HTTP facade (server.port).
    #[arg(long)]
    pub port: Option<u16>,
    /// Model to serve: a GGUF file or a Hugging Face directory (model.path).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A tag of this node, KEY=VALUE (repeatable; added to resources.tags).
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
    pub tags: Vec<(String, String)>,
}

fn parse_tag(text: &str) -> Result<(String, String), String> {
    tessera_actors::tags::parse_pair(text)
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The head's cluster address, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub join: String,
    /// Model this worker serves (model.path); by default the head's.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A tag of this node, KEY=VALUE (repeatable; added to resources.tags). Jobs whose
    /// `placement.tags` it carries may run here.
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
    pub tags: Vec<(String, String)>,
}

/// Where the head is and how to authenticate (`chat`, `fine-tune`, `jobs`).
#[derive(Debug, Clone, Args)]
pub struct ConnArgs {
    /// The head's base URL (default: http://{server.bind}:{server.port} of the config).
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// Bearer token (default: server.auth_token of the config).
    #[arg(long)]
    pub token: Option<String>,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// One user turn (rendered with the model's chat template); `-` reads it from stdin.
    #[arg(conflicts_with = "messages")]
    pub prompt: Option<String>,
    /// A chat as JSON, `[{"role": "user", "content": "..."}]`.
    #[arg(long, value_name = "JSON")]
    pub messages: Option<String>,
    /// A PEFT adapter directory, relative to the head's adapters.root.
    #[arg(long, value_name = "PATH")]
    pub adapter: Option<String>,
    /// The deployment that answers (`tessera models list`); default: the model given at start.
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<usize>,
    /// 0 is greedy (server default 1.0).
    #[arg(long, value_name = "T")]
    pub temperature: Option<f64>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Stop strings (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// Wait for the whole answer instead of printing tokens as they arrive.
    #[arg(long)]
    pub no_stream: bool,
    /// Print the final response object (id, text, finish_reason, usage, ...) as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Debug, Args)]
pub struct FineTuneArgs {
    /// JSONL dataset, relative to the head's training.data_root.
    #[arg(long, value_name = "PATH")]
    pub dataset: String,
    /// Adapter directory to write, relative to the head's adapters.root.
    #[arg(long, value_name = "PATH")]
    pub output: String,
    /// Base model (default: the served model).
    #[arg(long, value_name = "PATH")]
    pub base_model: Option<String>,
    /// Queue priority: high, normal (the server's default) or low.
    #[arg(long, value_parser = ["high", "normal", "low"])]
    pub priority: Option<String>,
    /// Hyperparameters as a JSON object (PEFT/TRL names).
    #[arg(long, value_name = "JSON")]
    pub hyperparameters: Option<String>,
    /// Follow the job until it ends (like `tessera jobs ID --watch`).
    #[arg(long)]
    pub watch: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Debug, Args)]
pub struct ModelsArgs {
    #[command(subcommand)]
    pub action: ModelsAction,
}

#[derive(Debug, Subcommand)]
pub enum ModelsAction {
    /// Deploy a base model (GGUF file or HF directory under the head's model.models_root).
    Deploy(DeployArgs),
    /// A table of the deployments.
    List {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Delete a deployment: its replicas drain, then stop.
    Delete {
        name: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The deployment's name (what requests put in `model`).
    pub name: String,
    /// Its model, relative to (or under) the head's model.models_root.
    pub path: String,
    #[arg(long, value_name = "N")]
    pub replicas: Option<usize>,
    #[arg(long, value_name = "N")]
    pub min_replicas: Option<usize>,
    #[arg(long, value_name = "N")]
    pub max_replicas: Option<usize>,
    /// auto, f32, f16 or bf16.
    #[arg(long)]
    pub dtype: Option<String>,
    /// A tag its nodes must carry, KEY=VALUE (repeatable).
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
    pub tags: Vec<(String, String)>,
    /// Autoscale on load: in-flight requests per replica to aim at.
    #[arg(long, value_name = "N")]
    pub target_ongoing_requests: Option<f64>,
    #[arg(long, value_name = "S", requires = "target_ongoing_requests")]
    pub upscale_delay_s: Option<f64>,
    #[arg(long, value_name = "S", requires = "target_ongoing_requests")]
    pub downscale_delay_s: Option<f64>,
    /// Wait until it is ready (or failed).
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(Debug, Args)]
pub struct JobsArgs {
    /// A job id: print its record (no id: a table of jobs).
    pub id: Option<String>,
    /// Only jobs in this state: queued, running, succeeded, failed or cancelled.
    #[arg(long, value_name = "S")]
    pub status: Option<String>,
    /// Page size of the table (1..=500).
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub limit: usize,
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub offset: usize,
    /// Cancel the job (a running job stops after its current step).
    #[arg(long, requires = "id")]
    pub cancel: bool,
    /// Follow the job's events until it ends; exit 0 only if it succeeded.
    #[arg(long, requires = "id")]
    pub watch: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

impl Cli {
    /// The CLI's settings as `section.key=value` overrides, in increasing precedence.
    pub fn overrides(&self) -> Vec<String> {
        let mut out = self.global.set.clone();
        if let Some(f) = self.global.log_format {
            let name = match f {
                LogFormatArg::Auto => "auto",
                LogFormatArg::Json => "json",
                LogFormatArg::Pretty => "pretty",
            };
            out.push(format!("log.format={name}"));
        }
        let quoted = |s: &str| toml_string(s);
        match &self.command {
            Command::Head(a) => {
                if let Some(bind) = &a.bind {
                    out.push(format!("server.bind={}", quoted(bind)));
                }
                if let Some(port) = a.port {
                    out.push(format!("server.port={port}"));
                }
                if let Some(model) = &a.model {
                    out.push(format!("model.path={}", quoted(&model.to_string_lossy())));
                }
                for (k, v) in &a.tags {
                    out.push(format!("resources.tags.{k}={}", quoted(v)));
                }
            }
            Command::Worker(a) => {
                if let Some(model) = &a.model {
                    out.push(format!("model.path={}", quoted(&model.to_string_lossy())));
                }
                for (k, v) in &a.tags {
                    out.push(format!("resources.tags.{k}={}", quoted(v)));
                }
            }
            Command::Doctor
            | Command::Generate(_)
            | Command::Train(_)
            | Command::Chat(_)
            | Command::FineTune(_)
            | Command::Jobs(_)
            | Command::Models(_)
            | Command::Status(_) => {}
        }
        out
    }
}

/// A TOML basic string literal.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}
