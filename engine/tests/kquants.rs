//! K-quant (and Q5_0 / Q5_1) dequantisation against llama.cpp's own reference: the `gguf` Python package
//! (gguf-py, numpy) dequantises the same random blocks, written by this test with sane f16
//! scales. Q8_K, which gguf-py does not dequantise, is checked by hand. (`loading.rs` loads and
//! runs a GGUF with a Q4_K tensor.)

use std::path::Path;
use std::process::Command;

use half::f16;
use tessera_engine::dequant::dequantize;
use tessera_engine::gguf::GgmlType;

/// splitmix64: reproducible bytes without torch's global generator.
struct Bytes(u64);

impl Bytes {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            *b = self.next() as u8;
        }
    }

    /// A scale of either sign between 1/1024 and 2.
    fn scale(&mut self) -> [u8; 2] {
        let magnitude = 2f32.powf(-((self.next() % 1000) as f32 / 100.0)) * 2.0;
        let sign = if self.next().is_multiple_of(2) {
            1.0
        } else {
            -1.0
        };
        f16::from_f32(sign * magnitude).to_le_bytes()
    }
}

/// `blocks` random blocks of a K-quant with valid f16 fields at `halves` (byte offsets).
fn random_blocks(seed: u64, blocks: usize, block_bytes: usize, halves: &[usize]) -> Vec<u8> {
    let mut rng = Bytes(seed);
    let mut out = vec![0u8; blocks * block_bytes];
    for block in out.chunks_exact_mut(block_bytes) {
        rng.fill(block);
        for &at in halves {
            block[at..at + 2].copy_from_slice(&rng.scale());
        }
    }
    out
}

fn python() -> String {
    std::env::var("TESSERA_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// gguf-py's dequantisation of `bytes` of type `name`, or `None` (with the reason printed) where
/// the package is missing and not required.
fn reference(name: &str, bytes: &[u8], dir: &Path) -> Option<Vec<f32>> {
    let src = dir.join(format!("{name}.bin"));
    let dst = dir.join(format!("{name}.f32"));
    std::fs::write(&src, bytes).unwrap();
    let script = "import sys, numpy as np\n\
                  from gguf import GGMLQuantizationType as T\n\
                  from gguf.quants import dequantize\n\
                  raw = np.fromfile(sys.argv[2], dtype=np.uint8)\n\
                  dequantize(raw, T[sys.argv[1]]).astype(np.float32).tofile(sys.argv[3])\n";
    let has_gguf = Command::new(python())
        .args(["-c", "import gguf.quants, numpy"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_gguf {
        assert!(
            std::env::var_os("TESSERA_REQUIRE_GGUF").is_none(),
            "the gguf package is required (TESSERA_REQUIRE_GGUF) but {} cannot import it",
            python()
        );
        eprintln!(
            "skipping the gguf-py comparison: {} has no `gguf` package",
            python()
        );
        return None;
    }
    let out = Command::new(python())
        .args(["-c", script, name])
        .arg(&src)
        .arg(&dst)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gguf-py failed on {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let raw = std::fs::read(&dst).unwrap();
    Some(
        raw.chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    )
}

#[test]
fn k_quants_and_q5_dequantise_as_gguf_py_does() {
    let dir = tempfile::tempdir().unwrap();
    // (name, type, bytes per block, offsets of its f16 fields)
    // (name, type, bytes per block, offsets of its f16 fields, values per block)
    let kinds: [(&str, GgmlType, usize, &[usize], usize); 7] = [
        ("Q2_K", GgmlType::Q2K, 84, &[80, 82], 256),
        ("Q3_K", GgmlType::Q3K, 110, &[108], 256),
        ("Q4_K", GgmlType::Q4K, 144, &[0, 2], 256),
        ("Q5_K", GgmlType::Q5K, 176, &[0, 2], 256),
        ("Q6_K", GgmlType::Q6K, 210, &[208], 256),
        // llama.cpp's Q4_K_M puts these on rows whose width is not a multiple of 256.
        ("Q5_0", GgmlType::Q5_0, 22, &[0], 32),
        ("Q5_1", GgmlType::Q5_1, 24, &[0, 2], 32),
    ];
    for (i, (name, ty, block_bytes, halves, per_block)) in kinds.into_iter().enumerate() {
        let blocks = 16 * 256 / per_block;
        let bytes = random_blocks(100 + i as u64, blocks, block_bytes, halves);
        let ours = dequantize(name, ty, &bytes, blocks * per_block).unwrap();
        assert_eq!(ours.len(), blocks * per_block);
        assert!(ours.iter().all(|v| v.is_finite()), "{name}");
        assert!(
            ours.iter().filter(|v| **v != 0.0).count() > blocks * per_block / 2,
            "{name}: mostly zeros"
        );
        let Some(want) = reference(name, &bytes, dir.path()) else {
            continue;
        };
        assert_eq!(want.len(), ours.len(), "{name}");
        for (j, (a, b)) in ours.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{name}: element {j} (block {}, index {}): ours {a}, gguf-py {b}",
                j / per_block,
                j % per_block
            );
        }
        eprintln!("{name}: {} values equal to gguf-py's", ours.len());
    }
}

#[test]
fn q8_k_is_scale_times_int8() {
    let mut block = vec![0u8; 292];
    block[..4].copy_from_slice(&0.125f32.to_le_bytes());
    for (i, q) in block[4..260].iter_mut().enumerate() {
        *q = (i as i32 - 128) as i8 as u8;
    }
    let v = dequantize("t", GgmlType::Q8K, &block, 256).unwrap();
    let want: Vec<f32> = (0..256).map(|i| (i as f32 - 128.0) * 0.125).collect();
    assert_eq!(v, want);
}

#[test]
fn a_wrong_size_or_partial_block_is_a_typed_error() {
    let bytes = random_blocks(7, 2, 144, &[0, 2]);
    let err = dequantize("w", GgmlType::Q4K, &bytes[..200], 512).unwrap_err();
    assert!(err.to_string().contains("expected 288"), "{err}");
    let err = dequantize("w", GgmlType::Q4K, &bytes, 500).unwrap_err();
    assert!(err.to_string().contains("256-element blocks"), "{err}");
}
