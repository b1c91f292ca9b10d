//! The engine on tiny random models written by the tests: continuous batching, per-row adapters,
//! tensor parallelism, sampling controls, cancellation, the queue bound and streaming text.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::tiny;
use tch::{Device, Kind, Tensor};
use tessera_engine::engine::{Completion, Engine, EngineConfig, GenerateRequest, SubmitError};
use tessera_engine::lora::{LoraAdapter, LoraBatch};
use tessera_engine::model::{Logits, Model};
use tessera_engine::scheduler::SchedulerConfig;
use tessera_engine::tokenizer::IncrementalDecoder;
use tessera_engine::{Event, FinishReason, SamplingParams};

struct Models {
    _dir: tempfile::TempDir,
    model: PathBuf,
    adapter_a: PathBuf,
    adapter_b: PathBuf,
}

fn models() -> Models {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny::write_model(&dir.path().join("model"), 1);
    let adapter_a = tiny::write_adapter(&dir.path().join("a"), 4, 8.0, &["q_proj", "v_proj"], 2);
    let adapter_b = tiny::write_adapter(&dir.path().join("b"), 8, 16.0, &tiny::ALL_TARGETS, 3);
    Models {
        _dir: dir,
        model,
        adapter_a,
        adapter_b,
    }
}

fn engine(path: &Path, devices: &[Device], config: EngineConfig) -> Engine {
    let loaded = tessera_engine::load(path, devices, Some(Kind::Float)).unwrap();
    Engine::start(loaded.model, loaded.tokenizer, config)
}

fn greedy(n: usize) -> SamplingParams {
    SamplingParams {
        ignore_eos: true,
        ..SamplingParams::greedy(n)
    }
}

fn request(
    engine: &Engine,
    text: &str,
    params: SamplingParams,
    adapter: Option<&Path>,
) -> GenerateRequest {
    GenerateRequest {
        resume: Vec::new(),
        prompt: engine.tokenizer().encode(text, false).unwrap(),
        params,
        adapter: adapter.map(Path::to_path_buf),
    }
}

fn ids(c: &Completion) -> Vec<u32> {
    c.tokens.iter().map(|s| s.token).collect()
}

/// Polls `check` until it holds (or fails after 10 s).
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

const PROMPTS: [&str; 4] = [
    "Hello",
    "A much longer prompt, which takes more than one prefill chunk of tokens to read.",
    "xyz",
    "The quick brown fox jumps",
];

#[test]
fn a_batch_of_mixed_lengths_gives_each_row_what_it_gets_alone() {
    let m = models();
    // A small prefill budget forces chunked prefill beside running decodes.
    let config = EngineConfig {
        scheduler: SchedulerConfig {
            prefill_token_budget: 16,
            ..SchedulerConfig::default()
        },
        ..EngineConfig::default()
    };
    let e = engine(&m.model, &[Device::Cpu], config);
    let alone: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| {
            ids(&e
                .submit(request(&e, p, greedy(24), None))
                .unwrap()
                .wait()
                .unwrap())
        })
        .collect();
    // Two start together; the others join while the first two are decoding.
    let mut first = e.submit(request(&e, PROMPTS[0], greedy(24), None)).unwrap();
    let second = e.submit(request(&e, PROMPTS[1], greedy(24), None)).unwrap();
    let mut got_first = Vec::new();
    for _ in 0..3 {
        match first.blocking_next() {
            Some(Event::Token { sampled, .. }) => got_first.push(sampled.token),
            other => panic!("expected a token, got {other:?}"),
        }
    }
    let third = e.submit(request(&e, PROMPTS[2], greedy(24), None)).unwrap();
    let fourth = e.submit(request(&e, PROMPTS[3], greedy(24), None)).unwrap();
    let rest = first.wait().unwrap();
    got_first.extend(ids(&rest));
    assert_eq!(got_first, alone[0]);
    assert_eq!(ids(&second.wait().unwrap()), alone[1]);
    assert_eq!(ids(&third.wait().unwrap()), alone[2]);
    assert_eq!(ids(&fourth.wait().unwrap()), alone[3]);
    assert!(e.stats().decode_steps > 0);
}

