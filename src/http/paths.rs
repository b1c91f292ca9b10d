//! Confines client-given paths (`adapter_path`, `dataset_path`, `output_path`, `base_model`) to
//! configured roots: relative paths are taken under the root, every path is canonicalised
//! (symlinks resolved) and must stay inside it. Outside: 403 naming the field; missing: 400 naming
//! the field. `base_model` may also be the served model, wherever it lies.

use std::path::{Component, Path, PathBuf};

use super::error::AppError;

#[derive(Debug, Clone)]
pub struct Roots {
    /// Adapters are read from and fine-tune outputs written under here.
    pub adapters: PathBuf,
    /// Fine-tune datasets are read from under here.
    pub data: PathBuf,
    /// Fine-tune base models (`base_model`) are read from under here.
    pub models: PathBuf,
    /// The served model (canonical): always allowed as `base_model`.
    pub served_model: PathBuf,
}

impl Roots {
    /// Creates the roots if needed and canonicalises them and the served model.
    pub fn new(
        adapters: &Path,
        data: &Path,
        models: &Path,
        served_model: &Path,
    ) -> std::io::Result<Self> {
        let make = |p: &Path| {
            std::fs::create_dir_all(p)?;
            p.canonicalize()
        };
        Ok(Self {
            adapters: make(adapters)?,
            data: make(data)?,
            models: make(models)?,
            served_model: served_model.canonicalize()?,
        })
    }
}

/// A model to fine-tune from: the served model, or an existing path inside the models root.
pub fn model(field: &str, raw: &str, roots: &Roots) -> Result<PathBuf, AppError> {
    if !raw.is_empty() {
        if let Ok(real) = Path::new(raw).canonicalize() {
            if real == roots.served_model {
                return Ok(real);
            }
        }
    }
    existing(field, raw, &roots.models)
}

fn under(root: &Path, raw: &str) -> PathBuf {
    let p = Path::new(raw);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        root.join(p)
    }
}

/// An existing path inside `root`.
pub fn existing(field: &str, raw: &str, root: &Path) -> Result<PathBuf, AppError> {
    if raw.is_empty() {
        return Err(AppError::invalid(field, "must not be empty"));
    }
    let path = under(root, raw);
    match path.canonicalize() {
        Ok(real) if real.starts_with(root) => Ok(real),
        Ok(_) => Err(outside(field, raw, root)),
        Err(_) => {
            // Say "outside" rather than "missing" for a path that could never be allowed.
            if !lexically_inside(&path, root) {
                Err(outside(field, raw, root))
            } else {
                Err(AppError::bad_request(
                    field,
                    format!("`{raw}` does not exist (under {})", root.display()),
                ))
            }
        }
    }
}

/// A path inside `root` that may not exist yet (an output directory): its deepest existing
/// ancestor is canonicalised and the rest may not contain `..`.
pub fn creatable(field: &str, raw: &str, root: &Path) -> Result<PathBuf, AppError> {
    if raw.is_empty() {
        return Err(AppError::invalid(field, "must not be empty"));
    }
    let path = under(root, raw);
    let mut existing = path.as_path();
    let mut rest: Vec<&std::ffi::OsStr> = Vec::new();
    while !existing.exists() {
        // `file_name` is `None` for a trailing `..`: such a path is refused.
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name);
                existing = parent;
            }
            _ => return Err(outside(field, raw, root)),
        }
    }
    let mut real = existing
        .canonicalize()
        .map_err(|e| AppError::bad_request(field, format!("`{raw}`: {e}")))?;
    for name in rest.iter().rev() {
        if *name == ".." || *name == "." {
            return Err(outside(field, raw, root));
        }
        real.push(name);
    }
    if real.starts_with(root) && real != root {
        Ok(real)
    } else {
        Err(outside(field, raw, root))
    }
}

fn outside(field: &str, raw: &str, root: &Path) -> AppError {
    AppError::forbidden(
        field,
        format!(
            "`{raw}` is outside the allowed directory {}",
            root.display()
        ),
    )
}

/// `path` with `.`/`..` resolved lexically starts with `root`.
fn lexically_inside(path: &Path, root: &Path) -> bool {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out.starts_with(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_confined_to_their_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("served.gguf"), b"x").unwrap();
        let roots = Roots::new(
            &dir.path().join("adapters"),
            &dir.path().join("data"),
            &dir.path().join("models"),
            &dir.path().join("served.gguf"),
        )
        .unwrap();
        let root = &roots.adapters;
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::create_dir_all(dir.path().join("secret")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("link")).unwrap();

        assert_eq!(existing("adapter_path", "a", root).unwrap(), root.join("a"));
        let abs = root.join("a").display().to_string();
        assert_eq!(
            existing("adapter_path", &abs, root).unwrap(),
            root.join("a")
        );
        for bad in ["../secret", "link", "/etc", "a/../../secret"] {
            let e = existing("adapter_path", bad, root).unwrap_err();
            assert_eq!(e.status.as_u16(), 403, "{bad}: {e}");
            assert_eq!(e.field.as_deref(), Some("adapter_path"));
        }
        let e = existing("adapter_path", "nope", root).unwrap_err();
        assert_eq!(e.status.as_u16(), 400, "{e}");

        assert_eq!(
            creatable("output_path", "new/x", root).unwrap(),
            root.join("new/x")
        );
        for bad in ["../out", "link/x", "/tmp/out", "new/../../x", ""] {
            let e = creatable("output_path", bad, root).unwrap_err();
            assert!(matches!(e.status.as_u16(), 403 | 422), "{bad}: {e}");
        }
    }

    #[test]
    fn base_models_are_the_served_one_or_under_the_models_root() {
        let dir = tempfile::tempdir().unwrap();
        let served = dir.path().join("served.gguf");
        std::fs::write(&served, b"x").unwrap();
        let roots = Roots::new(
            &dir.path().join("adapters"),
            &dir.path().join("data"),
            &dir.path().join("models"),
            &served,
        )
        .unwrap();
        std::fs::write(roots.models.join("other.gguf"), b"x").unwrap();
        std::fs::write(dir.path().join("secret.gguf"), b"x").unwrap();
        let served_raw = served.display().to_string();
        assert_eq!(
            model("base_model", &served_raw, &roots).unwrap(),
            roots.served_model
        );
        assert_eq!(
            model("base_model", "other.gguf", &roots).unwrap(),
            roots.models.join("other.gguf")
        );
        let secret = dir.path().join("secret.gguf").display().to_string();
        for bad in [secret.as_str(), "/etc/passwd", "../secret.gguf"] {
            let e = model("base_model", bad, &roots).unwrap_err();
            assert_eq!(e.status.as_u16(), 403, "{bad}: {e}");
            assert_eq!(e.field.as_deref(), Some("base_model"));
        }
        let e = model("base_model", "missing.gguf", &roots).unwrap_err();
        assert_eq!(e.status.as_u16(), 400, "{e}");
    }
}
