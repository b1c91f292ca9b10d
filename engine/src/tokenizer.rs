//! Text ↔ token ids with the `tokenizers` crate: from a Hugging Face `tokenizer.json`, or built from a
//! GGUF file's `tokenizer.ggml.*` metadata (GPT-2 style byte-level BPE) by writing the equivalent
//! `tokenizer.json`. Also the model's special tokens, chat template and a streaming decoder.

use std::path::{Path, PathBuf};

use serde_json::{json, Value as Json};

use crate::chat_template::{ChatMessage, ChatTemplate, ChatTemplateError};
use crate::gguf::{GgufError, GgufFile, Value};

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("GGUF tokenizer: `{key}` {message}")]
    GgufKey { key: String, message: String },
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("tokenizer: {0}")]
    Tokenizers(String),
    #[error(transparent)]
    ChatTemplate(#[from] ChatTemplateError),
}

/// A tokenizer with the model's special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<(u32, String)>,
    eos: Option<(u32, String)>,
    /// Ids that end generation (the eos token and any the model config adds).
    stop_ids: Vec<u32>,
    /// Prepend `bos` when special tokens are asked for (GGUF `tokenizer.ggml.add_bos_token`);
    /// Hugging Face tokenizers do this through their own post-processor instead.
    add_bos: bool,
    chat_template: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("stop_ids", &self.stop_ids)
            .finish()
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` of a Hugging Face model directory, with `bos_token`, `eos_token` and the
    /// chat template from `tokenizer_config.json` (or `chat_template.jinja`). `extra_stop_ids` are
    /// the `eos_token_id`s of `config.json`.
    pub fn from_hf_dir(dir: &Path, extra_stop_ids: &[u32]) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        let inner =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| TokenizerError::Invalid {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Json = if config_path.exists() {
            let text = read(&config_path)?;
            serde_json::from_str(&text).map_err(|e| TokenizerError::Invalid {
                path: config_path.clone(),
                message: e.to_string(),
            })?
        } else {
            json!({})
        };
        let token_of = |key: &str| -> Option<(u32, String)> {
            let v = config.get(key)?;
            let text = v.as_str().or_else(|| v.get("content")?.as_str())?;
            Some((inner.token_to_id(text)?, text.to_string()))
        };
        let (bos, eos) = (token_of("bos_token"), token_of("eos_token"));
        let jinja = dir.join("chat_template.jinja");
        let template = if jinja.exists() {
            Some(read(&jinja)?)
        } else {
            match config.get("chat_template") {
                Some(Json::String(s)) => Some(s.clone()),
                // A list of named templates: take "default".
                Some(Json::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
                _ => None,
            }
        };
        Self::assemble(inner, bos, eos, extra_stop_ids, false, template)
    }

    /// Builds the tokenizer from a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, TokenizerError> {
        let model = g.get_str("tokenizer.ggml.model")?;
        let tokens = strings(g, "tokenizer.ggml.tokens")?;
        let types: Vec<u64> = match g.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .as_array()
                .unwrap_or_default()
                .iter()
                .map(|t| t.as_u64().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        // Control (3) and user-defined (4) tokens are matched whole, before the model.
        let added: Vec<Json> = tokens
            .iter()
            .enumerate()
            .filter(|(id, _)| matches!(types.get(*id), Some(3) | Some(4)))
            .map(|(id, t)| {
                json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": types[id] == 3})
            })
            .collect();
        let spec = match model {
            "gpt2" => byte_level_spec(g, &tokens, added)?,
            "llama" => sentencepiece_spec(g, &tokens, added)?,
            other => {
                return Err(TokenizerError::GgufKey {
                    key: "tokenizer.ggml.model".into(),
                    message: format!(
                        "is `{other}`; supported from GGUF: `gpt2` (byte-level BPE) and `llama` \
                         (SentencePiece BPE); use the model's Hugging Face directory instead"
                    ),
                })
            }
        };
        let inner: tokenizers::Tokenizer = spec
            .to_string()
            .parse()
            .map_err(|e: tokenizers::Error| TokenizerError::Tokenizers(e.to_string()))?;
        let special = |key: &str| -> Option<(u32, String)> {
            let id = g.get_u64(key).ok()? as u32;
            Some((id, tokens.get(id as usize)?.clone()))
        };
        let bos = special("tokenizer.ggml.bos_token_id");
        let eos = special("tokenizer.ggml.eos_token_id");
        let mut extra = Vec::new();
        if let Some((id, _)) = special("tokenizer.ggml.eot_token_id") {
            extra.push(id);
        }
        // End-of-turn tokens end generation too, found by their text as llama.cpp finds them
        // (Gemma's `<end_of_turn>`, ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`, ...).
        for (id, t) in tokens.iter().enumerate() {
            let control = matches!(types.get(id), Some(3) | Some(4));
            if control && END_OF_TURN.contains(&t.as_str()) && !extra.contains(&(id as u32)) {
                extra.push(id as u32);
            }
        }
        // A SentencePiece vocabulary that does not say gets BOS (llama.cpp and transformers agree).
        let add_bos = g
            .get("tokenizer.ggml.add_bos_token")
            .map(|v| matches!(v, Value::Bool(true)))
            .unwrap_or(model == "llama");
        let arch = g.architecture().unwrap_or_default();
        let template = match g.get("tokenizer.chat_template").and_then(Value::as_str) {
            Some(t) => Some(t.to_string()),
            None => crate::chat_template::family_default(arch).map(|t| {
                tracing::info!(architecture = %arch, "the GGUF file has no chat template: using the family's format");
                t.to_string()
            }),
        };
        Self::assemble(inner, bos, eos, &extra, add_bos, template)
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        bos: Option<(u32, String)>,
        eos: Option<(u32, String)>,
        extra_stop_ids: &[u32],
        add_bos: bool,
        template: Option<String>,
    ) -> Result<Self, TokenizerError> {
        let mut stop_ids: Vec<u32> = eos.iter().map(|(id, _)| *id).collect();
        for id in extra_stop_ids {
            if !stop_ids.contains(id) {
                stop_ids.push(*id);
            }
        }
        let name =
            |t: &Option<(u32, String)>| t.as_ref().map(|(_, s)| s.clone()).unwrap_or_default();
        let chat_template = template
            .map(|src| ChatTemplate::new(&src, &name(&bos), &name(&eos)))
            .transpose()?;
        Ok(Self {
            inner,
            bos,
            eos,
            stop_ids,
            add_bos,
            chat_template,
        })
    }

    /// Token ids of `text`; with `add_special_tokens` the model's own prefix (bos) is added.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special_tokens && self.add_bos {
            if let Some((bos, _)) = &self.bos {
                ids.push(*bos);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))
    }

    /// Renders `messages` with the model's chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        Ok(self.template()?.render(messages, add_generation_prompt)?)
    }

    /// Renders `messages` offering `tools` (see [`ChatTemplate::render_with_tools`]).
    pub fn apply_chat_template_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[crate::tool_calls::ToolFunction],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        Ok(self
            .template()?
            .render_with_tools(messages, tools, add_generation_prompt)?)
    }

    fn template(&self) -> Result<&ChatTemplate, ChatTemplateError> {
        self.chat_template
            .as_ref()
            .ok_or(ChatTemplateError::Missing)
    }

    /// How the model's family writes tool calls (Hermes without a chat template).
    pub fn tool_format(&self) -> crate::tool_calls::ToolFormat {
        self.chat_template.as_ref().map_or(
            crate::tool_calls::ToolFormat::Hermes,
            ChatTemplate::tool_format,
        )
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_token(&self) -> Option<(u32, &str)> {
        self.bos.as_ref().map(|(id, s)| (*id, s.as_str()))
    }

    pub fn eos_token(&self) -> Option<(u32, &str)> {
        self.eos.as_ref().map(|(id, s)| (*id, s.as_str()))
    }

    /// Ids that end generation unless the request says otherwise.
    pub fn stop_token_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The tokenizer as Hugging Face's `tokenizer.json` (for GGUF models: the one built from the
    /// file's metadata).
    pub fn to_json(&self) -> Result<Json, TokenizerError> {
        let text = self
            .inner
            .to_string(false)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| TokenizerError::Tokenizers(e.to_string()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// Turns a stream of token ids into text pieces that never split a UTF-8 character, by decoding a
/// short window of ids and emitting only what the newest id added (as TGI and vLLM do).
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

/// Prompt tokens kept as left context, so that pieces get their leading spaces right.
const CONTEXT_TOKENS: usize = 5;

impl IncrementalDecoder {
    pub fn new(prompt: &[u32], skip_special_tokens: bool) -> Self {
        let ids = prompt[prompt.len().saturating_sub(CONTEXT_TOKENS)..].to_vec();
        Self {
            read_offset: ids.len(),
            ids,
            prefix_offset: 0,
            skip_special_tokens,
        }
    }

    /// Adds a token; returns the text it completes (empty while a character is incomplete).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let skip = self.skip_special_tokens;
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], skip)?;
        let text = tokenizer.decode(&self.ids[self.prefix_offset..], skip)?;
        if text.len() > prefix.len() && !text.ends_with('\u{FFFD}') {
            let piece = match text.get(prefix.len()..) {
                Some(p) if text.starts_with(&prefix) => p.to_string(),
                _ => text[common_prefix(&text, &prefix)..].to_string(),
            };
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            // Keep the window short: only the ids from prefix_offset on are decoded again.
            if self.prefix_offset > 64 {
                self.ids.drain(..self.prefix_offset);
                self.read_offset -= self.prefix_offset;
                self.prefix_offset = 0;
            }
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// The text still held back (an incomplete character at the very end comes out as U+FFFD).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String, TokenizerError> {
        if self.read_offset == self.ids.len() {
            return Ok(String::new());
        }
        let skip = self.skip_special_tokens;
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], skip)?;
        let text = tokenizer.decode(&self.ids[self.prefix_offset..], skip)?;
        self.read_offset = self.ids.len();
        Ok(text[common_prefix(&text, &prefix)..].to_string())
    }
}

