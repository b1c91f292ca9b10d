//! Every model family against transformers: a tiny random model of the family, with its
//! distinguishing features switched on (windows shorter than the prompt, soft-caps, biases, q/k
//! norms, fused checkpoint modules, Llama 3 rope scaling), is written by transformers and converted
//! to GGUF by llama.cpp's own converter (`families/tiny_family.py`). From the Hugging Face
//! directory and from the GGUF file, Tessera gives transformers' float32 logits (within 1e-3) and
//! greedy ids over a prompt longer than every window, the same with a random PEFT adapter on every
//! projection (transformers + PEFT), and the same token ids for a sample text. The Q8_0 GGUF the
//! converter also writes runs packed (8-bit weights, fused decode steps) as it runs dequantised,
//! and a tensor parallel split over two CPU devices computes what one device does. Fine-tuning a
//! LoRA adapter on the family (Phi-3's fused modules included) writes an adapter that PEFT loads
//! on the transformers model and that gives the same greedy ids there as in Tessera.
//!
//! The script needs Python with transformers, peft, sentencepiece and the converter from
//! `scripts/fetch-llama-convert.sh` (`TESSERA_LLAMA_CONVERT`); scripts/test.sh provides them and
//! sets `TESSERA_REQUIRE_TRANSFORMERS`, without which a missing piece skips the comparison.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use serde_json::Value;
use tch::{Device, Kind, Tensor};
use tessera_engine::engine::{Engine, EngineConfig, GenerateRequest};
use tessera_engine::loader::{load_with, Quantization};
use tessera_engine::lora::{LoraAdapter, LoraBatch};
use tessera_engine::model::{Logits, Model};
use tessera_engine::train::{train, Hyperparameters, LrScheduler, TrainJob, TrainOptions};
use tessera_engine::SamplingParams;

/// Logits within this of transformers' (float32, absolute).
const TOLERANCE: f64 = 1e-3;

/// The directory `tiny_family.py FAMILY` wrote, made once per version of the script and the
/// converter (under `<cache>/families/`, so the test command's second pass and later runs reuse
/// it); `None` (with the reason printed) where its tools are missing and not required.
fn make(family: &str) -> Option<PathBuf> {
    let required = std::env::var_os("TESSERA_REQUIRE_TRANSFORMERS").is_some();
    let convert = match std::env::var_os("TESSERA_LLAMA_CONVERT") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => {
            assert!(
                !required,
                "TESSERA_LLAMA_CONVERT is not set: run scripts/fetch-llama-convert.sh \
                 (scripts/test.sh does)"
            );
            eprintln!("skipping {family}: TESSERA_LLAMA_CONVERT is not set");
            return None;
        }
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/families/tiny_family.py");
    // FNV-1a over the script and the converter's directory name.
    let mut key = 0xcbf2_9ce4_8422_2325u64;
    let source = std::fs::read(&script).unwrap();
    for b in source.iter().chain(convert.to_string_lossy().as_bytes()) {
        key = (key ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    let dir = common::cache().join(format!("families/{key:016x}/{family}"));
    if dir.join("expected.json").exists() {
        return Some(dir);
    }
    let python = std::env::var("TESSERA_PYTHON").unwrap_or_else(|_| "python3".into());
    std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
    let tmp = tempfile::tempdir_in(dir.parent().unwrap()).unwrap();
    let out = Command::new(&python)
        .arg(&script)
        .arg(family)
        .arg(tmp.path())
        .arg(&convert)
        .output()
        .expect("run python");
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        assert!(!required, "{} {family} failed:\n{why}", script.display());
        eprintln!("skipping {family}: {why}");
        return None;
    }
    // Another process may have made it meanwhile: either copy will do.
    let _ = std::fs::rename(tmp.keep(), &dir);
    Some(dir)
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn matrix(v: &Value) -> Tensor {
    let rows: Vec<Tensor> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let row: Vec<f32> = r
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            Tensor::from_slice(&row)
        })
        .collect();
    Tensor::stack(&rows, 0)
}