#[test]
fn a_batch_mixing_adapters_gives_each_row_what_it_gets_alone() {
    let m = models();
    let e = engine(&m.model, &[Device::Cpu], EngineConfig::default());
    let rows: Vec<(&str, Option<&Path>)> = vec![
        (PROMPTS[0], Some(&m.adapter_a)),
        (PROMPTS[3], Some(&m.adapter_b)),
        (PROMPTS[2], None),
        (PROMPTS[3], Some(&m.adapter_a)),
        (PROMPTS[3], None),
    ];
    let alone: Vec<Vec<u32>> = rows
        .iter()
        .map(|(p, a)| {
            ids(&e
                .submit(request(&e, p, greedy(16), *a))
                .unwrap()
                .wait()
                .unwrap())
        })
        .collect();
    assert_ne!(alone[1], alone[4], "adapter B changes the output");
    assert_ne!(alone[3], alone[4], "adapter A changes the output");
    let together: Vec<_> = rows
        .iter()
        .map(|(p, a)| e.submit(request(&e, p, greedy(16), *a)).unwrap())
        .collect();
    for (i, g) in together.into_iter().enumerate() {
        assert_eq!(ids(&g.wait().unwrap()), alone[i], "row {i}");
    }
    let stats = e.stats();
    assert_eq!(stats.adapters_loaded, 2);
}

/// Full-prompt logits of a model on `devices`, with adapter B on the second row.
fn logits_on(m: &Models, devices: &[Device]) -> Tensor {
    let loaded = tessera_engine::load(&m.model, devices, Some(Kind::Float)).unwrap();
    let model: Model = loaded.model;
    let adapter = LoraAdapter::load(&m.adapter_b, model.config()).unwrap();
    let placed = std::sync::Arc::new(adapter.place(devices, Kind::Float));
    let lora = LoraBatch::new(
        std::slice::from_ref(&placed),
        &[None, Some(0)],
        model.config().num_hidden_layers,
        devices,
        Kind::Float,
    );
    let prompt: Vec<i64> = loaded
        .tokenizer
        .encode(PROMPTS[3], false)
        .unwrap()
        .iter()
        .map(|&t| t as i64)
        .collect();
    let tokens = Tensor::from_slice(&prompt).view([1, -1]).repeat([2, 1]);
    let t = prompt.len() as i64;
    tch::no_grad(|| {
        let mut cache = model.new_cache(2, t + 1);
        let prefill = model.forward(&tokens, &[0, 0], &mut cache, lora.as_ref(), Logits::All);
        // One decode step on top of the cache too.
        let next = Tensor::from_slice(&[5i64, 9]).view([2, 1]);
        let step = model.forward(&next, &[t, t], &mut cache, lora.as_ref(), Logits::Last);
        Tensor::cat(&[prefill, step], 1)
    })
}

#[test]
fn tensor_parallel_2_and_3_match_a_single_device() {
    let m = models();
    let one = logits_on(&m, &[Device::Cpu]);
    for tp in [2, 3] {
        let many = logits_on(&m, &vec![Device::Cpu; tp]);
        let diff = (&many - &one).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "TP={tp}: max |Δlogit| = {diff}");
    }
    let e = engine(
        &m.model,
        &[Device::Cpu, Device::Cpu],
        EngineConfig::default(),
    );
    let e1 = engine(&m.model, &[Device::Cpu], EngineConfig::default());
    let p = request(&e, PROMPTS[1], greedy(12), Some(&m.adapter_b));
    assert_eq!(
        ids(&e.submit(p.clone()).unwrap().wait().unwrap()),
        ids(&e1.submit(p).unwrap().wait().unwrap())
    );
}

#[test]
fn tensor_parallel_degree_must_divide_heads() {
    let m = models();
    let err = tessera_engine::load(&m.model, &[Device::Cpu; 4], Some(Kind::Float))
        .err()
        .expect("4 does not divide 6 kv heads");
    assert!(err.to_string().contains("key/value heads"), "{err}");
}

