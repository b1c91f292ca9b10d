//! A node of the cluster: its inventory, placement and supervision tree, and the handle the HTTP
//! facade uses (router, job manager calls, health, shutdown).

use std::path::PathBuf;
use std::time::Duration;

use ractor::{Actor, ActorRef, RpcReplyPort};
use tessera_engine::EngineConfig;

use crate::autoscaler::{AutoscalerStats, AutoscalingConfig};
use crate::deployments::{
    AutoscalingSpec, DeploymentError, DeploymentManagerArgs, DeploymentMsg, DeploymentSpec,
    DeploymentState, DeploymentView, Deployments, Dtype, PlacementSpec, Slot,
};
use crate::directory::Directory;
use crate::health::HealthBoard;
use crate::inventory::{self, Device, Inventory};
use crate::jobs::{
    DbLock, DbLockError, JobError, JobEvent, JobMsg, JobPage, JobQuery, JobRecord, JobSpec,
    JobStats,
};
use crate::placement::{place, Placement, PlacementError, Resources};
use crate::restart_policy::RestartPolicy;
use crate::router::Router;
use crate::supervisor::{ChildSpec, NodeSupervisor, SupervisorArgs, SupervisorMsg};
use crate::tags::Tags;
use crate::trainer::TrainerArgs;

