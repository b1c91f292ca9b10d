//! The engine: a model and its scheduler on a dedicated OS thread (tch calls block; they never run
//! on an async runtime), fed through a mailbox, plus an adapter-loader thread so reading an adapter
//! from disk never holds up decode steps. [`Engine`] is the cheap, cloneable handle: it validates
//! a request, enforces the waiting-queue bound, and returns a [`Generation`] whose events stream
//! back as tokens are produced. Dropping a `Generation` cancels it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use tch::{Device, Kind};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::constraint::{GrammarState, Grammars};
use crate::lora::{AdapterKey, LoraAdapter, LoraError, PlacedAdapter};
use crate::model::Model;
use crate::model::ModelConfig;
use crate::sampling::{ParamError, Sampled, SamplingParams};
use crate::scheduler::{AdapterLoader, Scheduler, SchedulerConfig, SchedulerStats, Waiting};
use crate::sequence::{Event, FinishReason, Sequence};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    /// Requests waiting for admission beyond this are refused ([`SubmitError::QueueFull`]).
    pub max_waiting: usize,
    /// Intra-op threads of the engine thread's torch pool (`None`: torch's default).
    pub threads: Option<usize>,
    /// Tests only: each step takes this much longer (so a test can lose a replica while its
    /// sequences are still being generated). `None` in service.
    pub step_delay: Option<std::time::Duration>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            scheduler: SchedulerConfig::default(),
            max_waiting: 256,
            threads: None,
            step_delay: None,
        }
    }
}

/// One generation to run.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// A PEFT adapter directory, or `None` for the base model.
    pub adapter: Option<PathBuf>,
    /// Tokens this generation already produced (and streamed) on a replica that was lost: it
    /// goes on after them, as if it had produced them here ([`Generation`] streams only what
    /// follows; the counts and `max_tokens` include them). Empty for a new generation.
    pub resume: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Invalid(#[from] ParamError),
    #[error(transparent)]
    Adapter(#[from] LoraError),
    /// The request's grammar (structured outputs) cannot be used: it does not compile, not in
    /// time, or this model's tokenizer cannot carry one.
    #[error("response_format: {0}")]
    Grammar(String),
    #[error("the waiting queue is full ({0} requests); retry later")]
    QueueFull(usize),
    #[error("the engine has stopped")]
    Stopped,
}

enum Command {
    Submit(Box<Waiting>),
    AdapterLoaded(AdapterKey, Result<Arc<PlacedAdapter>, String>),
    /// Tests: make the next step panic inside, as a model fault would.
    FailNextStep,
    /// Tests: the engine thread dies (a fault outside a step): every open generation ends with
    /// no end event.
    Die,
    /// The last handle is gone: stop now (open generations end with an error).
    Shutdown,
}

struct Inner {
    tx: Mutex<Option<mpsc::Sender<Command>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    tokenizer: Arc<Tokenizer>,
    model_config: ModelConfig,
    config: EngineConfig,
    queued: Arc<AtomicUsize>,
    next_id: AtomicU64,
    stats: Arc<Mutex<SchedulerStats>>,
    devices: Vec<Device>,
    /// The grammar compiler of structured outputs, built at the first request that needs it.
    grammars: OnceLock<Result<Arc<Grammars>, String>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.lock().expect("engine mailbox").take() {
            let _ = tx.send(Command::Shutdown);
        }
        if let Some(thread) = self.thread.lock().expect("engine thread").take() {
            let _ = thread.join();
        }
    }
}

