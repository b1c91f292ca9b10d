//! Requests survive the loss of the replica serving them (issue 29): a head and two workers as
//! real processes on loopback; the workers' engine steps take a few milliseconds longer (a test
//! hook) so that a SIGKILL lands in the middle of every stream. The streams a killed worker was
//! serving go on on the other worker (`server.request_retries`), and each client reads the very
//! answer a run without the kill gives (greedy, float32): same text, end and usage. With no
//! replica left the client hears why at once; the official `openai` client sees the same on the
//! OpenAI streaming route; a local replica whose engine thread dies hands its streams over too.

mod support;

use std::io::BufRead;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::cluster::{serial, Cluster, Proc};
use support::{read_sse, tiny, Head};

const STREAMS: usize = 8;

/// Each engine step takes this much longer (a test hook), so a stream of 120 tokens lasts over a
/// second.
const DELAY_MS: &str = "10";

struct Running {
    c: Cluster,
    _head: Proc,
    workers: Vec<Proc>,
}

/// A head with no replica of its own and two float32 workers (step delay hook on), with an
/// adapter `one` for the tiny model.
fn running() -> Running {
    let c = Cluster::new();
    tiny::write_adapter(
        &c.dir.path().join("adapters/one"),
        4,
        8.0,
        &["q_proj", "v_proj"],
        3,
    );
    let head = c.head_with(0, &["model.dtype=\"f32\""]);
    let env = [
        ("TESSERA_TEST_HOOKS", "1"),
        ("TESSERA_TEST_STEP_DELAY_MS", DELAY_MS),
    ];
    let workers = ["worker-a", "worker-b"]
        .map(|name| c.worker_env(name, &["model.dtype=\"f32\""], &env))
        .into();
    c.wait("two serving replicas", Duration::from_secs(120), || {
        c.get("/cluster")["replicas"]
            .as_array()
            .is_some_and(|rs| rs.iter().filter(|r| r["state"] == "running").count() == 2)
    });
    Running {
        c,
        _head: head,
        workers,
    }
}

/// The `i`th client's request: greedy, 120 tokens (all of them for even `i`: `min_tokens`),
/// every third with the adapter.
fn body(i: usize) -> Value {
    let mut b =
        json!({"prompt": format!("story number {i}:"), "max_tokens": 120, "temperature": 0});
    if i.is_multiple_of(2) {
        b["min_tokens"] = json!(120);
    }
    if i.is_multiple_of(3) {
        b["adapter_path"] = json!("one");
    }
    b
}