#[test]
fn stop_strings_end_the_text_before_them() {
    let m = models();
    let e = engine(&m.model, &[Device::Cpu], EngineConfig::default());
    let full = e
        .submit(request(&e, PROMPTS[0], greedy(30), None))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(full.finish_reason, FinishReason::Length);
    // Take a stop string from the middle of the text (by characters, so never a partial byte).
    let chars: Vec<char> = full.text.chars().collect();
    assert!(chars.len() >= 8, "text long enough: {:?}", full.text);
    let stop: String = chars[4..6].iter().collect();
    let before = &full.text[..full.text.find(&stop).unwrap()];
    let params = SamplingParams {
        stop: vec![stop.clone()],
        ..greedy(30)
    };
    let stopped = e
        .submit(request(&e, PROMPTS[0], params, None))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(stopped.finish_reason, FinishReason::Stop);
    assert_eq!(stopped.text, before, "stop string {stop:?}");
    // Stop token ids end generation too.
    let first = ids(&full)[2];
    let params = SamplingParams {
        stop_token_ids: vec![first],
        ..greedy(30)
    };
    let stopped = e
        .submit(request(&e, PROMPTS[0], params, None))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(stopped.finish_reason, FinishReason::Stop);
    assert_eq!(*ids(&stopped).last().unwrap(), first);
    assert!(stopped.completion_tokens <= 3);
}

#[test]
fn a_seed_makes_sampling_reproducible() {
    let m = models();
    let e = engine(&m.model, &[Device::Cpu], EngineConfig::default());
    let sample = |seed: u64| {
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 0.95,
            top_k: 50,
            seed: Some(seed),
            ignore_eos: true,
            max_tokens: 24,
            ..SamplingParams::default()
        };
        ids(&e
            .submit(request(&e, PROMPTS[0], params, None))
            .unwrap()
            .wait()
            .unwrap())
    };
    assert_eq!(sample(7), sample(7));
    let others = [sample(8), sample(9), sample(10)];
    assert!(
        others.iter().any(|o| *o != sample(7)),
        "different seeds, different samples"
    );
}

#[test]
fn cancelling_frees_the_cache_at_the_next_step() {
    let m = models();
    let e = engine(&m.model, &[Device::Cpu], EngineConfig::default());
    let mut g = e
        .submit(request(&e, PROMPTS[1], greedy(400), None))
        .unwrap();
    assert!(matches!(g.blocking_next(), Some(Event::Token { .. })));
    eventually("the sequence to run", || e.stats().running == 1);
    assert!(e.stats().kv_reserved_tokens > 0);
    g.cancel();
    let mut last = None;
    while let Some(ev) = g.blocking_next() {
        last = Some(ev);
    }
    assert!(
        matches!(
            last,
            Some(Event::Finished {
                reason: FinishReason::Cancelled,
                ..
            })
        ),
        "{last:?}"
    );
    eventually("the cache to be freed", || {
        let s = e.stats();
        s.running == 0 && s.kv_reserved_tokens == 0
    });
    // A dropped generation (client gone) is cancelled as well.
    let g = e
        .submit(request(&e, PROMPTS[1], greedy(400), None))
        .unwrap();
    eventually("the second sequence to run", || e.stats().running == 1);
    drop(g);
    eventually("the dropped sequence to be freed", || {
        e.stats().kv_reserved_tokens == 0
    });
}

#[test]
fn the_waiting_queue_is_bounded() {
    let m = models();
    let config = EngineConfig {
        scheduler: SchedulerConfig {
            max_batch_size: 1,
            ..SchedulerConfig::default()
        },
        max_waiting: 2,
        ..EngineConfig::default()
    };
    let e = engine(&m.model, &[Device::Cpu], config);
    let running = e.submit(request(&e, "a", greedy(480), None)).unwrap();
    eventually("the first sequence to run", || e.stats().running == 1);
    let queued: Vec<_> = (0..2)
        .map(|_| e.submit(request(&e, "b", greedy(4), None)).unwrap())
        .collect();
    let err = e
        .submit(request(&e, "c", greedy(4), None))
        .err()
        .expect("queue is full");
    assert!(matches!(err, SubmitError::QueueFull(2)), "{err}");
    drop(running);
    for g in queued {
        assert_eq!(g.wait().unwrap().completion_tokens, 4);
    }
    // Room again.
    e.submit(request(&e, "c", greedy(4), None))
        .unwrap()
        .wait()
        .unwrap();
}

