//! `tessera generate` and `tessera train` on SmolLM2, as a user runs them.

use std::process::Command;

#[path = "../engine/tests/common/reference.rs"]
mod reference;
use reference::{reference, smollm2_path as smollm2};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

fn tessera(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap()
}

#[test]
fn generate_json_gives_the_reference_greedy_tokens() {
    let case = &reference()["base"][0];
    let model = smollm2();
    let out = tessera(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        case["prompt"].as_str().unwrap(),
        "--max-tokens",
        "8",
        "--ignore-eos",
        "--top-logprobs",
        "2",
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["prompt_ids"], case["input_ids"]);
    let want: Vec<_> = case["greedy_20_ids"].as_array().unwrap()[..8].to_vec();
    assert_eq!(v["generated_ids"].as_array().unwrap(), &want);
    assert_eq!(v["finish_reason"], "length");
    let lp = &v["logprobs"][0];
    assert_eq!(lp["top_logprobs"].as_object().unwrap().len(), 2);
    assert!(lp["logprob"].as_f64().unwrap() <= 0.0);
}

#[test]
fn train_writes_an_adapter_that_generate_serves() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"Say hi:\", \"completion\": \" hi\"}\n",
    )
    .unwrap();
    let out_dir = dir.path().join("adapter");
    let model = smollm2();
    let out = tessera(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--dataset",
        data.to_str().unwrap(),
        "--output",
        out_dir.to_str().unwrap(),
        "--hyperparameters",
        r#"{"num_epochs": 2, "lora_r": 4}"#,
        "--",
        "--batch_size",
        "1",
        "--target_modules",
        "q_proj,v_proj",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Not a terminal: one JSON progress line per step.
    let steps: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v.get("step").is_some())
        .collect();
    assert_eq!(steps.len(), 2, "{stdout}");
    assert_eq!(steps[1]["total_steps"], 2);
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["r"], 4);
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );
    let out = tessera(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "Say hi:",
        "--max-tokens",
        "3",
        "--adapter",
        out_dir.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn train_refuses_a_bad_hyperparameter_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = tessera(&[
        "train",
        "--dataset",
        "x.jsonl",
        "--output",
        dir.path().to_str().unwrap(),
        "--",
        "--lora_rank",
        "8",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("lora_rank"), "{stderr}");
}
