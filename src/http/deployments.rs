//! Model deployments over HTTP: `POST /models` (202 with the deployment's state), `GET /models`,
//! `GET /models/{name}` and `DELETE /models/{name}` (202: its replicas drain, then it is gone).
//! The body is checked here (name, path confined to `model.models_root` and readable as a model,
//! bounds, tags); placement, memory and slots are the deployment manager's.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use tessera_actors::deployments::{
    check_name, AutoscalingSpec, DeploymentSpec, DeploymentView, Dtype, PlacementSpec,
};
use utoipa::ToSchema;

use super::error::{ApiJson, AppError};
use super::{paths, AppState};

/// The most replicas one deployment may ask for.
const MAX_REPLICAS: usize = 64;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    /// 1 to 64 letters, digits, `.`, `_` or `-`; what requests put in `model`.
    pub name: String,
    /// A GGUF file or Hugging Face model directory under (and confined to) `model.models_root`
    /// (relative paths are taken from there), or the served model.
    pub path: String,
    /// Replicas (default 1); with `autoscaling`, the starting count within the bounds.
    pub replicas: Option<usize>,
    /// Autoscaling bounds (default 1 and `replicas`, or every inference slot with
    /// `autoscaling`). `min_replicas: 0` with `autoscaling`: scaled to zero when idle, the next
    /// request waits while a replica starts (`autoscaling.cold_start_queue` at most).
    pub min_replicas: Option<usize>,
    pub max_replicas: Option<usize>,
    /// Devices per replica; must match the node's inference slots (`resources.tensor_parallel`).
    pub tensor_parallel: Option<usize>,
    /// `auto` (default), `f32`, `f16` or `bf16`.
    pub dtype: Option<String>,
    /// `{"tags": {"zone": "b"}}`: only on nodes carrying every tag; pending until one does.
    pub placement: Option<DeployPlacement>,
    /// Scale replicas on load within `[min_replicas, max_replicas]` (Ray Serve's policy).
    pub autoscaling: Option<DeployAutoscaling>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployPlacement {
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployAutoscaling {
    /// In-flight requests per replica the autoscaler aims at (default 8).
    pub target_ongoing_requests: Option<f64>,
    /// How long the load must ask for more replicas before one is added (default 5 s).
    pub upscale_delay_s: Option<f64>,
    /// How long it must ask for fewer before one drains and stops (default 30 s).
    pub downscale_delay_s: Option<f64>,
}

fn positive(field: &str, v: Option<usize>, default: usize) -> Result<usize, AppError> {
    match v {
        None => Ok(default),
        Some(n) if (1..=MAX_REPLICAS).contains(&n) => Ok(n),
        Some(n) => Err(AppError::invalid(
            field,
            format!("{n} is not between 1 and {MAX_REPLICAS}"),
        )),
    }
}

fn seconds(field: &str, v: Option<f64>, default: f64) -> Result<f64, AppError> {
    match v {
        None => Ok(default),
        Some(s) if s.is_finite() && (0.0..=86_400.0).contains(&s) => Ok(s),
        Some(s) => Err(AppError::invalid(
            field,
            format!("{s} is not a number of seconds between 0 and 86400"),
        )),
    }
}

/// Turns the body into a spec (the path still to be checked as a model).
fn spec(state: &AppState, req: DeployRequest) -> Result<DeploymentSpec, AppError> {
    check_name(&req.name).map_err(|e| AppError::invalid("name", e))?;
    let path = paths::model("path", &req.path, &state.roots)?;
    let dtype = match req.dtype.as_deref() {
        None | Some("auto") => Dtype::Auto,
        Some("f32") | Some("float32") => Dtype::F32,
        Some("f16") | Some("float16") => Dtype::F16,
        Some("bf16") | Some("bfloat16") => Dtype::Bf16,
        Some(other) => {
            return Err(AppError::invalid(
                "dtype",
                format!("`{other}` is not one of auto, f32, f16, bf16"),
            ))
        }
    };
    let replicas = positive("replicas", req.replicas, 1)?;
    let autoscaling = req
        .autoscaling
        .map(|a| -> Result<AutoscalingSpec, AppError> {
            let target = a.target_ongoing_requests.unwrap_or(8.0);
            if !(target.is_finite() && target > 0.0) {
                return Err(AppError::invalid(
                    "autoscaling.target_ongoing_requests",
                    format!("{target} is not a positive number"),
                ));
            }
            Ok(AutoscalingSpec {
                target_ongoing_requests: target,
                upscale_delay_s: seconds("autoscaling.upscale_delay_s", a.upscale_delay_s, 5.0)?,
                downscale_delay_s: seconds(
                    "autoscaling.downscale_delay_s",
                    a.downscale_delay_s,
                    30.0,
                )?,
            })
        })
        .transpose()?;
    // 0 with autoscaling: scale to zero when idle (the next request starts a replica).
    let min_replicas = match req.min_replicas {
        Some(0) if autoscaling.is_some() => 0,
        Some(0) => {
            return Err(AppError::invalid(
                "min_replicas",
                "0 (scale to zero) needs `autoscaling`",
            ))
        }
        other => positive("min_replicas", other, 1)?,
    };
    let max_default = if autoscaling.is_some() {
        MAX_REPLICAS
    } else {
        replicas
    };
    let max_replicas = positive("max_replicas", req.max_replicas, max_default)?;
    if max_replicas < min_replicas {
        return Err(AppError::invalid(
            "max_replicas",
            format!("{max_replicas} is below min_replicas ({min_replicas})"),
        ));
    }
    let tensor_parallel = match req.tensor_parallel {
        None => None,
        Some(n) if (1..=64).contains(&n) => Some(n),
        Some(n) => {
            return Err(AppError::invalid(
                "tensor_parallel",
                format!("{n} is not between 1 and 64"),
            ))
        }
    };
    let tags = req.placement.map(|p| p.tags).unwrap_or_default();
    tessera_actors::tags::check(&tags).map_err(|e| AppError::invalid("placement.tags", e))?;
    Ok(DeploymentSpec {
        name: req.name,
        path,
        replicas,
        min_replicas,
        max_replicas,
        tensor_parallel,
        dtype,
        placement: PlacementSpec { tags },
        autoscaling,
    })
}

/// Deploys a base model on free inference slots.
#[utoipa::path(post, path = "/models", request_body = DeployRequest,
    responses((status = 202, description = "The deployment: `deploying`, `ready`, `pending` or `failed`, with `reason`", body = Object),
              (status = 400, body = super::error::ErrorBody), (status = 403, body = super::error::ErrorBody),
              (status = 409, body = super::error::ErrorBody), (status = 422, body = super::error::ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<DeployRequest>,
) -> Result<Response, AppError> {
    let spec = spec(&state, req)?;
    // A model's config is enough to refuse what is not one, before any replica tries to load it.
    let path = spec.path.clone();
    tokio::task::spawn_blocking(move || tessera_engine::loader::read_config(&path))
        .await
        .map_err(|e| AppError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(|e| AppError::invalid("path", format!("not a usable model: {e}")))?;
    let view = state.node.create_deployment(spec).await?;
    Ok((StatusCode::ACCEPTED, Json(view)).into_response())
}

/// Every deployment, the default one first.
#[utoipa::path(get, path = "/models",
    responses((status = 200, description = "Deployments with state, replicas, autoscaler figures", body = Object)))]
pub async fn list(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "deployments": state.node.deployments.list() }))
}

fn found(state: &AppState, name: &str) -> Result<DeploymentView, AppError> {
    state
        .node
        .deployments
        .get(name)
        .ok_or_else(|| AppError::not_found(format!("deployment `{name}` does not exist")))
}

#[utoipa::path(get, path = "/models/{name}",
    responses((status = 200, description = "The deployment", body = Object), (status = 404, body = super::error::ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<DeploymentView>, AppError> {
    found(&state, &name).map(Json)
}

/// Deletes a deployment: its replicas stop taking requests, finish the ones they hold, then stop
/// and free their slots (`state: deleting` until then).
#[utoipa::path(delete, path = "/models/{name}",
    responses((status = 202, description = "Draining", body = Object), (status = 404, body = super::error::ErrorBody),
              (status = 409, description = "The default deployment", body = super::error::ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, AppError> {
    found(&state, &name)?;
    let view = state.node.delete_deployment(&name).await?;
    Ok((StatusCode::ACCEPTED, Json(view)).into_response())
}
