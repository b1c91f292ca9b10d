//! Request-side hardening of a real head on loopback (issue 11): `base_model` confined to the
//! models root, admission control before work reaches a replica, a connection cap and a body read
//! timeout, limits on stop strings, hyperparameters and the job queue, adapter files that are not
//! regular files or exceed the cache budget, and `/metrics` method labels.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{quick_hyperparameters, start, Head};

/// Sends raw bytes on a fresh connection and returns what the server answered (up to EOF or
/// `wait`).
fn raw_exchange(head: &Head, request: &[u8], wait: Duration) -> String {
    let addr = head.url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(wait)).unwrap();
    stream.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(response: &str) -> Option<u16> {
    response.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn base_model_is_confined_to_the_models_root_or_the_served_model() {
    let head = start(&[]);
    head.write_dataset("d.jsonl", 4);
    let outside = head.dir.path().join("outside.gguf");
    std::fs::write(&outside, b"GGUF not really").unwrap();
    let models = head.dir.path().join("models");
    std::fs::write(models.join("junk.gguf"), b"not a model").unwrap();
    let body = |base: &str, out: &str| {
        json!({"dataset_path": "d.jsonl", "output_path": out, "base_model": base,
               "hyperparameters": quick_hyperparameters(1)})
    };
    for (base, status) in [
        (outside.to_str().unwrap(), 403),
        ("/etc/passwd", 403),
        ("../outside.gguf", 403),
        ("missing.gguf", 400),
        ("junk.gguf", 400),
    ] {
        let (got, e) = head.post("/fine-tune", &body(base, "o1"));
        assert_eq!(got, status, "{base}: {e}");
        assert_eq!(e["error"]["field"], "base_model", "{base}: {e}");
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("base_model"),
            "{e}"
        );
    }
    // The served model is always allowed, wherever it lies.
    let (got, a) = head.post("/fine-tune", &body(head.model.to_str().unwrap(), "o2"));
    assert_eq!(got, 202, "{a}");
    let job = head.wait_job(a["job_id"].as_str().unwrap(), Duration::from_secs(120));
    assert_eq!(job["status"], "succeeded", "{job}");
}

#[test]
fn job_limits_max_seq_length_epochs_and_the_queue() {
    let head = start(&["jobs.max_queued=1"]);
    head.write_dataset("d.jsonl", 16);
    let submit = |out: &str, hyper: Value| {
        head.post(
            "/fine-tune",
            &json!({"dataset_path": "d.jsonl", "output_path": out, "hyperparameters": hyper}),
        )
    };
    let mut long_seq = quick_hyperparameters(1);
    long_seq["max_seq_length"] = json!(1024);
    let (status, e) = submit("x", long_seq);
    assert_eq!(status, 422, "{e}");
    assert_eq!(e["error"]["field"], "hyperparameters.max_seq_length");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("512"),
        "{e}"
    );
    let mut epochs = quick_hyperparameters(1);
    epochs["num_epochs"] = json!(1_000_000_000u64);
    let (status, e) = submit("x", epochs);
    assert_eq!(status, 422, "{e}");
    assert_eq!(e["error"]["field"], "hyperparameters.num_epochs");

    // One job running, one queued: a third is refused until the queue drains.
    let (status, running) = submit("long", quick_hyperparameters(500));
    assert_eq!(status, 202, "{running}");
    let running = running["job_id"].as_str().unwrap().to_string();
    head.wait_until("the long job to run", Duration::from_secs(60), |h| {
        h.get(&format!("/jobs/{running}")).1["status"] == "running"
    });
    let (status, queued) = submit("second", quick_hyperparameters(1));
    assert_eq!(status, 202, "{queued}");
    let (status, e) = submit("third", quick_hyperparameters(1));
    assert_eq!(status, 429, "{e}");
    assert_eq!(e["error"]["type"], "overloaded");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("jobs.max_queued"),
        "{e}"
    );
    assert_eq!(head.delete(&format!("/jobs/{running}")).0, 200);
    let queued = queued["job_id"].as_str().unwrap().to_string();
    assert_eq!(
        head.wait_job(&queued, Duration::from_secs(120))["status"],
        "succeeded"
    );
    let (status, a) = submit("third", quick_hyperparameters(1));
    assert_eq!(status, 202, "{a}");
}

