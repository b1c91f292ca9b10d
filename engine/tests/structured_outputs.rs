//! Structured outputs on SmolLM2: outputs under a JSON schema, JSON object, regex, choice or Lark
//! grammar always match it, sampled at temperature 1.0 as well as greedy, in a batch that mixes
//! constrained and free rows and adapters; a cut by `max_tokens` is `length`; bad grammars are
//! refused naming `response_format` and the engine keeps serving; `logit_bias` and `min_tokens`.

mod common;

use std::sync::OnceLock;

use serde_json::{json, Value};
use tch::{Device, Kind};
use tessera_engine::constraint::Constraint;
use tessera_engine::engine::{Completion, SubmitError};
use tessera_engine::{ChatMessage, Engine, EngineConfig, FinishReason, GenerateRequest};
use tessera_engine::{Generation, SamplingParams};

fn engine() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| {
        let loaded =
            tessera_engine::load(&common::smollm2_path(), &[Device::Cpu], Some(Kind::Float))
                .expect("load SmolLM2");
        Engine::start(loaded.model, loaded.tokenizer, EngineConfig::default())
    })
}

fn chat_prompt(user: &str) -> Vec<u32> {
    let tokenizer = engine().tokenizer();
    let text = tokenizer
        .apply_chat_template(&[ChatMessage::new("user", user)], true)
        .unwrap();
    tokenizer.encode(&text, false).unwrap()
}

fn submit(prompt: &[u32], params: SamplingParams) -> Generation {
    engine()
        .submit(GenerateRequest {
            resume: Vec::new(),
            prompt: prompt.to_vec(),
            params,
            adapter: None,
        })
        .expect("submit")
}

fn sampled(constraint: Constraint, seed: u64, max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        temperature: 1.0,
        seed: Some(seed),
        constraint: Some(constraint),
        ..SamplingParams::default()
    }
}

/// Waits for every generation (all were submitted first, so they share batches).
fn wait_all(generations: Vec<Generation>) -> Vec<Completion> {
    generations
        .into_iter()
        .map(|g| g.wait().expect("generation"))
        .collect()
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                     "minItems": 1, "maxItems": 3},
            "address": {"type": "object",
                        "properties": {"city": {"type": "string", "maxLength": 16},
                                       "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"], "additionalProperties": false}
        },
        "required": ["name", "age", "tags", "address"],
        "additionalProperties": false
    })
}

/// What `person_schema` demands, checked by hand.
fn check_person(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    let o = v.as_object().expect("an object");
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["address", "age", "name", "tags"], "{text}");
    let name = o["name"].as_str().expect("name is a string");
    assert!((1..=12).contains(&name.chars().count()), "{text}");
    let age = o["age"].as_i64().expect("age is an integer");
    assert!((0..=120).contains(&age), "{text}");
    let tags = o["tags"].as_array().expect("tags is an array");
    assert!((1..=3).contains(&tags.len()), "{text}");
    for t in tags {
        assert!(
            ["red", "green", "blue"].contains(&t.as_str().unwrap()),
            "{text}"
        );
    }
    let address = o["address"].as_object().expect("address is an object");
    assert_eq!(address.len(), 2, "{text}");
    assert!(
        address["city"].as_str().unwrap().chars().count() <= 16,
        "{text}"
    );
    let zip = address["zip"].as_str().unwrap();
    assert!(
        zip.len() == 5 && zip.bytes().all(|b| b.is_ascii_digit()),
        "{text}"
    );
}

#[test]
fn sampled_json_follows_the_schema_in_a_batch_with_free_rows() {
    let prompt = chat_prompt("Describe a person as JSON with name, age, tags and address.");
    let schema = Constraint::JsonSchema {
        schema: person_schema(),
    };
    let mut generations = Vec::new();
    let mut free = Vec::new();
    for seed in 0..12u64 {
        generations.push(submit(&prompt, sampled(schema.clone(), seed, 160)));
        free.push(false);
        if seed % 3 == 0 {
            free.push(true);
            // Free rows in the same batch.
            generations.push(submit(
                &prompt,
                SamplingParams {
                    max_tokens: 24,
                    temperature: 1.0,
                    seed: Some(100 + seed),
                    ..SamplingParams::default()
                },
            ));
        }
    }
    let done = wait_all(generations);
    let mut constrained = 0;
    for (c, free) in done.iter().zip(free) {
        if free {
            assert!(c.completion_tokens > 0);
            continue;
        }
        constrained += 1;
        assert_eq!(c.finish_reason, FinishReason::Stop, "{:?}", c.text);
        check_person(&c.text);
    }
    assert_eq!(constrained, 12);
    let stats = engine().stats();
    assert!(stats.time.masks > 0, "masks were computed: {stats:?}");
    eprintln!(
        "mask time per mask: {:.1} µs over {} masks",
        stats.time.mask_ns as f64 / stats.time.masks as f64 / 1e3,
        stats.time.masks
    );
}

