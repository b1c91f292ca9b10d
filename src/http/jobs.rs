//! Fine-tune jobs over HTTP: `POST /fine-tune` (202 + job id), `GET /jobs` (filter and page),
//! `GET /jobs/{id}` (state, progress, history, error, adapter), `DELETE /jobs/{id}` (cancel) and
//! `GET /jobs/{id}/events` (SSE of progress and state changes until the job ends).

use std::convert::Infallible;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::Stream;
use serde::{Deserialize, Serialize};
use tessera_actors::jobs::{JobEvent, JobPage, JobQuery, JobRecord, JobSpec, JobState, Priority};
use tessera_engine::train::hyperparams::{BaseQuantization, Hyperparameters, TrainJob};
use tokio::sync::mpsc;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiJson, ApiQuery, AppError};
use super::{paths, AppState};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FineTuneRequest {
    /// JSONL dataset, relative to (and confined to) `training.data_root`.
    pub dataset_path: String,
    /// Where the adapter is written, relative to (and confined to) `adapters.root`; must not
    /// exist yet or be empty, and must not be, contain or lie inside a queued or running job's.
    pub output_path: String,
    /// A deployment's name (`GET /models`: its model), the served model's path, or a model under
    /// (and confined to) `model.models_root` (relative paths are taken from there); default: the
    /// served model.
    pub base_model: Option<String>,
    /// `high`, `normal` (default) or `low`.
    pub priority: Option<String>,
    /// LoRA and optimiser settings (PEFT/TRL names); unknown names are refused.
    #[schema(value_type = Object)]
    #[serde(default)]
    pub hyperparameters: serde_json::Value,
    /// Where it may run: `{"tags": {"zone": "b"}}` runs it only on trainers of nodes carrying
    /// every tag (`--tag`); it waits, with `pending_reason` in its record, until such a node is
    /// in the cluster.
    pub placement: Option<JobPlacement>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobPlacement {
    /// Required node tags: keys and values of 1 to 63 letters, digits, `.`, `_` or `-`.
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FineTuneAccepted {
    pub job_id: String,
    pub status: String,
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct ListParams {
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    pub status: Option<String>,
    /// Page size, 1..=500 (default 50).
    pub limit: Option<usize>,
    pub offset: Option<usize>,
}

#[utoipa::path(post, path = "/fine-tune", request_body = FineTuneRequest,
    responses((status = 202, body = FineTuneAccepted), (status = 400, body = super::error::ErrorBody),
              (status = 403, body = super::error::ErrorBody), (status = 409, body = super::error::ErrorBody),
              (status = 422, body = super::error::ErrorBody), (status = 429, body = super::error::ErrorBody)))]
pub async fn fine_tune(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<FineTuneRequest>,
) -> Result<Response, AppError> {
    let dataset_path = paths::existing("dataset_path", &req.dataset_path, &state.roots.data)?;
    // Opened without blocking and checked as opened (a FIFO or a link to a device is refused, a
    // file over the bound is never read); the trainer checks again when it reads it.
    if let Err(e) = tessera_engine::regular_file::open(&dataset_path, Some(state.max_dataset_bytes))
    {
        return Err(AppError::bad_request(
            "dataset_path",
            format!(
                "`{}`: {e}{}",
                req.dataset_path,
                if e.kind() == std::io::ErrorKind::FileTooLarge {
                    " (training.max_dataset_bytes)"
                } else {
                    ""
                }
            ),
        ));
    }
    let output_path = paths::creatable("output_path", &req.output_path, &state.roots.adapters)?;
    if std::fs::read_dir(&output_path).is_ok_and(|mut d| d.next().is_some())
        || output_path.is_file()
    {
        return Err(AppError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!(
                "output_path: `{}` already exists and is not empty; choose a new directory",
                req.output_path
            ),
        )
        .with_field("output_path"));
    }
    let base_model = match req.base_model.as_deref() {
        None | Some("") => None,
        // A deployment's name: its model.
        Some(raw) => match state.node.deployments.find(raw) {
            Some(d) if !raw.contains(['/', '\\']) => Some(d.spec.path),
            _ => Some(paths::model("base_model", raw, &state.roots)?),
        },
    };
    let priority = match req.priority.as_deref() {
        None => Priority::Normal,
        Some(p) => Priority::parse(p).ok_or_else(|| {
            AppError::invalid("priority", format!("`{p}` is not one of high, normal, low"))
        })?,
    };
    let hyperparameters = if req.hyperparameters.is_null() {
        Hyperparameters::default()
    } else {
        Hyperparameters::from_json(req.hyperparameters)
            .map_err(|e| AppError::invalid(format!("hyperparameters.{}", e.field), e.message))?
    };
    let tags = req.placement.map(|p| p.tags).unwrap_or_default();
    tessera_actors::tags::check(&tags).map_err(|e| AppError::invalid("placement.tags", e))?;
    check_context(&state, base_model.as_deref(), &hyperparameters).await?;
    let spec = JobSpec {
        train: TrainJob {
            dataset_path,
            output_path,
            base_model,
            hyperparameters,
        },
        priority,
        tags,
    };
    // The job manager refuses, checking and inserting in one step, a job past `jobs.max_queued`
    // (429) and an output that is, contains or lies in a live job's (409 naming `output_path`).
    let record = state.node.submit_job(spec).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(FineTuneAccepted {
            job_id: record.id,
            status: record.status.as_str().into(),
        }),
    )
        .into_response())
}