#[test]
fn stop_strings_are_bounded_in_number_and_length() {
    let head = start(&[]);
    let many: Vec<String> = (0..17).map(|i| format!("s{i}")).collect();
    let long = "x".repeat(300);
    for (route, body) in [
        (
            "/chat",
            json!({"prompt": "hi", "max_tokens": 2, "stop": many}),
        ),
        (
            "/chat",
            json!({"prompt": "hi", "max_tokens": 2, "stop": long}),
        ),
        (
            "/v1/completions",
            json!({"model": "model", "prompt": "hi", "max_tokens": 2, "stop": many}),
        ),
    ] {
        let (status, e) = head.post(route, &body);
        assert_eq!(status, 422, "{route}: {e}");
        assert_eq!(e["error"]["field"], "stop", "{route}: {e}");
    }
    let sixteen: Vec<String> = (0..16).map(|i| format!("s{i}")).collect();
    let (status, r) = head.post(
        "/chat",
        &json!({"prompt": "hi", "max_tokens": 2, "stop": sixteen}),
    );
    assert_eq!(status, 200, "{r}");
}

#[test]
fn unknown_methods_share_one_metrics_label() {
    let head = start(&[]);
    for method in ["FOOBAR", "BREW", "X-PROBE-1"] {
        let answer = raw_exchange(
            &head,
            format!("{method} /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
            Duration::from_secs(10),
        );
        let status = status_of(&answer);
        assert!(status.is_some_and(|s| (400..500).contains(&s)), "{answer}");
    }
    let (_, metrics) = head.get_text("/metrics");
    assert!(metrics.contains("method=\"other\""), "{metrics}");
    for raw in ["FOOBAR", "BREW", "X-PROBE-1"] {
        assert!(!metrics.contains(raw), "{raw} became a label:\n{metrics}");
    }
}

#[test]
fn adapter_files_must_be_regular_and_fit_the_cache_budget() {
    let head = start(&["adapters.cache_memory_mb=1"]);
    let config = |dir: &std::path::Path| {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("adapter_config.json"),
            json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
                .to_string(),
        )
        .unwrap();
    };
    // A link to /dev/zero (outside the root) and a FIFO (inside it): refused without reading.
    let zero = head.adapters.join("zero");
    config(&zero);
    std::os::unix::fs::symlink("/dev/zero", zero.join("adapter_model.safetensors")).unwrap();
    let fifo = head.adapters.join("fifo");
    config(&fifo);
    let made = std::process::Command::new("mkfifo")
        .arg(fifo.join("adapter_model.safetensors"))
        .status()
        .unwrap();
    assert!(made.success());
    let linked = head.adapters.join("linked");
    config(&linked);
    std::os::unix::fs::symlink(
        fifo.join("adapter_model.safetensors"),
        linked.join("adapter_model.safetensors"),
    )
    .unwrap();
    // Bigger than the 1 MiB budget (rank 256 on every projection: about 3 MiB).
    support::tiny::write_adapter(
        &head.adapters.join("big"),
        256,
        16.0,
        &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        1,
    );
    for (name, status) in [("zero", 403), ("fifo", 400), ("linked", 400), ("big", 422)] {
        let t0 = Instant::now();
        let (got, e) = head.post(
            "/chat",
            &json!({"prompt": "hi", "max_tokens": 2, "adapter_path": name}),
        );
        assert_eq!(got, status, "{name}: {e}");
        assert_eq!(e["error"]["field"], "adapter_path", "{name}: {e}");
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{name} took {:?}",
            t0.elapsed()
        );
    }
    let (status, e) = head.post(
        "/v1/completions",
        &json!({"model": "big", "prompt": "hi", "max_tokens": 2}),
    );
    assert_eq!(status, 422, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("adapters.cache_memory_mb"),
        "{e}"
    );
    // A small adapter still works.
    support::tiny::write_adapter(&head.adapters.join("small"), 4, 8.0, &["q_proj"], 2);
    let (status, r) = head.post(
        "/chat",
        &json!({"prompt": "hi", "max_tokens": 2, "adapter_path": "small"}),
    );
    assert_eq!(status, 200, "{r}");
}

