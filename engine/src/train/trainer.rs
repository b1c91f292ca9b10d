//! The LoRA SFT loop: frozen base, trainable LoRA (float32), AdamW on LoRA only, warmup and decay,
//! gradient accumulation normalised by the supervised tokens of the whole accumulated batch,
//! global-norm clipping, optional recomputation of decoder layers in backward (gradient
//! checkpointing), progress on every step, cancellation between steps, atomic checkpoints and exact
//! resume. Randomness (data order, dropout) is a function of the seed, the step and the layer, so a
//! resumed run repeats the uninterrupted one.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Reduction, Tensor};

use crate::linear::Linear;
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use crate::train::checkpoint::{self, Fence, TrainerState};
pub use crate::train::checkpoint::{checkpoint_step, latest_checkpoint};
use crate::train::dataset::{self, DatasetError, Example};
use crate::train::hyperparams::{HyperparameterError, TrainJob, MAX_TOTAL_STEPS};
use crate::train::lora_params::LoraParams;
use crate::train::optimizer::{learning_rate, AdamW};

/// What a trainer reports after every optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: usize,
    pub loss: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub eta_s: f64,
    pub eval_loss: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    pub final_loss: f64,
    pub eval_loss: Option<f64>,
    pub steps: usize,
    pub tokens: u64,
    pub elapsed_s: f64,
    pub examples: usize,
    pub truncated: usize,
    pub skipped_lines: Vec<usize>,
    pub resumed_from_step: Option<usize>,
    pub hyperparameters: crate::train::hyperparams::Hyperparameters,
    pub base_model: String,
}

