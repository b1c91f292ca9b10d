//! 4-bit weights kept packed (issue 14): GGUF Q4_0 / Q4_1 / Q4_K linear weights go to torch's int4
//! kernel (`_weight_int4pack_mm_for_cpu`: groups of 32 along the input, one scale and one zero per
//! group, `w = (q - 8) · scale + zero`) without ever being dequantised as a whole. All three map
//! onto that layout exactly: Q4_0 is `(q - 8) · d` (zero 0), Q4_1 is `q · d + m` (zero `m + 8d`),
//! and each 32-element sub-block of Q4_K is `d·sc · q − dmin·m` (its 6-bit scale and min expanded).
//!
//! The kernel takes float32 or bfloat16 activations; which one is faster depends on the CPU
//! (`../shared/notes/cpu-facts.md`), so [`Linear::Int4`] carries the activation dtype chosen at
//! load, and its output comes back in the caller's dtype. LoRA deltas and everything around the
//! matmul are unchanged.

use half::f16;
use tch::{Device, Kind, Tensor};

use crate::gguf::GgmlType;

/// Elements per group (a GGUF Q4 block).
pub const GROUP: i64 = 32;

/// A Q4 weight as the kernel's inputs before packing: the 4-bit values and each group's scale
/// and zero.
pub struct Int4Weight {
    /// `[rows, cols]` int32 in `0..16`.
    pub q: Tensor,
    /// `[rows, cols / 32, 2]` float32: (scale, zero) per group.
    pub sz: Tensor,
}

impl Int4Weight {
    /// Reads a GGUF Q4_0 or Q4_1 tensor of `rows × cols` (`None` for other types, or a shape the
    /// kernel cannot take: columns in groups of 32, rows in multiples of 16).
    pub fn from_gguf(ty: GgmlType, bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        let block_bytes = match ty {
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q4K => return Self::from_q4_k(bytes, rows, cols),
            _ => return None,
        };
        let groups = cols / GROUP as usize;
        // The CPU packing takes rows in multiples of 16.
        if cols % GROUP as usize != 0
            || rows % 16 != 0
            || bytes.len() != rows * groups * block_bytes
        {
            return None;
        }
        let mut q = Vec::with_capacity(rows * cols);
        let mut sz = Vec::with_capacity(rows * groups * 2);
        for b in bytes.chunks_exact(block_bytes) {
            let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
            let (zero, qs) = match ty {
                GgmlType::Q4_0 => (0.0, &b[2..]),
                _ => {
                    let m = f16::from_le_bytes([b[2], b[3]]).to_f32();
                    (m + 8.0 * d, &b[4..])
                }
            };
            q.extend(qs.iter().map(|&v| (v & 0x0f) as i32));
            q.extend(qs.iter().map(|&v| (v >> 4) as i32));
            sz.extend([d, zero]);
        }
        Some(Self {
            q: Tensor::from_slice(&q).reshape([rows as i64, cols as i64]),
            sz: Tensor::from_slice(&sz).reshape([rows as i64, groups as i64, 2]),
        })
    }

    /// Q4_K: superblocks of 256 (`d`, `dmin`, eight 6-bit scales and mins, 4-bit values), each
    /// 32-element sub-block `d·sc·q − dmin·m`, i.e. scale `d·sc` and zero `8·d·sc − dmin·m`.
    fn from_q4_k(bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if cols % 256 != 0 || rows % 16 != 0 || bytes.len() != rows * cols / 256 * 144 {
            return None;
        }
        let groups = cols / GROUP as usize;
        let mut q = Vec::with_capacity(rows * cols);
        let mut sz = Vec::with_capacity(rows * groups * 2);
        let half = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
        for b in bytes.chunks_exact(144) {
            let (d, dmin) = (half(b, 0), half(b, 2));
            let (scales, qs) = (&b[4..16], &b[16..144]);
            for (chunk, values) in qs.chunks_exact(32).enumerate() {
                for (j, high) in [(2 * chunk, false), (2 * chunk + 1, true)] {
                    let (sc, m) = crate::dequant_k::scale_min_k4(j, scales);
                    let (scale, min) = (d * sc, dmin * m);
                    sz.extend([scale, 8.0 * scale - min]);
                    q.extend(values.iter().map(|&v| {
                        if high {
                            (v >> 4) as i32
                        } else {
                            (v & 0x0f) as i32
                        }
                    }));
                }
            }
        }
        Some(Self {
            q: Tensor::from_slice(&q).reshape([rows as i64, cols as i64]),
            sz: Tensor::from_slice(&sz).reshape([rows as i64, groups as i64, 2]),
        })
    }

    pub fn rows(&self) -> i64 {
        self.q.size()[0]
    }

    pub fn cols(&self) -> i64 {
        self.q.size()[1]
    }