#[test]
fn admission_refuses_beyond_max_in_flight_before_the_replica_sees_the_work() {
    let head = start(&[
        "batching.max_in_flight=2",
        "batching.max_batch_size=1",
        "batching.max_waiting=64",
    ]);
    let body =
        json!({"prompt": "go", "max_tokens": 300, "temperature": 1.0, "seed": 1, "stream": true});
    // Six clients at once: two are admitted, the rest refused with 503 + Retry-After.
    let results: Vec<(u16, Option<String>, String)> = std::thread::scope(|s| {
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
                    let text = r.body_mut().read_to_string().unwrap_or_default();
                    (r.status().as_u16(), retry, text)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let refused: Vec<_> = results.iter().filter(|(s, _, _)| *s == 503).collect();
    assert!(!refused.is_empty(), "{results:?}");
    for (_, retry, text) in &refused {
        assert_eq!(retry.as_deref(), Some("1"));
        assert!(text.contains("batching.max_in_flight"), "{text}");
    }
    assert!(results.iter().any(|(s, _, _)| *s == 200), "{results:?}");

    // Clients that hang up at once: their requests stop counting and the replica serves again.
    let addr = head.url.trim_start_matches("http://").to_string();
    let prompt = "word ".repeat(20_000);
    for _ in 0..20 {
        let payload = json!({"prompt": prompt, "raw": true, "max_tokens": 5}).to_string();
        let mut s = TcpStream::connect(&addr).unwrap();
        let _ = s.write_all(
            format!(
                "POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
                payload.len()
            )
            .as_bytes(),
        );
        drop(s);
    }
    head.wait_until("in-flight to drain", Duration::from_secs(60), |h| {
        h.get("/cluster").1["replicas"][0]["in_flight"] == 0
    });
    let (status, r) = head.post(
        "/chat",
        &json!({"prompt": "after", "max_tokens": 2, "temperature": 0}),
    );
    assert_eq!(status, 200, "{r}");
}

#[test]
fn a_body_that_does_not_arrive_in_time_is_answered_408() {
    let head = start(&["server.body_read_timeout_secs=1"]);
    let t0 = Instant::now();
    // Promise 100 bytes, send 10, then wait.
    let addr = head.url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
        .write_all(b"POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\":")
        .unwrap();
    let mut out = vec![0u8; 4096];
    let n = stream.read(&mut out).unwrap_or(0);
    let answer = String::from_utf8_lossy(&out[..n]).into_owned();
    assert_eq!(status_of(&answer), Some(408), "{answer}");
    assert!(answer.contains("body_read_timeout_secs"), "{answer}");
    assert!(t0.elapsed() < Duration::from_secs(15));
}

#[test]
fn request_headers_that_do_not_arrive_in_time_close_the_connection() {
    let head = start(&["server.header_read_timeout_secs=1"]);
    let addr = head.url.trim_start_matches("http://");
    // A slowloris: the request line and a header, then nothing.
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let t0 = Instant::now();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")
        .unwrap();
    let mut out = Vec::new();
    let read = stream.read_to_end(&mut out);
    let waited = t0.elapsed();
    assert!(
        read.is_ok()
            || read
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "{read:?}"
    );
    assert!(
        status_of(&String::from_utf8_lossy(&out)) != Some(200),
        "the incomplete request was served"
    );
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "closed after {waited:?}"
    );
    // A whole request is served as before.
    let answer = raw_exchange(
        &head,
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    );
    assert_eq!(status_of(&answer), Some(200), "{answer}");
}

#[test]
fn connections_beyond_the_cap_wait_until_one_closes() {
    let head = start(&["server.max_connections=2"]);
    let addr = head.url.trim_start_matches("http://").to_string();
    // The readiness polls of `start` have closed their connections; wait until both slots are
    // free (a fresh request is answered), then hold both with idle connections.
    head.wait_until("a free slot", Duration::from_secs(10), |h| {
        h.get("/ready").0 == 200
    });
    let idle1 = TcpStream::connect(&addr).unwrap();
    let idle2 = TcpStream::connect(&addr).unwrap();
    let request = b"GET /ready HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    let mut third = TcpStream::connect(&addr).unwrap();
    third.write_all(request).unwrap();
    third
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut buf = [0u8; 256];
    let early = third.read(&mut buf);
    assert!(
        early.is_err(),
        "a third connection was served while two were open: {:?}",
        early.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    );
    drop(idle1);
    third
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = third.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(status_of(&answer), Some(200), "{answer}");
    drop(idle2);
}
