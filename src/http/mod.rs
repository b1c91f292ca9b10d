//! The HTTP facade (axum). Handlers parse, validate and map results; the actors do the work.
//!
//! * [`chat`]: `POST /chat` (JSON or SSE).
//! * [`openai`]: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.
//! * [`deployments`]: `POST /models`, `GET /models`, `GET|DELETE /models/{name}`.
//! * [`jobs`]: `POST /fine-tune`, `GET /jobs`, `GET|DELETE /jobs/{id}`, `GET /jobs/{id}/events`.
//! * [`status`]: `/health`, `/ready`, `/cluster`, `/metrics`.
//! * [`dashboard`]: `GET /` and `/dashboard`, the web dashboard (embedded, no auth for the page).
//! * [`openapi`]: the document at `/openapi.json`.
//! * [`validation`]: the generation routes' bodies as one checked request; [`resolve`]: what its
//!   `model` / `adapter_path` names; [`generation`]: dispatch, stream and collect.
//! * [`guard`]: the token, or without one the Host check, before any body is read.
//! * [`error`], [`paths`], [`metrics`]: what they share.
//! * [`listener`]: the connection cap; [`server`]: the serving loop (header deadline); [`request_id`]: `X-Request-Id` and the request's log span.

pub mod chat;
pub mod dashboard;
pub mod deployments;
pub mod error;
pub mod generation;
pub mod guard;
pub mod jobs;
pub mod listener;
pub mod metrics;
pub mod openai;
pub mod openapi;
pub mod paths;
pub mod request_id;
pub mod resolve;
pub mod server;
pub mod status;
pub mod structured;
pub mod validation;

use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tessera_actors::Node;

use error::AppError;
use metrics::Metrics;
use paths::Roots;

/// What every handler shares.
pub struct Shared {
    /// This node's actors: router, job manager, health.
    pub node: Arc<Node>,
    /// The cluster endpoint: joined workers, the cluster port.
    pub cluster: Option<tessera_actors::cluster::head::HeadCluster>,
    /// Where client paths may point.
    pub roots: Roots,
    /// Bearer token required on every route but [`guard::PUBLIC`] (`None`: no auth, and only
    /// the Host names [`guard::host_allowed`] admits).
    pub auth_token: Option<String>,
    /// A dataset file's size at most (`training.max_dataset_bytes`).
    pub max_dataset_bytes: u64,
    /// Requests that may wait per deployment while it starts a replica from zero
    /// (`autoscaling.cold_start_queue`).
    pub cold_start_queue: usize,
    /// Host names served without a token besides IP literals and localhost
    /// (`server.allowed_hosts`).
    pub allowed_hosts: Vec<String>,
    /// A generation running longer than this ends with 504 (or an SSE error event).
    pub request_timeout: Duration,
    /// Moves a request may make when the replica serving it is lost (`server.request_retries`).
    pub failover: tessera_actors::failover::Failover,
    pub max_body_bytes: usize,
    /// A request body must arrive whole within this (else 408).
    pub body_read_timeout: Duration,
    /// A request's head must arrive whole within this (else the connection is closed).
    pub header_read_timeout: Duration,
    /// Client connections served at once (see [`listener`]).
    pub max_connections: usize,
    /// An adapter whose weights file is larger than this (the replicas' adapter cache budget) is
    /// refused with 400.
    pub adapter_budget_bytes: u64,
    pub metrics: Metrics,
    /// Enables `POST /_test/crash/{replica}` (set by TESSERA_TEST_HOOKS=1).
    pub test_hooks: bool,
    pub started: Instant,
}

#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// Every route, with the guard (token or Host), the body limit and metrics.
pub fn app(state: AppState) -> Router {
    let mut api = Router::new()
        .route("/chat", post(chat::chat))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::models))
        .route("/models", get(deployments::list).post(deployments::create))
        .route(
            "/models/{name}",
            get(deployments::get).delete(deployments::delete),
        )
        .route("/fine-tune", post(jobs::fine_tune))
        .route("/jobs", get(jobs::list))
        .route("/jobs/{id}", get(jobs::get).delete(jobs::cancel))
        .route("/jobs/{id}/events", get(jobs::events))
        .route("/cluster", get(status::cluster))
        .route("/metrics", get(status::metrics))
        .route("/openapi.json", get(openapi::document));
    if state.test_hooks {
        api = api.route("/_test/crash/{replica}", post(status::crash));
    }
    Router::new()
        .route("/health", get(status::health))
        .route("/ready", get(status::ready))
        // The page holds no data; what it shows it reads from the API, with the token.
        .route("/", get(dashboard::page))
        .route("/dashboard", get(dashboard::page))
        .merge(api)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), read_body))
        // Outside the body read: a request refused for its token or Host is never buffered.
        .layer(middleware::from_fn_with_state(state.clone(), guard::guard))
        .layer(middleware::from_fn(error::json_errors))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .layer(middleware::from_fn(request_id::layer))
        .with_state(state)
}

/// Reads the whole request body within `server.body_read_timeout_secs` and `max_body_bytes`
/// before any handler runs: a client trickling its body cannot hold a request open for long.
async fn read_body(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let read = axum::body::to_bytes(body, state.max_body_bytes);
    let bytes = match tokio::time::timeout(state.body_read_timeout, read).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                || e.to_string().contains("length limit");
            return if too_large {
                AppError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "the request body is larger than server.max_body_bytes",
                )
            } else {
                AppError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    format!("reading the request body: {e}"),
                )
            }
            .into_response();
        }
        Err(_) => {
            return AppError::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!(
                    "the request body did not arrive within {} s (server.body_read_timeout_secs)",
                    state.body_read_timeout.as_secs()
                ),
            )
            .into_response()
        }
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

async fn not_found() -> AppError {
    AppError::not_found("no such route; see /openapi.json")
}
