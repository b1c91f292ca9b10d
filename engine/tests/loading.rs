//! Loading models and adapters: a GGUF export of a tiny model gives the logits of its Hugging Face
//! directory (Q/K permutation undone), and corrupt inputs give typed errors that name what is wrong.

mod common;

use std::path::Path;

use common::tiny;
use tch::{Device, Kind, Tensor};
use tessera_engine::dequant::DequantError;
use tessera_engine::gguf::Value;
use tessera_engine::gguf_writer::{GgufWriter, RawTensor};
use tessera_engine::loader::LoadError;
use tessera_engine::lora::{LoraAdapter, LoraError};
use tessera_engine::model::Logits;
use tessera_engine::weights::{read_safetensors, WeightsError};

/// Writes the tiny model of `dir` as a GGUF file the way llama.cpp's converter does (names, reversed
/// dimensions, Q/K rows permuted for interleaved RoPE). `other_type` gives one tensor another ggml
/// type: 6 (Q5_0, which Tessera does not dequantise) or 12 (Q4_K, random blocks with sane scales);
/// 8 writes every projection as Q8_0 (its values quantised).
fn write_gguf(dir: &Path, out: &Path, other_type: Option<u32>) {
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
        if other_type == Some(8) && projection {
            w.tensor(RawTensor {
                name: gguf_name,
                shape,
                ggml_type: 8,
                data: q8_0(&values),
            });
        } else if let (Some(ty), "blk.1.ffn_up.weight") = (other_type, gguf_name.as_str()) {
            let numel = values.len();
            let data = match ty {
                6 => vec![0; numel / 32 * 22],
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

fn prompt_logits(path: &Path) -> Tensor {
    let loaded = tessera_engine::load(path, &[Device::Cpu], Some(Kind::Float)).unwrap();
    let ids: Vec<i64> = loaded
        .tokenizer
        .encode("GGUF or safetensors, 123 the same", false)
        .unwrap()
        .iter()
        .map(|&t| t as i64)
        .collect();
    let mut cache = loaded.model.new_cache(1, ids.len() as i64);
    tch::no_grad(|| {
        loaded.model.forward(
            &Tensor::from_slice(&ids).view([1, -1]),
            &[0],
            &mut cache,
            None,
            Logits::All,
        )
    })
}

#[test]
fn a_gguf_export_gives_the_logits_of_the_hf_directory() {
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny::write_model(&dir.path().join("m"), 4);
    let gguf = dir.path().join("m.gguf");
    write_gguf(&hf, &gguf, None);
    let a = prompt_logits(&hf);
    let b = prompt_logits(&gguf);
    let diff = (&a - &b).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "max |Δlogit| = {diff}");
    // Both files size the same weights without loading them (what a GPU replica checks first).
    let bytes = |p: &Path| tessera_engine::footprint::weight_bytes(p, Kind::BFloat16).unwrap();
    let params = tiny::VOCAB * tiny::HIDDEN * 2
        + tiny::HIDDEN
        + tiny::LAYERS
            * (2 * tiny::HIDDEN
                + tiny::HIDDEN * (tiny::HEADS + 2 * tiny::KV_HEADS) * tiny::HEAD_DIM
                + tiny::HEADS * tiny::HEAD_DIM * tiny::HIDDEN
                + 3 * tiny::HIDDEN * tiny::INTER);
    assert_eq!(bytes(&hf), params as u64 * 2);
    assert_eq!(bytes(&gguf), bytes(&hf));
}

/// Q8_0 projections loaded `packed` stay 8-bit (q/k/v and gate/up fused, Q/K rows unpermuted like
/// the float ones) and give the logits of the same file dequantised: through the integer kernel
/// for a decode-sized prompt and through dequantised blocks for a longer one.
#[test]
fn q8_0_projections_stay_8_bit_when_packed_and_predict_as_dequantised() {
    use tessera_engine::loader::{load_with, Quantization};
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny::write_model(&dir.path().join("m"), 4);
    let gguf = dir.path().join("m.gguf");
    write_gguf(&hf, &gguf, Some(8));
    let load = |q| load_with(&gguf, &[Device::Cpu], Some(Kind::Float), q).unwrap();
    let (dense, packed) = (load(Quantization::Dequantize), load(Quantization::Packed));
    let projections = (tiny::LAYERS * 4) as usize;
    assert!(
        packed
            .weights
            .contains(&format!("{projections}/{projections} projections 8-bit")),
        "{}",
        packed.weights
    );
    let (dense_bytes, none, _) = dense.model.weight_bytes();
    let (packed_bytes, all, _) = packed.model.weight_bytes();
    assert_eq!((none, all), (0, projections));
    assert!(
        packed_bytes * 2 < dense_bytes,
        "{packed_bytes} bytes packed, {dense_bytes} dequantised"
    );
    for len in [7usize, 45] {
        let ids: Vec<i64> = (0..len as i64).map(|i| (i * 37 + 11) % 250).collect();
        let logits = |m: &tessera_engine::model::Llama| {
            let mut cache = m.new_cache(1, len as i64);
            tch::no_grad(|| {
                m.forward(
                    &Tensor::from_slice(&ids).view([1, -1]),
                    &[0],
                    &mut cache,
                    None,
                    Logits::All,
                )
            })
        };
        let (want, got) = (logits(&dense.model), logits(&packed.model));
        let diff = (&got - &want).abs().max().double_value(&[]);
        let scale = want.abs().max().double_value(&[]);
        assert!(
            diff < 1e-3 * scale,
            "{len} tokens: max |Δlogit| {diff} of {scale}"
        );
    }
}

#[test]
fn a_gguf_with_an_unsupported_quant_type_names_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny::write_model(&dir.path().join("m"), 4);
    let gguf = dir.path().join("m.gguf");
    write_gguf(&hf, &gguf, Some(6));
    let err = tessera_engine::load(&gguf, &[Device::Cpu], None)
        .err()
        .expect("Q5_0 refused");
    assert!(
        matches!(
            err,
            LoadError::Weights(WeightsError::Dequant(DequantError::Unsupported { .. }))
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("blk.1.ffn_up.weight"), "{err}");
}

#[test]
fn a_gguf_with_a_k_quant_tensor_loads_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny::write_model(&dir.path().join("m"), 4);
    let gguf = dir.path().join("m.gguf");
    write_gguf(&hf, &gguf, Some(12));
    let logits = prompt_logits(&gguf);
    assert!(
        logits.isfinite().all().int64_value(&[]) == 1,
        "non-finite logits"
    );
    // The Q4_K tensor changed the model: not the same logits as the all-f32 GGUF.
    let f32_gguf = dir.path().join("f32.gguf");
    write_gguf(&hf, &f32_gguf, None);
    let diff = (&logits - &prompt_logits(&f32_gguf))
        .abs()
        .max()
        .double_value(&[]);
    assert!(
        diff > 1e-3,
        "the Q4_K weight was not used (max |Δlogit| = {diff})"
    );
}

#[test]
fn truncated_or_incomplete_safetensors_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny::write_model(&dir.path().join("m"), 4);
    let file = hf.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = tessera_engine::load(&hf, &[Device::Cpu], None)
        .err()
        .unwrap();
    assert!(
        matches!(err, LoadError::Weights(WeightsError::Safetensors { .. })),
        "{err:?}"
    );
    // A file with one tensor missing names it.
    let tensors: Vec<(String, Tensor)> = {
        std::fs::write(&file, &bytes).unwrap();
        read_safetensors(&file)
            .unwrap()
            .into_iter()
            .filter(|(n, _)| n != "model.layers.1.mlp.down_proj.weight")
            .collect()
    };
    Tensor::write_safetensors(&tensors, &file).unwrap();
    let err = tessera_engine::load(&hf, &[Device::Cpu], None)
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("model.layers.1.mlp.down_proj.weight"),
        "{err}"
    );
    // No weights at all, and not a model at all.
    std::fs::remove_file(&file).unwrap();
    let err = tessera_engine::load(&hf, &[Device::Cpu], None)
        .err()
        .unwrap();
    assert!(
        matches!(err, LoadError::Weights(WeightsError::NoWeights { .. })),
        "{err:?}"
    );
    let err = tessera_engine::load(&hf.join("config.json"), &[Device::Cpu], None)
        .err()
        .unwrap();
    assert!(matches!(err, LoadError::UnknownFormat { .. }), "{err:?}");
}