#[derive(Debug)]
pub enum TrainOutcome {
    Completed(Box<TrainSummary>),
    /// Stopped by the cancel flag; the latest checkpoint (if any) is intact.
    Cancelled {
        step: usize,
        last_checkpoint: Option<PathBuf>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    Hyperparameter(#[from] HyperparameterError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("training runs on one device; this model is split over {0} (tensor parallel)")]
    TensorParallel(usize),
    #[error("tensor error: {0}")]
    Tensor(#[from] tch::TchError),
    /// A newer attempt of the same job owns the output path: this run stopped without writing.
    #[error("attempt {attempt} of this job is superseded ({why}); stopped without writing")]
    Superseded { attempt: u32, why: String },
    /// The run diverged: the step's loss or gradient norm is NaN or infinite (a learning rate or
    /// `lora_alpha` too large for the data, or a base model with overflowing activations). No
    /// adapter is written from that step on.
    #[error(
        "{what} became non-finite at step {step} ({value}); lower learning_rate or lora_alpha, \
         or check the base model"
    )]
    NonFinite {
        what: &'static str,
        step: usize,
        value: f64,
    },
}

/// How a run starts and stops.
#[derive(Clone, Default)]
pub struct TrainOptions {
    /// Continue from the latest `checkpoint-<step>` under the output path, if there is one.
    pub resume: bool,
    pub cancel: Arc<AtomicBool>,
    /// The base model's name or path, written into `adapter_config.json`.
    pub base_model_name: String,
    /// On cancel, first save a checkpoint of the steps done since the last one (a head shutting
    /// down keeps its jobs' work; a user's cancel does not need it). Read when the cancel is seen.
    pub checkpoint_on_cancel: Arc<AtomicBool>,
    /// The dataset file's size at most (`training.max_dataset_bytes`; `None`:
    /// [`dataset::DEFAULT_MAX_DATASET_BYTES`]).
    pub max_dataset_bytes: Option<u64>,
    /// The job manager's attempt number (0: a run outside the job manager, never fenced). Written
    /// into the output path and every checkpoint; a run whose attempt is older than the one
    /// recorded there stops without writing.
    pub attempt: u32,
    /// Set when the job manager says this attempt is stale: stop at once, write nothing.
    pub stale: Arc<AtomicBool>,
}

/// Runs `job` on `model` (frozen) and writes the adapter under `job.output_path`. However it
/// ends, the memory its steps freed goes back to the system (the allocator keeps freed pages for
/// reuse while the job runs).
pub fn train(
    model: &Model,
    tokenizer: &Tokenizer,
    job: &TrainJob,
    options: &TrainOptions,
    on_progress: impl FnMut(&Progress),
) -> Result<TrainOutcome, TrainError> {
    let outcome = run_job(model, tokenizer, job, options, on_progress);
    crate::allocator::release_free_memory();
    outcome
}

fn run_job(
    model: &Model,
    tokenizer: &Tokenizer,
    job: &TrainJob,
    options: &TrainOptions,
    mut on_progress: impl FnMut(&Progress),
) -> Result<TrainOutcome, TrainError> {
    let h = &job.hyperparameters;
    h.validate()?;
    if model.tensor_parallel() != 1 {
        return Err(TrainError::TensorParallel(model.tensor_parallel()));
    }
    let context = model.config().max_position_embeddings;
    if h.max_seq_length > context {
        return Err(HyperparameterError {
            field: "max_seq_length".into(),
            message: format!(
                "{} exceeds the model's context of {context} tokens",
                h.max_seq_length
            ),
        }
        .into());
    }
    let device = model.main_device();
    // A 4-bit base is dequantised one layer at a time: without recomputation the graph would keep
    // every layer's dense weights until backward, the whole base at once.
    let packed_base = model.weight_bytes().1 > 0;
    let checkpointing = h.gradient_checkpointing || packed_base;
    if packed_base && !h.gradient_checkpointing {
        tracing::info!("packed 4-bit base: recomputing layers in backward (gradient checkpointing) although not asked for");
    }
    if h.fp16 && device == Device::Cpu {
        tracing::info!("fp16 asked for: ignored on the CPU, training in float32");
    }
    let limits = dataset::ReadLimits {
        max_bytes: options
            .max_dataset_bytes
            .unwrap_or(dataset::DEFAULT_MAX_DATASET_BYTES),
        cancel: Some(options.cancel.clone()),
        ..dataset::ReadLimits::default()
    };
    let data = match dataset::load(
        &job.dataset_path,
        tokenizer,
        h.max_seq_length,
        h.skip_invalid,
        &limits,
    ) {
        Err(DatasetError::Cancelled) => {
            let last_checkpoint = latest_checkpoint(&job.output_path);
            return Ok(TrainOutcome::Cancelled {
                step: last_checkpoint
                    .as_deref()
                    .and_then(checkpoint_step)
                    .unwrap_or(0),
                last_checkpoint,
            });
        }
        other => other?,
    };
    let (train_set, eval_set) = dataset::split_eval(data.examples.clone(), h.eval_fraction, h.seed);
    let micro_per_epoch = train_set.len().div_ceil(h.batch_size);
    let steps_per_epoch = micro_per_epoch.div_ceil(h.gradient_accumulation_steps);
    let total_steps = steps_per_epoch
        .checked_mul(h.num_epochs)
        .filter(|&n| n <= MAX_TOTAL_STEPS)
        .ok_or_else(|| HyperparameterError {
            field: "num_epochs".into(),
            message: format!(
                "{} epochs x {steps_per_epoch} steps per epoch exceeds {MAX_TOTAL_STEPS} steps",
                h.num_epochs
            ),
        })?;
    let warmup = (total_steps as f64 * h.warmup_ratio).ceil() as usize;

    let out = &job.output_path;
    // The output directory itself, never a link planted there since the path was checked at
    // submit (writing through it would put files outside the adapters root).
    if std::fs::symlink_metadata(out).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(TrainError::Io {
            path: out.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the output path is a symbolic link; refusing to write through it",
            ),
        });
    }
    std::fs::create_dir_all(out).map_err(|source| TrainError::Io {
        path: out.clone(),
        source,
    })?;
    let fence = Fence::claim(out, options.attempt, options.stale.clone())?;
    checkpoint::remove_leftovers(out);
    let mut lora = LoraParams::init(model.config(), h, device);
    let mut opt = AdamW::new(&lora.tensors(), h.weight_decay);
    let mut state = TrainerState {
        step: 0,
        total_steps,
        tokens: 0,
        losses: Vec::new(),
        hyperparameters: h.clone(),
        attempt: options.attempt,
    };
    let mut resumed_from_step = None;
    if options.resume {
        if let Some((dir, restored)) = checkpoint::restore_latest(out, &mut lora, &mut opt, h)? {
            state = TrainerState {
                attempt: options.attempt,
                ..restored
            };
            resumed_from_step = Some(state.step);
            tracing::info!(checkpoint = %dir.display(), step = state.step, "resuming");
        }
    }
    let mut last_checkpoint = latest_checkpoint(out);
    let started = Instant::now();
    let start_step = state.step;
    let mut epoch_order: Option<(usize, Vec<usize>)> = None;
    while state.step < total_steps {
        fence.check_stale()?;
        if options.cancel.load(Ordering::Relaxed) {
            let saved_step = last_checkpoint.as_deref().and_then(checkpoint_step);
            if options.checkpoint_on_cancel.load(Ordering::Relaxed)
                && state.step > 0
                && saved_step != Some(state.step)
            {
                last_checkpoint = Some(checkpoint::save(
                    out,
                    &lora,
                    &opt,
                    &state,
                    h,
                    &options.base_model_name,
                    &fence,
                )?);
            }
            return Ok(TrainOutcome::Cancelled {
                step: state.step,
                last_checkpoint,
            });
        }
        let step = state.step;
        let epoch = step / steps_per_epoch;
        if epoch_order.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let mut order: Vec<usize> = (0..train_set.len()).collect();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(h.seed.wrapping_add(epoch as u64));
            order.shuffle(&mut rng);
            epoch_order = Some((epoch, order));
        }
        let order = &epoch_order.as_ref().expect("set above").1;
        let first_micro = (step % steps_per_epoch) * h.gradient_accumulation_steps;
        let micros: Vec<Vec<&Example>> = (first_micro
            ..(first_micro + h.gradient_accumulation_steps).min(micro_per_epoch))
            .map(|m| {
                order[m * h.batch_size..((m + 1) * h.batch_size).min(order.len())]
                    .iter()
                    .map(|&i| &train_set[i])
                    .collect()
            })
            .collect();
        let supervised: usize = micros.iter().flatten().map(|e| e.supervised_tokens()).sum();
        let lr = learning_rate(h.learning_rate, h.lr_scheduler, warmup, step, total_steps);
        let mut loss_sum = 0.0;
        for (m, examples) in micros.iter().enumerate() {
            let seed = mix(h.seed, step as u64, m as u64);
            // A fresh LoRA view per micro-batch: each backward walks its own `B × scale` nodes.
            let batch = lora.batch(h.lora_dropout, seed);
            loss_sum += micro_step(model, &batch, examples, supervised as f64, checkpointing);
            state.tokens += examples.iter().map(|e| e.ids.len() as u64).sum::<u64>();
        }
        if !loss_sum.is_finite() {
            return Err(TrainError::NonFinite {
                what: "the loss",
                step: state.step + 1,
                value: loss_sum,
            });
        }
        let grad_norm = opt.clip_and_step(&lora.tensors(), lr, h.max_grad_norm);
        if !grad_norm.is_finite() {
            return Err(TrainError::NonFinite {
                what: "the gradient norm",
                step: state.step + 1,
                value: grad_norm,
            });
        }
        state.step += 1;
        state.losses.push(loss_sum);
        let elapsed = started.elapsed().as_secs_f64();
        let done = (state.step - start_step) as f64;
        let mut progress = Progress {
            step: state.step,
            total_steps,
            epoch: epoch + 1,
            loss: loss_sum,
            learning_rate: lr,
            grad_norm,
            tokens_per_s: state.tokens as f64 / elapsed.max(1e-9),
            eta_s: elapsed / done * (total_steps - state.step) as f64,
            eval_loss: None,
        };
        let at_end = state.step == total_steps;
        let save =
            at_end || (h.save_every_steps > 0 && state.step.is_multiple_of(h.save_every_steps));
        if save && !eval_set.is_empty() {
            progress.eval_loss = Some(evaluate(model, &lora, &eval_set, h.batch_size));
        }
        if save {
            last_checkpoint = Some(checkpoint::save(
                out,
                &lora,
                &opt,
                &state,
                h,
                &options.base_model_name,
                &fence,
            )?);
        }
        on_progress(&progress);
    }
    // The adapter itself, beside the checkpoints, written atomically file by file.
    checkpoint::write_adapter(out, &lora, h, &options.base_model_name, &fence)?;
    let eval_loss = (!eval_set.is_empty()).then(|| evaluate(model, &lora, &eval_set, h.batch_size));
    let summary = TrainSummary {
        final_loss: state.losses.last().copied().unwrap_or(f64::NAN),
        eval_loss,
        steps: state.step,
        tokens: state.tokens,
        elapsed_s: started.elapsed().as_secs_f64(),
        examples: train_set.len(),
        truncated: data.truncated,
        skipped_lines: data.skipped.iter().map(|(l, _)| *l).collect(),
        resumed_from_step,
        hyperparameters: h.clone(),
        base_model: options.base_model_name.clone(),
    };
    fence.check()?;
    checkpoint::write_json(
        &out.join("training_summary.json"),
        &serde_json::to_value(&summary).expect("serialisable"),
    )?;
    Ok(TrainOutcome::Completed(Box::new(summary)))
}

