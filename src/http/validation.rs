//! One checked generation request from each generation route's body (TGI's `Validation`): the
//! prompt input, the sampling parameters with every default filled in and their ranges checked,
//! what serves it (`adapter_path` or `model`, resolved later by [`super::resolve`]) and how the
//! answer is shaped. Every refusal names the field. Pure: no state, no I/O.

use serde::{Deserialize, Serialize};
use tessera_actors::messages::PromptInput;
use tessera_engine::sampling::{SamplingParams, MAX_TOP_LOGPROBS};
use tessera_engine::tool_calls::{ToolChoice, ToolFunction};
use tessera_engine::{ChatMessage, MessageToolCall};
use utoipa::ToSchema;

use super::chat::ChatRequest;
use super::error::AppError;
use super::openai::{ChatCompletionRequest, CompletionRequest, MessageContent, OpenAiMessage};
use super::structured::ConstraintFields;

/// Default `max_tokens` of `/chat` and `/v1/chat/completions` (lowered to what the context has
/// left when the client gives none).
pub const DEFAULT_CHAT_MAX_TOKENS: usize = 256;

/// Default `max_tokens` of `/v1/completions` (OpenAI's).
pub const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;

/// The most `logprobs` `/v1/completions` accepts (OpenAI's limit).
pub const MAX_COMPLETION_LOGPROBS: usize = 5;

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

/// What serves a request, as the client named it.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// `/chat`'s `model` (a deployment; `None`: the default one) and `adapter_path` (relative to
    /// the adapters root; `None`: the base model).
    Chat {
        model: Option<String>,
        adapter_path: Option<String>,
    },
    /// An OpenAI `model`: the base model's name, an adapter directory or a fine-tune job id;
    /// empty: the base model.
    Model(String),
}

/// A generation request every route agrees on.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// The request id's prefix (`chat-`, `chatcmpl-`, `cmpl-`).
    pub id_prefix: &'static str,
    pub input: PromptInput,
    pub params: SamplingParams,
    /// `max_tokens` was not given: the replica lowers it to what the context has left.
    pub clamp_max_tokens: bool,
    pub target: Target,
    pub stream: bool,
    /// Return each token's log-probability.
    pub logprobs: bool,
    /// Streams end with a usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    /// The request field the structured-output constraint came from (errors name it).
    pub constraint_field: Option<&'static str>,
    /// Choices to generate (OpenAI's `n`).
    pub n: usize,
    /// Functions offered to the model, and whether it must call one.
    pub tools: Vec<ToolFunction>,
    pub tool_choice: ToolChoice,
}

/// The most tools one request may offer.
pub const MAX_TOOLS: usize = 128;

/// `tools` and `tool_choice` checked: names are `[A-Za-z0-9_-]{1,64}` and distinct, parameters
/// are schema objects, a named choice names one of the tools; `auto` when tools come without a
/// choice. A forced call and a `response_format` cannot both hold.
fn tools_of(
    tools: Option<Vec<super::openai::ToolDef>>,
    choice: Option<serde_json::Value>,
    has_constraint: bool,
) -> Result<(Vec<ToolFunction>, ToolChoice), AppError> {
    use serde_json::Value;
    let tools = tools.unwrap_or_default();
    if tools.len() > MAX_TOOLS {
        return Err(AppError::invalid(
            "tools",
            format!("at most {MAX_TOOLS} tools, got {}", tools.len()),
        ));
    }
    let mut functions: Vec<ToolFunction> = Vec::with_capacity(tools.len());
    for (i, t) in tools.into_iter().enumerate() {
        if t.kind != "function" {
            return Err(AppError::invalid(
                format!("tools[{i}].type"),
                format!("only `function`, got `{}`", t.kind),
            ));
        }
        let name = t.function.name;
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            return Err(AppError::invalid(
                format!("tools[{i}].function.name"),
                format!("`{name}` is not 1 to 64 of a-z, A-Z, 0-9, _ and -"),
            ));
        }
        if functions.iter().any(|f| f.name == name) {
            return Err(AppError::invalid(
                format!("tools[{i}].function.name"),
                format!("`{name}` is offered twice"),
            ));
        }
        if t.function
            .parameters
            .as_ref()
            .is_some_and(|p| !p.is_object())
        {
            return Err(AppError::invalid(
                format!("tools[{i}].function.parameters"),
                "a JSON schema is an object",
            ));
        }
        functions.push(ToolFunction {
            name,
            description: t.function.description,
            parameters: t.function.parameters,
        });
    }
    let choice = match choice {
        None if functions.is_empty() => ToolChoice::None,
        None => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(AppError::invalid(
                    "tool_choice",
                    format!("`{other}` is not one of none, auto, required"),
                ))
            }
        },
        Some(v) => {
            let name = v
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| {
                    AppError::invalid(
                        "tool_choice",
                        "a string or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    )
                })?;
            if !functions.iter().any(|f| f.name == name) {
                return Err(AppError::invalid(
                    "tool_choice",
                    format!("`{name}` is not among `tools`"),
                ));
            }
            ToolChoice::Function(name.to_string())
        }
    };
    if functions.is_empty() && choice != ToolChoice::None {
        return Err(AppError::invalid("tool_choice", "needs `tools`"));
    }
    if has_constraint && matches!(choice, ToolChoice::Required | ToolChoice::Function(_)) {
        return Err(AppError::invalid(
            "tool_choice",
            "a forced tool call and a structured-output constraint cannot both apply",
        ));
    }
    if choice == ToolChoice::None {
        functions.clear();
    }
    Ok((functions, choice))
}

