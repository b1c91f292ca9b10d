//! The generation path shared by `/chat` and the OpenAI routes: take a checked
//! [`GenerationRequest`], resolve what serves it, dispatch to a replica through the router, wait
//! for the replica to accept, then either collect the whole completion (under the request
//! timeout) or hand out the event stream. Records time to first token and generated tokens.
//! Dropping what this returns cancels the sequence.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tessera_actors::messages::{ChatWork, ServeError, StreamEvent, TokenOut};
use tessera_actors::router::{Dispatched, Lease};
use tessera_engine::FinishReason;
use tokio::sync::mpsc;

use super::error::AppError;
use super::request_id::RequestId;
use super::resolve::{self, Resolved};
use super::validation::GenerationRequest;
use super::AppState;

/// A request accepted by a replica.
pub struct Started {
    pub id: String,
    pub replica: String,
    /// The model name answers report.
    pub model: String,
    /// The adapter serving it (`None`: the base model).
    pub adapter: Option<PathBuf>,
    pub prompt_tokens: usize,
    /// With tools offered: how the model writes calls.
    pub tool_format: Option<tessera_engine::tool_calls::ToolFormat>,
    pub started: Instant,
    pub deadline: Instant,
    events: mpsc::Receiver<StreamEvent>,
    _lease: Lease,
    route: &'static str,
    first_token_seen: bool,
    state: AppState,
}