fn mix(seed: u64, step: u64, micro: u64) -> u64 {
    let mut x =
        seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ micro.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 31;
    x.wrapping_mul(0x94D0_49BB_1331_11EB)
}

/// Right-padded ids `[b, T]` and targets `[b, T]`, shifted: the target at position `i` is the id at
/// `i + 1` (-100 where not supervised, padding, or the last position), so the loss reads the
/// logits as they are instead of copying all but their last position.
fn collate(examples: &[&Example], device: Device) -> (Tensor, Tensor) {
    let t = examples.iter().map(|e| e.ids.len()).max().unwrap_or(1);
    let mut ids = vec![0i64; examples.len() * t];
    let mut targets = vec![-100i64; examples.len() * t];
    for (r, e) in examples.iter().enumerate() {
        for (i, &id) in e.ids.iter().enumerate() {
            ids[r * t + i] = id as i64;
            if i > 0 && e.supervised[i] {
                targets[r * t + i - 1] = id as i64;
            }
        }
    }
    let b = examples.len() as i64;
    let shape = [b, t as i64];
    (
        Tensor::from_slice(&ids).view(shape).to_device(device),
        Tensor::from_slice(&targets).view(shape).to_device(device),
    )
}

/// Summed token cross-entropy of the supervised (shifted) targets; `logits` `[b, T, V]` are read
/// in place (a view, no copy) when they are float32.
fn token_loss(logits: &Tensor, targets: &Tensor) -> Tensor {
    let v = logits.size()[2];
    logits
        .to_kind(Kind::Float)
        .reshape([-1, v])
        .cross_entropy_loss::<Tensor>(&targets.reshape([-1]), None, Reduction::Sum, -100, 0.0)
}

