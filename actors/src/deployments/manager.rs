//! The deployment manager (one per head, a child of the node's supervisor): owns the deployments
//! and which inference slot serves which. It places a deployment's replicas on free slots (when
//! the node carries the deployment's tags and the model fits), starts and stops them through the
//! supervisor, scales autoscaled deployments on the router's in-flight counts (Ray Serve's rule,
//! see [`crate::autoscaler`]), drains a replica before it stops, and publishes what it holds to
//! [`Deployments`] for the HTTP side. Deployments created at runtime are kept in SQLite.
//!
//! Its state is rebuilt from the store and the router (which labels every replica with its
//! deployment), so a restarted manager adopts the replicas that kept running.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tessera_engine::EngineConfig;

use super::{
    DeploymentError, DeploymentSpec, DeploymentState, DeploymentStore, DeploymentView, Deployments,
    RemoteNode, ReplicaHost,
};
use crate::autoscaler::{self, AutoscalerStats, Decider, Scale};
use crate::health::{ActorState, HealthBoard};
use crate::inference::InferenceArgs;
use crate::inventory::Device;
use crate::messages::ReplicaInfo;
use crate::router::Router;
use crate::tags::{self, Tags};

/// How often the manager looks at load and replica states.
const TICK: Duration = Duration::from_millis(200);

/// How long a worker that refused a replica of a deployment gets no other one of it.
const REFUSAL_BACKOFF: Duration = Duration::from_secs(60);

/// An inference slot of the node (devices and engine settings), free or serving a deployment.
#[derive(Clone)]
pub struct Slot {
    pub name: String,
    pub devices: Vec<Device>,
    pub engine: EngineConfig,
    /// How its replicas hold a GGUF's 4-bit weights (`model.quantization`).
    pub quantization: tessera_engine::loader::Quantization,
}

impl Slot {
    /// The router's entry of a replica of `deployment` starting here on `node`.
    pub fn replica_info(&self, node: &str, deployment: &str) -> ReplicaInfo {
        ReplicaInfo {
            name: self.name.clone(),
            node: node.to_string(),
            devices: self.devices.iter().map(|d| d.to_string()).collect(),
            tensor_parallel: self.devices.len(),
            state: ActorState::Starting,
            in_flight: 0,
            adapters: Vec::new(),
            model: None,
            dtype: None,
            weights: None,
            deployment: deployment.to_string(),
            fingerprint: None,
        }
    }

    /// Bytes the weights of a replica of `path` (in `kind`, float32 when unset) take in host
    /// memory on this slot: `None` on a GPU slot, or when the file cannot be sized (its load says
    /// why).
    pub fn host_bytes(&self, path: &std::path::Path, kind: Option<tch::Kind>) -> Option<u64> {
        if self.devices.iter().any(|d| matches!(d, Device::Cuda(_))) {
            return None;
        }
        tessera_engine::footprint::weight_bytes(path, kind.unwrap_or(tch::Kind::Float)).ok()
    }

    /// What the inference actor of a replica of `model_path` here starts from (`generation`: its
    /// router entry's, from [`Router::add_replica`]).
    pub fn inference_args(
        &self,
        model_path: std::path::PathBuf,
        kind: Option<tch::Kind>,
        router: &Router,
        health: &HealthBoard,
        generation: u64,
    ) -> InferenceArgs {
        InferenceArgs {
            name: self.name.clone(),
            model_path,
            devices: self.devices.iter().map(torch_device).collect(),
            kind,
            quantization: self.quantization,
            engine: self.engine.clone(),
            router: router.clone(),
            health: health.clone(),
            generation,
        }
    }
}

#[derive(Clone)]
pub struct DeploymentManagerArgs {
    pub db_path: std::path::PathBuf,
    pub node: String,
    pub tags: Tags,
    pub slots: Vec<Slot>,
    pub router: Router,
    pub health: HealthBoard,
    pub deployments: Deployments,
    /// The model given at start.
    pub default: DeploymentSpec,
    /// Deployments at most, the default one included (`deployments.max`).
    pub max: usize,
    /// Bytes the weights of this node's CPU replicas may hold together
    /// (`resources.host_memory_limit_mb`; `None`: no limit but the host's available memory).
    pub host_memory_limit: Option<u64>,
    /// Where it starts and stops this node's replicas: set by the node's supervisor when it
    /// starts the manager.
    pub host: Option<std::sync::Arc<dyn ReplicaHost>>,
}

