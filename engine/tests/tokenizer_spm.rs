//! SentencePiece (`tokenizer.ggml.model = "llama"`) vocabularies from GGUF, the tokenizer of
//! Llama 2, Mistral and TinyLlama files: a vocabulary written by the test (scored pieces, byte
//! tokens, control tokens, no merges) gives the ids and the text transformers gives from the same
//! file (its GGUF tokenizer conversion), for words, spaces, accents through byte fallback, digits
//! and special tokens.

use std::path::Path;
use std::process::Command;

use tessera_engine::gguf::{GgufFile, Value};
use tessera_engine::gguf_writer::GgufWriter;
use tessera_engine::tokenizer::Tokenizer;

const TEXTS: &[&str] = &[
    "hello world",
    "the and on",
    " the  hello",
    "héllo wörld 42",
    "and<s>the",
    "world▁hello",
    "",
];

fn write_vocab(path: &Path) {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    let pieces = [
        "▁", "t", "h", "e", "a", "n", "d", "o", "r", "s", "▁t", "he", "▁the", "an", "▁a", "nd",
        "▁and", "er", "▁o", "or", "on", "▁on", "s▁", "▁h", "ll", "o▁", "▁w", "w", "l", "▁wor",
        "ld", "▁world", "▁hello", "hello", "el", "lo", "▁he", "▁hel", "▁hell", "4", "2",
    ];
    let first_piece = tokens.len();
    tokens.extend(pieces.iter().map(|p| p.to_string()));
    let scores: Vec<Value> = (0..tokens.len())
        .map(|i| {
            Value::F32(if i < first_piece {
                0.0
            } else {
                -((i - first_piece) as f32)
            })
        })
        .collect();
    let types: Vec<Value> = (0..tokens.len())
        .map(|i| {
            Value::I32(match i {
                0 => 2,
                1 | 2 => 3,
                i if i < first_piece => 6,
                _ => 1,
            })
        })
        .collect();
    let mut w = GgufWriter::new();
    let u32v = Value::U32;
    w.metadata("general.architecture", Value::String("llama".into()))
        .metadata("llama.context_length", u32v(64))
        .metadata("llama.embedding_length", u32v(16))
        .metadata("llama.block_count", u32v(1))
        .metadata("llama.feed_forward_length", u32v(32))
        .metadata("llama.attention.head_count", u32v(2))
        .metadata("tokenizer.ggml.model", Value::String("llama".into()))
        .metadata(
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().cloned().map(Value::String).collect()),
        )
        .metadata("tokenizer.ggml.scores", Value::Array(scores))
        .metadata("tokenizer.ggml.token_type", Value::Array(types))
        .metadata("tokenizer.ggml.bos_token_id", u32v(1))
        .metadata("tokenizer.ggml.eos_token_id", u32v(2))
        .metadata("tokenizer.ggml.unknown_token_id", u32v(0));
    w.f32_tensor(
        "token_embd.weight",
        &[tokens.len(), 16],
        &vec![0.0; tokens.len() * 16],
    );
    w.write(path).unwrap();
}

/// transformers' ids and decoded text of each of `TEXTS` (`None` when transformers is missing).
fn transformers(dir: &Path) -> Option<Vec<(Vec<u32>, String)>> {
    let python = std::env::var("TESSERA_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = r#"
import json, sys
from transformers import AutoTokenizer
t = AutoTokenizer.from_pretrained(sys.argv[1], gguf_file="tok.gguf")
texts = json.loads(sys.argv[2])
print(json.dumps([[t(s)["input_ids"], t.decode(t(s)["input_ids"], skip_special_tokens=True)] for s in texts]))
"#;
    let out = Command::new(&python)
        .args([
            "-c",
            script,
            dir.to_str().unwrap(),
            &serde_json::to_string(TEXTS).unwrap(),
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            std::env::var("TESSERA_REQUIRE_TRANSFORMERS").is_err(),
            "transformers is required (TESSERA_REQUIRE_TRANSFORMERS) but failed: {why}"
        );
        eprintln!("skipping the comparison with transformers: {why}");
        return None;
    }
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

#[test]
fn a_sentencepiece_gguf_vocabulary_tokenizes_like_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tok.gguf");
    write_vocab(&path);
    let tokenizer = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    // Without transformers, the round trip and the structure still hold.
    for text in TEXTS {
        let ids = tokenizer.encode(text, true).unwrap();
        assert_eq!(ids.first(), Some(&1), "BOS first: {text:?} -> {ids:?}");
    }
    let ids = tokenizer.encode("héllo", false).unwrap();
    assert!(
        ids.iter().any(|&id| (3..259).contains(&id)),
        "é falls back to byte tokens: {ids:?}"
    );
    let Some(expected) = transformers(dir.path()) else {
        return;
    };
    for (text, (want_ids, want_text)) in TEXTS.iter().zip(expected) {
        let ids = tokenizer.encode(text, true).unwrap();
        assert_eq!(ids, want_ids, "ids of {text:?}");

        assert_eq!(
            tokenizer.decode(&ids, true).unwrap(),
            want_text,
            "text of {text:?}"
        );
    }
}
