//! Structured outputs and the sampling fields over HTTP (issue 25), against a real head serving
//! SmolLM2: `response_format` on `/chat` and the OpenAI routes, vLLM's `guided_*` and
//! `structured_outputs`, errors that name the field the client used (400 when a grammar does not
//! compile, 422 for a wrong shape), a pathological schema that leaves the replica serving, `n`,
//! `logit_bias`, `min_tokens` and the penalties; then `tests/structured_client.py` drives the
//! official `openai` client and validates every answer with the `jsonschema` package.

mod support;

use serde_json::{json, Value};

fn chat(content: &str) -> Value {
    json!([{"role": "user", "content": content}])
}

#[test]
fn structured_outputs_and_sampling_fields_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let head = support::start_in(dir, support::smollm2(), &[]);
    let (_, models) = head.get("/v1/models");
    let base = models["data"][0]["id"].as_str().unwrap().to_string();

    // `/chat` with OpenAI's response_format.
    let schema = json!({"type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["colour", "count"], "additionalProperties": false});
    let (status, r) = head.post(
        "/chat",
        &json!({"prompt": "Pick a colour and a count.", "max_tokens": 40, "temperature": 1.0, "seed": 5,
                "response_format": {"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}}}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["finish_reason"], "stop", "{r}");
    let v: Value = serde_json::from_str(r["text"].as_str().unwrap()).unwrap();
    assert!(
        ["red", "green", "blue"].contains(&v["colour"].as_str().unwrap()),
        "{v}"
    );
    assert!((1..=9).contains(&v["count"].as_i64().unwrap()), "{v}");

    // A cut by max_tokens is `length`, not a `stop` on broken JSON.
    let (status, r) = head.post(
        "/v1/chat/completions",
        &json!({"model": base, "messages": chat("JSON please"), "max_tokens": 3, "temperature": 0,
                "response_format": {"type": "json_object"}}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "length", "{r}");

    // Grammars that do not compile: 400 naming the field the client used.
    for (body, field) in [
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}),
            "response_format",
        ),
        (json!({"guided_regex": "(unclosed"}), "guided_regex"),
        (
            json!({"structured_outputs": {"grammar": "start: nowhere"}}),
            "structured_outputs",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
                   "tool_choice": "required"}),
            "tools",
        ),
    ] {
        let mut body = body;
        body["model"] = json!(base);
        body["messages"] = chat("hi");
        body["max_tokens"] = json!(8);
        let (status, e) = head.post("/v1/chat/completions", &body);
        assert_eq!(status, 400, "{body}: {e}");
        assert_eq!(e["error"]["field"], field, "{e}");
    }
    // Wrong shapes: 422 naming the field.
    for (body, field) in [
        (
            json!({"response_format": {"type": "json_schema"}}),
            "response_format.json_schema.schema",
        ),
        (
            json!({"response_format": {"type": "yaml"}}),
            "response_format.type",
        ),
        (json!({"guided_choice": []}), "guided_choice"),
        (json!({"presence_penalty": 3.0}), "presence_penalty"),
        (json!({"logit_bias": {"abc": 1}}), "logit_bias"),
        (json!({"logit_bias": {"5": 500}}), "logit_bias"),
        (json!({"n": 0}), "n"),
        (json!({"n": 17}), "n"),
        (json!({"min_tokens": 50, "max_tokens": 10}), "min_tokens"),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (
            json!({"tools": [{"type": "retrieval", "function": {"name": "a"}}]}),
            "tools[0].type",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "bad name"}}]}),
            "tools[0].function.name",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "a"}}],
                   "tool_choice": {"type": "function", "function": {"name": "b"}}}),
            "tool_choice",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "a"}}],
                   "tool_choice": "required", "response_format": {"type": "json_object"}}),
            "tool_choice",
        ),
    ] {
        let mut body = body;
        body["model"] = json!(base);
        body["messages"] = chat("hi");
        let (status, e) = head.post("/v1/chat/completions", &body);
        assert_eq!(status, 422, "{body}: {e}");
        assert_eq!(e["error"]["field"], field, "{e}");
    }
    // A pathological schema is refused or bounded in time, and the replica keeps serving.
    let deep = (0..60).fold(json!({"type": "integer"}), |inner, _| {
        json!({"type": "object", "properties": {"a": inner, "b": {"type": "array", "items": {"type": "string"}}}, "required": ["a"]})
    });
    let started = std::time::Instant::now();
    let (status, r) = head.post(
        "/v1/chat/completions",
        &json!({"model": base, "messages": chat("hi"), "max_tokens": 16, "temperature": 0,
                "response_format": {"type": "json_schema", "json_schema": {"name": "deep", "schema": deep}}}),
    );
    assert!(status == 200 || status == 400, "{status}: {r}");
    assert!(started.elapsed().as_secs() < 30, "{:?}", started.elapsed());
    let (status, r) = head.post(
        "/v1/completions",
        &json!({"model": base, "prompt": "The sky is", "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(status, 200, "the replica serves on: {r}");
    let plain_first = r["choices"][0]["text"].as_str().unwrap().to_string();

    // n: three choices, each its own sample; usage counts them all.
    let (status, r) = head.post(
        "/v1/completions",
        &json!({"model": base, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 1.0, "seed": 1, "n": 3}),
    );
    assert_eq!(status, 200, "{r}");
    let choices = r["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3, "{r}");
    let indices: Vec<u64> = choices
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [0, 1, 2]);
    assert_eq!(r["usage"]["completion_tokens"], 18, "{r}");
    // The same seeds give the same three choices (seed + i each).
    let (_, again) = head.post(
        "/v1/completions",
        &json!({"model": base, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 1.0, "seed": 1, "n": 3}),
    );
    assert_eq!(again["choices"], r["choices"]);
    // Streamed with n = 2: both indices end, one [DONE].
    let events = head.sse(
        "/v1/chat/completions",
        &json!({"model": base, "messages": chat("hi"), "max_tokens": 4, "temperature": 1.0, "seed": 2, "n": 2, "stream": true}),
    );
    let mut finished = Vec::new();
    for (_, data) in &events {
        if data == "[DONE]" {
            continue;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        for c in chunk["choices"].as_array().unwrap() {
            if !c["finish_reason"].is_null() {
                finished.push(c["index"].as_u64().unwrap());
            }
        }
    }
    finished.sort_unstable();
    assert_eq!(finished, [0, 1], "{events:?}");
    assert_eq!(events.iter().filter(|(_, d)| d == "[DONE]").count(), 1);

    // logit_bias: +100 on a token makes it the greedy first token.
    let (status, t) = head.post(
        "/v1/completions",
        &json!({"model": base, "prompt": "The sky is", "max_tokens": 1, "temperature": 0, "logprobs": 0,
                "logit_bias": {"28": 100}}),
    );
    assert_eq!(status, 200, "{t}");
    let biased = t["choices"][0]["text"].as_str().unwrap();
    assert_ne!(
        biased,
        &plain_first[..biased.len().min(plain_first.len())],
        "{t}"
    );
    // min_tokens keeps a greedy answer going past its natural end; the penalties change it.
    let short = |extra: Value| {
        let mut body = json!({"model": base, "messages": chat("Say hi."), "max_tokens": 120, "temperature": 0});
        // `extra` may replace the messages and max_tokens too.
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, r) = head.post("/v1/chat/completions", &body);
        assert_eq!(status, 200, "{r}");
        r
    };
    let natural = short(json!({}));
    let natural_tokens = natural["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(natural["choices"][0]["finish_reason"], "stop", "{natural}");
    let longer = short(json!({"min_tokens": natural_tokens + 10}));
    assert!(
        longer["usage"]["completion_tokens"].as_u64().unwrap() >= natural_tokens + 10,
        "{longer}"
    );
    // A counting answer repeats its separators: the penalties change it.
    let counting =
        json!({"messages": chat("Count from 1 to 20, separated by commas."), "max_tokens": 40});
    let plain = short(counting.clone());
    let mut with_penalties = counting;
    with_penalties["frequency_penalty"] = json!(2.0);
    with_penalties["presence_penalty"] = json!(2.0);
    let penalised = short(with_penalties);
    assert_ne!(
        penalised["choices"][0]["message"]["content"], plain["choices"][0]["message"]["content"],
        "the penalties change a greedy answer"
    );

    // The official client, with jsonschema validating every answer.
    let adapter = support::reference::reference_adapter();
    let target = head.adapters.join("ref");
    std::fs::create_dir_all(&target).unwrap();
    for entry in std::fs::read_dir(&adapter).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), target.join(entry.file_name())).unwrap();
    }
    let Some(python) = support::python_with("openai, jsonschema") else {
        return;
    };
    let started = std::time::Instant::now();
    let out = std::process::Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/structured_client.py"
        ))
        .args([&head.url, &base, "ref"])
        .output()
        .unwrap();
    eprintln!(
        "structured client ({:.0} s):\n{}",
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        out.status.success(),
        "structured client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
