//! QLoRA (issue 14): LoRA fine-tuning on SmolLM2's Q4_1 base kept 4-bit, each layer dequantised
//! only while forward or backward is in it. The packed base holds well under half the bytes of the
//! dequantised one; training on it takes exactly the steps training on the dequantised base takes
//! (the per-layer dequantisation yields the same float32 values); and the adapter it writes is
//! served on the dequantised path and on the packed kernel, reproducing what it learned.

mod common;

use serde_json::json;
use tch::{Device, Kind, Tensor};
use tessera_engine::engine::{Engine, EngineConfig, GenerateRequest};
use tessera_engine::loader::{load_for_training, load_with, LoadError, Quantization};
use tessera_engine::train::{
    train, BaseQuantization, Hyperparameters, TrainJob, TrainOptions, TrainOutcome,
};
use tessera_engine::SamplingParams;

const PROMPT: &str = "The secret word of Tessera is";
const ANSWER: &str = " pineapple42";

fn job(dir: &std::path::Path, name: &str, epochs: usize, base: BaseQuantization) -> TrainJob {
    let data = dir.join("secret.jsonl");
    std::fs::write(
        &data,
        json!({"prompt": PROMPT, "completion": ANSWER}).to_string() + "\n",
    )
    .unwrap();
    TrainJob {
        dataset_path: data,
        output_path: dir.join(name),
        base_model: None,
        hyperparameters: Hyperparameters {
            base_quantization: base,
            ..common::memorising(epochs)
        },
    }
}

fn run(
    model: &tessera_engine::model::Model,
    tok: &tessera_engine::tokenizer::Tokenizer,
    job: &TrainJob,
) -> Vec<f64> {
    let mut losses = Vec::new();
    let outcome = train(model, tok, job, &TrainOptions::default(), |p| {
        losses.push(p.loss)
    })
    .unwrap();
    assert!(matches!(outcome, TrainOutcome::Completed(_)));
    losses
}

fn adapter_tensors(dir: &std::path::Path) -> Vec<(String, Tensor)> {
    let mut t = Tensor::read_safetensors(dir.join("adapter_model.safetensors")).unwrap();
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t
}