    /// The same rows reordered by `f` (a function of a `[rows, n]` matrix that permutes rows).
    pub fn map_rows(self, f: impl Fn(&Tensor) -> Tensor) -> Self {
        let (rows, groups) = (self.rows(), self.cols() / GROUP);
        Self {
            q: f(&self.q),
            sz: f(&self.sz.reshape([rows, groups * 2])).reshape([rows, groups, 2]),
        }
    }

    /// Float32 values (`[rows, cols]`), for paths that need the weight dense.
    pub fn dequantize(&self) -> Tensor {
        let (rows, cols) = (self.rows(), self.cols());
        let q = (self.q.to_kind(Kind::Float) - 8.0).reshape([rows, cols / GROUP, GROUP]);
        (q * self.sz.narrow(2, 0, 1) + self.sz.narrow(2, 1, 1)).reshape([rows, cols])
    }

    /// Stacks weights by rows (fused projections).
    pub fn cat(parts: &[Int4Weight]) -> Self {
        let qs: Vec<&Tensor> = parts.iter().map(|p| &p.q).collect();
        let szs: Vec<&Tensor> = parts.iter().map(|p| &p.sz).collect();
        Self {
            q: Tensor::cat(&qs, 0),
            sz: Tensor::cat(&szs, 0),
        }
    }

    /// Packs it for the CPU kernel, with scales and zeros in `act` (the activation dtype).
    pub fn pack(&self, act: Kind) -> Linear {
        Linear::Int4 {
            packed: self
                .q
                .contiguous()
                .internal_convert_weight_to_int4pack_for_cpu(2),
            sz: self.sz.transpose(0, 1).to_kind(act).contiguous(),
            out: self.rows(),
            act,
        }
    }
}

/// The weight of a linear layer.
pub enum Linear {
    Dense(Tensor),
    /// Packed 4-bit weight `[out, in/2]` uint8, scales and zeros `[in/32, out, 2]`, applied to
    /// activations converted to `act`.
    Int4 {
        packed: Tensor,
        sz: Tensor,
        out: i64,
        act: Kind,
    },
}

impl Linear {
    /// `x · wᵀ` for `x` of shape `[..., in]`.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        match self {
            Linear::Dense(w) => x.linear::<Tensor>(w, None),
            Linear::Int4 {
                packed,
                sz,
                out,
                act,
            } => {
                let size = x.size();
                let cols = size[size.len() - 1];
                let flat = x.reshape([-1, cols]).to_kind(*act);
                let y = flat.internal_weight_int4pack_mm_for_cpu(packed, GROUP, sz);
                let mut shape = size;
                *shape.last_mut().expect("a dimension") = *out;
                y.to_kind(x.kind()).reshape(shape.as_slice())
            }
        }
    }

    /// Rows of the output (`out_features`).
    pub fn out_features(&self) -> i64 {
        match self {
            Linear::Dense(w) => w.size()[0],
            Linear::Int4 { out, .. } => *out,
        }
    }

    /// Bytes its tensors hold.
    pub fn bytes(&self) -> u64 {
        let b = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        match self {
            Linear::Dense(w) => b(w),
            Linear::Int4 { packed, sz, .. } => b(packed) + b(sz),
        }
    }

    /// Its tensors (for checks that training leaves the base untouched).
    pub fn tensors(&self) -> Vec<Tensor> {
        match self {
            Linear::Dense(w) => vec![w.shallow_clone()],
            Linear::Int4 { packed, sz, .. } => vec![packed.shallow_clone(), sz.shallow_clone()],
        }
    }

    pub fn is_packed(&self) -> bool {
        matches!(self, Linear::Int4 { .. })
    }
}

/// Decode-sized matmul times on this CPU (one row of a SmolLM2-sized projection, `[1, 576]` by
/// `[1536, 576]`): the float32 matmul and the int4 kernel with float32 and bfloat16 activations.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    pub dense_f32_s: f64,
    pub int4_f32_s: f64,
    pub int4_bf16_s: f64,
}

impl Probe {
    /// The faster activation dtype of the int4 kernel, with its time.
    pub fn best_int4(&self) -> (Kind, f64) {
        if self.int4_bf16_s < self.int4_f32_s {
            (Kind::BFloat16, self.int4_bf16_s)
        } else {
            (Kind::Float, self.int4_f32_s)
        }
    }

    /// The int4 kernel's activation dtype when it beats the float32 matmul, else `None`.
    pub fn int4_if_faster(&self) -> Option<Kind> {
        let (kind, s) = self.best_int4();
        (s < self.dense_f32_s).then_some(kind)
    }
}

