//! Fused decode steps (`engine/src/model/fused_decode.rs`) compute what the op-by-op path
//! computes. On a tiny model exported with Q4_0 projections and Q8_0 tables (all kept compact when
//! packed), sequences of different lengths in scattered KV slots decode step by step both ways,
//! alone and together: the logits agree to float rounding and the greedy tokens are the same, also
//! with LoRA adapters of different ranks and targets on some rows and none on others. The
//! dequantised reference path never fuses.

mod common;

use common::tiny;
use common::tiny_gguf::write_gguf;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};
use tessera_engine::gguf::GgufFile;
use tessera_engine::loader::{load_with, Quantization};
use tessera_engine::lora::LoraAdapter;
use tessera_engine::lora_bank::LoraBank;
use tessera_engine::model::Model;
use tessera_engine::model::ModelConfig;
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

/// Each prompt's adapter in a bank, or none.
type Adapters<'a> = Option<(&'a LoraBank, [Option<usize>; 3])>;

/// Greedy decoding of [`PROMPTS`] for `steps` steps, with `adapters` if given: the logits of every
/// decode step and each sequence's tokens. Every third step only the first sequence decodes (a
/// one-row step).
fn decode(model: &Model, steps: usize, adapters: Adapters) -> (Vec<Tensor>, Vec<Vec<i64>>) {
    let mut cache = model.new_cache(6, 32);
    let mut seqs: Vec<(i64, i64, Vec<i64>)> = Vec::new();
    let lora = |rows: Vec<Option<usize>>| {
        adapters.and_then(|(bank, _)| bank.batch(&rows, &[Device::Cpu], Kind::Float))
    };
    let adapter_of = |seq: usize| adapters.and_then(|(_, a)| a[seq]);
    for (i, (slot, prompt)) in PROMPTS.into_iter().enumerate() {
        let step = StepBatch::new(
            prompt.to_vec(),
            vec![Segment {
                slot,
                start: 0,
                len: prompt.len() as i64,
            }],
            LogitRows::Last,
        );
        let rows = vec![adapter_of(i); prompt.len()];
        let logits = tch::no_grad(|| model.forward_step(&step, &mut cache, lora(rows).as_ref()));
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
        let rows = (0..active).map(adapter_of).collect();
        let logits = tch::no_grad(|| model.forward_step(&step, &mut cache, lora(rows).as_ref()));
        let next: Vec<i64> = Vec::try_from(logits.argmax(-1, false)).unwrap();
        for (seq, t) in seqs.iter_mut().zip(next) {
            seq.1 += 1;
            seq.2.push(t);
        }
        all.push(logits);
    }
    (all, seqs.into_iter().map(|(_, _, t)| t).collect())
}

/// Decodes with fused steps and op-by-op on the packed models of both int4 modes, checks they
/// agree, and returns the fused logits of the first mode.
fn compare_paths(
    gguf: &std::path::Path,
    adapters: &dyn Fn(&Model) -> Option<LoraBank>,
    rows: [Option<usize>; 3],
) -> Vec<Tensor> {
    let mut first = None;
    // With torch's int4 kernel on float32 activations, both paths run the same projections on
    // the same inputs, and only the order of sums in norms, attention and LoRA differs (the Q8_0
    // `lm_head` rounds its input to 16 bits either way, which can move a last-bit difference by
    // one step, ~3e-5 of a group's largest value). With the integer kernel every projection
    // does. A wrong slot, position, head or adapter would be off by whole units.
    for (mode, tolerance) in [
        (Int4Mode::Kernel(Kind::Float), 1e-4),
        (Int4Mode::IntDot, 1e-3),
    ] {
        let g = GgufFile::open(gguf).unwrap();
        let config = ModelConfig::from_gguf(&g).unwrap();
        let weights = WeightMap::from_gguf(&g, &config, true).unwrap();
        let model = Model::load(weights, config, &[Device::Cpu], Kind::Float, mode).unwrap();
        let bank = adapters(&model);
        let with = bank.as_ref().map(|b| (b, rows));
        assert!(
            model.set_fused_decode(true),
            "a packed float32 model on the CPU fuses decode steps"
        );
        let (fused, fused_tokens) = decode(&model, 12, with);
        // Every decode step fused, and the one-token prompt's step (a single row too).
        assert_eq!(model.fused_steps(), 13, "{mode:?}");
        assert!(!model.set_fused_decode(false));
        let (ops, op_tokens) = decode(&model, 12, with);
        assert_eq!(model.fused_steps(), 13, "{mode:?}");
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
        first.get_or_insert(fused);
    }
    first.unwrap()
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
    compare_paths(&gguf, &|_| None, [None; 3]);
    // The dequantised model (the reference path) keeps torch's ops.
    let dense = load(Quantization::Dequantize);
    assert!(!dense.model.set_fused_decode(true));
}

