//! The OpenAI-compatible routes, so that the official clients work unchanged (streaming too):
//!
//! * `POST /v1/chat/completions`: messages rendered with the chat template; JSON, or with
//!   `stream: true` SSE `data:` chunks (`chat.completion.chunk`) ending with `data: [DONE]`.
//! * `POST /v1/completions`: a raw prompt; JSON or SSE (`text_completion` chunks).
//! * `GET /v1/models`: the base model, the adapter directories under the adapters root and the
//!   adapters the replicas hold.
//!
//! `model` picks what serves the request: the base model's name, a succeeded fine-tune job id
//! (`ft-...`, its adapter) or an adapter directory (relative to, and confined to, the adapters
//! root). Fields the OpenAI API has and Tessera does not implement are refused when they would
//! change the answer (`n` > 1, penalties, `echo`, `suffix`) and ignored otherwise (`user`,
//! `logit_bias`, ...).

use std::collections::HashSet;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::Stream;
use serde::Serialize;
use tessera_actors::jobs::{JobError, JobMsg, JobState};
use tessera_actors::messages::{ChatWork, PromptInput, TokenOut};
use tessera_engine::sampling::{SamplingParams, MAX_TOP_LOGPROBS};
use tessera_engine::FinishReason;

use crate::http::chat::{check_params, messages_input, Message, Stop, DEFAULT_CHAT_MAX_TOKENS};
use crate::http::error::{ApiJson, AppError};
use crate::http::generation::{self, Piece, Started};
use crate::http::AppState;

mod types;
pub use types::*;

/// Default `max_tokens` of `/v1/completions` (OpenAI's).
pub const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;

/// The most `logprobs` `/v1/completions` accepts (OpenAI's limit).
pub const MAX_COMPLETION_LOGPROBS: usize = 5;

/// What log-probabilities JSON cannot carry (`-inf`) is reported as this (as vLLM does).
const FLOOR_LOGPROB: f32 = -9999.0;

// ---------------------------------------------------------------------------------------------
// Pure helpers
// ---------------------------------------------------------------------------------------------

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// OpenAI knows no `cancelled`: a cancelled sequence stopped.
pub fn openai_finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

fn finite(logprob: f32) -> f32 {
    if logprob.is_finite() {
        logprob
    } else {
        FLOOR_LOGPROB
    }
}

