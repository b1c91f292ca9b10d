//! A cluster of real `tessera` processes on loopback for the tests: a head and workers, their
//! logs, and small HTTP helpers.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{free_port, quick_hyperparameters, Head};

pub const BIN: &str = env!("CARGO_BIN_EXE_tessera");

/// One cluster at a time: ports are picked free then released, and a parallel test's node server
/// could take one in between.
pub static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn signal(&self, sig: &str) {
        assert!(Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub model: PathBuf,
    pub http: u16,
    pub cluster: u16,
}

#[allow(clippy::new_without_default)]
impl Cluster {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let model = super::tiny::write_model(&dir.path().join("model"), 5);
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        let lines: Vec<String> = (0..16)
            .map(|i| json!({"text": format!("record {i} holds {}", i * 5)}).to_string())
            .collect();
        std::fs::write(dir.path().join("data/d.jsonl"), lines.join("\n")).unwrap();
        Self {
            dir,
            model,
            http: free_port(),
            cluster: free_port(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }

    pub fn spawn(&self, name: &str, args: &[String]) -> Proc {
        self.spawn_env(name, args, &[])
    }

    /// Like [`Cluster::spawn`], with `env` set for the process.
    pub fn spawn_env(&self, name: &str, args: &[String], env: &[(&str, &str)]) -> Proc {
        let log = self.dir.path().join(format!("{name}.log"));
        let child = Command::new(BIN)
            .args(args)
            .envs(env.iter().copied())
            .env_remove("LD_LIBRARY_PATH")
            .env_remove("TESSERA_MODEL_PATH")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Proc { child, log }
    }

    pub fn head(&self, local_slots: u32) -> Proc {
        self.head_with(local_slots, &[])
    }

    /// The head, with `extra` settings (`key=value`) after the test's own.
    pub fn head_with(&self, local_slots: u32, extra: &[&str]) -> Proc {
        let d = self.dir.path();
        let set = |kv: String| ["--set".to_string(), kv];
        let mut args: Vec<String> = vec![
            "--log-format".into(),
            "pretty".into(),
            "head".into(),
            "--port".into(),
            self.http.to_string(),
            "--model".into(),
            self.model.display().to_string(),
        ];
        for kv in [
            format!("adapters.root=\"{}\"", d.join("adapters").display()),
            format!("training.data_root=\"{}\"", d.join("data").display()),
            format!("jobs.db_path=\"{}\"", d.join("jobs.sqlite").display()),
            format!("cluster.port={}", self.cluster),
            format!("resources.cpu_inference_slots={local_slots}"),
            format!("resources.cpu_training_slots={local_slots}"),
            "cluster.heartbeat_timeout_secs=3".into(),
            "batching.max_kv_tokens=8192".into(),
        ] {
            args.extend(set(kv));
        }
        for e in extra {
            args.extend(set(e.to_string()));
        }
        self.spawn("head", &args)
    }

    /// A worker's roots (`--set` pairs): the head's adapters and data, and the test's directory as
    /// its models root (the head's model and any deployed one lie there). A worker acts only on
    /// paths inside its own roots.
    pub fn worker_roots(&self) -> Vec<String> {
        let d = self.dir.path();
        [
            format!("adapters.root=\"{}\"", d.join("adapters").display()),
            format!("training.data_root=\"{}\"", d.join("data").display()),
            format!("model.models_root=\"{}\"", d.display()),
        ]
        .into_iter()
        .flat_map(|kv| ["--set".to_string(), kv])
        .collect()
    }

    pub fn worker(&self, name: &str, extra: &[&str]) -> Proc {
        self.worker_with(name, Some(&self.model), extra)
    }

    /// A worker with `env` set for its process.
    pub fn worker_env(&self, name: &str, extra: &[&str], env: &[(&str, &str)]) -> Proc {
        self.spawn_env(name, &self.worker_args(Some(&self.model), extra), env)
    }

    /// A worker; `model: None` leaves `model.path` unset, so it loads the head's.
    pub fn worker_with(&self, name: &str, model: Option<&PathBuf>, extra: &[&str]) -> Proc {
        self.spawn(name, &self.worker_args(model, extra))
    }

    fn worker_args(&self, model: Option<&PathBuf>, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--log-format".into(),
            "pretty".into(),
            "worker".into(),
            "--join".into(),
            format!("127.0.0.1:{}", self.cluster),
            "--set".into(),
            "batching.max_kv_tokens=8192".into(),
        ];
        if let Some(m) = model {
            args.extend(["--model".to_string(), m.display().to_string()]);
        }
        args.extend(self.worker_roots());
        for e in extra {
            args.extend(["--set".to_string(), e.to_string()]);
        }
        args
    }

    pub fn get(&self, path: &str) -> Value {
        match Head::agent().get(format!("{}{path}", self.url())).call() {
            Ok(mut r) => r.body_mut().read_json().unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let mut r = Head::agent()
            .post(format!("{}{path}", self.url()))
            .send_json(body)
            .unwrap();
        (
            r.status().as_u16(),
            r.body_mut().read_json().unwrap_or(Value::Null),
        )
    }

    pub fn workers(&self) -> Vec<String> {
        self.get("/cluster")["workers"]
            .as_array()
            .map(|ws| {
                ws.iter()
                    .map(|w| w["info"]["node"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn wait(&self, what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Duration {
        let t0 = Instant::now();
        while !check() {
            assert!(
                t0.elapsed() < timeout,
                "timed out waiting for {what}; head log:\n{}",
                std::fs::read_to_string(self.dir.path().join("head.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        t0.elapsed()
    }

    pub fn submit(&self, out: &str, epochs: usize) -> String {
        let mut h = quick_hyperparameters(epochs);
        h["save_every_steps"] = json!(4);
        self.submit_body(
            &json!({"dataset_path": "d.jsonl", "output_path": out, "hyperparameters": h}),
        )
    }

    /// `POST /fine-tune` with `body`; the job id, or a panic with the head's last log lines.
    pub fn submit_body(&self, body: &Value) -> String {
        let (status, a) = self.post("/fine-tune", body);
        if status != 202 {
            let log = std::fs::read_to_string(self.dir.path().join("head.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(80)..].join("\n");
            panic!("POST /fine-tune answered {status}: {a}\nhead log (last lines):\n{tail}");
        }
        a["job_id"].as_str().unwrap().to_string()
    }

    pub fn job(&self, id: &str) -> Value {
        self.get(&format!("/jobs/{id}"))
    }

    pub fn delete(&self, path: &str) -> (u16, Value) {
        let mut r = Head::agent()
            .delete(format!("{}{path}", self.url()))
            .call()
            .unwrap();
        (
            r.status().as_u16(),
            r.body_mut().read_json().unwrap_or(Value::Null),
        )
    }
}
