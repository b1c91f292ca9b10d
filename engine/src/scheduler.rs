//! Continuous batching (iteration-level scheduling, as in Orca and vLLM). Each [`Scheduler::step`]:
//!
//! 1. drops cancelled sequences wherever they are, freeing their cache rows at once;
//! 2. admits waiting sequences in arrival order while the batch has room and their worst-case KV
//!    need (`prompt + max_tokens`) fits the token budget (no preemption is ever needed); one whose
//!    adapter is not loaded yet waits aside while the loader thread reads it, so nobody stalls;
//! 3. prefills admitted prompts in chunks, at most `prefill_token_budget` tokens per step, so the
//!    running batch never stalls longer than that; a finished prefill joins the batch;
//! 4. runs one decode step for the whole running batch (each row with its own adapter or none)
//!    and retires finished rows, keeping the rows packed.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use crate::adapter_cache::AdapterCache;
use crate::kv_cache::KvCache;
use crate::lora::{AdapterKey, LoraBatch, PlacedAdapter};
use crate::model::{Llama, Logits};
use crate::sequence::{FinishReason, Progress, Sequence};
use crate::tokenizer::Tokenizer;

/// Limits of one engine's batch.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_batch_size: usize,
    pub max_kv_tokens: i64,
    pub prefill_token_budget: usize,
    pub adapter_cache_size: usize,
    pub adapter_cache_bytes: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch_size: 32,
            max_kv_tokens: 65536,
            prefill_token_budget: 512,
            adapter_cache_size: 16,
            adapter_cache_bytes: 1 << 30,
        }
    }
}

/// A sequence waiting to be admitted, with the adapter version it asked for.
pub(crate) struct Waiting {
    pub seq: Sequence,
    pub adapter: Option<AdapterKey>,
}

struct Prefill {
    seq: Sequence,
    cache: KvCache,
    done: usize,
}

/// A snapshot of the scheduler, for metrics and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedulerStats {
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
}

pub(crate) struct Scheduler {
    model: Llama,
    tokenizer: Arc<Tokenizer>,
    config: SchedulerConfig,
    waiting: VecDeque<Waiting>,
    awaiting_adapter: Vec<Waiting>,
    loads_in_flight: HashSet<AdapterKey>,
    prefilling: VecDeque<Prefill>,
    /// Row `i` of `cache` belongs to `running[i]`.
    running: Vec<Sequence>,
    cache: KvCache,
    reserved: i64,
    adapters: AdapterCache,
    /// The LoRA view of the running batch, rebuilt only when its adapter rows change.
    decode_lora: Option<(Vec<Option<AdapterKey>>, Option<LoraBatch>)>,
    /// Sequences submitted but not admitted yet (shared with the submitting side for 503s).
    queued: Arc<AtomicUsize>,
    decode_steps: u64,
    generated_tokens: u64,
}

/// What the scheduler asks of the outside world.
pub(crate) trait AdapterLoader {
    fn request(&mut self, key: AdapterKey);
}

impl Scheduler {
    pub fn new(
        model: Llama,
        tokenizer: Arc<Tokenizer>,
        config: SchedulerConfig,
        queued: Arc<AtomicUsize>,
    ) -> Self {
        let cache = model.new_cache(0, 0);
        let adapters = AdapterCache::new(config.adapter_cache_size, config.adapter_cache_bytes);
        Self {
            model,
            tokenizer,
            config,
            waiting: VecDeque::new(),
            awaiting_adapter: Vec::new(),
            loads_in_flight: HashSet::new(),
            prefilling: VecDeque::new(),
            running: Vec::new(),
            cache,
            reserved: 0,
            adapters,
            decode_lora: None,
            queued,
            decode_steps: 0,
            generated_tokens: 0,
        }
    }

    pub fn submit(&mut self, waiting: Waiting) {
        self.waiting.push_back(waiting);
    }