pub enum DeploymentMsg {
    Create(
        DeploymentSpec,
        RpcReplyPort<Result<DeploymentView, DeploymentError>>,
    ),
    Delete(
        String,
        RpcReplyPort<Result<DeploymentView, DeploymentError>>,
    ),
    Tick,
    /// A draining replica finished its requests and stopped: its slot is free.
    Drained(String),
    /// A worker did not start `replica` (`node/slot`) of `deployment`, and why.
    Refused {
        replica: String,
        deployment: String,
        why: String,
    },
}

impl ractor::Message for DeploymentMsg {}

/// Where a replica goes.
enum Place {
    Local(usize),
    Remote { node: String, slot: String },
}

/// One deployment as the manager runs it.
struct Live {
    spec: DeploymentSpec,
    default: bool,
    created_at: f64,
    /// Slots serving it (starting or running), in start order.
    replicas: Vec<String>,
    /// Slots draining (no new requests; stop once idle).
    draining: Vec<String>,
    /// Replicas wanted now.
    want: usize,
    deleting: bool,
    /// Why it cannot run on this node (does not fit); it may still run on a worker.
    local_unfit: Option<String>,
    /// Why it cannot run anywhere now (it does not fit here and no worker can take it).
    failure: Option<String>,
    /// Why not every wanted replica is placed.
    pending: Option<String>,
    /// Workers that refused a replica of it lately: (node, when, why).
    refused: Vec<(String, Instant, String)>,
    decider: Decider,
    /// Since when a replica is starting from zero for waiting requests.
    cold_since: Option<Instant>,
    stats: Option<AutoscalerStats>,
}

pub struct ManagerState {
    args: DeploymentManagerArgs,
    host: std::sync::Arc<dyn ReplicaHost>,
    store: DeploymentStore,
    lives: Vec<Live>,
}

pub struct DeploymentManager;

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn torch_device(d: &Device) -> tch::Device {
    match d {
        Device::Cpu => tch::Device::Cpu,
        Device::Cuda(i) => tch::Device::Cuda(*i),
    }
}

fn gib(bytes: u64) -> String {
    if bytes < 1 << 30 {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    }
}

/// Why `spec` can never run on `slots` (devices per replica, memory), or `None`.
fn unfit(spec: &DeploymentSpec, slots: &[Slot]) -> Option<String> {
    let per_replica = slots.first().map(|s| s.devices.len()).unwrap_or(0);
    if let Some(tp) = spec.tensor_parallel {
        if !slots.is_empty() && tp != per_replica {
            return Some(format!(
                "needs {tp} devices per replica (tensor_parallel); this node's inference slots have {per_replica} (resources.tensor_parallel)"
            ));
        }
    }
    let on_gpu = slots
        .first()
        .is_some_and(|s| s.devices.iter().any(|d| matches!(d, Device::Cuda(_))));
    let kind = spec.dtype.kind().unwrap_or(if on_gpu {
        tch::Kind::BFloat16
    } else {
        tch::Kind::Float
    });
    let need = match tessera_engine::footprint::weight_bytes(&spec.path, kind) {
        Ok(n) => n,
        Err(e) => return Some(format!("{}: {e}", spec.path.display())),
    };
    if on_gpu {
        let free: Vec<(usize, Option<u64>)> = slots
            .iter()
            .flat_map(|s| s.devices.iter())
            .filter_map(|d| match d {
                Device::Cuda(i) => Some(*i),
                Device::Cpu => None,
            })
            .collect::<Vec<_>>()
            .chunks(per_replica.max(1))
            .next()
            .map(crate::inventory::gpu_free_bytes)
            .unwrap_or_default();
        let per_device = need / per_replica.max(1) as u64;
        if let Err(e) = crate::inventory::fits_on_each(per_device, &free) {
            return Some(format!(
                "needs {per_replica} device(s) with {} free each: {e}",
                gib(per_device)
            ));
        }
    } else {
        let mut sys = sysinfo::System::new();
        sys.refresh_memory();
        let available = sys.available_memory();
        if available > 0 && need > available {
            return Some(format!(
                "needs {} of host memory for its weights; {} is available",
                gib(need),
                gib(available)
            ));
        }
    }
    None
}