/// A handle to a running engine. Cloning is cheap; the engine stops when the last handle drops.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Starts the engine thread (and its adapter loader) for `model`.
    pub fn start(model: Model, tokenizer: Tokenizer, config: EngineConfig) -> Self {
        let tokenizer = Arc::new(tokenizer);
        let queued = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(Mutex::new(SchedulerStats::default()));
        let model_config = model.config().clone();
        let devices = model.devices();
        let (tx, rx) = mpsc::channel::<Command>();
        let loader = spawn_loader(
            model_config.clone(),
            devices.clone(),
            model.kind(),
            tx.clone(),
        );
        let scheduler = Scheduler::new(
            model,
            tokenizer.clone(),
            config.scheduler.clone(),
            queued.clone(),
        );
        let thread_stats = stats.clone();
        let threads = config.threads;
        let step_delay = config.step_delay;
        let thread = std::thread::Builder::new()
            .name("tessera-engine".into())
            .spawn(move || {
                if let Some(n) = threads {
                    // OpenMP's thread count is per calling thread: this sets the engine's pool.
                    tch::set_num_threads(n.max(1) as i32);
                }
                let mut scheduler = scheduler;
                scheduler.size_batch();
                run(scheduler, rx, loader, thread_stats, step_delay)
            })
            .expect("spawn engine thread");
        Self {
            inner: Arc::new(Inner {
                tx: Mutex::new(Some(tx)),
                thread: Mutex::new(Some(thread)),
                tokenizer,
                model_config,
                config,
                queued,
                next_id: AtomicU64::new(1),
                stats,
                devices,
                grammars: OnceLock::new(),
            }),
        }
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.inner.tokenizer
    }

    pub fn model_config(&self) -> &ModelConfig {
        &self.inner.model_config
    }

    pub fn devices(&self) -> &[Device] {
        &self.inner.devices
    }

    /// The scheduler's state after its latest step.
    pub fn stats(&self) -> SchedulerStats {
        self.inner.stats.lock().expect("stats").clone()
    }

    /// The model's grammar compiler (structured outputs), built once: the tokenizer's vocabulary
    /// as a token trie takes a moment.
    pub fn grammars(&self) -> Result<Arc<Grammars>, String> {
        let inner = &self.inner;
        inner
            .grammars
            .get_or_init(|| {
                let started = std::time::Instant::now();
                let built = Grammars::new(inner.tokenizer.clone(), inner.model_config.vocab_size)
                    .map(Arc::new)
                    .map_err(|e| e.message);
                tracing::info!(
                    ms = started.elapsed().as_secs_f64() * 1e3,
                    ok = built.is_ok(),
                    "structured outputs: token trie built"
                );
                built
            })
            .clone()
    }

    /// Makes the engine's next step panic inside, as a fault in the model would (for tests of the
    /// engine surviving one: the step's sequences fail, the engine goes on).
    #[doc(hidden)]
    pub fn inject_step_failure(&self) {
        if let Some(tx) = self.inner.tx.lock().expect("engine mailbox").as_ref() {
            let _ = tx.send(Command::FailNextStep);
        }
    }

    /// Makes the engine thread die, as a fault outside a step would (for tests of what a lost
    /// replica does to its requests).
    #[doc(hidden)]
    pub fn inject_thread_death(&self) {
        if let Some(tx) = self.inner.tx.lock().expect("engine mailbox").as_ref() {
            let _ = tx.send(Command::Die);
        }
    }

    /// Validates and queues a request. Errors name the offending field or limit.
    pub fn submit(&self, request: GenerateRequest) -> Result<Generation, SubmitError> {
        let inner = &self.inner;
        let params = request.params;
        params.validate()?;
        let invalid = |field, message: String| SubmitError::Invalid(ParamError { field, message });
        if request.prompt.is_empty() {
            return Err(invalid("prompt", "the prompt has no tokens".into()));
        }
        let vocab = inner.model_config.vocab_size as u32;
        for (field, tokens) in [("prompt", &request.prompt), ("resume", &request.resume)] {
            if let Some(bad) = tokens.iter().find(|&&t| t >= vocab) {
                return Err(invalid(
                    field,
                    format!("token id {bad} is outside the vocabulary ({vocab})"),
                ));
            }
        }
        let context = inner.model_config.max_position_embeddings;
        // Checked: a max_tokens near usize::MAX must not wrap past the context check.
        let total = request.prompt.len().saturating_add(params.max_tokens);
        if total > context {
            return Err(invalid(
                "max_tokens",
                format!(
                    "prompt ({} tokens) + max_tokens ({}) exceeds the model's context of {context}",
                    request.prompt.len(),
                    params.max_tokens
                ),
            ));
        }
        let kv = inner.config.scheduler.max_kv_tokens;
        if i64::try_from(total).map_or(true, |t| t > kv) {
            return Err(invalid(
                "max_tokens",
                format!("prompt + max_tokens ({total}) exceeds the KV cache budget of {kv} tokens"),
            ));
        }
        if let Some((token, _)) = params.logit_bias.iter().find(|(t, _)| *t >= vocab) {
            return Err(invalid(
                "logit_bias",
                format!("token id {token} is outside the vocabulary ({vocab})"),
            ));
        }
        // Compiled here, on the submitting thread (a blocking one), never on the engine's.
        let grammar = match &params.constraint {
            Some(constraint) => {
                let grammars = self.grammars().map_err(SubmitError::Grammar)?;
                let matcher = grammars
                    .matcher(constraint)
                    .map_err(|e| SubmitError::Grammar(e.message))?;
                Some(GrammarState::new(matcher))
            }
            None => None,
        };
        let adapter = request
            .adapter
            .as_deref()
            .map(|dir| {
                // Fail fast on a path that is not an adapter, before queueing.
                let key = AdapterKey::of(dir)?;
                Ok::<_, SubmitError>(key)
            })
            .transpose()?;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let cancel = Arc::new(AtomicBool::new(false));
        let (events_tx, events) = unbounded_channel();
        let mut seq = Sequence::new(
            id,
            request.prompt,
            params,
            &inner.tokenizer,
            cancel.clone(),
            events_tx,
        );
        seq.grammar = grammar;
        match seq.resume(&request.resume, &inner.tokenizer) {
            Ok(None) => {}
            // The given tokens already end it: only the end is left to say.
            Ok(Some(reason)) => {
                seq.finish(reason, &inner.tokenizer);
                return Ok(Generation { id, events, cancel });
            }
            Err(why) => return Err(invalid("resume", message_of(&request.resume, why))),
        }
        let max = inner.config.max_waiting;
        if inner
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_err()
        {
            return Err(SubmitError::QueueFull(max));
        }
        let sent = inner
            .tx
            .lock()
            .expect("engine mailbox")
            .as_ref()
            .map(|tx| {
                tx.send(Command::Submit(Box::new(Waiting { seq, adapter })))
                    .is_ok()
            })
            .unwrap_or(false);
        if !sent {
            inner.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(SubmitError::Stopped);
        }
        Ok(Generation { id, events, cancel })
    }
}