    /// Whether a step would do anything (otherwise the engine may block on its mailbox).
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.prefilling.is_empty() || !self.waiting.is_empty()
    }

    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            waiting: self.waiting.len() + self.awaiting_adapter.len(),
            prefilling: self.prefilling.len(),
            running: self.running.len(),
            kv_reserved_tokens: self.reserved,
            kv_cache_rows: self.cache.rows(),
            adapters_loaded: self.adapters.len(),
            adapter_hits: self.adapters.hits,
            adapter_misses: self.adapters.misses,
            adapter_loads: self.adapters.loads,
            decode_steps: self.decode_steps,
            generated_tokens: self.generated_tokens,
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
                    w.seq.fail(message.clone());
                }
            }
        }
    }

    /// One iteration: cancel, admit, prefill within budget, decode the batch.
    pub fn step(&mut self, loader: &mut dyn AdapterLoader) {
        self.drop_cancelled();
        self.admit(loader);
        self.prefill();
        self.decode();
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
        let mut released = 0;
        self.prefilling.retain_mut(|p| {
            let keep = !p.seq.is_cancelled();
            if !keep {
                p.seq.finish(FinishReason::Cancelled, &tokenizer);
                released += p.seq.reserved_tokens();
            }
            keep
        });
        self.reserved -= released;
        let cancelled: Vec<usize> = (0..self.running.len())
            .filter(|&i| self.running[i].is_cancelled())
            .collect();
        self.retire(cancelled, FinishReason::Cancelled);
    }

    fn admit(&mut self, loader: &mut dyn AdapterLoader) {
        while let Some(front) = self.waiting.front_mut() {
            if self.running.len() + self.prefilling.len() >= self.config.max_batch_size {
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
            let w = self.waiting.pop_front().expect("front exists");
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.reserved += need;
            let cache = self.model.new_cache(1, w.seq.prompt.len() as i64);
            self.prefilling.push_back(Prefill {
                seq: w.seq,
                cache,
                done: 0,
            });
        }
    }

    fn prefill(&mut self) {
        let mut budget = self.config.prefill_token_budget;
        while budget > 0 {
            let Some(p) = self.prefilling.front_mut() else {
                break;
            };
            let total = p.seq.prompt.len();
            let chunk = (total - p.done).min(budget);
            let ids: Vec<i64> = p.seq.prompt[p.done..p.done + chunk]
                .iter()
                .map(|&t| i64::from(t))
                .collect();
            let tokens = Tensor::from_slice(&ids).view([1, chunk as i64]);
            let lora = p.seq.adapter.as_ref().and_then(|a| {
                LoraBatch::new(
                    std::slice::from_ref(a),
                    &[Some(0)],
                    self.model.config().num_hidden_layers,
                    &self.model.devices(),
                    self.model.kind(),
                )
            });
            let logits = self.model.forward(
                &tokens,
                &[p.done as i64],
                &mut p.cache,
                lora.as_ref(),
                Logits::Last,
            );
            p.done += chunk;
            budget -= chunk;
            if p.done < total {
                continue;
            }
            let mut p = self.prefilling.pop_front().expect("front exists");
            p.seq.cached = total as i64;
            let row = self.running.len() as i64;
            self.cache.copy_row_from(&p.cache, row, total as i64);
            let logits = logits_rows(&logits);
            self.generated_tokens += 1;
            match p.seq.accept(&logits[0], &self.tokenizer) {
                Progress::Continue => self.running.push(p.seq),
                Progress::Finished(reason) => {
                    p.seq.finish(reason, &self.tokenizer);
                    self.reserved -= p.seq.reserved_tokens();
                }
            }
        }
    }

    fn decode(&mut self) {
        if self.running.is_empty() {
            return;
        }
        let ids: Vec<i64> = self
            .running
            .iter()
            .map(|s| i64::from(s.last_token()))
            .collect();
        let starts: Vec<i64> = self.running.iter().map(|s| s.cached).collect();
        let tokens = Tensor::from_slice(&ids).view([ids.len() as i64, 1]);
        self.refresh_decode_lora();
        let lora = self.decode_lora.as_ref().and_then(|(_, l)| l.as_ref());
        let logits = self
            .model
            .forward(&tokens, &starts, &mut self.cache, lora, Logits::Last);
        let rows = logits_rows(&logits);
        self.decode_steps += 1;
        let mut finished = Vec::new();
        for (i, (seq, row)) in self.running.iter_mut().zip(&rows).enumerate() {
            seq.cached += 1;
            self.generated_tokens += 1;
            if let Progress::Finished(reason) = seq.accept(row, &self.tokenizer) {
                finished.push((i, reason));
            }
        }
        for (i, reason) in finished.into_iter().rev() {
            self.running[i].finish(reason, &self.tokenizer);
            self.remove_row(i);
        }
    }

    /// Finishes the given rows (ascending indices) and removes them.
    fn retire(&mut self, rows: Vec<usize>, reason: FinishReason) {
        for i in rows.into_iter().rev() {
            self.running[i].finish(reason, &self.tokenizer);
            self.remove_row(i);
        }
    }

    /// Frees row `i`: the last row moves into its place so rows stay packed.
    fn remove_row(&mut self, i: usize) {
        let last = self.running.len() - 1;
        if i != last {
            let len = self.running[last].cached;
            self.cache.move_row(last as i64, i as i64, len);
        }
        let seq = self.running.swap_remove(i);
        self.reserved -= seq.reserved_tokens();
        tracing::debug!(
            sequence = seq.id,
            tokens = seq.generated.len(),
            "sequence left the batch"
        );
    }

    fn refresh_decode_lora(&mut self) {
        let keys: Vec<Option<AdapterKey>> = self
            .running
            .iter()
            .map(|s| s.adapter.as_ref().map(|a| a.key.clone()))
            .collect();
        if matches!(&self.decode_lora, Some((k, _)) if *k == keys) {
            return;
        }
        let mut adapters: Vec<Arc<PlacedAdapter>> = Vec::new();
        let rows: Vec<Option<usize>> = self
            .running
            .iter()
            .map(|s| {
                s.adapter
                    .as_ref()
                    .map(|a| match adapters.iter().position(|b| b.key == a.key) {
                        Some(i) => i,
                        None => {
                            adapters.push(a.clone());
                            adapters.len() - 1
                        }
                    })
            })
            .collect();
        let batch = LoraBatch::new(
            &adapters,
            &rows,
            self.model.config().num_hidden_layers,
            &self.model.devices(),
            self.model.kind(),
        );
        self.decode_lora = Some((keys, batch));
    }
}

/// `[rows, 1, vocab]` logits → one float32 vector per row, on the CPU.
fn logits_rows(logits: &Tensor) -> Vec<Vec<f32>> {
    let (rows, _, vocab) = logits.size3().expect("logits are [rows, 1, vocab]");
    let flat: Vec<f32> = logits
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .reshape([-1])
        .try_into()
        .expect("float logits");
    (0..rows as usize)
        .map(|r| flat[r * vocab as usize..(r + 1) * vocab as usize].to_vec())
        .collect()
}