#[test]
fn greedy_json_object_regex_choice_and_lark() {
    let prompt = chat_prompt("Give me a JSON object describing the weather.");
    let object = submit(
        &prompt,
        SamplingParams {
            constraint: Some(Constraint::JsonObject),
            ..SamplingParams::greedy(96)
        },
    );
    let regex = Constraint::Regex {
        pattern: r"[0-9]{3}-[a-z]{2}".into(),
    };
    let choice = Constraint::Choice {
        choices: vec!["red".into(), "green (light)".into(), "blue".into()],
    };
    let lark = Constraint::Grammar {
        lark: "start: answer \".\"\nanswer: \"yes\" | \"no\" | \"maybe\"".into(),
    };
    let mut generations = vec![object];
    for seed in 0..6 {
        generations.push(submit(&prompt, sampled(regex.clone(), seed, 16)));
        generations.push(submit(&prompt, sampled(choice.clone(), seed, 16)));
        generations.push(submit(&prompt, sampled(lark.clone(), seed, 16)));
    }
    let done = wait_all(generations);
    let v: Value =
        serde_json::from_str(&done[0].text).unwrap_or_else(|e| panic!("{e}: {:?}", done[0].text));
    assert!(v.is_object(), "{}", done[0].text);
    assert_eq!(done[0].finish_reason, FinishReason::Stop);
    for chunk in done[1..].chunks(3) {
        let (r, c, l) = (&chunk[0].text, &chunk[1].text, &chunk[2].text);
        assert!(
            r.len() == 6
                && r[..3].bytes().all(|b| b.is_ascii_digit())
                && &r[3..4] == "-"
                && r[4..].bytes().all(|b| b.is_ascii_lowercase()),
            "{r:?}"
        );
        assert!(
            ["red", "green (light)", "blue"].contains(&c.as_str()),
            "{c:?}"
        );
        assert!(["yes.", "no.", "maybe."].contains(&l.as_str()), "{l:?}");
        assert!(chunk.iter().all(|c| c.finish_reason == FinishReason::Stop));
    }
}

#[test]
fn a_cut_by_max_tokens_is_length_and_an_adapter_row_follows_its_schema() {
    let prompt = chat_prompt("Describe a person as JSON.");
    let cut = submit(
        &prompt,
        SamplingParams {
            constraint: Some(Constraint::JsonSchema {
                schema: person_schema(),
            }),
            ..SamplingParams::greedy(4)
        },
    );
    let adapted = engine()
        .submit(GenerateRequest {
            resume: Vec::new(),
            prompt: prompt.clone(),
            params: sampled(
                Constraint::JsonSchema {
                    schema: person_schema(),
                },
                7,
                160,
            ),
            adapter: Some(common::reference_adapter()),
        })
        .unwrap();
    let done = wait_all(vec![cut, adapted]);
    assert_eq!(done[0].finish_reason, FinishReason::Length);
    assert_eq!(done[0].completion_tokens, 4);
    assert!(done[0].text.starts_with('{'), "{:?}", done[0].text);
    assert_eq!(
        done[1].finish_reason,
        FinishReason::Stop,
        "{:?}",
        done[1].text
    );
    check_person(&done[1].text);
}

#[test]
fn bad_grammars_are_refused_naming_response_format_and_the_engine_serves_on() {
    let prompt = chat_prompt("hi");
    let deep = (0..200).fold(
        json!({"type": "string"}),
        |inner, _| json!({"type": "object", "properties": {"x": inner}, "required": ["x"]}),
    );
    for bad in [
        Constraint::JsonSchema {
            schema: json!({"type": "nonsense"}),
        },
        Constraint::JsonSchema { schema: json!([1]) },
        Constraint::Regex {
            pattern: "(unclosed".into(),
        },
        Constraint::Grammar {
            lark: "start: missing_rule".into(),
        },
        Constraint::Choice { choices: vec![] },
        Constraint::JsonSchema {
            schema: json!({"type": "object", "properties": {"a": {"enum": (0..200_000).map(|i| format!("value-{i}")).collect::<Vec<_>>()}}}),
        },
        Constraint::JsonSchema { schema: deep },
        Constraint::JsonSchema {
            schema: json!({"type": "object", "properties": {"a": {"enum": (0..15_000).map(|i| format!("v{i}")).collect::<Vec<_>>()}}, "required": ["a"]}),
        },
        Constraint::Regex {
            pattern: "((a|b){1000}){1000}".into(),
        },
        Constraint::JsonSchema {
            schema: json!({"type": "string", "pattern": "^(x{1,1000}){1,1000}$"}),
        },
    ] {
        let started = std::time::Instant::now();
        let result = engine().submit(GenerateRequest {
            resume: Vec::new(),
            prompt: prompt.clone(),
            params: SamplingParams {
                constraint: Some(bad.clone()),
                ..SamplingParams::greedy(8)
            },
            adapter: None,
        });
        let waited = started.elapsed();
        match result {
            Err(SubmitError::Grammar(message)) => {
                eprintln!("refused in {waited:?}: {message}");
            }
            Ok(g) => {
                // A schema the compiler takes must still bound its output and end.
                let c = g.wait().expect("a generation that ends");
                eprintln!("accepted ({waited:?}): {:?}", c.text);
            }
            Err(e) => panic!("{e}"),
        }
        assert!(
            waited
                < tessera_engine::constraint::COMPILE_DEADLINE + std::time::Duration::from_secs(2),
            "{waited:?}"
        );
    }
    let ok = submit(&prompt, SamplingParams::greedy(4)).wait().unwrap();
    assert_eq!(ok.completion_tokens, 4);
}

