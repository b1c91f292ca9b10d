//! `POST /chat`: a prompt or messages (rendered with the model's chat template), optional
//! `adapter_path`, sampling parameters; one JSON answer, or with `stream: true` Server-Sent Events:
//! `token` events, then one `done` event with the whole answer (or an `error` event).

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::Stream;
use serde::{Deserialize, Serialize};
use tessera_actors::messages::{ChatWork, PromptInput};
use tessera_engine::sampling::SamplingParams;
use tessera_engine::{ChatMessage, FinishReason};
use utoipa::ToSchema;

use super::error::{ApiJson, AppError};
use super::generation::{self, Piece, Started};
use super::AppState;

/// Default `max_tokens` of `/chat` and `/v1/chat/completions` (lowered to what the context has
/// left when the client gives none).
pub const DEFAULT_CHAT_MAX_TOKENS: usize = 256;

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    pub content: String,
}

/// Stop strings: one, or a list.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    /// A single user turn (rendered with the chat template unless `raw`). Give this or `messages`.
    pub prompt: Option<String>,
    pub messages: Option<Vec<Message>>,
    /// Default 256, lowered to fit the context.
    pub max_tokens: Option<usize>,
    /// Default 1.0; 0 is greedy.
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f64>,
    pub stop: Option<Stop>,
    pub seed: Option<u64>,
    /// A PEFT adapter directory, relative to (and confined to) `adapters.root`.
    pub adapter_path: Option<String>,
    #[serde(default)]
    pub stream: bool,
    /// Feed `prompt` to the model as it is, without the chat template.
    #[serde(default)]
    pub raw: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChatResponse {
    pub id: String,
    pub text: String,
    /// `stop`, `length` or `cancelled`.
    pub finish_reason: String,
    pub usage: Usage,
    pub adapter_path: Option<String>,
    pub latency_ms: f64,
    /// The replica that served it.
    pub replica: String,
}

/// One `token` event of a `/chat` stream.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChatTokenEvent {
    pub id: String,
    pub token_id: u32,
    pub text: String,
}

pub fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "cancelled",
    }
}

/// Checks roles and builds the prompt input.
pub fn messages_input(messages: Vec<Message>, field: &str) -> Result<PromptInput, AppError> {
    if messages.is_empty() {
        return Err(AppError::invalid(field, "must hold at least one message"));
    }
    for (i, m) in messages.iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool") {
            return Err(AppError::invalid(
                format!("{field}[{i}].role"),
                format!("`{}` is not one of system, user, assistant, tool", m.role),
            ));
        }
    }
    Ok(PromptInput::Messages(
        messages
            .into_iter()
            .map(|m| ChatMessage {
                role: m.role,
                content: m.content,
            })
            .collect(),
    ))
}

/// Checks the sampling values whose range the engine would otherwise report less precisely.
pub fn check_params(p: &SamplingParams) -> Result<(), AppError> {
    if p.max_tokens == 0 {
        return Err(AppError::invalid("max_tokens", "must be at least 1"));
    }
    p.validate()
        .map_err(|e| AppError::invalid(e.field, e.message))
}

#[utoipa::path(post, path = "/chat", request_body = ChatRequest,
    responses((status = 200, description = "The answer (or an SSE stream with `stream: true`)", body = ChatResponse),
              (status = 400, body = super::error::ErrorBody), (status = 403, body = super::error::ErrorBody),
              (status = 422, body = super::error::ErrorBody), (status = 503, body = super::error::ErrorBody),
              (status = 504, body = super::error::ErrorBody)))]
pub async fn chat(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<ChatRequest>,
) -> Result<Response, AppError> {
    let input = match (req.prompt, req.messages) {
        (Some(_), Some(_)) => {
            return Err(AppError::invalid(
                "messages",
                "give `prompt` or `messages`, not both",
            ))
        }
        (None, None) => return Err(AppError::invalid("prompt", "give `prompt` or `messages`")),
        (Some(p), None) if req.raw => PromptInput::Raw(p),
        (Some(p), None) => PromptInput::Messages(vec![ChatMessage {
            role: "user".into(),
            content: p,
        }]),
        (None, Some(m)) => messages_input(m, "messages")?,
    };
    let defaults = SamplingParams::default();
    let params = SamplingParams {
        max_tokens: req.max_tokens.unwrap_or(DEFAULT_CHAT_MAX_TOKENS),
        temperature: req.temperature.unwrap_or(defaults.temperature),
        top_p: req.top_p.unwrap_or(defaults.top_p),
        top_k: req.top_k.unwrap_or(defaults.top_k),
        repetition_penalty: req
            .repetition_penalty
            .unwrap_or(defaults.repetition_penalty),
        seed: req.seed,
        stop: req.stop.map(Stop::into_vec).unwrap_or_default(),
        ..defaults
    };
    check_params(&params)?;
    let adapter = generation::adapter(&state, "adapter_path", req.adapter_path.as_deref())?;
    let work = ChatWork {
        request_id: generation::request_id("chat-"),
        input,
        params,
        clamp_max_tokens: req.max_tokens.is_none(),
        adapter: adapter.clone(),
    };
    let adapter_path = adapter.map(|p| p.display().to_string());
    let started = generation::start(&state, work, "/chat").await?;
    if req.stream {
        return Ok(Sse::new(stream(started, adapter_path))
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let (id, replica, t0) = (started.id.clone(), started.replica.clone(), started.started);
    let done = started.collect().await?;
    Ok(Json(ChatResponse {
        id,
        text: done.text,
        finish_reason: finish_reason(done.finish_reason).into(),
        usage: Usage {
            prompt_tokens: done.prompt_tokens,
            completion_tokens: done.completion_tokens,
        },
        adapter_path,
        latency_ms: t0.elapsed().as_secs_f64() * 1e3,
        replica,
    })
    .into_response())
}

fn stream(
    mut started: Started,
    adapter_path: Option<String>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    async_stream::stream! {
        let mut text = String::new();
        while let Some(piece) = started.next().await {
            match piece {
                Piece::Token(t) => {
                    text.push_str(&t.text);
                    let event = ChatTokenEvent { id: started.id.clone(), token_id: t.id, text: t.text };
                    yield Ok(SseEvent::default().event("token").json_data(&event).expect("json"));
                }
                Piece::Finished { text: tail, reason, prompt_tokens, completion_tokens } => {
                    text.push_str(&tail);
                    let done = ChatResponse {
                        id: started.id.clone(),
                        text: std::mem::take(&mut text),
                        finish_reason: finish_reason(reason).into(),
                        usage: Usage { prompt_tokens, completion_tokens },
                        adapter_path: adapter_path.clone(),
                        latency_ms: started.elapsed().as_secs_f64() * 1e3,
                        replica: started.replica.clone(),
                    };
                    yield Ok(SseEvent::default().event("done").json_data(&done).expect("json"));
                    break;
                }
                Piece::Failed(e) => {
                    yield Ok(SseEvent::default().event("error").json_data(e.body()).expect("json"));
                    break;
                }
            }
        }
    }
}
