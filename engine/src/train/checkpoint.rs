//! What a fine-tune writes under its output path, durably: `checkpoint-<step>/` directories and the
//! final adapter, each written into a temporary directory, flushed (files and directory) and
//! renamed, then the parent directory flushed; pruning to the newest `save_total_limit`; resume
//! that falls back to an earlier checkpoint when the latest is unreadable; and the attempt fence
//! (`.attempt.json`) that stops a superseded run of a job before it writes anything.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use crate::train::hyperparams::Hyperparameters;
use crate::train::lora_params::{peft_config, LoraParams};
use crate::train::optimizer::AdamW;
use crate::train::trainer::TrainError;

/// The loop's position, saved in each checkpoint as `trainer_state.json`.
#[derive(Serialize, Deserialize)]
pub(crate) struct TrainerState {
    pub step: usize,
    pub total_steps: usize,
    pub tokens: u64,
    pub losses: Vec<f64>,
    pub hyperparameters: Hyperparameters,
    /// The job attempt that wrote it (0: a run outside the job manager).
    #[serde(default)]
    pub attempt: u32,
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Flushes a file's data, or a directory's entries (the renames in it), to the disk.
fn sync(path: &Path) -> Result<(), TrainError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

fn sync_parent(path: &Path) -> Result<(), TrainError> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => sync(p),
        _ => sync(Path::new(".")),
    }
}

/// Writes `value` to `path` through a flushed temporary file and a rename.
pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), TrainError> {
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(
            serde_json::to_string_pretty(value)
                .expect("json")
                .as_bytes(),
        )
        .and_then(|_| f.sync_all())
        .map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io(path))?;
    sync_parent(path)
}

/// Where a run of a job stands against newer runs of the same job (job manager attempts).
///
/// Attempt `n` writes `n` into `<output>/.attempt.json` when it starts; before every write it
/// checks that no newer attempt has claimed the directory since and that the job manager has not
/// told it that it is stale. Attempt 0 (`tessera train`) is never fenced.
pub(crate) struct Fence {
    marker: PathBuf,
    attempt: u32,
    stale: Arc<AtomicBool>,
}

impl Fence {
    /// Claims `out` for `attempt`, unless a newer attempt already has.
    pub fn claim(out: &Path, attempt: u32, stale: Arc<AtomicBool>) -> Result<Self, TrainError> {
        let fence = Fence {
            marker: out.join(".attempt.json"),
            attempt,
            stale,
        };
        fence.check()?;
        if attempt > 0 {
            write_json(&fence.marker, &serde_json::json!({ "attempt": attempt }))?;
        }
        Ok(fence)
    }

    /// `Err(Superseded)` when the job manager said this attempt is stale (checked every step).
    pub fn check_stale(&self) -> Result<(), TrainError> {
        if self.stale.load(Ordering::Relaxed) {
            return Err(TrainError::Superseded {
                attempt: self.attempt,
                why: "the job manager runs a newer attempt".into(),
            });
        }
        Ok(())
    }

    /// `Err(Superseded)` when this run must stop without writing (checked before every write).
    pub fn check(&self) -> Result<(), TrainError> {
        self.check_stale()?;
        if self.attempt == 0 {
            return Ok(());
        }
        let claimed = std::fs::read_to_string(&self.marker)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["attempt"].as_u64());
        match claimed {
            Some(n) if n > self.attempt as u64 => Err(TrainError::Superseded {
                attempt: self.attempt,
                why: format!("attempt {n} has claimed {}", self.marker.display()),
            }),
            _ => Ok(()),
        }
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

/// Flushes every file of `dir`, then `dir` itself.
fn sync_tree(dir: &Path) -> Result<(), TrainError> {
    for entry in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            sync(&entry.path())?;
        }
    }
    sync(dir)
}

