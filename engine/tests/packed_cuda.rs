//! 4-bit weights kept packed on a GPU (issue 14): torch's CUDA int4 kernel. These tests need a
//! CUDA device, so they are `#[ignore]`d (CI has none; what the kernel is fed is checked on the
//! CPU by `packed::tests`); `scripts/gpu-check.sh` runs them on a GPU machine with
//! `--include-ignored`, and run without a GPU they fail saying so.
//!
//! - A weight packed for the CUDA kernel multiplies like its dequantised values, for each number
//!   of inner k-tiles the packing picks (2, 4, 8) and for decode- and prefill-sized inputs.
//! - A tiny model written as a Q4_0 GGUF and loaded packed on the GPU holds its projections 4-bit
//!   and predicts like the same file dequantised on the GPU (both bfloat16).
//! - The same model split three ways over the GPU (tensor parallel) packs every shard and
//!   predicts like it on one.
//! - SmolLM2 packed on the GPU gives the reference prompts' next tokens (transformers').

mod common;

use common::tiny;
use common::tiny_gguf::write_gguf;
use tch::{Device, Kind, Tensor};
use tessera_engine::gguf::GgmlType;
use tessera_engine::loader::{load_with, Quantization};
use tessera_engine::model::{Logits, Model};
use tessera_engine::packed::Int4Weight;

fn cuda() -> Device {
    assert!(
        tch::Cuda::is_available(),
        "no CUDA device here: run these on a GPU machine (scripts/gpu-check.sh)"
    );
    Device::Cuda(0)
}

