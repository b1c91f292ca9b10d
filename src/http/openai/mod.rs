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
//!
//! [`types`]: the wire types; [`handlers`]: the two generation routes and their streams;
//! [`logprobs`]: log-probabilities in OpenAI's two shapes; [`models`]: `GET /v1/models`. The
//! request bodies are checked by [`crate::http::validation`].

mod handlers;
mod logprobs;
mod models;
mod types;

pub use handlers::*;
pub use logprobs::*;
pub use models::*;
pub use types::*;

use std::time::{SystemTime, UNIX_EPOCH};

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