/// Forward and backward of one micro-batch; returns its share of the step's loss.
fn micro_step(
    model: &Model,
    lora: &crate::lora::LoraBatch,
    examples: &[&Example],
    normaliser: f64,
    checkpointing: bool,
) -> f64 {
    let (ids, targets) = collate(examples, model.main_device());
    let layers = model.config().num_hidden_layers;
    let x0 = tch::no_grad(|| model.embed(&ids));
    if !checkpointing {
        let mut x = x0;
        for l in 0..layers {
            x = model.layer_forward(l, &x, Some(lora));
        }
        let loss = token_loss(&model.head(&x), &targets) / normaliser;
        loss.backward();
        return loss.double_value(&[]);
    }
    // Recompute: keep only each layer's input, rebuild its graph in backward. The memory the
    // last micro-batch freed goes back to the system first ([`TRIM_EVERY_LAYERS`]).
    crate::allocator::release_free_memory();
    let mut inputs = Vec::with_capacity(layers);
    let mut x = x0;
    tch::no_grad(|| {
        for l in 0..layers {
            inputs.push(x.shallow_clone());
            x = model.layer_forward(l, &x, Some(lora));
        }
    });
    let top = x.detach().set_requires_grad(true);
    // And the forward's, before the head.
    crate::allocator::release_free_memory();
    let rows = (HEAD_CHUNK_LOGITS / model.config().vocab_size as i64).max(16);
    let loss = chunked_head_loss(
        |h| model.final_norm(h),
        model.frozen_head(),
        model.config().arch.final_softcap,
        &top,
        &targets,
        normaliser,
        rows,
    );
    // Undefined when no position was supervised: then nothing flows back.
    let grad = top.grad();
    if !grad.defined() {
        return loss;
    }
    let mut grad = grad.detach();
    for l in (0..layers).rev() {
        if l % TRIM_EVERY_LAYERS == TRIM_EVERY_LAYERS - 1 && l + 1 != layers {
            crate::allocator::release_free_memory();
        }
        // Each saved input goes as soon as its layer is done.
        let input = inputs
            .pop()
            .expect("one saved input a layer")
            .detach()
            .set_requires_grad(l > 0);
        let y = model.layer_forward(l, &input, Some(lora));
        (y * &grad).sum(Kind::Float).backward();
        if l > 0 {
            grad = input.grad().detach();
        }
    }
    loss
}

