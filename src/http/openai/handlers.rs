//! `POST /v1/chat/completions` and `POST /v1/completions`: parse, check ([`validation`]),
//! generate ([`generation`]), and map the answer or the stream to OpenAI's shapes.

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::{Stream, StreamExt};
use serde::Serialize;
use tessera_actors::messages::TokenOut;
use tessera_engine::tool_calls::ToolFormat;
use tessera_engine::FinishReason;

use super::logprobs::{chat_logprobs, completion_logprobs};
use super::types::*;
use super::unix_now;
use crate::http::error::{ApiJson, AppError};
use crate::http::generation::{self, Piece, Started};
use crate::http::request_id::RequestId;
use crate::http::{validation, AppState};

/// OpenAI knows no `cancelled`: a cancelled sequence stopped.
pub fn openai_finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

/// OpenAI-compatible chat completions.
#[utoipa::path(post, path = "/v1/chat/completions", request_body = ChatCompletionRequest,
    responses((status = 200, description = "The completion (or, with `stream: true`, SSE `data:` chunks of `ChatCompletionChunk` ending with `data: [DONE]`)", body = ChatCompletion),
              (status = 400, body = crate::http::error::ErrorBody), (status = 403, body = crate::http::error::ErrorBody),
              (status = 404, description = "Unknown `model`", body = crate::http::error::ErrorBody),
              (status = 422, body = crate::http::error::ErrorBody), (status = 503, body = crate::http::error::ErrorBody),
              (status = 504, body = crate::http::error::ErrorBody)))]
pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(trace): Extension<RequestId>,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, AppError> {
    let req = validation::chat_completion(req)?;
    let (streaming, logprobs, include_usage) = (req.stream, req.logprobs, req.include_usage);
    let created = unix_now();
    let starts = generation::generate_n(&state, req, "/v1/chat/completions", trace).await?;
    let model = starts[0].model.clone();
    let id = starts[0].id.clone();
    if streaming {
        return Ok(Sse::new(chat_stream(
            starts,
            id,
            model,
            created,
            logprobs,
            include_usage,
        ))
        .keep_alive(KeepAlive::default())
        .into_response());
    }
    let formats: Vec<Option<ToolFormat>> = starts.iter().map(|s| s.tool_format).collect();
    let done = futures::future::try_join_all(starts.into_iter().map(Started::collect)).await?;
    let usage = usage_of(&done);
    let choices = done
        .into_iter()
        .zip(formats)
        .enumerate()
        .map(|(index, (done, format))| {
            let mut finish_reason = openai_finish_reason(done.finish_reason).to_string();
            let (content, tool_calls) = match tool_calls_of(format, &done.text) {
                Some((before, calls)) => {
                    finish_reason = "tool_calls".into();
                    (before, Some(calls))
                }
                None => (Some(done.text), None),
            };
            ChatChoice {
                index,
                message: AssistantMessage {
                    role: "assistant".into(),
                    content,
                    tool_calls,
                },
                logprobs: logprobs.then(|| chat_logprobs(&done.tokens)),
                finish_reason,
            }
        })
        .collect();
    Ok(Json(ChatCompletion {
        id,
        object: "chat.completion".into(),
        created,
        model,
        choices,
        usage,
    })
    .into_response())
}

/// The calls in a finished answer written in `format` (the text before them as content, `None`
/// when empty), or `None` when it holds no call.
fn tool_calls_of(
    format: Option<ToolFormat>,
    text: &str,
) -> Option<(Option<String>, Vec<ToolCallOut>)> {
    let (before, calls) = format?.parse(text)?;
    let calls = calls
        .into_iter()
        .map(|c| ToolCallOut {
            index: None,
            id: format!("call_{}", &uuid::Uuid::new_v4().simple().to_string()[..24]),
            kind: "function".into(),
            function: FunctionCallOut {
                name: c.name,
                arguments: c.arguments,
            },
        })
        .collect();
    Some(((!before.is_empty()).then_some(before), calls))
}

