//! End to end: a real head (actor tree, real engine on a tiny random model, HTTP on loopback)
//! driven over HTTP: chat with and without adapters, streaming, OpenAI routes, fine-tune jobs,
//! cancel, priorities, a crashing replica, bad input, overload, auth, metrics, OpenAPI.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{quick_hyperparameters, start, Head};

fn greedy(prompt: &str, n: usize) -> Value {
    json!({"prompt": prompt, "max_tokens": n, "temperature": 0.0})
}

fn write_adapter(head: &Head, name: &str, seed: i64) -> String {
    support::tiny::write_adapter(
        &head.adapters.join(name),
        8,
        16.0,
        &["q_proj", "v_proj", "down_proj"],
        seed,
    );
    name.to_string()
}

#[test]
fn chat_with_and_without_adapters_and_streaming() {
    let head = start(&[]);
    let (status, base) = head.post("/chat", &greedy("hello there", 12));
    assert_eq!(status, 200, "{base}");
    let n = base["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&n), "{base}");
    assert!(base["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert!(base["latency_ms"].as_f64().unwrap() > 0.0);
    assert!(base["id"].as_str().unwrap().starts_with("chat-"));
    assert_eq!(base["adapter_path"], Value::Null);

    // The same request again gives the same greedy text; an adapter changes it.
    let (_, again) = head.post("/chat", &greedy("hello there", 12));
    assert_eq!(again["text"], base["text"]);
    let adapter = write_adapter(&head, "a1", 3);
    let mut with = greedy("hello there", 12);
    with["adapter_path"] = json!(adapter);
    let (status, adapted) = head.post("/chat", &with);
    assert_eq!(status, 200, "{adapted}");
    assert_ne!(
        adapted["text"], base["text"],
        "the adapter changes the output"
    );
    assert_eq!(
        adapted["adapter_path"].as_str().unwrap(),
        head.adapters.join("a1").to_str().unwrap()
    );
    // An absolute path inside the root works too.
    with["adapter_path"] = json!(head.adapters.join("a1"));
    assert_eq!(head.post("/chat", &with).1["text"], adapted["text"]);

    // Streaming: token events then one done event whose text is the tokens' concatenation.
    let mut body = greedy("hello there", 12);
    body["stream"] = json!(true);
    let events = head.sse("/chat", &body);
    let (last, tokens) = events.split_last().unwrap();
    assert_eq!(last.0, "done");
    assert!(tokens.iter().all(|(e, _)| e == "token"));
    assert_eq!(
        tokens.len() as u64,
        base["usage"]["completion_tokens"].as_u64().unwrap()
    );
    let done: Value = serde_json::from_str(&last.1).unwrap();
    let joined = support::sse_text(tokens);
    assert_eq!(done["text"], base["text"]);
    assert!(
        base["text"].as_str().unwrap().starts_with(&joined),
        "{joined:?} vs {base}"
    );

    // Messages, and the replica now holds the adapter (router affinity / cluster view).
    let (status, m) = head.post(
        "/chat",
        &json!({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(status, 200, "{m}");
    let (_, cluster) = head.get("/cluster");
    let replica = &cluster["replicas"][0];
    assert_eq!(replica["state"], "running");
    // The cluster endpoint's actors are supervised and shown beside the others.
    let (code, health) = head.get("/health");
    assert_eq!(code, 200, "{health}");
    for name in ["cluster-node-server", "cluster-head", "cluster-head-port"] {
        let actor = health["actors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == name)
            .unwrap_or_else(|| panic!("{name} is not in {health}"));
        assert_eq!(actor["role"], "cluster");
        assert_eq!(actor["state"], "running");
    }
    assert!(replica["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a.as_str().unwrap().ends_with("a1")));
    assert_eq!(
        cluster["nodes"][0]["placement"]["replicas"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn openai_routes_answer_in_openai_shapes() {
    let head = start(&[]);
    let (_, models) = head.get("/v1/models");
    let base = models["data"][0]["id"].as_str().unwrap().to_string();
    let (status, c) = head.post(
        "/v1/chat/completions",
        &json!({"model": base, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                "temperature": 0, "logprobs": true, "top_logprobs": 2}),
    );
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["object"], "chat.completion");
    assert_eq!(c["choices"][0]["message"]["role"], "assistant");
    let lp = c["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        lp.len() as u64,
        c["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(lp[0]["top_logprobs"].as_array().unwrap().len(), 2);
    let (status, t) = head.post(
        "/v1/completions",
        &json!({"model": base, "prompt": "abc", "max_tokens": 5, "temperature": 0}),
    );
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["object"], "text_completion");
    let (status, e) = head.post(
        "/v1/chat/completions",
        &json!({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(status, 404, "{e}");
    assert_eq!(e["error"]["field"], "model");

    // The official Python client, unchanged, when the test environment has it.
    let Some(python) = support::python_with("openai") else {
        return;
    };
    write_adapter(&head, "named", 5);
    let out = std::process::Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/openai_client.py"
        ))
        .args([&head.url, &base, "named"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openai client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn fine_tune_then_chat_with_the_new_adapter() {
    let head = start(&[]);
    head.write_dataset("d.jsonl", 16);
    let (status, accepted) = head.post(
        "/fine-tune",
        &json!({"dataset_path": "d.jsonl", "output_path": "tuned", "hyperparameters": quick_hyperparameters(3)}),
    );
    assert_eq!(status, 202, "{accepted}");
    let id = accepted["job_id"].as_str().unwrap().to_string();
    let job = head.wait_job(&id, Duration::from_secs(120));
    assert_eq!(job["status"], "succeeded", "{job}");
    let history = job["history"].as_array().unwrap();
    assert_eq!(history.len(), 12, "3 epochs x 4 steps");
    assert!(
        history.last().unwrap()["loss"].as_f64().unwrap() < history[0]["loss"].as_f64().unwrap()
    );
    assert_eq!(job["trainer"], "trainer-0");
    assert!(job["started_at"].as_f64().unwrap() >= job["created_at"].as_f64().unwrap());
    let adapter = job["adapter_path"].as_str().unwrap();
    assert!(std::path::Path::new(adapter)
        .join("adapter_model.safetensors")
        .exists());

    // Served at once, without a restart, and it changes the answer.
    let (_, base) = head.post("/chat", &greedy("item 3 says", 8));
    let mut body = greedy("item 3 says", 8);
    body["adapter_path"] = json!("tuned");
    let (status, tuned) = head.post("/chat", &body);
    assert_eq!(status, 200, "{tuned}");
    assert_ne!(tuned["text"], base["text"]);
    // The job id works as an OpenAI model name.
    let (status, c) = head.post(
        "/v1/completions",
        &json!({"model": id, "prompt": "item 3 says", "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(status, 200, "{c}");

    // Listing and filtering.
    let (_, page) = head.get("/jobs?status=succeeded&limit=10");
    assert_eq!(page["total"], 1);
    assert_eq!(page["jobs"][0]["id"], id.as_str());
    let (_, none) = head.get("/jobs?status=failed");
    assert_eq!(none["total"], 0);
    // The same output directory again is refused.
    let (status, e) = head.post(
        "/fine-tune",
        &json!({"dataset_path": "d.jsonl", "output_path": "tuned"}),
    );
    assert_eq!(status, 409, "{e}");
    assert_eq!(e["error"]["field"], "output_path");
}

#[test]
fn cancel_queued_and_running_jobs_and_priorities_order_the_queue() {
    let head = start(&[]);
    head.write_dataset("d.jsonl", 16);
    let submit = |out: &str, priority: &str, epochs: usize| {
        let (status, a) = head.post(
            "/fine-tune",
            &json!({"dataset_path": "d.jsonl", "output_path": out, "priority": priority,
                    "hyperparameters": quick_hyperparameters(epochs)}),
        );
        assert_eq!(status, 202, "{a}");
        a["job_id"].as_str().unwrap().to_string()
    };
    let long = submit("long", "normal", 200);
    head.wait_until("the long job to run", Duration::from_secs(60), |h| {
        h.get(&format!("/jobs/{long}")).1["status"] == "running"
    });
    let low = submit("low", "low", 1);
    let normal = submit("normal", "normal", 1);
    let high = submit("high", "high", 1);

    // A queued job is cancelled at once.
    let (status, c) = head.delete(&format!("/jobs/{normal}"));
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["status"], "cancelled");

    // Events stream progress of the running job.
    let r = Head::agent()
        .get(format!("{}/jobs/{long}/events", head.url))
        .call()
        .unwrap();
    let events = support::read_sse(r.into_body().into_reader(), 3);
    assert_eq!(events[0].0, "state");
    assert!(
        events[1..].iter().any(|(e, _)| e == "progress"),
        "{events:?}"
    );

    // A running job stops within a step.
    let before = head.get(&format!("/jobs/{long}")).1["progress"]["step"]
        .as_u64()
        .unwrap_or(0);
    let (status, _) = head.delete(&format!("/jobs/{long}"));
    assert_eq!(status, 200);
    let job = head.wait_job(&long, Duration::from_secs(30));
    assert_eq!(job["status"], "cancelled", "{job}");
    let after = job["progress"]["step"].as_u64().unwrap();
    assert!(
        after <= before + 3,
        "stopped at {after}, cancel asked at {before}"
    );
    // Cancelling again is a conflict naming the state.
    let (status, e) = head.delete(&format!("/jobs/{long}"));
    assert_eq!(status, 409, "{e}");

    // The high-priority job ran before the low one, though submitted after it.
    let high = head.wait_job(&high, Duration::from_secs(60));
    let low = head.wait_job(&low, Duration::from_secs(60));
    assert_eq!(high["status"], "succeeded", "{high}");
    assert_eq!(low["status"], "succeeded", "{low}");
    assert!(high["started_at"].as_f64() < low["started_at"].as_f64());
    assert_eq!(
        head.get(&format!("/jobs/{normal}")).1["started_at"],
        Value::Null
    );
}

#[test]
fn a_crashed_replica_is_restarted_and_serves_again() {
    std::env::set_var("TESSERA_TEST_HOOKS", "1");
    let head = start(&[]);
    let (status, _) = head.post("/_test/crash/inference-0", &json!({}));
    assert_eq!(status, 202);
    head.wait_until("the restart", Duration::from_secs(30), |h| {
        let (_, health) = h.get("/health");
        health["actors"].as_array().unwrap().iter().any(|a| {
            a["name"] == "inference-0"
                && a["restarts"].as_u64() == Some(1)
                && a["state"] == "running"
        })
    });
    let (_, health) = head.get("/health");
    let replica = health["actors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "inference-0")
        .unwrap()
        .clone();
    assert!(
        replica["last_error"].as_str().unwrap().contains("crash"),
        "{replica}"
    );
    let (status, r) = head.post("/chat", &greedy("after the crash", 4));
    assert_eq!(status, 200, "{r}");
}

#[test]
fn bad_requests_are_refused_naming_the_field() {
    let head = start(&[]);
    std::fs::create_dir_all(head.dir.path().join("outside")).unwrap();
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "/chat",
            json!({"prompt": "x", "adapter_path": "../outside"}),
            403,
            "adapter_path",
        ),
        (
            "/chat",
            json!({"prompt": "x", "adapter_path": "/etc"}),
            403,
            "adapter_path",
        ),
        (
            "/chat",
            json!({"prompt": "x", "adapter_path": "missing"}),
            400,
            "adapter_path",
        ),
        (
            "/chat",
            json!({"prompt": "x", "temperature": -1}),
            422,
            "temperature",
        ),
        (
            "/chat",
            json!({"prompt": "x", "max_tokens": 100000}),
            422,
            "max_tokens",
        ),
        (
            "/chat",
            json!({"prompt": "x", "max_tokens": 0}),
            422,
            "max_tokens",
        ),
        ("/chat", json!({"max_tokens": 3}), 422, "prompt"),
        (
            "/chat",
            json!({"prompt": "x", "tempreature": 1}),
            400,
            "tempreature",
        ),
        (
            "/chat",
            json!({"prompt": "x", "max_tokens": "many"}),
            400,
            "max_tokens",
        ),
        (
            "/chat",
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            422,
            "messages[0].role",
        ),
        (
            "/fine-tune",
            json!({"dataset_path": "../../etc/passwd", "output_path": "o"}),
            403,
            "dataset_path",
        ),
        (
            "/fine-tune",
            json!({"dataset_path": "nope.jsonl", "output_path": "o"}),
            400,
            "dataset_path",
        ),
        (
            "/fine-tune",
            json!({"dataset_path": "d.jsonl", "output_path": "../escape"}),
            403,
            "output_path",
        ),
        (
            "/fine-tune",
            json!({"dataset_path": "d.jsonl", "output_path": "o", "priority": "urgent"}),
            422,
            "priority",
        ),
        (
            "/fine-tune",
            json!({"dataset_path": "d.jsonl", "output_path": "o", "hyperparameters": {"lora_rank": 8}}),
            422,
            "hyperparameters.lora_rank",
        ),
        (
            "/fine-tune",
            json!({"dataset_path": "d.jsonl", "output_path": "o", "hyperparameters": {"base_quantization": "nf4"}}),
            422,
            "hyperparameters.base_quantization",
        ),
        // The tiny test model is float (safetensors): nothing to keep 4-bit.
        (
            "/fine-tune",
            json!({"dataset_path": "d.jsonl", "output_path": "o", "hyperparameters": {"base_quantization": "packed"}}),
            422,
            "hyperparameters.base_quantization",
        ),
    ];
    head.write_dataset("d.jsonl", 4);
    for (path, body, status, field) in cases {
        let (got, e) = head.post(path, &body);
        assert_eq!(got, status, "{path} {body}: {e}");
        assert_eq!(e["error"]["field"], field, "{path} {body}: {e}");
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains(field.split('[').next().unwrap()),
            "{e}"
        );
    }
    let (status, e) = head.post_raw("/chat", "{not json");
    assert_eq!(status, 400, "{e}");
    assert_eq!(e["error"]["type"], "invalid_request");
    let (status, e) = head.get("/jobs/ft-nope");
    assert_eq!(status, 404, "{e}");
    let (status, _) = head.get("/jobs?status=sleeping");
    assert_eq!(status, 422);
    let (status, _) = head.get("/no/such/route");
    assert_eq!(status, 404);
    // A symlink out of the root is refused too.
    std::os::unix::fs::symlink(
        head.dir.path().join("outside"),
        head.adapters.join("sneaky"),
    )
    .unwrap();
    let (status, _) = head.post("/chat", &json!({"prompt": "x", "adapter_path": "sneaky"}));
    assert_eq!(status, 403);
    // The server still serves.
    assert_eq!(head.post("/chat", &greedy("still here", 2)).0, 200);
}

#[test]
fn overload_answers_503_with_retry_after_and_the_body_limit_413() {
    let head = start(&[
        "batching.max_waiting=1",
        "batching.max_batch_size=1",
        "server.max_body_bytes=2000",
    ]);
    let body = json!({"prompt": "go", "max_tokens": 400, "temperature": 1.0, "seed": 1});
    let results: Vec<(u16, Option<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| {
                s.spawn(|| {
                    let mut r = Head::agent()
                        .post(format!("{}/chat", head.url))
                        .send_json(&body)
                        .unwrap();
                    let retry = r
                        .headers()
                        .get("retry-after")
                        .map(|v| v.to_str().unwrap().to_string());
                    let _ = r.body_mut().read_to_string();
                    (r.status().as_u16(), retry)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let refused: Vec<_> = results.iter().filter(|(s, _)| *s == 503).collect();
    assert!(!refused.is_empty(), "{results:?}");
    assert!(refused.iter().all(|(_, r)| r.as_deref() == Some("1")));
    assert!(results.iter().any(|(s, _)| *s == 200), "{results:?}");
    let big = json!({"prompt": "x".repeat(5000)});
    let (status, e) = head.post("/chat", &big);
    assert_eq!(status, 413, "{e}");
}

#[test]
fn request_timeout_answers_504() {
    let head = start(&["server.request_timeout_secs=0"]);
    let (status, e) = head.post("/chat", &greedy("slow", 50));
    assert_eq!(status, 504, "{e}");
    assert_eq!(e["error"]["type"], "timeout");
}

#[test]
fn auth_metrics_health_and_openapi() {
    let head = start(&["server.auth_token=\"s3cret\""]);
    let (status, e) = head.post("/chat", &greedy("x", 2));
    assert_eq!(status, 401, "{e}");
    assert_eq!(head.get("/health").0, 200, "health needs no token");
    let mut r = Head::agent()
        .post(format!("{}/chat", head.url))
        .header("authorization", "Bearer s3cret")
        .send_json(greedy("x", 2))
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let _ = r.body_mut().read_to_string();
    let call = |path: &str| {
        let mut r = Head::agent()
            .get(format!("{}{path}", head.url))
            .header("authorization", "Bearer s3cret")
            .call()
            .unwrap();
        r.body_mut().read_to_string().unwrap()
    };
    let metrics = call("/metrics");
    for needle in [
        "tessera_http_requests_total{method=\"POST\",route=\"/chat\",status=\"200\"} 1",
        "tessera_http_requests_total{method=\"POST\",route=\"/chat\",status=\"401\"} 1",
        "tessera_http_request_duration_seconds_bucket",
        "tessera_time_to_first_token_seconds_count{route=\"/chat\"} 1",
        "tessera_generated_tokens_total 2",
        "tessera_queue_depth{replica=\"inference-0\"}",
        "tessera_batch_size{replica=\"inference-0\"}",
        "tessera_jobs{state=\"queued\"} 0",
        "tessera_training_tokens_per_second",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
    let (_, health) = head.get("/health");
    assert_eq!(health["status"], "ok", "{health}");
    let roles: Vec<&str> = health["actors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["role"].as_str().unwrap())
        .collect();
    for role in ["inference", "trainer", "job_manager"] {
        assert!(roles.contains(&role), "{health}");
    }
    let doc: Value = serde_json::from_str(&call("/openapi.json")).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    for route in [
        "/chat",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/fine-tune",
        "/jobs",
        "/jobs/{id}",
        "/jobs/{id}/events",
        "/health",
        "/ready",
        "/cluster",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(
            paths.contains_key(route),
            "{route} missing from /openapi.json"
        );
    }
    assert!(paths["/jobs/{id}"].get("delete").is_some());
}

#[test]
fn a_huge_max_tokens_is_refused_and_the_replica_keeps_serving() {
    let head = start(&[]);
    let (_, models) = head.get("/v1/models");
    let base = models["data"][0]["id"].as_str().unwrap().to_string();
    // Values that once wrapped `prompt + max_tokens` past the context check and panicked the
    // engine thread (six of them used to leave the replica down for good).
    for max_tokens in [u64::MAX, u64::MAX - 1, u64::MAX / 2 + 1, 1 << 63] {
        let (status, e) = head.post("/chat", &json!({"prompt": "x", "max_tokens": max_tokens}));
        assert_eq!(status, 422, "{max_tokens}: {e}");
        assert_eq!(e["error"]["field"], "max_tokens", "{e}");
        let (status, e) = head.post(
            "/v1/completions",
            &json!({"model": base, "prompt": "x", "max_tokens": max_tokens}),
        );
        assert!(status == 400 || status == 422, "{max_tokens}: {status} {e}");
    }
    let (status, body) = head.post("/chat", &greedy("still here", 3));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 3, "{body}");
}

#[test]
fn live_outputs_never_overlap_and_one_database_serves_one_head() {
    let head = start(&[]);
    head.write_dataset("d.jsonl", 16);
    let submit = |out: &str, epochs: usize| {
        head.post(
            "/fine-tune",
            &json!({"dataset_path": "d.jsonl", "output_path": out,
                    "hyperparameters": quick_hyperparameters(epochs)}),
        )
    };
    // Eight concurrent submissions of one new output: exactly one is accepted.
    let results: Vec<(u16, Value)> = std::thread::scope(|s| {
        let posts: Vec<_> = (0..8).map(|_| s.spawn(|| submit("race/a", 400))).collect();
        posts.into_iter().map(|p| p.join().unwrap()).collect()
    });
    let accepted: Vec<&Value> = results
        .iter()
        .filter(|(s, _)| *s == 202)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(accepted.len(), 1, "{results:?}");
    for (status, e) in results.iter().filter(|(s, _)| *s != 202) {
        assert_eq!(*status, 409, "{e}");
        assert_eq!(e["error"]["field"], "output_path", "{e}");
    }
    let long = accepted[0]["job_id"].as_str().unwrap().to_string();
    head.wait_until("the long job to run", Duration::from_secs(60), |h| {
        h.get(&format!("/jobs/{long}")).1["status"] == "running"
    });
    // A job queued behind it (its directory does not exist yet).
    let (status, q) = submit("later/deep/x", 1);
    assert_eq!(status, 202, "{q}");
    // Inside a live job's output (its checkpoints would be pruned away), or around one: refused.
    for out in [
        "race/a/checkpoint-100",
        "later",
        "later/deep",
        "later/deep/x/y",
    ] {
        let (status, e) = submit(out, 1);
        assert_eq!(status, 409, "{out}: {e}");
        assert_eq!(e["error"]["field"], "output_path", "{e}");
        let message = e["error"]["message"].as_str().unwrap();
        assert!(message.starts_with("output_path:"), "{message}");
    }
    // Siblings are fine.
    let (status, z) = submit("later/deep/z", 1);
    assert_eq!(status, 202, "{z}");
    for queued in [&q, &z] {
        let (status, c) = head.delete(&format!("/jobs/{}", queued["job_id"].as_str().unwrap()));
        assert_eq!(status, 200, "{c}");
    }

    // A second head on the same job database stops at start, naming the setting.
    let q = |p: &std::path::Path| format!("\"{}\"", p.display());
    let config = tessera::config::Config::load(&tessera::config::Sources {
        cli: vec![
            format!("model.path={}", q(&head.model)),
            format!("adapters.root={}", q(&head.adapters)),
            format!("training.data_root={}", q(&head.data)),
            format!("jobs.db_path={}", q(&head.dir.path().join("jobs.sqlite"))),
            "cluster.port=0".into(),
        ],
        ..Default::default()
    })
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let e = rt
        .block_on(tessera::head::start(&config))
        .err()
        .expect("a second head on one database must not start");
    let e = format!("{e:#}");
    assert!(
        e.contains("jobs.db_path") && e.contains("another head"),
        "{e}"
    );
    let (status, _) = head.delete(&format!("/jobs/{long}"));
    assert_eq!(status, 200);
    head.wait_job(&long, Duration::from_secs(60));
}