/// Everything a node needs to start (the binary builds it from its config).
#[derive(Clone)]
pub struct NodeConfig {
    pub node_name: String,
    pub model_path: PathBuf,
    /// `None`: float32 on the CPU, bfloat16 on CUDA.
    pub kind: Option<tch::Kind>,
    pub engine: EngineConfig,
    pub inference_fraction: f64,
    pub training_fraction: f64,
    pub cpu_inference_slots: usize,
    pub cpu_training_slots: usize,
    pub tensor_parallel: usize,
    pub db_path: PathBuf,
    pub restart: RestartPolicy,
    /// See [`Router::affinity_slack`].
    pub affinity_slack: usize,
    /// See [`Router::max_in_flight`].
    pub max_in_flight: usize,
    /// A head keeps the job manager; a worker's trainers report to the head's.
    pub job_manager: bool,
    /// Attempts of a job that may end without an outcome (crash, lost trainer) before it fails.
    pub max_attempts: u32,
    /// Queued jobs at most (`jobs.max_queued`).
    pub max_queued_jobs: usize,
    /// Deployments at most, the default one included (`deployments.max`).
    pub max_deployments: usize,
    /// Bytes the weights of this node's CPU replicas may hold together (`None`: no limit but the
    /// host's available memory).
    pub host_memory_limit: Option<u64>,
    /// This node's tags (`resources.tags`, `--tag`).
    pub tags: Tags,
    /// A dataset file's size at most (`training.max_dataset_bytes`).
    pub max_dataset_bytes: u64,
    /// Intra-op threads of each CPU trainer (`None`: the node's cores shared among its CPU
    /// trainers).
    pub trainer_threads: Option<usize>,
    /// The default deployment's name (the model given at start).
    pub deployment_name: String,
    /// Replicas of the default deployment (0: every inference slot).
    pub default_replicas: usize,
    /// Scale the default deployment's replicas with load (`None`: a fixed count).
    pub autoscaling: Option<AutoscalingConfig>,
    /// How replicas hold a GGUF's 4-bit weights (`model.quantization`).
    pub quantization: tessera_engine::loader::Quantization,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Placement(#[from] PlacementError),
    #[error("starting the supervisor: {0}")]
    Spawn(String),
    #[error(transparent)]
    DbLock(#[from] DbLockError),
}

pub struct Node {
    pub name: String,
    /// The deployments (a head's; a worker serves its one model).
    pub deployments: Deployments,
    pub tags: Tags,
    /// What it was configured with (`resources.*`), shown in `/cluster`.
    pub resources: Resources,
    pub inventory: Inventory,
    pub placement: Placement,
    /// Its inference slots (devices and engine settings of each).
    pub slots: Vec<Slot>,
    pub router: Router,
    pub directory: Directory,
    pub health: HealthBoard,
    supervisor: ActorRef<SupervisorMsg>,
    /// `resources.host_memory_limit_mb` in bytes (checked by a worker's replica starts).
    host_memory_limit: Option<u64>,
    /// Host memory the weights of replicas on this node's CPU slots take, by slot (those started
    /// with the node and those a head asked for).
    host_held: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// The job database's lock, held while the node lives (a head only).
    _db_lock: Option<DbLock>,
}

fn torch_device(d: &Device) -> tch::Device {
    match d {
        Device::Cpu => tch::Device::Cpu,
        Device::Cuda(i) => tch::Device::Cuda(*i),
    }
}

const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a request waits for the job manager: its state changes are fsynced (`synchronous =
/// FULL`), which a disk busy flushing other writes can hold for seconds.
const JOBS_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a request waits for a job manager that is not (yet, or again) running.
const JOB_MANAGER_WAIT: Duration = Duration::from_secs(10);

/// The engine settings of one replica: on the CPU, unless configured, its intra-op threads are
/// the node's cores shared among the CPU replicas (so replicas do not spin on each other's cores).
fn replica_engine_config(
    base: &EngineConfig,
    devices: &[Device],
    inventory: &Inventory,
    placement: &Placement,
) -> EngineConfig {
    let mut config = base.clone();
    if config.threads.is_none() && devices.iter().all(|d| matches!(d, Device::Cpu)) {
        let cpu_replicas = placement
            .replicas
            .iter()
            .filter(|r| r.devices.iter().all(|d| matches!(d, Device::Cpu)))
            .count()
            .max(1);
        config.threads = Some((inventory.host.cpu_cores / cpu_replicas).max(1));
    }
    config
}

/// A trainer's intra-op threads: as configured, else on the CPU the node's cores shared among
/// its CPU trainers (as replicas share them among themselves); torch's default on a GPU.
fn trainer_threads(
    configured: Option<usize>,
    device: &Device,
    inventory: &Inventory,
    placement: &Placement,
) -> Option<usize> {
    if !matches!(device, Device::Cpu) {
        return None;
    }
    configured.or_else(|| {
        let cpu_trainers = placement
            .trainers
            .iter()
            .filter(|t| matches!(t.device, Device::Cpu))
            .count()
            .max(1);
        Some((inventory.host.cpu_cores / cpu_trainers).max(1))
    })
}

/// The model given at start as the default deployment, within the node's `slots`.
fn default_spec(config: &NodeConfig, slots: usize) -> DeploymentSpec {
    let slots = slots.max(1);
    let replicas = match config.default_replicas {
        0 => slots,
        n => n.min(slots),
    };
    let dtype = match config.kind {
        None => Dtype::Auto,
        Some(tch::Kind::Half) => Dtype::F16,
        Some(tch::Kind::BFloat16) => Dtype::Bf16,
        Some(_) => Dtype::F32,
    };
    let (min_replicas, max_replicas, autoscaling) = match &config.autoscaling {
        Some(a) => (
            a.min_replicas.clamp(1, slots),
            a.max_replicas.clamp(1, slots),
            Some(AutoscalingSpec {
                target_ongoing_requests: a.target_ongoing_requests,
                upscale_delay_s: a.upscale_delay.as_secs_f64(),
                downscale_delay_s: a.downscale_delay.as_secs_f64(),
            }),
        ),
        None => (replicas, replicas, None),
    };
    DeploymentSpec {
        name: config.deployment_name.clone(),
        path: config.model_path.clone(),
        // With autoscaling it starts at its minimum.
        replicas: if autoscaling.is_some() {
            min_replicas
        } else {
            replicas
        },
        min_replicas,
        max_replicas,
        tensor_parallel: None,
        dtype,
        placement: PlacementSpec::default(),
        autoscaling,
    }
}

impl Node {
    /// Detects the devices, plans the actors and starts the supervision tree. Returns once every
    /// child has been started once (replicas have loaded the model, or failed and will retry).
    pub async fn start(config: NodeConfig) -> Result<Node, NodeError> {
        // First, before loading anything: a second head on the same database stops here.
        let db_lock = config
            .job_manager
            .then(|| DbLock::acquire(&config.db_path))
            .transpose()?;
        let inventory = tokio::task::spawn_blocking(Inventory::detect)
            .await
            .map_err(|e| NodeError::Spawn(e.to_string()))?;
        let split = inventory::split(
            &inventory.devices(),
            config.inference_fraction,
            config.training_fraction,
        );
        let placement = place(
            split,
            config.tensor_parallel,
            config.cpu_inference_slots,
            config.cpu_training_slots,
        )?;
        tracing::info!(node = %config.node_name, placement = %serde_json::to_string(&placement).unwrap_or_default(), "placement");
        let router = Router::new(
            config.affinity_slack,
            config.engine.scheduler.adapter_cache_size,
            config.max_in_flight,
        );
        let directory = Directory::default();
        let health = HealthBoard::default();
        let mut children: Vec<(String, ChildSpec)> = Vec::new();
        for t in &placement.trainers {
            children.push((
                t.name.clone(),
                ChildSpec::Trainer(TrainerArgs {
                    name: t.name.clone(),
                    node: config.node_name.clone(),
                    device: torch_device(&t.device),
                    kind: config.kind,
                    default_model: config.model_path.clone(),
                    directory: directory.clone(),
                    tags: config.tags.clone(),
                    max_dataset_bytes: config.max_dataset_bytes,
                    threads: trainer_threads(
                        config.trainer_threads,
                        &t.device,
                        &inventory,
                        &placement,
                    ),
                }),
            ));
        }
        if config.job_manager {
            children.push((
                "job-manager".into(),
                ChildSpec::JobManager {
                    db_path: config.db_path.clone(),
                    node: config.node_name.clone(),
                    max_attempts: config.max_attempts,
                    max_queued: config.max_queued_jobs,
                },
            ));
        }
        let slots: Vec<Slot> = placement
            .replicas
            .iter()
            .map(|r| Slot {
                name: r.name.clone(),
                devices: r.devices.clone(),
                engine: replica_engine_config(&config.engine, &r.devices, &inventory, &placement),
                quantization: config.quantization,
            })
            .collect();
        let default = default_spec(&config, slots.len());
        let deployments = Deployments::new(&default.name);
        // The default deployment's first replicas start with the node (so that it serves once
        // started); the deployment manager adopts them, and places the rest.
        let initial = default.initial_replicas().min(slots.len());
        let mut host_held = std::collections::HashMap::new();
        for slot in &slots[..initial] {
            let generation =
                router.add_replica(slot.replica_info(&config.node_name, &default.name));
            children.push((
                slot.name.clone(),
                ChildSpec::Inference(slot.inference_args(
                    config.model_path.clone(),
                    config.kind,
                    &router,
                    &health,
                    generation,
                )),
            ));
            if let Some(n) = slot.host_bytes(&config.model_path, config.kind) {
                host_held.insert(slot.name.clone(), n);
            }
        }
        if config.job_manager {
            // Listed from the start (the manager publishes its own view once it runs).
            deployments.publish(vec![DeploymentView {
                name: default.name.clone(),
                spec: default.clone(),
                state: DeploymentState::Deploying,
                reason: None,
                default: true,
                replicas: slots[..initial].iter().map(|s| s.name.clone()).collect(),
                target_replicas: initial,
                model: None,
                autoscaler: default.autoscaling_config().map(|c| AutoscalerStats {
                    replicas: initial,
                    desired: initial,
                    min_replicas: c.min_replicas,
                    max_replicas: c.max_replicas.min(slots.len()).max(1),
                    ..Default::default()
                }),
                created_at: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0),
            }]);
            children.push((
                "deployment-manager".into(),
                ChildSpec::Deployments(Box::new(DeploymentManagerArgs {
                    db_path: config.db_path.clone(),
                    node: config.node_name.clone(),
                    tags: config.tags.clone(),
                    slots: slots.clone(),
                    router: router.clone(),
                    health: health.clone(),
                    deployments: deployments.clone(),
                    default,
                    max: config.max_deployments,
                    host_memory_limit: config.host_memory_limit,
                    host: None,
                })),
            ));
        }
        // Unnamed: ractor's registry is per process, and tests run several nodes in one.
        let (supervisor, _) = Actor::spawn(
            None,
            NodeSupervisor,
            SupervisorArgs {
                children,
                policy: config.restart.clone(),
                health: health.clone(),
                router: router.clone(),
                directory: directory.clone(),
            },
        )
        .await
        .map_err(|e| NodeError::Spawn(e.to_string()))?;
        Ok(Node {
            deployments,
            name: config.node_name,
            tags: config.tags,
            resources: Resources {
                inference_gpu_fraction: config.inference_fraction,
                training_gpu_fraction: config.training_fraction,
                cpu_inference_slots: config.cpu_inference_slots,
                cpu_training_slots: config.cpu_training_slots,
                tensor_parallel: config.tensor_parallel,
            },
            inventory,
            placement,
            slots,
            router,
            directory,
            health,
            supervisor,
            host_memory_limit: config.host_memory_limit,
            host_held: std::sync::Mutex::new(host_held),
            _db_lock: db_lock,
        })
    }

    /// Starts a replica of `deployment` on the free slot `slot` (a worker doing what its head's
    /// deployment manager asked).
    pub fn start_replica(
        &self,
        slot: &str,
        deployment: &str,
        path: PathBuf,
        kind: Option<tch::Kind>,
    ) -> Result<(), String> {
        let s = self
            .slots
            .iter()
            .find(|s| s.name == slot)
            .ok_or_else(|| format!("this node has no inference slot `{slot}`"))?;
        if self.router.in_flight(slot).is_some() {
            return Err(format!("inference slot `{slot}` is taken"));
        }
        // On a CPU slot, the weights must fit within `resources.host_memory_limit_mb` with those
        // of this node's other replicas, and in what the host has available (the head checks
        // its own memory, not this node's).
        let need = s.host_bytes(&path, kind);
        if let Some(need) = need {
            let held: u64 = self.host_held.lock().expect("host memory").values().sum();
            crate::deployments::check_host_memory(need, held, 0, self.host_memory_limit)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        tracing::info!(replica = %slot, %deployment, path = %path.display(), "starting a replica for the head");
        if let Some(need) = need {
            self.host_held
                .lock()
                .expect("host memory")
                .insert(s.name.clone(), need);
        }
        let generation = self
            .router
            .add_replica(s.replica_info(&self.name, deployment));
        self.supervisor
            .cast(SupervisorMsg::Add(
                s.name.clone(),
                Box::new(ChildSpec::Inference(s.inference_args(
                    path,
                    kind,
                    &self.router,
                    &self.health,
                    generation,
                ))),
            ))
            .map_err(|e| e.to_string())
    }

    /// Drains replica `slot` (it takes nothing new and finishes what it holds), then stops it.
    pub async fn stop_replica(&self, slot: &str) {
        self.router.set_draining(slot);
        self.router.drained(slot).await;
        let name = slot.to_string();
        let _ = self
            .supervisor
            .call(
                |reply| SupervisorMsg::Remove(name, reply),
                Some(Duration::from_secs(30)),
            )
            .await;
        self.router.remove_replica(slot);
        self.host_held.lock().expect("host memory").remove(slot);
        tracing::info!(replica = %slot, "replica drained and stopped for the head");
    }

    /// Creates a deployment: placed on free inference slots now, or pending with the reason.
    pub async fn create_deployment(
        &self,
        spec: DeploymentSpec,
    ) -> Result<DeploymentView, DeploymentError> {
        self.deployments_call(|r| DeploymentMsg::Create(spec, r))
            .await
    }

    /// Deletes a deployment: its replicas drain (finish what they hold), then stop.
    pub async fn delete_deployment(&self, name: &str) -> Result<DeploymentView, DeploymentError> {
        let name = name.to_string();
        self.deployments_call(|r| DeploymentMsg::Delete(name, r))
            .await
    }

    async fn deployments_call<T: Send + 'static>(
        &self,
        msg: impl FnOnce(RpcReplyPort<Result<T, DeploymentError>>) -> DeploymentMsg,
    ) -> Result<T, DeploymentError> {
        let deadline = tokio::time::Instant::now() + JOB_MANAGER_WAIT;
        let manager = loop {
            if let Some(m) = self.deployments.manager() {
                break m;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(DeploymentError::Unavailable);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        match manager.call(msg, Some(JOBS_CALL_TIMEOUT)).await {
            Ok(ractor::rpc::CallResult::Success(r)) => r,
            _ => Err(DeploymentError::Unavailable),
        }
    }

    /// Queues a fine-tune job. The manager checks, in one step with the insert, the queue bound
    /// (`jobs.max_queued`) and that no live job writes the same `output_path` or one inside it.
    pub async fn submit_job(&self, spec: JobSpec) -> Result<JobRecord, JobError> {
        self.jobs(|r| JobMsg::Submit(spec, r)).await
    }

    pub async fn job(&self, id: &str) -> Result<JobRecord, JobError> {
        let id = id.to_string();
        self.jobs(|r| JobMsg::Get(id, r)).await
    }

    pub async fn list_jobs(&self, query: JobQuery) -> Result<JobPage, JobError> {
        self.jobs(|r| JobMsg::List(query, r)).await
    }

    /// Cancels a queued or running job (a running one stops at its next step).
    pub async fn cancel_job(&self, id: &str) -> Result<JobRecord, JobError> {
        let id = id.to_string();
        self.jobs(|r| JobMsg::Cancel(id, r)).await
    }

    /// The job as it is now, and its later events on `events` until it ends.
    pub async fn subscribe_job(
        &self,
        id: &str,
        events: tokio::sync::mpsc::Sender<JobEvent>,
    ) -> Result<JobRecord, JobError> {
        let id = id.to_string();
        self.jobs(|r| JobMsg::Subscribe(id, events, r)).await
    }

    /// The job manager, waiting a little for it while it starts or restarts (its database opens
    /// with fsyncs, which a busy disk can hold for seconds).
    async fn job_manager(&self) -> Option<ActorRef<JobMsg>> {
        let deadline = tokio::time::Instant::now() + JOB_MANAGER_WAIT;
        loop {
            if let Some(m) = self.directory.job_manager() {
                return Some(m);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends a request to the job manager and waits for its answer.
    async fn jobs<T: Send + 'static>(
        &self,
        msg: impl FnOnce(RpcReplyPort<Result<T, JobError>>) -> JobMsg,
    ) -> Result<T, JobError> {
        let manager = self.job_manager().await.ok_or(JobError::Unavailable)?;
        match manager.call(msg, Some(JOBS_CALL_TIMEOUT)).await {
            Ok(ractor::rpc::CallResult::Success(r)) => r,
            Ok(ractor::rpc::CallResult::Timeout) => {
                tracing::warn!(
                    timeout_s = JOBS_CALL_TIMEOUT.as_secs(),
                    "the job manager did not answer in time"
                );
                Err(JobError::Busy(JOBS_CALL_TIMEOUT.as_secs()))
            }
            _ => Err(JobError::Unavailable),
        }
    }

    pub async fn job_stats(&self) -> Option<JobStats> {
        let manager = self.directory.job_manager()?;
        match manager.call(JobMsg::Stats, Some(CALL_TIMEOUT)).await {
            Ok(ractor::rpc::CallResult::Success(s)) => Some(s),
            _ => None,
        }
    }

    /// Per-replica scheduler statistics (for `/metrics`).
    pub async fn replica_stats(&self) -> Vec<(String, tessera_engine::scheduler::SchedulerStats)> {
        let mut out = Vec::new();
        for r in self.router.replicas() {
            let Some(stats) = self.router.replica(&r.name).and_then(|x| x.stats()) else {
                continue;
            };
            if let Some(s) = stats.await {
                out.push((r.name, s));
            }
        }
        out
    }

    /// Test hook: makes a replica's actor fail (`engine`: its engine thread dies first).
    pub fn crash_replica(&self, name: &str, engine: bool) -> bool {
        self.router.replica(name).is_some_and(|r| r.crash(engine))
    }

    /// Stops running jobs at a checkpoint (they resume on the next start), waits up to `grace`
    /// for that, then stops every actor.
    pub async fn shutdown(&self, grace: Duration) {
        self.checkpoint_jobs(grace).await;
        self.stop_actors(Duration::from_secs(5)).await;
    }

    /// Stops running jobs at a checkpoint and ends job event streams; waits up to `grace` for
    /// every trainer to report.
    pub async fn checkpoint_jobs(&self, grace: Duration) {
        if let Some(manager) = self.directory.job_manager() {
            tracing::info!("checkpointing running jobs");
            let drained = manager.call(JobMsg::Shutdown, Some(grace)).await;
            if !matches!(drained, Ok(ractor::rpc::CallResult::Success(()))) {
                tracing::warn!(
                    grace_s = grace.as_secs_f64(),
                    "running jobs did not reach a checkpoint within the grace period; they resume from their last one"
                );
            }
        }
    }

    /// Stops every actor, waiting at most `timeout`.
    pub async fn stop_actors(&self, timeout: Duration) {
        let _ = self
            .supervisor
            .call(SupervisorMsg::Shutdown, Some(timeout))
            .await;
    }
}
