//! A worker acts only on paths inside its own roots. The head confines what clients name to the
//! head's roots, but a worker that obeyed any path in `StartReplica`, `RunJob` or a request's
//! adapter would read any model or dataset and write adapters (and delete `checkpoint-*`) anywhere
//! on its machine for whoever holds the cookie. So every path from the head is checked here
//! against the worker's own configuration (`model.models_root`, `training.data_root`,
//! `adapters.root`; with shared storage at the same paths, the head's and the worker's agree),
//! after resolving links.

use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// The worker's roots (canonical) and the model it serves.
#[derive(Debug, Clone)]
pub struct WorkerRoots {
    pub models: PathBuf,
    pub data: PathBuf,
    pub adapters: PathBuf,
    /// The model this worker serves (its own `model.path`, or the head's once accepted): always
    /// allowed as a model.
    served: Arc<OnceLock<PathBuf>>,
}

impl WorkerRoots {
    /// Creates the roots if needed and resolves them.
    pub fn new(models: &Path, data: &Path, adapters: &Path) -> std::io::Result<Self> {
        let make = |p: &Path| {
            std::fs::create_dir_all(p)?;
            p.canonicalize()
        };
        Ok(Self {
            models: make(models)?,
            data: make(data)?,
            adapters: make(adapters)?,
            served: Arc::default(),
        })
    }

    /// Records the model this worker serves.
    pub fn set_served(&self, path: &Path) {
        let _ = self
            .served
            .set(path.canonicalize().unwrap_or_else(|_| path.to_path_buf()));
    }

    /// A model the head asks this worker to load or fine-tune from.
    pub fn model(&self, path: &Path) -> Result<(), String> {
        if let (Some(served), Ok(real)) = (self.served.get(), path.canonicalize()) {
            if &real == served {
                return Ok(());
            }
        }
        check("model", path, &self.models, "model.models_root")
    }

    pub fn dataset(&self, path: &Path) -> Result<(), String> {
        check("dataset", path, &self.data, "training.data_root")
    }

    /// An adapter to read, or a fine-tune's output directory (which may not exist yet).
    pub fn adapter(&self, path: &Path) -> Result<(), String> {
        check("adapter path", path, &self.adapters, "adapters.root")
    }
}

/// `path` resolved (its longest existing ancestor through links, the rest as written, with no
/// `..`) must lie inside `root`.
fn check(what: &str, path: &Path, root: &Path, key: &str) -> Result<(), String> {
    if inside(path, root) {
        Ok(())
    } else {
        Err(format!(
            "the {what} {} lies outside this worker's {key} ({}); a worker acts only on paths \
             inside its own roots (put them on storage every node sees at the same path)",
            path.display(),
            root.display()
        ))
    }
}

fn inside(path: &Path, root: &Path) -> bool {
    if !path.is_absolute() {
        return false;
    }
    if let Ok(real) = path.canonicalize() {
        return real.starts_with(root);
    }
    // Not there yet (an output directory): its nearest existing ancestor, resolved, then the
    // rest, which must not climb.
    let mut existing = path;
    let mut rest = Vec::new();
    while let Some(parent) = existing.parent() {
        rest.push(existing.file_name());
        existing = parent;
        if let Ok(real) = existing.canonicalize() {
            let tail: Option<PathBuf> = rest.iter().rev().copied().collect();
            let Some(tail) = tail else { return false };
            let climbs = tail
                .components()
                .any(|c| !matches!(c, Component::Normal(_)));
            return !climbs && real.join(tail).starts_with(root);
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_roots() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let roots =
            WorkerRoots::new(&d.join("models"), &d.join("data"), &d.join("adapters")).unwrap();
        std::fs::write(d.join("data/d.jsonl"), "{}").unwrap();
        std::fs::write(d.join("secret.jsonl"), "{}").unwrap();
        std::os::unix::fs::symlink(d.join("secret.jsonl"), d.join("data/link.jsonl")).unwrap();
        assert!(roots.dataset(&d.join("data/d.jsonl")).is_ok());
        let e = roots.dataset(&d.join("secret.jsonl")).unwrap_err();
        assert!(e.contains("training.data_root"), "{e}");
        assert!(roots.dataset(&d.join("data/link.jsonl")).is_err());
        assert!(roots.dataset(Path::new("data/d.jsonl")).is_err());
        assert!(roots.dataset(Path::new("/etc/passwd")).is_err());
        // Outputs that do not exist yet, and ones that climb out.
        assert!(roots.adapter(&d.join("adapters/new/run-1")).is_ok());
        assert!(roots.adapter(&d.join("adapters/new/../../x")).is_err());
        assert!(roots.adapter(&d.join("elsewhere/new")).is_err());
        // The served model, wherever it lies, and models under the root.
        std::fs::write(d.join("served.gguf"), "x").unwrap();
        assert!(roots.model(&d.join("served.gguf")).is_err());
        roots.set_served(&d.join("served.gguf"));
        assert!(roots.model(&d.join("served.gguf")).is_ok());
        std::fs::write(d.join("models/m.gguf"), "x").unwrap();
        assert!(roots.model(&d.join("models/m.gguf")).is_ok());
    }
}
