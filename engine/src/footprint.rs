//! How many bytes a model's weights take once loaded in a dtype, read from the file's directory
//! (the GGUF tensor directory, or the safetensors headers) without loading any weight: what a
//! replica needs on its devices before it tries to load.

use std::path::Path;

use tch::Kind;

use crate::gguf::GgufFile;
use crate::loader::LoadError;

/// Bytes of every weight of the model at `path` (a GGUF file or a Hugging Face directory) in
/// `kind`.
pub fn weight_bytes(path: &Path, kind: Kind) -> Result<u64, LoadError> {
    let elements = if path.is_dir() {
        safetensors_elements(path)?
    } else {
        let g = GgufFile::open(path)?;
        g.tensors.iter().map(|t| t.numel() as u64).sum()
    };
    Ok(elements * kind.elt_size_in_bytes() as u64)
}

/// Elements of every tensor of the `*.safetensors` files in `dir` (headers only).
fn safetensors_elements(dir: &Path) -> Result<u64, LoadError> {
    let io = |path: &Path, source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut total = 0u64;
    let entries = std::fs::read_dir(dir).map_err(|e| io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| io(dir, e))?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            continue;
        }
        total += header_elements(&path).map_err(|e| io(&path, e))?;
    }
    Ok(total)
}

/// Elements of the tensors one safetensors file declares: an 8-byte little-endian header length,
/// then a JSON object of `{name: {dtype, shape, data_offsets}}` (and `__metadata__`).
fn header_elements(path: &Path) -> std::io::Result<u64> {
    use std::io::Read;
    let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let (mut file, file_len) = crate::regular_file::open(path, None)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len > file_len.saturating_sub(8) || len > 100 << 20 {
        return Err(invalid(format!("a safetensors header of {len} bytes")));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| invalid(e.to_string()))?;
    Ok(header
        .iter()
        .filter(|(name, _)| name.as_str() != "__metadata__")
        .map(|(_, t)| {
            t["shape"]
                .as_array()
                .map(|dims| {
                    dims.iter()
                        .map(|d| d.as_u64().unwrap_or(0))
                        .product::<u64>()
                })
                .unwrap_or(0)
        })
        .sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_safetensors_header_counts_its_elements() {
        let dir = tempfile::tempdir().unwrap();
        let a = tch::Tensor::zeros([3, 4], (Kind::Float, tch::Device::Cpu));
        let b = tch::Tensor::zeros([5], (Kind::Float, tch::Device::Cpu));
        tch::Tensor::write_safetensors(
            &[("a", &a), ("b", &b)],
            dir.path().join("model.safetensors"),
        )
        .unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        assert_eq!(weight_bytes(dir.path(), Kind::Float).unwrap(), 17 * 4);
        assert_eq!(weight_bytes(dir.path(), Kind::BFloat16).unwrap(), 17 * 2);
    }
}