/// `adapter_config.json` + `adapter_model.safetensors` into `dir`, each file renamed into place
/// once flushed.
pub(crate) fn write_adapter(
    dir: &Path,
    lora: &LoraParams,
    h: &Hyperparameters,
    base: &str,
    fence: &Fence,
) -> Result<(), TrainError> {
    fence.check()?;
    let tmp = dir.join(format!(".adapter-{}.tmp", fence.attempt()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    lora.save_weights(&tmp)?;
    write_json(
        &tmp.join("adapter_config.json"),
        &peft_config(h, base, &lora.module_names()),
    )?;
    sync_tree(&tmp)?;
    fence.check()?;
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::rename(tmp.join(f), dir.join(f)).map_err(io(&dir.join(f)))?;
    }
    sync(dir)?;
    std::fs::remove_dir_all(&tmp).map_err(io(&tmp))
}

/// Writes `checkpoint-<step>/` via a flushed temporary directory and a rename, so a crash (or a
/// power loss) never leaves a partial checkpoint behind; then keeps the newest `keep` (0: all).
pub(crate) fn save(
    out: &Path,
    lora: &LoraParams,
    opt: &AdamW,
    state: &TrainerState,
    h: &Hyperparameters,
    base: &str,
    fence: &Fence,
) -> Result<PathBuf, TrainError> {
    fence.check()?;
    let dir = out.join(format!("checkpoint-{}", state.step));
    let tmp = out.join(format!(
        ".checkpoint-{}-{}.tmp",
        state.step,
        fence.attempt()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    lora.save_weights(&tmp)?;
    write_json(
        &tmp.join("adapter_config.json"),
        &peft_config(h, base, &lora.module_names()),
    )?;
    let mut moments: Vec<(String, Tensor)> = Vec::new();
    for (i, (m, v)) in opt.m.iter().zip(&opt.v).enumerate() {
        moments.push((format!("m.{i}"), m.to_device(Device::Cpu).contiguous()));
        moments.push((format!("v.{i}"), v.to_device(Device::Cpu).contiguous()));
    }
    Tensor::write_safetensors(&moments, tmp.join("optimizer.safetensors"))?;
    write_json(
        &tmp.join("trainer_state.json"),
        &serde_json::to_value(state).expect("json"),
    )?;
    sync_tree(&tmp)?;
    fence.check()?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
    sync(out)?;
    prune(out, h.save_total_limit, state.step)?;
    Ok(dir)
}

/// Deletes all but the newest `keep` checkpoints at or below `step` (0: keeps all). Checkpoints
/// past `step` (left by a run that resumed from an earlier one) are overwritten as it goes.
fn prune(out: &Path, keep: usize, step: usize) -> Result<(), TrainError> {
    if keep == 0 {
        return Ok(());
    }
    let old: Vec<PathBuf> = checkpoints(out)
        .into_iter()
        .filter(|(s, _)| *s <= step)
        .skip(keep)
        .map(|(_, p)| p)
        .collect();
    for dir in &old {
        std::fs::remove_dir_all(dir).map_err(io(dir))?;
    }
    if !old.is_empty() {
        sync(out)?;
    }
    Ok(())
}

/// Removes temporary directories a crashed run left (an older attempt's are fenced anyway).
pub(crate) fn remove_leftovers(out: &Path) {
    let Ok(entries) = std::fs::read_dir(out) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if (name.starts_with(".checkpoint-") || name.starts_with(".adapter"))
            && name.ends_with(".tmp")
        {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The step a `checkpoint-<step>` directory holds.
pub fn checkpoint_step(dir: &Path) -> Option<usize> {
    dir.file_name()?
        .to_str()?
        .strip_prefix("checkpoint-")?
        .parse()
        .ok()
}

/// Complete checkpoints under `out` (with their `trainer_state.json`), newest first.
pub fn checkpoints(out: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(out) else {
        return Vec::new();
    };
    let mut found: Vec<(usize, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let step = checkpoint_step(&e.path())?;
            e.path()
                .join("trainer_state.json")
                .exists()
                .then(|| (step, e.path()))
        })
        .collect();
    found.sort_by_key(|c| std::cmp::Reverse(c.0));
    found
}

/// The complete checkpoint with the highest step under `out`.
pub fn latest_checkpoint(out: &Path) -> Option<PathBuf> {
    checkpoints(out).into_iter().next().map(|(_, p)| p)
}

/// Restores the newest readable checkpoint; an unreadable one (torn by a crash, a bad disk) is
/// logged and the one before it tried. `Ok(None)`: there is none; `Err`: none could be read (the
/// newest one's error).
pub(crate) fn restore_latest(
    out: &Path,
    lora: &mut LoraParams,
    opt: &mut AdamW,
    h: &Hyperparameters,
) -> Result<Option<(PathBuf, TrainerState)>, TrainError> {
    let mut first_error = None;
    for (_, dir) in checkpoints(out) {
        match restore(&dir, lora, opt, h) {
            Ok(state) => return Ok(Some((dir, state))),
            Err(e) => {
                tracing::warn!(checkpoint = %dir.display(), error = %e, "checkpoint unreadable; trying an earlier one");
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(None), Err)
}

fn restore(
    dir: &Path,
    lora: &mut LoraParams,
    opt: &mut AdamW,
    h: &Hyperparameters,
) -> Result<TrainerState, TrainError> {
    let bad = |message: String| TrainError::Checkpoint {
        path: dir.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(dir.join("trainer_state.json")).map_err(io(dir))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if state.hyperparameters != *h {
        return Err(bad(
            "its hyperparameters differ from this job's; resume needs the same ones".into(),
        ));
    }
    let saved: std::collections::HashMap<String, Tensor> =
        crate::weights::read_safetensors(&dir.join("optimizer.safetensors"))
            .map_err(|e| bad(e.to_string()))?
            .into_iter()
            .collect();
    for i in 0..opt.m.len() {
        for name in [format!("m.{i}"), format!("v.{i}")] {
            if !saved.contains_key(&name) {
                return Err(bad(format!("optimizer state lacks `{name}`")));
            }
        }
    }
    // Everything is read and checked: only now touch the live parameters.
    lora.load_weights(dir).map_err(bad)?;
    let device = lora.tensors()[0].device();
    tch::no_grad(|| {
        for i in 0..opt.m.len() {
            opt.m[i] = saved[&format!("m.{i}")].to_device(device);
            opt.v[i] = saved[&format!("v.{i}")].to_device(device);
        }
    });
    opt.step = state.step as i64;
    Ok(state)
}