fn common_prefix(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map(|((i, _), _)| i)
        .unwrap_or_else(|| a.len().min(b.len()))
}

const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Texts of end-of-turn tokens that end generation when a GGUF vocabulary marks them control or
/// user-defined (llama.cpp's list).
const END_OF_TURN: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<EOT>",
    "<|end_of_text|>",
];

/// Qwen2's (and Qwen3's) split: Llama 3's with single digits.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn read(path: &Path) -> Result<String, TokenizerError> {
    crate::regular_file::read_to_string(path, Some(crate::regular_file::MAX_JSON_BYTES)).map_err(
        |source| TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        },
    )
}

/// `tokenizer.json` of a GGUF `gpt2` vocabulary: byte-level BPE with the file's merges and
/// pre-tokenizer.
fn byte_level_spec(
    g: &GgufFile,
    tokens: &[String],
    added: Vec<Json>,
) -> Result<Json, TokenizerError> {
    let merges = strings(g, "tokenizer.ggml.merges")?;
    let pre = g
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre_tokenizer = match pre {
        "default" | "gpt2" => byte_level,
        // SmolLM: single digits split off before byte-level BPE.
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level]}),
        "llama-bpe" | "llama3" | "llama-v3" => split_then_bytes(LLAMA3_PATTERN),
        // Qwen2, Qwen2.5 and Qwen3 (`Qwen2Tokenizer`'s split: single digits).
        "qwen2" | "deepseek-r1-qwen" => split_then_bytes(QWEN2_PATTERN),
        other => {
            return Err(TokenizerError::GgufKey {
                key: "tokenizer.ggml.pre".into(),
                message: format!(
                "is `{other}`; supported pre-tokenizers: default, gpt2, smollm, llama-bpe, qwen2"
            ),
            })
        }
    };
    let vocab = vocab_map(tokens);
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    }))
}

