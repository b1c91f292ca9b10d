//! Loading models and adapters: a GGUF export of a tiny model gives the logits of its Hugging Face
//! directory (Q/K permutation undone), and corrupt inputs give typed errors that name what is wrong.

mod common;

use std::path::Path;

use common::tiny;
use common::tiny_gguf::write_gguf;
use tch::{Device, Kind, Tensor};
use tessera_engine::dequant::DequantError;
use tessera_engine::loader::LoadError;
use tessera_engine::lora::{LoraAdapter, LoraError};
use tessera_engine::model::Logits;
use tessera_engine::weights::{read_safetensors, WeightsError};

fn prompt_logits(path: &Path) -> Tensor {
    let loaded = tessera_engine::load(path, &[Device::Cpu], Some(Kind::Float)).unwrap();
    let ids: Vec<i64> = loaded
        .tokenizer
        .encode("GGUF or safetensors, 123 the same", false)
        .unwrap()
        .iter()
        .map(|&t| t as i64)
        .collect();
    let mut cache = loaded.model.new_cache(1, ids.len() as i64);
    tch::no_grad(|| {
        loaded.model.forward(
            &Tensor::from_slice(&ids).view([1, -1]),
            &[0],
            &mut cache,
            None,
            Logits::All,
        )
    })
}

#[test]
fn a_gguf_export_gives_the_logits_of_the_hf_directory() {
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny::write_model(&dir.path().join("m"), 4);
    let gguf = dir.path().join("m.gguf");
    write_gguf(&hf, &gguf, None);
    let a = prompt_logits(&hf);
    let b = prompt_logits(&gguf);
    let diff = (&a - &b).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "max |Δlogit| = {diff}");
    // Both files size the same weights without loading them (what a GPU replica checks first).
    let bytes = |p: &Path| tessera_engine::footprint::weight_bytes(p, Kind::BFloat16).unwrap();
    let params = tiny::VOCAB * tiny::HIDDEN * 2
        + tiny::HIDDEN
        + tiny::LAYERS
            * (2 * tiny::HIDDEN
                + tiny::HIDDEN * (tiny::HEADS + 2 * tiny::KV_HEADS) * tiny::HEAD_DIM
                + tiny::HEADS * tiny::HEAD_DIM * tiny::HIDDEN
                + 3 * tiny::HIDDEN * tiny::INTER);
    assert_eq!(bytes(&hf), params as u64 * 2);
    assert_eq!(bytes(&gguf), bytes(&hf));
}

/// Q8_0 projections loaded `packed` stay 8-bit (q/k/v and gate/up fused, Q/K rows unpermuted like
/// the float ones) and give the logits of the same file dequantised: through the integer kernel
/// for a decode-sized prompt and through dequantised blocks for a longer one.
#[test]
fn q8_0_projections_stay_8_bit_when_packed_and_predict_as_dequantised() {
    use tessera_engine::loader::{load_with, Quantization};
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny::write_model(&dir.path().join("m"), 4);
    let gguf = dir.path().join("m.gguf");
    write_gguf(&hf, &gguf, Some(8));
    let load = |q| load_with(&gguf, &[Device::Cpu], Some(Kind::Float), q).unwrap();
    let (dense, packed) = (load(Quantization::Dequantize), load(Quantization::Packed));
    let projections = (tiny::LAYERS * 4) as usize;
    assert!(
        packed
            .weights
            .contains(&format!("{projections}/{projections} projections 8-bit")),
        "{}",
        packed.weights
    );
    let (dense_bytes, none, _) = dense.model.weight_bytes();
    let (packed_bytes, all, _) = packed.model.weight_bytes();
    assert_eq!((none, all), (0, projections));
    assert!(
        packed_bytes * 2 < dense_bytes,
        "{packed_bytes} bytes packed, {dense_bytes} dequantised"
    );
    for len in [7usize, 45] {
        let ids: Vec<i64> = (0..len as i64).map(|i| (i * 37 + 11) % 250).collect();
        let logits = |m: &tessera_engine::model::Model| {
            let mut cache = m.new_cache(1, len as i64);
            tch::no_grad(|| {
                m.forward(
                    &Tensor::from_slice(&ids).view([1, -1]),
                    &[0],
                    &mut cache,
                    None,
                    Logits::All,
                )
            })
        };
        let (want, got) = (logits(&dense.model), logits(&packed.model));
        let diff = (&got - &want).abs().max().double_value(&[]);
        let scale = want.abs().max().double_value(&[]);
        assert!(
            diff < 1e-3 * scale,
            "{len} tokens: max |Δlogit| {diff} of {scale}"
        );
    }
}

#[test]
fn a_gguf_with_an_unsupported_quant_type_names_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny::write_model(&dir.path().join("m"), 4);
    let gguf = dir.path().join("m.gguf");
    write_gguf(&hf, &gguf, Some(9));
    let err = tessera_engine::load(&gguf, &[Device::Cpu], None)
        .err()
        .expect("Q8_1 refused");
    assert!(
        matches!(
            err,
            LoadError::Weights(WeightsError::Dequant(DequantError::Unsupported { .. }))
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("blk.1.ffn_up.weight"), "{err}");
}

