//! Model deployments at runtime on a real head (actor tree + HTTP) on a CPU node with two
//! inference slots: the model given at start is the first deployment (one replica); a second tiny
//! model is deployed on the free slot and answers requests that name it (`/chat`, OpenAI routes);
//! bad deployments are refused with the field; one that finds no free slot, or no node with its
//! tags, waits with the reason; deleting a deployment drains its in-flight request, frees its
//! slot, and the waiting deployment takes it; a restarted head restores what was deployed.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use support::Head;

const OVERRIDES: &[&str] = &["resources.cpu_inference_slots=2", "model.replicas=1"];

fn deployment(head: &Head, name: &str) -> Value {
    head.get(&format!("/models/{name}")).1
}

fn wait_state(head: &Head, name: &str, state: &str) -> Value {
    head.wait_until(&format!("{name} {state}"), Duration::from_secs(60), |h| {
        deployment(h, name)["state"] == state
    });
    deployment(head, name)
}

fn chat(head: &Head, model: Option<&str>, max_tokens: usize) -> (u16, Value) {
    let mut body = json!({"prompt": "hello there", "max_tokens": max_tokens, "temperature": 0});
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    head.post("/chat", &body)
}

#[test]
fn deployments_are_created_served_deleted_and_restored() {
    let head = support::start(OVERRIDES);
    let models_root = head.dir.path().join("models");
    support::tiny::write_model(&models_root.join("tiny2"), 11);
    std::fs::create_dir_all(models_root.join("not-a-model")).unwrap();

    // The model given at start is the default deployment, on one of the two slots (its view is
    // published on the manager's next tick after the replica loads).
    wait_state(&head, "model", "ready");
    let (code, list) = head.get("/models");
    assert_eq!(code, 200, "{list}");
    let all = list["deployments"].as_array().unwrap();
    assert_eq!(all.len(), 1, "{list}");
    assert_eq!(all[0]["name"], "model");
    assert_eq!(all[0]["default"], true);
    assert_eq!(all[0]["state"], "ready", "{list}");
    assert_eq!(all[0]["replicas"], json!(["inference-0"]));

    // A second model on the free slot.
    let (code, d) = head.post("/models", &json!({"name": "tiny2", "path": "tiny2"}));
    assert_eq!(code, 202, "{d}");
    assert!(d["state"] == "deploying" || d["state"] == "ready", "{d}");
    let d = wait_state(&head, "tiny2", "ready");
    assert_eq!(d["replicas"], json!(["inference-1"]), "{d}");

    // Requests choose by `model`.
    let (code, a) = chat(&head, Some("tiny2"), 12);
    assert_eq!(code, 200, "{a}");
    assert_eq!(a["replica"], "inference-1", "{a}");
    assert_eq!(a["model"], "tiny2", "{a}");
    let (code, b) = chat(&head, None, 12);
    assert_eq!(code, 200, "{b}");
    assert_eq!(b["replica"], "inference-0", "{b}");
    assert_eq!(b["model"], "model", "{b}");
    assert_ne!(a["text"], b["text"], "two different models answered alike");
    let (code, oa) = head.post(
        "/v1/chat/completions",
        &json!({"model": "tiny2", "messages": [{"role": "user", "content": "hello there"}],
                "max_tokens": 12, "temperature": 0}),
    );
    assert_eq!(code, 200, "{oa}");
    assert_eq!(oa["model"], "tiny2");
    assert_eq!(oa["choices"][0]["message"]["content"], a["text"], "{oa}");
    let ids: Vec<String> = head.get("/v1/models").1["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        ids.contains(&"model".into()) && ids.contains(&"tiny2".into()),
        "{ids:?}"
    );
    let (code, e) = chat(&head, Some("nope"), 4);
    assert_eq!(
        (code, e["error"]["field"].as_str()),
        (404, Some("model")),
        "{e}"
    );

    // Refused with the field at fault.
    for (body, status, field) in [
        (json!({"name": "tiny2", "path": "tiny2"}), 409, None),
        (
            json!({"name": "bad/name", "path": "tiny2"}),
            422,
            Some("name"),
        ),
        (json!({"name": "x", "path": "/etc"}), 403, Some("path")),
        (json!({"name": "x", "path": "missing"}), 400, Some("path")),
        (
            json!({"name": "x", "path": "not-a-model"}),
            422,
            Some("path"),
        ),
        (
            json!({"name": "x", "path": "tiny2", "replicas": 0}),
            422,
            Some("replicas"),
        ),
        (
            json!({"name": "x", "path": "tiny2", "min_replicas": 3, "max_replicas": 2}),
            422,
            Some("max_replicas"),
        ),
        (
            json!({"name": "x", "path": "tiny2", "dtype": "int3"}),
            422,
            Some("dtype"),
        ),
        (
            json!({"name": "x", "path": "tiny2", "autoscaling": {"target_ongoing_requests": 0}}),
            422,
            Some("autoscaling.target_ongoing_requests"),
        ),
        (
            json!({"name": "x", "path": "tiny2", "placement": {"tags": {"a b": "c"}}}),
            422,
            Some("placement.tags"),
        ),
    ] {
        let (code, e) = head.post("/models", &body);
        assert_eq!(code, status, "{body} -> {e}");
        if let Some(f) = field {
            assert_eq!(e["error"]["field"], f, "{body} -> {e}");
        }
    }
    let (code, e) = head.delete("/models/model");
    assert_eq!(code, 409, "the default deployment stays: {e}");
    assert_eq!(head.delete("/models/nope").0, 404);

    // No free slot, or no node with the tags: pending, with the reason.
    let (code, d) = head.post("/models", &json!({"name": "tiny3", "path": "tiny2"}));
    assert_eq!(code, 202, "{d}");
    assert_eq!(d["state"], "pending", "{d}");
    assert!(
        d["reason"]
            .as_str()
            .unwrap()
            .contains("no free inference slot"),
        "{d}"
    );
    let (code, d) = head.post(
        "/models",
        &json!({"name": "tagged", "path": "tiny2", "placement": {"tags": {"gpu": "h100"}}}),
    );
    assert_eq!(code, 202, "{d}");
    assert_eq!(d["state"], "pending", "{d}");
    assert!(
        d["reason"]
            .as_str()
            .unwrap()
            .contains("no node carries the tags gpu=h100"),
        "{d}"
    );
    let (code, e) = chat(&head, Some("tiny3"), 4);
    assert_eq!(code, 503, "a pending deployment has no replica: {e}");

    // Deleting tiny2 drains the request it holds, then frees the slot for tiny3.
    let url = head.url.clone();
    let in_flight = std::thread::spawn(move || {
        let mut r = Head::agent()
            .post(format!("{url}/chat"))
            .send_json(
                json!({"prompt": "a long answer", "max_tokens": 400, "temperature": 0,
                              "model": "tiny2"}),
            )
            .unwrap();
        (
            r.status().as_u16(),
            r.body_mut().read_json::<Value>().unwrap(),
        )
    });
    head.wait_until(
        "the request to be in flight",
        Duration::from_secs(30),
        |h| {
            h.get("/cluster").1["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["name"] == "inference-1" && r["in_flight"] == 1)
        },
    );
    let (code, d) = head.delete("/models/tiny2");
    assert_eq!(code, 202, "{d}");
    assert_eq!(d["state"], "deleting", "{d}");
    let (code, e) = chat(&head, Some("tiny2"), 4);
    assert!(
        code == 503 || code == 404,
        "a deleting deployment takes no request: {code} {e}"
    );
    let (code, done) = in_flight.join().unwrap();
    assert_eq!(
        code, 200,
        "the request in flight during the delete completes: {done}"
    );
    assert_eq!(done["replica"], "inference-1");
    let d = wait_state(&head, "tiny3", "ready");
    assert_eq!(d["replicas"], json!(["inference-1"]), "{d}");
    assert_eq!(head.get("/models/tiny2").0, 404);
    let (code, c) = chat(&head, Some("tiny3"), 12);
    assert_eq!(code, 200, "{c}");
    assert_eq!(
        c["text"], a["text"],
        "tiny3 serves the same model file as tiny2 did"
    );
    let (code, health) = head.get("/health");
    assert_eq!(code, 200, "{health}");
    // A fine-tune names its base model by deployment.
    head.write_dataset("d.jsonl", 4);
    let (code, job) = head.post(
        "/fine-tune",
        &json!({"dataset_path": "d.jsonl", "output_path": "on-tiny3", "base_model": "tiny3"}),
    );
    assert_eq!(code, 202, "{job}");
    let id = job["job_id"].as_str().unwrap();
    let record = head.get(&format!("/jobs/{id}")).1;
    assert_eq!(
        record["base_model"],
        deployment(&head, "tiny3")["spec"]["path"],
        "{record}"
    );
    head.delete(&format!("/jobs/{id}"));

    // A restarted head restores the deployments made at runtime.
    let head = head.restart(OVERRIDES);
    let names: Vec<String> = head.get("/models").1["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["model", "tiny3", "tagged"]);
    wait_state(&head, "tiny3", "ready");
    assert_eq!(deployment(&head, "tagged")["state"], "pending");
    let (code, c2) = chat(&head, Some("tiny3"), 12);
    assert_eq!(code, 200, "{c2}");
    assert_eq!(c2["text"], c["text"]);
    let status = tessera::status::render(&head.get("/cluster").1, &head.get("/health").1, 0.0);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("tiny3") && l.contains("ready")),
        "{status}"
    );
}

