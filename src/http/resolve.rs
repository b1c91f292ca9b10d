//! What a request names as the thing that serves it: `/chat`'s `model` (a deployment) and
//! `adapter_path`, or an OpenAI `model` (a deployment or its model's name, `deployment:adapter`, a
//! succeeded fine-tune job id, or an adapter directory), turned into a deployment and an adapter
//! directory checked against the adapters root (or none for the base model).

use std::path::{Path, PathBuf};

use axum::http::StatusCode;
use tessera_actors::jobs::{JobError, JobState};

use super::error::AppError;
use super::validation::Target;
use super::{paths, AppState};

/// A resolved target.
pub struct Resolved {
    /// The deployment whose replicas serve it.
    pub deployment: String,
    /// `None`: the deployment's base model.
    pub adapter: Option<PathBuf>,
    /// The name answers report (`model` as given, or the deployment's).
    pub model: String,
}

/// Resolves what `target` names.
pub async fn target(state: &AppState, target: &Target) -> Result<Resolved, AppError> {
    Ok(match target {
        Target::Chat {
            model,
            adapter_path,
        } => {
            let deployment = match model.as_deref() {
                None | Some("") => state.node.deployments.default_name(),
                Some(name) => state
                    .node
                    .deployments
                    .find(name)
                    .map(|d| d.name)
                    .ok_or_else(|| deployment_not_found(state, name))?,
            };
            Resolved {
                adapter: adapter(state, "adapter_path", adapter_path.as_deref())?,
                model: deployment.clone(),
                deployment,
            }
        }
        Target::Model(model) => {
            let (deployment, adapter) = resolve_model(state, model).await?;
            Resolved {
                model: if model.is_empty() {
                    deployment.clone()
                } else {
                    model.clone()
                },
                deployment,
                adapter,
            }
        }
    })
}

fn deployment_names(state: &AppState) -> String {
    state
        .node
        .deployments
        .list()
        .iter()
        .map(|d| format!("`{}`", d.name))
        .collect::<Vec<_>>()
        .join(", ")
}

fn deployment_not_found(state: &AppState, name: &str) -> AppError {
    AppError {
        status: StatusCode::NOT_FOUND,
        kind: "model_not_found",
        message: format!(
            "model: no deployment is named `{name}`; the deployments are {} (see GET /models)",
            deployment_names(state)
        ),
        field: Some("model".into()),
    }
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

fn model_not_found(state: &AppState, model: &str, why: Option<&str>) -> AppError {
    let why = why.map(|w| format!(" ({w})")).unwrap_or_default();
    AppError {
        status: StatusCode::NOT_FOUND,
        kind: "model_not_found",
        message: format!(
            "model: `{model}` does not exist{why}; use a deployment ({}), `deployment:adapter`, an \
             adapter directory under the adapters root, or a succeeded fine-tune job id (see GET /v1/models)",
            deployment_names(state)
        ),
        field: Some("model".into()),
    }
}

/// The deployment a base-model name selects: a deployment's name (any case), or its model's
/// name (with `.gguf`, or as a path's last component).
fn deployment_of(state: &AppState, model: &str, paths_too: bool) -> Option<String> {
    let deployments = state.node.deployments.list();
    if let Some(d) = deployments
        .iter()
        .find(|d| d.name.eq_ignore_ascii_case(model))
    {
        return Some(d.name.clone());
    }
    if model.contains(['/', '\\']) && !paths_too {
        return None;
    }
    deployments
        .iter()
        .find(|d| {
            names_base(model, &d.name) || d.model.as_deref().is_some_and(|m| names_base(model, m))
        })
        .map(|d| d.name.clone())
}

/// The deployment serving the model a fine-tune started from: the one with the same path, else
/// the default one.
fn deployment_for_base(state: &AppState, base: Option<&Path>) -> String {
    base.and_then(|b| {
        state
            .node
            .deployments
            .list()
            .into_iter()
            .find(|d| d.spec.path == b)
            .map(|d| d.name)
    })
    .unwrap_or_else(|| state.node.deployments.default_name())
}

/// What `model` selects: a deployment, and an adapter of it or none.
async fn resolve_model(
    state: &AppState,
    model: &str,
) -> Result<(String, Option<PathBuf>), AppError> {
    let default = state.node.deployments.default_name();
    if model.is_empty() {
        return Ok((default, None));
    }
    if let Some(d) = deployment_of(state, model, false) {
        return Ok((d, None));
    }
    // `deployment:adapter`.
    if let Some((name, rest)) = model.split_once(':') {
        if let Some(d) = state.node.deployments.find(name) {
            return Ok((d.name, adapter(state, "model", Some(rest))?));
        }
    }
    if model.starts_with("ft-") && !model.contains(['/', '\\']) {
        match state.node.job(model).await {
            Ok(job) => {
                return match (job.status, job.adapter_path) {
                    (JobState::Succeeded, Some(path)) => Ok((
                        deployment_for_base(state, job.base_model.as_deref()),
                        Some(path),
                    )),
                    (status, _) => Err(model_not_found(
                        state,
                        model,
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
        Ok(adapter) => Ok((default, adapter)),
        Err(e) if e.status == StatusCode::BAD_REQUEST => match deployment_of(state, model, true) {
            Some(d) => Ok((d, None)),
            None => Err(model_not_found(state, model, None)),
        },
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
