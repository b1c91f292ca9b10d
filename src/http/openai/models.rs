//! `GET /v1/models`: the deployments (base models), the adapter directories under the adapters
//! root and the adapters the replicas hold (served on the default deployment, or on another as
//! `deployment:adapter`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::types::*;
use super::unix_now;
use crate::http::error::AppError;
use crate::http::AppState;

fn mtime_secs(path: &Path) -> Option<u64> {
    let modified = std::fs::metadata(path).ok()?.modified().ok()?;
    Some(modified.duration_since(UNIX_EPOCH).ok()?.as_secs())
}

/// Adapter directories directly under `root`: (name, canonical path, created).
fn adapter_dirs(root: &Path) -> Vec<(String, PathBuf, u64)> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut out: Vec<(String, PathBuf, u64)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let path = e.path();
            let name = e.file_name().to_str()?.to_string();
            if !path.join("adapter_config.json").is_file() {
                return None;
            }
            let real = path.canonicalize().unwrap_or(path.clone());
            let created = mtime_secs(&path).unwrap_or(0);
            Some((name, real, created))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The models `model` may name.
#[utoipa::path(get, path = "/v1/models",
    responses((status = 200, description = "The base model and the adapters", body = ModelList)))]
pub async fn models(State(state): State<AppState>) -> Result<Response, AppError> {
    let now = unix_now();
    let mut data = Vec::new();
    for d in state.node.deployments.list() {
        if d.state == tessera_actors::deployments::DeploymentState::Deleting {
            continue;
        }
        data.push(ModelCard {
            id: d.name.clone(),
            object: "model".into(),
            created: d.created_at as u64,
            owned_by: "tessera".into(),
            root: Some(d.spec.path.display().to_string()),
            parent: None,
        });
    }
    let base = Some(state.node.deployments.default_name());
    let root = state.roots.adapters.clone();
    let dirs = tokio::task::spawn_blocking(move || adapter_dirs(&root))
        .await
        .unwrap_or_default();
    let mut seen: HashSet<PathBuf> = HashSet::new();
    for (name, path, created) in dirs {
        seen.insert(path.clone());
        data.push(ModelCard {
            id: name,
            object: "model".into(),
            created,
            owned_by: "tessera".into(),
            root: Some(path.display().to_string()),
            parent: base.clone(),
        });
    }
    for replica in state.node.router.replicas() {
        for path in replica.adapters {
            if !seen.insert(path.clone()) {
                continue;
            }
            data.push(ModelCard {
                id: path.display().to_string(),
                object: "model".into(),
                created: mtime_secs(&path).unwrap_or(now),
                owned_by: "tessera".into(),
                root: Some(path.display().to_string()),
                parent: base.clone(),
            });
        }
    }
    Ok(Json(ModelList {
        object: "list".into(),
        data,
    })
    .into_response())
}
