//! The tiny test model exported as GGUF, the way llama.cpp's converter writes it, in float32 or
//! with quantised tensors.

use std::path::Path;

use tessera_engine::gguf::Value;
use tessera_engine::gguf_writer::{GgufWriter, RawTensor};
use tessera_engine::weights::read_safetensors;

use super::tiny;

/// Writes the tiny model of `dir` as a GGUF file the way llama.cpp's converter does (names, reversed
/// dimensions, Q/K rows permuted for interleaved RoPE). `other_type` gives one tensor another ggml
/// type: 9 (Q8_1, which Tessera does not dequantise) or 12 (Q4_K, random blocks with sane scales);
/// 8 writes every projection as Q8_0, 2 every projection as Q4_0 and the embedding and `lm_head`
/// as Q8_0 (an Ollama-style file: all of it kept compact when packed), their values quantised; 0
/// as 2 but layer 0's `attn_v` left float32 (so its q|k|v are held as one float matrix).
pub fn write_gguf(dir: &Path, out: &Path, other_type: Option<u32>) {
    let tensors = read_safetensors(&dir.join("model.safetensors")).unwrap();
    let mut w = GgufWriter::new();
    let u32v = |v: i64| Value::U32(v as u32);
    w.metadata("general.architecture", Value::String("llama".into()))
        .metadata("llama.embedding_length", u32v(tiny::HIDDEN))
        .metadata("llama.feed_forward_length", u32v(tiny::INTER))
        .metadata("llama.block_count", u32v(tiny::LAYERS))
        .metadata("llama.attention.head_count", u32v(tiny::HEADS))
        .metadata("llama.attention.head_count_kv", u32v(tiny::KV_HEADS))
        .metadata("llama.attention.key_length", u32v(tiny::HEAD_DIM))
        .metadata("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5))
        .metadata("llama.rope.freq_base", Value::F32(10000.0))
        .metadata("llama.context_length", u32v(512))
        .metadata("tokenizer.ggml.model", Value::String("gpt2".into()));
    let hf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let mut vocab: Vec<(String, u64)> = hf["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect();
    vocab.sort_by_key(|(_, id)| *id);
    let mut tokens: Vec<Value> = vocab.into_iter().map(|(t, _)| Value::String(t)).collect();
    while tokens.len() < tiny::VOCAB as usize {
        tokens.push(Value::String(format!("<pad{}>", tokens.len())));
    }
    let types: Vec<Value> = (0..tokens.len())
        .map(|i| Value::I32(if i >= 256 { 3 } else { 1 }))
        .collect();
    w.metadata("tokenizer.ggml.tokens", Value::Array(tokens))
        .metadata("tokenizer.ggml.token_type", Value::Array(types))
        .metadata("tokenizer.ggml.merges", Value::Array(vec![]))
        .metadata("tokenizer.ggml.bos_token_id", Value::U32(256))
        .metadata("tokenizer.ggml.eos_token_id", Value::U32(tiny::EOS));
    for (name, t) in tensors {
        let gguf_name = gguf_name(&name);
        let mut t = t;
        if name.ends_with("q_proj.weight") || name.ends_with("k_proj.weight") {
            let heads = if name.contains("q_proj") {
                tiny::HEADS
            } else {
                tiny::KV_HEADS
            };
            let (rows, cols) = t.size2().unwrap();
            t = t
                .reshape([heads, 2, rows / heads / 2, cols])
                .transpose(1, 2)
                .reshape([rows, cols]);
        }
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let values: Vec<f32> = t.contiguous().view([-1]).try_into().unwrap();
        let projection = !gguf_name.ends_with("norm.weight") && gguf_name.starts_with("blk.");
        let table = gguf_name == "token_embd.weight" || gguf_name == "output.weight";
        let kept_float = other_type == Some(0) && gguf_name == "blk.0.attn_v.weight";
        let other_type = match other_type {
            Some(0) if kept_float => None,
            Some(0) => Some(2),
            other => other,
        };
        if (other_type == Some(8) && projection) || (other_type == Some(2) && table) {
            w.tensor(RawTensor {
                name: gguf_name,
                shape,
                ggml_type: 8,
                data: q8_0(&values),
            });
        } else if other_type == Some(2) && projection {
            w.tensor(RawTensor {
                name: gguf_name,
                shape,
                ggml_type: 2,
                data: q4_0(&values),
            });
        } else if let (Some(ty), "blk.1.ffn_up.weight") = (other_type, gguf_name.as_str()) {
            let numel = values.len();
            let data = match ty {
                9 => vec![0; numel / 32 * 36],
                12 => (0..numel / 256)
                    .flat_map(|i| {
                        // d and dmin small, then scales and 4-bit values from a fixed pattern.
                        let mut block = vec![0u8; 144];
                        block[..2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
                        block[2..4].copy_from_slice(&half::f16::from_f32(0.005).to_le_bytes());
                        for (j, b) in block[4..].iter_mut().enumerate() {
                            *b = ((i * 31 + j * 17) % 251) as u8;
                        }
                        block
                    })
                    .collect(),
                other => panic!("no writer for ggml type {other}"),
            };
            w.tensor(RawTensor {
                name: gguf_name,
                shape,
                ggml_type: ty,
                data,
            });
        } else {
            w.f32_tensor(&gguf_name, &shape, &values);
        }
    }
    w.write(out).unwrap();
}

/// GGUF's Q8_0 blocks of `values`: a float16 scale `max|x| / 127`, then 32 int8 values.
fn q8_0(values: &[f32]) -> Vec<u8> {
    values
        .chunks(32)
        .flat_map(|xs| {
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = half::f16::from_f32(amax / 127.0);
            let inv = if amax > 0.0 { 1.0 / d.to_f32() } else { 0.0 };
            let mut block = d.to_le_bytes().to_vec();
            block.extend(
                xs.iter()
                    .map(|v| (v * inv).round().clamp(-127.0, 127.0) as i8 as u8),
            );
            block
        })
        .collect()
}

/// GGUF's Q4_0 blocks of `values` (llama.cpp's rounding): a float16 scale `d = x₀ / −8` (`x₀` the
/// value of largest magnitude), then 16 bytes: value `j` in the low nibble of byte `j`, value
/// `16 + j` in its high one, each `q = x/d + 8` in `0..16`.
fn q4_0(values: &[f32]) -> Vec<u8> {
    values
        .chunks(32)
        .flat_map(|xs| {
            let extreme = xs
                .iter()
                .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
            let d = extreme / -8.0;
            let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
            let q = |v: f32| ((v * inv + 8.5) as i32).clamp(0, 15) as u8;
            let mut block = half::f16::from_f32(d).to_le_bytes().to_vec();
            block.extend((0..16).map(|j| q(xs[j]) | (q(xs[16 + j]) << 4)));
            block
        })
        .collect()
}

fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, part) = rest.split_once('.').unwrap();
    let part = match part {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        other => panic!("{other}"),
    };
    format!("blk.{layer}.{part}")
}
