//! Round trip on the real model: a few LoRA steps on SmolLM2 memorise one answer; the inference
//! engine loads the saved adapter, its logits differ from the base, and greedy decoding with it
//! reproduces the memorised text.

mod common;

use serde_json::json;
use tch::{Device, Kind};
use tessera_engine::engine::{Engine, EngineConfig, GenerateRequest};
use tessera_engine::train::{train, TrainJob, TrainOptions, TrainOutcome};
use tessera_engine::SamplingParams;

const PROMPT: &str = "The secret word of Tessera is";
const ANSWER: &str = " pineapple42";

#[test]
fn a_trained_adapter_is_served_and_reproduces_what_it_learned() {
    let dir = tempfile::tempdir().unwrap();
    let loaded =
        tessera_engine::load(&common::smollm2_path(), &[Device::Cpu], Some(Kind::Float)).unwrap();
    let data = dir.path().join("secret.jsonl");
    std::fs::write(
        &data,
        json!({"prompt": PROMPT, "completion": ANSWER}).to_string() + "\n",
    )
    .unwrap();
    let out = dir.path().join("adapter");
    let job = TrainJob {
        dataset_path: data,
        output_path: out.clone(),
        base_model: None,
        hyperparameters: common::memorising(common::MEMORISING_EPOCHS),
    };
    let mut losses = Vec::new();
    let outcome = train(
        &loaded.model,
        &loaded.tokenizer,
        &job,
        &TrainOptions::default(),
        |p| losses.push(p.loss),
    )
    .unwrap();
    assert!(matches!(outcome, TrainOutcome::Completed(_)));
    common::assert_memorised(&losses);

    let engine = Engine::start(loaded.model, loaded.tokenizer, EngineConfig::default());
    let prompt = engine.tokenizer().encode(PROMPT, true).unwrap();
    let answer_len = engine.tokenizer().encode(ANSWER, false).unwrap().len();
    let generate = |adapter: Option<std::path::PathBuf>| {
        engine
            .submit(GenerateRequest {
                resume: Vec::new(),
                prompt: prompt.clone(),
                params: SamplingParams {
                    top_logprobs: 5,
                    ..SamplingParams::greedy(answer_len)
                },
                adapter,
            })
            .unwrap()
            .wait()
            .unwrap()
    };
    let base = generate(None);
    let tuned = generate(Some(out.clone()));
    assert_eq!(tuned.text, ANSWER, "greedy with the adapter");
    assert_ne!(base.text, ANSWER, "the base model did not know it");
    let delta = (tuned.tokens[0].logprob - base.tokens[0].logprob).abs();
    assert!(
        tuned.tokens[0].token != base.tokens[0].token || delta > 1e-3,
        "the adapter changes the distribution"
    );
}