/// The most choices (`n`) one request may ask for.
pub const MAX_N: usize = 16;

/// The sampling fields every route has, as given.
struct Sampling {
    max_tokens: Option<usize>,
    default_max_tokens: usize,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<usize>,
    repetition_penalty: Option<f64>,
    seed: Option<u64>,
    stop: Option<Stop>,
    top_logprobs: usize,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logit_bias: Option<std::collections::HashMap<String, f64>>,
    min_tokens: Option<usize>,
    constraint: ConstraintFields,
}

impl Sampling {
    /// The parameters with defaults filled in and ranges checked, and whether `max_tokens` is a
    /// default.
    fn check(self) -> Result<(SamplingParams, bool, Option<&'static str>), AppError> {
        let defaults = SamplingParams::default();
        let chosen = self.constraint.constraint()?;
        let logit_bias = logit_bias(self.logit_bias)?;
        let params = SamplingParams {
            max_tokens: self.max_tokens.unwrap_or(self.default_max_tokens),
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            top_k: self.top_k.unwrap_or(defaults.top_k),
            repetition_penalty: self
                .repetition_penalty
                .unwrap_or(defaults.repetition_penalty),
            seed: self.seed,
            stop: self.stop.map(Stop::into_vec).unwrap_or_default(),
            top_logprobs: self.top_logprobs,
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            logit_bias,
            min_tokens: self.min_tokens.unwrap_or(0),
            constraint: chosen.as_ref().map(|(c, _)| c.clone()),
            ..defaults
        };
        check_params(&params)?;
        Ok((
            params,
            self.max_tokens.is_none(),
            chosen.map(|(_, field)| field),
        ))
    }
}

/// OpenAI's `logit_bias` (token ids as strings) as the engine's pairs, in token order.
fn logit_bias(
    bias: Option<std::collections::HashMap<String, f64>>,
) -> Result<Vec<(u32, f32)>, AppError> {
    let mut pairs = Vec::new();
    for (token, b) in bias.unwrap_or_default() {
        let id: u32 = token.trim().parse().map_err(|_| {
            AppError::invalid("logit_bias", format!("keys are token ids, got `{token}`"))
        })?;
        if !(-100.0..=100.0).contains(&b) {
            return Err(AppError::invalid(
                "logit_bias",
                format!("biases are in [-100, 100], got {b} for token {id}"),
            ));
        }
        pairs.push((id, b as f32));
    }
    pairs.sort_by_key(|p| p.0);
    Ok(pairs)
}

/// OpenAI's `n`: 1 when absent, at most [`MAX_N`].
fn choices(n: Option<usize>) -> Result<usize, AppError> {
    match n.unwrap_or(1) {
        n @ 1..=MAX_N => Ok(n),
        n => Err(AppError::invalid(
            "n",
            format!("must be in 1..={MAX_N}, got {n}"),
        )),
    }
}

/// Checks the sampling values whose range the engine would otherwise report less precisely.
pub fn check_params(p: &SamplingParams) -> Result<(), AppError> {
    if p.max_tokens == 0 {
        return Err(AppError::invalid("max_tokens", "must be at least 1"));
    }
    p.validate()
        .map_err(|e| AppError::invalid(e.field, e.message))
}

