//! The node's root supervisor: starts the job manager, the trainers and the inference replicas as
//! linked children, restarts a child that fails (panics, returns an error, or stops unasked) after
//! an exponential backoff, and escalates one that fails too often (it stays down and `/health`
//! says so). Every restart updates the router and the directory, so nobody keeps a dead `ActorRef`.

use std::collections::HashMap;
use std::time::Instant;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};

use crate::deployments::{DeploymentManager, DeploymentManagerArgs};
use crate::directory::{Directory, TrainerEntry};
use crate::health::{ActorState, HealthBoard};
use crate::inference::{InferenceActor, InferenceArgs};
use crate::jobs::{JobManager, JobManagerArgs, JobMsg};
use crate::restart_policy::{Decision, RestartPolicy, RestartTracker};
use crate::router::Router;
use crate::trainer::{LocalTrainer, TrainerActor, TrainerArgs};

/// The actor a supervision event says went down, and why; `None` for other events.
pub(crate) fn went_down(event: SupervisionEvent) -> Option<(ActorCell, String)> {
    match event {
        SupervisionEvent::ActorFailed(cell, err) => Some((cell, format!("failed: {err}"))),
        SupervisionEvent::ActorTerminated(cell, _, reason) => Some((
            cell,
            format!(
                "stopped unexpectedly ({})",
                reason.unwrap_or_else(|| "no reason given".into())
            ),
        )),
        _ => None,
    }
}

/// What a child is and how to start it again.
#[derive(Clone)]
pub enum ChildSpec {
    JobManager {
        db_path: std::path::PathBuf,
        node: String,
        max_attempts: u32,
        max_queued: usize,
    },
    Trainer(TrainerArgs),
    Inference(InferenceArgs),
    /// The head's deployment manager (it starts and stops inference children through here).
    Deployments(Box<DeploymentManagerArgs>),
}

impl ChildSpec {
    fn role(&self) -> &'static str {
        match self {
            ChildSpec::JobManager { .. } => "job_manager",
            ChildSpec::Trainer(_) => "trainer",
            ChildSpec::Inference(_) => "inference",
            ChildSpec::Deployments(_) => "deployment_manager",
        }
    }
}

impl crate::deployments::ReplicaHost for ActorRef<SupervisorMsg> {
    fn start(&self, name: String, args: InferenceArgs) -> Result<(), String> {
        self.cast(SupervisorMsg::Add(
            name,
            Box::new(ChildSpec::Inference(args)),
        ))
        .map_err(|e| format!("the node's supervisor: {e}"))
    }

    fn stop(
        &self,
        name: String,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let supervisor = self.clone();
        Box::pin(async move {
            let _ = supervisor
                .call(|reply| SupervisorMsg::Remove(name, reply), None)
                .await;
        })
    }
}

pub enum SupervisorMsg {
    Restart(String),
    /// Starts a new child (a replica scaled up) and supervises it like the others.
    Add(String, Box<ChildSpec>),
    /// Stops a child for good (a replica scaled down, already drained) and forgets it.
    Remove(String, RpcReplyPort<()>),
    /// Stop every child (no restarts), then the supervisor itself.
    Shutdown(RpcReplyPort<()>),
}

impl ractor::Message for SupervisorMsg {}

pub struct SupervisorArgs {
    /// Children in start order (name, spec).
    pub children: Vec<(String, ChildSpec)>,
    pub policy: RestartPolicy,
    pub health: HealthBoard,
    pub router: Router,
    pub directory: Directory,
}

struct Child {
    spec: ChildSpec,
    tracker: RestartTracker,
    cell: Option<ActorCell>,
}

pub struct SupervisorState {
    order: Vec<String>,
    children: HashMap<String, Child>,
    policy: RestartPolicy,
    health: HealthBoard,
    router: Router,
    directory: Directory,
    stopping: bool,
}

pub struct NodeSupervisor;

