//! Structured outputs: a grammar a sequence's tokens must follow (any JSON object, a JSON schema,
//! a regular expression, one of a list of strings, or a Lark grammar), enforced while decoding by
//! masking each step's logits with `llguidance` (the engine llama.cpp, vLLM and SGLang use).
//!
//! [`Grammars`] is per model: the tokenizer's vocabulary as bytes (a token trie), the parser
//! factory, and a bounded cache of compiled grammars keyed by the constraint's text, so a schema
//! sent again is not compiled again. Compiling runs on its own thread with a deadline: a schema
//! that does not compile, or not in time, is a [`ConstraintError`] naming `response_format`, and
//! no schema can stall the engine thread. Each sequence gets a [`Matcher`] (a clone of the
//! compiled parser): the scheduler asks it for the allowed tokens before a step (on a helper
//! thread, while the forward runs) and feeds it the sampled token after.

use std::collections::{HashMap, VecDeque};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory, TokenParser};
use serde::{Deserialize, Serialize};

use crate::tokenizer::Tokenizer;

/// What a sequence's output must match. Travels with the sampling parameters (also to workers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Constraint {
    /// Any JSON object (OpenAI's `{"type": "json_object"}`).
    JsonObject,
    /// A JSON value valid against `schema` (OpenAI's `json_schema`).
    JsonSchema { schema: serde_json::Value },
    /// The whole output matches this regular expression (vLLM's `guided_regex`).
    Regex { pattern: String },
    /// The output is exactly one of these strings (vLLM's `guided_choice`).
    Choice { choices: Vec<String> },
    /// The output follows this Lark grammar (vLLM's `guided_grammar`, llguidance's dialect).
    Grammar { lark: String },
}

/// The largest constraint text (schema, pattern, grammar, choices) accepted.
pub const MAX_CONSTRAINT_BYTES: usize = 256 * 1024;
/// The most choices of a `Choice`.
pub const MAX_CHOICES: usize = 4096;
/// How long a grammar may take to compile.
pub const COMPILE_DEADLINE: Duration = Duration::from_secs(5);
/// Compiled grammars kept per model.
const CACHE_ENTRIES: usize = 64;

/// A constraint that cannot be used; `field` is the request field to name.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ConstraintError {
    pub message: String,
}

impl ConstraintError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

impl Constraint {
    /// The checks that need no compiler: sizes, empty values, a schema that is not an object.
    pub fn check(&self) -> Result<(), ConstraintError> {
        let size = match self {
            Constraint::JsonObject => 0,
            Constraint::JsonSchema { schema } => schema.to_string().len(),
            Constraint::Regex { pattern } => pattern.len(),
            Constraint::Choice { choices } => choices.iter().map(String::len).sum(),
            Constraint::Grammar { lark } => lark.len(),
        };
        if size > MAX_CONSTRAINT_BYTES {
            return Err(ConstraintError::new(format!(
                "the constraint is {size} bytes; at most {MAX_CONSTRAINT_BYTES}"
            )));
        }
        match self {
            Constraint::JsonSchema { schema } if !schema.is_object() => {
                Err(ConstraintError::new("a JSON schema is an object"))
            }
            Constraint::Regex { pattern } if pattern.is_empty() => {
                Err(ConstraintError::new("the pattern is empty"))
            }
            Constraint::Grammar { lark } if lark.trim().is_empty() => {
                Err(ConstraintError::new("the grammar is empty"))
            }
            Constraint::Choice { choices } if choices.is_empty() || choices.len() > MAX_CHOICES => {
                Err(ConstraintError::new(format!(
                    "give 1 to {MAX_CHOICES} choices, got {}",
                    choices.len()
                )))
            }
            Constraint::Choice { choices } if choices.iter().any(String::is_empty) => {
                Err(ConstraintError::new("choices must not be empty strings"))
            }
            _ => Ok(()),
        }
    }

