//! The one linear type: a weight matrix `[out, in]` (and an optional bias), applied as
//! `x · Wᵀ + b`, however it is held. Which way it is held is decided in one place,
//! [`HoldPolicy`], once per model from the devices, the dtype and the 4-bit mode
//! (`loader::Quantization`); every projection, the embedding and `lm_head` go through it. Callers
//! never branch on the representation: they call [`Linear::apply`] (tensors), [`Linear::apply_rows`]
//! (plain float32 rows, the fused decode step), [`Linear::lookup`] (an embedding table), or the
//! frozen head's [`Linear::frozen_logits`] / [`Linear::input_grad`] (training). candle's `QMatMul`
//! is the pattern.
//!
//! The representations: float (`Dense`); a GGUF Q4 weight packed for torch's CPU int4 kernel or its
//! CUDA one; kept 4-bit for Tessera's integer kernel (`crate::int_dot`); kept 4-bit and dequantised
//! at each use (QLoRA's base); kept Q8_0 (8-bit, the integer kernel at decode sizes).

use tch::{Device, Kind, Tensor};

use crate::packed::{tensor_bytes, Int4Mode, Int4Weight, GROUP, INT_DOT_ROWS};
use crate::q8_weight::Q8Weight;
use crate::weights::{LinearWeight, TableWeight};

/// How a [`Linear`]'s matrix is held.
pub(crate) enum Held {
    Dense(Tensor),
    /// Packed for torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`), scales and zeros
    /// `[in/32, out, 2]`, applied to activations converted to `act`.
    Int4Cpu {
        packed: Tensor,
        sz: Tensor,
        out: i64,
        act: Kind,
    },
    /// Packed for torch's CUDA int4 kernel (`_weight_int4pack_mm`, tinygemm), bfloat16
    /// activations.
    Int4Cuda {
        packed: Tensor,
        sz: Tensor,
        out: i64,
    },
    /// 4-bit, dequantised to the activations' dtype at each use and dropped after it: the QLoRA
    /// path. Differentiable in the input (the kernels are not), on any device.
    Int4PerUse(Int4Weight),
    /// Q8_0 kept 8-bit, multiplied as [`Q8Weight::matmul_t`] says (the integer kernel for
    /// decode-sized batches on the CPU).
    Int8(Q8Weight),
    /// 4-bit on the CPU, multiplied by Tessera's integer kernel on 16-bit activations for
    /// decode-sized batches and by dequantised blocks for larger ones.
    Int4Dot(Int4Weight),
}

/// A linear layer's weight (and bias).
pub struct Linear {
    held: Held,
    /// `[out]`, in the model's dtype.
    bias: Option<Tensor>,
    /// The bias as float32 values, for [`Linear::apply_rows`] (a CPU bias only).
    bias_host: Option<Vec<f32>>,
}

impl Linear {
    pub(crate) fn from_held(held: Held) -> Self {
        Self {
            held,
            bias: None,
            bias_host: None,
        }
    }

    /// A float matrix.
    pub fn dense(w: Tensor) -> Self {
        Self::from_held(Held::Dense(w))
    }

    /// A Q8_0 matrix kept 8-bit.
    pub fn int8(w: Q8Weight) -> Self {
        Self::from_held(Held::Int8(w))
    }

    /// The same layer with `bias` added to its output.
    pub fn with_bias(mut self, bias: Option<Tensor>) -> Self {
        self.bias_host = bias
            .as_ref()
            .filter(|b| b.device() == Device::Cpu)
            .map(|b| Vec::<f32>::try_from(b.to_kind(Kind::Float)).expect("a float bias"));
        self.bias = bias;
        self
    }