#[test]
fn a_deployment_made_at_runtime_autoscales_on_its_own_load() {
    // Three slots: the default deployment keeps one, `auto` grows from one to two on its load.
    let head = support::start(&["resources.cpu_inference_slots=3", "model.replicas=1"]);
    support::tiny::write_model(&head.dir.path().join("models").join("tiny2"), 11);
    let (code, d) = head.post(
        "/models",
        &json!({"name": "auto", "path": "tiny2", "max_replicas": 2,
                "autoscaling": {"target_ongoing_requests": 1, "upscale_delay_s": 0.2,
                                "downscale_delay_s": 0.5}}),
    );
    assert_eq!(code, 202, "{d}");
    let d = wait_state(&head, "auto", "ready");
    assert_eq!(d["target_replicas"], 1, "{d}");
    assert_eq!(d["autoscaler"]["max_replicas"], 2, "{d}");

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let (url, stop) = (head.url.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut failed = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let body = json!({"prompt": format!("client {i}"), "max_tokens": 100,
                                      "temperature": 0, "model": "auto"});
                    match Head::agent().post(format!("{url}/chat")).send_json(&body) {
                        Ok(mut r) if r.status().as_u16() == 200 => {
                            let _ = r.body_mut().read_to_string();
                        }
                        Ok(mut r) => failed.push(format!(
                            "{}: {}",
                            r.status(),
                            r.body_mut().read_to_string().unwrap_or_default()
                        )),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                failed
            })
        })
        .collect();
    head.wait_until(
        "auto to grow to two replicas",
        Duration::from_secs(60),
        |h| {
            let d = deployment(h, "auto");
            d["replicas"].as_array().unwrap().len() == 2
                && h.get("/cluster").1["replicas"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|r| r["deployment"] == "auto" && r["state"] == "running")
                    .count()
                    == 2
        },
    );
    let d = deployment(&head, "auto");
    assert!(
        d["autoscaler"]["last_decision"]
            .as_str()
            .unwrap()
            .contains("up to 2 replicas"),
        "{d}"
    );
    // The default deployment kept its one replica.
    assert_eq!(
        deployment(&head, "model")["replicas"],
        json!(["inference-0"])
    );
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let failed = c.join().unwrap();
        assert!(failed.is_empty(), "requests failed: {failed:?}");
    }
    head.wait_until("auto to shrink back", Duration::from_secs(30), |h| {
        let d = deployment(h, "auto");
        d["replicas"].as_array().unwrap().len() == 1 && d["target_replicas"] == 1
    });
    let d = deployment(&head, "auto");
    assert_eq!(d["autoscaler"]["scale_downs"], 1, "{d}");
    let m = head.get_text("/metrics").1;
    assert!(
        m.contains("tessera_autoscaler{deployment=\"auto\",figure=\"scale_ups\"} 1"),
        "{m}"
    );
    let (code, r) = chat(&head, Some("auto"), 4);
    assert_eq!(code, 200, "{r}");
}

