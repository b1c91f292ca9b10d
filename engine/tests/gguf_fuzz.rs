//! The GGUF reader against hostile headers: a tiny but complete Llama GGUF is mutated at random
//! (bytes flipped, counts and lengths set to extreme values, cut short, spliced) and every open must
//! return, never panic, overflow, recurse without end or reserve memory out of proportion to the
//! file. A counting allocator records the largest single allocation made while parsing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;

use proptest::prelude::*;
use tessera_engine::gguf::{GgufError, GgufFile, Value};
use tessera_engine::gguf_writer::GgufWriter;

/// The system allocator, remembering per thread the largest allocation asked for.
struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// No single allocation while parsing a small file may exceed this.
const ALLOCATION_LIMIT: usize = 16 << 20;

/// A complete tiny Llama GGUF: the metadata `ModelConfig::from_gguf` reads, a tokenizer vocabulary,
/// a nested array, and two F32 tensors.
fn tiny_gguf() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", Value::String("llama".into()))
        .metadata("general.alignment", Value::U32(32))
        .metadata("llama.embedding_length", Value::U32(8))
        .metadata("llama.attention.head_count", Value::U32(2))
        .metadata("llama.attention.head_count_kv", Value::U32(1))
        .metadata("llama.feed_forward_length", Value::U32(16))
        .metadata("llama.block_count", Value::U32(1))
        .metadata("llama.context_length", Value::U64(64))
        .metadata("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5))
        .metadata("llama.rope.freq_base", Value::F32(10000.0))
        .metadata(
            "tokenizer.ggml.tokens",
            Value::Array((0..6).map(|i| Value::String(format!("t{i}"))).collect()),
        )
        .metadata(
            "tokenizer.ggml.scores",
            Value::Array((0..6).map(|i| Value::F32(i as f32)).collect()),
        )
        .metadata(
            "test.nested",
            Value::Array(vec![
                Value::Array(vec![Value::U8(1), Value::U8(2)]),
                Value::Array(vec![Value::U8(3)]),
            ]),
        )
        .metadata("tokenizer.ggml.eos_token_id", Value::U32(5))
        .f32_tensor("token_embd.weight", &[6, 8], &[0.5; 48])
        .f32_tensor("output_norm.weight", &[8], &[1.0; 8]);
    w.to_bytes()
}

/// Opens `bytes` as a file; returns the parse result and the largest allocation it made.
fn open(dir: &Path, bytes: &[u8]) -> (Result<GgufFile, GgufError>, usize) {
    let path = dir.join("m.gguf");
    std::fs::write(&path, bytes).unwrap();
    LARGEST.with(|l| l.set(0));
    let result = GgufFile::open(&path);
    if let Ok(g) = &result {
        // What a loader does next must not panic either.
        let _ = tessera_engine::model::ModelConfig::from_gguf(g);
        let _ = tessera_engine::loader::read_config(&path);
    }
    (result, LARGEST.with(Cell::get))
}

#[test]
fn the_tiny_file_parses() {
    let dir = tempfile::tempdir().unwrap();
    let (g, _) = open(dir.path(), &tiny_gguf());
    let g = g.unwrap();
    assert_eq!(g.tensors.len(), 2);
    let config = tessera_engine::model::ModelConfig::from_gguf(&g).unwrap();
    assert_eq!(config.max_position_embeddings, 64);
}

/// The 24-byte header of a file claiming `tensors` tensors and `kvs` metadata entries.
fn header(tensors: u64, kvs: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&tensors.to_le_bytes());
    b.extend_from_slice(&kvs.to_le_bytes());
    b
}

#[test]
fn counts_beyond_the_file_are_refused_before_reserving_memory() {
    let dir = tempfile::tempdir().unwrap();
    for (tensors, kvs) in [(1 << 28, 0), (0, 1 << 28), (u64::MAX, 0), (0, u64::MAX)] {
        let (result, largest) = open(dir.path(), &header(tensors, kvs));
        assert!(
            matches!(
                result,
                Err(GgufError::TooLarge { .. } | GgufError::Truncated { .. })
            ),
            "{tensors} tensors, {kvs} kvs: {result:?}"
        );
        assert!(largest < ALLOCATION_LIMIT, "asked for {largest} bytes");
    }
}