/// The usage of `n` choices of one prompt: the prompt once, every choice's tokens.
fn usage_of(done: &[generation::Collected]) -> CompletionUsage {
    CompletionUsage::new(
        done[0].prompt_tokens,
        done.iter().map(|d| d.completion_tokens).sum(),
    )
}

fn content_delta(text: String) -> ChatDelta {
    ChatDelta {
        content: Some(text),
        ..ChatDelta::default()
    }
}

fn data<T: Serialize>(value: &T) -> SseEvent {
    SseEvent::default().json_data(value).expect("json")
}

/// The pieces of every choice as they come, each with its choice's index.
fn merged(starts: Vec<Started>) -> impl Stream<Item = (usize, Piece)> {
    futures::stream::select_all(starts.into_iter().enumerate().map(|(index, started)| {
        Box::pin(futures::stream::unfold(
            Some(started),
            move |started| async move {
                let mut started = started?;
                let piece = started.next().await?;
                // After the end (or a failure) this choice yields nothing more.
                let more = matches!(piece, Piece::Token(_)).then_some(started);
                Some(((index, piece), more))
            },
        ))
    }))
}

fn chat_chunk(
    id: &str,
    created: u64,
    model: &str,
    index: usize,
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
            index,
            delta,
            logprobs,
            finish_reason: finish_reason.map(str::to_string),
        }],
        usage: None,
    }
}

/// A choice's text held back while it may become a tool call.
struct Held {
    format: ToolFormat,
    text: String,
    tokens: Vec<TokenOut>,
}

