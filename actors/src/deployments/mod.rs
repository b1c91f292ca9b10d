//! Model deployments (Ray Serve's deployments, Scale's model endpoints): named base models served
//! by replicas on the node's inference slots, created and deleted at runtime, kept in SQLite so a
//! restarted head restores them, and scaled within their bounds by load.
//!
//! * [`DeploymentSpec`]: what a client asks for (`POST /models`); the model given at start is the
//!   first deployment (the default one).
//! * [`Deployments`]: the shared, read-only view the HTTP side lists (states, replicas, autoscaler
//!   figures); changes go through the [`manager`] actor.
//! * [`store`]: the `deployments` table.

pub mod manager;
pub mod store;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ractor::ActorRef;
use serde::{Deserialize, Serialize};

use crate::autoscaler::{AutoscalerStats, AutoscalingConfig};
use crate::tags::Tags;

pub use manager::{
    check_host_memory, DeploymentManager, DeploymentManagerArgs, DeploymentMsg, Slot,
};
pub use store::DeploymentStore;

/// The dtype a deployment's replicas load in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// float32 on CPU (bf16 where it measures faster), bfloat16 on CUDA.
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
}

impl Dtype {
    pub fn kind(self) -> Option<tch::Kind> {
        match self {
            Dtype::Auto => None,
            Dtype::F32 => Some(tch::Kind::Float),
            Dtype::F16 => Some(tch::Kind::Half),
            Dtype::Bf16 => Some(tch::Kind::BFloat16),
        }
    }
}

/// Ray Serve's autoscaling settings of one deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoscalingSpec {
    pub target_ongoing_requests: f64,
    pub upscale_delay_s: f64,
    pub downscale_delay_s: f64,
}

/// Where a deployment may run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct PlacementSpec {
    #[serde(default)]
    pub tags: Tags,
}

/// A deployment as asked for (checked by the HTTP side: the name's form, the path confined to the
/// models root and loadable, the bounds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentSpec {
    pub name: String,
    /// GGUF file or Hugging Face directory (canonical).
    pub path: PathBuf,
    /// Replicas without autoscaling; the starting count with it (raised to `min_replicas`).
    pub replicas: usize,
    pub min_replicas: usize,
    pub max_replicas: usize,
    /// Devices per replica; `None`: the node's (`resources.tensor_parallel`).
    #[serde(default)]
    pub tensor_parallel: Option<usize>,
    #[serde(default)]
    pub dtype: Dtype,
    #[serde(default)]
    pub placement: PlacementSpec,
    /// `None`: a fixed `replicas`.
    #[serde(default)]
    pub autoscaling: Option<AutoscalingSpec>,
}

impl DeploymentSpec {
    /// The autoscaler's settings, when the deployment autoscales.
    pub fn autoscaling_config(&self) -> Option<AutoscalingConfig> {
        self.autoscaling.as_ref().map(|a| AutoscalingConfig {
            min_replicas: self.min_replicas,
            max_replicas: self.max_replicas,
            target_ongoing_requests: a.target_ongoing_requests,
            upscale_delay: Duration::from_secs_f64(a.upscale_delay_s.max(0.0)),
            downscale_delay: Duration::from_secs_f64(a.downscale_delay_s.max(0.0)),
        })
    }

    /// Replicas wanted when it is placed.
    pub fn initial_replicas(&self) -> usize {
        match &self.autoscaling {
            Some(_) => self
                .replicas
                .clamp(self.min_replicas, self.max_replicas.max(1)),
            None => self.replicas,
        }
    }
}

/// A deployment name: 1 to 64 of `A-Z a-z 0-9 . _ -`, starting with a letter or digit (it is a
/// URL path segment, a `model` value and a log field as it is).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&name.len())
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a deployment name: 1 to 64 letters, digits, `.`, `_` or `-`, starting with a letter or digit"
        ))
    }
}

