//! The payloads that travel between the HTTP facade and the actors, and (issue 6) between nodes:
//! chat work, token streams, errors with their HTTP meaning, and replica descriptions. All of them
//! are plain serde types, so a node boundary only has to frame them; no tensor or handle inside.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tessera_engine::sampling::SamplingParams;
use tessera_engine::{ChatMessage, FinishReason};

use crate::health::ActorState;

/// What to generate from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptInput {
    /// Text fed to the model as it is (OpenAI `/v1/completions`, `/chat` with `raw`).
    Raw(String),
    /// A conversation rendered with the model's chat template, ending with the assistant's turn.
    Messages(Vec<ChatMessage>),
}

/// One generation request, resolved and checked by the facade (paths already confined).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatWork {
    /// The server's id of the request (routes its stream; unique).
    pub request_id: String,
    /// The client's `X-Request-Id` (or one the head made up): labels the request's log lines on
    /// every node it crosses, nothing else.
    #[serde(default)]
    pub trace_id: String,
    pub input: PromptInput,
    pub params: SamplingParams,
    /// `params.max_tokens` is a default, not the client's: lower it to what the context has left
    /// after the prompt instead of refusing the request.
    pub clamp_max_tokens: bool,
    /// A PEFT adapter directory (canonical path), or `None` for the base model.
    pub adapter: Option<PathBuf>,
    /// Functions offered to the model (rendered by the chat template).
    #[serde(default)]
    pub tools: Vec<tessera_engine::tool_calls::ToolFunction>,
    /// Whether the model must call one (`required` and a named function force it by a grammar).
    #[serde(default)]
    pub tool_choice: tessera_engine::tool_calls::ToolChoice,
    /// Tokens already generated and streamed for this request by a replica that was lost: the
    /// replica taking it over goes on after them ([`crate::failover`]). Empty at first.
    #[serde(default)]
    pub resume: Vec<u32>,
}

/// One of the most likely tokens at a position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub id: u32,
    /// The token's text as the tokenizer decodes it alone.
    pub token: String,
    pub logprob: f32,
}

/// A generated token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenOut {
    pub id: u32,
    /// The token alone, decoded (for logprobs).
    pub token: String,
    /// The text this token releases into the stream (may be empty while held back).
    pub text: String,
    pub logprob: f32,
    pub top_logprobs: Vec<TopLogprob>,
}

/// What a replica streams back for one [`ChatWork`], in order: `Started`, `Token`s, then one
/// `Finished` or `Error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamEvent {
    Started {
        replica: String,
        prompt_tokens: usize,
        /// With tools offered: how the model's family writes calls (the answer is parsed so).
        #[serde(default)]
        tool_format: Option<tessera_engine::tool_calls::ToolFormat>,
    },
    Token(TokenOut),
    Finished {
        /// Text held back until the end (a partial stop string that was not one).
        text: String,
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(ServeError),
}

/// Why a request could not be served; `kind` decides the HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ServeError {
    pub kind: ServeErrorKind,
    pub message: String,
    /// The request field at fault, when there is one.
    pub field: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServeErrorKind {
    /// The request is wrong (422/400).
    Invalid,
    /// The adapter could not be read or does not fit the model (400).
    Adapter,
    /// The request's grammar (structured outputs) does not compile for this model (400).
    Grammar,
    /// Too much work queued; retry later (503 + Retry-After).
    Overloaded,
    /// No replica can take it now (starting, restarting, lost) (503).
    Unavailable,
    /// A failure inside the server (500).
    Internal,
}

impl ServeError {
    pub fn new(kind: ServeErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            field: None,
        }
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind: ServeErrorKind::Invalid,
            message: message.into(),
            field: Some(field.into()),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ServeErrorKind::Unavailable, message)
    }
}

/// A replica as `/cluster` and the router see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    pub name: String,
    pub node: String,
    pub devices: Vec<String>,
    pub tensor_parallel: usize,
    pub state: ActorState,
    /// Requests sent to it and not finished.
    pub in_flight: usize,
    /// Adapters it has been asked for most recently (what its cache most likely holds).
    pub adapters: Vec<PathBuf>,
    pub model: Option<String>,
    /// The dtype it serves in and how it was chosen (`auto` probes bf16 on CPUs).
    #[serde(default)]
    pub dtype: Option<String>,
    /// How its weights are held (4-bit packed, dequantised) and their size.
    #[serde(default)]
    pub weights: Option<String>,
    /// The deployment it serves (requests choose by it).
    #[serde(default)]
    pub deployment: String,
    /// Which weights it serves ([`tessera_engine::fingerprint`]), once loaded.
    #[serde(default)]
    pub fingerprint: Option<String>,
}

#[cfg(test)]
impl ReplicaInfo {
    /// A replica `name` of deployment `d` on node `n`, starting, with nothing loaded (unit tests).
    pub(crate) fn for_test(name: &str) -> Self {
        Self {
            name: name.into(),
            node: "n".into(),
            devices: vec![],
            tensor_parallel: 1,
            state: ActorState::Starting,
            in_flight: 0,
            adapters: vec![],
            model: None,
            dtype: None,
            weights: None,
            deployment: "d".into(),
            fingerprint: None,
        }
    }
}