/// `adapter` on one row of `model`'s batches.
fn lora(model: &Model, adapter: Option<&Path>) -> Option<LoraBatch> {
    let placed = LoraAdapter::load(adapter?, model.config())
        .unwrap()
        .place(&model.devices(), Kind::Float);
    LoraBatch::new(
        &[Arc::new(placed)],
        &[Some(0)],
        model.config().num_hidden_layers,
        &model.devices(),
        Kind::Float,
    )
}

/// The prompt's logits (`[t, vocab]`), with `adapter` on every row.
fn prompt_logits(model: &Model, prompt: &[i64], adapter: Option<&Path>) -> Tensor {
    let lora = lora(model, adapter);
    let mut cache = model.new_cache(1, prompt.len() as i64);
    tch::no_grad(|| {
        model.forward(
            &Tensor::from_slice(prompt).view([1, -1]),
            &[0],
            &mut cache,
            lora.as_ref(),
            Logits::All,
        )
    })
    .squeeze_dim(0)
}

/// Greedy tokens after `prompt` by the model's own steps: the prompt, then one token a step.
fn greedy_steps(model: &Model, prompt: &[i64], n: usize, adapter: Option<&Path>) -> Vec<i64> {
    let lora = lora(model, adapter);
    let mut cache = model.new_cache(1, (prompt.len() + n) as i64);
    let step = |cache: &mut _, tokens: &[i64], start: usize| {
        let logits = tch::no_grad(|| {
            model.forward(
                &Tensor::from_slice(tokens).view([1, -1]),
                &[start as i64],
                cache,
                lora.as_ref(),
                Logits::Last,
            )
        });
        logits.view([-1]).argmax(-1, false).int64_value(&[])
    };
    let mut out = vec![step(&mut cache, prompt, 0)];
    while out.len() < n {
        let at = prompt.len() + out.len() - 1;
        let last = *out.last().unwrap();
        out.push(step(&mut cache, &[last], at));
    }
    out
}