/// What the first `n` requests answer, without streaming (asked together).
fn answers(url: &str, n: usize) -> Vec<Value> {
    std::thread::scope(|s| {
        let asks: Vec<_> = (0..n)
            .map(|i| {
                s.spawn(move || {
                    let mut r = Head::agent()
                        .post(format!("{url}/chat"))
                        .send_json(body(i))
                        .unwrap();
                    let answer: Value = r.body_mut().read_json().unwrap();
                    assert_eq!(r.status().as_u16(), 200, "{answer}");
                    assert!(answer["usage"]["completion_tokens"].as_u64() > Some(0));
                    answer
                })
            })
            .collect();
        asks.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Opens a `/chat` stream of request `i` and reads it up to its first token event.
fn open_stream(url: &str, i: usize) -> impl BufRead {
    let mut b = body(i);
    b["stream"] = json!(true);
    let resp = Head::agent()
        .post(format!("{url}/chat"))
        .send_json(b)
        .unwrap();
    let mut reader = std::io::BufReader::new(resp.into_body().into_reader());
    let mut line = String::new();
    while !line.starts_with("event: token") {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the stream ended");
    }
    reader
}

/// Streams the first `n` requests at once; when every client has its first token, `lose` runs
/// (it loses a replica and returns how many streams that replica held); then each client reads
/// its stream to the end. The streams' events, and what `lose` returned.
fn streams_across(
    url: &str,
    n: usize,
    lose: impl FnOnce() -> u64,
) -> (Vec<Vec<(String, String)>>, u64) {
    let (started, lost) = (Barrier::new(n + 1), Barrier::new(n + 1));
    std::thread::scope(|s| {
        let clients: Vec<_> = (0..n)
            .map(|i| {
                let (started, lost) = (&started, &lost);
                s.spawn(move || {
                    let reader = open_stream(url, i);
                    started.wait();
                    lost.wait();
                    read_sse(reader, usize::MAX)
                })
            })
            .collect();
        started.wait();
        let held = lose();
        lost.wait();
        let events = clients.into_iter().map(|h| h.join().unwrap()).collect();
        (events, held)
    })
}

/// Each stream ended as its uncut answer: `done` with the same text, end and usage, and the text
/// its token events carried is that answer too.
fn assert_whole(streamed: &[Vec<(String, String)>], answers: &[Value]) {
    for (i, (events, want)) in streamed.iter().zip(answers).enumerate() {
        let (last, data) = events.last().expect("events");
        assert_eq!(last, "done", "stream {i}: {events:?}");
        let done: Value = serde_json::from_str(data).unwrap();
        for field in ["text", "finish_reason", "usage"] {
            assert_eq!(done[field], want[field], "stream {i}: {field}");
        }
        // (The first token's data comes without its name: `open_stream` read that line.)
        let tokens = support::sse_text(events.iter().filter(|(e, _)| e == "token" || e.is_empty()));
        // (The end's text may hold the bytes of a last partial character.)
        let whole = want["text"].as_str().unwrap();
        assert!(
            whole.starts_with(&tokens) && whole[tokens.len()..].chars().count() <= 3,
            "stream {i}: token texts {tokens:?} of {whole:?}"
        );
    }
}

/// Each replica's node and requests in flight.
fn in_flight(c: &Cluster) -> Vec<(String, u64)> {
    c.get("/cluster")["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["node"].as_str().unwrap().to_string(),
                r["in_flight"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Kills the worker serving the most requests; how many it held.
fn kill_the_busiest(c: &Cluster, workers: &mut [Proc]) -> u64 {
    let load = in_flight(c);
    let (node, n) = load.iter().max_by_key(|(_, n)| *n).unwrap().clone();
    let _ = workers
        .iter_mut()
        .find(|w| w.log().contains(&node))
        .expect("a worker process logs its node name")
        .child
        .kill();
    n
}

/// `tessera_request_failovers_total` at `url`, summed over deployments.
fn failovers(url: &str) -> u64 {
    let text = Head::agent()
        .get(format!("{url}/metrics"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("tessera_request_failovers_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn streams_cut_by_a_killed_worker_end_as_they_would_have_on_another() {
    let _serial = serial();
    // (`_head` bound: a field left to `..` would be dropped, and the head killed, at once.)
    let Running {
        c,
        _head,
        mut workers,
    } = running();
    let url = c.url();
    let want = answers(&url, STREAMS);
    let (streamed, held) = streams_across(&url, STREAMS, || kill_the_busiest(&c, &mut workers));
    assert!(held > 0);
    assert_whole(&streamed, &want);
    // One move per stream the killed worker held, counted and logged.
    assert_eq!(failovers(&url), held);
    let log = std::fs::read_to_string(c.dir.path().join("head.log")).unwrap();
    assert!(log.contains("request moved to another replica"));

    // No replica left: a stream of the last worker, killed, ends at once with an error that says
    // what was lost.
    c.wait("one replica", Duration::from_secs(30), || {
        in_flight(&c).len() == 1
    });
    let reader = open_stream(&url, 1);
    kill_the_busiest(&c, &mut workers);
    let t0 = Instant::now();
    let events = read_sse(reader, usize::MAX);
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let (last, data) = events.last().unwrap();
    assert_eq!(last, "error", "{events:?}");
    let e: Value = serde_json::from_str(data).unwrap();
    assert_eq!(e["error"]["type"], "unavailable", "{e}");
    let message = e["error"]["message"].as_str().unwrap();
    assert!(message.contains("was lost while serving"), "{message}");
}

/// The official `openai` client on `/v1/chat/completions` streams across a killed worker
/// (`tests/failover_client.py` streams, says when each stream has begun, and waits for the kill).
#[test]
fn the_openai_client_streams_across_a_killed_worker() {
    let Some(python) = support::python_with("openai") else {
        return;
    };
    let _serial = serial();
    let Running {
        c,
        _head,
        mut workers,
    } = running();
    let model = c.get("/v1/models")["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut client = std::process::Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/failover_client.py"
        ))
        .args([&c.url(), &model, &STREAMS.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(client.stdout.take().unwrap());
    let mut line = String::new();
    while line.trim() != "streaming" {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the client ended before streaming"
        );
    }
    let held = kill_the_busiest(&c, &mut workers);
    assert!(held > 0);
    {
        use std::io::Write;
        let mut stdin = client.stdin.take().unwrap();
        writeln!(stdin, "killed").unwrap();
    }
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let output = client.wait_with_output().unwrap();
    assert!(
        output.status.success() && rest.contains("failover client: ok"),
        "the client failed:\n{rest}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(failovers(&c.url()), held);
}

/// A local replica whose engine thread dies (a test hook; its supervisor restarts it): the
/// streams it served go on on the head's other replica.
#[test]
fn streams_of_a_local_replica_whose_engine_died_go_on_on_another() {
    std::env::set_var("TESSERA_TEST_HOOKS", "1");
    std::env::set_var("TESSERA_TEST_STEP_DELAY_MS", DELAY_MS);
    let head = support::start(&["resources.cpu_inference_slots=2", "model.dtype=\"f32\""]);
    tiny::write_adapter(&head.adapters.join("one"), 4, 8.0, &["q_proj", "v_proj"], 3);
    let n = 4;
    let want = answers(&head.url, n);
    let (streamed, held) = streams_across(&head.url, n, || {
        let (_, cluster) = head.get("/cluster");
        let busiest = cluster["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .max_by_key(|r| r["in_flight"].as_u64())
            .unwrap()
            .clone();
        let name = busiest["name"].as_str().unwrap();
        let (code, _) = head.post(&format!("/_test/crash/{name}"), &json!({"engine": true}));
        assert_eq!(code, 202);
        busiest["in_flight"].as_u64().unwrap()
    });
    assert!(held > 0);
    assert_whole(&streamed, &want);
    assert_eq!(failovers(&head.url), held);
    // The replica was restarted and serves again.
    head.wait_until("the restart", Duration::from_secs(30), |h| {
        let (_, health) = h.get("/health");
        health["actors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["restarts"].as_u64() == Some(1) && a["state"] == "running")
    });
}
