//! Chat templates: the model's own Jinja template rendered with `minijinja` the way transformers
//! renders it (`trim_blocks`, `lstrip_blocks`, Python string methods, `raise_exception`).

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::tool_calls::{ToolFormat, ToolFunction};

/// One chat turn, as `POST /chat` and the OpenAI API take it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant turn's tool calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<MessageToolCall>,
    /// A `tool` turn: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

/// A tool call inside a conversation (OpenAI's `messages[].tool_calls[]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            ..Self::default()
        }
    }

    /// The message as templates read it (transformers' shape): tool calls as
    /// `{id, type, function: {name, arguments}}` with the arguments parsed into an object, as
    /// vLLM passes them.
    fn template_value(&self) -> Value {
        let mut v = json!({"role": self.role, "content": self.content});
        if !self.tool_calls.is_empty() {
            v["tool_calls"] = self
                .tool_calls
                .iter()
                .map(|c| {
                    let arguments = serde_json::from_str::<Value>(&c.arguments)
                        .unwrap_or_else(|_| Value::String(c.arguments.clone()));
                    json!({"id": c.id, "type": "function",
                           "function": {"name": c.name, "arguments": arguments}})
                })
                .collect();
        }
        if let Some(id) = &self.tool_call_id {
            v["tool_call_id"] = json!(id);
        }
        v
    }

    /// For a template that knows no tools: calls written into the content in the Hermes format,
    /// tool results as a user turn of `<tool_response>` blocks (Qwen 2.5's rendering).
    fn inlined(&self) -> ChatMessage {
        let mut content = self.content.clone();
        for c in &self.tool_calls {
            let arguments = serde_json::from_str::<Value>(&c.arguments)
                .unwrap_or_else(|_| Value::String(c.arguments.clone()));
            if !content.is_empty() {
                content.push('\n');
            }
            content.push_str(&format!(
                "<tool_call>\n{{\"name\": {}, \"arguments\": {arguments}}}\n</tool_call>",
                json!(c.name)
            ));
        }
        if self.role == "tool" {
            return ChatMessage::new(
                "user",
                format!("<tool_response>\n{content}\n</tool_response>"),
            );
        }
        ChatMessage::new(self.role.clone(), content)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("the model has no chat template; send `prompt` instead of `messages`")]
    Missing,
    #[error("chat template does not compile: {0}")]
    Compile(String),
    #[error("chat template failed to render `messages`: {0}")]
    Render(String),
}

/// Gemma's turn format (the template Gemma 2 and 3 instruction-tuned checkpoints ship, for text
/// messages): a system message prefixes the first user turn; the assistant is `model`.
pub const GEMMA_TEMPLATE: &str = "{{ bos_token }}\
{%- if messages[0]['role'] == 'system' -%}\
{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}\
{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}\
{%- for message in loop_messages -%}\
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\
{%- endif -%}\
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}\
{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}\
{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}";

/// ChatML, the format of Qwen2, Qwen2.5 and Qwen3 checkpoints (for text messages).
pub const CHATML_TEMPLATE: &str = "{%- for message in messages -%}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}";

/// The format a GGUF file of `architecture` without `tokenizer.chat_template` is served with, as
/// llama.cpp falls back to built-in templates: Gemma's turns for Gemma files, ChatML for Qwen
/// ones; `None` for the rest (a chat request is then refused, naming `prompt`).
pub fn family_default(architecture: &str) -> Option<&'static str> {
    match architecture {
        "gemma" | "gemma2" | "gemma3" => Some(GEMMA_TEMPLATE),
        "qwen2" | "qwen3" => Some(CHATML_TEMPLATE),
        _ => None,
    }
}

