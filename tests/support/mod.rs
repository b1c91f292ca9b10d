//! A real head (actor tree + HTTP facade) on a loopback port, serving a tiny random model written
//! by the test, and a small HTTP client for it.

#![allow(dead_code)]

use std::io::BufRead;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tessera::config::{Config, Sources};

#[path = "../../engine/tests/common/tiny.rs"]
pub mod tiny;

#[path = "../../engine/tests/common/reference.rs"]
pub mod reference;
#[allow(unused_imports)]
pub use reference::smollm2_path as smollm2;

pub mod cluster;

pub struct Head {
    pub url: String,
    pub dir: tempfile::TempDir,
    pub model: PathBuf,
    pub adapters: PathBuf,
    pub data: PathBuf,
    runtime: Option<tokio::runtime::Runtime>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Writes a tiny model into a fresh directory and starts a head on it with `overrides`.
pub fn start(overrides: &[&str]) -> Head {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny::write_model(&dir.path().join("model"), 7);
    start_in(dir, model, overrides)
}

pub fn start_in(dir: tempfile::TempDir, model: PathBuf, overrides: &[&str]) -> Head {
    let adapters = dir.path().join("adapters");
    let data = dir.path().join("data");
    let q = |p: &std::path::Path| format!("\"{}\"", p.display());
    let mut cli = vec![
        format!("model.path={}", q(&model)),
        format!("adapters.root={}", q(&adapters)),
        format!("training.data_root={}", q(&data)),
        format!("model.models_root={}", q(&dir.path().join("models"))),
        format!("jobs.db_path={}", q(&dir.path().join("jobs.sqlite"))),
        "batching.max_kv_tokens=8192".to_string(),
        "supervision.backoff_initial_ms=50".to_string(),
        "cluster.port=0".to_string(),
    ];
    cli.extend(overrides.iter().map(|s| s.to_string()));
    let config = Config::load(&Sources {
        cli,
        ..Sources::default()
    })
    .unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let state = runtime.block_on(tessera::head::start(&config)).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(tessera::head::serve(
        state,
        listener,
        async move {
            let _ = rx.await;
        },
        Duration::from_secs(10),
    ));
    let head = Head {
        url,
        adapters: adapters.canonicalize().unwrap(),
        data: data.canonicalize().unwrap(),
        dir,
        model,
        runtime: Some(runtime),
        shutdown: Some(tx),
        server: Some(server),
    };
    head.wait_until("ready", Duration::from_secs(60), |h| {
        h.get("/ready").0 == 200
    });
    head
}

impl Head {
    pub fn agent() -> ureq::Agent {
        ureq::Agent::new_with_config(
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(120)))
                .build(),
        )
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        let mut r = Self::agent()
            .get(format!("{}{path}", self.url))
            .call()
            .unwrap();
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub fn get_text(&self, path: &str) -> (u16, String) {
        let mut r = Self::agent()
            .get(format!("{}{path}", self.url))
            .call()
            .unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let mut r = Self::agent()
            .post(format!("{}{path}", self.url))
            .send_json(body)
            .unwrap();
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub fn post_raw(&self, path: &str, body: &str) -> (u16, Value) {
        let mut r = Self::agent()
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .send(body)
            .unwrap();
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub fn delete(&self, path: &str) -> (u16, Value) {
        let mut r = Self::agent()
            .delete(format!("{}{path}", self.url))
            .call()
            .unwrap();
        let status = r.status().as_u16();
        (status, r.body_mut().read_json().unwrap_or(Value::Null))
    }

    /// Posts and reads the SSE answer: (event name, data) pairs.
    pub fn sse(&self, path: &str, body: &Value) -> Vec<(String, String)> {
        let r = Self::agent()
            .post(format!("{}{path}", self.url))
            .send_json(body)
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        read_sse(r.into_body().into_reader(), usize::MAX)
    }

    /// Polls `check` until it holds (panics after `timeout`).
    pub fn wait_until(&self, what: &str, timeout: Duration, mut check: impl FnMut(&Self) -> bool) {
        let t0 = Instant::now();
        while !check(self) {
            assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls a job until it reaches a final state; returns its record.
    pub fn wait_job(&self, id: &str, timeout: Duration) -> Value {
        let mut last = Value::Null;
        self.wait_until(&format!("job {id} to end"), timeout, |h| {
            last = h.get(&format!("/jobs/{id}")).1;
            matches!(
                last["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            )
        });
        last
    }

    pub fn write_dataset(&self, name: &str, lines: usize) -> PathBuf {
        let text: Vec<String> = (0..lines)
            .map(|i| json!({"text": format!("item {i} says hello {}", i * 7)}).to_string())
            .collect();
        std::fs::create_dir_all(&self.data).unwrap();
        let path = self.data.join(name);
        std::fs::write(&path, text.join("\n") + "\n").unwrap();
        path
    }

    /// Stops this head gracefully and starts a new one on the same directory (database, models,
    /// adapters) with `overrides`.
    pub fn restart(mut self, overrides: &[&str]) -> Head {
        self.stop_inner();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        let model = self.model.clone();
        drop(self);
        start_in(dir, model, overrides)
    }

    /// Stops the server and the actors (graceful).
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let (Some(rt), Some(server)) = (self.runtime.as_ref(), self.server.take()) {
            let _ =
                rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), server).await });
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

impl Drop for Head {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// Reads SSE events from `reader` (at most `max` events).
pub fn read_sse(reader: impl std::io::Read, max: usize) -> Vec<(String, String)> {
    let mut events = Vec::new();
    let mut name = String::new();
    let mut data = String::new();
    for line in std::io::BufReader::new(reader).lines() {
        let Ok(line) = line else { break };
        if line.is_empty() {
            if !data.is_empty() || !name.is_empty() {
                events.push((std::mem::take(&mut name), std::mem::take(&mut data)));
                if events.len() >= max {
                    break;
                }
            }
        } else if let Some(v) = line.strip_prefix("event:") {
            name = v.trim().to_string();
        } else if let Some(v) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    events
}

/// The `text` fields of SSE events' JSON data, joined (a stream's token texts).
pub fn sse_text<'a>(events: impl IntoIterator<Item = &'a (String, String)>) -> String {
    events
        .into_iter()
        .map(|(_, d)| {
            serde_json::from_str::<Value>(d).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// Quick LoRA hyperparameters for the tiny model.
pub fn quick_hyperparameters(epochs: usize) -> Value {
    json!({
        "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "learning_rate": 0.02,
        "num_epochs": epochs, "batch_size": 4, "gradient_accumulation_steps": 1, "max_seq_length": 32, "warmup_ratio": 0.0,
        "lr_scheduler": "constant", "eval_fraction": 0.0
    })
}

/// The test environment's Python (`TESSERA_PYTHON`, else `python3`) when it can import every one
/// of `modules` (`"openai, jsonschema"`); `None` otherwise, which fails the test when the test
/// command asks for them (`TESSERA_REQUIRE_OPENAI`) and else tells why it skips.
pub fn python_with(modules: &str) -> Option<String> {
    let python = std::env::var("TESSERA_PYTHON").unwrap_or_else(|_| "python3".into());
    let ready = std::process::Command::new(&python)
        .args(["-c", &format!("import {modules}")])
        .status()
        .is_ok_and(|s| s.success());
    if ready {
        return Some(python);
    }
    assert!(
        std::env::var_os("TESSERA_REQUIRE_OPENAI").is_none(),
        "{modules} required (TESSERA_REQUIRE_OPENAI) but {python} cannot import them"
    );
    eprintln!("skipping the Python client check: {python} cannot import {modules}");
    None
}

/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