/// Host memory a replica of `spec` takes on `slot` (see [`Slot::host_bytes`]).
fn host_need(spec: &DeploymentSpec, slot: &Slot) -> Option<u64> {
    slot.host_bytes(&spec.path, spec.dtype.kind())
}

/// The host-memory rule of a CPU replica start, on a head and on a worker alike: `need` more
/// bytes of weights fit when, with the `held` bytes of the node's other replicas, they stay within
/// `limit` (`resources.host_memory_limit_mb`), and when the host's available memory holds them and
/// the `loading` bytes of replicas that have not loaded yet.
pub fn check_host_memory(
    need: u64,
    held: u64,
    loading: u64,
    limit: Option<u64>,
) -> Result<(), String> {
    if let Some(limit) = limit {
        if held + need > limit {
            return Err(format!(
                "a replica needs {} of host memory for its weights; this node's replicas hold \
                 {} of the {} that resources.host_memory_limit_mb allows",
                gib(need),
                gib(held),
                gib(limit)
            ));
        }
    }
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    let available = sys.available_memory();
    if available > 0 && need + loading > available {
        return Err(format!(
            "a replica needs {} of host memory for its weights; {} is available, {} of it about \
             to be taken by replicas still loading",
            gib(need),
            gib(available),
            gib(loading)
        ));
    }
    Ok(())
}

impl Live {
    fn new(spec: DeploymentSpec, default: bool, created_at: f64, slots: &[Slot]) -> Self {
        let local_unfit = unfit(&spec, slots);
        let stats = spec.autoscaling_config().map(|c| AutoscalerStats {
            min_replicas: c.min_replicas,
            max_replicas: c.max_replicas.min(slots.len()),
            ..Default::default()
        });
        Self {
            want: spec.initial_replicas(),
            spec,
            default,
            created_at,
            replicas: Vec::new(),
            draining: Vec::new(),
            deleting: false,
            failure: local_unfit.clone(),
            local_unfit,
            pending: None,
            refused: Vec::new(),
            decider: Decider::default(),
            cold_since: None,
            stats,
        }
    }
}

impl Actor for DeploymentManager {
    type Msg = DeploymentMsg;
    type State = ManagerState;
    type Arguments = DeploymentManagerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<DeploymentMsg>,
        args: DeploymentManagerArgs,
    ) -> Result<ManagerState, ActorProcessingErr> {
        let host = args
            .host
            .clone()
            .ok_or("the deployment manager needs its supervisor")?;
        let db = args.db_path.clone();
        let store = tokio::task::spawn_blocking(move || DeploymentStore::open(&db)).await??;
        let stored = store.all()?;
        let slots = args.slots.clone();
        let default_spec = args_default_spec(&slots, &args.default);
        let (default, stored) = tokio::task::spawn_blocking(move || {
            let default = Live::new(default_spec, true, now_s(), &slots);
            let stored: Vec<Live> = stored
                .into_iter()
                .map(|(spec, at)| Live::new(spec, false, at, &slots))
                .collect();
            (default, stored)
        })
        .await?;
        let default_name = default.spec.name.clone();
        let mut lives = vec![default];
        lives.extend(stored.into_iter().filter(|l| l.spec.name != default_name));
        let mut state = ManagerState {
            args,
            host,
            store,
            lives,
        };
        state.adopt(&myself);
        for l in &state.lives {
            tracing::info!(deployment = %l.spec.name, path = %l.spec.path.display(), replicas = l.want, default = l.default, failure = ?l.failure, "deployment restored");
        }
        Ok(state)
    }

    async fn post_start(
        &self,
        myself: ActorRef<DeploymentMsg>,
        state: &mut ManagerState,
    ) -> Result<(), ActorProcessingErr> {
        state.reconcile(&myself);
        state.publish();
        myself.send_interval(TICK, || DeploymentMsg::Tick);
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<DeploymentMsg>,
        state: &mut ManagerState,
    ) -> Result<(), ActorProcessingErr> {
        state.args.deployments.set_manager(None);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<DeploymentMsg>,
        msg: DeploymentMsg,
        state: &mut ManagerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DeploymentMsg::Create(spec, reply) => {
                let _ = reply.send(state.create(&myself, spec).await);
            }
            DeploymentMsg::Delete(name, reply) => {
                let _ = reply.send(state.delete(&myself, &name));
            }
            DeploymentMsg::Tick => {
                state.autoscale();
                state.reconcile(&myself);
                state.publish();
            }
            DeploymentMsg::Refused {
                replica,
                deployment,
                why,
            } => {
                if let Some(l) = state
                    .lives
                    .iter_mut()
                    .find(|l| l.spec.name == deployment && l.replicas.contains(&replica))
                {
                    l.replicas.retain(|r| *r != replica);
                    let node = replica.split_once('/').map_or("", |(n, _)| n).to_string();
                    tracing::warn!(%deployment, %replica, %why, backoff_s = REFUSAL_BACKOFF.as_secs(), "a worker refused a replica; placing it elsewhere");
                    l.refused.retain(|(n, _, _)| *n != node);
                    l.refused.push((node, Instant::now(), why));
                    state.reconcile(&myself);
                    state.publish();
                }
            }
            DeploymentMsg::Drained(slot) => {
                for l in &mut state.lives {
                    l.draining.retain(|s| *s != slot);
                }
                state.reconcile(&myself);
                state.publish();
            }
        }
        Ok(())
    }
}

