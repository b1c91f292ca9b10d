//! `tessera chat`, `tessera fine-tune` and `tessera jobs` against a real head serving a tiny model.

mod support;

use std::process::{Command, Output};

use serde_json::Value;
use support::start;

const BIN: &str = env!("CARGO_BIN_EXE_tessera");
const TOKEN: &str = "s3cret";

fn tessera(url: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .args(["--url", url, "--token", TOKEN])
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        stdout(out),
        stderr(out)
    );
    stdout(out)
}

/// Exits 1 with `needle` in the message on stderr.
fn fails_with(out: &Output, needle: &str) {
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout: {}\nstderr: {}",
        stdout(out),
        stderr(out)
    );
    assert!(
        stderr(out).contains(needle),
        "`{needle}` not in: {}",
        stderr(out)
    );
}

#[test]
fn chat_streams_tokens_prints_json_and_reports_errors() {
    let head = start(&[&format!("server.auth_token=\"{TOKEN}\"")]);
    let url = head.url.as_str();

    let json_out = ok(&tessera(
        url,
        &[
            "chat",
            "hello",
            "--max-tokens",
            "5",
            "--temperature",
            "0",
            "--json",
        ],
    ));
    let v: Value = serde_json::from_str(json_out.trim()).unwrap();
    assert!(v["id"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
    assert!(
        matches!(v["finish_reason"].as_str(), Some("length" | "stop")),
        "{v}"
    );
    let completion = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=5).contains(&completion), "{v}");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0, "{v}");
    assert!(v["adapter_path"].is_null(), "{v}");
    assert!(v["replica"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
    let text = v["text"].as_str().unwrap();

    // Greedy: the streamed tokens spell the same answer, then a newline.
    let streamed = ok(&tessera(
        url,
        &["chat", "hello", "--max-tokens", "5", "--temperature", "0"],
    ));
    assert_eq!(streamed, format!("{text}\n"));
    let whole = ok(&tessera(
        url,
        &[
            "chat",
            "hello",
            "--max-tokens",
            "5",
            "--temperature",
            "0",
            "--no-stream",
        ],
    ));
    assert_eq!(whole, format!("{text}\n"));
    let messages = r#"[{"role": "user", "content": "hello"}]"#;
    let via_messages = ok(&tessera(
        url,
        &[
            "chat",
            "--messages",
            messages,
            "--max-tokens",
            "5",
            "--temperature",
            "0",
        ],
    ));
    assert_eq!(via_messages, format!("{text}\n"));

    // An adapter under adapters.root.
    support::tiny::write_adapter(&head.adapters.join("a1"), 4, 8.0, &["q_proj", "v_proj"], 3);
    let with_adapter = ok(&tessera(
        url,
        &[
            "chat",
            "hello",
            "--adapter",
            "a1",
            "--max-tokens",
            "3",
            "--json",
        ],
    ));
    let v: Value = serde_json::from_str(with_adapter.trim()).unwrap();
    assert!(
        v["adapter_path"]
            .as_str()
            .is_some_and(|p| p.ends_with("a1")),
        "{v}"
    );

    // The server's errors reach stderr; the exit status is 1.
    fails_with(
        &tessera(url, &["chat", "hello", "--adapter", "missing"]),
        "adapter_path",
    );
    fails_with(
        &tessera(url, &["chat", "hello", "--max-tokens", "0", "--json"]),
        "max_tokens",
    );
    let no_token = Command::new(BIN)
        .args(["chat", "hello", "--url", url])
        .output()
        .unwrap();
    fails_with(&no_token, "bearer token");
    let nobody = Command::new(BIN)
        .args(["chat", "hello", "--url", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    fails_with(&nobody, "cannot reach the head");
}

#[test]
fn fine_tune_watch_then_list_show_and_cancel_jobs() {
    let head = start(&[&format!("server.auth_token=\"{TOKEN}\"")]);
    let url = head.url.as_str();
    head.write_dataset("train.jsonl", 16);
    let hyper =
        r#"{"lora_r":4,"num_epochs":1,"batch_size":4,"max_seq_length":32,"learning_rate":0.01}"#;

    // Not a terminal: the job id, then one JSON line per event; exit 0 once it succeeded.
    let out = ok(&tessera(
        url,
        &[
            "fine-tune",
            "--dataset",
            "train.jsonl",
            "--output",
            "ft1",
            "--hyperparameters",
            hyper,
            "--priority",
            "high",
            "--watch",
        ],
    ));
    let mut lines = out.lines();
    let id = lines.next().unwrap().trim().to_string();
    let events: Vec<Value> = lines.map(|l| serde_json::from_str(l).unwrap()).collect();
    let last = events.last().expect("at least the final state event");
    assert_eq!(last["event"], "state", "{out}");
    assert_eq!(last["data"]["status"], "succeeded", "{out}");
    assert_eq!(last["data"]["id"], id.as_str(), "{out}");
    for e in events.iter().filter(|e| e["event"] == "progress") {
        assert!(
            e["data"]["step"].as_u64().is_some() && e["data"]["loss"].as_f64().is_some(),
            "{e}"
        );
    }

    // The table lists it; a status filter keeps or drops it.
    let table = ok(&tessera(url, &["jobs"]));
    let header = table.lines().next().unwrap();
    for col in ["ID", "STATUS", "PRIORITY", "PROGRESS", "LOSS", "CREATED"] {
        assert!(header.contains(col), "{table}");
    }
    let row = table
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains("succeeded") && row.contains("high"), "{row}");
    let progress = row
        .split_whitespace()
        .find(|c| c.contains('/'))
        .unwrap_or_else(|| panic!("{row}"));
    let (step, total) = progress.split_once('/').unwrap();
    assert_eq!(step, total, "{row}");
    assert!(ok(&tessera(url, &["jobs", "--status", "succeeded"])).contains(&id));
    assert!(!ok(&tessera(url, &["jobs", "--status", "running"])).contains(&id));
    fails_with(&tessera(url, &["jobs", "--status", "bogus"]), "status");

    // `tessera status`: health, the node with its replica and trainer, jobs by state.
    let status = ok(&tessera(url, &["status"]));
    assert!(status.starts_with("health: ok"), "{status}");
    let node = status
        .lines()
        .find(|l| l.starts_with("head "))
        .unwrap_or_else(|| panic!("{status}"));
    assert!(node.contains(" 1/1 "), "{status}");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("inference-0") && l.contains("running")),
        "{status}"
    );
    assert!(status.contains("1 succeeded"), "{status}");

    // One job: its record as JSON; watching a finished job ends at once.
    let record: Value = serde_json::from_str(&ok(&tessera(url, &["jobs", &id]))).unwrap();
    assert_eq!(record["status"], "succeeded");
    assert!(
        record["adapter_path"]
            .as_str()
            .is_some_and(|p| p.ends_with("ft1")),
        "{record}"
    );
    assert!(
        !record["history"].as_array().unwrap().is_empty(),
        "{record}"
    );
    ok(&tessera(url, &["jobs", &id, "--watch"]));

    // Cancelling a finished job is a conflict; an unknown id is not found.
    let out = tessera(url, &["jobs", &id, "--cancel"]);
    fails_with(&out, "already succeeded");
    fails_with(&out, "409");
    fails_with(&tessera(url, &["jobs", "no-such-job"]), "404");

    // A job cancelled while watched: exit 1 naming the state.
    let long = r#"{"lora_r":4,"num_epochs":500,"batch_size":4,"max_seq_length":32}"#;
    let out = ok(&tessera(
        url,
        &[
            "fine-tune",
            "--dataset",
            "train.jsonl",
            "--output",
            "ft2",
            "--hyperparameters",
            long,
        ],
    ));
    let id2 = out.trim().to_string();
    fails_with(
        &tessera(url, &["jobs", &id2, "--cancel", "--watch"]),
        "cancelled",
    );
    let record: Value = serde_json::from_str(&ok(&tessera(url, &["jobs", &id2]))).unwrap();
    assert_eq!(record["status"], "cancelled", "{record}");
}

