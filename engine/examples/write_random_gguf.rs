//! Writes a Llama with random weights as a GGUF file, its projections Q4_0 (random 4-bit values
//! and scales), its embedding and `lm_head` float16, with a byte-level tokenizer: the model of
//! issue 14's GPU check (`scripts/gpu-check.sh`), packed 4-bit against the same file dequantised
//! to bfloat16. Nothing is downloaded, so it runs on a machine without a network.
//!
//! `cargo run --release -p tessera-engine --example write_random_gguf -- OUT.gguf [--size 1b|tiny]`
//!
//! `1b`: TinyLlama-1.1B's shapes (hidden 2048, 22 layers, 32 heads, 4 key/value heads, MLP 5632,
//! vocabulary 32000); `tiny`: a few MB, for trying the script.

use std::path::PathBuf;

use half::f16;
use tessera_engine::gguf::Value;
use tessera_engine::gguf_writer::{GgufWriter, RawTensor};

struct Shape {
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
}

const ONE_B: Shape = Shape {
    hidden: 2048,
    inter: 5632,
    layers: 22,
    heads: 32,
    kv_heads: 4,
    vocab: 32000,
};

const TINY: Shape = Shape {
    hidden: 256,
    inter: 512,
    layers: 2,
    heads: 8,
    kv_heads: 4,
    vocab: 512,
};

/// xorshift64*: fast, seeded, good enough for random weights.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Roughly normal (a sum of four uniforms), mean 0, standard deviation `std`.
    fn normal(&mut self, std: f32) -> f32 {
        let u: f32 = (0..4)
            .map(|_| (self.next() >> 40) as f32 / (1u64 << 24) as f32)
            .sum();
        (u - 2.0) * std * 1.732
    }
}

/// GPT-2's byte-level alphabet: the string each byte is written as in a byte-level BPE vocabulary.
fn byte_tokens() -> Vec<String> {
    let printable = |b: u32| {
        (u32::from('!')..=u32::from('~')).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b)
    };
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                extra += 1;
                255 + extra
            };
            char::from_u32(c).expect("a valid char").to_string()
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = PathBuf::from(
        args.first()
            .ok_or_else(|| anyhow::anyhow!("usage: OUT.gguf [--size 1b|tiny]"))?,
    );
    let shape = match args
        .iter()
        .position(|a| a == "--size")
        .map(|i| args.get(i + 1))
    {
        None => &ONE_B,
        Some(Some(s)) if s == "1b" => &ONE_B,
        Some(Some(s)) if s == "tiny" => &TINY,
        Some(other) => anyhow::bail!("--size takes 1b or tiny, not {other:?}"),
    };
    let head_dim = shape.hidden / shape.heads;
    let mut w = GgufWriter::new();
    let u32v = |v: usize| Value::U32(v as u32);
    w.metadata("general.architecture", Value::String("llama".into()))
        .metadata("general.name", Value::String("random".into()))
        .metadata("llama.embedding_length", u32v(shape.hidden))
        .metadata("llama.feed_forward_length", u32v(shape.inter))
        .metadata("llama.block_count", u32v(shape.layers))
        .metadata("llama.attention.head_count", u32v(shape.heads))
        .metadata("llama.attention.head_count_kv", u32v(shape.kv_heads))
        .metadata("llama.attention.key_length", u32v(head_dim))
        .metadata("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5))
        .metadata("llama.rope.freq_base", Value::F32(10000.0))
        .metadata("llama.context_length", u32v(2048))
        .metadata("tokenizer.ggml.model", Value::String("gpt2".into()));
    let mut tokens = byte_tokens();
    tokens.push("<|bos|>".into());
    tokens.push("<|eos|>".into());
    // One merge (llama.cpp reads `merges` only as an array of strings, which an empty array
    // written here is not), its token in the vocabulary.
    tokens.push("Āā".into());
    while tokens.len() < shape.vocab {
        tokens.push(format!("<pad{}>", tokens.len()));
    }
    let types: Vec<Value> = (0..tokens.len())
        .map(|i| Value::I32(if i >= 256 { 3 } else { 1 }))
        .collect();
    w.metadata(
        "tokenizer.ggml.tokens",
        Value::Array(tokens.into_iter().map(Value::String).collect()),
    )
    .metadata("tokenizer.ggml.token_type", Value::Array(types))
    .metadata(
        "tokenizer.ggml.merges",
        Value::Array(vec![Value::String("Ā ā".into())]),
    )
    .metadata("tokenizer.ggml.bos_token_id", Value::U32(256))
    .metadata("tokenizer.ggml.eos_token_id", Value::U32(257));

    let mut rng = Rng(0x5EED_1B1B_0000_0001);
    let f16_table = |name: &str, rows: usize, cols: usize, rng: &mut Rng| RawTensor {
        name: name.into(),
        shape: vec![rows, cols],
        ggml_type: 1,
        data: (0..rows * cols)
            .flat_map(|_| f16::from_f32(rng.normal(0.02)).to_le_bytes())
            .collect(),
    };
    let embed = f16_table("token_embd.weight", shape.vocab, shape.hidden, &mut rng);
    let head = f16_table("output.weight", shape.vocab, shape.hidden, &mut rng);
    w.tensor(embed).tensor(head);
    w.f32_tensor(
        "output_norm.weight",
        &[shape.hidden],
        &vec![1.0; shape.hidden],
    );
    // Q4_0 blocks: a float16 scale, then 16 bytes of two 4-bit values each, `(q − 8)·d`. Random
    // values have a standard deviation of ~4.6·d: d = 1 / (4.6·√cols) keeps outputs near unit size.
    let q4_0 = |name: String, rows: usize, cols: usize, rng: &mut Rng| RawTensor {
        name,
        shape: vec![rows, cols],
        ggml_type: 2,
        data: (0..rows * cols / 32)
            .flat_map(|_| {
                let d = (1.0 + rng.normal(0.1)) / (4.6 * (cols as f32).sqrt());
                let mut block = f16::from_f32(d).to_le_bytes().to_vec();
                block.extend((0..16).map(|_| rng.next() as u8));
                block
            })
            .collect(),
    };
    let (h, kv) = (shape.hidden, shape.kv_heads * head_dim);
    for layer in 0..shape.layers {
        let p = |n: &str| format!("blk.{layer}.{n}.weight");
        for (name, rows, cols) in [
            ("attn_q", h, h),
            ("attn_k", kv, h),
            ("attn_v", kv, h),
            ("attn_output", h, h),
            ("ffn_gate", shape.inter, h),
            ("ffn_up", shape.inter, h),
            ("ffn_down", h, shape.inter),
        ] {
            let t = q4_0(p(name), rows, cols, &mut rng);
            w.tensor(t);
        }
        w.f32_tensor(&p("attn_norm"), &[h], &vec![1.0; h]);
        w.f32_tensor(&p("ffn_norm"), &[h], &vec![1.0; h]);
    }
    w.write(&out)?;
    println!("{}", out.display());
    Ok(())
}
