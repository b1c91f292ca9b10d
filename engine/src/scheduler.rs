//! Continuous batching (iteration-level scheduling, as in Orca and vLLM). Each [`Scheduler::step`]:
//!
//! 1. drops cancelled sequences wherever they are, freeing their KV slots at once;
//! 2. admits waiting sequences in arrival order while a slot is free and their worst-case KV need
//!    (`prompt + max_tokens`) fits the token budget (no preemption is ever needed); one whose
//!    adapter is not loaded yet waits aside while the loader thread reads it, so nobody stalls.
//!    An admitted sequence copies the longest cached prefix of its prompt into its slot
//!    (`prefix_cache.rs`) and prefills only the rest;
//! 3. packs one forward ([`StepBatch`]): a token for every decoding sequence plus prompt chunks
//!    of prefilling ones, at most `prefill_token_budget` prompt tokens per step, so the running
//!    batch never stalls longer than that. Each row's adapter is a column range of a LoRA bank
//!    kept across steps;
//! 4. samples every row that needs a token on the device in one batched call and streams it;
//!    finished sequences leave at once and their slot is free for the next step. Rows under a
//!    grammar (structured outputs) sample within the mask of tokens it allows, computed on a
//!    helper thread while the forward runs.

use std::collections::{HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tch::Tensor;

use llguidance::toktrie::SimpleVob;

use crate::adapter_cache::AdapterCache;
use crate::batch_size::{BatchSizing, Calibration};
use crate::constraint::GrammarState;
use crate::kv_cache::{KvCache, SlotAllocator};
use crate::lora::{AdapterKey, PlacedAdapter};
use crate::lora_bank::LoraBank;
use crate::model::Model;
use crate::prefix_cache::{AdapterTag, PrefixCache};
use crate::sampling::{sample_batch, RowSampling};
use crate::sequence::{FailKind, FinishReason, Progress, Sequence};
use crate::step::{LogitRows, Segment, StepBatch};
use crate::tokenizer::Tokenizer;

/// Limits of one engine's batch.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// The batch's size, or with `auto_batch_size` its upper bound ([`Scheduler::size_batch`]).
    pub max_batch_size: usize,
    pub auto_batch_size: bool,
    /// The longest decode step `auto_batch_size` allows.
    pub max_step: std::time::Duration,
    pub max_kv_tokens: i64,
    pub prefill_token_budget: usize,
    pub adapter_cache_size: usize,
    pub adapter_cache_bytes: u64,
    /// Tokens of prompt prefixes kept for reuse (0 turns the prefix cache off).
    pub prefix_cache_tokens: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 32,
            auto_batch_size: false,
            max_step: std::time::Duration::from_millis(100),
            max_kv_tokens: 65536,
            prefill_token_budget: 512,
            adapter_cache_size: 16,
            adapter_cache_bytes: 1 << 30,
            prefix_cache_tokens: 4096,
        }
    }
}

/// A sequence waiting to be admitted, with the adapter version it asked for.
pub(crate) struct Waiting {
    pub seq: Sequence,
    pub adapter: Option<AdapterKey>,
}

/// An admitted sequence and the KV slot it owns until it leaves.
struct Active {
    seq: Sequence,
    slot: i64,
}

impl Active {
    fn prefilling(&self) -> bool {
        (self.seq.cached as usize) < self.seq.prefill_len()
    }
}

/// A snapshot of the scheduler, for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// The most sequences decoded together (`max_batch_size`, or what `auto_batch_size` chose).
    pub batch_size: usize,
    pub waiting: usize,
    pub prefilling: usize,
    pub running: usize,
    pub kv_reserved_tokens: i64,
    pub kv_cache_rows: i64,
    pub adapters_loaded: usize,
    pub adapter_hits: u64,
    pub adapter_misses: u64,
    pub adapter_loads: u64,
    pub decode_steps: u64,
    pub generated_tokens: u64,
    /// Prompt tokens looked up in the prefix cache, and those found there.
    pub prefix_queried_tokens: u64,
    pub prefix_hit_tokens: u64,
    pub prefix_cached_blocks: usize,
    /// Steps that failed (a panic inside the model); their sequences got an error.
    pub failed_steps: u64,
    /// Where the steps' time went, summed over all steps.
    pub time: StepTimes,
}

