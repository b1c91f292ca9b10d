//! Liveness, readiness, the cluster view, metrics, and the test hook that crashes a replica.

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use tessera_actors::health::{ActorHealth, ActorState};
use tessera_actors::inventory::Inventory;
use tessera_actors::jobs::JobStats;
use tessera_actors::messages::ReplicaInfo;
use tessera_actors::placement::Placement;
use utoipa::ToSchema;

use super::error::AppError;
use super::AppState;

#[derive(Serialize, ToSchema)]
pub struct Health {
    /// `ok`; `degraded` while an actor restarts; `failed` once one escalated.
    pub status: String,
    pub uptime_s: f64,
    #[schema(value_type = Vec<Object>)]
    pub actors: Vec<ActorHealth>,
}

#[utoipa::path(get, path = "/health", responses(
    (status = 200, description = "Alive; every actor's state", body = Health),
    (status = 503, description = "An actor failed beyond its restart policy", body = Health)))]
pub async fn health(State(state): State<AppState>) -> Response {
    let actors = state.node.health.snapshot();
    let status = if actors.iter().any(|a| a.state == ActorState::Failed) {
        "failed"
    } else if actors
        .iter()
        .any(|a| matches!(a.state, ActorState::Restarting | ActorState::Starting))
    {
        "degraded"
    } else {
        "ok"
    };
    let code = if status == "failed" {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (
        code,
        Json(Health {
            status: status.into(),
            uptime_s: state.started.elapsed().as_secs_f64(),
            actors,
        }),
    )
        .into_response()
}

#[derive(Serialize, ToSchema)]
pub struct Ready {
    pub ready: bool,
    pub model: Option<String>,
}

#[utoipa::path(get, path = "/ready", responses(
    (status = 200, description = "A replica has loaded the model", body = Ready),
    (status = 503, description = "No replica is serving yet", body = Ready)))]
pub async fn ready(State(state): State<AppState>) -> Response {
    let ready = state.node.router.ready();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(Ready {
            ready,
            model: state.node.router.model_name(),
        }),
    )
        .into_response()
}

#[derive(Serialize)]
pub struct ReplicaQueue {
    pub replica: String,
    pub waiting: usize,
    pub prefilling: usize,
    pub running: usize,
}

#[derive(Serialize)]
pub struct NodeView {
    pub name: String,
    pub role: &'static str,
    pub tags: tessera_actors::tags::Tags,
    pub resources: tessera_actors::placement::Resources,
    pub inventory: Inventory,
    pub placement: Placement,
    pub trainers: Vec<TrainerView>,
}

#[derive(Serialize)]
pub struct TrainerView {
    pub name: String,
    pub device: String,
    pub running_job: Option<String>,
}

#[derive(Serialize)]
pub struct ClusterView {
    /// The port workers join (`tessera worker --join HOST:PORT`).
    pub cluster_port: Option<u16>,
    pub nodes: Vec<NodeView>,
    /// Joined workers: devices, split, replicas, trainers, running jobs, last heartbeat.
    pub workers: Vec<tessera_actors::cluster::head::WorkerView>,
    pub replicas: Vec<ReplicaInfo>,
    pub jobs: Option<JobStats>,
    /// Per local replica: requests waiting for a batch slot, prefilling and decoding now.
    pub queues: Vec<ReplicaQueue>,
    /// The deployments: state, replicas, and for autoscaled ones the autoscaler's figures and
    /// its latest decision with its inputs.
    pub deployments: Vec<tessera_actors::deployments::DeploymentView>,
}

#[utoipa::path(get, path = "/cluster", responses(
    (status = 200, description = "Nodes, devices, split, replicas (with loaded adapters), trainers", body = Object)))]
pub async fn cluster(State(state): State<AppState>) -> Json<ClusterView> {
    let node = &state.node;
    let jobs = node.job_stats().await;
    let running = |t: &str| {
        jobs.as_ref().and_then(|s| {
            s.running
                .iter()
                .find(|(name, _)| name == t)
                .map(|(_, j)| j.clone())
        })
    };
    let trainers = node
        .placement
        .trainers
        .iter()
        .map(|t| TrainerView {
            name: t.name.clone(),
            device: t.device.to_string(),
            running_job: running(&t.name),
        })
        .collect();
    Json(ClusterView {
        cluster_port: state.cluster.as_ref().map(|c| c.port),
        workers: state
            .cluster
            .as_ref()
            .map(|c| c.table.workers())
            .unwrap_or_default(),
        nodes: vec![NodeView {
            name: node.name.clone(),
            role: "head",
            tags: node.tags.clone(),
            resources: node.resources.clone(),
            inventory: node.inventory.refreshed(),
            placement: node.placement.clone(),
            trainers,
        }],
        replicas: node.router.replicas(),
        jobs,
        deployments: node.deployments.list(),
        queues: node
            .replica_stats()
            .await
            .into_iter()
            .map(|(replica, s)| ReplicaQueue {
                replica,
                waiting: s.waiting,
                prefilling: s.prefilling,
                running: s.running,
            })
            .collect(),
    })
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", body = String)))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let text = state.metrics.render(&state.node).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Test hook (TESSERA_TEST_HOOKS=1 only): makes a replica's actor panic.
pub async fn crash(
    State(state): State<AppState>,
    Path(replica): Path<String>,
) -> Result<StatusCode, AppError> {
    if state.node.crash_replica(&replica) {
        Ok(StatusCode::ACCEPTED)
    } else {
        Err(AppError::not_found(format!(
            "no running replica `{replica}`"
        )))
    }
}
