//! Tessera's configuration: `config/default.toml` (compiled in) overlaid by an optional file, then
//! `TESSERA_<SECTION>_<KEY>` environment variables, then CLI overrides; checked for unknown keys,
//! types and ranges. Every error names the key and where its value came from.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The defaults, compiled into the binary so it needs no file beside it.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Name of the default model file, fetched by `scripts/fetch-model.sh` into the models cache.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("unknown config key `{key}` (from {origin}){hint}")]
    UnknownKey {
        key: String,
        origin: String,
        /// `; did you mean ...?` when a known key is close, else empty.
        hint: String,
    },
    #[error("config key `{key}` (from {origin}) must be {expected}")]
    NotATable {
        key: String,
        origin: String,
        expected: &'static str,
    },
    #[error("override `{text}` must look like section.key=value")]
    BadOverride { text: String },
    #[error("invalid value for config key `{key}`: {message}")]
    BadValue { key: String, message: String },
}

/// Where a layer of settings came from; printed in errors.
#[derive(Debug, Clone)]
pub enum Origin {
    Defaults,
    File(PathBuf),
    Env(String),
    Cli,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Defaults => write!(f, "built-in defaults"),
            Origin::File(p) => write!(f, "file {}", p.display()),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::Cli => write!(f, "command line"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub log: LogConfig,
    pub model: ModelConfig,
    pub resources: ResourcesConfig,
    pub autoscaling: AutoscalingSection,
    pub batching: BatchingConfig,
    pub adapters: AdaptersConfig,
    pub training: TrainingConfig,
    pub jobs: JobsConfig,
    pub deployments: DeploymentsConfig,
    pub supervision: tessera_actors::restart_policy::RestartPolicy,
    pub cluster: ClusterConfig,
}

/// `[autoscaling]`: replicas of the served model follow load within the node's inference slots.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AutoscalingSection {
    pub enabled: bool,
    pub min_replicas: u32,
    /// 0: every inference slot.
    pub max_replicas: u32,
    pub target_ongoing_requests: f64,
    pub upscale_delay_s: f64,
    pub downscale_delay_s: f64,
    pub cold_start_queue: u32,
}

