//! The inference actor: one per replica. It owns an [`Engine`] (model on the replica's devices,
//! tensor parallel across them, its own OS thread and adapter cache) and is the replica's mailbox:
//! [`ChatWork`] in, [`StreamEvent`]s out through a bounded channel (a slow client slows only its
//! own stream; a client gone cancels its sequence). The mailbox is bounded by the router's
//! admission control (each request holds a [`Lease`] until its generation ends); rendering and
//! tokenizing a prompt runs on a blocking thread, never on the async runtime, and is skipped for a
//! client already gone.

use std::path::PathBuf;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tessera_engine::engine::SubmitError;
use tessera_engine::scheduler::SchedulerStats;
use tessera_engine::tokenizer::Tokenizer;
use tessera_engine::tool_calls::{ToolChoice, ToolFormat};
use tessera_engine::{Engine, EngineConfig, Event, FailKind, GenerateRequest};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::health::ActorState;
use crate::messages::{
    ChatWork, PromptInput, ServeError, ServeErrorKind, StreamEvent, TokenOut, TopLogprob,
};
use crate::router::{Lease, Router};

pub enum InferenceMsg {
    Generate {
        work: Box<ChatWork>,
        sink: mpsc::Sender<StreamEvent>,
        /// Counts the request against the replica's `max_in_flight` until it ends here.
        lease: Lease,
    },
    /// The engine thread is gone (seen while submitting `request_id`): restart the replica.
    EngineStopped {
        request_id: String,
    },
    /// The model load this replica started when it began (off its mailbox, so a stop is taken at
    /// once, and off its supervisor's handler): its engine starts, or the replica fails.
    Loaded(Box<Result<(tessera_engine::loader::LoadedModel, Option<String>), String>>),
    Stats(RpcReplyPort<SchedulerStats>),
    /// Test hook: make the actor panic (only sent when test hooks are enabled); `engine`: its
    /// engine thread dies first, ending the streams it serves.
    Crash {
        engine: bool,
    },
}

impl ractor::Message for InferenceMsg {}

#[derive(Clone)]
pub struct InferenceArgs {
    pub name: String,
    pub model_path: PathBuf,
    pub devices: Vec<tch::Device>,
    pub kind: Option<tch::Kind>,
    /// How a GGUF's 4-bit weights are held (`model.quantization`).
    pub quantization: tessera_engine::loader::Quantization,
    pub engine: EngineConfig,
    pub router: Router,
    /// Where it says it serves once loaded (its supervisor says the rest).
    pub health: crate::health::HealthBoard,
    /// The router entry's start this replica is ([`Router::add_replica`]).
    pub generation: u64,
}

pub struct InferenceState {
    /// `None` while the model loads.
    engine: Option<Engine>,
    args: InferenceArgs,
}

pub struct InferenceActor;

impl Actor for InferenceActor {
    type Msg = InferenceMsg;
    type State = InferenceState;
    type Arguments = InferenceArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: InferenceArgs,
    ) -> Result<InferenceState, ActorProcessingErr> {
        Ok(InferenceState { engine: None, args })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut InferenceState,
    ) -> Result<(), ActorProcessingErr> {
        // Loading blocks for a while: on a blocking thread, reported back as a message. The actor
        // (and its supervisor) stays responsive meanwhile; a replica stopped before the load ends
        // drops what it loaded.
        let args = state.args.clone();
        tokio::spawn(async move {
            let loaded = tokio::task::spawn_blocking(move || load(&args))
                .await
                .unwrap_or_else(|panicked| Err(format!("loading panicked: {panicked}")));
            let _ = myself.cast(InferenceMsg::Loaded(Box::new(loaded)));
        });
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: InferenceMsg,
        state: &mut InferenceState,
    ) -> Result<(), ActorProcessingErr> {
        let replica = state.args.name.clone();
        match msg {
            InferenceMsg::Loaded(loaded) => {
                if state.engine.is_some() {
                    return Ok(());
                }
                let (loaded, fingerprint) =
                    (*loaded).map_err(|e| format!("replica {replica}: {e}"))?;
                let args = &state.args;
                args.router.set_model(
                    &replica,
                    args.generation,
                    &crate::router::Loaded {
                        model: loaded.name.clone(),
                        dtype: loaded.dtype.clone(),
                        weights: loaded.weights.clone(),
                        fingerprint,
                    },
                );
                let config = EngineConfig {
                    step_delay: test_hook_step_delay(),
                    ..args.engine.clone()
                };
                state.engine = Some(Engine::start(loaded.model, loaded.tokenizer, config));
                // Only now does the router send it requests.
                args.router.set_actor(
                    &replica,
                    args.generation,
                    Some(Arc::new(LocalReplica(myself))),
                    ActorState::Running,
                );
                args.health
                    .set(&replica, "inference", ActorState::Running, None);
            }
            InferenceMsg::Generate { work, sink, lease } => {
                let Some(engine) = state.engine.clone() else {
                    // The router sends nothing before the load ends; a stale sender gets a retry.
                    let e = ServeError::unavailable(format!(
                        "replica {replica} is loading its model; retry shortly"
                    ));
                    let _ = sink.try_send(StreamEvent::Error(e));
                    return Ok(());
                };
                // The client's request id labels this replica's lines of it, on any node.
                let span = tracing::info_span!("request", request_id = %work.trace_id, %replica);
                tokio::spawn(
                    async move {
                        serve(engine, *work, sink, replica, myself).await;
                        drop(lease);
                    }
                    .instrument(span),
                );
            }
            InferenceMsg::EngineStopped { request_id } => {
                // Broken: let the supervisor restart us with a fresh engine.
                return Err(format!("engine stopped (request {request_id})").into());
            }
            InferenceMsg::Stats(reply) => {
                let stats = state.engine.as_ref().map(|e| e.stats());
                let _ = reply.send(stats.unwrap_or_default());
            }
            InferenceMsg::Crash { engine } => {
                if engine {
                    if let Some(e) = &state.engine {
                        e.inject_thread_death();
                    }
                    return Err(format!("test hook: replica {replica}'s engine crashed").into());
                }
                panic!("test hook: replica {replica} told to crash")
            }
        }
        Ok(())
    }
}