/// Wall time of the scheduler's steps by phase, in nanoseconds, summed over all steps. On a
/// GPU the forward is asynchronous: its time lands in `sample`, where the first copy to the host
/// waits for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepTimes {
    /// Admission, prefix-cache copies, packing the step and the LoRA view.
    pub build_ns: u64,
    /// The forward (all layers, logits), attention included.
    pub forward_ns: u64,
    /// Attention alone (KV writes, SDPA, output gather), inside `forward_ns`.
    pub attention_ns: u64,
    /// Batched sampling and the copy of ids and log-probabilities to the host.
    pub sample_ns: u64,
    /// Streaming tokens, stop checks, retiring and prefix-cache inserts.
    pub stream_ns: u64,
    /// Grammar masks of structured outputs (computed on a helper thread while the forward runs:
    /// overlapping `forward_ns`, not part of it).
    pub mask_ns: u64,
    /// Grammar masks computed.
    pub masks: u64,
}

pub(crate) struct Scheduler {
    model: Model,
    tokenizer: Arc<Tokenizer>,
    config: SchedulerConfig,
    waiting: VecDeque<Waiting>,
    awaiting_adapter: Vec<Waiting>,
    loads_in_flight: HashSet<AdapterKey>,
    /// Admitted sequences, in admission order (prefill chunks go in this order).
    active: Vec<Active>,
    cache: KvCache,
    slots: SlotAllocator,
    prefix: Option<PrefixCache>,
    reserved: i64,
    adapters: AdapterCache,
    /// The adapters of recent steps, stacked; rebuilt only when a step needs one it lacks.
    bank: Option<LoraBank>,
    /// Sequences submitted but not admitted yet (shared with the submitting side for 503s).
    queued: Arc<AtomicUsize>,
    decode_steps: u64,
    generated_tokens: u64,
    failed_steps: u64,
    /// Tests: the next step panics.
    fail_next: bool,
    time: StepTimes,
}

/// What the scheduler asks of the outside world.
pub(crate) trait AdapterLoader {
    fn request(&mut self, key: AdapterKey);
}

fn adapter_tag(seq: &Sequence) -> AdapterTag {
    seq.adapter.as_ref().map(|a| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        a.key.hash(&mut h);
        h.finish()
    })
}

impl Scheduler {
    pub fn new(
        model: Model,
        tokenizer: Arc<Tokenizer>,
        config: SchedulerConfig,
        queued: Arc<AtomicUsize>,
    ) -> Self {
        let slots = config.max_batch_size.max(1);
        let cache = model.new_cache(slots as i64, 0);
        let prefix = (config.prefix_cache_tokens > 0).then(|| {
            PrefixCache::new(
                cache.layouts(),
                model.config().num_hidden_layers,
                config.prefix_cache_tokens,
                model.config().head_dim as i64,
                model.kind(),
            )
        });
        let adapters = AdapterCache::new(config.adapter_cache_size, config.adapter_cache_bytes);
        Self {
            model,
            tokenizer,
            config,
            waiting: VecDeque::new(),
            awaiting_adapter: Vec::new(),
            loads_in_flight: HashSet::new(),
            active: Vec::new(),
            cache,
            slots: SlotAllocator::new(slots),
            prefix,
            reserved: 0,
            adapters,
            bank: None,
            queued,
            decode_steps: 0,
            generated_tokens: 0,
            failed_steps: 0,
            fail_next: false,
            time: StepTimes::default(),
        }
    }

    pub fn submit(&mut self, waiting: Waiting) {
        self.waiting.push_back(waiting);
    }

    /// Whether a step would do anything (otherwise the engine may block on its mailbox).
    pub fn has_work(&self) -> bool {
        !self.active.is_empty() || !self.waiting.is_empty()
    }

