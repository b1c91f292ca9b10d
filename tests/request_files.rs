//! Files that requests name, on a real head on loopback (issue 27, item 1).
//!
//! Dataset files: a FIFO, a link out of the data root (to a device), a sparse file claiming
//! gigabytes and a file over `training.max_dataset_bytes` are refused at submit naming
//! `dataset_path`; a file swapped for a FIFO after submit fails its job at once (the trainer
//! checks what it opened) instead of blocking a thread for ever, and an output directory replaced
//! by a link after submit is never written through; an over-long line fails the job naming the
//! line. Model files that are FIFOs (a GGUF, a config.json) are refused at once by
//! `POST /models` and `POST /fine-tune`. The head keeps serving throughout.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use support::{quick_hyperparameters, start};

fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn fifos_devices_and_oversized_datasets_are_refused_and_never_block_the_head() {
    let head = start(&["training.max_dataset_bytes=100000"]);
    head.write_dataset("d.jsonl", 16);
    let data = head.data.clone();
    mkfifo(&data.join("fifo.jsonl"));
    std::os::unix::fs::symlink("/dev/zero", data.join("zero.jsonl")).unwrap();
    std::fs::File::create(data.join("sparse.jsonl"))
        .unwrap()
        .set_len(8 << 30)
        .unwrap();
    std::fs::write(data.join("big.jsonl"), vec![b' '; 100_001]).unwrap();
    let submit = |dataset: &str, out: &str, epochs: usize| {
        head.post(
            "/fine-tune",
            &json!({"dataset_path": dataset, "output_path": out,
                    "hyperparameters": quick_hyperparameters(epochs)}),
        )
    };
    for (dataset, code, why) in [
        ("fifo.jsonl", 400, "a FIFO"),
        // The link resolves outside the data root.
        ("zero.jsonl", 403, "outside the allowed directory"),
        ("sparse.jsonl", 400, "training.max_dataset_bytes"),
        (
            "big.jsonl",
            400,
            "100001 bytes, more than the 100000 allowed",
        ),
    ] {
        let t0 = Instant::now();
        let (status, e) = submit(dataset, "refused", 1);
        assert_eq!(status, code, "{dataset}: {e}");
        assert_eq!(e["error"]["field"], "dataset_path", "{dataset}: {e}");
        let message = e["error"]["message"].as_str().unwrap();
        assert!(message.contains(why), "{dataset}: {message}");
        assert!(t0.elapsed() < Duration::from_secs(5), "{dataset}");
    }

    // A file swapped for a FIFO after submit: the job fails when its trainer opens it.
    let (status, long) = submit("d.jsonl", "long", 200);
    assert_eq!(status, 202, "{long}");
    let long = long["job_id"].as_str().unwrap().to_string();
    head.wait_until("the long job to run", Duration::from_secs(60), |h| {
        h.get(&format!("/jobs/{long}")).1["status"] == "running"
    });
    std::fs::copy(data.join("d.jsonl"), data.join("later.jsonl")).unwrap();
    let (status, later) = submit("later.jsonl", "later", 1);
    assert_eq!(status, 202, "{later}");
    let later = later["job_id"].as_str().unwrap().to_string();
    std::fs::remove_file(data.join("later.jsonl")).unwrap();
    mkfifo(&data.join("later.jsonl"));
    // And an output directory replaced by a link out of the adapters root after submit.
    let (status, planted) = submit("d.jsonl", "planted", 1);
    assert_eq!(status, 202, "{planted}");
    let planted = planted["job_id"].as_str().unwrap().to_string();
    let outside = head.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let _ = std::fs::remove_dir(head.adapters.join("planted"));
    std::os::unix::fs::symlink(&outside, head.adapters.join("planted")).unwrap();
    let (status, c) = head.delete(&format!("/jobs/{long}"));
    assert_eq!(status, 200, "{c}");
    let job = head.wait_job(&later, Duration::from_secs(60));
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap_or_default();
    assert!(error.contains("a FIFO"), "{job}");
    let job = head.wait_job(&planted, Duration::from_secs(60));
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap_or_default();
    assert!(error.contains("symbolic link"), "{job}");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);

    // The head still serves and trains.
    let (status, ok) = submit("d.jsonl", "fine", 1);
    assert_eq!(status, 202, "{ok}");
    let ok = ok["job_id"].as_str().unwrap().to_string();
    assert_eq!(
        head.wait_job(&ok, Duration::from_secs(120))["status"],
        "succeeded"
    );
}

#[test]
fn a_line_longer_than_the_bound_fails_the_job_naming_the_line() {
    let head = start(&[]);
    head.write_dataset("d.jsonl", 4);
    let path = head.data.join("long-line.jsonl");
    let mut text = std::fs::read_to_string(head.data.join("d.jsonl")).unwrap();
    text.push_str(&format!(
        "{{\"text\": \"{}\"}}\n",
        "a".repeat((16 << 20) + 10)
    ));
    std::fs::write(&path, text).unwrap();
    let (status, job) = head.post(
        "/fine-tune",
        &json!({"dataset_path": "long-line.jsonl", "output_path": "o",
                "hyperparameters": quick_hyperparameters(1)}),
    );
    assert_eq!(status, 202, "{job}");
    let id = job["job_id"].as_str().unwrap().to_string();
    let job = head.wait_job(&id, Duration::from_secs(60));
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("line 5") && error.contains("longer than 16777216 bytes"),
        "{error}"
    );
}

#[test]
fn model_files_that_are_fifos_are_refused_at_once() {
    let head = start(&[]);
    head.write_dataset("d.jsonl", 4);
    let models = head.dir.path().join("models");
    mkfifo(&models.join("fifo.gguf"));
    // A Hugging Face directory whose config.json is a FIFO.
    let dir = support::tiny::write_model(&models.join("hf-fifo"), 3);
    std::fs::remove_file(dir.join("config.json")).unwrap();
    mkfifo(&dir.join("config.json"));
    for path in ["fifo.gguf", "hf-fifo"] {
        let t0 = Instant::now();
        let (status, e) = head.post("/models", &json!({"name": "m", "path": path}));
        assert!((400..500).contains(&status), "{path}: {status} {e}");
        assert_eq!(e["error"]["field"], "path", "{path}: {e}");
        let (status, e) = head.post(
            "/fine-tune",
            &json!({"dataset_path": "d.jsonl", "output_path": "o", "base_model": path,
                    "hyperparameters": quick_hyperparameters(1)}),
        );
        assert!((400..500).contains(&status), "{path}: {status} {e}");
        assert_eq!(e["error"]["field"], "base_model", "{path}: {e}");
        assert!(t0.elapsed() < Duration::from_secs(10), "{path}");
    }
    assert_eq!(head.get("/health").0, 200);
}