    /// `x · Wᵀ + b` for `x` of shape `[..., in]`, in `x`'s dtype.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        let y = match &self.held {
            Held::Dense(w) => x.linear::<Tensor>(w, None),
            Held::Int4Cpu {
                packed,
                sz,
                out,
                act,
            } => int4_kernel(x, *out, *act, |flat| {
                flat.internal_weight_int4pack_mm_for_cpu(packed, GROUP, sz)
            }),
            Held::Int4Cuda { packed, sz, out } => int4_kernel(x, *out, Kind::BFloat16, |flat| {
                flat.contiguous()
                    .internal_weight_int4pack_mm(packed, GROUP, sz)
            }),
            Held::Int4PerUse(w) => x.linear::<Tensor>(&w.dequantize(x.kind()), None),
            Held::Int4Dot(w) => w.int_dot(x),
            Held::Int8(w) => w.matmul_t(x),
        };
        match &self.bias {
            Some(b) => y + b,
            None => y,
        }
    }

    /// `x · Wᵀ + b` for `m` rows of float32 values on the CPU (`x` `[m, in]`, `out` `[m, out]`,
    /// row-major), as [`Linear::apply`] computes it: the integer kernels without making a tensor,
    /// a float32 matrix by [`crate::float_dot::dense_rows`] (split over the step's threads; sums
    /// in another order than BLAS'), any other weight through `apply` on a copy (the fused decode
    /// step's matmul).
    pub fn apply_rows(&self, x: &[f32], m: usize, out: &mut [f32]) {
        match &self.held {
            Held::Int4Dot(w) if m as i64 <= INT_DOT_ROWS => w.kernel_rows(x, m, out),
            Held::Int8(w) if w.kernel_takes(m) => w.kernel_rows(x, m, out),
            Held::Dense(w)
                if m as i64 <= INT_DOT_ROWS
                    && w.kind() == Kind::Float
                    && w.device() == Device::Cpu
                    && w.is_contiguous() =>
            {
                // SAFETY: a contiguous float32 CPU tensor owned by the layer, never written
                // after load.
                crate::float_dot::dense_rows(unsafe { crate::int_dot::floats(w) }, x, m, out)
            }
            _ => {
                let xt = Tensor::from_slice(x).view([m as i64, -1]);
                let y = self.apply(&xt).to_kind(Kind::Float).contiguous();
                y.copy_data(out, out.len());
                return;
            }
        }
        if let Some(b) = &self.bias_host {
            for row in out.chunks_exact_mut(b.len()) {
                for (o, b) in row.iter_mut().zip(b) {
                    *o += b;
                }
            }
        }
    }

    /// Rows `ids` (int64, on the table's device) of an embedding table: `[..ids, in]` in `kind`.
    pub fn lookup(&self, ids: &Tensor, kind: Kind) -> Tensor {
        match &self.held {
            Held::Dense(t) => Tensor::embedding(t, ids, -1, false, false).to_kind(kind),
            Held::Int8(t) => t.lookup(ids, kind),
            _ => unreachable!("tables are held float or Q8_0 (HoldPolicy::table)"),
        }
    }

    /// Rows `ids` of an embedding table into `out` (`[ids, in]` float32) on the CPU.
    pub fn lookup_rows(&self, ids: &[i64], out: &mut [f32]) {
        match &self.held {
            Held::Int8(t) => t.lookup_rows(ids, out),
            _ => {
                let rows = self.lookup(&Tensor::from_slice(ids), Kind::Float);
                rows.copy_data(out, out.len());
            }
        }
    }

    /// A frozen `lm_head` as training's head uses it: `x · Wᵀ` (`x` `[m, in]`, not recorded by
    /// autograd), `[m, out]` float32. A Q8_0 head is read a block of rows at a time (never whole
    /// in float: SmolLM2's was 113 MiB, the largest tensor of a packed trainer's peak).
    pub fn frozen_logits(&self, x: &Tensor) -> Tensor {
        tch::no_grad(|| match &self.held {
            Held::Int8(t) => t.matmul_t_blocks(x),
            _ => self.apply(x).to_kind(Kind::Float),
        })
    }

    /// `g · W`: the gradient of [`Linear::frozen_logits`] with respect to its input, given theirs
    /// (`g` `[m, out]`); `[m, in]` in `kind`.
    pub fn input_grad(&self, g: &Tensor, kind: Kind) -> Tensor {
        tch::no_grad(|| match &self.held {
            Held::Dense(w) => g.to_kind(w.kind()).matmul(w).to_kind(kind),
            Held::Int8(t) => t.matmul_blocks(g).to_kind(kind),
            Held::Int4PerUse(w) => g.matmul(&w.dequantize(g.kind())).to_kind(kind),
            _ => unreachable!("a frozen head is held float, Q8_0 or per use"),
        })
    }

    /// Rows of the output (`out_features`).
    pub fn out_features(&self) -> i64 {
        match &self.held {
            Held::Dense(w) => w.size()[0],
            Held::Int4Cpu { out, .. } | Held::Int4Cuda { out, .. } => *out,
            Held::Int4PerUse(w) | Held::Int4Dot(w) => w.rows(),
            Held::Int8(w) => w.rows(),
        }
    }

    /// Bytes its tensors hold.
    pub fn bytes(&self) -> u64 {
        self.tensors().iter().map(tensor_bytes).sum()
    }

    /// Its tensors (for checks that training leaves the base untouched).
    pub fn tensors(&self) -> Vec<Tensor> {
        let mut out = match &self.held {
            Held::Dense(w) => vec![w.shallow_clone()],
            Held::Int4Cpu { packed, sz, .. } | Held::Int4Cuda { packed, sz, .. } => {
                vec![packed.shallow_clone(), sz.shallow_clone()]
            }
            Held::Int4PerUse(w) | Held::Int4Dot(w) => {
                vec![w.q.shallow_clone(), w.sm.shallow_clone()]
            }
            Held::Int8(w) => w.tensors(),
        };
        out.extend(self.bias.as_ref().map(Tensor::shallow_clone));
        out
    }

    /// The same weight, sharing its storage (a tied `lm_head`).
    pub fn shallow_clone(&self) -> Self {
        let held = match &self.held {
            Held::Dense(w) => Held::Dense(w.shallow_clone()),
            Held::Int8(w) => Held::Int8(w.shallow_clone()),
            _ => unreachable!("only tables are shared"),
        };
        Self {
            held,
            bias: self.bias.as_ref().map(Tensor::shallow_clone),
            bias_host: self.bias_host.clone(),
        }
    }

    /// Whether two layers hold the same storage (a tied `lm_head`).
    pub fn same(&self, other: &Linear) -> bool {
        self.tensors()[0].data_ptr() == other.tensors()[0].data_ptr()
    }

    /// Whether it is held compact (4-bit or 8-bit, any way).
    pub fn is_packed(&self) -> bool {
        !matches!(self.held, Held::Dense(_))
    }

    /// Whether it is held 8-bit.
    pub fn is_8bit(&self) -> bool {
        matches!(self.held, Held::Int8(_))
    }
}