/// Why tokens to resume cannot be resumed.
fn message_of(tokens: &[u32], why: String) -> String {
    format!(
        "the {} tokens to resume do not continue this request: {why}",
        tokens.len()
    )
}

/// A submitted generation: its events, and cancellation (also on drop).
pub struct Generation {
    pub id: u64,
    events: UnboundedReceiver<Event>,
    cancel: Arc<AtomicBool>,
}

/// A whole generation, collected.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub tokens: Vec<Sampled>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

impl Generation {
    /// The next event (async). `None` once the sequence has ended.
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// The next event, blocking the current (non-async) thread.
    pub fn blocking_next(&mut self) -> Option<Event> {
        self.events.blocking_recv()
    }

    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Blocks until the end and gathers tokens and text.
    pub fn wait(mut self) -> Result<Completion, String> {
        let mut tokens = Vec::new();
        let mut text = String::new();
        while let Some(event) = self.blocking_next() {
            match event {
                Event::Token { sampled, text: t } => {
                    tokens.push(sampled);
                    text.push_str(&t);
                }
                Event::Finished {
                    text: t,
                    reason,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    text.push_str(&t);
                    return Ok(Completion {
                        tokens,
                        text,
                        finish_reason: reason,
                        prompt_tokens,
                        completion_tokens,
                    });
                }
                Event::Error { message, .. } => return Err(message),
            }
        }
        Err("the engine stopped before the generation finished".into())
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// The text of a caught panic's payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

struct ChannelLoader {
    tx: mpsc::Sender<AdapterKey>,
}

impl AdapterLoader for ChannelLoader {
    fn request(&mut self, key: AdapterKey) {
        let _ = self.tx.send(key);
    }
}

/// The adapter loader: reads, checks, shards and places adapters, then mails them back.
fn spawn_loader(
    config: ModelConfig,
    devices: Vec<Device>,
    kind: Kind,
    reply: mpsc::Sender<Command>,
) -> ChannelLoader {
    let (tx, rx) = mpsc::channel::<AdapterKey>();
    std::thread::Builder::new()
        .name("tessera-adapter-loader".into())
        .spawn(move || {
            let _guard = tch::no_grad_guard();
            for key in rx {
                let started = std::time::Instant::now();
                // A panic inside tch must not kill the loader: the sequences waiting for this
                // adapter would never hear back.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    LoraAdapter::load(&key.path, &config)
                        .map(|a| Arc::new(a.place(&devices, kind)))
                        .map_err(|e| e.to_string())
                }))
                .unwrap_or_else(|panic| {
                    let what = panic_message(panic.as_ref());
                    Err(format!("adapter {}: loading failed: {what}", key.path.display()))
                });
                match &result {
                    Ok(a) => tracing::info!(
                        adapter = %key.path.display(),
                        rank = a.rank,
                        bytes = a.bytes,
                        ms = started.elapsed().as_secs_f64() * 1e3,
                        "adapter loaded"
                    ),
                    Err(e) => tracing::warn!(adapter = %key.path.display(), error = %e, "adapter failed to load"),
                }
                if reply.send(Command::AdapterLoaded(key, result)).is_err() {
                    break;
                }
            }
        })
        .expect("spawn adapter loader");
    ChannelLoader { tx }
}

fn run(
    mut scheduler: Scheduler,
    rx: mpsc::Receiver<Command>,
    mut loader: ChannelLoader,
    stats: Arc<Mutex<SchedulerStats>>,
    step_delay: Option<std::time::Duration>,
) {
    let _guard = tch::no_grad_guard();
    // Returns false on shutdown.
    let handle = |scheduler: &mut Scheduler, cmd: Command| match cmd {
        Command::Submit(w) => {
            scheduler.submit(*w);
            true
        }
        Command::AdapterLoaded(key, result) => {
            scheduler.adapter_loaded(key, result);
            true
        }
        Command::FailNextStep => {
            scheduler.fail_next_step();
            true
        }
        Command::Die => panic!("test hook: the engine thread dies"),
        Command::Shutdown => false,
    };
    loop {
        if !scheduler.has_work() {
            *stats.lock().expect("stats") = scheduler.stats();
            match rx.recv() {
                Ok(cmd) => {
                    if !handle(&mut scheduler, cmd) {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(cmd) => {
                    if !handle(&mut scheduler, cmd) {
                        return;
                    }
                }
                Err(mpsc::TryRecvError::Disconnected) => return,
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
        scheduler.step(&mut loader);
        *stats.lock().expect("stats") = scheduler.stats();
        if let Some(delay) = step_delay {
            std::thread::sleep(delay);
        }
    }
}
