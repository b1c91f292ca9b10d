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
    /// `ok`; `degraded` while an actor restarts or after a replica failed beyond its restart
    /// policy (its deployment shows `failed`); `failed` (503) once another actor escalated.
    pub status: String,
    pub uptime_s: f64,
    #[schema(value_type = Vec<Object>)]
    pub actors: Vec<ActorHealth>,
}

#[utoipa::path(get, path = "/health", responses(
    (status = 200, description = "Alive; every actor's state (a failed replica is its deployment's state: `degraded`)", body = Health),
    (status = 503, description = "An actor other than a replica failed beyond its restart policy", body = Health)))]
pub async fn health(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    let mut actors = state.node.health.snapshot();
    // The probe is public: without the token (where one is set) errors show file names, not the
    // paths of the node's files (the log has them whole).
    let authorized = state
        .auth_token
        .as_ref()
        .is_some_and(|token| super::guard::bearer_matches(&headers, token));
    if !authorized {
        for a in &mut actors {
            a.last_error = a.last_error.as_deref().map(redact_paths);
        }
    }
    // A replica that failed beyond its restart policy is its deployment's state (`GET /models`:
    // failed, with the reason), not the node's liveness: a probe restarting the head would not
    // mend a model file. Any other actor failed: the node is down (503).
    let failed = |a: &&ActorHealth| a.state == ActorState::Failed;
    let status = if actors.iter().filter(failed).any(|a| a.role != "inference") {
        "failed"
    } else if actors.iter().any(|a| {
        matches!(
            a.state,
            ActorState::Restarting | ActorState::Starting | ActorState::Failed
        )
    }) {
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
    /// The most sequences it decodes together (`batching.auto_batch_size` may choose fewer than
    /// `batching.max_batch_size`).
    pub max_batch_size: usize,
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
                max_batch_size: s.batch_size,
                waiting: s.waiting,
                prefilling: s.prefilling,
                running: s.running,
            })
            .collect(),
    })
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", body = String)))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let text = state.metrics.render(&state.node, &state.failover).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// What `POST /_test/crash/{replica}` crashes.
#[derive(serde::Deserialize)]
pub struct CrashBody {
    /// The replica's engine thread dies first, ending the streams it serves (else only its
    /// actor panics, and its engine finishes them).
    #[serde(default)]
    engine: bool,
}

/// Test hook (TESSERA_TEST_HOOKS=1 only): makes a replica's actor fail.
pub async fn crash(
    State(state): State<AppState>,
    Path(replica): Path<String>,
    axum::Json(body): axum::Json<CrashBody>,
) -> Result<StatusCode, AppError> {
    if state.node.crash_replica(&replica, body.engine) {
        Ok(StatusCode::ACCEPTED)
    } else {
        Err(AppError::not_found(format!(
            "no running replica `{replica}`"
        )))
    }
}

/// `text` with every absolute path cut to its last component (`/home/u/models/x.gguf` →
/// `…/x.gguf`).
pub fn redact_paths(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('/') {
        let starts_token = rest[..i]
            .chars()
            .next_back()
            .is_none_or(|c| c.is_whitespace() || "`'\"(=:[".contains(c));
        if !starts_token {
            out.push_str(&rest[..=i]);
            rest = &rest[i + 1..];
            continue;
        }
        out.push_str(&rest[..i]);
        let path = &rest[i..];
        let end = path
            .find(|c: char| c.is_whitespace() || "`'\"),;]".contains(c) || c == ':')
            .unwrap_or(path.len());
        let (path, after) = path.split_at(end);
        match path.trim_end_matches('/').rsplit_once('/') {
            Some((dir, last)) if !dir.is_empty() => {
                out.push('…');
                out.push('/');
                out.push_str(last);
            }
            _ => out.push_str(path),
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::redact_paths;

    #[test]
    fn absolute_paths_keep_their_last_component() {
        assert_eq!(
            redact_paths("loading /home/u/models/x.gguf: uses ggml type 99"),
            "loading …/x.gguf: uses ggml type 99"
        );
        assert_eq!(
            redact_paths("model `/srv/m/hf/` (and /a/b/c.json)"),
            "model `…/hf` (and …/c.json)"
        );
        assert_eq!(redact_paths("ratio 3/4 and /x"), "ratio 3/4 and /x");
        assert_eq!(redact_paths("no paths here"), "no paths here");
    }
}