/// Refuses a `max_seq_length` beyond the base model's context (read from its config alone), a
/// `base_model` that is not a model, and a packed base (`base_quantization`) without 4-bit weights.
async fn check_context(
    state: &AppState,
    base_model: Option<&std::path::Path>,
    h: &Hyperparameters,
) -> Result<(), AppError> {
    let path = base_model
        .unwrap_or(state.roots.served_model.as_path())
        .to_path_buf();
    let packed = h.base_quantization == BaseQuantization::Packed;
    let (config, four_bit) = tokio::task::spawn_blocking(move || {
        let config = tessera_engine::loader::read_config(&path)?;
        let four_bit = if packed {
            tessera_engine::loader::four_bit_layer_weights(&path)?
        } else {
            0
        };
        Ok::<_, tessera_engine::loader::LoadError>((config, four_bit))
    })
    .await
    .map_err(|e| AppError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
    .map_err(|e| AppError::bad_request("base_model", format!("not a usable model: {e}")))?;
    if packed && four_bit == 0 {
        return Err(AppError::invalid(
            "hyperparameters.base_quantization",
            "`packed` needs a GGUF base model with Q4_0, Q4_1 or Q4_K layer weights; this base has none"
                .to_string(),
        ));
    }
    let context = config.max_position_embeddings;
    if h.max_seq_length > context {
        return Err(AppError::invalid(
            "hyperparameters.max_seq_length",
            format!(
                "{} exceeds the base model's context of {context} tokens",
                h.max_seq_length
            ),
        ));
    }
    Ok(())
}

#[utoipa::path(get, path = "/jobs", params(ListParams),
    responses((status = 200, description = "A page of jobs, newest first", body = Object),
              (status = 422, body = super::error::ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<JobPage>, AppError> {
    let status = params
        .status
        .as_deref()
        .map(|s| {
            JobState::parse(s).ok_or_else(|| {
                AppError::invalid(
                    "status",
                    format!("`{s}` is not one of queued, running, succeeded, failed, cancelled"),
                )
            })
        })
        .transpose()?;
    let limit = params.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(AppError::invalid("limit", "must be within 1..=500"));
    }
    let query = JobQuery {
        status,
        limit,
        offset: params.offset.unwrap_or(0),
    };
    Ok(Json(state.node.list_jobs(query).await?))
}

#[utoipa::path(get, path = "/jobs/{id}", params(("id" = String, Path, description = "Job id")),
    responses((status = 200, description = "The job with its progress history", body = Object),
              (status = 404, body = super::error::ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobRecord>, AppError> {
    Ok(Json(state.node.job(&id).await?))
}

#[utoipa::path(delete, path = "/jobs/{id}", params(("id" = String, Path, description = "Job id")),
    responses((status = 200, description = "Queued: cancelled now; running: cancelled after its current step", body = Object),
              (status = 404, body = super::error::ErrorBody), (status = 409, body = super::error::ErrorBody)))]
pub async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobRecord>, AppError> {
    Ok(Json(state.node.cancel_job(&id).await?))
}

#[utoipa::path(get, path = "/jobs/{id}/events", params(("id" = String, Path, description = "Job id")),
    responses((status = 200, description = "SSE: `state` events (the job record) and `progress` events, until the job ends"),
              (status = 404, body = super::error::ErrorBody)))]
pub async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, AppError> {
    let (tx, rx) = mpsc::channel(256);
    let record = state.node.subscribe_job(&id, tx).await?;
    Ok(Sse::new(job_stream(record, rx))
        .keep_alive(KeepAlive::default())
        .into_response())
}

fn job_stream(
    record: JobRecord,
    mut rx: mpsc::Receiver<JobEvent>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    async_stream::stream! {
        let done = record.status.is_final();
        yield Ok(SseEvent::default().event("state").json_data(&record).expect("json"));
        if !done {
            while let Some(event) = rx.recv().await {
                match event {
                    JobEvent::Progress(p) => {
                        yield Ok(SseEvent::default().event("progress").json_data(&p).expect("json"));
                    }
                    JobEvent::State(r) => {
                        let last = r.status.is_final();
                        yield Ok(SseEvent::default().event("state").json_data(&r).expect("json"));
                        if last { break; }
                    }
                }
            }
        }
    }
}