#[test]
fn a_gguf_with_a_k_quant_tensor_loads_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny::write_model(&dir.path().join("m"), 4);
    let gguf = dir.path().join("m.gguf");
    write_gguf(&hf, &gguf, Some(12));
    let logits = prompt_logits(&gguf);
    assert!(
        logits.isfinite().all().int64_value(&[]) == 1,
        "non-finite logits"
    );
    // The Q4_K tensor changed the model: not the same logits as the all-f32 GGUF.
    let f32_gguf = dir.path().join("f32.gguf");
    write_gguf(&hf, &f32_gguf, None);
    let diff = (&logits - &prompt_logits(&f32_gguf))
        .abs()
        .max()
        .double_value(&[]);
    assert!(
        diff > 1e-3,
        "the Q4_K weight was not used (max |Δlogit| = {diff})"
    );
}

#[test]
fn truncated_or_incomplete_safetensors_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny::write_model(&dir.path().join("m"), 4);
    let file = hf.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = tessera_engine::load(&hf, &[Device::Cpu], None)
        .err()
        .unwrap();
    assert!(
        matches!(err, LoadError::Weights(WeightsError::Safetensors { .. })),
        "{err:?}"
    );
    // A file with one tensor missing names it.
    let tensors: Vec<(String, Tensor)> = {
        std::fs::write(&file, &bytes).unwrap();
        read_safetensors(&file)
            .unwrap()
            .into_iter()
            .filter(|(n, _)| n != "model.layers.1.mlp.down_proj.weight")
            .collect()
    };
    Tensor::write_safetensors(&tensors, &file).unwrap();
    let err = tessera_engine::load(&hf, &[Device::Cpu], None)
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("model.layers.1.mlp.down_proj.weight"),
        "{err}"
    );
    // No weights at all, and not a model at all.
    std::fs::remove_file(&file).unwrap();
    let err = tessera_engine::load(&hf, &[Device::Cpu], None)
        .err()
        .unwrap();
    assert!(
        matches!(err, LoadError::Weights(WeightsError::NoWeights { .. })),
        "{err:?}"
    );
    let err = tessera_engine::load(&hf.join("config.json"), &[Device::Cpu], None)
        .err()
        .unwrap();
    assert!(matches!(err, LoadError::UnknownFormat { .. }), "{err:?}");
}