/// A split by `pattern` (isolated), then byte-level encoding without its own regex.
fn split_then_bytes(pattern: &str) -> Json {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]})
}

/// `tokenizer.json` of a GGUF `llama` (SentencePiece) vocabulary, as transformers builds it from
/// the same file (`LlamaTokenizer`): BPE over `▁`-spaced text with byte fallback (`<0x41>`), the
/// merges the file lists or, as usual, the ones its scores imply ([`merges_from_scores`]), a
/// `▁` prepended to the first word unless `tokenizer.ggml.add_space_prefix` is false. Two
/// families differ, as in transformers' GGUF conversion: Gemma files store a token of several
/// spaces as spaces (respelled `▁▁…`) and rank merges by file position, not score; Phi-3
/// prepends `▁` to the whole text (a normalizer) rather than to the first word.
fn sentencepiece_spec(
    g: &GgufFile,
    tokens: &[String],
    added: Vec<Json>,
) -> Result<Json, TokenizerError> {
    let arch = g.architecture().unwrap_or("llama");
    let gemma = arch.starts_with("gemma");
    let respelled: Vec<String>;
    let tokens = if gemma {
        respelled = tokens
            .iter()
            .map(|t| {
                if t.contains(' ') && t.trim().is_empty() {
                    "\u{2581}".repeat(t.chars().count())
                } else {
                    t.clone()
                }
            })
            .collect();
        &respelled[..]
    } else {
        tokens
    };
    let merges: Vec<Json> = match g.get("tokenizer.ggml.merges") {
        Some(_) => strings(g, "tokenizer.ggml.merges")?
            .into_iter()
            .map(Json::String)
            .collect(),
        None => {
            let scores: Vec<f64> = if gemma {
                (0..tokens.len()).map(|i| -(i as f64)).collect()
            } else {
                g.get_array("tokenizer.ggml.scores")?
                    .iter()
                    .map(|v| v.as_f64().unwrap_or(0.0))
                    .collect()
            };
            merges_from_scores(tokens, &scores)
                .into_iter()
                .map(|(l, r)| json!([l, r]))
                .collect()
        }
    };
    let unk = g
        .get_u64("tokenizer.ggml.unknown_token_id")
        .ok()
        .and_then(|id| tokens.get(id as usize).cloned())
        .unwrap_or_else(|| "<unk>".into());
    let prefix = g
        .get("tokenizer.ggml.add_space_prefix")
        .map(|v| !matches!(v, Value::Bool(false)))
        .unwrap_or(true);
    let vocab = vocab_map(tokens);
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    let (normalizer, pre_tokenizer) = if arch == "phi3" {
        (
            json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u{2581}"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]}),
            Json::Null,
        )
    } else {
        (
            Json::Null,
            json!({"type": "Metaspace", "replacement": "\u{2581}",
                   "prepend_scheme": if prefix { "first" } else { "never" }, "split": false}),
        )
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    }))
}

