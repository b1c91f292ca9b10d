//! A head serving SmolLM2's Q4_1 file with `model.quantization = "packed"` (issue 14), end to end:
//! `/cluster` says how each replica holds its weights, `/chat` answers, and a fine-tune job with
//! `base_quantization = "packed"` (QLoRA) runs through the trainer actor on the 4-bit base; its
//! adapter is served at once by the packed replica (`/v1/completions`, the job id as the model)
//! and reproduces what it learned.

mod support;

use std::time::Duration;

use serde_json::json;

const PROMPT: &str = "The secret word of Tessera is";
const ANSWER: &str = " pineapple42";

#[test]
fn a_packed_head_serves_and_fine_tunes_on_its_four_bit_base() {
    let dir = tempfile::tempdir().unwrap();
    let head = support::start_in(dir, support::smollm2(), &["model.quantization=\"packed\""]);
    let (status, cluster) = head.get("/cluster");
    assert_eq!(status, 200, "{cluster}");
    let weights = cluster["replicas"][0]["weights"]
        .as_str()
        .unwrap_or_default();
    assert!(weights.contains("120/120 projections 4-bit"), "{cluster}");
    assert!(weights.contains("embedding Q8_0"), "{weights}");

    // The raw prompt, as trained (`/chat` would wrap it in the chat template).
    let greedy = |model: Option<&str>| {
        let mut body = json!({"prompt": PROMPT, "max_tokens": 6, "temperature": 0});
        if let Some(m) = model {
            body["model"] = json!(m);
        }
        let (status, answer) = head.post("/v1/completions", &body);
        assert_eq!(status, 200, "{answer}");
        answer["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let before = greedy(None);
    assert!(!before.starts_with(ANSWER), "{before}");

    std::fs::create_dir_all(&head.data).unwrap();
    std::fs::write(
        head.data.join("secret.jsonl"),
        json!({"prompt": PROMPT, "completion": ANSWER}).to_string() + "\n",
    )
    .unwrap();
    let (status, accepted) = head.post(
        "/fine-tune",
        &json!({
            "dataset_path": "secret.jsonl",
            "output_path": "qlora",
            "hyperparameters": {
                "base_quantization": "packed",
                "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                "target_modules": ["q_proj", "v_proj", "o_proj", "down_proj"],
                "learning_rate": 3e-3, "num_epochs": 20, "batch_size": 1,
                "gradient_accumulation_steps": 1, "warmup_ratio": 0.0, "lr_scheduler": "linear"
            }
        }),
    );
    assert_eq!(status, 202, "{accepted}");
    let id = accepted["job_id"].as_str().unwrap();
    let job = head.wait_job(id, Duration::from_secs(600));
    assert_eq!(job["status"], "succeeded", "{job}");
    let history = job["history"].as_array().unwrap();
    let (first, last) = (
        history[0]["loss"].as_f64().unwrap(),
        history.last().unwrap()["loss"].as_f64().unwrap(),
    );
    assert!(last < 0.1 * first, "loss {first} → {last}");
    // The job's id names its adapter on the packed replica.
    let after = greedy(Some(id));
    assert!(after.starts_with(ANSWER), "{after}");
}
