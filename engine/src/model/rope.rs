//! Rotary position embeddings: one table of cos/sin per [`config::Rope`] (a model may have two:
//! Gemma 3's local and global), with the frequency scalings transformers implements (linear,
//! Llama 3) and llama.cpp's per-frequency factors.

use tch::{Device, Kind, Tensor};

use super::config::{self, RopeScaling};

/// Precomputed cos/sin for every position, `[max_positions, head_dim]` (halves duplicated). The
/// sin table carries rotate-half's sign (`[-sin, sin]`), so rotating is one `roll`.
pub(crate) struct Rope {
    pub(crate) cos: Tensor,
    pub(crate) sin: Tensor,
}

/// cos and signed sin gathered for a step's positions, shaped to broadcast over the heads axis:
/// `[tokens, 1, head_dim]` for a packed step, `[batch, t, 1, head_dim]` for training.
pub(crate) struct RopeAt {
    cos: Tensor,
    sin: Tensor,
}

/// transformers' inverse frequencies for `spec` (`[head_dim / 2]` float32).
fn inv_freq(spec: &config::Rope, head_dim: i64) -> Tensor {
    let d = head_dim;
    // transformers: 1 / theta ** (arange(0, d, 2).float() / d), in float32.
    let exponents = Tensor::arange_start_step(0, d, 2, (Kind::Int64, Device::Cpu))
        .to_kind(Kind::Float)
        / d as f64;
    let inv = Tensor::pow_scalar(spec.theta, &exponents).reciprocal();
    match &spec.scaling {
        RopeScaling::None => inv,
        RopeScaling::Linear { factor } => inv / *factor,
        RopeScaling::Factors(f) => inv / Tensor::from_slice(f),
        &RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            // transformers' `_compute_llama3_parameters`, op for op.
            let low_freq_wavelen = old / low_freq_factor;
            let high_freq_wavelen = old / high_freq_factor;
            let wavelen = inv.reciprocal() * (2.0 * std::f64::consts::PI);
            let scaled = inv.where_self(&wavelen.le(low_freq_wavelen), &(&inv / factor));
            let smooth = ((wavelen.reciprocal() * old) - low_freq_factor)
                / (high_freq_factor - low_freq_factor);
            let smoothed = (smooth.ones_like() - &smooth) * &scaled / factor + &smooth * &scaled;
            let medium = wavelen
                .ge(high_freq_wavelen)
                .logical_and(&wavelen.le(low_freq_wavelen));
            smoothed.where_self(&medium, &scaled)
        }
    }
}

impl Rope {
    pub(crate) fn new(
        spec: &config::Rope,
        head_dim: usize,
        positions: usize,
        device: Device,
        kind: Kind,
    ) -> Self {
        let inv = inv_freq(spec, head_dim as i64);
        let t = Tensor::arange(positions as i64, (Kind::Float, Device::Cpu));
        let freqs = t.outer(&inv);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let sin = freqs.sin();
        Self {
            cos: emb.cos().to_kind(kind).to_device(device),
            sin: Tensor::cat(&[&sin.neg(), &sin], -1)
                .to_kind(kind)
                .to_device(device),
        }
    }

    /// The tables at `positions` (any shape, on this rope's device), with a heads axis of 1
    /// inserted before `head_dim`.
    pub(crate) fn at(&self, positions: &Tensor) -> RopeAt {
        let mut shape = positions.size();
        let flat = positions.reshape([-1]);
        shape.extend([1, -1]);
        RopeAt {
            cos: self.cos.index_select(0, &flat).reshape(shape.as_slice()),
            sin: self.sin.index_select(0, &flat).reshape(shape.as_slice()),
        }
    }
}

impl RopeAt {
    /// `x`: `[..., heads, head_dim]`. HF's `x·cos + rotate_half(x)·sin`.
    pub(crate) fn apply(&self, x: &Tensor) -> Tensor {
        let half = x.size()[x.dim() - 1] / 2;
        x * &self.cos + x.roll([half], [-1]) * &self.sin
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers' Llama 3.1 frequencies (factor 8, low 1, high 4, 8192 original positions,
    /// theta 500000, head_dim 128) at a few indices, computed with its formula in float64.
    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let spec = config::Rope {
            theta: 500000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
        };
        let got: Vec<f32> = inv_freq(&spec, 128).try_into().unwrap();
        let plain: Vec<f32> = inv_freq(
            &config::Rope {
                theta: 500000.0,
                scaling: RopeScaling::None,
            },
            128,
        )
        .try_into()
        .unwrap();
        for (i, (&g, &p)) in got.iter().zip(&plain).enumerate() {
            let wavelen = 2.0 * std::f64::consts::PI / p as f64;
            let want = if wavelen < 8192.0 / 4.0 {
                p as f64
            } else if wavelen > 8192.0 {
                p as f64 / 8.0
            } else {
                let s = (8192.0 / wavelen - 1.0) / (4.0 - 1.0);
                (1.0 - s) * p as f64 / 8.0 + s * p as f64
            };
            assert!(
                ((g as f64) - want).abs() <= 1e-6 * want.abs(),
                "frequency {i}: {g} vs {want}"
            );
        }
        assert_eq!(got[0], plain[0], "the highest frequency is kept");
        assert!(
            (got[63] / plain[63] - 0.125).abs() < 1e-6,
            "the lowest is divided by 8"
        );
    }
}
