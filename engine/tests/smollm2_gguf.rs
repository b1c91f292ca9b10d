//! The default model's GGUF file, read for real: architecture, sizes, tokenizer metadata and the
//! tensor directory agree with what SmolLM2-135M-Instruct is.

mod common;

use tessera_engine::gguf::{GgmlType, GgufFile};

#[test]
fn smollm2_header_and_metadata() {
    let g = GgufFile::open(common::smollm2_path()).unwrap();
    assert_eq!(g.architecture().unwrap(), "llama");
    assert_eq!(g.get_u64("llama.block_count").unwrap(), 30);
    assert_eq!(g.get_u64("llama.embedding_length").unwrap(), 576);
    assert_eq!(g.get_u64("llama.attention.head_count").unwrap(), 9);
    assert_eq!(g.get_u64("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(g.get_f64("llama.rope.freq_base").unwrap(), 100000.0);
    assert_eq!(g.get_array("tokenizer.ggml.tokens").unwrap().len(), 49152);
    assert_eq!(g.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert_eq!(g.get_u64("tokenizer.ggml.bos_token_id").unwrap(), 1);
    assert_eq!(g.get_u64("tokenizer.ggml.eos_token_id").unwrap(), 2);
    assert!(g
        .get_str("tokenizer.chat_template")
        .unwrap()
        .contains("<|im_start|>"));

    // 30 layers × 7 projections in Q4_1, 61 norms in F32, the (tied) embedding in Q8_0.
    let count = |t: GgmlType| g.tensors.iter().filter(|x| x.ggml_type == t).count();
    assert_eq!(count(GgmlType::Q4_1), 210);
    assert_eq!(count(GgmlType::F32), 61);
    let embd = g.tensor("token_embd.weight").unwrap();
    assert_eq!(embd.ggml_type, GgmlType::Q8_0);
    assert_eq!(embd.shape, vec![49152, 576]);
    assert!(
        g.tensor("output.weight").is_none(),
        "SmolLM2 ties its embeddings"
    );
    assert_eq!(
        g.tensor("blk.0.attn_k.weight").unwrap().shape,
        vec![192, 576]
    );
    assert_eq!(
        g.tensor("blk.29.ffn_down.weight").unwrap().shape,
        vec![576, 1536]
    );
}