fn tiny_config() -> tessera_engine::model::ModelConfig {
    let dir = tempfile::tempdir().unwrap();
    let hf = tiny::write_model(dir.path(), 4);
    tessera_engine::model::ModelConfig::from_hf_json(
        &std::fs::read_to_string(hf.join("config.json")).unwrap(),
    )
    .unwrap()
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("adapter_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

#[test]
fn bad_adapters_are_refused_with_the_reason() {
    let config = tiny_config();
    let root = tempfile::tempdir().unwrap();
    let fresh =
        |name: &str| tiny::write_adapter(&root.path().join(name), 4, 8.0, &["q_proj", "v_proj"], 1);

    let ok = fresh("ok");
    let a = LoraAdapter::load(&ok, &config).unwrap();
    assert_eq!((a.rank, a.scale()), (4, 2.0));

    let rank = fresh("rank");
    edit_config(&rank, |v| v["r"] = 8.into());
    let err = LoraAdapter::load(&rank, &config).unwrap_err();
    assert!(matches!(err, LoraError::Shape { .. }), "{err}");

    let target = fresh("target");
    edit_config(&target, |v| {
        v["target_modules"] = serde_json::json!(["q_proj", "lm_head"])
    });
    let err = LoraAdapter::load(&target, &config).unwrap_err();
    assert!(
        matches!(err, LoraError::UnknownTarget { ref module, .. } if module == "lm_head"),
        "{err}"
    );

    for (name, edit) in [
        ("dora", serde_json::json!({"use_dora": true})),
        ("bias", serde_json::json!({"bias": "all"})),
        ("save", serde_json::json!({"modules_to_save": ["lm_head"]})),
    ] {
        let dir = fresh(name);
        edit_config(&dir, |v| {
            for (k, x) in edit.as_object().unwrap() {
                v[k] = x.clone();
            }
        });
        let err = LoraAdapter::load(&dir, &config).unwrap_err();
        assert!(
            matches!(err, LoraError::Unsupported { .. }),
            "{name}: {err}"
        );
    }

    let trunc = fresh("trunc");
    let file = trunc.join("adapter_model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 10]).unwrap();
    let err = LoraAdapter::load(&trunc, &config).unwrap_err();
    assert!(matches!(err, LoraError::Weights { .. }), "{err}");

    let err = LoraAdapter::load(&root.path().join("missing"), &config).unwrap_err();
    assert!(matches!(err, LoraError::Io { .. }), "{err}");
}

/// A packed model split over 2 and 3 devices (CPU devices stand in for GPUs, as in the tensor
/// parallel tests of `tiny_engine.rs`) keeps each shard's slice packed and gives the logits of
/// the packed model on one device, in both CPU int4 modes, for Q4_0 and Q8_0 projections, with a
/// LoRA adapter on one row: a prompt, then a decode step on the cache. The tiny model's o rows
/// split into 48 columns at degree 2, which would cut a 32-column group: those shards are
/// dequantised and counted so.
#[test]
fn packed_shards_of_a_tensor_parallel_model_predict_like_one_packed_device() {
    use std::sync::Arc;
    use tessera_engine::gguf::GgufFile;
    use tessera_engine::loader::{load_with, Quantization};
    use tessera_engine::lora::LoraBatch;
    use tessera_engine::model::Model;
    use tessera_engine::model::ModelConfig;
    use tessera_engine::packed::Int4Mode;
    use tessera_engine::weights::WeightMap;

    let dir = tempfile::tempdir().unwrap();
    let hf = tiny::write_model(&dir.path().join("m"), 4);
    let adapter = tiny::write_adapter(&dir.path().join("a"), 4, 8.0, &tiny::ALL_TARGETS, 3);
    let prompt: Vec<i64> = vec![256, 84, 104, 101, 32, 113, 117, 105, 99, 107, 32, 98];
    let t = prompt.len() as i64;
    // The logits, bytes held, and projections packed out of how many.
    type Run = (Tensor, u64, usize, usize);
    let logits = |gguf: &Path, devices: &[Device], mode: Int4Mode| -> Run {
        let g = GgufFile::open(gguf).unwrap();
        let config = ModelConfig::from_gguf(&g).unwrap();
        let weights = WeightMap::from_gguf(&g, &config, true).unwrap();
        let model = Model::load(weights, config, devices, Kind::Float, mode).unwrap();
        let (bytes, packed, total) = model.weight_bytes();
        let placed = LoraAdapter::load(&adapter, model.config())
            .unwrap()
            .place(devices, Kind::Float);
        let lora = LoraBatch::new(
            &[Arc::new(placed)],
            &[None, Some(0)],
            model.config().num_hidden_layers,
            devices,
            Kind::Float,
        );
        let tokens = Tensor::from_slice(&prompt).view([1, -1]).repeat([2, 1]);
        let out = tch::no_grad(|| {
            let mut cache = model.new_cache(2, t + 1);
            let all = model.forward(&tokens, &[0, 0], &mut cache, lora.as_ref(), Logits::All);
            let next = Tensor::from_slice(&[5i64, 9]).view([2, 1]);
            let step = model.forward(&next, &[t, t], &mut cache, lora.as_ref(), Logits::Last);
            Tensor::cat(&[all, step], 1)
        });
        (out, bytes, packed, total)
    };
    let per_shard = (tiny::LAYERS * 4) as usize;
    for ggml_type in [2, 8] {
        let gguf = dir.path().join(format!("m{ggml_type}.gguf"));
        write_gguf(&hf, &gguf, Some(ggml_type));
        // Torch's kernel on float32 activations sums in another order per shard; the integer
        // kernel also quantises each shard's slice of the input on its own.
        for (mode, tolerance) in [
            (Int4Mode::Kernel(Kind::Float), 1e-4),
            (Int4Mode::IntDot, 2e-3),
        ] {
            let (one, one_bytes, packed, total) = logits(&gguf, &[Device::Cpu], mode);
            assert_eq!((packed, total), (per_shard, per_shard), "{mode:?}");
            for tp in [2usize, 3] {
                let (many, bytes, packed, total) = logits(&gguf, &vec![Device::Cpu; tp], mode);
                // Degree 2: o's 48 columns a shard split a group, so o is dequantised (one per
                // layer and shard); degree 3: 32 columns, every shard packed.
                let dense_o = if tp == 2 {
                    tiny::LAYERS as usize * tp
                } else {
                    0
                };
                assert_eq!(total, per_shard * tp, "{mode:?}, TP={tp}");
                assert_eq!(packed, total - dense_o, "{mode:?}, TP={tp}");
                // Every shard packed: the shards together hold what one device holds.
                if tp == 3 {
                    assert_eq!(bytes, one_bytes, "{mode:?}");
                }
                let diff = (&many - &one).abs().max().double_value(&[]);
                let scale = one.abs().max().double_value(&[]);
                assert!(
                    diff <= tolerance * scale,
                    "type {ggml_type}, {mode:?}, TP={tp}: max |Δlogit| {diff} of {scale}"
                );
                assert_eq!(
                    many.argmax(-1, false),
                    one.argmax(-1, false),
                    "type {ggml_type}, {mode:?}, TP={tp}"
                );
            }
        }
        // The loader packs them too (its probe picks the kernel), and says so.
        let loaded = load_with(
            &gguf,
            &[Device::Cpu; 3],
            Some(Kind::Float),
            Quantization::Packed,
        )
        .unwrap();
        let all = per_shard * 3;
        assert!(
            loaded.weights.contains(&format!("{all}/{all} projections"))
                && loaded.weights.contains("3 shards"),
            "{}",
            loaded.weights
        );
    }
}