fn tiny_config() -> tessera_engine::model_config::LlamaConfig {
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny::write_model(dir.path(), 4);
    tessera_engine::model_config::LlamaConfig::from_hf_json(
        &std::fs::read_to_string(hf.join("config.json")).unwrap(),
    )
    .unwrap()
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("adapter_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

#[test]
fn bad_adapters_are_refused_with_the_reason() {
    let config = tiny_config();
    let root = tempfile::tempdir().unwrap();
    let fresh =
        |name: &str| tiny::write_adapter(&root.path().join(name), 4, 8.0, &["q_proj", "v_proj"], 1);

    let ok = fresh("ok");
    let a = LoraAdapter::load(&ok, &config).unwrap();
    assert_eq!((a.rank, a.scale()), (4, 2.0));

    let rank = fresh("rank");
    edit_config(&rank, |v| v["r"] = 8.into());
    let err = LoraAdapter::load(&rank, &config).unwrap_err();
    assert!(matches!(err, LoraError::Shape { .. }), "{err}");

    let target = fresh("target");
    edit_config(&target, |v| {
        v["target_modules"] = serde_json::json!(["q_proj", "lm_head"])
    });
    let err = LoraAdapter::load(&target, &config).unwrap_err();
    assert!(
        matches!(err, LoraError::UnknownTarget { ref module, .. } if module == "lm_head"),
        "{err}"
    );

    for (name, edit) in [
        ("dora", serde_json::json!({"use_dora": true})),
        ("bias", serde_json::json!({"bias": "all"})),
        ("save", serde_json::json!({"modules_to_save": ["lm_head"]})),
    ] {
        let dir = fresh(name);
        edit_config(&dir, |v| {
            for (k, x) in edit.as_object().unwrap() {
                v[k] = x.clone();
            }
        });
        let err = LoraAdapter::load(&dir, &config).unwrap_err();
        assert!(
            matches!(err, LoraError::Unsupported { .. }),
            "{name}: {err}"
        );
    }

    let trunc = fresh("trunc");
    let file = trunc.join("adapter_model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 10]).unwrap();
    let err = LoraAdapter::load(&trunc, &config).unwrap_err();
    assert!(matches!(err, LoraError::Weights { .. }), "{err}");

    let err = LoraAdapter::load(&root.path().join("missing"), &config).unwrap_err();
    assert!(matches!(err, LoraError::Io { .. }), "{err}");
}