impl AutoscalingSection {
    /// The autoscaler's settings, when enabled.
    pub fn config(&self) -> Option<tessera_actors::autoscaler::AutoscalingConfig> {
        self.enabled
            .then(|| tessera_actors::autoscaler::AutoscalingConfig {
                // The model given at start always keeps a replica (scale to zero is for
                // deployments made at runtime).
                min_replicas: (self.min_replicas as usize).max(1),
                max_replicas: match self.max_replicas {
                    0 => usize::MAX,
                    n => n as usize,
                },
                target_ongoing_requests: self.target_ongoing_requests,
                upscale_delay: std::time::Duration::from_secs_f64(self.upscale_delay_s),
                downscale_delay: std::time::Duration::from_secs_f64(self.downscale_delay_s),
            })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub bind: String,
    pub port: u16,
    pub auth_token: String,
    pub max_body_bytes: u64,
    pub request_timeout_secs: u64,
    /// Moves a request may make to another replica when the one serving it is lost.
    pub request_retries: u32,
    pub allow_unauthenticated: bool,
    pub shutdown_grace_secs: u64,
    pub max_connections: u32,
    pub body_read_timeout_secs: u64,
    pub header_read_timeout_secs: u64,
    pub allowed_hosts: Vec<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `pretty` when the log stream is a terminal, `json` otherwise.
    Auto,
    Json,
    Pretty,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DtypeSetting {
    Auto,
    F32,
    F16,
    Bf16,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub path: String,
    pub dtype: DtypeSetting,
    pub models_root: String,
    /// The default deployment's name (empty: the model file's stem).
    pub name: String,
    /// Replicas of the default deployment (0: every inference slot).
    pub replicas: u32,
    /// How a GGUF's 4-bit weights are held: dequantised, packed, or auto (packed on a GPU, and on
    /// the CPU where a packed kernel measures faster).
    pub quantization: tessera_engine::loader::Quantization,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ResourcesConfig {
    pub inference_gpu_fraction: f64,
    pub training_gpu_fraction: f64,
    pub cpu_inference_slots: u32,
    pub cpu_training_slots: u32,
    pub tensor_parallel: u32,
    pub cpu_threads_per_replica: u32,
    pub cpu_threads_per_trainer: u32,
    pub tags: std::collections::BTreeMap<String, String>,
    pub host_memory_limit_mb: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BatchingConfig {
    pub max_batch_size: u32,
    pub auto_batch_size: bool,
    pub max_step_ms: u32,
    pub max_kv_tokens: u64,
    pub prefill_token_budget: u32,
    pub max_waiting: u32,
    pub prefix_cache: bool,
    pub prefix_cache_tokens: u64,
    pub max_in_flight: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdaptersConfig {
    pub root: String,
    pub cache_size: u32,
    pub cache_memory_mb: u64,
    pub affinity_slack: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainingConfig {
    pub data_root: String,
    pub max_dataset_bytes: u64,
}

/// `[deployments]`: models deployed at runtime (`POST /models`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeploymentsConfig {
    /// Deployments at most, the default one included.
    pub max: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    pub db_path: String,
    pub max_attempts: u32,
    pub max_queued: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub bind: String,
    pub port: u16,
    pub cookie: String,
    pub heartbeat_timeout_secs: u64,
    /// Accept to authenticated session (TLS handshake and cookie check), at most.
    pub handshake_timeout_secs: u64,
    /// Open cluster connections on the head at most (authenticated or not).
    pub max_connections: u32,
    /// This node's certificate chain (PEM); with `tls_key` and `tls_ca`, mutual TLS.
    pub tls_cert: String,
    /// This node's private key (PEM).
    pub tls_key: String,
    /// The CA that signs every node's certificate (PEM).
    pub tls_ca: String,
    /// Serve the cluster port without TLS on an address other than loopback.
    pub allow_plaintext: bool,
    /// A worker's name before its process id and suffix (empty: the host name); with TLS, a name
    /// its certificate is valid for.
    pub node_name: String,
}

/// The cookie of `config/default.toml`: fine on loopback, refused on any other address.
pub const DEFAULT_COOKIE: &str = "tessera-dev-cookie";

impl ClusterConfig {
    /// The TLS files, if all three are set.
    pub fn tls(&self) -> Option<tessera_actors::cluster::tls::TlsFiles> {
        (!self.tls_cert.is_empty()).then(|| tessera_actors::cluster::tls::TlsFiles {
            cert: expand_home(&self.tls_cert),
            key: expand_home(&self.tls_key),
            ca: expand_home(&self.tls_ca),
        })
    }
}

/// The layers that make a configuration, lowest precedence first after the defaults.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    /// `--config PATH`.
    pub file: Option<PathBuf>,
    /// Environment variables (all of them; non-`TESSERA_` ones are skipped).
    pub env: Vec<(String, String)>,
    /// `section.key=value` overrides from the command line, in order.
    pub cli: Vec<String>,
}

impl Sources {
    /// The process environment plus the given file and CLI overrides.
    pub fn from_process(file: Option<PathBuf>, cli: Vec<String>) -> Self {
        Self {
            file,
            env: std::env::vars().collect(),
            cli,
        }
    }
}

impl Config {
    /// The built-in defaults alone.
    pub fn defaults() -> Self {
        Self::load(&Sources::default()).expect("config/default.toml is valid")
    }

    /// Builds the configuration from its layers and validates it.
    pub fn load(sources: &Sources) -> Result<Self, ConfigError> {
        let mut table: toml::Table =
            DEFAULT_TOML
                .parse()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path: PathBuf::from("config/default.toml"),
                    message: e.to_string(),
                })?;

        if let Some(path) = &sources.file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            let file: toml::Table =
                text.parse()
                    .map_err(|e: toml::de::Error| ConfigError::Parse {
                        path: path.clone(),
                        message: e.to_string(),
                    })?;
            merge_file(&mut table, file, &Origin::File(path.clone()))?;
        }

        let mut env: Vec<_> = sources
            .env
            .iter()
            .filter(|(k, _)| k.starts_with("TESSERA_"))
            .collect();
        env.sort();
        // `TESSERA_<SECTION>_<KEY>` with a known section must name a key of it; a variable whose
        // next word is no section is not ours (a wrapper script's, a test's) and is ignored.
        for (var, value) in env {
            if let Some((section, key)) = split_env_var(&table, var) {
                set(&mut table, &section, &key, value, &Origin::Env(var.clone()))?;
            }
        }

        for text in &sources.cli {
            let (path, value) = text
                .split_once('=')
                .ok_or_else(|| ConfigError::BadOverride { text: text.clone() })?;
            let (section, key) = path
                .trim()
                .split_once('.')
                .ok_or_else(|| ConfigError::BadOverride { text: text.clone() })?;
            set(&mut table, section, key, value, &Origin::Cli)?;
        }

        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                ConfigError::BadValue {
                    key: e.path().to_string(),
                    message: e.into_inner().to_string(),
                }
            })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::BadValue {
            key: key.to_string(),
            message,
        };
        let r = &self.resources;
        tessera_actors::tags::check(&r.tags).map_err(|e| bad("resources.tags", e))?;
        if !self.model.name.is_empty() {
            tessera_actors::deployments::check_name(&self.model.name)
                .map_err(|e| bad("model.name", e))?;
        }
        let a = &self.autoscaling;
        if a.min_replicas == 0 {
            return Err(bad("autoscaling.min_replicas", "must be at least 1".into()));
        }
        if a.max_replicas != 0 && a.max_replicas < a.min_replicas {
            return Err(bad(
                "autoscaling.max_replicas",
                format!(
                    "{} is below min_replicas ({})",
                    a.max_replicas, a.min_replicas
                ),
            ));
        }
        if !(a.target_ongoing_requests > 0.0 && a.target_ongoing_requests.is_finite()) {
            return Err(bad(
                "autoscaling.target_ongoing_requests",
                "must be a positive number".into(),
            ));
        }
        for (key, v) in [
            ("autoscaling.upscale_delay_s", a.upscale_delay_s),
            ("autoscaling.downscale_delay_s", a.downscale_delay_s),
        ] {
            if !(0.0..=86_400.0).contains(&v) {
                return Err(bad(key, format!("{v} is outside 0..=86400")));
            }
        }
        for (key, v) in [
            ("resources.inference_gpu_fraction", r.inference_gpu_fraction),
            ("resources.training_gpu_fraction", r.training_gpu_fraction),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(bad(key, format!("{v} is outside 0..=1")));
            }
        }
        if r.inference_gpu_fraction + r.training_gpu_fraction > 1.0 + 1e-9 {
            return Err(bad(
                "resources.training_gpu_fraction",
                format!(
                    "inference ({}) + training ({}) fractions exceed 1",
                    r.inference_gpu_fraction, r.training_gpu_fraction
                ),
            ));
        }
        if r.tensor_parallel == 0 {
            return Err(bad(
                "resources.tensor_parallel",
                "must be at least 1".into(),
            ));
        }
        if self.server.bind.parse::<IpAddr>().is_err() {
            return Err(bad(
                "server.bind",
                format!("`{}` is not an IP address", self.server.bind),
            ));
        }
        let b = &self.batching;
        for (key, v) in [
            ("batching.max_batch_size", u64::from(b.max_batch_size)),
            ("batching.max_step_ms", u64::from(b.max_step_ms)),
            ("batching.max_kv_tokens", b.max_kv_tokens),
            (
                "batching.prefill_token_budget",
                u64::from(b.prefill_token_budget),
            ),
        ] {
            if v == 0 {
                return Err(bad(key, "must be at least 1".into()));
            }
        }
        for (key, v) in [
            (
                "server.max_connections",
                u64::from(self.server.max_connections),
            ),
            (
                "server.body_read_timeout_secs",
                self.server.body_read_timeout_secs,
            ),
            (
                "server.header_read_timeout_secs",
                self.server.header_read_timeout_secs,
            ),
            ("jobs.max_queued", u64::from(self.jobs.max_queued)),
        ] {
            if v == 0 {
                return Err(bad(key, "must be at least 1".into()));
            }
        }
        if self.adapters.cache_size == 0 {
            return Err(bad("adapters.cache_size", "must be at least 1".into()));
        }
        if self.server.auth_token.is_empty() && !self.server.allow_unauthenticated {
            let loopback = self
                .server
                .bind
                .parse::<IpAddr>()
                .map(|ip| ip.is_loopback())
                .unwrap_or(false);
            if !loopback {
                return Err(bad(
                    "server.auth_token",
                    format!(
                        "required when binding {} (not loopback); set one, or set server.allow_unauthenticated = true to serve without auth",
                        self.server.bind
                    ),
                ));
            }
        }
        if self.jobs.max_attempts == 0 {
            return Err(bad("jobs.max_attempts", "must be at least 1".into()));
        }
        // 0 would refuse every request to a deployment scaled to zero, and so never wake it.
        if self.autoscaling.cold_start_queue == 0 {
            return Err(bad(
                "autoscaling.cold_start_queue",
                "must be at least 1".into(),
            ));
        }
        let limit = self.resources.host_memory_limit_mb;
        if !(limit.is_finite() && limit >= 0.0) {
            return Err(bad(
                "resources.host_memory_limit_mb",
                format!("must be 0 (no limit) or a positive number of MiB, got {limit}"),
            ));
        }
        if self.deployments.max == 0 {
            return Err(bad("deployments.max", "must be at least 1".into()));
        }
        if self.training.max_dataset_bytes == 0 {
            return Err(bad(
                "training.max_dataset_bytes",
                "must be at least 1".into(),
            ));
        }
        if self.supervision.max_restarts == 0 {
            return Err(bad("supervision.max_restarts", "must be at least 1".into()));
        }
        if self.cluster.bind.parse::<IpAddr>().is_err() {
            return Err(bad(
                "cluster.bind",
                format!("`{}` is not an IP address", self.cluster.bind),
            ));
        }
        if self.cluster.cookie.is_empty() {
            return Err(bad("cluster.cookie", "must not be empty".into()));
        }
        let cluster_loopback = self
            .cluster
            .bind
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
        if !cluster_loopback && self.cluster.cookie == DEFAULT_COOKIE {
            return Err(bad(
                "cluster.cookie",
                format!(
                    "the default cookie is refused when cluster.bind is {} (not loopback); set a secret one on every node",
                    self.cluster.bind
                ),
            ));
        }
        if !cluster_loopback && self.cluster.tls_cert.is_empty() && !self.cluster.allow_plaintext {
            return Err(bad(
                "cluster.bind",
                format!(
                    "{} is not loopback: the cluster port carries prompts, outputs and job \
                     assignments, so it needs mutual TLS (cluster.tls_cert, cluster.tls_key, \
                     cluster.tls_ca); set cluster.allow_plaintext = true to serve it without on a \
                     network you fully trust",
                    self.cluster.bind
                ),
            ));
        }
        if self.cluster.handshake_timeout_secs == 0 {
            return Err(bad(
                "cluster.handshake_timeout_secs",
                "must be at least 1".into(),
            ));
        }
        if self.cluster.max_connections == 0 {
            return Err(bad("cluster.max_connections", "must be at least 1".into()));
        }
        let tls = [
            ("cluster.tls_cert", &self.cluster.tls_cert),
            ("cluster.tls_key", &self.cluster.tls_key),
            ("cluster.tls_ca", &self.cluster.tls_ca),
        ];
        if tls.iter().any(|(_, v)| !v.is_empty()) {
            if let Some((key, _)) = tls.iter().find(|(_, v)| v.is_empty()) {
                return Err(bad(
                    key,
                    "TLS needs all of cluster.tls_cert, cluster.tls_key and cluster.tls_ca".into(),
                ));
            }
        }
        if self.cluster.heartbeat_timeout_secs == 0 {
            return Err(bad(
                "cluster.heartbeat_timeout_secs",
                "must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The configuration as TOML, for `tessera doctor`. The auth token and cookie are masked.
    pub fn to_toml_masked(&self) -> String {
        let mut shown = self.clone();
        if !shown.server.auth_token.is_empty() {
            shown.server.auth_token = "***".into();
        }
        shown.cluster.cookie = "***".into();
        toml::to_string(&shown).expect("config serialises")
    }

    /// The engine limits of one inference replica.
    pub fn engine_config(&self) -> tessera_engine::EngineConfig {
        let b = &self.batching;
        tessera_engine::EngineConfig {
            scheduler: tessera_engine::scheduler::SchedulerConfig {
                max_batch_size: b.max_batch_size as usize,
                auto_batch_size: b.auto_batch_size,
                max_step: std::time::Duration::from_millis(u64::from(b.max_step_ms)),
                max_kv_tokens: b.max_kv_tokens as i64,
                prefill_token_budget: b.prefill_token_budget as usize,
                adapter_cache_size: self.adapters.cache_size as usize,
                adapter_cache_bytes: self.adapters.cache_memory_mb << 20,
                prefix_cache_tokens: if b.prefix_cache {
                    b.prefix_cache_tokens as usize
                } else {
                    0
                },
            },
            max_waiting: b.max_waiting as usize,
            threads: match self.resources.cpu_threads_per_replica {
                0 => None,
                n => Some(n as usize),
            },
            step_delay: None,
        }
    }

    /// Requests one replica may hold before the router refuses more (`batching.max_in_flight`).
    pub fn max_in_flight(&self) -> usize {
        let b = &self.batching;
        match b.max_in_flight {
            0 => b.max_batch_size as usize + b.max_waiting as usize,
            n => n as usize,
        }
    }

    /// Where `base_model` may point: `model.models_root`, or the models cache.
    pub fn models_root(&self) -> PathBuf {
        if self.model.models_root.is_empty() {
            cache_dir().join("models")
        } else {
            expand_home(&self.model.models_root)
        }
    }

    /// The default deployment's name: `model.name`, or the model file's stem.
    pub fn deployment_name(&self) -> String {
        if self.model.name.is_empty() {
            tessera_actors::deployments::name_from_path(&self.model_path())
        } else {
            self.model.name.clone()
        }
    }

    /// The model to serve: `model.path`, or the default GGUF in the models cache.
    pub fn model_path(&self) -> PathBuf {
        if self.model.path.is_empty() {
            cache_dir().join("models").join(DEFAULT_MODEL_FILE)
        } else {
            expand_home(&self.model.path)
        }
    }
}

/// Tessera's cache directory: `$TESSERA_CACHE`, else `~/.cache/tessera` (the scripts agree).
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("TESSERA_CACHE") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => home_dir().join(".cache").join("tessera"),
    }
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// Expands a leading `~/` to `$HOME`.
pub fn expand_home(path: &str) -> PathBuf {
    match path.strip_prefix("~/") {
        Some(rest) => home_dir().join(rest),
        None if path == "~" => home_dir(),
        None => Path::new(path).to_path_buf(),
    }
}

/// Overlays a config file on the table; every section and key must already exist.
fn merge_file(
    table: &mut toml::Table,
    file: toml::Table,
    origin: &Origin,
) -> Result<(), ConfigError> {
    for (section, value) in file {
        let toml::Value::Table(entries) = value else {
            return Err(ConfigError::NotATable {
                key: section,
                origin: origin.to_string(),
                expected: "a [section]",
            });
        };
        for (key, v) in entries {
            let slot = slot(table, &section, &key, origin)?;
            *slot = v;
        }
    }
    Ok(())
}

fn slot<'t>(
    table: &'t mut toml::Table,
    section: &str,
    key: &str,
    origin: &Origin,
) -> Result<&'t mut toml::Value, ConfigError> {
    let hint = closest_key(table, section, key)
        .map(|k| match origin {
            Origin::Env(_) => format!(
                "; did you mean `{k}` (TESSERA_{})?",
                k.replace('.', "_").to_ascii_uppercase()
            ),
            _ => format!("; did you mean `{k}`?"),
        })
        .unwrap_or_default();
    let unknown = || ConfigError::UnknownKey {
        key: format!("{section}.{key}"),
        origin: origin.to_string(),
        hint: hint.clone(),
    };
    match table.get_mut(section) {
        Some(toml::Value::Table(entries)) => entries.get_mut(key).ok_or_else(unknown),
        _ => Err(unknown()),
    }
}