#[test]
fn deeply_nested_arrays_are_refused_without_recursing_to_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = header(0, 1);
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b'k');
    b.extend_from_slice(&9u32.to_le_bytes());
    // 200k levels of "array of 1 array": a recursive reader overflows its stack.
    for _ in 0..200_000 {
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
    }
    let (result, largest) = open(dir.path(), &b);
    assert!(
        matches!(result, Err(GgufError::TooLarge { ref what, .. }) if what.contains("nesting")),
        "{result:?}"
    );
    assert!(largest < ALLOCATION_LIMIT, "asked for {largest} bytes");
}

#[test]
fn overflowing_tensor_sizes_and_offsets_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    for (dims, offset) in [
        (vec![1u64 << 40, 1 << 40], 0u64),
        (vec![u64::MAX, 2], 0),
        (vec![4], u64::MAX - 8),
        (vec![u64::MAX], 0),
    ] {
        let mut b = header(1, 0);
        b.extend_from_slice(&1u64.to_le_bytes());
        b.push(b'w');
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in &dims {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        b.resize(b.len() + 64, 0);
        let (result, _) = open(dir.path(), &b);
        assert!(
            matches!(result, Err(GgufError::TensorOutOfBounds { .. })),
            "{dims:?} at {offset}: {result:?}"
        );
    }
}

/// One way to damage a file.
#[derive(Debug, Clone)]
enum Mutation {
    /// Overwrite one byte.
    Byte(usize, u8),
    /// Overwrite 8 bytes with an extreme little-endian u64 (a count, a length, a dim, an offset).
    Word(usize, u64),
    /// Overwrite 4 bytes with a u32 (a value type, a dim count, a ggml type).
    Half(usize, u32),
    /// Cut the file.
    Truncate(usize),
    /// Repeat a slice of the file at another place.
    Splice(usize, usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let word = prop_oneof![
        Just(0u64),
        Just(1),
        Just(9),
        Just(u32::MAX as u64),
        Just(1 << 28),
        Just(1 << 40),
        Just(u64::MAX),
        Just(u64::MAX / 2 + 1),
        any::<u64>(),
    ];
    let half = prop_oneof![
        Just(0u32),
        Just(8),
        Just(9),
        Just(13),
        Just(u32::MAX),
        any::<u32>()
    ];
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Byte(i, b)),
        (any::<usize>(), word).prop_map(|(i, w)| Mutation::Word(i, w)),
        (any::<usize>(), half).prop_map(|(i, h)| Mutation::Half(i, h)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<usize>(), 1usize..64)
            .prop_map(|(a, b, n)| Mutation::Splice(a, b, n)),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    let at = |i: usize, bytes: &Vec<u8>| i % bytes.len();
    match *m {
        Mutation::Byte(i, b) => {
            let i = at(i, bytes);
            bytes[i] = b;
        }
        Mutation::Word(i, w) => {
            let i = at(i, bytes);
            for (k, b) in w.to_le_bytes().into_iter().enumerate() {
                if let Some(slot) = bytes.get_mut(i + k) {
                    *slot = b;
                }
            }
        }
        Mutation::Half(i, h) => {
            let i = at(i, bytes);
            for (k, b) in h.to_le_bytes().into_iter().enumerate() {
                if let Some(slot) = bytes.get_mut(i + k) {
                    *slot = b;
                }
            }
        }
        Mutation::Truncate(i) => {
            let i = at(i, bytes);
            bytes.truncate(i);
        }
        Mutation::Splice(from, to, n) => {
            let from = at(from, bytes);
            let to = at(to, bytes);
            let piece: Vec<u8> = bytes[from..(from + n).min(bytes.len())].to_vec();
            bytes.splice(to..to, piece);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn mutated_headers_never_panic_or_overallocate(mutations in proptest::collection::vec(mutation(), 1..6)) {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = tiny_gguf();
        // Most mutations should hit the header and directory, where the parser lives.
        let header_len = bytes.len();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        let (_, largest) = open(dir.path(), &bytes);
        prop_assert!(
            largest < ALLOCATION_LIMIT,
            "a {}-byte file (from {header_len}) made a {largest}-byte allocation after {mutations:?}",
            bytes.len()
        );
    }
}