/// `POST /chat`: `prompt` (a user turn, or with `raw` the model's input as it is) or `messages`.
pub fn chat(req: ChatRequest) -> Result<GenerationRequest, AppError> {
    let input = match (req.prompt, req.messages) {
        (Some(_), Some(_)) => {
            return Err(AppError::invalid(
                "messages",
                "give `prompt` or `messages`, not both",
            ))
        }
        (None, None) => return Err(AppError::invalid("prompt", "give `prompt` or `messages`")),
        (Some(p), None) if req.raw => PromptInput::Raw(p),
        (Some(p), None) => PromptInput::Messages(vec![ChatMessage::new("user", p)]),
        (None, Some(m)) => messages_input(
            m.into_iter()
                .map(|m| ChatMessage::new(m.role, m.content))
                .collect(),
            "messages",
        )?,
    };
    let (params, clamp_max_tokens, constraint_field) = Sampling {
        max_tokens: req.max_tokens,
        default_max_tokens: DEFAULT_CHAT_MAX_TOKENS,
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        repetition_penalty: req.repetition_penalty,
        seed: req.seed,
        stop: req.stop,
        top_logprobs: 0,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        logit_bias: req.logit_bias,
        min_tokens: req.min_tokens,
        constraint: ConstraintFields {
            response_format: req.response_format,
            structured_outputs: req.structured_outputs,
            ..ConstraintFields::default()
        },
    }
    .check()?;
    Ok(GenerationRequest {
        id_prefix: "chat-",
        input,
        params,
        clamp_max_tokens,
        target: Target::Chat {
            model: req.model,
            adapter_path: req.adapter_path,
        },
        stream: req.stream,
        logprobs: false,
        include_usage: false,
        constraint_field,
        n: 1,
        tools: Vec::new(),
        tool_choice: ToolChoice::None,
    })
}

/// The sampling fields of an OpenAI request body (chat and text completions carry the same
/// ones, in two types as OpenAI declares them), with the route's `max_tokens` and its default.
macro_rules! openai_sampling {
    ($req:ident, $max_tokens:expr, $default:expr, $top_logprobs:expr) => {
        Sampling {
            max_tokens: $max_tokens,
            default_max_tokens: $default,
            temperature: $req.temperature,
            top_p: $req.top_p,
            top_k: $req.top_k,
            repetition_penalty: $req.repetition_penalty,
            seed: $req.seed,
            stop: $req.stop,
            top_logprobs: $top_logprobs,
            presence_penalty: $req.presence_penalty,
            frequency_penalty: $req.frequency_penalty,
            logit_bias: $req.logit_bias,
            min_tokens: $req.min_tokens,
            constraint: ConstraintFields {
                response_format: $req.response_format,
                structured_outputs: $req.structured_outputs,
                guided_json: $req.guided_json,
                guided_regex: $req.guided_regex,
                guided_choice: $req.guided_choice,
                guided_grammar: $req.guided_grammar,
            },
        }
    };
}

/// `POST /v1/chat/completions`.
pub fn chat_completion(req: ChatCompletionRequest) -> Result<GenerationRequest, AppError> {
    let n = choices(req.n)?;
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
    let (params, clamp_max_tokens, constraint_field) = openai_sampling!(
        req,
        req.max_completion_tokens.or(req.max_tokens),
        DEFAULT_CHAT_MAX_TOKENS,
        top_logprobs
    )
    .check()
    .map_err(|mut e| {
        if req.max_completion_tokens.is_some() && e.field.as_deref() == Some("max_tokens") {
            e.field = Some("max_completion_tokens".into());
            e.message = e.message.replacen("max_tokens", "max_completion_tokens", 1);
        }
        e
    })?;
    let input = messages_input(convert_messages(req.messages)?, "messages")?;
    let (tools, tool_choice) = tools_of(req.tools, req.tool_choice, constraint_field.is_some())?;
    Ok(GenerationRequest {
        id_prefix: "chatcmpl-",
        input,
        params,
        clamp_max_tokens,
        target: Target::Model(req.model.unwrap_or_default()),
        stream: req.stream.unwrap_or(false),
        logprobs,
        include_usage: req
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        constraint_field,
        n,
        tools,
        tool_choice,
    })
}

