//! The wire types of the OpenAI-compatible routes: requests as the official clients send them,
//! responses and stream chunks as they parse them.

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use utoipa::ToSchema;

use crate::http::structured::{ResponseFormat, StructuredOutputs};
use crate::http::validation::Stop;

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send one more chunk before `[DONE]` with empty `choices` and the `usage`.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// One part of a message's content given as a list (only `text` parts are supported).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// A message's content: a string, or a list of content parts.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// A chat message as OpenAI takes it (`name` is ignored).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct OpenAiMessage {
    /// `system` (or `developer`), `user`, `assistant` or `tool`.
    pub role: String,
    /// A string or a list of `{"type": "text", "text": ...}` parts; `null` is empty.
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// An assistant turn's calls, as a completion returned them.
    pub tool_calls: Option<Vec<ToolCallIn>>,
    /// A `tool` turn: the id of the call it answers.
    pub tool_call_id: Option<String>,
}

/// A function call inside a message (`messages[].tool_calls[].function`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct FunctionCallIn {
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: Option<String>,
}

/// `messages[].tool_calls[]`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ToolCallIn {
    pub id: Option<String>,
    /// `function`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub function: FunctionCallIn,
}

/// A function the model may call (`tools[].function`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct FunctionDef {
    pub name: String,
    pub description: Option<String>,
    /// A JSON schema of the arguments object.
    #[schema(value_type = Object)]
    pub parameters: Option<serde_json::Value>,
    /// Accepted; a forced call's arguments always follow `parameters`.
    pub strict: Option<bool>,
}

/// `tools[]`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ToolDef {
    /// Only `function`.
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionDef,
}

/// `POST /v1/chat/completions`. Unknown fields are ignored.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    /// The base model's name (see `GET /v1/models`), a succeeded fine-tune job id, or an adapter
    /// directory under the adapters root. Absent: the base model.
    pub model: Option<String>,
    pub messages: Vec<OpenAiMessage>,
    /// Default 256, lowered to what the context has left.
    pub max_tokens: Option<usize>,
    /// Takes precedence over `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    /// Default 1.0; 0 is greedy.
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// How many choices to generate (1 to 16); each its own seed (`seed + i` when given).
    pub n: Option<usize>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub seed: Option<u64>,
    /// Return the log-probability of each generated token.
    pub logprobs: Option<bool>,
    /// 0..=20 alternatives per position; needs `logprobs: true`.
    pub top_logprobs: Option<usize>,
    /// In [-2, 2]: subtracted once from the logit of every token already generated.
    pub presence_penalty: Option<f64>,
    /// In [-2, 2]: subtracted from a token's logit once per time it was generated.
    pub frequency_penalty: Option<f64>,
    /// Structured outputs: `{"type": "json_object"}` or `{"type": "json_schema", "json_schema":
    /// {"name", "schema", "strict"}}` (`text`: none).
    pub response_format: Option<ResponseFormat>,
    /// Extension (vLLM): one of `json`, `regex`, `choice`, `grammar` (Lark), `json_object`.
    pub structured_outputs: Option<StructuredOutputs>,
    /// Extension (vLLM, older): a JSON schema.
    #[schema(value_type = Object)]
    pub guided_json: Option<serde_json::Value>,
    /// Extension (vLLM, older): a regular expression.
    pub guided_regex: Option<String>,
    /// Extension (vLLM, older): one of these strings.
    pub guided_choice: Option<Vec<String>>,
    /// Extension (vLLM, older): a Lark grammar.
    pub guided_grammar: Option<String>,
    /// Token id (as a string) to a bias in [-100, 100] added to its logit.
    pub logit_bias: Option<std::collections::HashMap<String, f64>>,
    /// Extension (vLLM): end tokens and stop strings count only after this many tokens.
    pub min_tokens: Option<usize>,
    /// Functions the model may call (at most 128).
    pub tools: Option<Vec<ToolDef>>,
    /// `none`, `auto` (the default with tools), `required`, or `{"type": "function",
    /// "function": {"name": ...}}`.
    #[schema(value_type = Object)]
    pub tool_choice: Option<serde_json::Value>,
    /// Accepted (a forced call is one call).
    pub parallel_tool_calls: Option<bool>,

    /// Extension (vLLM): 0 is no cut.
    pub top_k: Option<usize>,
    /// Extension (vLLM): 1.0 is none.
    pub repetition_penalty: Option<f64>,
    /// Ignored.
    pub user: Option<String>,
}