/// The router's handle on an inference actor of this node.
pub struct LocalReplica(pub ActorRef<InferenceMsg>);

impl crate::router::Replica for LocalReplica {
    fn generate(
        &self,
        work: ChatWork,
        sink: mpsc::Sender<StreamEvent>,
        lease: Lease,
    ) -> Result<(), (Option<Box<ChatWork>>, String)> {
        let msg = InferenceMsg::Generate {
            work: Box::new(work),
            sink,
            lease,
        };
        match self.0.cast(msg) {
            Ok(()) => Ok(()),
            Err(ractor::MessagingErr::SendErr(InferenceMsg::Generate { work, .. })) => {
                Err((Some(work), "its actor is gone".into()))
            }
            Err(e) => Err((None, e.to_string())),
        }
    }

    fn stats(&self) -> Option<crate::router::StatsFuture> {
        let actor = self.0.clone();
        Some(Box::pin(async move {
            match actor
                .call(InferenceMsg::Stats, Some(std::time::Duration::from_secs(2)))
                .await
            {
                Ok(ractor::rpc::CallResult::Success(s)) => Some(s),
                _ => None,
            }
        }))
    }

    fn crash(&self, engine: bool) -> bool {
        self.0.cast(InferenceMsg::Crash { engine }).is_ok()
    }
}

/// Loads the replica's model on its devices (a blocking call): on GPUs, the sizes are checked
/// first, so that a model that cannot fit fails with them rather than deep inside the load.
fn load(
    args: &InferenceArgs,
) -> Result<(tessera_engine::loader::LoadedModel, Option<String>), String> {
    let path = &args.model_path;
    device_memory_check(path, &args.devices, args.kind)?;
    test_hook_load_delay(path);
    let started = std::time::Instant::now();
    let loaded =
        tessera_engine::loader::load_with(path, &args.devices, args.kind, args.quantization)
            .map_err(|e| format!("loading {}: {e}", path.display()))?;
    tracing::info!(
        replica = %args.name,
        model = %loaded.name,
        devices = ?args.devices,
        seconds = started.elapsed().as_secs_f64(),
        "inference replica loaded its model"
    );
    let fingerprint = tessera_engine::fingerprint::of(path)
        .map_err(
            |e| tracing::warn!(replica = %args.name, error = %e, "cannot fingerprint the model"),
        )
        .ok();
    Ok((loaded, fingerprint))
}