/// torch's int4 kernels on `x` flattened to rows in `act`, back in `x`'s dtype and shape.
fn int4_kernel(x: &Tensor, out: i64, act: Kind, mm: impl Fn(&Tensor) -> Tensor) -> Tensor {
    let size = x.size();
    let cols = size[size.len() - 1];
    let y = mm(&x.reshape([-1, cols]).to_kind(act));
    let mut shape = size;
    *shape.last_mut().expect("a dimension") = out;
    y.to_kind(x.kind()).reshape(shape.as_slice())
}

/// The one place that decides how a model's weights are held, from the 4-bit mode, the devices
/// and the dtype.
#[derive(Debug, Clone, Copy)]
pub struct HoldPolicy {
    int4: Int4Mode,
    kind: Kind,
    /// Q8_0 projections and a Q8_0 embedding / `lm_head` stay 8-bit (packed modes on CPU
    /// devices; QLoRA's single device).
    compact_8bit: bool,
    /// Weights the file gives compact stay compact until [`HoldPolicy::projection`] (4-bit on
    /// CUDA devices too).
    compact: bool,
    /// All devices are the CPU.
    all_cpu: bool,
}

impl HoldPolicy {
    /// Packed projections on CPU devices (and QLoRA's on one device): Q8_0 projections and a Q8_0
    /// embedding / lm_head stay 8-bit too. On CUDA devices 4-bit projections go to torch's CUDA
    /// int4 kernel, 8-bit ones and the tables are dequantised. A mix of CPU and CUDA devices, or
    /// `Dense`, dequantises everything.
    pub fn new(int4: Int4Mode, devices: &[Device], kind: Kind) -> Self {
        let all_cpu = devices.iter().all(|d| *d == Device::Cpu);
        let all_cuda = devices.iter().all(|d| d.is_cuda());
        let compact_8bit = match int4 {
            Int4Mode::Kernel(_) | Int4Mode::IntDot => all_cpu,
            Int4Mode::PerUse => devices.len() == 1,
            Int4Mode::Dense => false,
        };
        let compact = compact_8bit || (matches!(int4, Int4Mode::Kernel(_)) && all_cuda);
        Self {
            int4,
            kind,
            compact_8bit,
            compact,
            all_cpu,
        }
    }