    /// With `auto_batch_size`, chooses the batch's size from measured decode steps
    /// ([`BatchSizing`]) and runs at most that many sequences from now on. Run on the engine's
    /// thread (its torch threads) before any sequence.
    pub fn size_batch(&mut self) -> Option<Calibration> {
        if !self.config.auto_batch_size {
            return None;
        }
        let sizing = BatchSizing {
            cap: self.config.max_batch_size,
            max_step: self.config.max_step,
            max_kv_tokens: self.config.max_kv_tokens,
        };
        let calibration = match sizing.candidates().as_slice() {
            [only] => Calibration {
                chosen: *only,
                steps: Vec::new(),
                why: "no other size to measure".into(),
            },
            _ => sizing.calibrate(&self.model),
        };
        let n = calibration.chosen;
        self.config.max_batch_size = n;
        self.slots = SlotAllocator::new(n);
        self.cache = self.model.new_cache(n as i64, 0);
        let steps: Vec<String> = calibration
            .steps
            .iter()
            .map(|(n, t)| format!("{n}: {:.1} ms", t.as_secs_f64() * 1e3))
            .collect();
        tracing::info!(
            batch_size = n,
            steps = %steps.join(", "),
            why = %calibration.why,
            "decode batch size chosen from measured steps"
        );
        Some(calibration)
    }

    pub fn stats(&self) -> SchedulerStats {
        let prefilling = self.active.iter().filter(|a| a.prefilling()).count();
        let prefix = self
            .prefix
            .as_ref()
            .map(PrefixCache::stats)
            .unwrap_or_default();
        SchedulerStats {
            batch_size: self.config.max_batch_size,
            waiting: self.waiting.len() + self.awaiting_adapter.len(),
            prefilling,
            running: self.active.len() - prefilling,
            kv_reserved_tokens: self.reserved,
            kv_cache_rows: self.slots.in_use() as i64,
            adapters_loaded: self.adapters.len(),
            adapter_hits: self.adapters.hits,
            adapter_misses: self.adapters.misses,
            adapter_loads: self.adapters.loads,
            decode_steps: self.decode_steps,
            generated_tokens: self.generated_tokens,
            prefix_queried_tokens: prefix.queried_tokens,
            prefix_hit_tokens: prefix.hit_tokens,
            prefix_cached_blocks: prefix.blocks,
            failed_steps: self.failed_steps,
            time: StepTimes {
                attention_ns: self.model.attention_ns(),
                ..self.time
            },
        }
    }

    /// An adapter finished loading (or failed): its waiting sequences go back to the queue's head.
    pub fn adapter_loaded(&mut self, key: AdapterKey, result: Result<Arc<PlacedAdapter>, String>) {
        self.loads_in_flight.remove(&key);
        let (mine, others): (Vec<_>, Vec<_>) = std::mem::take(&mut self.awaiting_adapter)
            .into_iter()
            .partition(|w| w.adapter.as_ref() == Some(&key));
        self.awaiting_adapter = others;
        match result {
            Ok(adapter) => {
                self.adapters.insert(adapter.clone());
                for mut w in mine.into_iter().rev() {
                    w.seq.adapter = Some(adapter.clone());
                    w.adapter = None;
                    self.waiting.push_front(w);
                }
            }
            Err(message) => {
                for w in mine {
                    self.queued.fetch_sub(1, Ordering::Relaxed);
                    w.seq.fail(FailKind::Adapter, message.clone());
                }
            }
        }
    }

