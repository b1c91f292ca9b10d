//! Tool calling in the model family's own format: how a chat template expects tool calls to be
//! written (detected from the template's text), the grammar that forces a call whose arguments
//! match the function's parameter schema (`tool_choice: "required"` or a named function), and the
//! parser that reads calls back out of generated text.
//!
//! Formats, as vLLM's tool parsers name them:
//! - `hermes` (Qwen 2.5/3, Hermes, and the default for templates that know no tools):
//!   `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per call;
//! - `llama3_json` (Llama 3.1+): the answer is `{"name": ..., "parameters": {...}}`, optionally
//!   after `<|python_tag|>`;
//! - `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::constraint::Constraint;

/// A family's tool-call format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolFormat {
    Hermes,
    Llama3Json,
    Mistral,
}

/// A function the model may call (OpenAI's `tools[].function`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolFunction {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON schema of the arguments object (absent: any object).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
}

/// Whether and which tool the model is to call (OpenAI's `tool_choice`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolChoice {
    /// No tools offered, or `"none"`: the tools are not shown and no call is read.
    #[default]
    None,
    /// The model decides; a call in its output is returned as `tool_calls`.
    Auto,
    /// A call is forced (by a grammar) to one of the tools.
    Required,
    /// A call is forced to this function.
    Function(String),
}

/// A call read out of generated text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParsedCall {
    pub name: String,
    /// The arguments as JSON text (OpenAI's `function.arguments`).
    pub arguments: String,
}

impl ToolFormat {
    /// The format a chat template writes calls in; `hermes` for templates that show none.
    pub fn detect(template: Option<&str>) -> Self {
        let t = template.unwrap_or_default();
        if t.contains("[TOOL_CALLS]") {
            ToolFormat::Mistral
        } else if t.contains("<tool_call>") {
            ToolFormat::Hermes
        } else if t.contains("<|python_tag|>")
            || (t.contains("<|start_header_id|>") && t.contains("parameters"))
        {
            ToolFormat::Llama3Json
        } else {
            ToolFormat::Hermes
        }
    }

    /// What generated text starts with when it is a call (streams hold text back while it could
    /// still become one).
    pub fn markers(self) -> &'static [&'static str] {
        match self {
            ToolFormat::Hermes => &["<tool_call>"],
            ToolFormat::Llama3Json => &["<|python_tag|>", "{"],
            ToolFormat::Mistral => &["[TOOL_CALLS]"],
        }
    }

    /// Whether `text` (the output so far, leading whitespace ignored) may still be, or already
    /// is, a tool call.
    pub fn may_be_call(self, text: &str) -> bool {
        let t = text.trim_start();
        self.markers()
            .iter()
            .any(|m| t.starts_with(m) || m.starts_with(t))
    }

    /// The system prompt that tells a model whose template knows no tools how to call them (the
    /// Hermes prompt Qwen 2.5's template writes).
    pub fn system_prompt(tools: &[ToolFunction]) -> String {
        let mut text = String::from(
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
             You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
        );
        for t in tools {
            text.push('\n');
            text.push_str(&json!({"type": "function", "function": t}).to_string());
        }
        text.push_str(
            "\n</tools>\n\nFor each function call, return a json object with function name and \
             arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n\
             {\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
        );
        text
    }

    /// A grammar whose every output is one call, in this format, of one of `tools` (or of the
    /// one named), with arguments valid against that function's parameter schema.
    pub fn forced_call(self, tools: &[ToolFunction], named: Option<&str>) -> Constraint {
        let args_key = match self {
            ToolFormat::Llama3Json => "parameters",
            _ => "arguments",
        };
        let calls: Vec<Value> = tools
            .iter()
            .filter(|t| named.is_none_or(|n| n == t.name))
            .map(|t| {
                let params = t
                    .parameters
                    .clone()
                    .unwrap_or_else(|| json!({"type": "object"}));
                json!({
                    "type": "object",
                    "properties": {"name": {"const": t.name}, args_key: params},
                    "required": ["name", args_key],
                    "additionalProperties": false
                })
            })
            .collect();
        let one = if calls.len() == 1 {
            calls[0].clone()
        } else {
            json!({"anyOf": calls})
        };
        let compact =
            json!({"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": false});
        let mut schema = one;
        let lark = match self {
            ToolFormat::Hermes => {
                schema["x-guidance"] = compact;
                format!("start: \"<tool_call>\\n\" call \"\\n</tool_call>\"\ncall: %json {schema}")
            }
            ToolFormat::Llama3Json => {
                schema["x-guidance"] = compact;
                format!("start: call\ncall: %json {schema}")
            }
            ToolFormat::Mistral => {
                let mut list =
                    json!({"type": "array", "items": schema, "minItems": 1, "maxItems": 1});
                list["x-guidance"] = compact;
                format!("start: \"[TOOL_CALLS]\" calls\ncalls: %json {list}")
            }
        };
        Constraint::Grammar { lark }
    }

    /// The calls in `text` and the text before them; `None` when it holds no well-formed call.
    pub fn parse(self, text: &str) -> Option<(String, Vec<ParsedCall>)> {
        match self {
            ToolFormat::Hermes => {
                let start = text.find("<tool_call>")?;
                let mut calls = Vec::new();
                let mut rest = &text[start..];
                while let Some(open) = rest.find("<tool_call>") {
                    let body = &rest[open + "<tool_call>".len()..];
                    let (inner, after) = match body.find("</tool_call>") {
                        Some(close) => (&body[..close], &body[close + "</tool_call>".len()..]),
                        None => (body, ""),
                    };
                    calls.push(call_of(
                        &serde_json::from_str(inner.trim()).ok()?,
                        "arguments",
                    )?);
                    rest = after;
                }
                Some((text[..start].trim().to_string(), calls))
            }
            ToolFormat::Llama3Json => {
                let t = text.trim();
                let t = t.strip_prefix("<|python_tag|>").unwrap_or(t).trim();
                let v: Value = serde_json::from_str(t).ok()?;
                let calls = match &v {
                    Value::Array(items) => items
                        .iter()
                        .map(|c| call_of(c, "parameters").or_else(|| call_of(c, "arguments")))
                        .collect::<Option<Vec<_>>>()?,
                    _ => vec![call_of(&v, "parameters").or_else(|| call_of(&v, "arguments"))?],
                };
                Some((String::new(), calls))
            }
            ToolFormat::Mistral => {
                let start = text.find("[TOOL_CALLS]")?;
                let body = text[start + "[TOOL_CALLS]".len()..].trim();
                let v: Value = serde_json::from_str(body).ok()?;
                let items = match v {
                    Value::Array(items) => items,
                    one => vec![one],
                };
                let calls = items
                    .iter()
                    .map(|c| call_of(c, "arguments"))
                    .collect::<Option<Vec<_>>>()?;
                Some((text[..start].trim().to_string(), calls))
            }
        }
        .filter(|(_, calls)| !calls.is_empty())
    }
}

