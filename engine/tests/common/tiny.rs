//! Tiny random Llama models and PEFT adapters written by the tests, in Hugging Face format.

use std::path::{Path, PathBuf};

use serde_json::json;
use tch::{Device, Kind, Tensor};

/// The shape of the tiny model: GQA (12 heads, 6 kv heads), heads and MLP divisible by 1, 2 and 3.
pub const HIDDEN: i64 = 96;
pub const HEADS: i64 = 12;
pub const KV_HEADS: i64 = 6;
pub const HEAD_DIM: i64 = 8;
pub const INTER: i64 = 192;
pub const LAYERS: i64 = 2;
/// 256 byte tokens, then `<s>` (256) and `</s>` (257), padded to 260.
pub const VOCAB: i64 = 260;
pub const EOS: u32 = 257;
/// Every projection a LoRA adapter can target, by PEFT's module names.
pub const ALL_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// A seeded normal generator of its own (splitmix64 + Box-Muller): torch's global generator is
/// shared by the tests of a binary running on parallel threads, so a model drawn from it depends
/// on which other test draws at the same moment.
struct Normal(u64);

impl Normal {
    fn new(seed: i64) -> Self {
        Normal(seed as u64 ^ 0x5EED_0F7E_55E4_A000)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    fn sample(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    fn randn(&mut self, shape: &[i64], std: f64) -> Tensor {
        let n: i64 = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| (self.sample() * std) as f32).collect();
        Tensor::from_slice(&values).view(shape)
    }
}

/// A random `[out, in]` weight scaled like a default init.
fn lin(rng: &mut Normal, out: i64, inp: i64) -> Tensor {
    rng.randn(&[out, inp], 1.0 / (inp as f64).sqrt())
}

/// Writes `config.json`, `model.safetensors`, `tokenizer.json` and `tokenizer_config.json` of a
/// random tiny Llama into `dir` (seeded, so the same seed gives the same model).
pub fn write_model(dir: &Path, seed: i64) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = Normal::new(seed);
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "max_position_embeddings": 512,
        "tie_word_embeddings": false,
        "bos_token_id": 256,
        "eos_token_id": EOS,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut tensors: Vec<(String, Tensor)> = vec![
        (
            "model.embed_tokens.weight".into(),
            rng.randn(&[VOCAB, HIDDEN], 1.0),
        ),
        (
            "model.norm.weight".into(),
            Tensor::ones([HIDDEN], (Kind::Float, Device::Cpu)),
        ),
        ("lm_head.weight".into(), lin(&mut rng, VOCAB, HIDDEN) * 4.0),
    ];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        let norm = |rng: &mut Normal| {
            Tensor::ones([HIDDEN], (Kind::Float, Device::Cpu)) + rng.randn(&[HIDDEN], 0.1)
        };
        tensors.extend([
            (format!("{p}.input_layernorm.weight"), norm(&mut rng)),
            (
                format!("{p}.post_attention_layernorm.weight"),
                norm(&mut rng),
            ),
            (
                format!("{p}.self_attn.q_proj.weight"),
                lin(&mut rng, HEADS * HEAD_DIM, HIDDEN),
            ),
            (
                format!("{p}.self_attn.k_proj.weight"),
                lin(&mut rng, KV_HEADS * HEAD_DIM, HIDDEN),
            ),
            (
                format!("{p}.self_attn.v_proj.weight"),
                lin(&mut rng, KV_HEADS * HEAD_DIM, HIDDEN),
            ),
            (
                format!("{p}.self_attn.o_proj.weight"),
                lin(&mut rng, HIDDEN, HEADS * HEAD_DIM),
            ),
            (
                format!("{p}.mlp.gate_proj.weight"),
                lin(&mut rng, INTER, HIDDEN),
            ),
            (
                format!("{p}.mlp.up_proj.weight"),
                lin(&mut rng, INTER, HIDDEN),
            ),
            (
                format!("{p}.mlp.down_proj.weight"),
                lin(&mut rng, HIDDEN, INTER),
            ),
        ]);
    }
    Tensor::write_safetensors(&tensors, dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("tokenizer.json"), byte_tokenizer().to_string()).unwrap();
    let chatml = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({"bos_token": "<s>", "eos_token": "</s>", "chat_template": chatml}).to_string(),
    )
    .unwrap();
    dir.to_path_buf()
}