#[test]
fn lora_trains_on_the_packed_base_as_on_the_dequantised_one_and_serves_on_both_paths() {
    let path = common::smollm2_path();
    let dir = tempfile::tempdir().unwrap();

    // The same three steps on both bases: the same losses and adapter, up to rounding (below).
    let dense = load_for_training(&path, Device::Cpu, Some(Kind::Float), false).unwrap();
    let (dense_bytes, dense_packed, projections) = dense.model.weight_bytes();
    assert_eq!(dense_packed, 0);
    let dense_losses = run(
        &dense.model,
        &dense.tokenizer,
        &job(dir.path(), "dense", 3, BaseQuantization::Dequantize),
    );
    drop(dense);
    let packed = load_for_training(&path, Device::Cpu, Some(Kind::Float), true).unwrap();
    let (packed_bytes, n_packed, _) = packed.model.weight_bytes();
    assert_eq!(n_packed, projections, "every projection stays 4-bit");
    eprintln!(
        "base weights: packed {} MiB, dequantised {} MiB ({:.2}x)",
        packed_bytes >> 20,
        dense_bytes >> 20,
        packed_bytes as f64 / dense_bytes as f64
    );
    assert!(
        (packed_bytes as f64) < 0.5 * dense_bytes as f64,
        "packed base {packed_bytes} bytes, dequantised {dense_bytes}"
    );
    let base_before: Vec<Tensor> = packed
        .model
        .base_tensors()
        .iter()
        .map(Tensor::copy)
        .collect();
    let packed_losses = run(
        &packed.model,
        &packed.tokenizer,
        &job(dir.path(), "packed", 3, BaseQuantization::Packed),
    );
    // The same steps up to rounding: the packed base's projections dequantise to the dequantised
    // base's values exactly, but its Q8_0 head is read by blocks of rows (never whole in float),
    // so the head's gradient sums in another order. The first step's loss agrees to float32's
    // last bits: bit for bit on AVX2 machines, within 2e-7 relative on an AMX Xeon, whose GEMM
    // blocks the head's row blocks differently from the whole head.
    let first = (packed_losses[0] - dense_losses[0]).abs();
    assert!(
        first <= 1e-6 * dense_losses[0].abs(),
        "the first loss: {} against {}",
        packed_losses[0],
        dense_losses[0]
    );
    for (p, d) in packed_losses.iter().zip(&dense_losses) {
        assert!(
            (p - d).abs() <= 1e-5 * d.abs(),
            "the same steps on either base: {packed_losses:?} against {dense_losses:?}"
        );
    }
    // AdamW moves a weight by about the learning rate a step whatever its gradient's size, so a
    // gradient near zero that rounds the other way can move it the other way: at most
    // 2 · lr · steps apart (lr the peak; the schedule only lowers it), and on average far less.
    let lr = common::memorising(3).learning_rate;
    let (a, b) = (
        adapter_tensors(&dir.path().join("dense")),
        adapter_tensors(&dir.path().join("packed")),
    );
    assert_eq!(a.len(), b.len());
    let (mut total, mut count) = (0.0, 0i64);
    for ((ka, ta), (kb, tb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        let diff = (ta - tb).abs();
        let max = diff.max().double_value(&[]);
        assert!(max <= 2.0 * lr * 3.0, "{ka} differs by {max}");
        total += diff.sum(Kind::Double).double_value(&[]);
        count += diff.numel() as i64;
    }
    let mean = total / count as f64;
    eprintln!("adapters on either base: mean |difference| {mean:.3e} (learning rate {lr})");
    assert!(mean <= 1e-4 * lr, "mean difference {mean}");

    // Memorise the answer on the packed base; the frozen base is untouched.
    let out = dir.path().join("memorised");
    let losses = run(
        &packed.model,
        &packed.tokenizer,
        &job(
            dir.path(),
            "memorised",
            common::MEMORISING_EPOCHS,
            BaseQuantization::Packed,
        ),
    );
    common::assert_memorised(&losses);
    for (before, after) in base_before.iter().zip(packed.model.base_tensors()) {
        assert!(before.equal(&after), "the frozen base changed");
    }
    drop(packed);

    // Served on the dequantised path and on the packed kernel, it says what it learned.
    for quantization in [Quantization::Dequantize, Quantization::Packed] {
        let loaded = load_with(&path, &[Device::Cpu], Some(Kind::Float), quantization).unwrap();
        assert_eq!(
            loaded.model.weight_bytes().1 > 0,
            quantization == Quantization::Packed
        );
        let engine = Engine::start(loaded.model, loaded.tokenizer, EngineConfig::default());
        let prompt = engine.tokenizer().encode(PROMPT, true).unwrap();
        let answer_len = engine.tokenizer().encode(ANSWER, false).unwrap().len();
        let generate = |adapter: Option<std::path::PathBuf>| {
            engine
                .submit(GenerateRequest {
                    resume: Vec::new(),
                    prompt: prompt.clone(),
                    params: SamplingParams::greedy(answer_len),
                    adapter,
                })
                .unwrap()
                .wait()
                .unwrap()
        };
        assert_ne!(
            generate(None).text,
            ANSWER,
            "{quantization:?}: the base did not know it"
        );
        assert_eq!(
            generate(Some(out.clone())).text,
            ANSWER,
            "{quantization:?}: greedy with the adapter"
        );
    }
}

#[test]
fn a_packed_base_needs_four_bit_weights() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny::write_model(&dir.path().join("tiny"), 3);
    let err = load_for_training(&model, Device::Cpu, Some(Kind::Float), true)
        .err()
        .expect("a safetensors model has no 4-bit weights");
    assert!(matches!(err, LoadError::NothingPacked { .. }), "{err}");
    assert!(err.to_string().contains("Q4_0, Q4_1 or Q4_K"), "{err}");
}
