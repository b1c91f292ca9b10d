//! A fine-tune whose loss stops being a number (issue 27, item 3), on a real head on loopback: the
//! job fails naming the step, the job store never holds a non-finite value, `GET /jobs` keeps
//! answering, and a restarted head starts healthy with the job still failed. `lora_alpha` is
//! bounded at submit.

mod support;

use std::time::Duration;

use serde_json::json;
use support::{quick_hyperparameters, start};
use tch::Tensor;

#[test]
fn a_diverging_run_fails_naming_the_step_and_the_head_keeps_serving_its_jobs() {
    let head = start(&[]);
    head.write_dataset("d.jsonl", 8);
    // A base model whose lm_head overflows float32: the first step's logits are infinite and its
    // loss is not a number.
    let base = support::tiny::write_model(&head.dir.path().join("models/overflow"), 7);
    let file = base.join("model.safetensors");
    let tensors: Vec<(String, Tensor)> = Tensor::read_safetensors(&file)
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            let t = if name == "lm_head.weight" {
                t * 1e38
            } else {
                t
            };
            (name, t)
        })
        .collect();
    Tensor::write_safetensors(&tensors, &file).unwrap();

    let (status, body) = head.post(
        "/fine-tune",
        &json!({"dataset_path": "d.jsonl", "output_path": "diverged", "base_model": "overflow",
                "hyperparameters": quick_hyperparameters(2)}),
    );
    assert_eq!(status, 202, "{body}");
    let id = body["job_id"].as_str().unwrap().to_string();
    let job = head.wait_job(&id, Duration::from_secs(120));
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap_or_else(|| panic!("{job}"));
    assert!(
        error.contains("the loss became non-finite at step 1"),
        "{error}"
    );
    // Another job beside it runs to the end on the served model.
    let (status, body) = head.post(
        "/fine-tune",
        &json!({"dataset_path": "d.jsonl", "output_path": "fine",
                "hyperparameters": quick_hyperparameters(1)}),
    );
    assert_eq!(status, 202, "{body}");
    let fine = body["job_id"].as_str().unwrap().to_string();
    assert_eq!(
        head.wait_job(&fine, Duration::from_secs(120))["status"],
        "succeeded"
    );
    let (status, list) = head.get("/jobs");
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["jobs"].as_array().unwrap().len(), 2, "{list}");
    let (status, events) = head.get_text(&format!("/jobs/{id}/events"));
    assert!(status < 500, "{status} {events}");

    // A head restarted on the same database starts healthy, with both jobs as they ended.
    let head = head.restart(&[]);
    assert_eq!(head.get("/health").0, 200);
    assert_eq!(head.get(&format!("/jobs/{id}")).1["status"], "failed");
    assert_eq!(head.get(&format!("/jobs/{fine}")).1["status"], "succeeded");
    assert_eq!(head.get("/jobs").0, 200);

    // A scale that only diverges is refused at submit, naming the field.
    let mut h = quick_hyperparameters(1);
    h["lora_alpha"] = json!(1e9);
    let (status, e) = head.post(
        "/fine-tune",
        &json!({"dataset_path": "d.jsonl", "output_path": "big", "hyperparameters": h}),
    );
    assert_eq!(status, 422, "{e}");
    assert_eq!(e["error"]["field"], "hyperparameters.lora_alpha", "{e}");
}