/// A byte-level BPE tokenizer with no merges: one token per byte, plus `<s>` and `</s>`.
fn byte_tokenizer() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    for (id, c) in byte_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(id));
    }
    vocab.insert("<s>".into(), json!(256));
    vocab.insert("</s>".into(), json!(257));
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(256, "<s>"), special(257, "</s>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    })
}

/// GPT-2's byte → printable character map, in byte order.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut pairs: Vec<(u32, u32)> = printable.into_iter().zip(chars).collect();
    pairs.sort();
    pairs
        .into_iter()
        .map(|(_, c)| char::from_u32(c).unwrap())
        .collect()
}

/// (in, out) features of a target module of the tiny model.
fn dims(module: &str) -> (i64, i64) {
    match module {
        "q_proj" | "o_proj" => (HIDDEN, HEADS * HEAD_DIM),
        "k_proj" | "v_proj" => (HIDDEN, KV_HEADS * HEAD_DIM),
        "gate_proj" | "up_proj" => (HIDDEN, INTER),
        "down_proj" => (INTER, HIDDEN),
        other => panic!("unknown module {other}"),
    }
}

/// Writes a PEFT LoRA adapter for the tiny model (B is random, not zero, so it changes outputs).
pub fn write_adapter(dir: &Path, r: i64, alpha: f64, targets: &[&str], seed: i64) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = Normal::new(seed);
    let config = json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "lora_dropout": 0.0, "target_modules": targets, "bias": "none", "use_rslora": false,
        "use_dora": false, "fan_in_fan_out": false, "modules_to_save": null,
        "base_model_name_or_path": "tiny",
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let mut tensors = Vec::new();
    for l in 0..LAYERS {
        for &t in targets {
            let (inp, out) = dims(t);
            let module = if matches!(t, "gate_proj" | "up_proj" | "down_proj") {
                "mlp"
            } else {
                "self_attn"
            };
            let p = format!("base_model.model.model.layers.{l}.{module}.{t}");
            tensors.push((
                format!("{p}.lora_A.weight"),
                rng.randn(&[r, inp], 1.0 / (inp as f64).sqrt()),
            ));
            tensors.push((
                format!("{p}.lora_B.weight"),
                rng.randn(&[out, r], 1.0 / (r as f64).sqrt()),
            ));
        }
    }
    Tensor::write_safetensors(&tensors, dir.join("adapter_model.safetensors")).unwrap();
    dir.to_path_buf()
}

/// The tiny model as another family's checkpoint (`write_model`'s weights plus what the family
/// adds): `qwen3` (q/k norms per head), `qwen2` (biases on q, k and v) or `gemma3_vision` (a
/// multimodal Gemma 3 config, which Tessera refuses by its vision tower).
pub fn write_family_model(dir: &Path, seed: i64, family: &str) -> PathBuf {
    write_model(dir, seed);
    let mut rng = Normal::new(seed + 1000);
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut tensors =
        tessera_engine::weights::read_safetensors(&dir.join("model.safetensors")).unwrap();
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}.self_attn");
        match family {
            "qwen3" => tensors.extend([
                (
                    format!("{p}.q_norm.weight"),
                    rng.randn(&[HEAD_DIM], 0.1) + 1.0,
                ),
                (
                    format!("{p}.k_norm.weight"),
                    rng.randn(&[HEAD_DIM], 0.1) + 1.0,
                ),
            ]),
            "qwen2" => tensors.extend([
                (
                    format!("{p}.q_proj.bias"),
                    rng.randn(&[HEADS * HEAD_DIM], 0.5),
                ),
                (
                    format!("{p}.k_proj.bias"),
                    rng.randn(&[KV_HEADS * HEAD_DIM], 0.5),
                ),
                (
                    format!("{p}.v_proj.bias"),
                    rng.randn(&[KV_HEADS * HEAD_DIM], 0.5),
                ),
            ]),
            _ => {}
        }
    }
    let model_type = match family {
        "gemma3_vision" => {
            config["vision_config"] = json!({"model_type": "siglip_vision_model"});
            "gemma3"
        }
        other => other,
    };
    config["model_type"] = json!(model_type);
    std::fs::write(&path, config.to_string()).unwrap();
    Tensor::write_safetensors(&tensors, dir.join("model.safetensors")).unwrap();
    dir.to_path_buf()
}