/// With layer recompute (a packed base's mode), the trainer hands freed memory back to the system
/// at the start of a micro-batch, before the head, and every this many layers of the backward.
/// Under glibc, a step's freed tensors otherwise stay resident as heap fragments and the
/// backward's working set piles up on them: a packed SmolLM2 trainer (seq 256, batch 4, 2
/// threads) peaked at 1127-1178 MiB without these calls and 907-957 MiB with them, ~10% slower
/// (each call costs the page faults of memory reused after it; a call every layer cost ~20%).
/// Not on the path without recompute, whose gigabytes of saved activations would be faulted in
/// again each step.
const TRIM_EVERY_LAYERS: usize = 8;

/// Logits per chunk of the head's loss: 2 Mi float32 values (8 MiB; SmolLM2's vocabulary makes
/// that 42 rows). Batch 4 × 256 tokens unchunked is 192 MiB of logits, times the copies that
/// log-softmax and backward make. Every layer's saved input lives during the head's phase (with a
/// dense head, the head too): 32 MiB chunks put a packed SmolLM2 trainer ~40 MiB higher, for ~5%
/// more speed (each chunk reads the whole head twice).
const HEAD_CHUNK_LOGITS: i64 = 2 << 20;

/// The head's loss over `top` (`[b, T, hidden]`, a leaf that requires grad) and its backward, run
/// `rows` positions at a time so only one chunk's logits exist at once; the gradient accumulates
/// in `top.grad()`. Per chunk, `norm` runs under autograd; the frozen `head`'s logits and their
/// gradient back to the norm's output are taken by hand ([`Linear::frozen_logits`],
/// [`Linear::input_grad`]; the final soft-cap, where the model has one, under autograd), so a packed base's
/// Q8_0 head is never whole in float. Returns the loss (divided by `normaliser`).
fn chunked_head_loss(
    norm: impl Fn(&Tensor) -> Tensor,
    head: &Linear,
    softcap: Option<f64>,
    top: &Tensor,
    targets: &Tensor,
    normaliser: f64,
    rows: i64,
) -> f64 {
    let hidden = top.size()[2];
    let targets = targets.reshape([-1]);
    let n = targets.size()[0];
    let supervised: Vec<bool> = Vec::<i64>::try_from(targets.ne(-100).to_kind(Kind::Int64))
        .expect("int64 targets")
        .into_iter()
        .map(|t| t != 0)
        .collect();
    let mut total = 0.0;
    for start in (0..n).step_by(rows as usize) {
        let len = rows.min(n - start);
        // Positions with nothing to predict add nothing to the loss or the gradient.
        if !supervised[start as usize..(start + len) as usize]
            .iter()
            .any(|&s| s)
        {
            continue;
        }
        let normed = norm(&top.reshape([-1, hidden]).narrow(0, start, len));
        let raw = head.frozen_logits(&normed.detach()).set_requires_grad(true);
        let logits = match softcap {
            Some(cap) => (&raw / cap).tanh() * cap,
            None => raw.shallow_clone(),
        };
        let loss = logits.cross_entropy_loss::<Tensor>(
            &targets.narrow(0, start, len),
            None,
            Reduction::Sum,
            -100,
            0.0,
        ) / normaliser;
        loss.backward();
        total += loss.double_value(&[]);
        let back = head.input_grad(&raw.grad(), normed.kind());
        (normed * back).sum(Kind::Float).backward();
    }
    total
}

