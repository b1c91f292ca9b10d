//! Fine-tuning datasets: JSONL with one example per line, `{"text"}`, `{"prompt", "completion"}`
//! or `{"messages"}` (with OpenAI's `tools`, assistant `tool_calls` and `tool` turns, rendered by
//! the model's template as at inference, so an adapter learns the family's own call format),
//! tokenized into ids and a loss mask. Loss falls on the text, the completion, or
//! the assistant turns only, and always on the end token that closes them (so the model learns to
//! stop). Examples are truncated to `max_seq_length`; bad lines fail the job with their line number
//! unless `skip_invalid` is set.
//!
//! The file is opened once and checked as opened ([`crate::regular_file`]: a regular file within
//! `training.max_dataset_bytes`, never a FIFO or a device), then read a line at a time (each at most
//! [`ReadLimits::max_line_bytes`]), so a cancel stops the read and no file is ever held whole.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::Deserialize;

use crate::chat_template::{ChatMessage, MessageToolCall};
use crate::tokenizer::Tokenizer;
use crate::tool_calls::ToolFunction;

/// One tokenized example: `ids[i]` and whether the model is trained to predict it.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub supervised: Vec<bool>,
    /// The JSONL line (1-based) it came from.
    pub line: usize,
}

impl Example {
    pub fn supervised_tokens(&self) -> usize {
        // Position 0 is never predicted (nothing precedes it).
        self.supervised.iter().skip(1).filter(|&&s| s).count()
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dataset {
    pub examples: Vec<Example>,
    pub truncated: usize,
    /// Lines skipped as invalid (with `skip_invalid`), with their reasons.
    pub skipped: Vec<(usize, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("dataset {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("dataset line {line}: {message}")]
    Line { line: usize, message: String },
    #[error("dataset has no usable examples")]
    Empty,
    /// The cancel flag was raised while the file was read.
    #[error("cancelled while reading the dataset")]
    Cancelled,
}

/// The default of `training.max_dataset_bytes`: 1 GiB.
pub const DEFAULT_MAX_DATASET_BYTES: u64 = 1 << 30;

/// Bounds on reading a dataset file.
#[derive(Debug, Clone)]
pub struct ReadLimits {
    /// The file's size at most (`training.max_dataset_bytes`).
    pub max_bytes: u64,
    /// One line's bytes at most.
    pub max_line_bytes: usize,
    /// Checked between lines: a raised flag stops the read ([`DatasetError::Cancelled`]).
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for ReadLimits {
    fn default() -> Self {
        Self {
            max_bytes: DEFAULT_MAX_DATASET_BYTES,
            max_line_bytes: 16 << 20,
            cancel: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Record {
    Text {
        text: String,
    },
    Completion {
        prompt: String,
        completion: String,
    },
    Chat {
        messages: Vec<LineMessage>,
        #[serde(default)]
        tools: Vec<LineTool>,
    },
}

/// A message of a `messages` line, as OpenAI writes it (`content` may be null beside
/// `tool_calls`; arguments are JSON text or an object).
#[derive(Deserialize)]
struct LineMessage {
    role: String,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Vec<LineToolCall>,
    #[serde(default)]
    tool_call_id: Option<String>,
}

#[derive(Deserialize)]
struct LineToolCall {
    #[serde(default)]
    id: Option<String>,
    function: LineFunctionCall,
}

#[derive(Deserialize)]
struct LineFunctionCall {
    name: String,
    #[serde(default)]
    arguments: serde_json::Value,
}

/// `tools[]`: `{"type": "function", "function": {...}}` or the function alone.
#[derive(Deserialize)]
#[serde(untagged)]
enum LineTool {
    Wrapped { function: ToolFunction },
    Bare(ToolFunction),
}

impl LineMessage {
    fn into_message(self, i: usize) -> ChatMessage {
        ChatMessage {
            role: self.role,
            content: self.content.unwrap_or_default(),
            tool_calls: self
                .tool_calls
                .into_iter()
                .enumerate()
                .map(|(j, c)| MessageToolCall {
                    id: c.id.unwrap_or_else(|| format!("call_{i}_{j}")),
                    name: c.function.name,
                    arguments: match c.function.arguments {
                        serde_json::Value::String(s) => s,
                        serde_json::Value::Null => "{}".into(),
                        other => other.to_string(),
                    },
                })
                .collect(),
            tool_call_id: self.tool_call_id,
        }
    }
}

/// Reads and tokenizes a JSONL dataset within `limits`.
pub fn load(
    path: &Path,
    tokenizer: &Tokenizer,
    max_seq_length: usize,
    skip_invalid: bool,
    limits: &ReadLimits,
) -> Result<Dataset, DatasetError> {
    let io = |source| DatasetError::Io {
        path: path.display().to_string(),
        source,
    };
    let (file, size) = crate::regular_file::open(path, Some(limits.max_bytes)).map_err(|e| {
        let message = if e.kind() == std::io::ErrorKind::FileTooLarge {
            format!("{e} (training.max_dataset_bytes)")
        } else {
            e.to_string()
        };
        io(std::io::Error::new(e.kind(), message))
    })?;
    let mut reader = BufReader::new(file.take(size));
    let mut out = Dataset::default();
    let mut buf = Vec::new();
    for line in 1.. {
        if limits
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
        {
            return Err(DatasetError::Cancelled);
        }
        buf.clear();
        let cap = limits.max_line_bytes as u64 + 1;
        let n = (&mut reader)
            .take(cap)
            .read_until(b'\n', &mut buf)
            .map_err(io)?;
        if n == 0 {
            break;
        }
        if buf.last() != Some(&b'\n') && n as u64 == cap {
            return Err(DatasetError::Line {
                line,
                message: format!("longer than {} bytes", limits.max_line_bytes),
            });
        }
        let raw = match std::str::from_utf8(&buf) {
            Ok(raw) => raw.trim_end_matches(['\n', '\r']),
            Err(e) => {
                let message = format!("not UTF-8: {e}");
                if skip_invalid {
                    out.skipped.push((line, message));
                    continue;
                }
                return Err(DatasetError::Line { line, message });
            }
        };
        if raw.trim().is_empty() {
            continue;
        }
        match parse_line(raw, tokenizer) {
            Ok(mut ex) => {
                ex.line = line;
                if ex.ids.len() > max_seq_length {
                    ex.ids.truncate(max_seq_length);
                    ex.supervised.truncate(max_seq_length);
                    out.truncated += 1;
                }
                if ex.supervised_tokens() == 0 {
                    let message = "no tokens to train on after truncation (completion or assistant turns empty or cut off)".to_string();
                    if skip_invalid {
                        out.skipped.push((line, message));
                        continue;
                    }
                    return Err(DatasetError::Line { line, message });
                }
                out.examples.push(ex);
            }
            Err(message) if skip_invalid => out.skipped.push((line, message)),
            Err(message) => return Err(DatasetError::Line { line, message }),
        }
    }
    if out.truncated > 0 {
        tracing::info!(
            truncated = out.truncated,
            max_seq_length,
            "examples truncated"
        );
    }
    if !out.skipped.is_empty() {
        tracing::warn!(skipped = out.skipped.len(), "invalid dataset lines skipped");
    }
    if out.examples.is_empty() {
        return Err(DatasetError::Empty);
    }
    Ok(out)
}

fn parse_line(raw: &str, tokenizer: &Tokenizer) -> Result<Example, String> {
    let value: serde_json::Value =
        serde_json::from_str(raw).map_err(|e| format!("invalid JSON: {e}"))?;
    let record: Record = serde_json::from_value(value).map_err(|_| {
        "expected {\"text\"}, {\"prompt\", \"completion\"} or {\"messages\": [{\"role\", \"content\"}]}"
            .to_string()
    })?;
    let eos = tokenizer.eos_token().map(|(id, _)| id);
    let encode = |s: &str, special: bool| tokenizer.encode(s, special).map_err(|e| e.to_string());
    let mut ids = Vec::new();
    let mut supervised = Vec::new();
    let mut push = |tokens: Vec<u32>, train: bool| {
        supervised.extend(std::iter::repeat_n(train, tokens.len()));
        ids.extend(tokens);
    };
    match record {
        Record::Text { text } => {
            if text.trim().is_empty() {
                return Err("`text` is empty".into());
            }
            push(encode(&text, true)?, true);
            push(eos.into_iter().collect(), true);
        }
        Record::Completion { prompt, completion } => {
            if completion.trim().is_empty() {
                return Err("`completion` is empty".into());
            }
            push(encode(&prompt, true)?, false);
            push(encode(&completion, false)?, true);
            push(eos.into_iter().collect(), true);
        }
        Record::Chat { messages, tools } => {
            let messages: Vec<ChatMessage> = messages
                .into_iter()
                .enumerate()
                .map(|(i, m)| m.into_message(i))
                .collect();
            let tools: Vec<ToolFunction> = tools
                .into_iter()
                .map(|t| match t {
                    LineTool::Wrapped { function } | LineTool::Bare(function) => function,
                })
                .collect();
            if messages.is_empty() {
                return Err("`messages` is empty".into());
            }
            if !messages.iter().any(|m| m.role == "assistant") {
                return Err("`messages` has no assistant turn to train on".into());
            }
            let render = |n: usize, gen: bool| {
                tokenizer
                    .apply_chat_template_with_tools(&messages[..n], &tools, gen)
                    .map_err(|e| e.to_string())
            };
            // Each turn is the text its message adds to the rendering; an assistant turn splits into
            // the header the generation prompt adds (not trained) and the reply (trained).
            let mut done = String::new();
            for (i, message) in messages.iter().enumerate() {
                let full = render(i + 1, false)?;
                let Some(added) = full.strip_prefix(done.as_str()) else {
                    return Err(
                        "the chat template does not render turns as a growing prefix".into(),
                    );
                };
                if message.role == "assistant" {
                    let header_text = render(i, true)?;
                    let header = header_text.strip_prefix(done.as_str()).unwrap_or("");
                    let reply = added.strip_prefix(header).unwrap_or(added);
                    push(encode(header, false)?, false);
                    let mut reply_ids = encode(reply, false)?;
                    if let Some(eos) = eos {
                        if !reply_ids.contains(&eos) {
                            reply_ids.push(eos);
                        }
                    }
                    push(reply_ids, true);
                } else {
                    push(encode(added, false)?, false);
                }
                done = full;
            }
        }
    }
    Ok(Example {
        ids,
        supervised,
        line: 0,
    })
}

/// Splits off the last `fraction` of the examples (after a seeded shuffle) for evaluation.
pub fn split_eval(
    mut examples: Vec<Example>,
    fraction: f64,
    seed: u64,
) -> (Vec<Example>, Vec<Example>) {
    if fraction <= 0.0 || examples.len() < 2 {
        return (examples, Vec::new());
    }
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0xe7a1);
    examples.shuffle(&mut rng);
    let n_eval = ((examples.len() as f64 * fraction).round() as usize).clamp(1, examples.len() - 1);
    let eval = examples.split_off(examples.len() - n_eval);
    (examples, eval)
}