/// The known `section.key` most like `section.key`, if one is close enough to be a typo.
fn closest_key(table: &toml::Table, section: &str, key: &str) -> Option<String> {
    let wanted = format!("{section}.{key}");
    table
        .iter()
        .filter_map(|(s, v)| Some((s, v.as_table()?)))
        .flat_map(|(s, entries)| entries.keys().map(move |k| format!("{s}.{k}")))
        .map(|known| (strsim::jaro_winkler(&wanted, &known), known))
        .filter(|(score, _)| *score >= 0.85)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, known)| known)
}

/// Sets one value given as text: TOML syntax (`8000`, `0.5`, `true`, `"x"`) or a bare string.
fn set(
    table: &mut toml::Table,
    section: &str,
    key: &str,
    text: &str,
    origin: &Origin,
) -> Result<(), ConfigError> {
    // `section.key.sub` sets one entry of a table-valued key (`resources.tags.zone=b`).
    let (key, sub) = match key.trim().split_once('.') {
        Some((k, s)) => (k, Some(s.trim())),
        None => (key.trim(), None),
    };
    let slot = slot(table, section.trim(), key, origin)?;
    let slot = match (sub, slot) {
        (None, slot) => slot,
        (Some(sub), toml::Value::Table(entries)) => entries
            .entry(sub.to_string())
            .or_insert(toml::Value::Boolean(false)),
        (Some(_), _) => {
            return Err(ConfigError::NotATable {
                key: format!("{}.{key}", section.trim()),
                origin: origin.to_string(),
                expected: "a table (to set one of its entries)",
            })
        }
    };
    let text = text.trim();
    let parsed = format!("v = {text}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"));
    *slot = match parsed {
        // A bare word where the default is a string is that string (TESSERA_LOG_FORMAT=pretty).
        Some(v) => v,
        None => toml::Value::String(text.to_string()),
    };
    Ok(())
}

