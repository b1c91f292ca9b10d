//! RMSNorm as transformers computes it, for the decoder's norms and (over each head) q/k norms.

use tch::{Device, Kind, Tensor};

pub(crate) struct RmsNorm {
    /// `[n]`: in the model's dtype, or float32 where the scale is applied in float32.
    pub(crate) weight: Tensor,
    pub(crate) eps: f64,
    /// Gemma's way: `(x̂ · w)` in float32, then cast (Llama's: `w · x̂` cast first). The same in
    /// float32.
    scale_in_float: bool,
}

impl RmsNorm {
    /// `weight` as the checkpoint stores it, plus `offset` (Gemma's `1 + w`: 1 for Hugging Face
    /// weights, 0 for GGUF files, whose converter added it), in float32 before any cast.
    pub(crate) fn new(
        weight: Tensor,
        offset: f32,
        eps: f64,
        scale_in_float: bool,
        kind: Kind,
        device: Device,
    ) -> Self {
        let w = weight.to_kind(Kind::Float);
        let w = if offset != 0.0 {
            w + f64::from(offset)
        } else {
            w
        };
        let kind = if scale_in_float { Kind::Float } else { kind };
        Self {
            weight: w.to_kind(kind).to_device(device).contiguous(),
            eps,
            scale_in_float,
        }
    }

    /// Normalises the last dimension of `x`.
    pub(crate) fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let h = self.weight.size()[0];
        if kind == Kind::Float {
            // One fused op; in float32 it is the same computation.
            return x.rms_norm([h], Some(&self.weight), self.eps);
        }
        let xf = x.to_kind(Kind::Float);
        let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = xf * (var + self.eps).rsqrt();
        if self.scale_in_float {
            (normed * &self.weight).to_kind(kind)
        } else {
            &self.weight * normed.to_kind(kind)
        }
    }
}