#[test]
fn bad_requests_are_refused_naming_the_field() {
    let m = models();
    let e = engine(&m.model, &[Device::Cpu], EngineConfig::default());
    let cases: Vec<(GenerateRequest, &str)> = vec![
        (request(&e, "hi", greedy(0), None), "max_tokens"),
        (request(&e, "hi", greedy(600), None), "max_tokens"),
        (
            request(
                &e,
                "hi",
                SamplingParams {
                    temperature: -1.0,
                    ..greedy(4)
                },
                None,
            ),
            "temperature",
        ),
        (
            request(
                &e,
                "hi",
                SamplingParams {
                    top_p: 0.0,
                    ..greedy(4)
                },
                None,
            ),
            "top_p",
        ),
        (
            GenerateRequest {
                resume: Vec::new(),
                prompt: vec![tiny::VOCAB as u32 + 5],
                params: greedy(4),
                adapter: None,
            },
            "prompt",
        ),
        (request(&e, "", greedy(4), None), "prompt"),
    ];
    for (req, field) in cases {
        let err = e.submit(req).err().expect("refused");
        assert!(matches!(err, SubmitError::Invalid(_)), "{err}");
        assert!(err.to_string().contains(field), "`{err}` names {field}");
    }
    let missing = Path::new("/nonexistent/adapter");
    let err = e
        .submit(request(&e, "hi", greedy(4), Some(missing)))
        .err()
        .unwrap();
    assert!(matches!(err, SubmitError::Adapter(_)), "{err}");
    // The engine still serves.
    e.submit(request(&e, "hi", greedy(4), None))
        .unwrap()
        .wait()
        .unwrap();
}

#[test]
fn an_adapter_that_fails_to_load_fails_only_its_request() {
    let m = models();
    let e = engine(&m.model, &[Device::Cpu], EngineConfig::default());
    let bad = m.adapter_a.parent().unwrap().join("bad");
    tiny::write_adapter(&bad, 4, 8.0, &["q_proj"], 5);
    // Claims rank 8 while the tensors have rank 4.
    let config = std::fs::read_to_string(bad.join("adapter_config.json")).unwrap();
    std::fs::write(
        bad.join("adapter_config.json"),
        config.replace("\"r\":4", "\"r\":8"),
    )
    .unwrap();
    let good = e.submit(request(&e, PROMPTS[0], greedy(8), None)).unwrap();
    let failing = e
        .submit(request(&e, PROMPTS[0], greedy(8), Some(&bad)))
        .unwrap();
    let err = failing.wait().unwrap_err();
    assert!(err.contains("shape"), "{err}");
    assert_eq!(good.wait().unwrap().completion_tokens, 8);
}

#[test]
fn an_overwritten_adapter_is_reloaded() {
    let m = models();
    let e = engine(&m.model, &[Device::Cpu], EngineConfig::default());
    let dir = m.adapter_a.parent().unwrap().join("changing");
    tiny::write_adapter(&dir, 4, 8.0, &["q_proj", "v_proj"], 11);
    let before = ids(&e
        .submit(request(&e, PROMPTS[3], greedy(12), Some(&dir)))
        .unwrap()
        .wait()
        .unwrap());
    std::thread::sleep(Duration::from_millis(20));
    tiny::write_adapter(&dir, 4, 8.0, &["q_proj", "v_proj", "o_proj"], 12);
    let after = ids(&e
        .submit(request(&e, PROMPTS[3], greedy(12), Some(&dir)))
        .unwrap()
        .wait()
        .unwrap());
    assert_ne!(before, after);
    assert_eq!(e.stats().adapter_loads, 2);
}

#[test]
fn streamed_text_never_splits_a_character() {
    let m = models();
    let loaded = tessera_engine::load(&m.model, &[Device::Cpu], Some(Kind::Float)).unwrap();
    let tok = loaded.tokenizer;
    let text = "héllo 你好 🎉 done";
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(ids.len(), text.len(), "one token per byte");
    let mut decoder = IncrementalDecoder::new(&[], false);
    let mut out = String::new();
    for id in ids {
        let piece = decoder.push(&tok, id).unwrap();
        assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
        out.push_str(&piece);
    }
    out.push_str(&decoder.finish(&tok).unwrap());
    assert_eq!(out, text);
    // The chat template of tokenizer_config.json is the one used.
    let chat = tok
        .apply_chat_template(&[tessera_engine::ChatMessage::new("user", "hi")], true)
        .unwrap();
    assert_eq!(chat, "<|user|>hi</s><|assistant|>");
}