/// Greedy tokens after `prompt` through the engine (a prefill, then decode steps).
fn greedy(engine: &Engine, prompt: &[i64], n: usize, adapter: Option<&Path>) -> Vec<i64> {
    let done = engine
        .submit(GenerateRequest {
            prompt: prompt.iter().map(|&t| t as u32).collect(),
            params: SamplingParams {
                ignore_eos: true,
                ..SamplingParams::greedy(n)
            },
            adapter: adapter.map(Path::to_path_buf),
        })
        .unwrap()
        .wait()
        .unwrap();
    done.tokens.iter().map(|t| t.token as i64).collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn check_family(family: &str) {
    let Some(dir) = make(family) else {
        return;
    };
    let dir = dir.as_path();
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let prompt = ids(&expected["input_ids"]);
    let want = matrix(&expected["logits"]);
    let want_adapted = matrix(&expected["adapter"]["logits"]);
    let n = expected["greedy_ids"].as_array().unwrap().len();
    let adapter = dir.join("adapter");
    for (path, arch) in [
        (dir.join("hf"), family),
        (
            dir.join("model.gguf"),
            expected["gguf_arch"].as_str().unwrap(),
        ),
    ] {
        let what = format!(
            "{family} from {}",
            path.file_name().unwrap().to_string_lossy()
        );
        let loaded = tessera_engine::load(&path, &[Device::Cpu], Some(Kind::Float))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(loaded.model.config().arch.family.name(), arch, "{what}");
        // llama.cpp's converter drops Mistral's window: the file attends fully, as llama.cpp
        // does, so it matches transformers within the window only.
        let window = match expected["gguf_drops_window"].as_i64() {
            Some(w) if arch != family => {
                assert!(!loaded.model.config().arch.has_windows(), "{what}");
                w
            }
            _ => prompt.len() as i64,
        };
        let within = |t: &Tensor| t.narrow(0, 0, window);
        let got = prompt_logits(&loaded.model, &prompt, None);
        let diff = max_diff(&within(&got), &within(&want));
        eprintln!("{what}: max |Δlogit| {diff:.2e} over {window} positions");
        assert!(diff <= TOLERANCE, "{what}: logits differ by {diff}");
        let got = prompt_logits(&loaded.model, &prompt, Some(&adapter));
        let diff = max_diff(&within(&got), &within(&want_adapted));
        eprintln!("{what} + PEFT adapter: max |Δlogit| {diff:.2e}");
        assert!(
            diff <= TOLERANCE,
            "{what} + adapter: logits differ by {diff}"
        );
        let sample = loaded
            .tokenizer
            .encode(expected["sample"].as_str().unwrap(), true)
            .unwrap();
        assert_eq!(
            sample.iter().map(|&t| t as i64).collect::<Vec<_>>(),
            ids(&expected["sample_ids"]),
            "{what}: token ids of the sample text"
        );
        if window < prompt.len() as i64 {
            continue;
        }
        let engine = Engine::start(loaded.model, loaded.tokenizer, EngineConfig::default());
        assert_eq!(
            greedy(&engine, &prompt, n, None),
            ids(&expected["greedy_ids"]),
            "{what}: greedy ids"
        );
        assert_eq!(
            greedy(&engine, &prompt, n, Some(&adapter)),
            ids(&expected["adapter"]["greedy_ids"]),
            "{what} + adapter: greedy ids"
        );
    }

    // The Q8_0 file packed (8-bit projections and tables, fused decode steps) as dequantised.
    let q8 = dir.join("model-q8_0.gguf");
    let dense = load_with(
        &q8,
        &[Device::Cpu],
        Some(Kind::Float),
        Quantization::Dequantize,
    )
    .unwrap();
    let packed = load_with(&q8, &[Device::Cpu], Some(Kind::Float), Quantization::Packed).unwrap();
    let (_, n_packed, total) = packed.model.weight_bytes();
    assert_eq!(
        n_packed, total,
        "{family}: every projection of the Q8_0 file kept 8-bit"
    );
    let a = prompt_logits(&dense.model, &prompt, Some(&adapter));
    let b = prompt_logits(&packed.model, &prompt, Some(&adapter));
    let scale = a.abs().max().double_value(&[]);
    let diff = max_diff(&a, &b);
    eprintln!("{family} Q8_0 packed vs dequantised: max |Δlogit| {diff:.2e} of {scale:.1}");
    assert!(
        diff <= 2e-2 * scale,
        "{family}: packed logits differ by {diff}"
    );
    let dense_ids = greedy_steps(&dense.model, &prompt, n, Some(&adapter));
    let packed_ids = greedy_steps(&packed.model, &prompt, n, Some(&adapter));
    assert_eq!(packed_ids, dense_ids, "{family}: packed greedy ids");
    assert_eq!(
        packed.model.fused_steps(),
        n as u64 - 1,
        "{family}: every packed decode step took the fused path"
    );

    fine_tune_round_trip(family, dir, &prompt);

    // Tensor parallel over two CPU devices computes what one device does.
    let one = tessera_engine::load(&dir.join("hf"), &[Device::Cpu], Some(Kind::Float)).unwrap();
    let two = tessera_engine::load(&dir.join("hf"), &[Device::Cpu; 2], Some(Kind::Float)).unwrap();
    let a = prompt_logits(&one.model, &prompt, Some(&adapter));
    let b = prompt_logits(&two.model, &prompt, Some(&adapter));
    let diff = max_diff(&a, &b);
    assert!(
        diff <= 1e-4,
        "{family}: tensor parallel logits differ by {diff}"
    );
}

#[test]
fn llama_with_llama3_rope_scaling_matches_transformers() {
    check_family("llama");
}

#[test]
fn mistral_with_a_sliding_window_matches_transformers() {
    check_family("mistral");
}

#[test]
fn qwen2_with_qkv_biases_matches_transformers() {
    check_family("qwen2");
}

#[test]
fn qwen3_with_qk_norms_matches_transformers() {
    check_family("qwen3");
}

#[test]
fn gemma2_with_soft_caps_and_alternating_windows_matches_transformers() {
    check_family("gemma2");
}

#[test]
fn gemma3_with_local_and_global_layers_matches_transformers() {
    check_family("gemma3");
}

#[test]
fn phi3_with_fused_modules_matches_transformers() {
    check_family("phi3");
}

/// Trains an adapter on the Hugging Face directory with Tessera, then asks PEFT (on
/// transformers' model) for its greedy ids after `prompt`: they are Tessera's.
fn fine_tune_round_trip(family: &str, dir: &Path, prompt: &[i64]) {
    let loaded = tessera_engine::load(&dir.join("hf"), &[Device::Cpu], Some(Kind::Float)).unwrap();
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data.jsonl");
    let lines: Vec<String> = [
        ("The river", " carried stories."),
        ("A bridge", " of stone and timber."),
        ("Every winter", " the snow came."),
    ]
    .iter()
    .map(|(p, c)| serde_json::json!({"prompt": p, "completion": c}).to_string())
    .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let out = work.path().join("adapter");
    let job = TrainJob {
        dataset_path: data,
        output_path: out.clone(),
        base_model: None,
        hyperparameters: Hyperparameters {
            lora_r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            learning_rate: 5e-3,
            num_epochs: 4,
            batch_size: 3,
            gradient_accumulation_steps: 1,
            warmup_ratio: 0.0,
            lr_scheduler: LrScheduler::Linear,
            max_seq_length: 64,
            ..Hyperparameters::default()
        },
    };
    let mut losses = Vec::new();
    train(
        &loaded.model,
        &loaded.tokenizer,
        &job,
        &TrainOptions::default(),
        |p| losses.push(p.loss),
    )
    .unwrap();
    assert!(
        losses.last().unwrap() < &losses[0],
        "{family}: the loss fell ({losses:?})"
    );
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    eprintln!(
        "{family}: trained {:?}, loss {:.3} → {:.3}",
        config["target_modules"],
        losses[0],
        losses.last().unwrap()
    );
    let n = 8;
    let ours = greedy_steps(&loaded.model, prompt, n, Some(&out));
    let python = std::env::var("TESSERA_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = r#"
import json, sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
model = PeftModel.from_pretrained(model, sys.argv[2]).eval()
seq = json.loads(sys.argv[3])
n = len(seq)
with torch.no_grad():
    logits = model(torch.tensor([seq])).logits[0].tolist()
    for _ in range(int(sys.argv[4])):
        seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
print(json.dumps({"greedy": seq[n:], "logits": logits}))
"#;
    let run = Command::new(python)
        .args(["-c", script])
        .arg(dir.join("hf"))
        .arg(&out)
        .arg(serde_json::to_string(prompt).unwrap())
        .arg(n.to_string())
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{family}: PEFT failed to load the adapter: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let peft: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(
        ours,
        ids(&peft["greedy"]),
        "{family}: greedy ids with the trained adapter, Tessera vs PEFT"
    );
    let tuned = prompt_logits(&loaded.model, prompt, Some(&out));
    let diff = max_diff(&tuned, &matrix(&peft["logits"]));
    assert!(
        diff <= TOLERANCE,
        "{family}: logits with the trained adapter, Tessera vs PEFT, differ by {diff}"
    );
    let moved = max_diff(&tuned, &prompt_logits(&loaded.model, prompt, None));
    assert!(
        moved > 0.1,
        "{family}: the trained adapter moves the logits ({moved})"
    );
}
