//! What a request names as the thing that serves it: `/chat`'s `adapter_path`, or an OpenAI
//! `model` (the base model's name, a succeeded fine-tune job id, or an adapter directory), turned
//! into an adapter directory checked against the adapters root, or none for the base model.

use std::path::{Path, PathBuf};

use axum::http::StatusCode;
use tessera_actors::jobs::{JobError, JobState};

use super::error::AppError;
use super::validation::Target;
use super::{paths, AppState};

/// A resolved target.
pub struct Resolved {
    /// `None`: the base model.
    pub adapter: Option<PathBuf>,
    /// The name answers report (`model` as given, or the base model's).
    pub model: String,
}

/// Resolves what `target` names.
pub async fn target(state: &AppState, target: &Target) -> Result<Resolved, AppError> {
    let base = || state.node.router.model_name().unwrap_or_default();
    Ok(match target {
        Target::AdapterPath(raw) => Resolved {
            adapter: adapter(state, "adapter_path", raw.as_deref())?,
            model: base(),
        },
        Target::Model(model) => Resolved {
            adapter: resolve_model(state, model).await?,
            model: if model.is_empty() {
                base()
            } else {
                model.clone()
            },
        },
    })
}

/// Resolves `adapter_path` (relative to the adapters root; confined to it). Its two files must be
/// regular files inside the root (a link to `/dev/zero` or a FIFO is refused before anything reads
/// it), and its weights must fit the adapter cache budget (`adapters.cache_memory_mb`).
pub fn adapter(
    state: &AppState,
    field: &str,
    raw: Option<&str>,
) -> Result<Option<PathBuf>, AppError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    let dir = paths::existing(field, raw, &state.roots.adapters)?;
    if !dir.join("adapter_config.json").exists() {
        return Err(AppError::bad_request(
            field,
            format!("`{raw}` is not a PEFT adapter directory (no adapter_config.json)"),
        ));
    }
    let mut weights_len = 0;
    for name in ["adapter_config.json", "adapter_model.safetensors"] {
        let file = paths::existing(
            field,
            &dir.join(name).display().to_string(),
            &state.roots.adapters,
        )
        .map_err(|e| match e.status {
            StatusCode::FORBIDDEN => AppError::forbidden(
                field,
                format!(
                    "`{raw}/{name}` links outside the allowed directory {}",
                    state.roots.adapters.display()
                ),
            ),
            _ => e,
        })?;
        let meta = std::fs::metadata(&file)
            .map_err(|e| AppError::bad_request(field, format!("`{raw}/{name}`: {e}")))?;
        if !meta.is_file() {
            return Err(AppError::bad_request(
                field,
                format!("`{raw}/{name}` is not a regular file"),
            ));
        }
        weights_len = meta.len();
    }
    if weights_len > state.adapter_budget_bytes {
        return Err(AppError::invalid(
            field,
            format!(
                "`{raw}` holds {} MiB of weights, more than the adapter cache budget of {} MiB (adapters.cache_memory_mb)",
                weights_len.div_ceil(1 << 20),
                state.adapter_budget_bytes >> 20
            ),
        ));
    }
    Ok(Some(dir))
}

/// Whether `model` names the base model `base`: its name (any case), with `.gguf`, or as the last
/// component of a path (`/models/qwen.gguf`, `Qwen/Qwen2.5-0.5B-Instruct`).
pub fn names_base(model: &str, base: &str) -> bool {
    let same = |s: &str| {
        s.eq_ignore_ascii_case(base)
            || s.len() == base.len() + 5
                && s.is_char_boundary(base.len())
                && s[..base.len()].eq_ignore_ascii_case(base)
                && s[base.len()..].eq_ignore_ascii_case(".gguf")
    };
    if same(model) {
        return true;
    }
    Path::new(model)
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(same)
}

fn model_not_found(model: &str, base: Option<&str>, why: Option<&str>) -> AppError {
    let base = match base {
        Some(b) => format!("the base model `{b}`"),
        None => "the base model (not loaded yet)".to_string(),
    };
    let why = why.map(|w| format!(" ({w})")).unwrap_or_default();
    AppError {
        status: StatusCode::NOT_FOUND,
        kind: "model_not_found",
        message: format!(
            "model: `{model}` does not exist{why}; use {base}, an adapter directory under the \
             adapters root, or a succeeded fine-tune job id (see GET /v1/models)"
        ),
        field: Some("model".into()),
    }
}

/// What `model` selects: `None` for the base model, or an adapter directory.
async fn resolve_model(state: &AppState, model: &str) -> Result<Option<PathBuf>, AppError> {
    let base = state.node.router.model_name();
    if model.is_empty() {
        return Ok(None);
    }
    if let Some(b) = &base {
        if model.eq_ignore_ascii_case(b) || names_base(model, b) && !model.contains(['/', '\\']) {
            return Ok(None);
        }
    }
    if model.starts_with("ft-") && !model.contains(['/', '\\']) {
        match state.node.job(model).await {
            Ok(job) => {
                return match (job.status, job.adapter_path) {
                    (JobState::Succeeded, Some(path)) => Ok(Some(path)),
                    (status, _) => Err(model_not_found(
                        model,
                        base.as_deref(),
                        Some(&format!(
                            "fine-tune job {model} is {}, it has no adapter to serve",
                            serde_json::to_value(status)
                                .ok()
                                .and_then(|v| v.as_str().map(str::to_string))
                                .unwrap_or_default()
                        )),
                    )),
                };
            }
            Err(JobError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    match adapter(state, "model", Some(model)) {
        Ok(adapter) => Ok(adapter),
        Err(e) if e.status == StatusCode::BAD_REQUEST => {
            if let Some(b) = &base {
                if names_base(model, b) {
                    return Ok(None);
                }
            } else {
                return Err(AppError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "no replica has loaded the base model yet; retry",
                ));
            }
            Err(model_not_found(model, base.as_deref(), None))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_model_names() {
        assert!(names_base("qwen2.5-0.5b", "Qwen2.5-0.5B"));
        assert!(names_base("Qwen2.5-0.5B.gguf", "Qwen2.5-0.5B"));
        assert!(names_base("/models/Qwen2.5-0.5B.gguf", "Qwen2.5-0.5B"));
        assert!(names_base("Qwen/Qwen2.5-0.5B", "Qwen2.5-0.5B"));
        assert!(!names_base("Qwen2.5", "Qwen2.5-0.5B"));
        assert!(!names_base("gpt-4o", "Qwen2.5-0.5B"));
        assert!(!names_base("Qwen2.5-0.5B.bin", "Qwen2.5-0.5B"));
    }
}