/// `tool_choice: "required"` as the replica does it: a grammar in the family's format (Hermes for
/// SmolLM2, whose template knows no tools) whose every output parses as a call of one of the
/// tools with arguments of its schema.
#[test]
fn a_forced_tool_call_always_parses_with_valid_arguments() {
    use tessera_engine::tool_calls::{ToolFormat, ToolFunction};
    let tools = [
        ToolFunction {
            name: "get_weather".into(),
            description: Some("The weather of a city".into()),
            parameters: Some(
                json!({"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                                    "required": ["city"], "additionalProperties": false}),
            ),
        },
        ToolFunction {
            name: "add".into(),
            description: None,
            parameters: Some(
                json!({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                    "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                                    "required": ["a", "b"], "additionalProperties": false}),
            ),
        },
    ];
    let tokenizer = engine().tokenizer();
    let format = tokenizer.tool_format();
    assert_eq!(format, ToolFormat::Hermes);
    let text = tokenizer
        .apply_chat_template_with_tools(
            &[ChatMessage::new("user", "What is the weather in Paris?")],
            &tools,
            true,
        )
        .unwrap();
    assert!(text.contains("<tools>"), "{text}");
    let prompt = tokenizer.encode(&text, false).unwrap();
    let forced = format.forced_call(&tools, None);
    let generations: Vec<Generation> = (0..6)
        .map(|seed| submit(&prompt, sampled(forced.clone(), seed, 96)))
        .collect();
    for c in wait_all(generations) {
        assert_eq!(c.finish_reason, FinishReason::Stop, "{:?}", c.text);
        let (before, calls) = format
            .parse(&c.text)
            .unwrap_or_else(|| panic!("{:?}", c.text));
        assert_eq!((before.as_str(), calls.len()), ("", 1), "{:?}", c.text);
        let args: Value = serde_json::from_str(&calls[0].arguments).unwrap();
        match calls[0].name.as_str() {
            "get_weather" => assert!(args["city"].is_string(), "{args}"),
            "add" => assert!(args["a"].is_i64() && args["b"].is_i64(), "{args}"),
            other => panic!("called {other}"),
        }
    }
}

#[test]
fn logit_bias_and_min_tokens() {
    let prompt = chat_prompt("Say hi.");
    let tokenizer = engine().tokenizer();
    let plain = submit(&prompt, SamplingParams::greedy(3)).wait().unwrap();
    // +100 on a token the model would not pick makes it the first token.
    let forced = tokenizer.encode(" zebra", false).unwrap()[0];
    assert_ne!(plain.tokens[0].token, forced);
    let biased = submit(
        &prompt,
        SamplingParams {
            logit_bias: vec![(forced, 100.0)],
            ..SamplingParams::greedy(1)
        },
    )
    .wait()
    .unwrap();
    assert_eq!(biased.tokens[0].token, forced);
    // The greedy answer ends early; min_tokens keeps the end tokens away until 40 are out.
    let short = submit(&prompt, SamplingParams::greedy(200)).wait().unwrap();
    assert_eq!(short.finish_reason, FinishReason::Stop);
    assert!(short.completion_tokens < 40, "{}", short.completion_tokens);
    let long = submit(
        &prompt,
        SamplingParams {
            min_tokens: 40,
            ..SamplingParams::greedy(200)
        },
    )
    .wait()
    .unwrap();
    assert!(long.completion_tokens >= 40, "{}", long.completion_tokens);
    let stops = tokenizer.stop_token_ids();
    assert!(long.tokens[..39].iter().all(|t| !stops.contains(&t.token)));
}