/// Test hook (with `TESSERA_TEST_HOOKS=1` only): `TESSERA_TEST_LOAD_DELAY=PART:MS` makes loads of
/// paths containing PART take MS milliseconds longer, to test what goes on during a slow load.
fn test_hook_load_delay(path: &std::path::Path) {
    if std::env::var("TESSERA_TEST_HOOKS").as_deref() != Ok("1") {
        return;
    }
    let Ok(spec) = std::env::var("TESSERA_TEST_LOAD_DELAY") else {
        return;
    };
    if let Some((part, ms)) = spec.rsplit_once(':') {
        if path.to_string_lossy().contains(part) {
            if let Ok(ms) = ms.parse::<u64>() {
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
        }
    }
}

/// Test hook (with `TESSERA_TEST_HOOKS=1` only): `TESSERA_TEST_STEP_DELAY_MS=MS` makes each
/// engine step take MS milliseconds longer, so that a test can lose a replica while its
/// sequences are being generated.
fn test_hook_step_delay() -> Option<std::time::Duration> {
    if std::env::var("TESSERA_TEST_HOOKS").as_deref() != Ok("1") {
        return None;
    }
    let ms = std::env::var("TESSERA_TEST_STEP_DELAY_MS").ok()?;
    ms.parse().ok().map(std::time::Duration::from_millis)
}

/// Memory a replica keeps free on each device beyond its weights' share: CUDA context,
/// activations, the KV cache's first allocation.
const DEVICE_HEADROOM: u64 = 1 << 30;

/// On CUDA devices: the model's weights in the replica's dtype (bfloat16 unless configured),
/// split over its devices, plus headroom, must fit each device's free memory now.
fn device_memory_check(
    path: &std::path::Path,
    devices: &[tch::Device],
    kind: Option<tch::Kind>,
) -> Result<(), String> {
    let cuda: Vec<usize> = devices
        .iter()
        .filter_map(|d| match d {
            tch::Device::Cuda(i) => Some(*i),
            _ => None,
        })
        .collect();
    if cuda.is_empty() {
        return Ok(());
    }
    let kind = kind.unwrap_or(tch::Kind::BFloat16);
    let weights = tessera_engine::footprint::weight_bytes(path, kind)
        .map_err(|e| format!("sizing {}: {e}", path.display()))?;
    let need = weights / devices.len() as u64 + DEVICE_HEADROOM;
    crate::inventory::fits_on_each(need, &crate::inventory::gpu_free_bytes(&cuda)).map_err(|e| {
        format!(
            "{} ({:.1} GiB of weights in {kind:?} over {} device(s)) {e}",
            path.display(),
            weights as f64 / (1u64 << 30) as f64,
            devices.len()
        )
    })
}

/// Serves one request: renders and tokenizes its prompt on a blocking thread, queues it on the
/// engine and forwards its events until it ends or the client goes.
async fn serve(
    engine: Engine,
    work: ChatWork,
    sink: mpsc::Sender<StreamEvent>,
    replica: String,
    myself: ActorRef<InferenceMsg>,
) {
    if sink.is_closed() {
        // The client hung up while the request waited in the mailbox: no work for it.
        return;
    }
    let request_id = work.request_id.clone();
    let tokenizer = engine.tokenizer().clone();
    let submitting = engine.clone();
    let submitted = tokio::task::spawn_blocking(move || submit(&submitting, work)).await;
    match submitted {
        Ok(Ok((generation, prompt_tokens, tool_format))) => {
            forward(
                generation,
                tokenizer,
                sink,
                replica,
                prompt_tokens,
                tool_format,
            )
            .await
        }
        Ok(Err(Failure::Request(e))) => {
            let _ = sink.send(StreamEvent::Error(e)).await;
        }
        Ok(Err(Failure::EngineStopped)) => {
            let e = ServeError::unavailable(format!(
                "replica {replica} stopped; it is being restarted, retry shortly"
            ));
            let _ = sink.send(StreamEvent::Error(e)).await;
            let _ = myself.cast(InferenceMsg::EngineStopped { request_id });
        }
        Err(panicked) => {
            // A tokenizer or template panic fails this request only.
            tracing::error!(%replica, %request_id, error = %panicked, "preparing the prompt panicked");
            let e = ServeError::new(
                ServeErrorKind::Internal,
                format!("preparing the prompt failed: {panicked}"),
            );
            let _ = sink.send(StreamEvent::Error(e)).await;
        }
    }
}

enum Failure {
    Request(ServeError),
    EngineStopped,
}

/// What a submitted request becomes: its generation, prompt length, and (with tools offered) the
/// format its calls are written in.
type Submitted = (tessera_engine::Generation, usize, Option<ToolFormat>);

/// Renders and encodes the prompt (offering the request's tools), forces a call by a grammar
/// when `tool_choice` asks for one, then queues it on the engine.
fn submit(engine: &Engine, work: ChatWork) -> Result<Submitted, Failure> {
    let tokenizer = engine.tokenizer();
    let internal = |what: &str, e: &dyn std::fmt::Display| {
        Failure::Request(ServeError::new(
            ServeErrorKind::Internal,
            format!("{what}: {e}"),
        ))
    };
    let prompt = match &work.input {
        PromptInput::Raw(text) => tokenizer
            .encode(text, true)
            .map_err(|e| internal("tokenizing the prompt", &e))?,
        PromptInput::Messages(messages) => {
            let text = tokenizer
                .apply_chat_template_with_tools(messages, &work.tools, true)
                .map_err(|e| Failure::Request(ServeError::invalid("messages", e.to_string())))?;
            tokenizer
                .encode(&text, false)
                .map_err(|e| internal("tokenizing the prompt", &e))?
        }
    };
    let prompt_tokens = prompt.len();
    let mut params = work.params;
    let tool_format = (work.tool_choice != ToolChoice::None).then(|| tokenizer.tool_format());
    let forced = match &work.tool_choice {
        ToolChoice::Required => Some(None),
        ToolChoice::Function(name) => Some(Some(name.as_str())),
        ToolChoice::None | ToolChoice::Auto => None,
    };
    if let (Some(named), Some(format)) = (forced, tool_format) {
        params.constraint = Some(format.forced_call(&work.tools, named));
    }
    let context = engine.model_config().max_position_embeddings;
    let room = context.saturating_sub(prompt_tokens);
    if work.clamp_max_tokens {
        params.max_tokens = params.max_tokens.min(room).max(1);
        params.min_tokens = params.min_tokens.min(params.max_tokens);
    } else if params.max_tokens > room {
        // Checked here, without adding the two: a client's max_tokens may be near usize::MAX.
        return Err(Failure::Request(ServeError::invalid(
            "max_tokens",
            format!(
                "prompt ({prompt_tokens} tokens) + max_tokens ({}) exceeds the model's context of {context}",
                params.max_tokens
            ),
        )));
    }
    let request = GenerateRequest {
        resume: work.resume,
        prompt,
        params,
        adapter: work.adapter,
    };
    match engine.submit(request) {
        Ok(generation) => Ok((generation, prompt_tokens, tool_format)),
        Err(SubmitError::Invalid(e)) => {
            Err(Failure::Request(ServeError::invalid(e.field, e.message)))
        }
        Err(SubmitError::Grammar(message)) => {
            // A forced call's grammar comes from `tools`, not from a field the client wrote.
            let field = if forced.is_some() {
                "tools"
            } else {
                "response_format"
            };
            Err(Failure::Request(ServeError {
                kind: ServeErrorKind::Grammar,
                message: message.replacen("response_format", field, 1),
                field: Some(field.into()),
            }))
        }
        Err(SubmitError::Adapter(e)) => Err(Failure::Request(ServeError {
            kind: ServeErrorKind::Adapter,
            message: e.to_string(),
            field: Some("adapter_path".into()),
        })),
        Err(e @ SubmitError::QueueFull(_)) => Err(Failure::Request(ServeError::new(
            ServeErrorKind::Overloaded,
            e.to_string(),
        ))),
        Err(SubmitError::Stopped) => Err(Failure::EngineStopped),
    }
}

/// Moves a generation's events into the stream, waiting for the client when its buffer is full.
/// Returns (dropping the generation, which cancels it) when the client is gone.
async fn forward(
    mut generation: tessera_engine::Generation,
    tokenizer: Arc<Tokenizer>,
    sink: mpsc::Sender<StreamEvent>,
    replica: String,
    prompt_tokens: usize,
    tool_format: Option<ToolFormat>,
) {
    if sink
        .send(StreamEvent::Started {
            replica,
            prompt_tokens,
            tool_format,
        })
        .await
        .is_err()
    {
        return;
    }
    let piece = |id: u32| tokenizer.decode(&[id], false).unwrap_or_default();
    while let Some(event) = generation.next().await {
        let out = match event {
            Event::Token { sampled, text } => StreamEvent::Token(TokenOut {
                id: sampled.token,
                token: piece(sampled.token),
                text,
                logprob: sampled.logprob,
                top_logprobs: sampled
                    .top_logprobs
                    .iter()
                    .map(|&(id, logprob)| TopLogprob {
                        id,
                        token: piece(id),
                        logprob,
                    })
                    .collect(),
            }),
            Event::Finished {
                text,
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                tracing::info!(
                    prompt_tokens,
                    completion_tokens,
                    reason = ?reason,
                    "generation finished"
                );
                StreamEvent::Finished {
                    text,
                    reason,
                    prompt_tokens,
                    completion_tokens,
                }
            }
            Event::Error { message, kind } => StreamEvent::Error(match kind {
                FailKind::Adapter => ServeError {
                    kind: ServeErrorKind::Adapter,
                    message,
                    field: Some("adapter_path".into()),
                },
                FailKind::Grammar => ServeError {
                    kind: ServeErrorKind::Grammar,
                    message,
                    field: Some("response_format".into()),
                },
                FailKind::Engine => ServeError::new(ServeErrorKind::Internal, message),
            }),
        };
        if sink.send(out).await.is_err() {
            return;
        }
    }
}