#[test]
fn a_max_tokens_near_the_integer_limit_is_refused_not_wrapped() {
    let m = models();
    let e = engine(&m.model, &[Device::Cpu], EngineConfig::default());
    for max_tokens in [usize::MAX, usize::MAX - 3, u64::MAX as usize / 2 + 1] {
        let params = SamplingParams {
            max_tokens,
            ..greedy(1)
        };
        match e.submit(request(&e, PROMPTS[0], params, None)) {
            Err(SubmitError::Invalid(err)) => assert_eq!(err.field, "max_tokens", "{err}"),
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("max_tokens {max_tokens} was accepted"),
        }
    }
    let done = e
        .submit(request(&e, PROMPTS[0], greedy(4), None))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(done.completion_tokens, 4, "the engine still serves");
}

#[test]
fn a_failing_step_fails_its_sequences_and_the_engine_goes_on() {
    let m = models();
    let e = engine(&m.model, &[Device::Cpu], EngineConfig::default());
    let mut running = e
        .submit(request(&e, PROMPTS[1], greedy(400), None))
        .unwrap();
    assert!(matches!(running.blocking_next(), Some(Event::Token { .. })));
    e.inject_step_failure();
    let mut last = None;
    while let Some(ev) = running.blocking_next() {
        last = Some(ev);
    }
    match last {
        Some(Event::Error { message, .. }) => {
            assert!(message.contains("engine failed"), "{message}")
        }
        other => panic!("expected an error event, got {other:?}"),
    }
    eventually("the failed sequence's slot to be freed", || {
        let s = e.stats();
        s.running == 0 && s.kv_reserved_tokens == 0 && s.failed_steps == 1
    });
    let after = e
        .submit(request(&e, PROMPTS[2], greedy(5), None))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(after.completion_tokens, 5, "the engine thread survived");
}

#[test]
fn a_cached_prefix_gives_the_tokens_of_a_full_prefill() {
    let m = models();
    let with_cache = engine(&m.model, &[Device::Cpu], EngineConfig::default());
    let without = engine(
        &m.model,
        &[Device::Cpu],
        EngineConfig {
            scheduler: SchedulerConfig {
                prefix_cache_tokens: 0,
                ..SchedulerConfig::default()
            },
            ..EngineConfig::default()
        },
    );
    let system = PROMPTS.join(" ").repeat(3);
    let turns = [
        format!("{system} first question"),
        format!("{system} a second, different question"),
    ];
    for adapter in [None, Some(m.adapter_b.as_path())] {
        for turn in &turns {
            let run = |e: &Engine| {
                ids(&e
                    .submit(request(e, turn, greedy(12), adapter))
                    .unwrap()
                    .wait()
                    .unwrap())
            };
            assert_eq!(run(&with_cache), run(&without), "{turn} with {adapter:?}");
        }
    }
    let s = with_cache.stats();
    assert!(
        s.prefix_hit_tokens >= 32,
        "the second turn reused the shared prefix: {s:?}"
    );
    assert_eq!(without.stats().prefix_hit_tokens, 0);
}

/// A generation's events as a client sees them: each token with the text it released, then the
/// end (its held-back text, reason and counts).
struct Streamed {
    tokens: Vec<(u32, String)>,
    end: (String, FinishReason, usize, usize),
}

fn stream(e: &Engine, req: GenerateRequest) -> Streamed {
    let mut g = e.submit(req).unwrap();
    let mut tokens = Vec::new();
    loop {
        match g.blocking_next().expect("an end event") {
            Event::Token { sampled, text } => tokens.push((sampled.token, text)),
            Event::Finished {
                text,
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                return Streamed {
                    tokens,
                    end: (text, reason, prompt_tokens, completion_tokens),
                }
            }
            Event::Error { message, .. } => panic!("{message}"),
        }
    }
}

impl Streamed {
    /// The whole text a client would have read.
    fn text(&self) -> String {
        self.tokens
            .iter()
            .map(|(_, t)| t.as_str())
            .collect::<String>()
            + &self.end.0
    }
}