/// A name for the default deployment made from a model path's file stem (`SmolLM2.Q4_1.gguf` ->
/// `SmolLM2.Q4_1`), other characters replaced with `-`.
pub fn name_from_path(path: &std::path::Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        name.insert(0, 'm');
        name.truncate(64);
    }
    name
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentState {
    /// No replica could be placed yet (no free slot, no node with its tags); `reason` says why.
    Pending,
    /// Replicas are loading.
    Deploying,
    /// At least one replica serves.
    Ready,
    /// It cannot run (does not fit, its replicas fail to load); `reason` says why.
    Failed,
    /// Deleted: its replicas drain, then it is gone.
    Deleting,
    /// Scaled to zero (`min_replicas` 0, no load): the next request starts a replica.
    Idle,
}

/// A deployment as `GET /models` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentView {
    pub name: String,
    pub spec: DeploymentSpec,
    pub state: DeploymentState,
    pub reason: Option<String>,
    /// The model given at start (cannot be deleted; change `model.path`).
    pub default: bool,
    /// Its replicas (placed, starting or serving), in start order.
    pub replicas: Vec<String>,
    /// Replicas it wants now (fixed, or the autoscaler's count).
    pub target_replicas: usize,
    /// The model name its replicas report once loaded.
    pub model: Option<String>,
    /// The autoscaler's figures, when it autoscales.
    pub autoscaler: Option<AutoscalerStats>,
    /// Seconds since the epoch.
    pub created_at: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeploymentError {
    #[error("deployment `{0}` does not exist")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the deployment manager is not running; retry shortly")]
    Unavailable,
    #[error("deployment store: {0}")]
    Store(String),
}

/// A joined worker as the deployment manager sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteNode {
    pub node: String,
    pub tags: Tags,
    /// Its inference slots: (name on the worker, devices).
    pub slots: Vec<(String, usize)>,
    /// Slots it reports serving (any state), by name on the worker.
    pub busy: Vec<String>,
}

/// The head's cluster endpoint, as the deployment manager uses it: joined workers, and starting
/// and stopping replicas on their free slots.
pub trait RemoteNodes: Send + Sync {
    fn nodes(&self) -> Vec<RemoteNode>;
    fn start(&self, node: &str, slot: &str, spec: &DeploymentSpec) -> Result<(), String>;
    fn stop(&self, node: &str, slot: &str);
}

/// Where the deployment manager starts and stops this node's replicas: the node's supervisor
/// (`supervisor.rs`), which supervises them like its other children.
pub trait ReplicaHost: Send + Sync {
    /// Starts replica `name` (its router entry already added).
    fn start(&self, name: String, args: crate::inference::InferenceArgs) -> Result<(), String>;
    /// Stops replica `name` for good; resolves once it is stopped.
    fn stop(&self, name: String) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// The deployments as the manager last published them, and the manager's address.
#[derive(Clone, Default)]
pub struct Deployments {
    views: Arc<RwLock<Vec<DeploymentView>>>,
    manager: Arc<RwLock<Option<ActorRef<DeploymentMsg>>>>,
    /// The workers (set once the head's cluster endpoint is up).
    remote: Arc<RwLock<Option<Arc<dyn RemoteNodes>>>>,
    /// The default deployment's name (fixed at start).
    default: Arc<RwLock<String>>,
    /// Requests waiting for a deployment scaled to zero to start a replica, by deployment.
    waiting: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
}

/// A request's place in a deployment's cold-start queue, given back when dropped.
pub struct ColdWaiter {
    waiting: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    name: String,
}

impl Drop for ColdWaiter {
    fn drop(&mut self) {
        let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = w.get_mut(&self.name) {
            *n -= 1;
            if *n == 0 {
                w.remove(&self.name);
            }
        }
    }
}

impl Deployments {
    /// A place in `name`'s cold-start queue, or `None` when `bound` requests already wait: the
    /// manager counts them as load and starts a replica for them.
    pub fn cold_waiter(&self, name: &str, bound: usize) -> Option<ColdWaiter> {
        let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let n = w.entry(name.to_string()).or_default();
        if *n >= bound {
            return None;
        }
        *n += 1;
        Some(ColdWaiter {
            waiting: self.waiting.clone(),
            name: name.to_string(),
        })
    }

    /// Requests waiting for `name` to start a replica.
    pub fn waiting(&self, name: &str) -> usize {
        let w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        w.get(name).copied().unwrap_or(0)
    }