/// `POST /v1/completions`.
pub fn completion(req: CompletionRequest) -> Result<GenerationRequest, AppError> {
    let prompt = prompt_text(&req.prompt)?;
    let n = choices(req.n)?;
    if let Some(b) = req.best_of {
        if b != 1 && b != n {
            return Err(AppError::invalid(
                "best_of",
                format!("only 1 (or equal to `n`) is supported, got {b}"),
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
    let (params, clamp_max_tokens, constraint_field) = openai_sampling!(
        req,
        req.max_tokens,
        DEFAULT_COMPLETION_MAX_TOKENS,
        top_logprobs
    )
    .check()?;
    Ok(GenerationRequest {
        id_prefix: "cmpl-",
        input: PromptInput::Raw(prompt),
        params,
        clamp_max_tokens,
        target: Target::Model(req.model.unwrap_or_default()),
        stream: req.stream.unwrap_or(false),
        logprobs: req.logprobs.is_some(),
        include_usage: req
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        constraint_field,
        n,
        tools: Vec::new(),
        tool_choice: ToolChoice::None,
    })
}

/// Checks roles and builds the prompt input.
pub fn messages_input(messages: Vec<ChatMessage>, field: &str) -> Result<PromptInput, AppError> {
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
    Ok(PromptInput::Messages(messages))
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
pub fn convert_messages(messages: Vec<OpenAiMessage>) -> Result<Vec<ChatMessage>, AppError> {
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
            let tool_calls = m
                .tool_calls
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .map(|(j, c)| MessageToolCall {
                    id: c.id.unwrap_or_else(|| format!("call_{i}_{j}")),
                    name: c.function.name,
                    arguments: c.function.arguments.unwrap_or_else(|| "{}".into()),
                })
                .collect();
            Ok(ChatMessage {
                role,
                content,
                tool_calls,
                tool_call_id: m.tool_call_id,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use serde_json::json;

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
    fn the_three_routes_fill_the_same_defaults() {
        let chat: ChatRequest = serde_json::from_value(json!({"prompt": "hi"})).unwrap();
        let chat = super::chat(chat).unwrap();
        let cc: ChatCompletionRequest =
            serde_json::from_value(json!({"messages": [{"role": "user", "content": "hi"}]}))
                .unwrap();
        let cc = chat_completion(cc).unwrap();
        let c: CompletionRequest = serde_json::from_value(json!({"prompt": "hi"})).unwrap();
        let c = completion(c).unwrap();
        let defaults = SamplingParams::default();
        for r in [&chat, &cc, &c] {
            assert!(r.clamp_max_tokens);
            assert_eq!(r.params.temperature, defaults.temperature);
            assert_eq!(r.params.top_p, defaults.top_p);
            assert_eq!(r.params.top_k, defaults.top_k);
            assert!(!r.stream);
        }
        assert_eq!(chat.params.max_tokens, DEFAULT_CHAT_MAX_TOKENS);
        assert_eq!(cc.params.max_tokens, DEFAULT_CHAT_MAX_TOKENS);
        assert_eq!(c.params.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS);
        assert_eq!(
            chat.target,
            Target::Chat {
                model: None,
                adapter_path: None
            }
        );
        assert_eq!(cc.target, Target::Model(String::new()));
        assert!(matches!(c.input, PromptInput::Raw(ref p) if p == "hi"));
        assert!(matches!(chat.input, PromptInput::Messages(ref m) if m[0].role == "user"));
    }

    #[test]
    fn chat_requests_are_checked() {
        let field = |v: serde_json::Value| {
            super::chat(serde_json::from_value(v).unwrap())
                .unwrap_err()
                .field
                .unwrap()
        };
        assert_eq!(
            field(json!({"prompt": "a", "messages": [{"role": "user", "content": "b"}]})),
            "messages"
        );
        assert_eq!(field(json!({})), "prompt");
        assert_eq!(field(json!({"messages": []})), "messages");
        assert_eq!(
            field(json!({"messages": [{"role": "robot", "content": "b"}]})),
            "messages[0].role"
        );
        assert_eq!(field(json!({"prompt": "a", "max_tokens": 0})), "max_tokens");
        assert_eq!(field(json!({"prompt": "a", "top_p": 2.0})), "top_p");
        let raw = super::chat(
            serde_json::from_value(
                json!({"prompt": "a", "raw": true, "stream": true, "adapter_path": "x", "stop": "z"}),
            )
            .unwrap(),
        )
        .unwrap();
        assert!(matches!(raw.input, PromptInput::Raw(_)));
        assert!(raw.stream);
        assert_eq!(
            raw.target,
            Target::Chat {
                model: None,
                adapter_path: Some("x".into())
            }
        );
        assert_eq!(raw.params.stop, vec!["z"]);
    }

    #[test]
    fn chat_completion_requests_are_checked() {
        let parse =
            |v: serde_json::Value| -> ChatCompletionRequest { serde_json::from_value(v).unwrap() };
        let base = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "user": "u", "unknown": 1});
        let r = chat_completion(parse(base.clone())).unwrap();
        assert!(r.clamp_max_tokens);
        assert_eq!(r.params.max_tokens, DEFAULT_CHAT_MAX_TOKENS);
        assert_eq!(r.target, Target::Model("m".into()));

        let mut v = base.clone();
        v["max_completion_tokens"] = json!(7);
        v["max_tokens"] = json!(9);
        v["stop"] = json!("x");
        v["logprobs"] = json!(true);
        v["top_logprobs"] = json!(2);
        v["stream"] = json!(true);
        v["stream_options"] = json!({"include_usage": true});
        let r = chat_completion(parse(v)).unwrap();
        assert!(!r.clamp_max_tokens);
        assert_eq!((r.params.max_tokens, r.params.top_logprobs), (7, 2));
        assert_eq!(r.params.stop, vec!["x"]);
        assert!(r.logprobs && r.stream && r.include_usage);

        let field = |patch: serde_json::Value| {
            let mut v = base.clone();
            for (k, x) in patch.as_object().unwrap() {
                v[k] = x.clone();
            }
            chat_completion(parse(v)).unwrap_err().field.unwrap()
        };
        assert_eq!(field(json!({"n": 0})), "n");
        assert_eq!(field(json!({"n": MAX_N + 1})), "n");
        assert_eq!(field(json!({"presence_penalty": 2.5})), "presence_penalty");
        assert_eq!(
            field(json!({"frequency_penalty": -2.5})),
            "frequency_penalty"
        );
        assert_eq!(field(json!({"logit_bias": {"x": 1}})), "logit_bias");
        assert_eq!(field(json!({"min_tokens": 300})), "min_tokens");
        assert_eq!(
            field(json!({"guided_regex": "a", "guided_choice": ["b"]})),
            "guided_choice"
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
        assert_eq!(field(json!({"messages": []})), "messages");
        // Accepted, and carried to the engine's parameters.
        let mut v = base.clone();
        v["n"] = json!(3);
        v["presence_penalty"] = json!(0.5);
        v["frequency_penalty"] = json!(-1.0);
        v["logit_bias"] = json!({"17": -100, "3": 2.5});
        v["min_tokens"] = json!(2);
        v["response_format"] = json!({"type": "json_object"});
        let r = chat_completion(parse(v)).unwrap();
        assert_eq!(r.n, 3);
        assert_eq!(
            (r.params.presence_penalty, r.params.frequency_penalty),
            (0.5, -1.0)
        );
        assert_eq!(r.params.logit_bias, vec![(3, 2.5), (17, -100.0)]);
        assert_eq!(r.params.min_tokens, 2);
        assert_eq!(
            r.params.constraint,
            Some(tessera_engine::constraint::Constraint::JsonObject)
        );
        assert_eq!(r.constraint_field, Some("response_format"));
    }

    #[test]
    fn completion_requests_are_checked() {
        let parse =
            |v: serde_json::Value| -> CompletionRequest { serde_json::from_value(v).unwrap() };
        let r = completion(parse(json!({"model": "m", "prompt": "a"}))).unwrap();
        assert!(r.clamp_max_tokens);
        assert_eq!(
            (r.params.max_tokens, r.params.top_logprobs),
            (DEFAULT_COMPLETION_MAX_TOKENS, 0)
        );
        assert!(!r.logprobs);
        let r = completion(parse(json!({"prompt": "a", "logprobs": 3}))).unwrap();
        assert_eq!(r.params.top_logprobs, 3);
        assert!(r.logprobs);
        let field = |v: serde_json::Value| completion(parse(v)).unwrap_err().field.unwrap();
        assert_eq!(field(json!({"prompt": "a", "echo": true})), "echo");
        assert_eq!(field(json!({"prompt": "a", "suffix": "z"})), "suffix");
        assert_eq!(field(json!({"prompt": "a", "logprobs": 6})), "logprobs");
        assert_eq!(field(json!({"prompt": "a", "n": 0})), "n");
        assert_eq!(field(json!({"prompt": "a", "best_of": 2})), "best_of");
        assert_eq!(
            completion(parse(json!({"prompt": "a", "n": 2, "best_of": 2})))
                .unwrap()
                .n,
            2
        );
        assert_eq!(field(json!({"prompt": []})), "prompt");
        assert!(completion(parse(json!({"prompt": "a", "echo": false, "suffix": null}))).is_ok());
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
}
