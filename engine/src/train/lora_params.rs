//! The trainable LoRA weights of a fine-tune: A initialised as PEFT does (Kaiming-uniform with
//! a = sqrt(5), i.e. uniform in ±1/sqrt(in_features)), B zeros, float32, on the training device;
//! saved and loaded in PEFT's file format and key names.

use std::path::Path;

use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::lora::{LoraBatch, Module, Parts, Proj};
use crate::model::ModelConfig;
use crate::train::hyperparams::Hyperparameters;
use crate::weights::read_safetensors;

pub struct LoraParams {
    /// `weights[layer]` = (module, A `[r, in]`, B `[out, r]`) per targeted module, requiring grad.
    /// A module is one projection, or a fused checkpoint module (Phi-3's `qkv_proj`), whose B
    /// covers its parts' stacked outputs.
    pub weights: Vec<Vec<(Module, Tensor, Tensor)>>,
    pub scale: f64,
    /// Each trained module's parts (projection, first row, rows) in the model.
    parts: Vec<(Module, Parts)>,
}

impl LoraParams {
    pub fn init(config: &ModelConfig, h: &Hyperparameters, device: Device) -> Self {
        use rand::{Rng, SeedableRng};
        let modules = Module::for_targets(&h.targets(), config);
        let opts = (Kind::Float, device);
        // Our own seeded generator: torch's is process-global, shared with concurrent trainers.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(h.seed);
        let weights = (0..config.num_hidden_layers)
            .map(|_| {
                // In the projections' order (what the generator's draws follow).
                let mut layer: Vec<(Module, Tensor, Tensor)> = Proj::ALL
                    .iter()
                    .filter_map(|p| modules.iter().find(|m| m.parts(config)[0].0 == *p))
                    .map(|&module| {
                        let (inp, out) = module.dims(config);
                        let bound = 1.0 / (inp as f64).sqrt();
                        let values: Vec<f32> = (0..h.lora_r * inp)
                            .map(|_| rng.gen_range(-bound..bound) as f32)
                            .collect();
                        let a = Tensor::from_slice(&values)
                            .view([h.lora_r, inp])
                            .to_device(device)
                            .set_requires_grad(true);
                        let b = Tensor::zeros([out, h.lora_r], opts).set_requires_grad(true);
                        (module, a, b)
                    })
                    .collect();
                layer.shrink_to_fit();
                layer
            })
            .collect();
        Self {
            weights,
            scale: h.scale(),
            parts: modules.iter().map(|&m| (m, m.parts(config))).collect(),
        }
    }

    /// The modules it trains, as PEFT names them in `target_modules`.
    pub fn module_names(&self) -> Vec<&'static str> {
        self.parts.iter().map(|(m, _)| m.name()).collect()
    }

    /// Every trainable tensor, in a fixed order (A then B, layer by layer, module by module).
    pub fn tensors(&self) -> Vec<&Tensor> {
        self.weights
            .iter()
            .flatten()
            .flat_map(|(_, a, b)| [a, b])
            .collect()
    }

    /// PEFT key names matching [`Self::tensors`].
    pub fn names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (layer, l) in self.weights.iter().enumerate() {
            for (module, _, _) in l {
                let key = format!("base_model.model.model.layers.{layer}.{}", module.path());
                out.push(format!("{key}.lora_A.weight"));
                out.push(format!("{key}.lora_B.weight"));
            }
        }
        out
    }

    /// The LoRA view the model's forward takes (B × scale, differentiably; a fused module's B
    /// split into its parts' rows).
    pub fn batch(&self, dropout: f64, seed: u64) -> LoraBatch {
        let scaled: Vec<[Option<(Tensor, Tensor)>; 7]> = self
            .weights
            .iter()
            .map(|l| {
                let mut projs: [Option<(Tensor, Tensor)>; 7] = Default::default();
                for (module, a, b) in l {
                    let parts = &self
                        .parts
                        .iter()
                        .find(|(m, _)| m == module)
                        .expect("a module")
                        .1;
                    let b = b * self.scale;
                    for &(proj, start, rows) in parts {
                        projs[proj.index()] = Some((a.shallow_clone(), b.narrow(0, start, rows)));
                    }
                }
                projs
            })
            .collect();
        LoraBatch::for_training(&scaled, dropout, seed)
    }

    /// Writes `adapter_model.safetensors` (PEFT key names) into `dir`.
    pub fn save_weights(&self, dir: &Path) -> Result<(), tch::TchError> {
        let tensors: Vec<(String, Tensor)> = self
            .names()
            .into_iter()
            .zip(self.tensors())
            .map(|(n, t)| (n, t.detach().to_device(Device::Cpu).contiguous()))
            .collect();
        Tensor::write_safetensors(&tensors, dir.join("adapter_model.safetensors"))
    }

    /// Loads weights saved by [`Self::save_weights`] into these parameters (same shapes).
    pub fn load_weights(&mut self, dir: &Path) -> Result<(), String> {
        let path = dir.join("adapter_model.safetensors");
        let saved: std::collections::HashMap<String, Tensor> = read_safetensors(&path)
            .map_err(|e| e.to_string())?
            .into_iter()
            .collect();
        let names = self.names();
        tch::no_grad(|| {
            for (name, t) in names.iter().zip(self.tensors()) {
                let src = saved
                    .get(name)
                    .ok_or_else(|| format!("{}: missing `{name}`", path.display()))?;
                if src.size() != t.size() {
                    return Err(format!(
                        "{}: `{name}` has shape {:?}, expected {:?}",
                        path.display(),
                        src.size(),
                        t.size()
                    ));
                }
                let mut t = t.shallow_clone();
                t.copy_(src);
            }
            Ok(())
        })
    }
}

/// `adapter_config.json` as PEFT writes it for these hyperparameters and `modules` (PEFT's
/// names of the modules trained: [`LoraParams::module_names`]).
pub fn peft_config(h: &Hyperparameters, base_model: &str, modules: &[&str]) -> serde_json::Value {
    let targets = modules;
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": h.lora_r,
        "lora_alpha": h.lora_alpha,
        "lora_dropout": h.lora_dropout,
        "target_modules": targets,
        "bias": "none",
        "use_rslora": h.use_rslora,
        "use_dora": false,
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "modules_to_save": null,
        "inference_mode": true,
    })
}