/// The default deployment as configured, its counts within the node's slots.
fn args_default_spec(slots: &[Slot], spec: &DeploymentSpec) -> DeploymentSpec {
    let n = slots.len();
    DeploymentSpec {
        replicas: spec.replicas.min(n),
        max_replicas: spec.max_replicas.min(n),
        min_replicas: spec.min_replicas.min(n),
        ..spec.clone()
    }
}

impl ManagerState {
    /// Takes over the replicas the router lists on this node's slots (started by the node before
    /// the manager, or by a manager that crashed): each stays with its deployment, or drains when
    /// its deployment is gone.
    fn adopt(&mut self, myself: &ActorRef<DeploymentMsg>) {
        for r in self.args.router.replicas() {
            // A worker's replicas of a runtime deployment (its own model's are its own).
            if r.node != self.args.node {
                if let Some(l) = self
                    .lives
                    .iter_mut()
                    .find(|l| !l.default && l.spec.name == r.deployment)
                {
                    l.replicas.push(r.name.clone());
                    l.want = l.want.max(l.replicas.len());
                }
                continue;
            }
            if !self.args.slots.iter().any(|s| s.name == r.name) {
                continue;
            }
            match self.lives.iter_mut().find(|l| l.spec.name == r.deployment) {
                Some(l) if r.state != ActorState::Draining => {
                    l.replicas.push(r.name.clone());
                    l.want = l.want.max(l.replicas.len());
                }
                Some(l) => {
                    l.draining.push(r.name.clone());
                    self.drain_task(myself, r.name.clone());
                }
                None => self.orphan(myself, r.name.clone()),
            }
        }
    }

    /// Drains a replica that belongs to no deployment.
    fn orphan(&mut self, myself: &ActorRef<DeploymentMsg>, slot: String) {
        tracing::info!(replica = %slot, "replica of a deleted deployment; draining it");
        self.args.router.set_draining(&slot);
        self.drain_task(myself, slot);
    }

    async fn create(
        &mut self,
        myself: &ActorRef<DeploymentMsg>,
        spec: DeploymentSpec,
    ) -> Result<DeploymentView, DeploymentError> {
        if let Some(l) = self
            .lives
            .iter()
            .find(|l| l.spec.name.eq_ignore_ascii_case(&spec.name))
        {
            return Err(DeploymentError::Conflict(format!(
                "a deployment named `{}` exists ({}); delete it first or choose another name",
                l.spec.name,
                if l.deleting { "being deleted" } else { "live" }
            )));
        }
        let live = self.lives.iter().filter(|l| !l.deleting).count();
        if live >= self.args.max {
            return Err(DeploymentError::Conflict(format!(
                "{live} deployments exist, the most this head keeps (deployments.max = {}); \
                 delete one first",
                self.args.max
            )));
        }
        let created = now_s();
        let slots = self.args.slots.clone();
        let check = spec.clone();
        let live = tokio::task::spawn_blocking(move || Live::new(check, false, created, &slots))
            .await
            .map_err(|e| DeploymentError::Store(e.to_string()))?;
        self.store.insert(&spec, created)?;
        tracing::info!(deployment = %spec.name, path = %spec.path.display(), replicas = live.want, autoscaling = spec.autoscaling.is_some(), tags = %tags::describe(&spec.placement.tags), failure = ?live.failure, "deployment created");
        self.lives.push(live);
        self.reconcile(myself);
        self.publish();
        Ok(self.view(self.lives.len() - 1))
    }

