//! Several `tessera` processes on loopback as one cluster: a head and workers that join it over
//! ractor_cluster. Chat answered by a worker, jobs on two workers at once, a worker killed during
//! a job (the job resumes on the other from its checkpoint), a stopped worker evicted and back
//! (its job runs again elsewhere and its stale attempt stops without writing), a wrong cookie
//! refused, a worker that starts before its head.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::cluster::{serial, Cluster, Proc, BIN};
use support::{read_sse, smollm2, Head};

/// `text` without its terminal colour codes (`ESC [ ... m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(ch) = chars.next() {
        if ch == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

fn chat(c: &Cluster) -> (u16, Value) {
    c.post(
        "/chat",
        &json!({"prompt": "hello", "max_tokens": 6, "temperature": 0}),
    )
}

#[test]
fn two_workers_serve_chat_run_jobs_and_a_killed_one_hands_its_job_over() {
    let _serial = serial();
    let c = Cluster::new();
    let _head = c.head(0);
    let mut a = c.worker("worker-a", &[]);
    let mut b = c.worker("worker-b", &[]);
    c.wait("two workers", Duration::from_secs(60), || {
        c.workers().len() == 2
    });
    let cluster = c.get("/cluster");
    assert_eq!(
        cluster["replicas"].as_array().unwrap().len(),
        2,
        "{cluster}"
    );
    assert_eq!(
        cluster["nodes"][0]["placement"]["replicas"]
            .as_array()
            .unwrap()
            .len(),
        0
    );

    // The head has no replica of its own: a worker answers.
    let (status, r) = chat(&c);
    assert_eq!(status, 200, "{r}");
    let replica = r["replica"].as_str().unwrap();
    assert!(
        c.workers().iter().any(|w| replica.starts_with(w.as_str())),
        "{replica}"
    );
    // A client's X-Request-Id comes back, and labels the request's lines on the head and on the
    // worker that served it.
    let mut traced = Head::agent()
        .post(format!("{}/chat", c.url()))
        .header("X-Request-Id", "trace-me-4711")
        .send_json(json!({"prompt": "hello", "max_tokens": 4, "temperature": 0}))
        .unwrap();
    assert_eq!(
        traced.headers().get("x-request-id").unwrap(),
        "trace-me-4711"
    );
    let answer: Value = traced.body_mut().read_json().unwrap();
    assert!(answer["text"].is_string(), "{answer}");
    c.wait(
        "the request id in the worker's log",
        Duration::from_secs(10),
        || a.log().contains("trace-me-4711") || b.log().contains("trace-me-4711"),
    );
    assert!(
        std::fs::read_to_string(c.dir.path().join("head.log"))
            .unwrap()
            .contains("trace-me-4711"),
        "the head's lines of the request carry its id"
    );
    // Streaming flows back through the cluster too.
    let resp = Head::agent()
        .post(format!("{}/chat", c.url()))
        .send_json(json!({"prompt": "hello", "max_tokens": 6, "temperature": 0, "stream": true}))
        .unwrap();
    let events = read_sse(resp.into_body().into_reader(), usize::MAX);
    let done: Value = serde_json::from_str(&events.last().unwrap().1).unwrap();
    assert_eq!(done["text"], r["text"]);
    // A stream longer than the worker's credit window (64 events) flows as the head delivers.
    let resp = Head::agent()
        .post(format!("{}/chat", c.url()))
        .send_json(
            json!({"prompt": "x", "raw": true, "max_tokens": 300, "temperature": 1.0,
                          "seed": 3, "stream": true}),
        )
        .unwrap();
    let events = read_sse(resp.into_body().into_reader(), usize::MAX);
    let (last, data) = events.last().unwrap();
    assert_eq!(last, "done", "{events:?}");
    let done: Value = serde_json::from_str(data).unwrap();
    let tokens = events.iter().filter(|(e, _)| e == "token").count() as u64;
    assert_eq!(tokens, done["usage"]["completion_tokens"].as_u64().unwrap());
    eprintln!("remote stream of {tokens} tokens delivered");

    // Two jobs run at once, one per worker.
    let j1 = c.submit("one", 60);
    let j2 = c.submit("two", 60);
    c.wait("both jobs running", Duration::from_secs(60), || {
        c.job(&j1)["status"] == "running" && c.job(&j2)["status"] == "running"
    });
    let (n1, n2) = (c.job(&j1)["node"].clone(), c.job(&j2)["node"].clone());
    assert_ne!(n1, n2, "one job per worker");

    // Kill the worker of job 1 once it has a checkpoint; the job moves to the other worker.
    c.wait("a checkpoint of job 1", Duration::from_secs(120), || {
        c.job(&j1)["progress"]["step"].as_u64().unwrap_or(0) >= 5
    });
    let victim = if a.log().contains(n1.as_str().unwrap()) {
        &mut a
    } else {
        &mut b
    };
    let _ = victim.child.kill();
    let detected = c.wait("the dead worker to leave", Duration::from_secs(15), || {
        c.workers().len() == 1
    });
    eprintln!("killed worker detected after {detected:?}");
    let j1_done = {
        c.wait("job 1 to finish", Duration::from_secs(300), || {
            matches!(c.job(&j1)["status"].as_str(), Some("succeeded" | "failed"))
        });
        c.job(&j1)
    };
    assert_eq!(j1_done["status"], "succeeded", "{j1_done}");
    assert_eq!(j1_done["node"], n2, "resumed on the surviving worker");
    assert!(
        j1_done["summary"]["resumed_from_step"].as_u64().unwrap() >= 4,
        "{j1_done}"
    );
    c.wait("job 2 to finish", Duration::from_secs(300), || {
        c.job(&j2)["status"] == "succeeded"
    });
    // The handed-over job's adapter is served by the surviving worker.
    let (status, r) = c.post(
        "/chat",
        &json!({"prompt": "record 3", "max_tokens": 6, "temperature": 0, "adapter_path": "one"}),
    );
    assert_eq!(status, 200, "{r}");
}