/// A finished generation.
pub struct Collected {
    pub text: String,
    pub tokens: Vec<TokenOut>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// What the stream yields after `Started`.
pub enum Piece {
    Token(TokenOut),
    Finished {
        text: String,
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(AppError),
}

/// Resolves what `req` names, dispatches it to a replica and waits until one has accepted it.
pub async fn generate(
    state: &AppState,
    req: GenerationRequest,
    route: &'static str,
    trace: RequestId,
) -> Result<Started, AppError> {
    let constraint_field = req.constraint_field;
    let Resolved {
        deployment,
        adapter,
        model,
    } = resolve::target(state, &req.target).await?;
    let work = ChatWork {
        request_id: request_id(req.id_prefix),
        trace_id: trace.0,
        input: req.input,
        params: req.params,
        clamp_max_tokens: req.clamp_max_tokens,
        adapter: adapter.clone(),
        tools: req.tools,
        tool_choice: req.tool_choice,
        resume: Vec::new(),
    };
    let mut started = start(state, &deployment, work, route)
        .await
        .map_err(|e| name_constraint_field(e, constraint_field))?;
    started.model = model;
    started.adapter = adapter;
    Ok(started)
}

/// `req.n` generations of one request (each with its own seed: `seed + i` when one is given),
/// started together so they share batches and, through the prefix cache, the prompt's KV.
pub async fn generate_n(
    state: &AppState,
    req: GenerationRequest,
    route: &'static str,
    trace: RequestId,
) -> Result<Vec<Started>, AppError> {
    let starts = (0..req.n.max(1)).map(|i| {
        let mut one = req.clone();
        one.params.seed = one.params.seed.map(|s| s.wrapping_add(i as u64));
        generate(state, one, route, trace.clone())
    });
    futures::future::try_join_all(starts).await
}

/// A replica names `response_format` when a grammar does not compile: name the field the
/// client used instead (`guided_regex`, `structured_outputs`, ...).
fn name_constraint_field(mut e: AppError, field: Option<&'static str>) -> AppError {
    if let Some(field) = field {
        if e.field.as_deref() == Some("response_format") && field != "response_format" {
            e.message = e.message.replacen("response_format", field, 1);
            e.field = Some(field.to_string());
        }
    }
    e
}

/// Dispatches `work` and waits until a replica has accepted (or refused) it.
async fn start(
    state: &AppState,
    deployment: &str,
    work: ChatWork,
    route: &'static str,
) -> Result<Started, AppError> {
    let started = Instant::now();
    let deadline = started + state.request_timeout;
    let id = work.request_id.clone();
    cold_start(state, deployment, deadline).await?;
    // Admission control picks a replica (503 when all are full); the failover relay moves the
    // request if that replica is lost before it ends.
    let Dispatched { mut events, lease } =
        state
            .failover
            .dispatch(&state.node.router, deployment, work, deadline)?;
    let first = tokio::time::timeout_at(deadline.into(), events.recv())
        .await
        .map_err(|_| AppError::timeout(state.request_timeout.as_secs()))?;
    match first {
        Some(StreamEvent::Started {
            replica,
            prompt_tokens,
            tool_format,
        }) => Ok(Started {
            id,
            replica,
            model: String::new(),
            adapter: None,
            prompt_tokens,
            tool_format,
            started,
            deadline,
            events,
            _lease: lease,
            route,
            first_token_seen: false,
            state: state.clone(),
        }),
        Some(StreamEvent::Error(e)) => Err(e.into()),
        Some(other) => Err(AppError::from(ServeError::new(
            tessera_actors::messages::ServeErrorKind::Internal,
            format!("replica answered {other:?} before starting"),
        ))),
        None => Err(replica_lost(&lease.replica)),
    }
}

/// For a deployment scaled to zero (`min_replicas` 0, no replica serving): waits in its bounded
/// cold-start queue until a replica serves (the deployment manager starts one for the requests
/// waiting there). 503 with Retry-After when the queue is full, 504 past the deadline, 503 if the
/// replica fails to start. Returns at once for every other deployment.
async fn cold_start(state: &AppState, deployment: &str, deadline: Instant) -> Result<(), AppError> {
    let serving = || {
        state.node.router.replicas().iter().any(|r| {
            r.deployment == deployment && r.state == tessera_actors::health::ActorState::Running
        })
    };
    let scales_to_zero = state
        .node
        .deployments
        .get(deployment)
        .is_some_and(|d| d.spec.min_replicas == 0 && d.spec.autoscaling.is_some());
    if !scales_to_zero || serving() {
        return Ok(());
    }
    let Some(_place) = state
        .node
        .deployments
        .cold_waiter(deployment, state.cold_start_queue)
    else {
        return Err(ServeError::new(
            tessera_actors::messages::ServeErrorKind::Overloaded,
            format!(
                "deployment `{deployment}` is starting a replica from zero and {} requests already \
                 wait for it (autoscaling.cold_start_queue); retry",
                state.cold_start_queue
            ),
        )
        .into());
    };
    loop {
        if serving() {
            return Ok(());
        }
        use tessera_actors::deployments::DeploymentState;
        match state.node.deployments.get(deployment) {
            Some(d) if d.state == DeploymentState::Failed => {
                return Err(ServeError::unavailable(format!(
                    "deployment `{deployment}` could not start a replica: {}",
                    d.reason.unwrap_or_default()
                ))
                .into());
            }
            // Deleted meanwhile: dispatching says so.
            None => return Ok(()),
            Some(d) if d.state == DeploymentState::Deleting => return Ok(()),
            Some(_) => {}
        }
        if Instant::now() >= deadline {
            return Err(AppError::timeout(state.request_timeout.as_secs()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn replica_lost(replica: &str) -> AppError {
    AppError::from(ServeError::unavailable(format!(
        "replica {replica} stopped while serving this request; retry"
    )))
}

impl Started {
    /// The next piece, or `None` after `Finished`/`Failed`.
    pub async fn next(&mut self) -> Option<Piece> {
        let event = match tokio::time::timeout_at(self.deadline.into(), self.events.recv()).await {
            Err(_) => {
                return Some(Piece::Failed(AppError::timeout(
                    self.state.request_timeout.as_secs(),
                )))
            }
            Ok(e) => e,
        };
        Some(match event {
            Some(StreamEvent::Token(t)) => {
                if !self.first_token_seen {
                    self.first_token_seen = true;
                    self.state
                        .metrics
                        .time_to_first_token
                        .with_label_values(&[self.route])
                        .observe(self.started.elapsed().as_secs_f64());
                }
                self.state.metrics.generated_tokens.inc();
                Piece::Token(t)
            }
            Some(StreamEvent::Finished {
                text,
                reason,
                prompt_tokens,
                completion_tokens,
            }) => Piece::Finished {
                text,
                reason,
                prompt_tokens,
                completion_tokens,
            },
            Some(StreamEvent::Error(e)) => Piece::Failed(e.into()),
            Some(StreamEvent::Started { .. }) => return None,
            None => Piece::Failed(replica_lost(&self._lease.replica)),
        })
    }

    /// Runs to the end, gathering text and tokens.
    pub async fn collect(mut self) -> Result<Collected, AppError> {
        let mut text = String::new();
        let mut tokens = Vec::new();
        loop {
            match self.next().await {
                Some(Piece::Token(t)) => {
                    text.push_str(&t.text);
                    tokens.push(t);
                }
                Some(Piece::Finished {
                    text: tail,
                    reason,
                    prompt_tokens,
                    completion_tokens,
                }) => {
                    text.push_str(&tail);
                    return Ok(Collected {
                        text,
                        tokens,
                        finish_reason: reason,
                        prompt_tokens,
                        completion_tokens,
                    });
                }
                Some(Piece::Failed(e)) => return Err(e),
                None => return Err(replica_lost(&self._lease.replica)),
            }
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// A fresh request id with a prefix (`chat-`, `chatcmpl-`, `cmpl-`).
fn request_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}
