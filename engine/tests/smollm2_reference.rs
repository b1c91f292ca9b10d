//! SmolLM2-135M-Instruct (the GGUF file) against the ground truth transformers + PEFT make from it
//! (`scripts/make-reference.sh`, read through `common::reference_dir`): token ids, chat template
//! text, logits, greedy continuations, with and without the reference's seeded PEFT adapter.

mod common;

use std::sync::{Arc, OnceLock};

use serde_json::Value;
use tch::{Device, Kind, Tensor};
use tessera_engine::engine::{Engine, EngineConfig, GenerateRequest};
use tessera_engine::lora::{LoraAdapter, LoraBatch};
use tessera_engine::model::{Logits, Model};
use tessera_engine::tokenizer::Tokenizer;
use tessera_engine::{ChatMessage, SamplingParams};

struct Fixture {
    engine: Engine,
    expected: Value,
}

/// One engine for the whole file: loading the model is the slow part.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let loaded =
            tessera_engine::load(&common::smollm2_path(), &[Device::Cpu], Some(Kind::Float))
                .expect("load SmolLM2");
        let text = std::fs::read_to_string(common::reference_dir().join("expected.json")).unwrap();
        Fixture {
            engine: Engine::start(loaded.model, loaded.tokenizer, EngineConfig::default()),
            expected: serde_json::from_str(&text).unwrap(),
        }
    })
}

/// The token ids of a reference case, checking the chat template on the way.
fn input_ids(tokenizer: &Tokenizer, case: &Value) -> Vec<u32> {
    match case["kind"].as_str().unwrap() {
        "raw" => tokenizer
            .encode(case["prompt"].as_str().unwrap(), true)
            .unwrap(),
        "chat" => {
            // Adapter cases carry only the rendered prompt; base cases the messages too.
            let text = match case.get("messages") {
                Some(m) => {
                    let messages: Vec<ChatMessage> = serde_json::from_value(m.clone()).unwrap();
                    let text = tokenizer.apply_chat_template(&messages, true).unwrap();
                    assert_eq!(
                        text,
                        case["templated"].as_str().unwrap(),
                        "chat template text"
                    );
                    text
                }
                None => case["prompt"].as_str().unwrap().to_string(),
            };
            tokenizer.encode(&text, false).unwrap()
        }
        other => panic!("unknown case kind {other}"),
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Checks prompt logits of every case of `cases` (with `adapter` applied to every row).
fn check_logits(model: &Model, cases: &Value, adapter: Option<&str>, tolerance: f32) {
    let f = fixture();
    let tokenizer = f.engine.tokenizer();
    let loaded_adapter = adapter.map(|rel| {
        let dir = common::reference_dir().join(rel);
        let config = f.engine.model_config();
        Arc::new(
            LoraAdapter::load(&dir, config)
                .unwrap()
                .place(&[Device::Cpu], Kind::Float),
        )
    });
    for case in cases.as_array().unwrap() {
        let prompt = input_ids(tokenizer, case);
        assert_eq!(
            prompt,
            ids(&case["input_ids"]),
            "token ids of {}",
            case["prompt"]
        );
        let lora = loaded_adapter.as_ref().and_then(|a| {
            LoraBatch::new(
                std::slice::from_ref(a),
                &[Some(0)],
                model.config().num_hidden_layers,
                &[Device::Cpu],
                Kind::Float,
            )
        });
        let tokens =
            Tensor::from_slice(&prompt.iter().map(|&t| t as i64).collect::<Vec<_>>()).view([1, -1]);
        let mut cache = model.new_cache(1, prompt.len() as i64);
        let logits =
            tch::no_grad(|| model.forward(&tokens, &[0], &mut cache, lora.as_ref(), Logits::All))
                .squeeze_dim(0);
        for (pos, want) in case["logits_at_positions"].as_object().unwrap() {
            let p: i64 = pos.parse().unwrap();
            let got: Vec<f32> = logits.get(p).narrow(0, 0, 8).try_into().unwrap();
            for (g, w) in got.iter().zip(floats(want)) {
                assert!(
                    (g - w).abs() <= tolerance,
                    "position {p}: {got:?} vs {want}"
                );
            }
        }
        let last = logits.get(prompt.len() as i64 - 1);
        let (values, top) = last.topk(10, -1, true, true);
        let top: Vec<i64> = top.try_into().unwrap();
        let values: Vec<f32> = values.try_into().unwrap();
        let want = &case["last_logits_top10"];
        assert_eq!(
            top.iter().map(|&t| t as u32).collect::<Vec<_>>(),
            ids(&want["ids"]),
            "top-10 ids of {}",
            case["prompt"]
        );
        for (g, w) in values.iter().zip(floats(&want["values"])) {
            assert!(
                (g - w).abs() <= tolerance,
                "top-10 values {values:?} vs {}",
                want["values"]
            );
        }
    }
}

/// Greedy 20 tokens through the engine (continuous batching: all cases in one batch).
fn check_greedy(cases: &Value, adapter: Option<&str>) {
    let f = fixture();
    let tokenizer = f.engine.tokenizer();
    let generations: Vec<_> = cases
        .as_array()
        .unwrap()
        .iter()
        .map(|case| {
            let params = SamplingParams {
                ignore_eos: true,
                ..SamplingParams::greedy(20)
            };
            let request = GenerateRequest {
                resume: Vec::new(),
                prompt: input_ids(tokenizer, case),
                params,
                adapter: adapter.map(|rel| common::reference_dir().join(rel)),
            };
            (case, f.engine.submit(request).unwrap())
        })
        .collect();
    for (case, generation) in generations {
        let done = generation.wait().unwrap();
        let got: Vec<u32> = done.tokens.iter().map(|s| s.token).collect();
        assert_eq!(
            got,
            ids(&case["greedy_20_ids"]),
            "greedy ids of {}",
            case["prompt"]
        );
        assert_eq!(
            tokenizer.decode(&got, false).unwrap(),
            case["greedy_20_text"].as_str().unwrap()
        );
    }
}

/// Full-prompt logits, base then adapter (the engine owns its model; this test loads a second).
#[test]
fn logits_match_transformers_and_peft() {
    let model = tessera_engine::load(&common::smollm2_path(), &[Device::Cpu], Some(Kind::Float))
        .unwrap()
        .model;
    check_logits(&model, &fixture().expected["base"], None, 1e-3);
    let a = &fixture().expected["adapters"][0];
    check_logits(&model, &a["cases"], Some(a["path"].as_str().unwrap()), 2e-3);
}

#[test]
fn base_greedy_matches_transformers() {
    check_greedy(&fixture().expected["base"], None);
}

#[test]
fn adapter_greedy_matches_peft() {
    let a = &fixture().expected["adapters"][0];
    check_greedy(&a["cases"], Some(a["path"].as_str().unwrap()));
}