    fn delete(
        &mut self,
        myself: &ActorRef<DeploymentMsg>,
        name: &str,
    ) -> Result<DeploymentView, DeploymentError> {
        let Some(i) = self.lives.iter().position(|l| l.spec.name == name) else {
            return Err(DeploymentError::NotFound(name.to_string()));
        };
        if self.lives[i].default {
            return Err(DeploymentError::Conflict(format!(
                "`{name}` is the model given at start (model.path); it cannot be deleted, change model.path instead"
            )));
        }
        if !self.lives[i].deleting {
            self.store.delete(name)?;
            let l = &mut self.lives[i];
            l.deleting = true;
            l.want = 0;
            tracing::info!(deployment = %name, replicas = l.replicas.len(), "deployment deleted; draining its replicas");
        }
        let view = self.view(i);
        self.reconcile(myself);
        self.publish();
        Ok(view)
    }

    /// Whether a deployment holds (or drains) the replica named `name` in the router.
    fn used(&self, name: &str) -> bool {
        self.lives
            .iter()
            .any(|l| l.replicas.iter().any(|r| r == name) || l.draining.iter().any(|r| r == name))
    }

    /// A free local slot: held by no deployment and not in the router.
    fn free_local(&self) -> Option<usize> {
        self.args
            .slots
            .iter()
            .position(|s| !self.used(&s.name) && self.args.router.in_flight(&s.name).is_none())
    }

    /// Where live `i` may put its next replica, or why nowhere (`Err((reason, fatal))`: fatal
    /// when no node could ever take it as things are).
    fn place(&self, i: usize, remote: &[RemoteNode]) -> Result<Place, (String, bool)> {
        let spec = &self.lives[i].spec;
        let required = &spec.placement.tags;
        let tags_here = tags::satisfies(&self.args.tags, required);
        let here = tags_here && self.lives[i].local_unfit.is_none() && !self.args.slots.is_empty();
        // The model given at start runs on the head's slots (workers serve it with their own).
        let refused = |node: &str| {
            self.lives[i]
                .refused
                .iter()
                .any(|(n, at, _)| n == node && at.elapsed() < REFUSAL_BACKOFF)
        };
        let workers: Vec<&RemoteNode> = remote
            .iter()
            .filter(|n| !self.lives[i].default && tags::satisfies(&n.tags, required))
            .collect();
        if here {
            if let Some(s) = self.free_local() {
                return Ok(Place::Local(s));
            }
        }
        for n in &workers {
            for (slot, devices) in &n.slots {
                let name = format!("{}/{slot}", n.node);
                if spec.tensor_parallel.is_some_and(|tp| tp != *devices)
                    || refused(&n.node)
                    || n.busy.contains(slot)
                    || self.used(&name)
                {
                    continue;
                }
                return Ok(Place::Remote {
                    node: n.node.clone(),
                    slot: slot.clone(),
                });
            }
        }
        if workers.is_empty() {
            if let (true, Some(why)) = (tags_here, &self.lives[i].local_unfit) {
                return Err((why.clone(), true));
            }
            if !tags_here {
                let describe = |t: &Tags| match tags::describe(t) {
                    t if t.is_empty() => "no tags".to_string(),
                    t => t,
                };
                return Err((
                    format!(
                        "no node carries the tags {} (head: {}; {} worker(s)); it is placed when one does",
                        tags::describe(required),
                        describe(&self.args.tags),
                        remote.len()
                    ),
                    false,
                ));
            }
        }
        let l = &self.lives[i];
        Err((
            format!(
                "{} of {} replicas placed: no free inference slot ({} slots here{}; held by {})",
                l.replicas.len(),
                l.want,
                self.args.slots.len(),
                if remote.is_empty() {
                    String::new()
                } else {
                    format!(
                        ", {} on workers",
                        remote.iter().map(|n| n.slots.len()).sum::<usize>()
                    )
                },
                match self.holders() {
                    h if h.is_empty() => "nobody".to_string(),
                    h => h,
                }
            ),
            false,
        ))
    }