/// Measures [`Probe`] (a few ms).
pub fn probe() -> Probe {
    let (rows, cols) = (1536i64, 576i64);
    let w = Int4Weight {
        q: Tensor::randint(16, [rows, cols], (Kind::Int, Device::Cpu)),
        sz: Tensor::rand([rows, cols / GROUP, 2], (Kind::Float, Device::Cpu)),
    };
    let x = Tensor::randn([1, cols], (Kind::Float, Device::Cpu));
    let time = |lin: &Linear| {
        let _ = lin.apply(&x);
        let t = std::time::Instant::now();
        for _ in 0..20 {
            let _ = lin.apply(&x);
        }
        t.elapsed().as_secs_f64() / 20.0
    };
    let p = Probe {
        dense_f32_s: time(&Linear::Dense(w.dequantize())),
        int4_f32_s: time(&w.pack(Kind::Float)),
        int4_bf16_s: time(&w.pack(Kind::BFloat16)),
    };
    tracing::info!(
        dense_f32_us = p.dense_f32_s * 1e6,
        int4_f32_us = p.int4_f32_s * 1e6,
        int4_bf16_us = p.int4_bf16_s * 1e6,
        "int4 matmul probe (one decode row)"
    );
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dequant::dequantize;

    fn blocks(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let mut out = Vec::new();
        for _ in 0..rows * cols / 32 {
            let d = f16::from_f32(0.001 + (next() % 1000) as f32 * 1e-5);
            out.extend(d.to_le_bytes());
            if ty == GgmlType::Q4_1 {
                let m = f16::from_f32((next() % 2000) as f32 * 1e-5 - 0.01);
                out.extend(m.to_le_bytes());
            }
            out.extend((0..16).map(|_| (next() & 0xff) as u8));
        }
        out
    }

    #[test]
    fn q4_weights_unpack_to_the_dequantised_values_and_multiply_alike() {
        let (rows, cols) = (64usize, 96usize);
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1] {
            let bytes = blocks(ty, rows, cols, 7);
            let dense = Tensor::from_slice(&dequantize("w", ty, &bytes, rows * cols).unwrap())
                .reshape([rows as i64, cols as i64]);
            let w = Int4Weight::from_gguf(ty, &bytes, rows, cols).unwrap();
            let diff = f64::try_from((w.dequantize() - &dense).abs().max()).unwrap();
            assert!(diff < 1e-6, "{ty:?}: {diff}");
            let x = Tensor::randn([3, 5, cols as i64], (Kind::Float, Device::Cpu));
            let want = x.linear::<Tensor>(&dense, None);
            let got = w.pack(Kind::Float).apply(&x);
            assert_eq!(got.size(), [3, 5, rows as i64]);
            let diff = f64::try_from((got - &want).abs().max()).unwrap();
            assert!(diff < 1e-4, "{ty:?} float32 activations: {diff}");
            let got = w.pack(Kind::BFloat16).apply(&x);
            assert_eq!(got.kind(), Kind::Float);
            let rel = f64::try_from((got - &want).abs().max()).unwrap()
                / f64::try_from(want.abs().max()).unwrap();
            assert!(rel < 0.02, "{ty:?} bfloat16 activations: {rel}");
        }
        assert!(Int4Weight::from_gguf(GgmlType::Q8_0, &[], 1, 32).is_none());
    }

    #[test]
    fn q4_k_weights_unpack_to_the_dequantised_values() {
        let (rows, cols) = (32usize, 512usize);
        let mut state = 11u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u8
        };
        let bytes: Vec<u8> = (0..rows * cols / 256)
            .flat_map(|_| {
                let mut block = vec![0u8; 144];
                block[..2].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
                block[2..4].copy_from_slice(&f16::from_f32(0.004).to_le_bytes());
                for b in &mut block[4..] {
                    *b = next();
                }
                block
            })
            .collect();
        let dense =
            Tensor::from_slice(&dequantize("w", GgmlType::Q4K, &bytes, rows * cols).unwrap())
                .reshape([rows as i64, cols as i64]);
        let w = Int4Weight::from_gguf(GgmlType::Q4K, &bytes, rows, cols).unwrap();
        let diff = f64::try_from((w.dequantize() - &dense).abs().max()).unwrap();
        assert!(diff < 1e-5, "{diff}");
        let x = Tensor::randn([4, cols as i64], (Kind::Float, Device::Cpu));
        let got = w.pack(Kind::Float).apply(&x);
        let diff = f64::try_from((got - x.linear::<Tensor>(&dense, None)).abs().max()).unwrap();
        assert!(diff < 1e-3, "{diff}");
    }

    #[test]
    fn stacked_and_reordered_rows_stay_with_their_scales() {
        let (rows, cols) = (32usize, 64usize);
        let a = Int4Weight::from_gguf(
            GgmlType::Q4_1,
            &blocks(GgmlType::Q4_1, rows, cols, 1),
            rows,
            cols,
        )
        .unwrap();
        let b = Int4Weight::from_gguf(
            GgmlType::Q4_1,
            &blocks(GgmlType::Q4_1, rows, cols, 2),
            rows,
            cols,
        )
        .unwrap();
        let (da, db) = (a.dequantize(), b.dequantize());
        let both = Int4Weight::cat(&[a, b]);
        assert!(both.dequantize().equal(&Tensor::cat(&[&da, &db], 0)));
        let flipped = both.map_rows(|t| t.flip([0]));
        assert!(flipped
            .dequantize()
            .equal(&Tensor::cat(&[&da, &db], 0).flip([0])));
    }
}