/// A vocabulary as `tokenizer.json` spells it: token → id.
fn vocab_map(tokens: &[String]) -> serde_json::Map<String, Json> {
    tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), json!(id)))
        .collect()
}

/// The merges a SentencePiece vocabulary implies (transformers' `generate_merges` with scores):
/// every split of a piece into two pieces of the vocabulary, ranked by the piece's score (best
/// first, then longer left and right parts), ties kept in vocabulary order.
pub fn merges_from_scores(tokens: &[String], scores: &[f64]) -> Vec<(String, String)> {
    let ids: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    // Python's dict keeps the last id of a repeated token; so does this map's insert order.
    let mut merges: Vec<(usize, usize, f64)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, piece) in tokens.iter().enumerate() {
        if !seen.insert(piece.as_str()) {
            continue;
        }
        let score = scores.get(i).copied().unwrap_or(0.0);
        let mut local: Vec<(usize, usize, f64)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (l, r) = piece.split_at(at);
                Some((*ids.get(l)?, *ids.get(r)?, score))
            })
            .collect();
        local.sort_by_key(|&(l, r, _)| (l, r));
        merges.extend(local);
    }
    let chars = |id: usize| tokens[id].chars().count();
    merges.sort_by(|a, b| {
        b.2.partial_cmp(&a.2)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| chars(b.0).cmp(&chars(a.0)))
            .then_with(|| chars(b.1).cmp(&chars(a.1)))
    });
    merges
        .into_iter()
        .map(|(l, r, _)| (tokens[l].clone(), tokens[r].clone()))
        .collect()
}

fn strings(g: &GgufFile, key: &str) -> Result<Vec<String>, TokenizerError> {
    g.get_array(key)?
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| TokenizerError::GgufKey {
                    key: key.to_string(),
                    message: format!("holds a {}, expected strings", v.type_name()),
                })
        })
        .collect()
}
