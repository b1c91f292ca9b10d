//! LoRA SFT on a tiny random model: it learns, masks what it should, resumes exactly (falling back
//! past a torn checkpoint), keeps `save_total_limit` checkpoints, cancels within a step, stops a
//! superseded attempt without writing, reports bad lines by number, leaves the base untouched, and
//! writes a PEFT adapter that the inference engine serves.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::tiny;
use serde_json::json;
use tch::{Device, Kind};
use tessera_engine::lora::LoraAdapter;
use tessera_engine::train::dataset;
use tessera_engine::train::{
    train, Hyperparameters, LrScheduler, Progress, TrainJob, TrainOptions, TrainOutcome,
};

const WORDS: [&str; 16] = [
    "alpha one",
    "bravo two",
    "charlie 3",
    "delta four",
    "echo five",
    "foxtrot 6",
    "golf seven",
    "hotel 8",
    "india nine",
    "juliet 10",
    "kilo 11",
    "lima twelve",
    "mike 13",
    "november",
    "oscar 15",
    "papa sixteen",
];

fn write_jsonl(path: &Path, lines: &[serde_json::Value]) -> PathBuf {
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(path, text.join("\n") + "\n").unwrap();
    path.to_path_buf()
}

fn quick() -> Hyperparameters {
    Hyperparameters {
        lora_r: 8,
        lora_alpha: 16.0,
        lora_dropout: 0.0,
        learning_rate: 1e-2,
        num_epochs: 2,
        batch_size: 4,
        gradient_accumulation_steps: 1,
        max_seq_length: 64,
        warmup_ratio: 0.0,
        lr_scheduler: LrScheduler::Constant,
        gradient_checkpointing: false,
        ..Hyperparameters::default()
    }
}

struct Setup {
    dir: tempfile::TempDir,
    model: tessera_engine::model::Model,
    tokenizer: tessera_engine::tokenizer::Tokenizer,
    model_dir: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = tiny::write_model(&dir.path().join("model"), 21);
    let loaded = tessera_engine::load(&model_dir, &[Device::Cpu], Some(Kind::Float)).unwrap();
    Setup {
        dir,
        model: loaded.model,
        tokenizer: loaded.tokenizer,
        model_dir,
    }
}

fn job(s: &Setup, dataset: PathBuf, out: &str, hyperparameters: Hyperparameters) -> TrainJob {
    TrainJob {
        dataset_path: dataset,
        output_path: s.dir.path().join(out),
        base_model: None,
        hyperparameters,
    }
}

/// A job that must fail before training: its error text.
fn failure(s: &Setup, job: &TrainJob) -> String {
    train(
        &s.model,
        &s.tokenizer,
        job,
        &TrainOptions::default(),
        |_| {},
    )
    .unwrap_err()
    .to_string()
}

fn run(s: &Setup, job: &TrainJob, options: &TrainOptions) -> (TrainOutcome, Vec<Progress>) {
    let mut history = Vec::new();
    let outcome = train(&s.model, &s.tokenizer, job, options, |p| {
        history.push(p.clone())
    })
    .unwrap();
    (outcome, history)
}

fn text_dataset(s: &Setup) -> PathBuf {
    let lines: Vec<_> = WORDS.iter().map(|w| json!({ "text": w })).collect();
    write_jsonl(&s.dir.path().join("words.jsonl"), &lines)
}

#[test]
fn loss_falls_below_a_tenth_and_the_base_is_untouched() {
    let s = setup();
    let before: Vec<tch::Tensor> = s.model.base_tensors().iter().map(|t| t.copy()).collect();
    let h = Hyperparameters {
        num_epochs: 40,
        ..quick()
    };
    let job = job(&s, text_dataset(&s), "out", h);
    let (outcome, history) = run(&s, &job, &TrainOptions::default());
    let TrainOutcome::Completed(summary) = outcome else {
        panic!("not completed")
    };
    let first = history[0].loss;
    let last = history.last().unwrap().loss;
    assert!(last < 0.1 * first, "loss {first} → {last}");
    assert_eq!(summary.steps, 160);
    for (a, b) in before.iter().zip(s.model.base_tensors()) {
        assert!(a.equal(&b), "base weights changed");
    }
    // The adapter is in PEFT's format and the engine loads it.
    let out = &job.output_path;
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "training_summary.json",
    ] {
        assert!(out.join(f).exists(), "{f}");
    }
    let adapter = LoraAdapter::load(out, s.model.config()).unwrap();
    assert_eq!((adapter.rank, adapter.targets.len()), (8, 7));
    assert!(out
        .join("checkpoint-160")
        .join("optimizer.safetensors")
        .exists());
}

