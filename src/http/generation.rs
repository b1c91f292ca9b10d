//! The generation path shared by `/chat` and the OpenAI routes: resolve the adapter, dispatch to a
//! replica through the router, wait for the replica to accept, then either collect the whole
//! completion (under the request timeout) or hand out the event stream. Records time to first
//! token and generated tokens. Dropping what this returns cancels the sequence.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use tessera_actors::messages::{ChatWork, ServeError, StreamEvent, TokenOut};
use tessera_actors::router::{Dispatched, Lease};
use tessera_engine::FinishReason;
use tokio::sync::mpsc;

use super::error::AppError;
use super::{paths, AppState};

/// A request accepted by a replica.
pub struct Started {
    pub id: String,
    pub replica: String,
    pub prompt_tokens: usize,
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

/// Resolves `adapter_path` (relative to the adapters root; confined to it). Its two files must be
/// regular files inside the root (a link to `/dev/zero` or a FIFO is refused before anything reads
/// it), and its weights must fit the adapter cache budget (`adapters.cache_memory_mb`).
pub fn adapter(
    state: &AppState,
    field: &str,
    raw: Option<&str>,
) -> Result<Option<PathBuf>, AppError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let dir = paths::existing(field, raw, &state.roots.adapters)?;
    if !dir.join("adapter_config.json").exists() {
        return Err(AppError::bad_request(
            field,
            format!("`{raw}` is not a PEFT adapter directory (no adapter_config.json)"),
        ));
    }
    let mut weights_len = 0;
    for name in ["adapter_config.json", "adapter_model.safetensors"] {
        let file = paths::existing(
            field,
            &dir.join(name).display().to_string(),
            &state.roots.adapters,
        )
        .map_err(|e| match e.status {
            StatusCode::FORBIDDEN => AppError::forbidden(
                field,
                format!(
                    "`{raw}/{name}` links outside the allowed directory {}",
                    state.roots.adapters.display()
                ),
            ),
            _ => e,
        })?;
        let meta = std::fs::metadata(&file)
            .map_err(|e| AppError::bad_request(field, format!("`{raw}/{name}`: {e}")))?;
        if !meta.is_file() {
            return Err(AppError::bad_request(
                field,
                format!("`{raw}/{name}` is not a regular file"),
            ));
        }
        weights_len = meta.len();
    }
    if weights_len > state.adapter_budget_bytes {
        return Err(AppError::invalid(
            field,
            format!(
                "`{raw}` holds {} MiB of weights, more than the adapter cache budget of {} MiB (adapters.cache_memory_mb)",
                weights_len.div_ceil(1 << 20),
                state.adapter_budget_bytes >> 20
            ),
        ));
    }
    Ok(Some(dir))
}

/// Dispatches `work` and waits until a replica has accepted (or refused) it.
pub async fn start(
    state: &AppState,
    work: ChatWork,
    route: &'static str,
) -> Result<Started, AppError> {
    let started = Instant::now();
    let deadline = started + state.request_timeout;
    let id = work.request_id.clone();
    let Dispatched { mut events, lease } = state.node.router.dispatch(work)?;
    let first = tokio::time::timeout_at(deadline.into(), events.recv())
        .await
        .map_err(|_| AppError::timeout(state.request_timeout.as_secs()))?;
    match first {
        Some(StreamEvent::Started {
            replica,
            prompt_tokens,
        }) => Ok(Started {
            id,
            replica,
            prompt_tokens,
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
pub fn request_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}