#[test]
fn a_stopped_worker_is_evicted_and_rejoins_when_continued() {
    let _serial = serial();
    let c = Cluster::new();
    let _head = c.head(1);
    let w = c.worker("worker", &[]);
    c.wait("the worker", Duration::from_secs(60), || {
        c.workers().len() == 1
    });
    // One job on the head's trainer, one on the worker's.
    let a = c.submit("a", 80);
    let b = c.submit("b", 80);
    c.wait("both jobs running", Duration::from_secs(60), || {
        c.job(&a)["status"] == "running" && c.job(&b)["status"] == "running"
    });
    let (local, moved, out) = if c.job(&a)["node"] == "head" {
        (a, b, "b")
    } else {
        (b, a, "a")
    };
    c.wait(
        "a checkpoint of the worker's job",
        Duration::from_secs(120),
        || c.job(&moved)["progress"]["step"].as_u64().unwrap_or(0) >= 5,
    );
    w.signal("-STOP");
    let evicted = c.wait("eviction", Duration::from_secs(10), || {
        c.workers().is_empty()
    });
    eprintln!("stopped worker evicted after {evicted:?}");
    // Requests go to the head's own replica meanwhile.
    let (status, r) = chat(&c);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["replica"], "inference-0");
    // Cancelled to free the head's trainer (on a fast run it may have ended already: 409).
    let (status, r) = c.delete(&format!("/jobs/{local}"));
    assert!(
        status == 200 || (status == 409 && c.job(&local)["status"] == "succeeded"),
        "{status} {r}"
    );
    // The worker's job runs again on the head as attempt 2, while attempt 1 is only paused.
    c.wait("attempt 2 on the head", Duration::from_secs(120), || {
        let j = c.job(&moved);
        j["status"] == "running" && j["attempts"] == 2 && j["node"] == "head"
    });
    w.signal("-CONT");
    c.wait("the worker to rejoin", Duration::from_secs(20), || {
        c.workers().len() == 1
    });
    c.wait("the moved job to finish", Duration::from_secs(300), || {
        matches!(
            c.job(&moved)["status"].as_str(),
            Some("succeeded" | "failed")
        )
    });
    let done = c.job(&moved);
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 2, "{done}");
    // Attempt 1 stopped without writing once it was stale (fenced by the attempt number).
    let log = w.log();
    assert!(
        log.contains("superseded") || log.contains("stopping without writing"),
        "the stale attempt was not fenced; worker log:\n{log}"
    );
    let out = c.dir.path().join("adapters").join(out);
    for e in std::fs::read_dir(&out).unwrap().flatten() {
        let state = e.path().join("trainer_state.json");
        if let Ok(text) = std::fs::read_to_string(&state) {
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["attempt"], 2, "{}", state.display());
        }
    }
}