/// Resuming after any number of streamed tokens (issue 29: a replica lost mid-stream) gives the
/// rest of the very same stream: the same tokens and text after the seam (stop strings found
/// across it, the text held back there released), the same end and counts; a seeded sample
/// continues its draws; tokens that already end it give only the end; tokens that cannot be
/// this request's output are refused naming `resume`.
#[test]
fn a_generation_resumed_after_any_token_ends_as_the_whole_one() {
    let m = models();
    let e = engine(&m.model, &[Device::Cpu], EngineConfig::default());
    let full = stream(&e, request(&e, PROMPTS[0], greedy(30), None));
    let chars: Vec<char> = full.text().chars().collect();
    let stop: String = chars[6..9].iter().collect();
    let seeded = SamplingParams {
        temperature: 1.0,
        top_k: 50,
        seed: Some(11),
        ignore_eos: true,
        max_tokens: 24,
        ..SamplingParams::default()
    };
    let cases = [
        greedy(30),
        SamplingParams {
            stop: vec![stop.clone()],
            ..greedy(30)
        },
        seeded,
    ];
    for params in cases {
        let whole = stream(&e, request(&e, PROMPTS[0], params.clone(), None));
        let n = whole.tokens.len();
        assert!(n >= 5, "{params:?}: {n} tokens");
        for k in 1..=n {
            let mut req = request(&e, PROMPTS[0], params.clone(), None);
            req.resume = whole.tokens[..k].iter().map(|(t, _)| *t).collect();
            let rest = stream(&e, req);
            assert_eq!(
                rest.tokens[..],
                whole.tokens[k..],
                "{params:?}, resumed after {k}"
            );
            assert_eq!(rest.end, whole.end, "{params:?}, resumed after {k}");
            let sent: String = whole.tokens[..k].iter().map(|(_, t)| t.as_str()).collect();
            assert_eq!(sent + &rest.text(), whole.text());
        }
    }
    // The stop string case did stop inside the text, so seams fell inside and before it.
    let stopped = stream(
        &e,
        request(
            &e,
            PROMPTS[0],
            SamplingParams {
                stop: vec![stop],
                ..greedy(30)
            },
            None,
        ),
    );
    assert_eq!(stopped.end.1, FinishReason::Stop);
    assert!(stopped.tokens.len() < 30);

    let ids: Vec<u32> = full.tokens.iter().map(|(t, _)| *t).collect();
    let refused = |resume: Vec<u32>, params: SamplingParams| {
        let mut req = request(&e, PROMPTS[0], params, None);
        req.resume = resume;
        let err = e.submit(req).err().expect("refused");
        assert!(matches!(err, SubmitError::Invalid(_)), "{err}");
        assert!(err.to_string().contains("resume"), "{err}");
    };
    refused(ids.clone(), greedy(20));
    refused(vec![tiny::VOCAB as u32 + 1], greedy(20));
    refused(
        ids[..6].to_vec(),
        SamplingParams {
            stop_token_ids: vec![ids[2]],
            ..greedy(30)
        },
    );
    // The engine serves on.
    e.submit(request(&e, "hi", greedy(4), None))
        .unwrap()
        .wait()
        .unwrap();
}

#[test]
fn an_auto_sized_batch_is_chosen_from_measured_steps_and_bounds_the_running_batch() {
    let m = models();
    // No decode step meets a bound of 0 ms: of the sizes measured (8, 16, 32, 64) the smallest
    // runs, and the 12 requests take turns in it.
    let config = EngineConfig {
        scheduler: SchedulerConfig {
            max_batch_size: 64,
            auto_batch_size: true,
            max_step: Duration::ZERO,
            ..SchedulerConfig::default()
        },
        step_delay: Some(Duration::from_millis(2)),
        ..EngineConfig::default()
    };
    let e = engine(&m.model, &[Device::Cpu], config);
    eventually("the batch size to be chosen", || e.stats().batch_size == 8);
    let drains: Vec<_> = (0..12)
        .map(|i| {
            let g = e
                .submit(request(&e, PROMPTS[i % 4], greedy(60), None))
                .unwrap();
            std::thread::spawn(move || g.wait())
        })
        .collect();
    let (mut most_active, mut waited) = (0, false);
    while !drains.iter().all(|d| d.is_finished()) {
        let s = e.stats();
        most_active = most_active.max(s.running + s.prefilling);
        waited |= s.running + s.prefilling == 8 && s.waiting > 0;
        std::thread::sleep(Duration::from_millis(1));
    }
    for d in drains {
        let c = d.join().unwrap().unwrap();
        assert_eq!(c.tokens.len(), 60);
    }
    assert_eq!(most_active, 8, "never more than the chosen batch");
    assert!(waited, "the others waited for a slot");
    // Without auto_batch_size the batch is max_batch_size, unmeasured.
    let e = engine(&m.model, &[Device::Cpu], EngineConfig::default());
    eventually("the engine to start", || e.stats().batch_size == 32);
}