/// Other families through the HTTP surface: a Qwen3 and a Qwen2 checkpoint are deployed at
/// runtime, answer `/chat` and the OpenAI routes, and serve as a fine-tune's `base_model`, whose
/// adapter the deployment then serves; a multimodal Gemma 3 checkpoint is refused up front with a
/// 422 naming `path` and its vision tower.
#[test]
fn other_families_deploy_serve_and_fine_tune_and_a_vision_model_is_refused() {
    let head = support::start(&["resources.cpu_inference_slots=3", "model.replicas=1"]);
    let models_root = head.dir.path().join("models");
    for family in ["qwen3", "qwen2"] {
        support::tiny::write_family_model(&models_root.join(family), 31, family);
        let (code, d) = head.post("/models", &json!({"name": family, "path": family}));
        assert_eq!(code, 202, "{d}");
        wait_state(&head, family, "ready");
        let (code, a) = chat(&head, Some(family), 8);
        assert_eq!(code, 200, "{a}");
        assert_eq!(a["model"], family, "{a}");
        let (code, oa) = head.post(
            "/v1/chat/completions",
            &json!({"model": family, "messages": [{"role": "user", "content": "hello there"}],
                    "max_tokens": 8, "temperature": 0}),
        );
        assert_eq!(code, 200, "{oa}");
        assert_eq!(oa["choices"][0]["message"]["content"], a["text"], "{oa}");
    }
    // The two families answer differently (biases and q/k norms on the same weights).
    let (_, q3) = chat(&head, Some("qwen3"), 8);
    let (_, q2) = chat(&head, Some("qwen2"), 8);
    assert_ne!(q3["text"], q2["text"]);

    // A fine-tune on the Qwen3 deployment, served by it with the adapter.
    head.write_dataset("d.jsonl", 8);
    let (code, job) = head.post(
        "/fine-tune",
        &json!({"dataset_path": "d.jsonl", "output_path": "on-qwen3", "base_model": "qwen3",
                "hyperparameters": support::quick_hyperparameters(2)}),
    );
    assert_eq!(code, 202, "{job}");
    let id = job["job_id"].as_str().unwrap();
    let done = head.wait_job(id, Duration::from_secs(120));
    assert_eq!(done["status"], "succeeded", "{done}");
    let (code, tuned) = head.post(
        "/v1/completions",
        &json!({"model": "qwen3:on-qwen3", "prompt": "hello", "max_tokens": 8,
                "temperature": 0}),
    );
    assert_eq!(code, 200, "{tuned}");
    let (_, base) = head.post(
        "/v1/completions",
        &json!({"model": "qwen3", "prompt": "hello", "max_tokens": 8, "temperature": 0}),
    );
    assert_ne!(
        tuned["choices"][0]["text"], base["choices"][0]["text"],
        "{tuned} {base}"
    );

    support::tiny::write_family_model(&models_root.join("vision"), 32, "gemma3_vision");
    let (code, e) = head.post("/models", &json!({"name": "vision", "path": "vision"}));
    assert_eq!(code, 422, "{e}");
    assert_eq!(e["error"]["field"], "path", "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("vision"),
        "{e}"
    );
}