#[test]
fn a_wrong_cookie_is_refused_a_worker_may_start_first_and_a_restarted_head_heals() {
    let _serial = serial();
    let c = Cluster::new();
    // Started first, with no model of its own: it keeps redialling until the head is up, then
    // loads the head's model.
    let early = c.worker_with("early", None, &[]);
    c.wait("the early worker to retry", Duration::from_secs(30), || {
        early.log().matches("retrying").count() >= 2
    });
    let _head = c.head(0);
    c.wait("the early worker to join", Duration::from_secs(60), || {
        c.workers().len() == 1
    });

    let mut wrong = c.worker("wrong", &["cluster.cookie=\"not-the-cookie\""]);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = wrong.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "a wrong cookie must stop the worker; log:\n{}",
            wrong.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    assert!(wrong.log().contains("cluster.cookie"), "{}", wrong.log());
    assert_eq!(c.workers().len(), 1, "the refused worker never joined");
    let head_log = std::fs::read_to_string(c.dir.path().join("head.log")).unwrap();
    assert!(head_log.contains("cookie"), "the head logs the refusal too");
}

/// With `server.request_retries = 0` a stream cut by a lost worker ends with an error, as before
/// requests could move (`tests/failover.rs` tests the moves).
#[test]
fn without_retries_a_worker_killed_mid_stream_ends_the_stream_with_an_error_and_the_next_request_succeeds(
) {
    let _serial = serial();
    let mut c = Cluster::new();
    c.model = smollm2();
    assert!(
        c.model.exists(),
        "{} missing: run scripts/fetch-model.sh",
        c.model.display()
    );
    let _head = c.head_with(0, &["server.request_retries=0"]);
    let mut a = c.worker("worker-a", &[]);
    let mut b = c.worker("worker-b", &[]);
    c.wait("two workers", Duration::from_secs(120), || {
        c.workers().len() == 2
    });
    let resp = Head::agent()
        .post(format!("{}/chat", c.url()))
        .send_json(
            json!({"prompt": "Write a long story about a dragon.", "max_tokens": 400,
                          "temperature": 0, "stream": true}),
        )
        .unwrap();
    let mut reader = std::io::BufReader::new(resp.into_body().into_reader());
    // Read until the first token event, then kill the worker that serves the stream.
    let mut line = String::new();
    while !line.starts_with("event: token") {
        line.clear();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
    }
    let busy = c.get("/cluster")["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["in_flight"].as_u64() == Some(1))
        .map(|r| r["node"].as_str().unwrap().to_string())
        .expect("a replica serves the stream");
    let victim = if a.log().contains(&busy) {
        &mut a
    } else {
        &mut b
    };
    let _ = victim.child.kill();
    let rest = read_sse(reader, usize::MAX);
    let (last, data) = rest.last().expect("the stream ends with an event");
    assert_eq!(last, "error", "{rest:?}");
    let e: Value = serde_json::from_str(data).unwrap();
    assert_eq!(e["error"]["type"], "unavailable", "{e}");
    // The next request goes to the surviving worker.
    let (status, r) = chat(&c);
    assert_eq!(status, 200, "{r}");
    assert!(!r["replica"].as_str().unwrap().starts_with(&busy));
}

/// Runs `cmd` inside network namespace `ns`.
fn in_ns(ns: &str, cmd: &mut Command) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    c
}

struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn head_and_worker_in_separate_network_namespaces() {
    let _serial = serial();
    let ip = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let id = std::process::id();
    let (h, w) = (format!("tsh{id}"), format!("tsw{id}"));
    if !ip(&["netns", "add", &h]) {
        eprintln!("SKIPPED: `ip netns add` is not allowed here (needs root and iproute2)");
        return;
    }
    let _guard = Namespaces(vec![h.clone(), w.clone()]);
    let (vh, vw) = (format!("vh{id}"), format!("vw{id}"));
    for args in [
        vec!["netns", "add", w.as_str()],
        vec![
            "link",
            "add",
            vh.as_str(),
            "type",
            "veth",
            "peer",
            "name",
            vw.as_str(),
        ],
        vec!["link", "set", vh.as_str(), "netns", h.as_str()],
        vec!["link", "set", vw.as_str(), "netns", w.as_str()],
        vec![
            "-n",
            h.as_str(),
            "addr",
            "add",
            "10.213.0.1/24",
            "dev",
            vh.as_str(),
        ],
        vec![
            "-n",
            w.as_str(),
            "addr",
            "add",
            "10.213.0.2/24",
            "dev",
            vw.as_str(),
        ],
        vec!["-n", h.as_str(), "link", "set", vh.as_str(), "up"],
        vec!["-n", w.as_str(), "link", "set", vw.as_str(), "up"],
        vec!["-n", h.as_str(), "link", "set", "lo", "up"],
        vec!["-n", w.as_str(), "link", "set", "lo", "up"],
    ] {
        assert!(ip(&args), "ip {}", args.join(" "));
    }
    let c = Cluster::new();
    let d = c.dir.path();
    let log = |name: &str| std::fs::File::create(d.join(format!("{name}.log"))).unwrap();
    let head = in_ns(
        &h,
        Command::new(BIN).args([
            "--log-format",
            "pretty",
            "head",
            "--port",
            &c.http.to_string(),
            "--model",
            &c.model.display().to_string(),
            "--set",
            &format!("adapters.root=\"{}\"", d.join("adapters").display()),
            "--set",
            &format!("training.data_root=\"{}\"", d.join("data").display()),
            "--set",
            &format!("jobs.db_path=\"{}\"", d.join("jobs.sqlite").display()),
            "--set",
            "cluster.bind=\"10.213.0.1\"",
            "--set",
            "cluster.cookie=\"netns-secret\"",
            "--set",
            "cluster.allow_plaintext=true",
            "--set",
            &format!("cluster.port={}", c.cluster),
            "--set",
            "resources.cpu_inference_slots=0",
            "--set",
            "resources.cpu_training_slots=0",
        ]),
    )
    .env_remove("LD_LIBRARY_PATH")
    .stdout(Stdio::null())
    .stderr(log("head"))
    .spawn()
    .unwrap();
    let _head = Proc {
        child: head,
        log: d.join("head.log"),
    };
    let worker = in_ns(
        &w,
        Command::new(BIN)
            .args([
                "--log-format",
                "pretty",
                "worker",
                "--join",
                &format!("10.213.0.1:{}", c.cluster),
                "--model",
                &c.model.display().to_string(),
                "--set",
                "cluster.cookie=\"netns-secret\"",
            ])
            .args(c.worker_roots()),
    )
    .env_remove("LD_LIBRARY_PATH")
    .stdout(Stdio::null())
    .stderr(log("worker"))
    .spawn()
    .unwrap();
    let _worker = Proc {
        child: worker,
        log: d.join("worker.log"),
    };
    // The head's HTTP port is on its namespace's loopback: ask from inside.
    let curl = |path: &str, body: Option<&str>| -> Value {
        let mut cmd = Command::new("python3");
        cmd.arg("-c").arg(
            "import sys, urllib.request as u\n\
             d = sys.argv[2].encode() if len(sys.argv) > 2 else None\n\
             r = u.Request(sys.argv[1], data=d, headers={'content-type': 'application/json'})\n\
             print(u.urlopen(r, timeout=30).read().decode())",
        );
        cmd.arg(format!("http://127.0.0.1:{}{path}", c.http));
        if let Some(b) = body {
            cmd.arg(b);
        }
        let out = in_ns(&h, &mut cmd).output().unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    let t0 = Instant::now();
    while curl("/cluster", None)["workers"]
        .as_array()
        .map_or(0, |w| w.len())
        != 1
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the worker did not join across namespaces; worker log:\n{}",
            std::fs::read_to_string(d.join("worker.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = curl(
        "/chat",
        Some(r#"{"prompt": "hi", "max_tokens": 4, "temperature": 0}"#),
    );
    assert!(
        r["replica"].as_str().unwrap().contains("/inference-0"),
        "{r}"
    );
}

#[test]
fn a_job_needing_tags_waits_for_a_tagged_worker_and_runs_there() {
    let _serial = serial();
    let c = Cluster::new();
    // The head has no trainer; worker-a carries zone=a (through --set), worker-b zone=b (--tag).
    let _head = c.head(0);
    let _a = c.worker("worker-a", &["resources.tags.zone=\"a\""]);
    c.wait("worker-a", Duration::from_secs(60), || {
        c.workers().len() == 1
    });
    let cluster = c.get("/cluster");
    assert_eq!(
        cluster["workers"][0]["info"]["tags"]["zone"], "a",
        "{cluster}"
    );
    // Each node's resources are shown too: the head has no slot, the worker the defaults.
    assert_eq!(
        cluster["nodes"][0]["resources"]["cpu_training_slots"], 0,
        "{cluster}"
    );
    let worker_resources = &cluster["workers"][0]["info"]["resources"];
    assert_eq!(worker_resources["cpu_inference_slots"], 1, "{cluster}");
    assert_eq!(worker_resources["inference_gpu_fraction"], 0.6, "{cluster}");

    let mut h = support::quick_hyperparameters(1);
    h["save_every_steps"] = json!(4);
    let id = c.submit_body(&json!({"dataset_path": "d.jsonl", "output_path": "zoned",
        "hyperparameters": h, "placement": {"tags": {"zone": "b"}}}));
    // No node carries zone=b: it waits, saying why, although worker-a's trainer is idle.
    c.wait("the pending reason", Duration::from_secs(10), || {
        c.job(&id)["pending_reason"]
            .as_str()
            .is_some_and(|r| r.contains("zone=b"))
    });
    std::thread::sleep(Duration::from_secs(2));
    let job = c.job(&id);
    assert_eq!(job["status"], "queued", "{job}");
    assert_eq!(job["tags"]["zone"], "b", "{job}");
    // Bad tags are refused naming the field.
    let (status, r) = c.post(
        "/fine-tune",
        &json!({"dataset_path": "d.jsonl", "output_path": "bad", "placement": {"tags": {"zone": "a b"}}}),
    );
    assert_eq!(status, 422, "{r}");
    assert_eq!(r["error"]["field"], "placement.tags", "{r}");

    // A worker with zone=b joins: the job runs there and succeeds.
    let mut args: Vec<String> = vec![
        "--log-format".into(),
        "pretty".into(),
        "worker".into(),
        "--join".into(),
        format!("127.0.0.1:{}", c.cluster),
        "--model".into(),
        c.model.display().to_string(),
        "--tag".into(),
        "zone=b".into(),
    ];
    args.extend(["--set".into(), "batching.max_kv_tokens=8192".into()]);
    args.extend(c.worker_roots());
    let b = c.spawn("worker-b", &args);
    c.wait("the job to finish", Duration::from_secs(300), || {
        matches!(c.job(&id)["status"].as_str(), Some("succeeded" | "failed"))
    });
    let job = c.job(&id);
    assert_eq!(job["status"], "succeeded", "{job}");
    // The run's lines on the worker (the training loop's too) carry the job's id.
    let log = strip_ansi(&b.log());
    let spanned = log
        .lines()
        .filter(|l| l.contains(&format!("job_id={id}")))
        .count();
    assert!(
        spanned >= 2,
        "worker-b's lines of the job lack its id:\n{log}"
    );
    assert!(job["pending_reason"].is_null(), "{job}");
    let cluster = c.get("/cluster");
    let b = cluster["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["info"]["tags"]["zone"] == "b")
        .unwrap_or_else(|| panic!("{cluster}"));
    assert_eq!(job["node"], b["info"]["node"], "{job}");
}

#[test]
fn a_worker_that_leaves_checkpoints_its_job_which_resumes_without_counting_an_attempt() {
    let _serial = serial();
    let c = Cluster::new();
    let _head = c.head(0);
    let w = c.worker("leaving", &[]);
    c.wait("the worker", Duration::from_secs(60), || {
        c.workers().len() == 1
    });
    let id = c.submit("left", 80);
    c.wait(
        "a few steps on the worker",
        Duration::from_secs(120),
        || {
            let j = c.job(&id);
            j["status"] == "running" && j["progress"]["step"].as_u64().unwrap_or(0) >= 3
        },
    );
    // Ctrl-C: the job stops at a checkpoint and is queued again as stopped, not as lost.
    w.signal("-INT");
    c.wait("the worker to leave", Duration::from_secs(30), || {
        c.workers().is_empty()
    });
    c.wait("the job back in the queue", Duration::from_secs(10), || {
        c.job(&id)["status"] == "queued"
    });
    let queued = c.job(&id);
    assert_eq!(
        queued["interruptions"], 0,
        "a clean leave is no lost attempt: {queued}"
    );
    let head_log = std::fs::read_to_string(c.dir.path().join("head.log")).unwrap();
    assert!(head_log.contains("left the cluster"), "{head_log}");
    assert!(
        w.log().contains("stopping running jobs at a checkpoint"),
        "{}",
        w.log()
    );
    // Another worker resumes it from that checkpoint.
    let _next = c.worker("next", &[]);
    c.wait("the job to finish", Duration::from_secs(300), || {
        matches!(c.job(&id)["status"].as_str(), Some("succeeded" | "failed"))
    });
    let done = c.job(&id);
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["interruptions"], 0, "{done}");
    assert!(
        done["summary"]["resumed_from_step"].as_u64().unwrap_or(0) >= 1,
        "{done}"
    );
}

#[test]
fn a_deployment_needing_tags_waits_for_a_tagged_worker_serves_there_and_drains_on_delete() {
    let _serial = serial();
    let c = Cluster::new();
    let models = c.dir.path().join("models");
    support::tiny::write_model(&models.join("tiny2"), 11);
    let _head = c.head_with(1, &[&format!("model.models_root=\"{}\"", models.display())]);
    c.wait("the head", Duration::from_secs(60), || {
        c.get("/models")["deployments"][0]["state"] == "ready"
    });
    let (status, d) = c.post(
        "/models",
        &json!({"name": "pool", "path": "tiny2", "placement": {"tags": {"pool": "b"}}}),
    );
    assert_eq!(status, 202, "{d}");
    assert_eq!(d["state"], "pending", "{d}");
    assert!(
        d["reason"]
            .as_str()
            .unwrap()
            .contains("no node carries the tags pool=b"),
        "{d}"
    );

    // A worker with pool=b and a slot to spare joins: the deployment goes there.
    let _w = c.worker(
        "worker-b",
        &[
            "resources.tags.pool=\"b\"",
            "resources.cpu_inference_slots=2",
            "model.replicas=1",
        ],
    );
    c.wait(
        "the deployment on the worker",
        Duration::from_secs(90),
        || c.get("/models/pool")["state"] == "ready",
    );
    let node = c.workers()[0].clone();
    let d = c.get("/models/pool");
    assert_eq!(d["replicas"], json!([format!("{node}/inference-1")]), "{d}");
    let (status, r) = c.post(
        "/chat",
        &json!({"model": "pool", "prompt": "hello", "max_tokens": 6, "temperature": 0}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["replica"], format!("{node}/inference-1"), "{r}");
    assert_eq!(r["model"], "pool");
    // The worker's own replica still serves the default deployment.
    let cluster = c.get("/cluster");
    let worker_default = cluster["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == format!("{node}/inference-0"))
        .unwrap_or_else(|| panic!("{cluster}"));
    assert_eq!(worker_default["deployment"], "model", "{cluster}");

    // Deleted: the worker drains and stops the replica; its slot is free again.
    let (status, d) = c.delete("/models/pool");
    assert_eq!(status, 202, "{d}");
    c.wait(
        "the worker's replica to stop",
        Duration::from_secs(60),
        || {
            let cluster = c.get("/cluster");
            c.get("/models/pool")["name"].is_null()
                && !cluster["replicas"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r["name"] == format!("{node}/inference-1"))
                && cluster["workers"][0]["info"]["replicas"]
                    .as_array()
                    .is_some_and(|rs| rs.len() == 1)
        },
    );
    let (status, r) = c.post(
        "/chat",
        &json!({"model": "pool", "prompt": "hello", "max_tokens": 6}),
    );
    assert_eq!(status, 404, "{r}");
}

#[test]
fn a_worker_refuses_paths_outside_its_own_roots() {
    let _serial = serial();
    let c = Cluster::new();
    let d = c.dir.path();
    // No trainer or replica on the head: the work goes to the worker, whose data and adapters
    // roots are elsewhere (storage not shared at the same paths).
    let _head = c.head(0);
    let other = d.join("worker-roots");
    let _w = c.worker(
        "worker",
        &[
            &format!("training.data_root=\"{}\"", other.join("data").display()),
            &format!("adapters.root=\"{}\"", other.join("adapters").display()),
        ],
    );
    c.wait("the worker", Duration::from_secs(60), || {
        c.workers().len() == 1
    });
    let id = c.submit("job", 1);
    c.wait("the job to end", Duration::from_secs(120), || {
        matches!(c.job(&id)["status"].as_str(), Some("succeeded" | "failed"))
    });
    let job = c.job(&id);
    assert_eq!(job["status"], "failed", "{job}");
    let error = job["error"].as_str().unwrap();
    assert!(
        error.contains("outside this worker's training.data_root"),
        "{error}"
    );
    assert!(!other.join("adapters/job").exists());
    // A request naming an adapter under the head's root is refused by the worker, naming it.
    std::fs::create_dir_all(d.join("adapters/one")).unwrap();
    support::tiny::write_adapter(&d.join("adapters/one"), 4, 8.0, &["q_proj"], 1);
    let (status, r) = c.post(
        "/chat",
        &json!({"prompt": "hi", "max_tokens": 2, "adapter_path": "one"}),
    );
    assert!((400..500).contains(&status), "{status} {r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("adapters.root"),
        "{r}"
    );
}

#[test]
fn a_worker_refuses_a_replica_beyond_its_memory_and_the_head_says_why_without_a_loop() {
    let _serial = serial();
    let c = Cluster::new();
    let models = c.dir.path().join("models");
    let tiny2 = support::tiny::write_model(&models.join("tiny2"), 11);
    let bytes = tessera_engine::footprint::weight_bytes(&tiny2, tch::Kind::Float).unwrap();
    // The worker's own replica fits within its limit; a second copy does not.
    let limit_mb = 1.5 * bytes as f64 / (1u64 << 20) as f64;
    let _head = c.head_with(0, &[&format!("model.models_root=\"{}\"", models.display())]);
    let _w = c.worker(
        "worker",
        &[
            "resources.cpu_inference_slots=2",
            "model.replicas=1",
            &format!("resources.host_memory_limit_mb={limit_mb}"),
        ],
    );
    c.wait("the worker", Duration::from_secs(60), || {
        c.workers().len() == 1
    });
    let (status, d) = c.post("/models", &json!({"name": "more", "path": "tiny2"}));
    assert_eq!(status, 202, "{d}");
    c.wait("the refusal reported", Duration::from_secs(60), || {
        c.get("/models/more")["reason"]
            .as_str()
            .is_some_and(|r| r.contains("refused"))
    });
    let d = c.get("/models/more");
    assert_eq!(d["state"], "pending", "{d}");
    let reason = d["reason"].as_str().unwrap();
    assert!(
        reason.contains("resources.host_memory_limit_mb") && reason.contains("MiB"),
        "{d}"
    );
    // Not asked again and again: one refusal within the back-off.
    std::thread::sleep(Duration::from_secs(3));
    let log = std::fs::read_to_string(c.dir.path().join("head.log")).unwrap();
    assert_eq!(
        log.matches("a worker refused a replica;").count(),
        1,
        "{log}"
    );
    // The worker serves on.
    let (status, r) = c.post("/chat", &json!({"prompt": "hi", "max_tokens": 2}));
    assert_eq!(status, 200, "{r}");
}
