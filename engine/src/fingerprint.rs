//! A model's fingerprint: which weights a path holds, cheap enough to take at every load and to
//! compare across nodes (the head routes a worker's own replicas of the default deployment only
//! when they serve the head's model). SHA-256 over each file's name, size, first and last MiB: a
//! file (GGUF) alone, or a directory's regular files (HF layout) in name order. It tells models
//! apart; it is not a proof against a node that lies.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Bytes hashed at each end of a file.
const EDGE: u64 = 1 << 20;

/// The fingerprint of the model at `path` (a file or a directory), as hex.
pub fn of(path: &Path) -> std::io::Result<String> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.path())
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; EDGE as usize];
    for file in files {
        let (mut f, size) = crate::regular_file::open(&file, None)?;
        let name = file.file_name().unwrap_or_default().to_string_lossy();
        hash.update((name.len() as u64).to_le_bytes());
        hash.update(name.as_bytes());
        hash.update(size.to_le_bytes());
        let head = size.min(EDGE) as usize;
        f.read_exact(&mut buf[..head])?;
        hash.update(&buf[..head]);
        if size > EDGE {
            let tail = (size - EDGE).min(EDGE);
            f.seek(SeekFrom::Start(size - tail))?;
            f.read_exact(&mut buf[..tail as usize])?;
            hash.update(&buf[..tail as usize]);
        }
    }
    Ok(hash
        .finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::of;

    #[test]
    fn equal_models_match_and_a_changed_byte_or_file_does_not() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        for m in [&a, &b] {
            std::fs::create_dir_all(m).unwrap();
            std::fs::write(m.join("config.json"), "{}").unwrap();
            std::fs::write(m.join("model.safetensors"), vec![7u8; 3 << 20]).unwrap();
        }
        assert_eq!(of(&a).unwrap(), of(&b).unwrap());
        let mut w = vec![7u8; 3 << 20];
        *w.last_mut().unwrap() = 8;
        std::fs::write(b.join("model.safetensors"), w).unwrap();
        assert_ne!(of(&a).unwrap(), of(&b).unwrap());
        std::fs::write(a.join("extra.json"), "{}").unwrap();
        let with_extra = of(&a).unwrap();
        std::fs::remove_file(a.join("extra.json")).unwrap();
        assert_ne!(with_extra, of(&a).unwrap());
        assert_eq!(of(&a.join("config.json")).unwrap().len(), 32);
    }
}