    pub fn new(default: &str) -> Self {
        let d = Self::default();
        *d.default.write().expect("deployments") = default.to_string();
        d
    }

    /// Every deployment, oldest first (the default one first).
    pub fn list(&self) -> Vec<DeploymentView> {
        self.views.read().expect("deployments").clone()
    }

    pub fn get(&self, name: &str) -> Option<DeploymentView> {
        self.views
            .read()
            .expect("deployments")
            .iter()
            .find(|d| d.name == name)
            .cloned()
    }

    /// The deployment `name` names, ignoring case.
    pub fn find(&self, name: &str) -> Option<DeploymentView> {
        self.views
            .read()
            .expect("deployments")
            .iter()
            .find(|d| d.name.eq_ignore_ascii_case(name))
            .cloned()
    }

    pub fn default_name(&self) -> String {
        self.default.read().expect("deployments").clone()
    }

    pub fn manager(&self) -> Option<ActorRef<DeploymentMsg>> {
        self.manager.read().expect("deployments").clone()
    }

    pub(crate) fn set_manager(&self, manager: Option<ActorRef<DeploymentMsg>>) {
        *self.manager.write().expect("deployments") = manager;
    }

    pub fn set_remote(&self, remote: Arc<dyn RemoteNodes>) {
        *self.remote.write().expect("deployments") = Some(remote);
    }

    pub(crate) fn remote(&self) -> Option<Arc<dyn RemoteNodes>> {
        self.remote.read().expect("deployments").clone()
    }

    pub fn publish(&self, views: Vec<DeploymentView>) {
        *self.views.write().expect("deployments") = views;
    }

    /// Name -> model path of every deployment (for `base_model`).
    pub fn paths(&self) -> BTreeMap<String, PathBuf> {
        self.list()
            .into_iter()
            .map(|d| (d.name, d.spec.path))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cold_start_queue_is_bounded_and_places_come_back() {
        let d = Deployments::new("default");
        let a = d.cold_waiter("x", 2).unwrap();
        let b = d.cold_waiter("x", 2).unwrap();
        assert!(d.cold_waiter("x", 2).is_none(), "full");
        assert!(d.cold_waiter("y", 2).is_some(), "per deployment");
        assert_eq!(d.waiting("x"), 2);
        drop(a);
        assert_eq!(d.waiting("x"), 1);
        let _c = d.cold_waiter("x", 2).unwrap();
        drop(b);
        assert_eq!(d.waiting("x"), 1);
    }

    #[test]
    fn names_are_plain_tokens() {
        assert!(check_name("smollm2").is_ok());
        assert!(check_name("SmolLM2-135M-Instruct.Q4_1").is_ok());
        for bad in ["", "-x", ".x", "a/b", "a b", "a:b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert_eq!(
            name_from_path(std::path::Path::new("/m/SmolLM2-135M-Instruct.Q4_1.gguf")),
            "SmolLM2-135M-Instruct.Q4_1"
        );
        assert_eq!(
            name_from_path(std::path::Path::new("/m/my model")),
            "my-model"
        );
        assert_eq!(name_from_path(std::path::Path::new("/m/_x")), "m_x");
        assert!(check_name(&name_from_path(std::path::Path::new("/m/ü"))).is_ok());
    }

    #[test]
    fn an_autoscaled_deployment_starts_within_its_bounds() {
        let mut spec = DeploymentSpec {
            name: "a".into(),
            path: "/m".into(),
            replicas: 1,
            min_replicas: 2,
            max_replicas: 3,
            tensor_parallel: None,
            dtype: Dtype::Auto,
            placement: PlacementSpec::default(),
            autoscaling: None,
        };
        assert_eq!(spec.initial_replicas(), 1);
        spec.autoscaling = Some(AutoscalingSpec {
            target_ongoing_requests: 2.0,
            upscale_delay_s: 1.0,
            downscale_delay_s: 5.0,
        });
        assert_eq!(spec.initial_replicas(), 2);
        spec.replicas = 5;
        assert_eq!(spec.initial_replicas(), 3);
    }
}