/// A compiled chat template with the special tokens it may refer to.
#[derive(Debug)]
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// The template reads a `tools` variable (it renders tool definitions itself).
    knows_tools: bool,
    tool_format: ToolFormat,
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, ChatTemplateError> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        env.add_function("strftime_now", |format: String| {
            // Templates use it for a date line; a fixed clock keeps renders reproducible.
            format
                .replace("%d", "01")
                .replace("%B", "January")
                .replace("%Y", "2026")
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| ChatTemplateError::Compile(describe(&e)))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            knows_tools: source.contains("tools"),
            tool_format: ToolFormat::detect(Some(source)),
        })
    }

    /// How this template's family writes tool calls.
    pub fn tool_format(&self) -> ToolFormat {
        self.tool_format
    }

    /// Renders `messages` offering `tools`: through the template's own `tools` variable when it
    /// has one (as transformers does), else with the Hermes tool prompt as (or before) the system
    /// turn and tool calls and results written into the turns.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolFunction],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let has_tool_turns = messages
            .iter()
            .any(|m| !m.tool_calls.is_empty() || m.role == "tool");
        if self.knows_tools {
            let tools: Vec<Value> = tools
                .iter()
                .map(|t| json!({"type": "function", "function": t}))
                .collect();
            let messages: Vec<Value> = messages.iter().map(ChatMessage::template_value).collect();
            let template = self.env.get_template("chat").expect("added in new");
            return template
                .render(minijinja::context! {
                    messages => messages,
                    tools => (!tools.is_empty()).then_some(tools),
                    add_generation_prompt => add_generation_prompt,
                    bos_token => self.bos_token,
                    eos_token => self.eos_token,
                })
                .map_err(|e| ChatTemplateError::Render(describe(&e)));
        }
        if tools.is_empty() && !has_tool_turns {
            return self.render(messages, add_generation_prompt);
        }
        let mut turns: Vec<ChatMessage> = messages.iter().map(ChatMessage::inlined).collect();
        if !tools.is_empty() {
            let prompt = ToolFormat::system_prompt(tools);
            match turns.first_mut() {
                Some(first) if first.role == "system" => {
                    first.content = format!("{}\n\n{prompt}", first.content);
                }
                _ => turns.insert(0, ChatMessage::new("system", prompt)),
            }
        }
        self.render(&turns, add_generation_prompt)
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant speaks.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let template = self.env.get_template("chat").expect("added in new");
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| ChatTemplateError::Render(describe(&e)))
    }
}

fn describe(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(detail) => format!("{}: {detail}", e.kind()),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn user(text: &str) -> ChatMessage {
        ChatMessage::new("user", text)
    }

    #[test]
    fn tools_go_through_the_template_or_the_hermes_prompt() {
        let tool = ToolFunction {
            name: "get_weather".into(),
            description: None,
            parameters: Some(serde_json::json!({"type": "object"})),
        };
        let call = ChatMessage {
            role: "assistant".into(),
            tool_calls: vec![MessageToolCall {
                id: "c1".into(),
                name: "get_weather".into(),
                arguments: "{\"city\": \"Paris\"}".into(),
            }],
            ..ChatMessage::default()
        };
        let result = ChatMessage {
            role: "tool".into(),
            content: "sunny".into(),
            tool_call_id: Some("c1".into()),
            ..ChatMessage::default()
        };
        let turns = [user("hi"), call, result];
        // A template that renders the tools itself gets them, and the calls as objects.
        let own = "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }}{% endfor %}{{ '|' }}{% endif %}\
            {% for m in messages %}{{ m.role }}:{{ m.content }}{% for c in m.tool_calls or [] %}\
            <tool_call>{{ c.function.name }} {{ c.function.arguments.city }}</tool_call>{% endfor %}{{ '|' }}{% endfor %}";
        let t = ChatTemplate::new(own, "", "").unwrap();
        assert_eq!(t.tool_format(), ToolFormat::Hermes);
        let text = t
            .render_with_tools(&turns, std::slice::from_ref(&tool), false)
            .unwrap();
        assert_eq!(
            text,
            "TOOLS:get_weather|user:hi|assistant:<tool_call>get_weather Paris</tool_call>|tool:sunny|"
        );
        // A template that knows no tools: the Hermes prompt is the system turn, calls and
        // results are written into the turns.
        let t = ChatTemplate::new(CHATML, "", "").unwrap();
        let text = t.render_with_tools(&turns, &[tool], true).unwrap();
        assert!(text.starts_with("<|im_start|>system\n# Tools"), "{text}");
        assert!(text.contains("\"name\": \"get_weather\""), "{text}");
        assert!(
            text.contains("<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\":\"Paris\"}}\n</tool_call><|im_end|>"),
            "{text}"
        );
        assert!(
            text.contains("<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>"),
            "{text}"
        );
    }

    #[test]
    fn renders_chatml_with_generation_prompt() {
        let t = ChatTemplate::new(CHATML, "<s>", "</s>").unwrap();
        let text = t.render(&[user(" Hi ")], true).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let text = t.render(&[user("Hi")], false).unwrap();
        assert!(text.ends_with("Hi<|im_end|>\n"), "{text}");
    }

    #[test]
    fn python_methods_and_raise_exception() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}{{ bos_token }}{{ messages[0].content.strip().upper() }}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        assert_eq!(t.render(&[user("  hi ")], false).unwrap(), "<s>HI");
        let e = t
            .render(&[ChatMessage::new("assistant", "x")], false)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("first message must be from the user"),
            "{e}"
        );
    }

    #[test]
    fn bad_template_is_a_compile_error() {
        let e = ChatTemplate::new("{% for %}", "", "").unwrap_err();
        assert!(matches!(e, ChatTemplateError::Compile(_)), "{e}");
    }
}
