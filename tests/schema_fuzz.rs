//! Schema-driven fuzzing: schemathesis (tests/schema_fuzz.py) reads `/openapi.json` of a real head
//! on loopback serving the tiny random model and sends a few hundred generated requests per route,
//! valid and invalid. No answer may be a 5xx, every error must be our JSON error with a `type` and
//! a `message`, and the head must still serve afterwards.

mod support;

use std::time::Instant;

use serde_json::json;

/// Requests per route and generation mode (valid, then schema-violating).
const EXAMPLES_PER_MODE: usize = 120;

#[test]
fn generated_requests_get_no_5xx_and_well_formed_errors() {
    let python = std::env::var("TESSERA_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_schemathesis = std::process::Command::new(&python)
        .args(["-c", "import schemathesis"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_schemathesis {
        assert!(
            std::env::var_os("TESSERA_REQUIRE_SCHEMATHESIS").is_none(),
            "schemathesis is required (TESSERA_REQUIRE_SCHEMATHESIS) but {python} cannot import it"
        );
        eprintln!("skipping the schema fuzz run: {python} has no `schemathesis` package");
        return;
    }
    // A small KV budget keeps generations short: a fuzzed max_tokens beyond it is a 422.
    let head = support::start(&[
        "batching.max_kv_tokens=96",
        "server.request_timeout_secs=120",
    ]);
    // Something to find: an adapter and a dataset under the roots.
    support::tiny::write_adapter(&head.adapters.join("a1"), 4, 8.0, &["q_proj"], 1);
    head.write_dataset("d.jsonl", 4);
    let t0 = Instant::now();
    let out = std::process::Command::new(&python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/schema_fuzz.py"))
        .args([&head.url, &EXAMPLES_PER_MODE.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "schema fuzzing failed after {:.0} s:\n{stdout}\n{}",
        t0.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stderr)
    );
    // It covered every route of the document (the document itself it read to start).
    let (_, doc) = head.get("/openapi.json");
    for path in doc["paths"].as_object().unwrap().keys() {
        if path == "/openapi.json" {
            continue;
        }
        assert!(
            stdout.contains(&format!(" {path}\n")),
            "{path} was not fuzzed:\n{stdout}"
        );
    }
    // And the head still serves.
    assert_eq!(head.get("/ready").0, 200);
    let (status, r) = head.post(
        "/chat",
        &json!({"prompt": "still here", "max_tokens": 2, "temperature": 0}),
    );
    assert_eq!(status, 200, "{r}");
}