fn chat_stream(
    starts: Vec<Started>,
    id: String,
    model: String,
    created: u64,
    logprobs: bool,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    async_stream::stream! {
        let n = starts.len();
        // With tools offered, a choice's text is held back while it may still be a call: a call
        // is sent as `delta.tool_calls` at the end, anything else as content once it cannot be.
        let mut held: Vec<Option<Held>> = starts
            .iter()
            .map(|s| s.tool_format.map(|format| Held { format, text: String::new(), tokens: Vec::new() }))
            .collect();
        for index in 0..n {
            let first = ChatDelta { role: Some("assistant".into()), content: Some(String::new()), tool_calls: None };
            yield Ok(data(&chat_chunk(&id, created, &model, index, first, None, None)));
        }
        let mut pieces = std::pin::pin!(merged(starts));
        let (mut ended, mut completion) = (0, 0);
        while let Some((index, piece)) = pieces.next().await {
            match piece {
                Piece::Token(t) => {
                    if let Some(h) = held[index].as_mut() {
                        h.text.push_str(&t.text);
                        h.tokens.push(t);
                        if h.format.may_be_call(&h.text) {
                            continue;
                        }
                        let h = held[index].take().expect("held");
                        let lp = logprobs.then(|| chat_logprobs(&h.tokens));
                        yield Ok(data(&chat_chunk(&id, created, &model, index, content_delta(h.text), lp, None)));
                        continue;
                    }
                    if t.text.is_empty() && !logprobs {
                        continue;
                    }
                    let lp = logprobs.then(|| chat_logprobs(std::slice::from_ref(&t)));
                    yield Ok(data(&chat_chunk(&id, created, &model, index, content_delta(t.text), lp, None)));
                }
                Piece::Finished { text, reason, prompt_tokens, completion_tokens } => {
                    let mut reason = openai_finish_reason(reason);
                    if let Some(mut h) = held[index].take() {
                        h.text.push_str(&text);
                        let lp = logprobs.then(|| chat_logprobs(&h.tokens));
                        match tool_calls_of(Some(h.format), &h.text) {
                            Some((before, calls)) => {
                                if let Some(before) = before {
                                    yield Ok(data(&chat_chunk(&id, created, &model, index, content_delta(before), None, None)));
                                }
                                let calls = calls
                                    .into_iter()
                                    .enumerate()
                                    .map(|(i, c)| ToolCallOut { index: Some(i), ..c })
                                    .collect();
                                let delta = ChatDelta { tool_calls: Some(calls), ..ChatDelta::default() };
                                yield Ok(data(&chat_chunk(&id, created, &model, index, delta, lp, None)));
                                reason = "tool_calls";
                            }
                            None if !h.text.is_empty() || lp.is_some() => {
                                yield Ok(data(&chat_chunk(&id, created, &model, index, content_delta(h.text), lp, None)));
                            }
                            None => {}
                        }
                    } else if !text.is_empty() {
                        yield Ok(data(&chat_chunk(&id, created, &model, index, content_delta(text), None, None)));
                    }
                    yield Ok(data(&chat_chunk(&id, created, &model, index, ChatDelta::default(), None, Some(reason))));
                    completion += completion_tokens;
                    ended += 1;
                    if ended < n {
                        continue;
                    }
                    if include_usage {
                        let last = ChatCompletionChunk {
                            id: id.clone(),
                            object: "chat.completion.chunk".into(),
                            created,
                            model: model.clone(),
                            choices: Vec::new(),
                            usage: Some(CompletionUsage::new(prompt_tokens, completion)),
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
              (status = 400, body = crate::http::error::ErrorBody), (status = 403, body = crate::http::error::ErrorBody),
              (status = 404, description = "Unknown `model`", body = crate::http::error::ErrorBody),
              (status = 422, body = crate::http::error::ErrorBody), (status = 503, body = crate::http::error::ErrorBody),
              (status = 504, body = crate::http::error::ErrorBody)))]
pub async fn completions(
    State(state): State<AppState>,
    Extension(trace): Extension<RequestId>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, AppError> {
    let req = validation::completion(req)?;
    let (streaming, logprobs, include_usage) = (req.stream, req.logprobs, req.include_usage);
    let created = unix_now();
    let starts = generation::generate_n(&state, req, "/v1/completions", trace).await?;
    let model = starts[0].model.clone();
    let id = starts[0].id.clone();
    if streaming {
        return Ok(Sse::new(completion_stream(
            starts,
            id,
            model,
            created,
            logprobs,
            include_usage,
        ))
        .keep_alive(KeepAlive::default())
        .into_response());
    }
    let done = futures::future::try_join_all(starts.into_iter().map(Started::collect)).await?;
    let usage = usage_of(&done);
    let choices = done
        .into_iter()
        .enumerate()
        .map(|(index, done)| CompletionChoice {
            text: done.text,
            index,
            logprobs: logprobs.then(|| completion_logprobs(&done.tokens, &mut 0)),
            finish_reason: Some(openai_finish_reason(done.finish_reason).into()),
        })
        .collect();
    Ok(Json(Completion {
        id,
        object: "text_completion".into(),
        created,
        model,
        choices,
        usage: Some(usage),
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
    starts: Vec<Started>,
    id: String,
    model: String,
    created: u64,
    logprobs: bool,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    async_stream::stream! {
        let n = starts.len();
        let mut offsets = vec![0usize; n];
        let mut pieces = std::pin::pin!(merged(starts));
        let (mut ended, mut completion) = (0, 0);
        while let Some((index, piece)) = pieces.next().await {
            match piece {
                Piece::Token(t) => {
                    if t.text.is_empty() && !logprobs {
                        continue;
                    }
                    let lp = logprobs.then(|| completion_logprobs(std::slice::from_ref(&t), &mut offsets[index]));
                    let choice = CompletionChoice { text: t.text, index, logprobs: lp, finish_reason: None };
                    yield Ok(data(&completion_chunk(&id, created, &model, Some(choice), None)));
                }
                Piece::Finished { text, reason, prompt_tokens, completion_tokens } => {
                    let choice = CompletionChoice {
                        text,
                        index,
                        logprobs: None,
                        finish_reason: Some(openai_finish_reason(reason).into()),
                    };
                    yield Ok(data(&completion_chunk(&id, created, &model, Some(choice), None)));
                    completion += completion_tokens;
                    ended += 1;
                    if ended < n {
                        continue;
                    }
                    if include_usage {
                        let usage = CompletionUsage::new(prompt_tokens, completion);
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn responses_have_the_openai_shape() {
        let chunk = chat_chunk(
            "chatcmpl-1",
            5,
            "m",
            0,
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