    /// Who holds the slots, for a pending reason.
    fn holders(&self) -> String {
        self.lives
            .iter()
            .filter(|l| !l.replicas.is_empty() || !l.draining.is_empty())
            .map(|l| format!("{}: {}", l.spec.name, l.replicas.len() + l.draining.len()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Updates each autoscaled deployment's wanted count from its in-flight requests.
    fn autoscale(&mut self) {
        let remote = self.remote_nodes();
        let slots = self.args.slots.len() + remote.iter().map(|n| n.slots.len()).sum::<usize>();
        let free: Vec<bool> = (0..self.lives.len())
            .map(|i| self.place(i, &remote).is_ok())
            .collect();
        let router = self.args.router.clone();
        for (l, free) in self.lives.iter_mut().zip(free) {
            let Some(mut config) = l.spec.autoscaling_config() else {
                continue;
            };
            if l.deleting || l.failure.is_some() {
                continue;
            }
            config.max_replicas = config.max_replicas.min(slots).max(1);
            let waiting = self.args.deployments.waiting(&l.spec.name);
            let ongoing: usize = l
                .replicas
                .iter()
                .filter_map(|r| router.in_flight(r))
                .sum::<usize>()
                + waiting;
            let current = l.replicas.len();
            let want = autoscaler::desired(ongoing, &config);
            let stats = l.stats.get_or_insert_with(AutoscalerStats::default);
            stats.waiting = waiting;
            // A cold start ends when one of its replicas serves.
            if let Some(since) = l.cold_since {
                let serving = router
                    .replicas()
                    .iter()
                    .any(|r| l.replicas.contains(&r.name) && r.state == ActorState::Running);
                if serving {
                    let took = since.elapsed().as_secs_f64();
                    stats.cold_starts += 1;
                    stats.last_cold_start_s = Some(took);
                    l.cold_since = None;
                    tracing::info!(deployment = %l.spec.name, seconds = took, "cold start: a replica serves");
                }
            }
            // Scaled to zero with requests waiting: a replica at once, no upscale delay.
            if current == 0 && l.want == 0 && waiting > 0 && free {
                l.want = 1;
                l.cold_since = Some(Instant::now());
                stats.scale_ups += 1;
                stats.last_decision = Some(format!(
                    "up to 1 replica from zero ({waiting} requests waiting)"
                ));
                tracing::info!(deployment = %l.spec.name, waiting, "autoscaler: starting a replica from zero");
                continue;
            }
            let decision = if l.draining.is_empty() && l.want == current {
                l.decider.decide(Instant::now(), current, want, &config)
            } else {
                None
            };
            stats.ongoing = ongoing;
            stats.desired = want;
            stats.min_replicas = config.min_replicas;
            stats.max_replicas = config.max_replicas;
            let target = config.target_ongoing_requests;
            match decision {
                Some(Scale::Up) if free => {
                    l.want = current + 1;
                    stats.scale_ups += 1;
                    let what = format!(
                        "up to {} replicas ({ongoing} ongoing requests, target {target} per replica)",
                        current + 1
                    );
                    tracing::info!(deployment = %l.spec.name, ongoing, current, desired = want, "autoscaler: scaling up");
                    stats.last_decision = Some(what);
                }
                Some(Scale::Up) => {
                    let what = format!(
                        "wanted {want} replicas ({ongoing} ongoing requests, target {target} per replica); no free inference slot"
                    );
                    if stats.last_decision.as_deref() != Some(&what) {
                        tracing::info!(deployment = %l.spec.name, ongoing, current, desired = want, "autoscaler: no free slot to scale up");
                        stats.last_decision = Some(what);
                    }
                }
                Some(Scale::Down) => {
                    let newest = l.replicas.last().cloned().unwrap_or_default();
                    let holding = router.in_flight(&newest).unwrap_or(0);
                    l.want = current - 1;
                    stats.scale_downs += 1;
                    let what = format!(
                        "down to {} replicas ({ongoing} ongoing requests, target {target} per replica): draining {newest} ({holding} in flight)",
                        current - 1
                    );
                    tracing::info!(deployment = %l.spec.name, ongoing, current, desired = want, replica = %newest, in_flight = holding, "autoscaler: scaling down");
                    stats.last_decision = Some(what);
                }
                None => {}
            }
        }
    }

    fn remote_nodes(&self) -> Vec<RemoteNode> {
        self.args
            .deployments
            .remote()
            .map(|r| r.nodes())
            .unwrap_or_default()
    }

    /// Moves every deployment toward its wanted count: forgets replicas of workers that are gone,
    /// drains replicas beyond it, places replicas on free slots (here, or on a worker carrying its
    /// tags) up to it (or says why not), forgets deleted deployments once drained.
    fn reconcile(&mut self, myself: &ActorRef<DeploymentMsg>) {
        let remote = self.remote_nodes();
        let alive = |name: &String| match name.split_once('/') {
            None => true,
            Some((node, _)) => remote.iter().any(|n| n.node == node),
        };
        for l in &mut self.lives {
            let before = l.replicas.len();
            l.replicas.retain(alive);
            l.draining.retain(alive);
            if l.replicas.len() < before {
                tracing::warn!(deployment = %l.spec.name, lost = before - l.replicas.len(), "replicas lost with their worker; placing them again");
            }
        }
        for i in 0..self.lives.len() {
            while self.lives[i].replicas.len() > self.lives[i].want {
                let slot = self.lives[i].replicas.pop().expect("a replica");
                self.args.router.set_draining(&slot);
                self.lives[i].draining.push(slot.clone());
                self.drain_task(myself, slot);
            }
            self.lives[i].failure = None;
            self.lives[i].pending = None;
            while self.lives[i].replicas.len() < self.lives[i].want {
                match self.place(i, &remote) {
                    Ok(place) => {
                        if let Err(e) = self.start_replica(i, place) {
                            self.lives[i].pending = Some(e);
                            break;
                        }
                    }
                    Err((why, fatal)) => {
                        if fatal && self.lives[i].replicas.is_empty() {
                            self.lives[i].failure = Some(why);
                        } else {
                            // Say why the workers that could have taken it did not.
                            let refusals: Vec<String> = self.lives[i]
                                .refused
                                .iter()
                                .filter(|(_, at, _)| at.elapsed() < REFUSAL_BACKOFF)
                                .map(|(n, _, w)| format!("worker {n} refused one: {w}"))
                                .collect();
                            self.lives[i].pending = Some(if refusals.is_empty() {
                                why
                            } else {
                                format!("{why}; {}", refusals.join("; "))
                            });
                        }
                        break;
                    }
                }
            }
        }
        self.lives.retain(|l| {
            let gone = l.deleting && l.replicas.is_empty() && l.draining.is_empty();
            if gone {
                tracing::info!(deployment = %l.spec.name, "deployment removed");
            }
            !gone
        });
    }

    fn start_replica(&mut self, live: usize, place: Place) -> Result<(), String> {
        let spec = &self.lives[live].spec;
        let slot = match place {
            Place::Remote { node, slot } => {
                let remote = self
                    .args
                    .deployments
                    .remote()
                    .ok_or("the cluster endpoint is not up")?;
                remote.start(&node, &slot, spec)?;
                tracing::info!(deployment = %spec.name, %node, replica = %slot, path = %spec.path.display(), "starting a replica on a worker");
                self.lives[live].replicas.push(format!("{node}/{slot}"));
                return Ok(());
            }
            Place::Local(i) => {
                let slot = self.args.slots[i].clone();
                self.fits_host_memory(spec, &slot)?;
                slot
            }
        };
        let spec = &self.lives[live].spec;
        tracing::info!(deployment = %spec.name, replica = %slot.name, path = %spec.path.display(), "starting a replica");
        let generation = self
            .args
            .router
            .add_replica(slot.replica_info(&self.args.node, &spec.name));
        let args = slot.inference_args(
            spec.path.clone(),
            spec.dtype.kind(),
            &self.args.router,
            &self.args.health,
            generation,
        );
        self.host.start(slot.name.clone(), args)?;
        self.lives[live].replicas.push(slot.name);
        Ok(())
    }

    /// Whether one more replica of `spec` on the CPU slot `slot` fits in host memory: its weights
    /// with those of the node's other replicas within `resources.host_memory_limit_mb`, and within
    /// the host's available memory less what replicas still loading will take. Checked before
    /// each start, so `replicas: 3` where one copy fits starts one and says why not the rest.
    fn fits_host_memory(&self, spec: &DeploymentSpec, slot: &Slot) -> Result<(), String> {
        let Some(need) = host_need(spec, slot) else {
            return Ok(());
        };
        let router = self.args.router.replicas();
        let (mut held, mut loading) = (0u64, 0u64);
        for l in &self.lives {
            for r in l.replicas.iter().chain(&l.draining) {
                let Some(s) = self.args.slots.iter().find(|s| s.name == *r) else {
                    continue; // on a worker
                };
                let Some(n) = host_need(&l.spec, s) else {
                    continue;
                };
                held += n;
                if router
                    .iter()
                    .find(|x| x.name == *r)
                    .is_none_or(|x| x.model.is_none())
                {
                    loading += n;
                }
            }
        }
        check_host_memory(need, held, loading, self.args.host_memory_limit)
    }

    /// Waits for a draining replica to hold no request, stops it, and reports its slot free.
    fn drain_task(&self, myself: &ActorRef<DeploymentMsg>, slot: String) {
        let (router, host, myself, remote) = (
            self.args.router.clone(),
            self.host.clone(),
            myself.clone(),
            self.args.deployments.remote(),
        );
        tokio::spawn(async move {
            router.drained(&slot).await;
            match (slot.split_once('/'), remote) {
                (Some((node, local)), Some(remote)) => remote.stop(node, local),
                (Some(_), None) => {}
                (None, _) => {
                    let _ = tokio::time::timeout(Duration::from_secs(30), host.stop(slot.clone()))
                        .await;
                }
            }
            router.remove_replica(&slot);
            tracing::info!(replica = %slot, "drained replica stopped");
            let _ = myself.cast(DeploymentMsg::Drained(slot));
        });
    }

    fn view(&self, i: usize) -> DeploymentView {
        let l = &self.lives[i];
        let all = self.args.router.replicas();
        let mine: Vec<&ReplicaInfo> = all
            .iter()
            .filter(|r| r.deployment == l.spec.name && r.state != ActorState::Draining)
            .collect();
        let serving = mine.iter().any(|r| r.state == ActorState::Running);
        let failed = l.replicas.iter().find_map(|r| {
            self.args
                .health
                .snapshot()
                .into_iter()
                .find(|h| h.name == *r && h.state == ActorState::Failed)
                .map(|h| format!("replica {r}: {}", h.last_error.unwrap_or_default()))
        });
        let (state, reason) = if l.deleting {
            (DeploymentState::Deleting, None)
        } else if let Some(f) = &l.failure {
            (DeploymentState::Failed, Some(f.clone()))
        } else if let Some(f) = failed.filter(|_| !serving) {
            (DeploymentState::Failed, Some(f))
        } else if serving {
            (DeploymentState::Ready, l.pending.clone())
        } else if l.want == 0 && l.replicas.is_empty() && l.spec.autoscaling.is_some() {
            (
                DeploymentState::Idle,
                Some("scaled to zero; the next request starts a replica".into()),
            )
        } else if mine.is_empty() && l.replicas.is_empty() {
            (DeploymentState::Pending, l.pending.clone())
        } else {
            (DeploymentState::Deploying, l.pending.clone())
        };
        let mut stats = l.stats.clone();
        if let Some(s) = &mut stats {
            s.replicas = l.replicas.len();
        }
        DeploymentView {
            name: l.spec.name.clone(),
            spec: l.spec.clone(),
            state,
            reason,
            default: l.default,
            // Its own (some still starting on a worker) and the workers' of its model.
            replicas: {
                let mut names = l.replicas.clone();
                for r in &mine {
                    if !names.contains(&r.name) {
                        names.push(r.name.clone());
                    }
                }
                names
            },
            target_replicas: l.want,
            model: mine.iter().find_map(|r| r.model.clone()),
            autoscaler: stats,
            created_at: l.created_at,
        }
    }

    fn publish(&self) {
        let views = (0..self.lives.len()).map(|i| self.view(i)).collect();
        self.args.deployments.publish(views);
    }
}