#[test]
fn prompt_completion_and_messages_train_only_the_answer_and_its_end() {
    let s = setup();
    let path = write_jsonl(
        &s.dir.path().join("mixed.jsonl"),
        &[
            json!({"prompt": "Q: hi", "completion": " A: yo"}),
            json!({"messages": [
                {"role": "user", "content": "hey"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "more"},
                {"role": "assistant", "content": "no"},
            ]}),
            json!({"text": "all of it"}),
        ],
    );
    let data = dataset::load(&path, &s.tokenizer, 512, false, &Default::default()).unwrap();
    let trained = |e: &dataset::Example| -> String {
        let ids: Vec<u32> = e
            .ids
            .iter()
            .zip(&e.supervised)
            .filter(|(_, s)| **s)
            .map(|(i, _)| *i)
            .collect();
        s.tokenizer.decode(&ids, false).unwrap()
    };
    let [pc, chat, text] = &data.examples[..] else {
        panic!("three examples")
    };
    assert_eq!(
        s.tokenizer.decode(&pc.ids, false).unwrap(),
        "Q: hi A: yo</s>"
    );
    assert_eq!(trained(pc), " A: yo</s>");
    // The tiny template: <|role|>content</s> per turn, `<|assistant|>` as generation prompt.
    assert_eq!(
        s.tokenizer.decode(&chat.ids, false).unwrap(),
        "<|user|>hey</s><|assistant|>ok</s><|user|>more</s><|assistant|>no</s>"
    );
    assert_eq!(trained(chat), "ok</s>no</s>");
    assert_eq!(trained(text), "all of it</s>");
    assert!(!text.supervised.is_empty() && text.supervised.iter().all(|&s| s));
}