/// `POST /v1/completions`. Unknown fields are ignored.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct CompletionRequest {
    /// As for chat completions.
    pub model: Option<String>,
    /// A string, or a list of exactly one string.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub prompt: serde_json::Value,
    /// Default 16, lowered to what the context has left.
    pub max_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// How many choices to generate (1 to 16); each its own seed (`seed + i` when given).
    pub n: Option<usize>,
    /// Only 1 (or equal to `n`).
    pub best_of: Option<usize>,
    pub stop: Option<Stop>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// 0..=5: return the sampled tokens' log-probabilities and this many alternatives.
    pub logprobs: Option<usize>,
    /// Not supported (only `false`).
    pub echo: Option<bool>,
    /// Not supported (only `null`).
    pub suffix: Option<String>,
    pub seed: Option<u64>,
    /// In [-2, 2]: subtracted once from the logit of every token already generated.
    pub presence_penalty: Option<f64>,
    /// In [-2, 2]: subtracted from a token's logit once per time it was generated.
    pub frequency_penalty: Option<f64>,
    /// Structured outputs: `{"type": "json_object"}` or `{"type": "json_schema", "json_schema":
    /// {"name", "schema", "strict"}}` (`text`: none).
    pub response_format: Option<ResponseFormat>,
    /// Extension (vLLM): one of `json`, `regex`, `choice`, `grammar` (Lark), `json_object`.
    pub structured_outputs: Option<StructuredOutputs>,
    /// Extension (vLLM, older): a JSON schema.
    #[schema(value_type = Object)]
    pub guided_json: Option<serde_json::Value>,
    /// Extension (vLLM, older): a regular expression.
    pub guided_regex: Option<String>,
    /// Extension (vLLM, older): one of these strings.
    pub guided_choice: Option<Vec<String>>,
    /// Extension (vLLM, older): a Lark grammar.
    pub guided_grammar: Option<String>,
    /// Token id (as a string) to a bias in [-100, 100] added to its logit.
    pub logit_bias: Option<std::collections::HashMap<String, f64>>,
    /// Extension (vLLM): end tokens and stop strings count only after this many tokens.
    pub min_tokens: Option<usize>,

    /// Extension (vLLM): 0 is no cut.
    pub top_k: Option<usize>,
    /// Extension (vLLM): 1.0 is none.
    pub repetition_penalty: Option<f64>,
    /// Ignored.
    pub user: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CompletionUsage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl CompletionUsage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// An alternative at one position of a chat completion.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    /// The token's UTF-8 bytes.
    pub bytes: Vec<u8>,
}

/// One generated token of a chat completion with its log-probability and alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

/// `choices[].logprobs` of a chat completion (or chunk).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: String,
    /// The text (`null` when the answer is only tool calls).
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallOut>>,
}

/// `function` of a returned tool call.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FunctionCallOut {
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: String,
}

/// A tool call the model made (`message.tool_calls[]`, or `delta.tool_calls[]` with `index`).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ToolCallOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// `call_...`.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCallOut,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<ChatLogprobs>,
    /// `stop` or `length`.
    pub finish_reason: String,
}

/// The answer of `POST /v1/chat/completions` without `stream`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletion {
    /// `chatcmpl-...`.
    pub id: String,
    /// Always `chat.completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The request's `model`.
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: CompletionUsage,
}

/// `choices[].delta` of a chat completion chunk.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallOut>>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
}

/// One SSE `data:` chunk of a streamed chat completion.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    /// Always `chat.completion.chunk`.
    pub object: String,
    pub created: u64,
    pub model: String,
    /// Empty in the last chunk (the one with `usage`, when asked).
    pub choices: Vec<ChatChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<CompletionUsage>,
}

/// A position's alternatives as OpenAI's legacy completions show them: `{token: logprob}`, most
/// likely first (duplicate texts keep the likelier).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopMap(pub Vec<(String, f32)>);

impl Serialize for TopMap {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (token, logprob) in &self.0 {
            map.serialize_entry(token, logprob)?;
        }
        map.end()
    }
}

/// `choices[].logprobs` of a text completion (or chunk).
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    /// One `{token: logprob}` object per position.
    #[schema(value_type = Vec<Object>)]
    pub top_logprobs: Vec<TopMap>,
    /// Each token's character offset in the completion text.
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub text: String,
    pub index: usize,
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop` or `length` (`null` in stream chunks but the last).
    pub finish_reason: Option<String>,
}

/// The answer of `POST /v1/completions` (and, with `stream`, each SSE chunk).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Completion {
    /// `cmpl-...`.
    pub id: String,
    /// Always `text_completion`.
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<CompletionUsage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ModelCard {
    /// What to pass as `model`.
    pub id: String,
    /// Always `model`.
    pub object: String,
    pub created: u64,
    /// Always `tessera`.
    pub owned_by: String,
    /// The base model's name, or the adapter's directory.
    pub root: Option<String>,
    /// For an adapter: the base model's name.
    pub parent: Option<String>,
}

/// The answer of `GET /v1/models`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<ModelCard>,
}