    /// One iteration: cancel, admit, one packed forward, sample.
    pub fn step(&mut self, loader: &mut dyn AdapterLoader) {
        let started = Instant::now();
        self.drop_cancelled();
        self.admit(loader);
        self.time.build_ns += elapsed_ns(started);
        if self.active.is_empty() {
            return;
        }
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_step()));
        if let Err(panic) = result {
            self.step_failed(&crate::engine::panic_message(panic.as_ref()));
        }
    }

    /// A step panicked inside the model: every sequence that took part gets an error and leaves
    /// (their KV slots may hold partial writes); waiting sequences are untouched and the engine
    /// goes on with the next step.
    fn step_failed(&mut self, what: &str) {
        self.failed_steps += 1;
        tracing::error!(error = %what, sequences = self.active.len(), "engine step failed; its sequences are failed, the engine continues");
        self.bank = None;
        for a in std::mem::take(&mut self.active) {
            a.seq.fail(
                FailKind::Engine,
                format!("the engine failed while running this request: {what}"),
            );
            self.slots.free(a.slot);
            self.reserved -= a.seq.reserved_tokens();
        }
    }

    fn drop_cancelled(&mut self) {
        let tokenizer = self.tokenizer.clone();
        let queued = &self.queued;
        let keep_live = |w: &mut Waiting| {
            let keep = !w.seq.is_cancelled();
            if !keep {
                w.seq.finish(FinishReason::Cancelled, &tokenizer);
                queued.fetch_sub(1, Ordering::Relaxed);
            }
            keep
        };
        self.waiting.retain_mut(keep_live);
        self.awaiting_adapter.retain_mut(keep_live);
        let cancelled: Vec<usize> = (0..self.active.len())
            .filter(|&i| self.active[i].seq.is_cancelled())
            .collect();
        for i in cancelled.into_iter().rev() {
            self.retire(i, FinishReason::Cancelled);
        }
    }

    fn admit(&mut self, loader: &mut dyn AdapterLoader) {
        while let Some(front) = self.waiting.front_mut() {
            if self.active.len() >= self.config.max_batch_size {
                break;
            }
            if let Some(key) = front.adapter.clone() {
                match self.adapters.get(&key) {
                    Some(adapter) => {
                        front.seq.adapter = Some(adapter);
                        front.adapter = None;
                    }
                    None => {
                        let w = self.waiting.pop_front().expect("front exists");
                        if self.loads_in_flight.insert(key.clone()) {
                            loader.request(key);
                        }
                        self.awaiting_adapter.push(w);
                        continue;
                    }
                }
            }
            let need = front.seq.reserved_tokens();
            if self.reserved + need > self.config.max_kv_tokens {
                break;
            }
            let Some(slot) = self.slots.take() else {
                break;
            };
            let mut w = self.waiting.pop_front().expect("front exists");
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.reserved += need;
            if let Some(prefix) = &mut self.prefix {
                let tag = adapter_tag(&w.seq);
                let hit = prefix.load_into(tag, &w.seq.prefill_tokens(), &mut self.cache, slot);
                w.seq.cached = hit as i64;
            }
            self.active.push(Active { seq: w.seq, slot });
        }
    }

    pub fn fail_next_step(&mut self) {
        self.fail_next = true;
    }

    /// Builds the step, runs the forward, samples and streams.
    fn run_step(&mut self) {
        if std::mem::take(&mut self.fail_next) {
            panic!("injected step failure");
        }
        let started = Instant::now();
        // Decode rows first, in slot order (dense slots need no scatter); then prompt chunks in
        // admission order within the budget.
        let mut decode: Vec<usize> = (0..self.active.len())
            .filter(|&i| !self.active[i].prefilling())
            .collect();
        decode.sort_by_key(|&i| self.active[i].slot);
        let mut order: Vec<(usize, i64)> = decode.iter().map(|&i| (i, 1)).collect();
        let mut budget = self.config.prefill_token_budget.max(1);
        for (i, a) in self.active.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if a.prefilling() {
                let left = a.seq.prefill_len() - a.seq.cached as usize;
                let chunk = left.min(budget);
                budget -= chunk;
                order.push((i, chunk as i64));
            }
        }
        let mut tokens = Vec::new();
        let mut segments = Vec::with_capacity(order.len());
        for &(i, len) in &order {
            let a = &self.active[i];
            let start = a.seq.cached;
            if a.prefilling() {
                let from = start as usize;
                tokens
                    .extend((from..from + len as usize).map(|t| i64::from(a.seq.prefill_token(t))));
            } else {
                tokens.push(i64::from(a.seq.last_token()));
            }
            segments.push(Segment {
                slot: a.slot,
                start,
                len,
            });
        }
        let step = StepBatch::new(tokens, segments, LogitRows::Last);
        let lora = self.step_lora(&order);
        // The grammars of rows that get a token this step: their masks are computed on a helper
        // thread while the forward runs.
        let mut grammars: Vec<(usize, GrammarState)> = Vec::new();
        for &(i, len) in &order {
            let a = &mut self.active[i];
            if a.seq.cached + len >= a.seq.prefill_len() as i64 {
                if let Some(g) = a.seq.grammar.take() {
                    grammars.push((i, g));
                }
            }
        }
        self.time.build_ns += elapsed_ns(started);
        let started = Instant::now();
        let (model, cache) = (&mut self.model, &mut self.cache);
        let (logits, masks) = std::thread::scope(|scope| {
            let masking = (!grammars.is_empty()).then(|| {
                scope.spawn(|| {
                    let started = Instant::now();
                    let masks: Vec<Result<SimpleVob, String>> =
                        grammars.iter_mut().map(|(_, g)| g.allowed()).collect();
                    (masks, elapsed_ns(started))
                })
            });
            let logits = model.forward_step(&step, cache, lora.as_ref());
            let masks = masking.map(|h| match h.join() {
                Ok(masks) => masks,
                Err(panic) => std::panic::resume_unwind(panic),
            });
            (logits, masks)
        });
        self.time.forward_ns += elapsed_ns(started);
        let mut masks_of: Vec<Option<Result<SimpleVob, String>>> =
            (0..self.active.len()).map(|_| None).collect();
        if let Some((masks, ns)) = masks {
            self.time.mask_ns += ns;
            self.time.masks += masks.len() as u64;
            for ((i, g), mask) in grammars.into_iter().zip(masks) {
                self.active[i].seq.grammar = Some(g);
                masks_of[i] = Some(mask);
            }
        }
        let started = Instant::now();
        self.decode_steps += 1;

        // Rows that produce a token: decode rows and chunks that end their prompt.
        let mut rows = Vec::new();
        for (n, &(i, len)) in order.iter().enumerate() {
            let a = &mut self.active[i];
            a.seq.cached += len;
            if !a.prefilling() {
                rows.push((n as i64, i));
            }
        }
        if rows.is_empty() {
            return;
        }
        // Sample in sequence order, so the samplers can be borrowed in one pass.
        rows.sort_by_key(|&(_, i)| i);
        let at: Vec<i64> = rows.iter().map(|(n, _)| *n).collect();
        let logits =
            if at.len() == order.len() && at.iter().enumerate().all(|(k, &n)| n == k as i64) {
                logits
            } else {
                logits.index_select(0, &Tensor::from_slice(&at).to_device(logits.device()))
            };
        let histories: Vec<Vec<u32>> = rows
            .iter()
            .map(|&(_, i)| self.active[i].seq.penalty_history())
            .collect();
        let sampled = {
            let mut wanted = vec![false; self.active.len()];
            for &(_, i) in &rows {
                wanted[i] = true;
            }
            let mut batch: Vec<RowSampling> = self
                .active
                .iter_mut()
                .zip(&masks_of)
                .zip(&wanted)
                .filter(|(_, w)| **w)
                .zip(&histories)
                .map(|(((a, mask), _), history)| {
                    let seq = &mut a.seq;
                    let banned: &[u32] = if seq.generated.len() < seq.sampler.params().min_tokens {
                        &seq.stop_ids
                    } else {
                        &[]
                    };
                    RowSampling {
                        history,
                        output: &seq.generated,
                        banned,
                        allowed: mask
                            .as_ref()
                            .and_then(|m| m.as_ref().ok())
                            .map(|m| m.as_slice()),
                        sampler: &mut seq.sampler,
                    }
                })
                .collect();
            sample_batch(&logits, &mut batch)
        };
        self.time.sample_ns += elapsed_ns(started);
        let started = Instant::now();
        let mut finished = Vec::new();
        for (&(_, i), s) in rows.iter().zip(sampled) {
            self.generated_tokens += 1;
            if let Some(Err(e)) = masks_of[i].take() {
                finished.push((i, Err(format!("structured output: {e}"))));
                continue;
            }
            let a = &mut self.active[i];
            let first = a.seq.generated.len() == a.seq.resumed;
            match a.seq.accept(s, &self.tokenizer) {
                Progress::Continue => {
                    if first {
                        self.cache_prefix(i);
                    }
                }
                Progress::Finished(reason) => finished.push((i, Ok(reason))),
                Progress::Failed(e) => finished.push((i, Err(e))),
            }
        }
        finished.sort_by_key(|&(i, _)| std::cmp::Reverse(i));
        for (i, end) in finished {
            match end {
                Ok(reason) => self.retire(i, reason),
                Err(message) => self.fail(i, message),
            }
        }
        self.time.stream_ns += elapsed_ns(started);
    }

    /// Adds the keys/values in sequence `i`'s slot to the prefix cache.
    fn cache_prefix(&mut self, i: usize) {
        if let Some(prefix) = &mut self.prefix {
            let a = &self.active[i];
            let tag = adapter_tag(&a.seq);
            prefix.insert_from(tag, &a.seq.cached_tokens(), &mut self.cache, a.slot);
        }
    }

    /// The LoRA view of a step whose rows are `order` (sequence index, tokens), keeping the bank
    /// of adapters unless a row needs one it lacks (or it holds twice the rank in use).
    fn step_lora(&mut self, order: &[(usize, i64)]) -> Option<crate::lora::LoraBatch> {
        let mut used: Vec<Arc<PlacedAdapter>> = Vec::new();
        for &(i, _) in order {
            if let Some(a) = &self.active[i].seq.adapter {
                if !used.iter().any(|u| u.key == a.key) {
                    used.push(a.clone());
                }
            }
        }
        if used.is_empty() {
            return None;
        }
        let used_rank: i64 = used.iter().map(|a| a.rank).sum();
        let fits = self.bank.as_ref().is_some_and(|b| {
            used.iter().all(|a| b.index_of(&a.key).is_some()) && b.total_rank() <= 2 * used_rank
        });
        if !fits {
            self.bank = Some(LoraBank::new(
                used,
                self.model.config().num_hidden_layers,
                self.model.tensor_parallel(),
            ));
        }
        let bank = self.bank.as_ref().expect("bank built");
        let mut rows = Vec::new();
        for &(i, len) in order {
            let slot = self.active[i].seq.adapter.as_ref().map(|a| {
                bank.index_of(&a.key)
                    .expect("bank holds every used adapter")
            });
            rows.extend(std::iter::repeat_n(slot, len as usize));
        }
        bank.batch(&rows, &self.model.devices(), self.model.kind())
    }

    /// Fails sequence `i` (its grammar cannot go on: an error event, no finish) and frees its
    /// slot.
    fn fail(&mut self, i: usize, message: String) {
        let a = self.active.remove(i);
        tracing::warn!(sequence = a.seq.id, error = %message, "sequence failed");
        a.seq.fail(FailKind::Grammar, message);
        self.slots.free(a.slot);
        self.reserved -= a.seq.reserved_tokens();
    }

    /// Finishes sequence `i` and frees its slot (after offering its keys/values to the prefix
    /// cache when it ended normally).
    fn retire(&mut self, i: usize, reason: FinishReason) {
        if reason != FinishReason::Cancelled && !self.active[i].prefilling() {
            self.cache_prefix(i);
        }
        let mut a = self.active.remove(i);
        a.seq.finish(reason, &self.tokenizer);
        self.slots.free(a.slot);
        self.reserved -= a.seq.reserved_tokens();
        tracing::debug!(
            sequence = a.seq.id,
            tokens = a.seq.generated.len(),
            "sequence left the batch"
        );
    }
}

fn elapsed_ns(since: Instant) -> u64 {
    since.elapsed().as_nanos() as u64
}
