//! `tessera head` as a process: killed with SIGKILL while a fine-tune job runs, started again on
//! the same database — the job keeps its id and history and resumes from its checkpoint; SIGTERM
//! shuts down gracefully and fast, checkpointing the running job and ending its event stream; a
//! cancel survives a kill; a job that keeps dying with its head fails after `jobs.max_attempts`.
//! And, on SmolLM2, the README's curl requests and a client that disconnects mid-stream.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{free_port, quick_hyperparameters, read_sse, smollm2, Head};

const BIN: &str = env!("CARGO_BIN_EXE_tessera");

struct Proc {
    child: Child,
    url: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_head(dir: &Path, model: &Path) -> Proc {
    spawn_head_with(dir, model, &[])
}

fn spawn_head_with(dir: &Path, model: &Path, sets: &[&str]) -> Proc {
    let port = free_port();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("head.log"))
        .unwrap();
    let child = Command::new(BIN)
        .args(["head", "--port", &port.to_string(), "--model"])
        .arg(model)
        .args([
            "--set",
            &format!("adapters.root=\"{}\"", dir.join("adapters").display()),
        ])
        .args([
            "--set",
            &format!("training.data_root=\"{}\"", dir.join("data").display()),
        ])
        .args([
            "--set",
            &format!("jobs.db_path=\"{}\"", dir.join("jobs.sqlite").display()),
        ])
        .args(["--set", "batching.max_kv_tokens=8192"])
        .args(["--set", "cluster.port=0"])
        .args(sets.iter().flat_map(|s| ["--set", s]))
        .env_remove("LD_LIBRARY_PATH")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let t0 = Instant::now();
    loop {
        if let Ok(r) = Head::agent().get(format!("{url}/ready")).call() {
            if r.status().as_u16() == 200 {
                break;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "head did not get ready; log:\n{}",
            std::fs::read_to_string(dir.join("head.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Proc { child, url }
}

fn get(url: &str) -> Value {
    Head::agent()
        .get(url)
        .call()
        .unwrap()
        .body_mut()
        .read_json()
        .unwrap()
}

fn post(url: &str, body: &Value) -> (u16, Value) {
    let mut r = Head::agent().post(url).send_json(body).unwrap();
    (r.status().as_u16(), r.body_mut().read_json().unwrap())
}

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !check() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tiny_setup() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let model = support::tiny::write_model(&dir.path().join("model"), 11);
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    let lines: Vec<String> = (0..16)
        .map(|i| json!({"text": format!("line {i} of the data {}", i * 3)}).to_string())
        .collect();
    std::fs::write(dir.path().join("data/d.jsonl"), lines.join("\n")).unwrap();
    (dir, model)
}

#[test]
fn a_killed_head_resumes_its_running_job_after_restart() {
    let (dir, model) = tiny_setup();
    let head = spawn_head(dir.path(), &model);
    let mut h = quick_hyperparameters(60);
    h["save_every_steps"] = json!(5);
    let (status, a) = post(
        &format!("{}/fine-tune", head.url),
        &json!({"dataset_path": "d.jsonl", "output_path": "resumed", "hyperparameters": h}),
    );
    assert_eq!(status, 202, "{a}");
    let id = a["job_id"].as_str().unwrap().to_string();
    let job_url = format!("{}/jobs/{id}", head.url);
    wait_for("a checkpoint", Duration::from_secs(120), || {
        get(&job_url)["progress"]["step"].as_u64().unwrap_or(0) >= 7
    });
    drop(head); // SIGKILL: no chance to checkpoint or update the database.

    let head = spawn_head(dir.path(), &model);
    let job_url = format!("{}/jobs/{id}", head.url);
    let after = get(&job_url);
    assert_eq!(after["id"], id.as_str(), "the job survived");
    // What the database held when the head was killed (the trainer ran on after any snapshot
    // taken before the kill).
    let steps_before = after["history"].as_array().unwrap().len();
    assert!(steps_before >= 5, "history kept: {after}");
    wait_for("the job to finish", Duration::from_secs(180), || {
        matches!(
            get(&job_url)["status"].as_str(),
            Some("succeeded" | "failed")
        )
    });
    let done = get(&job_url);
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 2);
    let resumed = done["summary"]["resumed_from_step"].as_u64().unwrap();
    // From a checkpoint (every 5 steps), not from scratch; the last one may be on disk before
    // its step's progress reached the database.
    assert!(
        resumed >= 5 && resumed as usize <= steps_before + 5,
        "resumed from {resumed} with {steps_before} steps recorded"
    );
    assert_eq!(
        done["history"].as_array().unwrap().len(),
        240,
        "60 epochs x 4 steps, one point each"
    );

    // SIGTERM with a running job: it is checkpointed at its current step and queued again.
    let (_, b) = post(
        &format!("{}/fine-tune", head.url),
        &json!({"dataset_path": "d.jsonl", "output_path": "second", "hyperparameters": quick_hyperparameters(100)}),
    );
    let id = b["job_id"].as_str().unwrap().to_string();
    let job_url = format!("{}/jobs/{id}", head.url);
    wait_for("progress", Duration::from_secs(60), || {
        get(&job_url)["progress"]["step"].as_u64().unwrap_or(0) >= 3
    });
    // A client follows the job's events: the stream must not hold the shutdown.
    let events = Head::agent()
        .get(format!("{job_url}/events"))
        .call()
        .unwrap();
    let watcher = std::thread::spawn(move || {
        let events = read_sse(events.into_body().into_reader(), usize::MAX);
        (events, Instant::now())
    });
    let mut head = head;
    let pid = head.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let t0 = Instant::now();
    let status = head.child.wait().unwrap();
    assert!(status.success(), "graceful exit: {status:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "exit well inside Kubernetes' 30 s: {:?}",
        t0.elapsed()
    );
    let (events, ended) = watcher.join().unwrap();
    assert!(ended.duration_since(t0) < Duration::from_secs(10));
    assert_eq!(events[0].0, "state", "{events:?}");
    let checkpoints: Vec<_> = std::fs::read_dir(dir.path().join("adapters/second"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert_eq!(checkpoints.len(), 1, "{checkpoints:?}");
    let head = spawn_head(dir.path(), &model);
    let rec = get(&format!("{}/jobs/{id}", head.url));
    assert!(
        matches!(rec["status"].as_str(), Some("queued" | "running")),
        "{rec}"
    );
}

#[test]
fn a_cancel_survives_a_kill_and_a_job_that_keeps_dying_fails_after_max_attempts() {
    let (dir, model) = tiny_setup();
    // Steps of 1200 micro-batches (the whole dataset): a kill lands inside one even on a fast CPU
    // (with 300, an AMX Xeon sometimes ended the first job's step between the cancel and the kill,
    // and the second job started before the kill).
    let lines: Vec<String> = (0..4800)
        .map(|i| json!({"text": format!("slow line {i} with words {}", i * 7)}).to_string())
        .collect();
    std::fs::write(dir.path().join("data/slow.jsonl"), lines.join("\n")).unwrap();
    let mut h = quick_hyperparameters(50);
    h["gradient_accumulation_steps"] = json!(1200);
    let sets = ["jobs.max_attempts=2"];
    let head = spawn_head_with(dir.path(), &model, &sets);
    let submit = |head: &Proc, out: &str| {
        let (status, a) = post(
            &format!("{}/fine-tune", head.url),
            &json!({"dataset_path": "slow.jsonl", "output_path": out, "hyperparameters": h}),
        );
        assert_eq!(status, 202, "{a}");
        a["job_id"].as_str().unwrap().to_string()
    };
    let job = |head: &Proc, id: &str| get(&format!("{}/jobs/{id}", head.url));
    let cancelled = submit(&head, "cancelled");
    let dying = submit(&head, "dying");
    wait_for("the first job to run", Duration::from_secs(60), || {
        job(&head, &cancelled)["status"] == "running"
    });
    // Cancel asked while a step runs (it takes effect after the step), then the head is killed.
    let r = Head::agent()
        .delete(format!("{}/jobs/{cancelled}", head.url))
        .call()
        .unwrap()
        .body_mut()
        .read_json::<Value>()
        .unwrap();
    assert_eq!(r["status"], "running", "still in its first step: {r}");
    drop(head);

    // Each start: the cancelled job stays cancelled; the other runs and dies with the head.
    for attempt in 1..=2 {
        let head = spawn_head_with(dir.path(), &model, &sets);
        let c = job(&head, &cancelled);
        assert_eq!(c["status"], "cancelled", "a cancel survives a kill: {c}");
        let mut last = Value::Null;
        let t0 = Instant::now();
        while !(last["status"] == "running" && last["attempts"] == attempt) {
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "the dying job did not run as attempt {attempt}: {last}\nhead log:\n{}",
                std::fs::read_to_string(dir.path().join("head.log"))
                    .map(|l| l.lines().rev().take(40).collect::<Vec<_>>().join("\n"))
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
            last = job(&head, &dying);
        }
        drop(head);
    }
    let head = spawn_head_with(dir.path(), &model, &sets);
    let d = job(&head, &dying);
    assert_eq!(d["status"], "failed", "{d}");
    assert_eq!(d["interruptions"], 2, "{d}");
    let error = d["error"].as_str().unwrap();
    assert!(
        error.contains("jobs.max_attempts = 2") && error.contains("attempt 2 was running"),
        "{error}"
    );
    assert_eq!(job(&head, &cancelled)["attempts"], 1, "never run again");
}

#[test]
fn smollm2_serves_the_readme_requests_and_a_disconnect_cancels() {
    let model = smollm2();
    assert!(
        model.exists(),
        "{} missing: run scripts/fetch-model.sh",
        model.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let head = support::start_in(dir, model, &[]);
    // The README's curl bodies, as written there.
    let (status, r) = head.post(
        "/chat",
        &json!({"prompt": "What is the capital of France?", "max_tokens": 32, "temperature": 0.7}),
    );
    assert_eq!(status, 200, "{r}");
    assert!(!r["text"].as_str().unwrap().is_empty());
    let (_, greedy) = head.post(
        "/chat",
        &json!({"prompt": "What is the capital of France?", "max_tokens": 16, "temperature": 0}),
    );
    assert!(
        greedy["text"].as_str().unwrap().contains("Paris"),
        "{greedy}"
    );
    let adapter = support::reference::reference_adapter();
    copy_dir(&adapter, &head.adapters.join("lora_qv_r8"));
    let (status, r) = head.post(
        "/chat",
        &json!({"prompt": "What is the capital of France?", "max_tokens": 32, "temperature": 0.7,
                "adapter_path": "lora_qv_r8"}),
    );
    assert_eq!(status, 200, "{r}");

    // A streaming client that goes away: its sequence stops within a few tokens.
    let body = json!({"prompt": "Write a long story about a dragon and a knight.", "max_tokens": 400,
                      "temperature": 0, "stream": true});
    let tokens = |h: &Head| -> f64 {
        h.get_text("/metrics")
            .1
            .lines()
            .find_map(|l| {
                l.strip_prefix("tessera_engine_generated_tokens_total{replica=\"inference-0\"} ")
            })
            .map(|v| v.parse().unwrap())
            .unwrap_or(0.0)
    };
    let start = tokens(&head);
    {
        let r = Head::agent()
            .post(format!("{}/chat", head.url))
            .send_json(&body)
            .unwrap();
        let events = read_sse(r.into_body().into_reader(), 3);
        assert!(events.iter().all(|(e, _)| e == "token"), "{events:?}");
    }
    head.wait_until("the replica to go idle", Duration::from_secs(60), |h| {
        h.get_text("/metrics")
            .1
            .lines()
            .any(|l| l == "tessera_batch_size{replica=\"inference-0\"} 0")
    });
    let generated = tokens(&head) - start;
    assert!(
        generated < 60.0,
        "{generated} tokens generated after a disconnect at 3"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}