#[test]
fn models_deploy_list_chat_and_delete() {
    let head = start(&[
        &format!("server.auth_token=\"{TOKEN}\""),
        "resources.cpu_inference_slots=2",
        "model.replicas=1",
    ]);
    let url = head.url.as_str();
    support::tiny::write_model(&head.dir.path().join("models").join("tiny2"), 11);

    let out = ok(&tessera(
        url,
        &["models", "deploy", "second", "tiny2", "--wait"],
    ));
    assert!(out.starts_with("second ready"), "{out}");
    let table = ok(&tessera(url, &["models", "list"]));
    let row = table.lines().find(|l| l.starts_with("second")).unwrap();
    assert!(
        row.contains("ready") && row.contains("1/1") && row.contains("fixed"),
        "{table}"
    );
    assert!(
        table.lines().any(|l| l.starts_with("model (default)")),
        "{table}"
    );
    let answer = ok(&tessera(
        url,
        &[
            "chat",
            "hello",
            "--model",
            "second",
            "--max-tokens",
            "4",
            "--temperature",
            "0",
            "--json",
        ],
    ));
    let v: Value = serde_json::from_str(answer.lines().last().unwrap()).unwrap();
    assert_eq!(v["model"], "second", "{answer}");
    assert_eq!(v["replica"], "inference-1", "{answer}");
    fails_with(
        &tessera(url, &["models", "deploy", "second", "tiny2"]),
        "exists",
    );
    let out = ok(&tessera(url, &["models", "delete", "second"]));
    assert!(out.starts_with("second deleting"), "{out}");
    fails_with(
        &tessera(url, &["models", "delete", "model"]),
        "cannot be deleted",
    );
}
