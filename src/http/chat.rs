//! `POST /chat`: a prompt or messages (rendered with the model's chat template), optional
//! `adapter_path`, sampling parameters; one JSON answer, or with `stream: true` Server-Sent Events:
//! `token` events, then one `done` event with the whole answer (or an `error` event).

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::Stream;
use serde::{Deserialize, Serialize};
use tessera_engine::FinishReason;
use utoipa::ToSchema;

use super::error::{ApiJson, AppError};
use super::generation::{self, Piece, Started};
use super::request_id::RequestId;
use super::validation::{self, Stop};
use super::AppState;

#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    pub content: String,
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
    /// The deployment that serves it (`GET /models`); default: the model given at start.
    pub model: Option<String>,
    #[serde(default)]
    pub stream: bool,
    /// Feed `prompt` to the model as it is, without the chat template.
    #[serde(default)]
    pub raw: bool,
    /// Structured outputs, as OpenAI's: `{"type": "json_object"}` or `{"type": "json_schema",
    /// "json_schema": {"schema": ...}}`.
    pub response_format: Option<crate::http::structured::ResponseFormat>,
    /// Structured outputs, as vLLM's: one of `json`, `regex`, `choice`, `grammar`, `json_object`.
    pub structured_outputs: Option<crate::http::structured::StructuredOutputs>,
    /// In [-2, 2], as OpenAI's.
    pub presence_penalty: Option<f64>,
    /// In [-2, 2], as OpenAI's.
    pub frequency_penalty: Option<f64>,
    /// Token id (as a string) to a bias in [-100, 100].
    pub logit_bias: Option<std::collections::HashMap<String, f64>>,
    /// End tokens and stop strings count only after this many tokens.
    pub min_tokens: Option<usize>,
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
    /// The deployment that served it.
    pub model: String,
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

#[utoipa::path(post, path = "/chat", request_body = ChatRequest,
    responses((status = 200, description = "The answer (or an SSE stream with `stream: true`)", body = ChatResponse),
              (status = 400, body = super::error::ErrorBody), (status = 403, body = super::error::ErrorBody),
              (status = 422, body = super::error::ErrorBody), (status = 503, body = super::error::ErrorBody),
              (status = 504, body = super::error::ErrorBody)))]
pub async fn chat(
    State(state): State<AppState>,
    Extension(trace): Extension<RequestId>,
    ApiJson(req): ApiJson<ChatRequest>,
) -> Result<Response, AppError> {
    let req = validation::chat(req)?;
    let streaming = req.stream;
    let started = generation::generate(&state, req, "/chat", trace).await?;
    let adapter_path = started.adapter.as_ref().map(|p| p.display().to_string());
    if streaming {
        return Ok(Sse::new(stream(started, adapter_path))
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let (id, replica, t0) = (started.id.clone(), started.replica.clone(), started.started);
    let model = started.model.clone();
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
        model,
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
                        model: started.model.clone(),
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