/// `logprobs.content` of a chat completion for these tokens.
pub fn chat_logprobs(tokens: &[TokenOut]) -> ChatLogprobs {
    ChatLogprobs {
        content: tokens
            .iter()
            .map(|t| ChatTokenLogprob {
                token: t.token.clone(),
                logprob: finite(t.logprob),
                bytes: t.token.as_bytes().to_vec(),
                top_logprobs: t
                    .top_logprobs
                    .iter()
                    .map(|a| ChatTopLogprob {
                        token: a.token.clone(),
                        logprob: finite(a.logprob),
                        bytes: a.token.as_bytes().to_vec(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// `logprobs` of a text completion for these tokens; `offset` is the completion's length in
/// characters before them, and is advanced past them (so stream chunks continue the count).
pub fn completion_logprobs(tokens: &[TokenOut], offset: &mut usize) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    for t in tokens {
        out.tokens.push(t.token.clone());
        out.token_logprobs.push(finite(t.logprob));
        let mut top: Vec<(String, f32)> = Vec::with_capacity(t.top_logprobs.len());
        for a in &t.top_logprobs {
            if !top.iter().any(|(k, _)| *k == a.token) {
                top.push((a.token.clone(), finite(a.logprob)));
            }
        }
        out.top_logprobs.push(TopMap(top));
        out.text_offset.push(*offset);
        *offset += t.token.chars().count();
    }
    out
}

/// The text of `/v1/completions`' `prompt`: a string, or a list holding exactly one string.
pub fn prompt_text(prompt: &serde_json::Value) -> Result<String, AppError> {
    use serde_json::Value;
    match prompt {
        Value::String(s) => Ok(s.clone()),
        Value::Array(items) => match items.as_slice() {
            [Value::String(s)] => Ok(s.clone()),
            [] => Err(AppError::invalid(
                "prompt",
                "the list is empty; give one string",
            )),
            [_] => Err(AppError::invalid(
                "prompt",
                "token-id prompts are not supported; give a string",
            )),
            _ => Err(AppError::invalid(
                "prompt",
                format!(
                    "batched prompts are not supported ({} given); send one string per request",
                    items.len()
                ),
            )),
        },
        Value::Null => Err(AppError::invalid("prompt", "required: a string")),
        _ => Err(AppError::invalid(
            "prompt",
            "must be a string or a list of one string",
        )),
    }
}

/// OpenAI messages as Tessera's: text parts joined, `developer` read as `system`.
pub fn convert_messages(messages: Vec<OpenAiMessage>) -> Result<Vec<Message>, AppError> {
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let content = match m.content {
                None => String::new(),
                Some(MessageContent::Text(s)) => s,
                Some(MessageContent::Parts(parts)) => {
                    let mut texts = Vec::with_capacity(parts.len());
                    for (j, p) in parts.into_iter().enumerate() {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => texts.push(t),
                            ("text", None) => {
                                return Err(AppError::invalid(
                                    format!("messages[{i}].content[{j}].text"),
                                    "required for a text part",
                                ))
                            }
                            (other, _) => {
                                return Err(AppError::invalid(
                                    format!("messages[{i}].content[{j}].type"),
                                    format!("`{other}` parts are not supported; only `text`"),
                                ))
                            }
                        }
                    }
                    texts.join("\n")
                }
            };
            let role = if m.role == "developer" {
                "system".to_string()
            } else {
                m.role
            };
            Ok(Message { role, content })
        })
        .collect()
}

/// Refuses the OpenAI fields Tessera cannot honour.
fn check_unsupported(
    n: Option<usize>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
) -> Result<(), AppError> {
    if let Some(n) = n {
        if n != 1 {
            return Err(AppError::invalid(
                "n",
                format!("only 1 is supported, got {n}"),
            ));
        }
    }
    for (field, value) in [
        ("presence_penalty", presence_penalty),
        ("frequency_penalty", frequency_penalty),
    ] {
        if let Some(v) = value {
            if v != 0.0 {
                return Err(AppError::invalid(
                    field,
                    format!("only 0 is supported, got {v} (use repetition_penalty)"),
                ));
            }
        }
    }
    Ok(())
}

/// The sampling parameters of a chat completion, checked, and whether `max_tokens` is a default.
pub fn chat_params(req: &ChatCompletionRequest) -> Result<(SamplingParams, bool), AppError> {
    check_unsupported(req.n, req.presence_penalty, req.frequency_penalty)?;
    let logprobs = req.logprobs.unwrap_or(false);
    let top_logprobs = req.top_logprobs.unwrap_or(0);
    if top_logprobs > 0 && !logprobs {
        return Err(AppError::invalid(
            "top_logprobs",
            "requires `logprobs: true`",
        ));
    }
    if top_logprobs > MAX_TOP_LOGPROBS {
        return Err(AppError::invalid(
            "top_logprobs",
            format!("at most {MAX_TOP_LOGPROBS}, got {top_logprobs}"),
        ));
    }
    let given = req.max_completion_tokens.or(req.max_tokens);
    let defaults = SamplingParams::default();
    let params = SamplingParams {
        max_tokens: given.unwrap_or(DEFAULT_CHAT_MAX_TOKENS),
        temperature: req.temperature.unwrap_or(defaults.temperature),
        top_p: req.top_p.unwrap_or(defaults.top_p),
        top_k: req.top_k.unwrap_or(defaults.top_k),
        repetition_penalty: req
            .repetition_penalty
            .unwrap_or(defaults.repetition_penalty),
        seed: req.seed,
        stop: req.stop.clone().map(Stop::into_vec).unwrap_or_default(),
        top_logprobs,
        ..defaults
    };
    check_params(&params).map_err(|mut e| {
        if req.max_completion_tokens.is_some() && e.field.as_deref() == Some("max_tokens") {
            e.field = Some("max_completion_tokens".into());
            e.message = e.message.replacen("max_tokens", "max_completion_tokens", 1);
        }
        e
    })?;
    Ok((params, given.is_none()))
}

/// The sampling parameters of a text completion, checked, and whether `max_tokens` is a default.
pub fn completion_params(req: &CompletionRequest) -> Result<(SamplingParams, bool), AppError> {
    check_unsupported(req.n, req.presence_penalty, req.frequency_penalty)?;
    if let Some(b) = req.best_of {
        if b != 1 {
            return Err(AppError::invalid(
                "best_of",
                format!("only 1 is supported, got {b}"),
            ));
        }
    }
    if req.echo == Some(true) {
        return Err(AppError::invalid("echo", "not supported"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(AppError::invalid("suffix", "not supported"));
    }
    let top_logprobs = req.logprobs.unwrap_or(0);
    if top_logprobs > MAX_COMPLETION_LOGPROBS {
        return Err(AppError::invalid(
            "logprobs",
            format!("at most {MAX_COMPLETION_LOGPROBS}, got {top_logprobs}"),
        ));
    }
    let defaults = SamplingParams::default();
    let params = SamplingParams {
        max_tokens: req.max_tokens.unwrap_or(DEFAULT_COMPLETION_MAX_TOKENS),
        temperature: req.temperature.unwrap_or(defaults.temperature),
        top_p: req.top_p.unwrap_or(defaults.top_p),
        top_k: req.top_k.unwrap_or(defaults.top_k),
        repetition_penalty: req
            .repetition_penalty
            .unwrap_or(defaults.repetition_penalty),
        seed: req.seed,
        stop: req.stop.clone().map(Stop::into_vec).unwrap_or_default(),
        top_logprobs,
        ..defaults
    };
    check_params(&params)?;
    Ok((params, req.max_tokens.is_none()))
}

/// Whether `model` names the base model `base`: its name (any case), with `.gguf`, or as the last
/// component of a path (`/models/qwen.gguf`, `Qwen/Qwen2.5-0.5B-Instruct`).
pub fn names_base(model: &str, base: &str) -> bool {
    let same = |s: &str| {
        s.eq_ignore_ascii_case(base)
            || s.len() == base.len() + 5
                && s.is_char_boundary(base.len())
                && s[..base.len()].eq_ignore_ascii_case(base)
                && s[base.len()..].eq_ignore_ascii_case(".gguf")
    };
    if same(model) {
        return true;
    }
    Path::new(model)
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(same)
}

fn model_not_found(model: &str, base: Option<&str>, why: Option<&str>) -> AppError {
    let base = match base {
        Some(b) => format!("the base model `{b}`"),
        None => "the base model (not loaded yet)".to_string(),
    };
    let why = why.map(|w| format!(" ({w})")).unwrap_or_default();
    AppError {
        status: StatusCode::NOT_FOUND,
        kind: "model_not_found",
        message: format!(
            "model: `{model}` does not exist{why}; use {base}, an adapter directory under the \
             adapters root, or a succeeded fine-tune job id (see GET /v1/models)"
        ),
        field: Some("model".into()),
    }
}

// ---------------------------------------------------------------------------------------------
// Model resolution and listing
// ---------------------------------------------------------------------------------------------

/// What `model` selects: `None` for the base model, or an adapter directory.
pub async fn resolve_model(state: &AppState, model: &str) -> Result<Option<PathBuf>, AppError> {
    let base = state.node.router.model_name();
    if model.is_empty() {
        return Ok(None);
    }
    if let Some(b) = &base {
        if model.eq_ignore_ascii_case(b) || names_base(model, b) && !model.contains(['/', '\\']) {
            return Ok(None);
        }
    }
    if model.starts_with("ft-") && !model.contains(['/', '\\']) {
        let id = model.to_string();
        match state.node.jobs(|r| JobMsg::Get(id, r)).await {
            Ok(job) => {
                return match (job.status, job.adapter_path) {
                    (JobState::Succeeded, Some(path)) => Ok(Some(path)),
                    (status, _) => Err(model_not_found(
                        model,
                        base.as_deref(),
                        Some(&format!(
                            "fine-tune job {model} is {}, it has no adapter to serve",
                            serde_json::to_value(status)
                                .ok()
                                .and_then(|v| v.as_str().map(str::to_string))
                                .unwrap_or_default()
                        )),
                    )),
                };
            }
            Err(JobError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    match generation::adapter(state, "model", Some(model)) {
        Ok(adapter) => Ok(adapter),
        Err(e) if e.status == StatusCode::BAD_REQUEST => {
            if let Some(b) = &base {
                if names_base(model, b) {
                    return Ok(None);
                }
            } else {
                return Err(AppError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "no replica has loaded the base model yet; retry",
                ));
            }
            Err(model_not_found(model, base.as_deref(), None))
        }
        Err(e) => Err(e),
    }
}

fn mtime_secs(path: &Path) -> Option<u64> {
    let modified = std::fs::metadata(path).ok()?.modified().ok()?;
    Some(modified.duration_since(UNIX_EPOCH).ok()?.as_secs())
}

/// Adapter directories directly under `root`: (name, canonical path, created).
fn adapter_dirs(root: &Path) -> Vec<(String, PathBuf, u64)> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut out: Vec<(String, PathBuf, u64)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let path = e.path();
            let name = e.file_name().to_str()?.to_string();
            if !path.join("adapter_config.json").is_file() {
                return None;
            }
            let real = path.canonicalize().unwrap_or(path.clone());
            let created = mtime_secs(&path).unwrap_or(0);
            Some((name, real, created))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

// ---------------------------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------------------------

/// OpenAI-compatible chat completions.
#[utoipa::path(post, path = "/v1/chat/completions", request_body = ChatCompletionRequest,
    responses((status = 200, description = "The completion (or, with `stream: true`, SSE `data:` chunks of `ChatCompletionChunk` ending with `data: [DONE]`)", body = ChatCompletion),
              (status = 400, body = super::error::ErrorBody), (status = 403, body = super::error::ErrorBody),
              (status = 404, description = "Unknown `model`", body = super::error::ErrorBody),
              (status = 422, body = super::error::ErrorBody), (status = 503, body = super::error::ErrorBody),
              (status = 504, body = super::error::ErrorBody)))]
pub async fn chat_completions(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, AppError> {
    let (params, clamp) = chat_params(&req)?;
    let messages = convert_messages(req.messages)?;
    let input = messages_input(messages, "messages")?;
    let model = req.model.unwrap_or_default();
    let adapter = resolve_model(&state, &model).await?;
    let model = if model.is_empty() {
        state.node.router.model_name().unwrap_or_default()
    } else {
        model
    };
    let logprobs = req.logprobs.unwrap_or(false);
    let include_usage = req
        .stream_options
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let work = ChatWork {
        request_id: generation::request_id("chatcmpl-"),
        input,
        params,
        clamp_max_tokens: clamp,
        adapter,
    };
    let created = unix_now();
    let started = generation::start(&state, work, "/v1/chat/completions").await?;
    if req.stream.unwrap_or(false) {
        return Ok(Sse::new(chat_stream(
            started,
            model,
            created,
            logprobs,
            include_usage,
        ))
        .keep_alive(KeepAlive::default())
        .into_response());
    }
    let id = started.id.clone();
    let done = started.collect().await?;
    Ok(Json(ChatCompletion {
        id,
        object: "chat.completion".into(),
        created,
        model,
        choices: vec![ChatChoice {
            index: 0,
            message: AssistantMessage {
                role: "assistant".into(),
                content: done.text,
            },
            logprobs: logprobs.then(|| chat_logprobs(&done.tokens)),
            finish_reason: openai_finish_reason(done.finish_reason).into(),
        }],
        usage: CompletionUsage::new(done.prompt_tokens, done.completion_tokens),
    })
    .into_response())
}

fn data<T: Serialize>(value: &T) -> SseEvent {
    SseEvent::default().json_data(value).expect("json")
}

fn chat_chunk(
    id: &str,
    created: u64,
    model: &str,
    delta: ChatDelta,
    logprobs: Option<ChatLogprobs>,
    finish_reason: Option<&str>,
) -> ChatCompletionChunk {
    ChatCompletionChunk {
        id: id.to_string(),
        object: "chat.completion.chunk".into(),
        created,
        model: model.to_string(),
        choices: vec![ChatChunkChoice {
            index: 0,
            delta,
            logprobs,
            finish_reason: finish_reason.map(str::to_string),
        }],
        usage: None,
    }
}

fn chat_stream(
    mut started: Started,
    model: String,
    created: u64,
    logprobs: bool,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    async_stream::stream! {
        let id = started.id.clone();
        let first = ChatDelta { role: Some("assistant".into()), content: Some(String::new()) };
        yield Ok(data(&chat_chunk(&id, created, &model, first, None, None)));
        while let Some(piece) = started.next().await {
            match piece {
                Piece::Token(t) => {
                    if t.text.is_empty() && !logprobs {
                        continue;
                    }
                    let lp = logprobs.then(|| chat_logprobs(std::slice::from_ref(&t)));
                    let delta = ChatDelta { role: None, content: Some(t.text) };
                    yield Ok(data(&chat_chunk(&id, created, &model, delta, lp, None)));
                }
                Piece::Finished { text, reason, prompt_tokens, completion_tokens } => {
                    if !text.is_empty() {
                        let delta = ChatDelta { role: None, content: Some(text) };
                        yield Ok(data(&chat_chunk(&id, created, &model, delta, None, None)));
                    }
                    let reason = openai_finish_reason(reason);
                    yield Ok(data(&chat_chunk(&id, created, &model, ChatDelta::default(), None, Some(reason))));
                    if include_usage {
                        let last = ChatCompletionChunk {
                            id: id.clone(),
                            object: "chat.completion.chunk".into(),
                            created,
                            model: model.clone(),
                            choices: Vec::new(),
                            usage: Some(CompletionUsage::new(prompt_tokens, completion_tokens)),
                        };
                        yield Ok(data(&last));
                    }
                    yield Ok(SseEvent::default().data("[DONE]"));
                    break;
                }
                Piece::Failed(e) => {
                    yield Ok(data(&e.body()));
                    break;
                }
            }
        }
    }
}

/// OpenAI-compatible (legacy) text completions.
#[utoipa::path(post, path = "/v1/completions", request_body = CompletionRequest,
    responses((status = 200, description = "The completion (or, with `stream: true`, SSE `data:` chunks of the same shape ending with `data: [DONE]`)", body = Completion),
              (status = 400, body = super::error::ErrorBody), (status = 403, body = super::error::ErrorBody),
              (status = 404, description = "Unknown `model`", body = super::error::ErrorBody),
              (status = 422, body = super::error::ErrorBody), (status = 503, body = super::error::ErrorBody),
              (status = 504, body = super::error::ErrorBody)))]
pub async fn completions(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, AppError> {
    let prompt = prompt_text(&req.prompt)?;
    let (params, clamp) = completion_params(&req)?;
    let model = req.model.unwrap_or_default();
    let adapter = resolve_model(&state, &model).await?;
    let model = if model.is_empty() {
        state.node.router.model_name().unwrap_or_default()
    } else {
        model
    };
    let logprobs = req.logprobs.is_some();
    let include_usage = req
        .stream_options
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let work = ChatWork {
        request_id: generation::request_id("cmpl-"),
        input: PromptInput::Raw(prompt),
        params,
        clamp_max_tokens: clamp,
        adapter,
    };
    let created = unix_now();
    let started = generation::start(&state, work, "/v1/completions").await?;
    if req.stream.unwrap_or(false) {
        return Ok(Sse::new(completion_stream(
            started,
            model,
            created,
            logprobs,
            include_usage,
        ))
        .keep_alive(KeepAlive::default())
        .into_response());
    }
    let id = started.id.clone();
    let done = started.collect().await?;
    Ok(Json(Completion {
        id,
        object: "text_completion".into(),
        created,
        model,
        choices: vec![CompletionChoice {
            text: done.text,
            index: 0,
            logprobs: logprobs.then(|| completion_logprobs(&done.tokens, &mut 0)),
            finish_reason: Some(openai_finish_reason(done.finish_reason).into()),
        }],
        usage: Some(CompletionUsage::new(
            done.prompt_tokens,
            done.completion_tokens,
        )),
    })
    .into_response())
}

fn completion_chunk(
    id: &str,
    created: u64,
    model: &str,
    choice: Option<CompletionChoice>,
    usage: Option<CompletionUsage>,
) -> Completion {
    Completion {
        id: id.to_string(),
        object: "text_completion".into(),
        created,
        model: model.to_string(),
        choices: choice.into_iter().collect(),
        usage,
    }
}

fn completion_stream(
    mut started: Started,
    model: String,
    created: u64,
    logprobs: bool,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    async_stream::stream! {
        let id = started.id.clone();
        let mut offset = 0usize;
        while let Some(piece) = started.next().await {
            match piece {
                Piece::Token(t) => {
                    if t.text.is_empty() && !logprobs {
                        continue;
                    }
                    let lp = logprobs.then(|| completion_logprobs(std::slice::from_ref(&t), &mut offset));
                    let choice = CompletionChoice { text: t.text, index: 0, logprobs: lp, finish_reason: None };
                    yield Ok(data(&completion_chunk(&id, created, &model, Some(choice), None)));
                }
                Piece::Finished { text, reason, prompt_tokens, completion_tokens } => {
                    let choice = CompletionChoice {
                        text,
                        index: 0,
                        logprobs: None,
                        finish_reason: Some(openai_finish_reason(reason).into()),
                    };
                    yield Ok(data(&completion_chunk(&id, created, &model, Some(choice), None)));
                    if include_usage {
                        let usage = CompletionUsage::new(prompt_tokens, completion_tokens);
                        yield Ok(data(&completion_chunk(&id, created, &model, None, Some(usage))));
                    }
                    yield Ok(SseEvent::default().data("[DONE]"));
                    break;
                }
                Piece::Failed(e) => {
                    yield Ok(data(&e.body()));
                    break;
                }
            }
        }
    }
}

/// The models `model` may name.
#[utoipa::path(get, path = "/v1/models",
    responses((status = 200, description = "The base model and the adapters", body = ModelList)))]
pub async fn models(State(state): State<AppState>) -> Result<Response, AppError> {
    let base = state.node.router.model_name();
    let now = unix_now();
    let server_started = now.saturating_sub(state.started.elapsed().as_secs());
    let mut data = Vec::new();
    if let Some(b) = &base {
        data.push(ModelCard {
            id: b.clone(),
            object: "model".into(),
            created: server_started,
            owned_by: "tessera".into(),
            root: Some(b.clone()),
            parent: None,
        });
    }
    let root = state.roots.adapters.clone();
    let dirs = tokio::task::spawn_blocking(move || adapter_dirs(&root))
        .await
        .unwrap_or_default();
    let mut seen: HashSet<PathBuf> = HashSet::new();
    for (name, path, created) in dirs {
        seen.insert(path.clone());
        data.push(ModelCard {
            id: name,
            object: "model".into(),
            created,
            owned_by: "tessera".into(),
            root: Some(path.display().to_string()),
            parent: base.clone(),
        });
    }
    for replica in state.node.router.replicas() {
        for path in replica.adapters {
            if !seen.insert(path.clone()) {
                continue;
            }
            data.push(ModelCard {
                id: path.display().to_string(),
                object: "model".into(),
                created: mtime_secs(&path).unwrap_or(now),
                owned_by: "tessera".into(),
                root: Some(path.display().to_string()),
                parent: base.clone(),
            });
        }
    }
    Ok(Json(ModelList {
        object: "list".into(),
        data,
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tessera_actors::messages::TopLogprob;

    fn token(tok: &str, text: &str, logprob: f32, top: &[(&str, f32)]) -> TokenOut {
        TokenOut {
            id: 1,
            token: tok.into(),
            text: text.into(),
            logprob,
            top_logprobs: top
                .iter()
                .enumerate()
                .map(|(i, (t, l))| TopLogprob {
                    id: i as u32,
                    token: t.to_string(),
                    logprob: *l,
                })
                .collect(),
        }
    }

    #[test]
    fn prompt_is_a_string_or_a_list_of_one() {
        assert_eq!(prompt_text(&json!("hi")).unwrap(), "hi");
        assert_eq!(prompt_text(&json!(["hi"])).unwrap(), "hi");
        for bad in [
            json!([]),
            json!(["a", "b"]),
            json!([1, 2]),
            json!([[1]]),
            json!(null),
            json!(3),
        ] {
            let e = prompt_text(&bad).unwrap_err();
            assert_eq!(e.field.as_deref(), Some("prompt"), "{bad}");
            assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        }
    }

    #[test]
    fn chat_logprobs_have_bytes_and_alternatives() {
        let lp = chat_logprobs(&[
            token("é", "é", -0.5, &[("é", -0.5), ("e", -1.5)]),
            token(" x", " x", f32::NEG_INFINITY, &[]),
        ]);
        let v = serde_json::to_value(&lp).unwrap();
        assert_eq!(v["content"][0]["token"], "é");
        assert_eq!(v["content"][0]["bytes"], json!([0xc3, 0xa9]));
        assert_eq!(v["content"][0]["top_logprobs"][1]["token"], "e");
        assert_eq!(v["content"][0]["top_logprobs"][1]["bytes"], json!([b'e']));
        assert_eq!(v["content"][0]["top_logprobs"].as_array().unwrap().len(), 2);
        assert_eq!(v["content"][1]["logprob"], json!(FLOOR_LOGPROB));
        assert_eq!(v["content"][1]["top_logprobs"], json!([]));
    }

    #[test]
    fn completion_logprobs_are_columns_with_offsets() {
        let mut offset = 0;
        let first = completion_logprobs(
            &[
                token(
                    "Hel",
                    "Hel",
                    -0.1,
                    &[("Hel", -0.1), ("He", -2.0), ("Hel", -3.0)],
                ),
                token("lo", "lo", -0.2, &[]),
            ],
            &mut offset,
        );
        assert_eq!(first.tokens, vec!["Hel", "lo"]);
        assert_eq!(first.token_logprobs, vec![-0.1, -0.2]);
        assert_eq!(first.text_offset, vec![0, 3]);
        // Duplicates keep the likelier; order is rank order.
        assert_eq!(
            serde_json::to_string(&first.top_logprobs[0]).unwrap(),
            r#"{"Hel":-0.1,"He":-2.0}"#
        );
        assert_eq!(offset, 5);
        // A stream chunk continues the count.
        let next = completion_logprobs(&[token(" wörld", " wörld", -0.3, &[])], &mut offset);
        assert_eq!(next.text_offset, vec![5]);
        assert_eq!(offset, 11);
    }

    #[test]
    fn base_model_names() {
        assert!(names_base("qwen2.5-0.5b", "Qwen2.5-0.5B"));
        assert!(names_base("Qwen2.5-0.5B.gguf", "Qwen2.5-0.5B"));
        assert!(names_base("/models/Qwen2.5-0.5B.gguf", "Qwen2.5-0.5B"));
        assert!(names_base("Qwen/Qwen2.5-0.5B", "Qwen2.5-0.5B"));
        assert!(!names_base("Qwen2.5", "Qwen2.5-0.5B"));
        assert!(!names_base("gpt-4o", "Qwen2.5-0.5B"));
        assert!(!names_base("Qwen2.5-0.5B.bin", "Qwen2.5-0.5B"));
    }

    #[test]
    fn chat_requests_are_checked() {
        let parse =
            |v: serde_json::Value| -> ChatCompletionRequest { serde_json::from_value(v).unwrap() };
        let base = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "user": "u", "unknown": 1});
        let (p, clamp) = chat_params(&parse(base.clone())).unwrap();
        assert!(clamp);
        assert_eq!(p.max_tokens, DEFAULT_CHAT_MAX_TOKENS);

        let mut v = base.clone();
        v["max_completion_tokens"] = json!(7);
        v["max_tokens"] = json!(9);
        v["stop"] = json!("x");
        v["logprobs"] = json!(true);
        v["top_logprobs"] = json!(2);
        let (p, clamp) = chat_params(&parse(v)).unwrap();
        assert!(!clamp);
        assert_eq!((p.max_tokens, p.top_logprobs), (7, 2));
        assert_eq!(p.stop, vec!["x"]);

        let field = |patch: serde_json::Value| {
            let mut v = base.clone();
            for (k, x) in patch.as_object().unwrap() {
                v[k] = x.clone();
            }
            chat_params(&parse(v)).unwrap_err().field.unwrap()
        };
        assert_eq!(field(json!({"n": 2})), "n");
        assert_eq!(field(json!({"presence_penalty": 0.5})), "presence_penalty");
        assert_eq!(
            field(json!({"frequency_penalty": -1.0})),
            "frequency_penalty"
        );
        assert_eq!(field(json!({"top_logprobs": 2})), "top_logprobs");
        assert_eq!(
            field(json!({"logprobs": true, "top_logprobs": 21})),
            "top_logprobs"
        );
        assert_eq!(
            field(json!({"max_completion_tokens": 0})),
            "max_completion_tokens"
        );
        assert_eq!(field(json!({"temperature": -1.0})), "temperature");
        // Accepted no-ops.
        let mut v = base.clone();
        v["n"] = json!(1);
        v["presence_penalty"] = json!(0);
        v["frequency_penalty"] = json!(0.0);
        v["stream_options"] = json!({"include_usage": true});
        assert!(chat_params(&parse(v)).is_ok());
    }

    #[test]
    fn completion_requests_are_checked() {
        let parse =
            |v: serde_json::Value| -> CompletionRequest { serde_json::from_value(v).unwrap() };
        let (p, clamp) = completion_params(&parse(json!({"model": "m", "prompt": "a"}))).unwrap();
        assert!(clamp);
        assert_eq!(
            (p.max_tokens, p.top_logprobs),
            (DEFAULT_COMPLETION_MAX_TOKENS, 0)
        );
        let (p, _) = completion_params(&parse(json!({"prompt": "a", "logprobs": 3}))).unwrap();
        assert_eq!(p.top_logprobs, 3);
        let field = |v: serde_json::Value| completion_params(&parse(v)).unwrap_err().field.unwrap();
        assert_eq!(field(json!({"prompt": "a", "echo": true})), "echo");
        assert_eq!(field(json!({"prompt": "a", "suffix": "z"})), "suffix");
        assert_eq!(field(json!({"prompt": "a", "logprobs": 6})), "logprobs");
        assert_eq!(field(json!({"prompt": "a", "n": 3})), "n");
        assert_eq!(field(json!({"prompt": "a", "best_of": 2})), "best_of");
        assert!(completion_params(&parse(
            json!({"prompt": "a", "echo": false, "suffix": null})
        ))
        .is_ok());
    }

    #[test]
    fn messages_accept_text_parts() {
        let messages: Vec<OpenAiMessage> = serde_json::from_value(json!([
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": null},
        ]))
        .unwrap();
        let m = convert_messages(messages).unwrap();
        assert_eq!(m[0].role, "system");
        assert_eq!(m[1].content, "a\nb");
        assert_eq!(m[2].content, "");
        let image: Vec<OpenAiMessage> = serde_json::from_value(json!([
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
        ]))
        .unwrap();
        assert_eq!(
            convert_messages(image).unwrap_err().field.as_deref(),
            Some("messages[0].content[0].type")
        );
    }

    #[test]
    fn responses_have_the_openai_shape() {
        let chunk = chat_chunk(
            "chatcmpl-1",
            5,
            "m",
            ChatDelta::default(),
            None,
            Some("stop"),
        );
        let v = serde_json::to_value(&chunk).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        assert_eq!(v["choices"][0]["delta"], json!({}));
        assert_eq!(v["choices"][0]["logprobs"], json!(null));
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert!(v.get("usage").is_none());
        assert_eq!(openai_finish_reason(FinishReason::Cancelled), "stop");
        assert_eq!(openai_finish_reason(FinishReason::Length), "length");
        let c = completion_chunk("cmpl-1", 5, "m", None, Some(CompletionUsage::new(3, 4)));
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["choices"], json!([]));
        assert_eq!(v["usage"]["total_tokens"], 7);
    }
}