#[test]
fn fused_decode_steps_take_a_float_projection_among_packed_ones() {
    // Layer 0's q|k|v held as one float32 matrix (its v is float32 in the file, as a Q4_K_M
    // file's Q6_K tensors are dequantised): the fused step multiplies it over its threads
    // (`float_dot::dense_rows`), the op-by-op path with torch's matmul.
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny::write_model(&dir.path().join("m"), 7);
    let gguf = dir.path().join("m.gguf");
    write_gguf(&hf, &gguf, Some(0));
    let packed = load_with(
        &gguf,
        &[Device::Cpu],
        Some(Kind::Float),
        Quantization::Packed,
    )
    .unwrap()
    .weights;
    let projections = (tiny::LAYERS * 4) as usize;
    assert!(
        packed.contains(&format!(
            "{}/{projections} projections 4-bit",
            projections - 1
        )),
        "{packed}"
    );
    for threads in [1, 2] {
        tch::set_num_threads(threads);
        compare_paths(&gguf, &|_| None, [None; 3]);
    }
}

#[test]
fn fused_decode_steps_apply_each_rows_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny::write_model(&dir.path().join("m"), 7);
    let gguf = dir.path().join("m.gguf");
    write_gguf(&hf, &gguf, Some(2));
    // Two adapters stacked differently per projection: one of rank 4 on every projection, one
    // of rank 8 on q and v only (so q's slice holds both, k's only the first).
    let a = tiny::write_adapter(&dir.path().join("a"), 4, 8.0, &tiny::ALL_TARGETS, 1);
    let b = tiny::write_adapter(&dir.path().join("b"), 8, 16.0, &["q_proj", "v_proj"], 2);
    let bank = |model: &Model| {
        let placed = [&a, &b]
            .iter()
            .map(|d| {
                let adapter = LoraAdapter::load(d, model.config()).unwrap();
                Arc::new(adapter.place(&[Device::Cpu], Kind::Float))
            })
            .collect();
        Some(LoraBank::new(placed, model.config().num_hidden_layers, 1))
    };
    // The first prompt on b, the second on none, the third on a.
    let rows = [Some(1), None, Some(0)];
    let with = compare_paths(&gguf, &bank, rows);
    let without = compare_paths(&gguf, &|_| None, [None; 3]);
    // The adapters did change the logits of the rows with one (the first row of every step, the
    // third of the three-row steps) by whole units, and the row without one only by rounding.
    for (s, (w, o)) in with.iter().zip(&without).enumerate() {
        let moved = |row: i64| (w.get(row) - o.get(row)).abs().max().double_value(&[]);
        let scale = o.abs().max().double_value(&[]);
        assert!(moved(0) > 1e-2 * scale, "step {s}: {}", moved(0));
        if w.size()[0] == 3 {
            assert!(moved(2) > 1e-2 * scale, "step {s}: {}", moved(2));
            assert!(moved(1) <= 1e-4 * scale, "step {s}: {}", moved(1));
        }
    }
}
