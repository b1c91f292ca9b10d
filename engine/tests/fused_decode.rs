//! Fused decode steps (`engine/src/model/fused_decode.rs`) compute what the op-by-op path
//! computes. On a tiny model exported with Q4_0 projections and Q8_0 tables (all kept compact when
//! packed), sequences of different lengths in scattered KV slots decode step by step both ways,
//! alone and together: the logits agree to float rounding and the greedy tokens are the same. The
//! dequantised reference path never fuses.

mod common;

use common::tiny;
use common::tiny_gguf::write_gguf;
use tch::{Device, Kind, Tensor};
use tessera_engine::gguf::GgufFile;
use tessera_engine::loader::{load_with, Quantization};
use tessera_engine::model::Llama;
use tessera_engine::model_config::LlamaConfig;
use tessera_engine::packed::Int4Mode;
use tessera_engine::step::{LogitRows, Segment, StepBatch};
use tessera_engine::weights::WeightMap;

/// Prompts, each with its KV slot (scattered, so the fused step reads and writes the right ones).
const PROMPTS: [(i64, &[i64]); 3] = [
    (0, &[256, 72, 101, 108, 108, 111]),
    (
        2,
        &[
            256, 84, 104, 101, 32, 113, 117, 105, 99, 107, 32, 98, 114, 111, 119, 110, 32,
        ],
    ),
    (5, &[256]),
];

/// Greedy decoding of [`PROMPTS`] for `steps` steps: the logits of every decode step and each
/// sequence's tokens. Every third step only the first sequence decodes (a one-row step).
fn decode(model: &Llama, steps: usize) -> (Vec<Tensor>, Vec<Vec<i64>>) {
    let mut cache = model.new_cache(6, 32);
    let mut seqs: Vec<(i64, i64, Vec<i64>)> = Vec::new();
    for (slot, prompt) in PROMPTS {
        let step = StepBatch::new(
            prompt.to_vec(),
            vec![Segment {
                slot,
                start: 0,
                len: prompt.len() as i64,
            }],
            LogitRows::Last,
        );
        let logits = tch::no_grad(|| model.forward_step(&step, &mut cache, None));
        seqs.push((
            slot,
            prompt.len() as i64,
            vec![logits.argmax(-1, false).int64_value(&[0])],
        ));
    }
    let mut all = Vec::new();
    for s in 0..steps {
        let active = if s % 3 == 2 { 1 } else { seqs.len() };
        let tokens: Vec<i64> = seqs[..active]
            .iter()
            .map(|(_, _, t)| *t.last().unwrap())
            .collect();
        let segments = seqs[..active]
            .iter()
            .map(|&(slot, start, _)| Segment {
                slot,
                start,
                len: 1,
            })
            .collect();
        let step = StepBatch::new(tokens, segments, LogitRows::Last);
        let logits = tch::no_grad(|| model.forward_step(&step, &mut cache, None));
        let next: Vec<i64> = Vec::try_from(logits.argmax(-1, false)).unwrap();
        for (seq, t) in seqs.iter_mut().zip(next) {
            seq.1 += 1;
            seq.2.push(t);
        }
        all.push(logits);
    }
    (all, seqs.into_iter().map(|(_, _, t)| t).collect())
}

#[test]
fn fused_decode_steps_compute_what_the_op_by_op_path_computes() {
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny::write_model(&dir.path().join("m"), 7);
    let gguf = dir.path().join("m.gguf");
    write_gguf(&hf, &gguf, Some(2));
    let load = |q| load_with(&gguf, &[Device::Cpu], Some(Kind::Float), q).unwrap();
    let packed = load(Quantization::Packed);
    let projections = (tiny::LAYERS * 4) as usize;
    assert!(
        packed
            .weights
            .contains(&format!("{projections}/{projections} projections 4-bit")),
        "{}",
        packed.weights
    );
    assert!(packed.model.has_q8_embedding(), "{}", packed.weights);
    // With torch's int4 kernel on float32 activations, both paths run the same projections on
    // the same inputs, and only the order of sums in norms and attention differs (the Q8_0
    // `lm_head` rounds its input to 16 bits either way, which can move a last-bit difference by
    // one step, ~3e-5 of a group's largest value). With the integer kernel every projection
    // does. A wrong slot, position or head would be off by whole units.
    for (mode, tolerance) in [
        (Int4Mode::Kernel(Kind::Float), 1e-4),
        (Int4Mode::IntDot, 1e-3),
    ] {
        let g = GgufFile::open(&gguf).unwrap();
        let config = LlamaConfig::from_gguf(&g).unwrap();
        let weights = WeightMap::from_gguf(&g, &config, true).unwrap();
        let model = Llama::load(weights, config, &[Device::Cpu], Kind::Float, mode).unwrap();
        assert!(
            model.set_fused_decode(true),
            "a packed float32 model on the CPU fuses decode steps"
        );
        let (fused, fused_tokens) = decode(&model, 12);
        assert!(!model.set_fused_decode(false));
        let (ops, op_tokens) = decode(&model, 12);
        for (s, (f, o)) in fused.iter().zip(&ops).enumerate() {
            assert_eq!(f.size(), o.size(), "step {s}");
            let diff = (f - o).abs().max().double_value(&[]);
            let scale = o.abs().max().double_value(&[]);
            assert!(
                diff <= tolerance * scale,
                "{mode:?}, step {s}: max |Δlogit| {diff} of {scale}"
            );
        }
        assert_eq!(fused_tokens, op_tokens, "{mode:?}");
    }
    // The dequantised model (the reference path) keeps torch's ops.
    let dense = load(Quantization::Dequantize);
    assert!(!dense.model.set_fused_decode(true));
}