/// `TESSERA_SERVER_MAX_BODY_BYTES` → (`server`, `max_body_bytes`), matched against known sections;
/// `None` when the word after the prefix is no section.
fn split_env_var(table: &toml::Table, var: &str) -> Option<(String, String)> {
    let rest = var["TESSERA_".len()..].to_ascii_lowercase();
    table.keys().find_map(|section| {
        rest.strip_prefix(&format!("{section}_"))
            .map(|key| (section.clone(), key.to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load_and_match_the_documented_values() {
        let c = Config::defaults();
        assert_eq!(c.resources.inference_gpu_fraction, 0.6);
        assert_eq!(c.resources.training_gpu_fraction, 0.4);
        assert_eq!(c.server.port, 8000);
        assert_eq!(c.log.format, LogFormat::Auto);
    }

    #[test]
    fn string_values_accept_bare_words() {
        let c = Config::load(&Sources {
            cli: vec!["log.format=pretty".into(), "model.dtype=bf16".into()],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.log.format, LogFormat::Pretty);
        assert_eq!(c.model.dtype, DtypeSetting::Bf16);
    }

    #[test]
    fn expand_home_only_touches_a_leading_tilde() {
        let home = home_dir();
        assert_eq!(expand_home("~/x/y"), home.join("x/y"));
        assert_eq!(expand_home("/a/~/b"), PathBuf::from("/a/~/b"));
    }
}