    /// The grammar llguidance compiles, after [`Constraint::check`].
    fn grammar(&self) -> Result<TopLevelGrammar, ConstraintError> {
        self.check()?;
        Ok(match self {
            Constraint::JsonObject => {
                TopLevelGrammar::from_json_schema(compact(serde_json::json!({"type": "object"})))
            }
            Constraint::JsonSchema { schema } => {
                TopLevelGrammar::from_json_schema(compact(schema.clone()))
            }
            Constraint::Regex { pattern } => TopLevelGrammar::from_regex(pattern),
            Constraint::Choice { choices } => {
                let alternatives: Vec<String> = choices.iter().map(|c| escape_regex(c)).collect();
                TopLevelGrammar::from_regex(&format!("({})", alternatives.join("|")))
            }
            Constraint::Grammar { lark } => TopLevelGrammar::from_lark(lark.clone()),
        })
    }

    /// The cache key: the constraint's canonical JSON text.
    fn key(&self) -> String {
        serde_json::to_string(self).expect("a constraint serialises")
    }
}

/// The schema with JSON written as `json.dumps` writes it (`", "` and `": "`, no other
/// whitespace) unless it says otherwise (llguidance's `x-guidance` options): free whitespace lets
/// a sampled row wander in blank lines until `max_tokens`.
fn compact(mut schema: serde_json::Value) -> serde_json::Value {
    if schema.get("x-guidance").is_none() {
        llguidance::JsonCompileOptions {
            item_separator: ", ".into(),
            key_separator: ": ".into(),
            whitespace_flexible: false,
            ..Default::default()
        }
        .apply_to(&mut schema);
    }
    schema
}

/// `text` as a regular expression matching exactly it.
fn escape_regex(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    for c in text.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The model's vocabulary as llguidance sees it: every token's bytes in a trie, and the
/// tokenizer for the byte strings the trie alone does not split canonically.
struct TokenizerBytes {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for TokenizerBytes {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.tokenizer.encode(text, false).unwrap_or_default()
        })
    }
}

/// One model's grammar compiler and its cache of compiled grammars.
pub struct Grammars {
    factory: Arc<ParserFactory>,
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    parsers: HashMap<String, TokenParser>,
    order: VecDeque<String>,
}

impl Grammars {
    /// Builds the token trie of `tokenizer` for a model whose logits have `vocab_size` columns
    /// (ids past the tokenizer's are never allowed). The model's end tokens end a grammar.
    pub fn new(tokenizer: Arc<Tokenizer>, vocab_size: usize) -> Result<Self, ConstraintError> {
        let unavailable = |why: String| {
            ConstraintError::new(format!(
                "structured outputs are unavailable for this model's tokenizer: {why}"
            ))
        };
        let json = tokenizer
            .to_json()
            .map_err(|e| unavailable(e.to_string()))?;
        // llguidance asserts on vocabularies it does not know: a panic here is a refusal.
        let bytes = std::panic::catch_unwind(|| llguidance::token_bytes_from_tokenizer_json(&json))
            .map_err(|p| unavailable(crate::engine::panic_message(p.as_ref())))?
            .map_err(|e| unavailable(e.to_string()))?;
        let mut words = bytes;
        if words.len() > vocab_size {
            return Err(unavailable(format!(
                "the tokenizer has {} tokens, the model {vocab_size}",
                words.len()
            )));
        }
        // Ids the tokenizer lacks (padding of the embedding) are special tokens no text matches.
        for (id, w) in words.iter_mut().enumerate() {
            if w.is_empty() {
                *w = format!(".<[{id}]>").into_bytes();
                w[0] = TokTrie::SPECIAL_TOKEN_MARKER;
            }
        }
        while words.len() < vocab_size {
            let mut w = format!(".<[{}]>", words.len()).into_bytes();
            w[0] = TokTrie::SPECIAL_TOKEN_MARKER;
            words.push(w);
        }
        let stops: Vec<u32> = tokenizer
            .stop_token_ids()
            .iter()
            .copied()
            .filter(|&t| (t as usize) < vocab_size)
            .collect();
        let Some(&eos) = stops.first() else {
            return Err(unavailable("the model has no end token".into()));
        };
        let info = TokRxInfo::new(vocab_size as u32, eos);
        let mut trie = TokTrie::from(&info, &words);
        if stops.len() > 1 {
            trie = trie.with_eos_tokens(&stops);
        }
        let env: TokEnv = Arc::new(TokenizerBytes { trie, tokenizer });
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| unavailable(e.to_string()))?;
        factory.quiet();
        Ok(Self {
            factory: Arc::new(factory),
            cache: Mutex::new(Cache::default()),
        })
    }

    /// A matcher for one sequence under `constraint`: from the cache, or compiled (within
    /// [`COMPILE_DEADLINE`], on a thread of its own).
    pub fn matcher(&self, constraint: &Constraint) -> Result<Matcher, ConstraintError> {
        let key = constraint.key();
        if let Some(parser) = self.cache.lock().expect("grammar cache").parsers.get(&key) {
            return Ok(Matcher::new(Ok(parser.clone())));
        }
        let grammar = constraint.grammar()?;
        let factory = self.factory.clone();
        let (tx, rx) = mpsc::channel();
        // A deep schema recurses in the compiler: a large stack, and a deadline on the wait.
        std::thread::Builder::new()
            .name("tessera-grammar".into())
            .stack_size(64 << 20)
            .spawn(move || {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    factory.create_parser(grammar).map_err(|e| e.to_string())
                }))
                .unwrap_or_else(|p| Err(crate::engine::panic_message(p.as_ref())));
                let _ = tx.send(result);
            })
            .map_err(|e| ConstraintError::new(format!("starting the grammar compiler: {e}")))?;
        let parser = match rx.recv_timeout(COMPILE_DEADLINE) {
            Ok(Ok(parser)) => parser,
            Ok(Err(e)) => return Err(ConstraintError::new(first_line(&e))),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(ConstraintError::new(format!(
                    "the grammar did not compile within {} s; simplify it",
                    COMPILE_DEADLINE.as_secs()
                )))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(ConstraintError::new("the grammar compiler failed"))
            }
        };
        let mut matcher = Matcher::new(Ok(parser.clone()));
        // A grammar that compiles but admits nothing at its start fails here, not mid-decode.
        let first = matcher
            .compute_mask()
            .map_err(|e| ConstraintError::new(first_line(&e.to_string())))?;
        if first.is_zero() {
            return Err(ConstraintError::new("the grammar allows no output"));
        }
        let mut cache = self.cache.lock().expect("grammar cache");
        if cache.parsers.insert(key.clone(), parser).is_none() {
            cache.order.push_back(key);
            while cache.order.len() > CACHE_ENTRIES {
                let old = cache.order.pop_front().expect("non-empty");
                cache.parsers.remove(&old);
            }
        }
        Ok(matcher)
    }
}