/// Mean token loss over `examples` with dropout off.
fn evaluate(model: &Model, lora: &LoraParams, examples: &[Example], batch_size: usize) -> f64 {
    let batch = lora.batch(0.0, 0);
    let (mut total, mut count) = (0.0, 0usize);
    tch::no_grad(|| {
        for chunk in examples.chunks(batch_size) {
            let refs: Vec<&Example> = chunk.iter().collect();
            let (ids, targets) = collate(&refs, model.main_device());
            let mut x = model.embed(&ids);
            for l in 0..model.config().num_hidden_layers {
                x = model.layer_forward(l, &x, Some(&batch));
            }
            total += token_loss(&model.head(&x), &targets).double_value(&[]);
            count += chunk.iter().map(Example::supervised_tokens).sum::<usize>();
        }
    });
    total / count.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1) (torch's global generator is shared by parallel tests).
    fn values(n: i64, seed: u64) -> Tensor {
        Tensor::from_slice(&crate::test_rng::Lcg::new(seed).units(n as usize))
    }

    #[test]
    fn the_head_loss_in_chunks_has_the_loss_and_gradient_of_the_whole() {
        let (b, t, h, v) = (2i64, 7i64, 5i64, 11i64);
        let w = values(v * h, 1).reshape([v, h]);
        // A nonlinear stand-in for the final norm, so its backward is exercised too.
        let norm = |x: &Tensor| x.tanh();
        let x = values(b * t * h, 2).reshape([b, t, h]);
        // Unsupervised positions at the start (a prompt) and the end (padding).
        let mut ids: Vec<i64> = (0..b * t).map(|i| (i * 3) % v).collect();
        for i in [0usize, 1, 2, 3, 12, 13] {
            ids[i] = -100;
        }
        let targets = Tensor::from_slice(&ids).reshape([b, t]);
        let whole = x.detach().set_requires_grad(true);
        let loss = token_loss(&norm(&whole).linear::<Tensor>(&w, None), &targets) / 3.0;
        loss.backward();
        let head = Linear::dense(w.shallow_clone());
        for rows in [1, 3, 4, 14, 100] {
            let top = x.detach().set_requires_grad(true);
            let chunked = chunked_head_loss(norm, &head, None, &top, &targets, 3.0, rows);
            assert!(
                (chunked - loss.double_value(&[])).abs() < 1e-5,
                "rows {rows}"
            );
            let diff = (top.grad() - whole.grad()).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "rows {rows}: gradient differs by {diff}");
        }
        // Nothing supervised: no loss, no gradient.
        let top = x.detach().set_requires_grad(true);
        let none = Tensor::full([b, t], -100, (Kind::Int64, Device::Cpu));
        assert_eq!(
            chunked_head_loss(norm, &head, None, &top, &none, 1.0, 4),
            0.0
        );
        assert!(!top.grad().defined());
    }

    #[test]
    fn a_q8_head_read_by_blocks_trains_as_its_dequantised_matrix() {
        use crate::gguf::GgmlType;
        use crate::q8_weight::Q8Weight;
        // A vocabulary of several blocks of rows (2 MiB of float32 each: 16384 rows of 32).
        let (b, t, h, v) = (2i64, 9i64, 32i64, 40000i64);
        let mut rng = crate::test_rng::Lcg::new(7);
        let mut bytes = Vec::new();
        for _ in 0..v * h / 32 {
            bytes.extend(
                half::f16::from_f32(0.002 + (rng.next_u32() % 100) as f32 * 1e-4).to_le_bytes(),
            );
            bytes.extend((0..32).map(|_| (rng.next_u32() & 0xff) as u8));
        }
        let table = Q8Weight::from_gguf(GgmlType::Q8_0, &bytes, v as usize, h as usize).unwrap();
        let dense = Linear::dense(table.dequantize(Kind::Float));
        let packed = Linear::int8(table);
        let x = values(b * t * h, 3).reshape([b, t, h]);
        let ids: Vec<i64> = (0..b * t).map(|i| (i * 4447) % v).collect();
        let targets = Tensor::from_slice(&ids).reshape([b, t]);
        let norm = |x: &Tensor| x * 2.0;
        let run = |head: &Linear| {
            let top = x.detach().set_requires_grad(true);
            let loss = chunked_head_loss(norm, head, None, &top, &targets, 5.0, 4);
            (loss, top.grad())
        };
        let (want, want_grad) = run(&dense);
        let (got, got_grad) = run(&packed);
        assert!(
            (got - want).abs() < 1e-4 * want.abs(),
            "loss {got} vs {want}"
        );
        let diff = (got_grad - &want_grad).abs().max().double_value(&[]);
        let scale = want_grad.abs().max().double_value(&[]);
        assert!(
            diff < 1e-4 * scale,
            "gradient differs by {diff} (max {scale})"
        );
    }
}
