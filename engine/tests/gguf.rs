//! The GGUF reader on files written by the tests: every value type round-trips, and truncated or
//! foreign files give typed errors that say what was being read.

use tessera_engine::gguf::{GgmlType, GgufError, GgufFile, Value};
use tessera_engine::gguf_writer::{GgufWriter, RawTensor};

fn sample() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", Value::String("llama".into()))
        .metadata("llama.block_count", Value::U32(2))
        .metadata("llama.rope.freq_base", Value::F32(10000.0))
        .metadata("test.i64", Value::I64(-5))
        .metadata("test.f64", Value::F64(0.25))
        .metadata("test.bool", Value::Bool(true))
        .metadata(
            "tokenizer.ggml.tokens",
            Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
        )
        .f32_tensor("w", &[2, 3], &[1., 2., 3., 4., 5., 6.])
        .f32_tensor("v", &[3], &[7., 8., 9.]);
    w
}

#[test]
fn metadata_and_tensor_directory_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    sample().write(&path).unwrap();

    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.architecture().unwrap(), "llama");
    assert_eq!(g.get_u64(&g.arch_key("block_count").unwrap()).unwrap(), 2);
    assert_eq!(g.get_f64("llama.rope.freq_base").unwrap(), 10000.0);
    assert_eq!(g.get("test.i64"), Some(&Value::I64(-5)));
    assert_eq!(g.get("test.f64"), Some(&Value::F64(0.25)));
    assert_eq!(g.get("test.bool"), Some(&Value::Bool(true)));
    assert_eq!(g.get_array("tokenizer.ggml.tokens").unwrap().len(), 2);

    let w = g.tensor("w").unwrap();
    assert_eq!(w.shape, vec![2, 3]);
    assert_eq!(w.ggml_type, GgmlType::F32);
    let bytes = g.read_tensor_bytes(w).unwrap();
    let values: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(values, vec![1., 2., 3., 4., 5., 6.]);
    assert_eq!(g.tensor("v").unwrap().offset % 32, 0);
}

#[test]
fn wrong_metadata_type_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    sample().write(&path).unwrap();
    let g = GgufFile::open(&path).unwrap();
    let err = g.get_u64("general.architecture").unwrap_err();
    assert!(matches!(err, GgufError::WrongType { ref key, .. } if key == "general.architecture"));
    let err = g.get_u64("llama.context_length").unwrap_err();
    assert!(err.to_string().contains("llama.context_length"), "{err}");
}

#[test]
fn every_truncation_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = sample().to_bytes();
    let path = dir.path().join("cut.gguf");
    // Cutting anywhere in the header, the directory or the data must fail cleanly, never panic.
    for cut in (0..bytes.len()).step_by(7) {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = GgufFile::open(&path).unwrap_err();
        assert!(
            matches!(
                err,
                GgufError::Truncated { .. } | GgufError::TensorOutOfBounds { .. }
            ),
            "cut at {cut}: {err}"
        );
    }
    std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
    let err = GgufFile::open(&path).unwrap_err();
    assert!(
        matches!(err, GgufError::TensorOutOfBounds { ref name, .. } if name == "v"),
        "{err}"
    );
}

#[test]
fn foreign_files_and_unknown_types_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.gguf");
    std::fs::write(&path, b"PK\x03\x04 definitely not gguf").unwrap();
    assert!(matches!(
        GgufFile::open(&path).unwrap_err(),
        GgufError::BadMagic { .. }
    ));

    let mut w = GgufWriter::new();
    w.tensor(RawTensor {
        name: "blk.0.attn_q.weight".into(),
        shape: vec![4],
        ggml_type: 99,
        data: vec![0; 16],
    });
    w.write(&path).unwrap();
    let err = GgufFile::open(&path).unwrap_err();
    assert!(
        matches!(err, GgufError::UnknownTensorType { ref name, ggml_type: 99, .. } if name == "blk.0.attn_q.weight"),
        "{err}"
    );
}