/// Random Q4_1 blocks for a `rows × cols` weight.
fn q4_1_blocks(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut out = Vec::new();
    for _ in 0..rows * cols / 32 {
        let d = half::f16::from_f32(0.001 + (next() % 1000) as f32 * 1e-5);
        let m = half::f16::from_f32((next() % 2000) as f32 * 1e-5 - 0.01);
        out.extend(d.to_le_bytes());
        out.extend(m.to_le_bytes());
        out.extend((0..16).map(|_| next() as u8));
    }
    out
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh"]
fn a_weight_packed_for_cuda_multiplies_like_its_dequantised_values() {
    let gpu = cuda();
    // 96 columns take 2 inner k-tiles, 576 (SmolLM2's hidden size) 4, 2048 8.
    for (rows, cols) in [(64usize, 96usize), (192, 576), (256, 2048)] {
        let bytes = q4_1_blocks(rows, cols, cols as u64);
        let w = Int4Weight::from_gguf(GgmlType::Q4_1, &bytes, rows, cols).unwrap();
        let dense = w.dequantize(Kind::Float);
        let packed = w.pack_for_cuda(gpu);
        assert!(packed.is_packed());
        for m in [1i64, 7, 33, 300] {
            let x = Tensor::randn([m, cols as i64], (Kind::Float, Device::Cpu));
            let want = x.linear::<Tensor>(&dense, None);
            let got = packed
                .apply(&x.to_device(gpu).to_kind(Kind::BFloat16))
                .to_kind(Kind::Float)
                .to_device(Device::Cpu);
            assert_eq!(got.size(), [m, rows as i64]);
            let rel =
                (got - &want).abs().max().double_value(&[]) / want.abs().max().double_value(&[]);
            // bfloat16 activations, scales and zeros: ~2^-8 relative each.
            assert!(rel < 0.03, "{rows}x{cols}, {m} rows: relative error {rel}");
        }
    }
}

/// Every position's logits of `ids` (one sequence from position 0), float32 on the CPU.
fn logits(model: &Model, ids: &[i64]) -> Tensor {
    let mut cache = model.new_cache(1, ids.len() as i64);
    tch::no_grad(|| {
        model.forward(
            &Tensor::from_slice(ids).view([1, -1]),
            &[0],
            &mut cache,
            None,
            Logits::All,
        )
    })
    .squeeze_dim(0)
    .to_kind(Kind::Float)
    .to_device(Device::Cpu)
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh"]
fn a_tiny_q4_0_model_packed_on_cuda_predicts_like_it_dequantised() {
    let gpu = cuda();
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny::write_model(&dir.path().join("m"), 3);
    let gguf = dir.path().join("m.gguf");
    write_gguf(&hf, &gguf, Some(2));
    let load = |q| load_with(&gguf, &[gpu], Some(Kind::BFloat16), q).unwrap();
    let (packed, dense) = (load(Quantization::Packed), load(Quantization::Dequantize));
    let projections = (tiny::LAYERS * 4) as usize;
    let (packed_bytes, n_packed, total) = packed.model.weight_bytes();
    assert_eq!(
        (n_packed, total),
        (projections, projections),
        "{}",
        packed.weights
    );
    assert!(
        packed.weights.contains("CUDA int4 kernel"),
        "{}",
        packed.weights
    );
    let (dense_bytes, _, _) = dense.model.weight_bytes();
    assert!(
        packed_bytes < dense_bytes,
        "{packed_bytes} vs {dense_bytes}"
    );
    let ids: Vec<i64> = (0..40).map(|i| (i * 37 + 11) % tiny::VOCAB).collect();
    assert_predict_alike(&logits(&dense.model, &ids), &logits(&packed.model, &ids));
}

/// bfloat16 logits of the same model two ways: within 5% of the largest, and the same top token
/// at 90% of the positions or more.
fn assert_predict_alike(want: &Tensor, got: &Tensor) {
    let rel = (got - want).abs().max().double_value(&[]) / want.abs().max().double_value(&[]);
    assert!(rel < 0.05, "relative logit difference {rel}");
    let agree = got
        .argmax(-1, false)
        .eq_tensor(&want.argmax(-1, false))
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[]);
    assert!(agree >= 0.9, "top-1 agreement {agree}");
}

/// Tensor parallel over the one GPU listed three times (each shard its own CUDA tensors, as on
/// three GPUs): every shard's slice packed for the CUDA kernel, the same predictions as one.
#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh"]
fn a_tiny_q4_0_model_packed_in_three_cuda_shards_predicts_like_one() {
    let gpu = cuda();
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny::write_model(&dir.path().join("m"), 3);
    let gguf = dir.path().join("m.gguf");
    write_gguf(&hf, &gguf, Some(2));
    let load = |devices: &[Device]| {
        load_with(&gguf, devices, Some(Kind::BFloat16), Quantization::Packed).unwrap()
    };
    let (one, three) = (load(&[gpu]), load(&[gpu; 3]));
    let all = (tiny::LAYERS * 4 * 3) as usize;
    let (_, packed, total) = three.model.weight_bytes();
    assert_eq!((packed, total), (all, all), "{}", three.weights);
    assert!(
        three.weights.contains("CUDA int4 kernel"),
        "{}",
        three.weights
    );
    let ids: Vec<i64> = (0..40).map(|i| (i * 53 + 7) % tiny::VOCAB).collect();
    assert_predict_alike(&logits(&one.model, &ids), &logits(&three.model, &ids));
}

#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh"]
fn smollm2_packed_on_cuda_gives_the_reference_next_tokens() {
    let gpu = cuda();
    let loaded = load_with(
        &common::smollm2_path(),
        &[gpu],
        Some(Kind::BFloat16),
        Quantization::Packed,
    )
    .unwrap();
    assert!(
        loaded.weights.contains("CUDA int4 kernel"),
        "{}",
        loaded.weights
    );
    let reference = common::reference();
    for case in reference["base"].as_array().unwrap() {
        let ids = common::input_ids(case);
        let top = logits(&loaded.model, &ids)
            .get(ids.len() as i64 - 1)
            .argmax(-1, false)
            .int64_value(&[]);
        let want = common::next_token(case);
        assert_eq!(top, want, "prompt {:?}", case["prompt"]);
    }
}