#[test]
fn deployments_beyond_the_bound_are_refused_until_one_is_deleted() {
    let mut overrides = OVERRIDES.to_vec();
    overrides.push("deployments.max=2");
    let head = support::start(&overrides);
    support::tiny::write_model(&head.dir.path().join("models").join("tiny2"), 11);
    let (code, d) = head.post("/models", &json!({"name": "second", "path": "tiny2"}));
    assert_eq!(code, 202, "{d}");
    let (code, e) = head.post("/models", &json!({"name": "third", "path": "tiny2"}));
    assert_eq!(code, 409, "{e}");
    let message = e["error"]["message"].as_str().unwrap();
    assert!(message.contains("deployments.max = 2"), "{message}");
    assert_eq!(
        head.get("/models").1["deployments"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // Once one is deleted, there is room again.
    let (code, d) = head.delete("/models/second");
    assert_eq!(code, 202, "{d}");
    let (code, d) = head.post("/models", &json!({"name": "third", "path": "tiny2"}));
    assert_eq!(code, 202, "{d}");
}

#[test]
fn a_deployment_that_cannot_load_fails_alone_and_the_node_stays_live() {
    let head = support::start(OVERRIDES);
    // Its config parses (so it is accepted), its weights are cut short (so no replica loads).
    let broken = support::tiny::write_model(&head.dir.path().join("models").join("broken"), 5);
    let weights = broken.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let (code, d) = head.post("/models", &json!({"name": "broken", "path": "broken"}));
    assert_eq!(code, 202, "{d}");
    let d = wait_state(&head, "broken", "failed");
    assert!(d["reason"].as_str().unwrap().contains("replica"), "{d}");
    // The node is live (a probe must not restart it for a bad file) and serves the rest.
    let (code, health) = head.get("/health");
    assert_eq!(code, 200, "{health}");
    assert_eq!(health["status"], "degraded", "{health}");
    let (code, r) = chat(&head, None, 4);
    assert_eq!(code, 200, "{r}");
    // Deleting it makes the node whole again.
    let (code, d) = head.delete("/models/broken");
    assert_eq!(code, 202, "{d}");
    head.wait_until("the broken deployment gone", Duration::from_secs(60), |h| {
        h.get("/models/broken").0 == 404
    });
}

#[test]
fn each_replica_start_is_checked_against_host_memory() {
    // Room for the weights of two tiny models, not three.
    let dir = tempfile::tempdir().unwrap();
    let model = support::tiny::write_model(&dir.path().join("model"), 7);
    let bytes = tessera_engine::footprint::weight_bytes(&model, tch::Kind::Float).unwrap();
    let limit_mb = 2.5 * bytes as f64 / (1u64 << 20) as f64;
    let head = support::start_in(
        dir,
        model,
        &[
            "resources.cpu_inference_slots=4",
            "model.replicas=1",
            &format!("resources.host_memory_limit_mb={limit_mb}"),
        ],
    );
    support::tiny::write_model(&head.dir.path().join("models").join("tiny2"), 11);
    let (code, d) = head.post(
        "/models",
        &json!({"name": "three", "path": "tiny2", "replicas": 3}),
    );
    assert_eq!(code, 202, "{d}");
    let d = wait_state(&head, "three", "ready");
    // One replica started (the default deployment holds the other copy); the rest wait, saying
    // why with the sizes, and no replica is started and lost in a loop.
    assert_eq!(d["replicas"].as_array().unwrap().len(), 1, "{d}");
    let reason = d["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("resources.host_memory_limit_mb") && reason.contains("MiB"),
        "{d}"
    );
    std::thread::sleep(Duration::from_secs(1));
    let d = deployment(&head, "three");
    assert_eq!(d["replicas"].as_array().unwrap().len(), 1, "{d}");
    let (code, r) = chat(&head, Some("three"), 4);
    assert_eq!(code, 200, "{r}");
}

#[test]
fn a_deployment_scales_to_zero_when_idle_and_the_next_request_starts_a_replica() {
    let head = support::start(&["resources.cpu_inference_slots=2", "model.replicas=1"]);
    support::tiny::write_model(&head.dir.path().join("models").join("tiny2"), 11);
    let (code, d) = head.post(
        "/models",
        &json!({"name": "lazy", "path": "tiny2", "min_replicas": 0, "max_replicas": 1,
                "autoscaling": {"target_ongoing_requests": 1, "upscale_delay_s": 0.2,
                                "downscale_delay_s": 0.5}}),
    );
    assert_eq!(code, 202, "{d}");
    wait_state(&head, "lazy", "ready");
    // Idle: drained to no replica, its slot free.
    let d = wait_state(&head, "lazy", "idle");
    assert_eq!(d["replicas"], json!([]), "{d}");
    assert!(
        d["reason"].as_str().unwrap().contains("scaled to zero"),
        "{d}"
    );
    // A request waits while a replica starts, then is answered.
    let (code, r) = chat(&head, Some("lazy"), 4);
    assert_eq!(code, 200, "{r}");
    // The manager counts the cold start at its next tick.
    head.wait_until("the cold start counted", Duration::from_secs(10), |h| {
        deployment(h, "lazy")["autoscaler"]["cold_starts"] == 1
    });
    let d = deployment(&head, "lazy");
    assert!(
        d["autoscaler"]["last_cold_start_s"].as_f64().unwrap() > 0.0,
        "{d}"
    );
    let (code, metrics) = head.get_text("/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("figure=\"cold_starts\"") || metrics.contains("cold_starts"),
        "{metrics}"
    );
    // Idle again once the load is gone; min_replicas 0 without autoscaling is refused.
    wait_state(&head, "lazy", "idle");
    let (code, e) = head.post(
        "/models",
        &json!({"name": "fixed0", "path": "tiny2", "min_replicas": 0}),
    );
    assert_eq!(code, 422, "{e}");
    assert_eq!(e["error"]["field"], "min_replicas", "{e}");
}

#[test]
fn a_slow_model_load_blocks_neither_restarts_nor_deletes() {
    // Loads of `slowload` take 12 s longer (a test hook): meanwhile the node restarts a crashed
    // replica and deletes the deployment at once, and the late load comes back to nothing.
    std::env::set_var("TESSERA_TEST_HOOKS", "1");
    std::env::set_var("TESSERA_TEST_LOAD_DELAY", "slowload:12000");
    let head = support::start(OVERRIDES);
    support::tiny::write_model(&head.dir.path().join("models").join("slowload"), 11);
    let started = std::time::Instant::now();
    let (code, d) = head.post("/models", &json!({"name": "slow", "path": "slowload"}));
    assert_eq!(code, 202, "{d}");
    let d = wait_state(&head, "slow", "deploying");
    let slot = d["replicas"][0].as_str().unwrap().to_string();
    let serving = head.get("/cluster").1["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["deployment"] != "slow")
        .unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, _) = head.post(&format!("/_test/crash/{serving}"), &json!({}));
    assert_eq!(code, 202);
    head.wait_until(
        "the crashed replica serving again while the other loads",
        Duration::from_secs(6),
        |h| chat(h, None, 2).0 == 200,
    );
    let (code, d) = head.delete("/models/slow");
    assert_eq!(code, 202, "{d}");
    head.wait_until("the loading deployment gone", Duration::from_secs(5), |h| {
        h.get("/models/slow").0 == 404
    });
    assert!(
        started.elapsed() < Duration::from_secs(11),
        "the load was waited for"
    );
    // Once the stopped replica's load would have ended, its slot is still free and only the
    // default deployment's replica is listed.
    std::thread::sleep(Duration::from_secs(13).saturating_sub(started.elapsed()));
    let replicas = head.get("/cluster").1["replicas"].clone();
    let names: Vec<&str> = replicas
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec![serving.as_str()], "{replicas}");
    assert!(!names.contains(&slot.as_str()));
    let (code, r) = chat(&head, None, 2);
    assert_eq!(code, 200, "{r}");
}