/// llguidance's errors can carry the whole grammar and parser state: keep the first lines that
/// say what is wrong, at most 500 bytes.
fn first_line(e: &str) -> String {
    let mut line = e
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    if line.len() > 500 {
        let mut cut = 500;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push('…');
    }
    line
}

/// A sequence's grammar state.
pub struct GrammarState {
    matcher: Matcher,
}

impl GrammarState {
    pub fn new(matcher: Matcher) -> Self {
        Self { matcher }
    }

    /// The tokens allowed next (a bitset over the vocabulary), or why there are none.
    pub fn allowed(&mut self) -> Result<SimpleVob, String> {
        let mask = self
            .matcher
            .compute_mask()
            .map_err(|e| first_line(&e.to_string()))?;
        if mask.is_zero() {
            return Err("the grammar allows no token here".into());
        }
        Ok(mask)
    }

    /// Feeds the sampled token.
    pub fn advance(&mut self, token: u32) -> Result<(), String> {
        self.matcher
            .consume_token(token)
            .map_err(|e| first_line(&e.to_string()))
    }

    /// The grammar is complete and allows nothing more.
    pub fn is_done(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_are_escaped_as_literals() {
        assert_eq!(escape_regex("a.b"), "a\\.b");
        assert_eq!(escape_regex("(x|y)*"), "\\(x\\|y\\)\\*");
        assert_eq!(escape_regex("plain text"), "plain text");
    }

    #[test]
    fn constraints_round_trip_and_have_stable_keys() {
        let c = Constraint::JsonSchema {
            schema: serde_json::json!({"type": "object", "properties": {"a": {"type": "integer"}}}),
        };
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Constraint>(&text).unwrap(), c);
        assert_eq!(c.key(), c.clone().key());
        let too_big = Constraint::Regex {
            pattern: "a".repeat(MAX_CONSTRAINT_BYTES + 1),
        };
        assert!(too_big.grammar().is_err());
        assert!(Constraint::Choice { choices: vec![] }.grammar().is_err());
    }
}