/// `{"name": ..., key: {...}}` as a call (arguments kept as JSON text).
fn call_of(v: &Value, key: &str) -> Option<ParsedCall> {
    let name = v.get("name")?.as_str()?.to_string();
    let args = v.get(key)?;
    let arguments = match args {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    Some(ParsedCall { name, arguments })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> ToolFunction {
        ToolFunction {
            name: "get_weather".into(),
            description: Some("Weather of a city".into()),
            parameters: Some(
                json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
            ),
        }
    }

    #[test]
    fn formats_are_detected_from_the_template() {
        assert_eq!(
            ToolFormat::detect(Some("{{ '<tool_call>' }}")),
            ToolFormat::Hermes
        );
        assert_eq!(
            ToolFormat::detect(Some("[TOOL_CALLS] {{ x }}")),
            ToolFormat::Mistral
        );
        assert_eq!(
            ToolFormat::detect(Some("<|start_header_id|> parameters <|python_tag|>")),
            ToolFormat::Llama3Json
        );
        assert_eq!(ToolFormat::detect(None), ToolFormat::Hermes);
    }

    #[test]
    fn calls_are_parsed_in_each_format() {
        let hermes = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call>";
        let (before, calls) = ToolFormat::Hermes.parse(hermes).unwrap();
        assert_eq!(before, "Let me check.");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].name, "get_weather");
        assert_eq!(
            serde_json::from_str::<Value>(&calls[1].arguments).unwrap(),
            json!({"city": "Rome"})
        );
        let llama =
            "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}";
        assert_eq!(
            ToolFormat::Llama3Json.parse(llama).unwrap().1[0].arguments,
            "{\"city\":\"Oslo\"}"
        );
        let mistral =
            "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Bern\"}}]";
        assert_eq!(
            ToolFormat::Mistral.parse(mistral).unwrap().1[0].name,
            "get_weather"
        );
        assert!(ToolFormat::Hermes.parse("plain text").is_none());
        assert!(ToolFormat::Hermes.parse("<tool_call>{broken").is_none());
        assert!(ToolFormat::Llama3Json.parse("{\"a\": 1}").is_none());
    }

    #[test]
    fn streams_hold_back_what_may_become_a_call() {
        assert!(ToolFormat::Hermes.may_be_call(""));
        assert!(ToolFormat::Hermes.may_be_call("<tool"));
        assert!(ToolFormat::Hermes.may_be_call("\n<tool_call>\n{\"na"));
        assert!(!ToolFormat::Hermes.may_be_call("Hello"));
    }

    #[test]
    fn forced_grammars_name_the_functions() {
        let Constraint::Grammar { lark } = ToolFormat::Hermes.forced_call(&[weather()], None)
        else {
            panic!("a grammar")
        };
        assert!(lark.starts_with("start: \"<tool_call>\\n\" call"), "{lark}");
        assert!(lark.contains("\"const\":\"get_weather\""), "{lark}");
        let Constraint::Grammar { lark } =
            ToolFormat::Llama3Json.forced_call(&[weather()], Some("get_weather"))
        else {
            panic!("a grammar")
        };
        assert!(lark.contains("\"parameters\""), "{lark}");
    }
}