    pub fn int4_mode(&self) -> Int4Mode {
        self.int4
    }

    /// A projection's weight as the file gave it, before sharding: kept compact, or float.
    pub fn before_sharding(&self, w: LinearWeight) -> LinearWeight {
        if self.compact {
            w
        } else {
            LinearWeight::Dense(w.dense())
        }
    }

    /// One shard's projection on `dev` from the parts stacked by rows (q|k|v, gate|up, or one
    /// part): one 8-bit weight where every part is 8-bit (CPU only, not for QLoRA, which keeps
    /// only 4-bit parts compact), one 4-bit weight held as the mode says where every part is
    /// 4-bit (their rows a multiple of 16, as the kernels take them), a float matrix otherwise.
    pub fn projection(&self, parts: Vec<LinearWeight>, dev: Device) -> Linear {
        let int8: Option<Vec<&Q8Weight>> = parts.iter().map(LinearWeight::as_int8).collect();
        let int4s: Option<Vec<&Int4Weight>> = parts.iter().map(LinearWeight::as_int4).collect();
        match (int8, int4s) {
            (Some(ws), _) if self.int4 != Int4Mode::PerUse && dev == Device::Cpu => {
                Linear::int8(Q8Weight::cat(&ws).to_device(dev))
            }
            (_, Some(ws)) if ws.iter().map(|w| w.rows()).sum::<i64>() % 16 == 0 => {
                let w = Int4Weight::cat(&ws);
                match self.int4 {
                    Int4Mode::Kernel(_) if dev.is_cuda() => w.pack_for_cuda(dev),
                    Int4Mode::Kernel(act) => w.pack(act),
                    Int4Mode::IntDot => w.for_int_dot(),
                    _ => Linear::from_held(Held::Int4PerUse(w.to_device(dev))),
                }
            }
            _ => {
                let dense: Vec<Tensor> = parts.into_iter().map(LinearWeight::dense).collect();
                Linear::dense(
                    Tensor::cat(&dense, 0)
                        .to_kind(self.kind)
                        .to_device(dev)
                        .contiguous(),
                )
            }
        }
    }

    /// An embedding or `lm_head` on `dev`: Q8_0 kept 8-bit where the policy keeps 8-bit weights,
    /// float otherwise.
    pub fn table(&self, w: TableWeight, dev: Device) -> Linear {
        match w {
            TableWeight::Q8(t) if self.compact_8bit => Linear::int8(t.to_device(dev)),
            other => Linear::dense(other.dense().to_kind(self.kind).to_device(dev).contiguous()),
        }
    }

    /// Whether decode steps can take the fused path (`model/fused_decode.rs`): one CPU device,
    /// float32, weights held for inference (the packed modes; the dequantised reference path
    /// keeps torch's ops).
    pub fn fuses_decode(&self, devices: usize) -> bool {
        matches!(self.int4, Int4Mode::IntDot | Int4Mode::Kernel(_))
            && self.all_cpu
            && devices == 1
            && self.kind == Kind::Float
    }
}