impl Actor for NodeSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        for (name, spec) in &args.children {
            args.health
                .set(name, spec.role(), ActorState::Starting, None);
        }
        Ok(SupervisorState {
            order: args.children.iter().map(|(n, _)| n.clone()).collect(),
            children: args
                .children
                .into_iter()
                .map(|(name, spec)| {
                    (
                        name,
                        Child {
                            spec,
                            tracker: RestartTracker::default(),
                            cell: None,
                        },
                    )
                })
                .collect(),
            policy: args.policy,
            health: args.health,
            router: args.router,
            directory: args.directory,
            stopping: false,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        for name in state.order.clone() {
            state.start(&myself, &name).await;
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Restart(name) => {
                if !state.stopping {
                    tracing::info!(actor = %name, "restarting");
                    state.start(&myself, &name).await;
                }
            }
            SupervisorMsg::Add(name, spec) => {
                if !state.stopping && !state.children.contains_key(&name) {
                    state.order.push(name.clone());
                    state.children.insert(
                        name.clone(),
                        Child {
                            spec: *spec,
                            tracker: RestartTracker::default(),
                            cell: None,
                        },
                    );
                    state.start(&myself, &name).await;
                }
            }
            SupervisorMsg::Remove(name, reply) => {
                // Forgotten first, so that its stop is not taken for a failure.
                state.order.retain(|n| *n != name);
                if let Some(child) = state.children.remove(&name) {
                    if let Some(cell) = child.cell {
                        cell.stop_and_wait(Some("scaled down".into()), None)
                            .await
                            .ok();
                    }
                    state
                        .health
                        .set(&name, child.spec.role(), ActorState::Stopped, None);
                    // The router's entry is the caller's to remove (it drains, asks for this,
                    // then removes it, also when this answer comes too late): a `Remove` that
                    // runs after its caller gave up must not touch the entry of a newer replica
                    // already placed on the same slot. (The mailbox keeps the order, so the
                    // child it stops is still the old one.)
                }
                let _ = reply.send(());
            }
            SupervisorMsg::Shutdown(reply) => {
                state.stopping = true;
                // Inference first (stop taking work), the job manager last.
                for name in state.order.clone().iter().rev() {
                    if let Some(cell) = state.children.get_mut(name).and_then(|c| c.cell.take()) {
                        cell.stop_and_wait(Some("shutdown".into()), None).await.ok();
                        state.health.set(name, "", ActorState::Stopped, None);
                    }
                }
                let _ = reply.send(());
                myself.stop(Some("shutdown".into()));
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let Some((cell, cause)) = went_down(event) else {
            return Ok(());
        };
        let Some(name) = state.name_of(&cell) else {
            return Ok(());
        };
        if state.stopping {
            return Ok(());
        }
        state.mark_down(&name);
        let child = state.children.get_mut(&name).expect("known child");
        child.cell = None;
        let role = child.spec.role();
        match child.tracker.on_failure(&state.policy, Instant::now()) {
            Decision::RestartAfter(delay) => {
                tracing::error!(actor = %name, role, cause = %cause, backoff_ms = delay.as_millis() as u64, "actor failed; restarting after backoff");
                state
                    .health
                    .set(&name, role, ActorState::Restarting, Some(cause));
                let n = name.clone();
                myself.send_after(delay, move || SupervisorMsg::Restart(n));
            }
            Decision::Escalate => {
                tracing::error!(actor = %name, role, cause = %cause, max_restarts = state.policy.max_restarts, window_secs = state.policy.window_secs, "actor failed too often; escalated, not restarted");
                state
                    .health
                    .set(&name, role, ActorState::Failed, Some(cause));
            }
        }
        Ok(())
    }
}

impl SupervisorState {
    fn name_of(&self, cell: &ActorCell) -> Option<String> {
        self.children
            .iter()
            .find(|(_, c)| c.cell.as_ref().is_some_and(|x| x.get_id() == cell.get_id()))
            .map(|(n, _)| n.clone())
    }

    /// Takes a dead child out of the router / directory.
    fn mark_down(&mut self, name: &str) {
        match &self.children[name].spec {
            ChildSpec::Inference(args) => {
                self.router
                    .set_actor(name, args.generation, None, ActorState::Restarting)
            }
            ChildSpec::Trainer(_) => {
                self.directory.set_trainer(name, None);
                if let Some(jm) = self.directory.job_manager() {
                    let _ = jm.cast(JobMsg::TrainersChanged);
                }
            }
            ChildSpec::JobManager { .. } => self.directory.set_job_manager(None),
            ChildSpec::Deployments(args) => args.deployments.set_manager(None),
        }
    }

    async fn start(&mut self, myself: &ActorRef<SupervisorMsg>, name: &str) {
        let Some(child) = self.children.get(name) else {
            return;
        };
        let spec = child.spec.clone();
        let role = spec.role();
        self.health.set(name, role, ActorState::Starting, None);
        let supervisor = myself.get_cell();
        let spawned: Result<ActorCell, String> = match spec {
            ChildSpec::JobManager {
                db_path,
                node,
                max_attempts,
                max_queued,
            } => JobManager::spawn_linked(
                None,
                JobManager,
                JobManagerArgs {
                    db_path,
                    directory: self.directory.clone(),
                    node,
                    max_attempts,
                    max_queued,
                },
                supervisor,
            )
            .await
            .map(|(actor, _)| {
                self.directory.set_job_manager(Some(actor.clone()));
                actor.get_cell()
            })
            .map_err(|e| e.to_string()),
            ChildSpec::Trainer(args) => {
                let entry_node = args.node.clone();
                let device = args.device;
                let tags = args.tags.clone();
                TrainerActor::spawn_linked(None, TrainerActor, args, supervisor)
                    .await
                    .map(|(actor, _)| {
                        self.directory.set_trainer(
                            name,
                            Some(TrainerEntry {
                                actor: std::sync::Arc::new(LocalTrainer(actor.clone())),
                                local: true,
                                node: entry_node,
                                device: format!("{device:?}"),
                                tags,
                            }),
                        );
                        if let Some(jm) = self.directory.job_manager() {
                            let _ = jm.cast(JobMsg::TrainersChanged);
                        }
                        actor.get_cell()
                    })
                    .map_err(|e| e.to_string())
            }
            ChildSpec::Deployments(mut args) => {
                args.host = Some(std::sync::Arc::new(myself.clone()));
                let deployments = args.deployments.clone();
                DeploymentManager::spawn_linked(None, DeploymentManager, *args, supervisor)
                    .await
                    .map(|(actor, _)| {
                        deployments.set_manager(Some(actor.clone()));
                        actor.get_cell()
                    })
                    .map_err(|e| e.to_string())
            }
            // It loads its model after this (off this handler) and enters the router once loaded;
            // a load that fails is a failure of the child like any other.
            ChildSpec::Inference(args) => {
                InferenceActor::spawn_linked(None, InferenceActor, args, supervisor)
                    .await
                    .map(|(actor, _)| actor.get_cell())
                    .map_err(|e| e.to_string())
            }
        };
        match spawned {
            Ok(cell) => {
                self.children.get_mut(name).expect("child").cell = Some(cell);
                // A replica says it runs itself, once its model is loaded.
                if role != "inference" {
                    self.health.set(name, role, ActorState::Running, None);
                }
                tracing::info!(actor = %name, role, "actor running");
            }
            Err(e) => {
                // A start that fails counts as a failure of the child.
                let child = self.children.get_mut(name).expect("child");
                match child.tracker.on_failure(&self.policy, Instant::now()) {
                    Decision::RestartAfter(delay) => {
                        tracing::error!(actor = %name, role, error = %e, backoff_ms = delay.as_millis() as u64, "actor failed to start; retrying after backoff");
                        self.health.set(name, role, ActorState::Restarting, Some(e));
                        let n = name.to_string();
                        myself.send_after(delay, move || SupervisorMsg::Restart(n));
                    }
                    Decision::Escalate => {
                        tracing::error!(actor = %name, role, error = %e, "actor failed to start too often; escalated");
                        self.health.set(name, role, ActorState::Failed, Some(e));
                    }
                }
            }
        }
    }
}