/// A `messages` line with OpenAI's `tools`, an assistant `tool_calls` turn and a `tool` turn: the
/// template (which knows no tools here) gets the Hermes tool prompt, the call is trained in the
/// Hermes format, the tool's answer is not trained, the final answer is.
#[test]
fn tool_calls_in_messages_train_the_family_format() {
    let s = setup();
    let path = write_jsonl(
        &s.dir.path().join("tools.jsonl"),
        &[json!({
            "tools": [{"type": "function", "function": {"name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
            "messages": [
                {"role": "user", "content": "weather in Paris?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                {"role": "assistant", "content": "It is sunny."},
            ]
        })],
    );
    let data = dataset::load(&path, &s.tokenizer, 1024, false, &Default::default()).unwrap();
    let e = &data.examples[0];
    let part = |train: bool| -> String {
        let ids: Vec<u32> = e
            .ids
            .iter()
            .zip(&e.supervised)
            .filter(|(_, s)| **s == train)
            .map(|(i, _)| *i)
            .collect();
        s.tokenizer.decode(&ids, false).unwrap()
    };
    let (trained, context) = (part(true), part(false));
    assert_eq!(
        trained,
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\":\"Paris\"}}\n</tool_call></s>It is sunny.</s>"
    );
    assert!(
        context.contains("<tools>") && context.contains("get_weather"),
        "{context}"
    );
    assert!(
        context.contains("<tool_response>\nsunny\n</tool_response>"),
        "{context}"
    );
}

#[test]
fn bad_lines_are_reported_by_number_or_skipped() {
    let s = setup();
    let path = s.dir.path().join("bad.jsonl");
    std::fs::write(
        &path,
        "{\"text\": \"fine\"}\n{\"text\": \"also fine\"}\nnot json\n{\"prompt\": \"p\"}\n{\"text\": \"\"}\n",
    )
    .unwrap();
    let err = dataset::load(&path, &s.tokenizer, 64, false, &Default::default()).unwrap_err();
    assert!(err.to_string().contains("line 3"), "{err}");
    let data = dataset::load(&path, &s.tokenizer, 64, true, &Default::default()).unwrap();
    assert_eq!(data.examples.len(), 2);
    let lines: Vec<usize> = data.skipped.iter().map(|(l, _)| *l).collect();
    assert_eq!(lines, vec![3, 4, 5]);
    // A job on it fails before training, naming the line.
    let job = job(&s, path, "out", quick());
    let err = failure(&s, &job);
    assert!(err.contains("line 3"), "{err}");
    assert!(!job.output_path.join("adapter_model.safetensors").exists());
}

#[test]
fn resume_repeats_the_uninterrupted_loss_curve() {
    let s = setup();
    let h = Hyperparameters {
        num_epochs: 3,
        lora_dropout: 0.1,
        gradient_accumulation_steps: 2,
        batch_size: 2,
        save_every_steps: 2,
        lr_scheduler: LrScheduler::Cosine,
        warmup_ratio: 0.2,
        ..quick()
    };
    let data = text_dataset(&s);
    let job = |name: &str| job(&s, data.clone(), name, h.clone());
    let (_, full) = run(&s, &job("full"), &TrainOptions::default());
    assert_eq!(full.len(), 12);

    // Cancelled after step 5: the checkpoint of step 4 remains; resume runs 5..12 again.
    let cancel = Arc::new(AtomicBool::new(false));
    let options = TrainOptions {
        cancel: cancel.clone(),
        ..TrainOptions::default()
    };
    let broken = job("broken");
    let mut seen = Vec::new();
    let outcome = train(&s.model, &s.tokenizer, &broken, &options, |p| {
        seen.push(p.clone());
        if p.step == 5 {
            cancel.store(true, Ordering::Relaxed);
        }
    })
    .unwrap();
    let TrainOutcome::Cancelled {
        step,
        last_checkpoint,
    } = outcome
    else {
        panic!("not cancelled")
    };
    assert_eq!(step, 5, "stops within one step of the cancel");
    assert_eq!(
        last_checkpoint.unwrap().file_name().unwrap(),
        "checkpoint-4"
    );
    let options = TrainOptions {
        resume: true,
        ..TrainOptions::default()
    };
    let (outcome, resumed) = run(&s, &broken, &options);
    let TrainOutcome::Completed(summary) = outcome else {
        panic!("not completed")
    };
    assert_eq!(summary.resumed_from_step, Some(4));
    assert_eq!(resumed.first().unwrap().step, 5);
    for (a, b) in full[4..].iter().zip(&resumed) {
        assert_eq!(a.step, b.step);
        assert!(
            (a.loss - b.loss).abs() < 1e-6,
            "step {}: {} vs {}",
            a.step,
            a.loss,
            b.loss
        );
    }
}

#[test]
fn recomputing_layers_gives_the_same_training() {
    let s = setup();
    let data = text_dataset(&s);
    let go = |checkpointing: bool, name: &str| {
        let h = Hyperparameters {
            num_epochs: 1,
            lora_dropout: 0.1,
            gradient_checkpointing: checkpointing,
            ..quick()
        };
        let job = job(&s, data.clone(), name, h);
        let (_, history) = run(&s, &job, &TrainOptions::default());
        let adapter = tessera_engine::weights::read_safetensors(
            &job.output_path.join("adapter_model.safetensors"),
        )
        .unwrap();
        (history, adapter)
    };
    let (plain, a) = go(false, "plain");
    let (recomputed, b) = go(true, "recomputed");
    for (x, y) in plain.iter().zip(&recomputed) {
        assert!((x.loss - y.loss).abs() < 1e-5, "{} vs {}", x.loss, y.loss);
    }
    let b: std::collections::HashMap<String, tch::Tensor> = b.into_iter().collect();
    assert_eq!(a.len(), b.len());
    for (name, x) in &a {
        let y = &b[name];
        let diff = (x - y).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{name}: {diff}");
        if name.ends_with("lora_B.weight") {
            assert!(
                x.abs().max().double_value(&[]) > 0.0,
                "{name} never trained"
            );
        }
    }
}

#[test]
fn bad_hyperparameters_name_the_field() {
    let err = Hyperparameters::from_json(json!({"lora_r": 8, "learning_rte": 0.1})).unwrap_err();
    assert_eq!(err.field, "learning_rte");
    let err = Hyperparameters::from_json(json!({"num_epochs": 0})).unwrap_err();
    assert_eq!(err.field, "num_epochs");
    let s = setup();
    let err = failure(
        &s,
        &job(&s, s.model_dir.join("missing.jsonl"), "out", quick()),
    );
    assert!(err.contains("missing.jsonl"), "{err}");
}

/// Trains `job` with `options`, cancelling after `stop_at` steps; the checkpoints it left.
fn run_until(s: &Setup, job: &TrainJob, options: &TrainOptions, stop_at: usize) -> Vec<String> {
    let cancel = options.cancel.clone();
    let outcome = train(&s.model, &s.tokenizer, job, options, |p| {
        if p.step == stop_at {
            cancel.store(true, Ordering::Relaxed);
        }
    })
    .unwrap();
    assert!(
        matches!(outcome, TrainOutcome::Cancelled { .. }),
        "{outcome:?}"
    );
    checkpoint_names(&job.output_path)
}

fn checkpoint_names(out: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    names.sort();
    names
}

#[test]
fn resume_falls_back_to_an_earlier_checkpoint_and_only_the_newest_are_kept() {
    let s = setup();
    let h = Hyperparameters {
        num_epochs: 3,
        save_every_steps: 1,
        save_total_limit: 2,
        ..quick()
    };
    let job = job(&s, text_dataset(&s), "fallback", h);
    let kept = run_until(&s, &job, &TrainOptions::default(), 5);
    assert_eq!(
        kept,
        ["checkpoint-4", "checkpoint-5"],
        "save_total_limit = 2"
    );

    // The newest checkpoint is torn (a crash, a bad disk): resume takes the one before it.
    let torn = job.output_path.join("checkpoint-5/optimizer.safetensors");
    std::fs::write(&torn, b"not a safetensors file").unwrap();
    let options = TrainOptions {
        resume: true,
        ..TrainOptions::default()
    };
    let (outcome, history) = run(&s, &job, &options);
    let TrainOutcome::Completed(summary) = outcome else {
        panic!("not completed")
    };
    assert_eq!(summary.resumed_from_step, Some(4));
    assert_eq!(history.first().unwrap().step, 5);
    assert_eq!(
        checkpoint_names(&job.output_path),
        ["checkpoint-11", "checkpoint-12"]
    );

    // The default keeps three.
    assert_eq!(Hyperparameters::default().save_total_limit, 3);
}

#[test]
fn a_superseded_attempt_stops_without_writing() {
    let s = setup();
    let h = Hyperparameters {
        num_epochs: 3,
        save_every_steps: 2,
        ..quick()
    };
    let job = job(&s, text_dataset(&s), "fenced", h);
    // Attempt 2 runs first (attempt 1 was re-queued after its node was lost) ...
    let attempt2 = TrainOptions {
        attempt: 2,
        ..TrainOptions::default()
    };
    run_until(&s, &job, &attempt2, 3);
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(job.output_path.join("checkpoint-2/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["attempt"], 2, "checkpoints carry their attempt");
    let listing = |p: &Path| -> Vec<(String, std::time::SystemTime)> {
        let mut v: Vec<_> = walk(p)
            .into_iter()
            .map(|f| {
                let m = std::fs::metadata(&f).unwrap().modified().unwrap();
                (f.display().to_string(), m)
            })
            .collect();
        v.sort();
        v
    };
    let before = listing(&job.output_path);
    // ... then the old attempt 1 comes back: it must not touch the directory.
    let attempt1 = TrainOptions {
        attempt: 1,
        resume: true,
        ..TrainOptions::default()
    };
    let e = train(&s.model, &s.tokenizer, &job, &attempt1, |_| {}).unwrap_err();
    assert!(e.to_string().contains("superseded"), "{e}");
    assert_eq!(listing(&job.output_path), before);

    // A run the job manager marks stale stops at its next step, writing nothing either.
    let stale = Arc::new(AtomicBool::new(false));
    let attempt3 = TrainOptions {
        attempt: 3,
        resume: true,
        stale: stale.clone(),
        ..TrainOptions::default()
    };
    let mut steps = Vec::new();
    let e = train(&s.model, &s.tokenizer, &job, &attempt3, |p| {
        steps.push(p.step);
        stale.store(true, Ordering::Relaxed);
    })
    .unwrap_err();
    assert!(e.to_string().contains("superseded"), "{e}");
    assert_eq!(
        steps,
        [3],
        "stopped after the step during which it was told"
    );
    assert_eq!(checkpoint_names(&job.output_path), ["checkpoint-2"]);
    assert!(!job.output_path.join("adapter_model.safetensors").exists());
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}
