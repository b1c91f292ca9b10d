//! 4-bit weights kept packed (issue 14): GGUF Q4_0 / Q4_1 / Q4_K linear weights go to torch's int4
//! kernel (`_weight_int4pack_mm_for_cpu`: groups of 32 along the input, one scale and one zero per
//! group, `w = (q - 8) · scale + zero`) without ever being dequantised as a whole. All three map
//! onto that layout exactly: Q4_0 is `(q - 8) · d` (zero 0), Q4_1 is `q · d + m` (zero `m + 8d`),
//! and each 32-element sub-block of Q4_K is `d·sc · q − dmin·m` (its 6-bit scale and min expanded).
//!
//! The kernel takes float32 or bfloat16 activations; which one is faster depends on the CPU
//! (`../shared/notes/cpu-facts.md`), so the packed weight carries the activation dtype chosen at
//! load, and its output comes back in the caller's dtype. LoRA deltas and everything around the
//! matmul are unchanged. A tensor parallel model packs each shard's slice: output rows for q, k,
//! v, gate and up, input columns for o and down (whole 32-column groups; a slice that would split
//! one is dequantised).
//!
//! On CUDA devices the same weights go to torch's CUDA int4 kernel (`_weight_int4pack_mm`,
//! tinygemm: bfloat16 activations, the same groups and `(q − 8)·scale + zero`), packed by
//! `_convert_weight_to_int4pack` from `[rows, cols / 2]` bytes that hold value `2i` in the high
//! nibble of byte `i` and `2i + 1` in the low one ([`Int4Weight::pack_for_cuda`]).

use half::f16;
use tch::{Device, Kind, Tensor};

use crate::gguf::GgmlType;
use crate::int_dot;
use crate::linear::{Held, Linear};

/// Elements per group (a GGUF Q4 block).
pub const GROUP: i64 = 32;

/// How a model holds the 4-bit weights its GGUF file gives it.
///
/// The packed modes hold them on CPU or CUDA devices: `Kernel` on CPUs or CUDA devices (there with
/// bfloat16 activations), `IntDot` on CPUs; a tensor parallel model's shards are packed the same
/// way (`PerUse`, for training, takes one device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int4Mode {
    /// Dequantised at load (the reference path).
    Dense,
    /// Packed for torch's int4 kernel, activations in this dtype: the CPU kernel (float32 or
    /// bfloat16), or on CUDA devices the CUDA one (bfloat16).
    Kernel(Kind),
    /// Kept compact for Tessera's own kernel (`crate::int_dot`): 16-bit activations for
    /// decode-sized batches, dequantised blocks and BLAS for larger ones (one CPU device).
    IntDot,
    /// Kept compact and dequantised one layer at a time, at each use (`linear::Held::Int4PerUse`):
    /// training on a 4-bit base. One device, any kind.
    PerUse,
}

/// A 4-bit weight in groups of 32 along the input: `w = q · scale + min`, `q` in `0..16`. Kept
/// compact (half a byte per value, plus a scale and a min per group); [`Int4Weight::pack`] turns it
/// into the CPU kernel's layout, [`Int4Weight::dequantize`] into floats (the QLoRA path dequantises
/// one layer at a time this way).
pub struct Int4Weight {
    /// `[rows, cols / 2]` uint8, GGUF's Q4 nibble order: byte `j` of group `g` holds value
    /// `32g + j` in its low nibble and `32g + 16 + j` in its high one.
    pub q: Tensor,
    /// `[rows, cols / 32, 2]` float32: (scale, min) per group.
    pub sm: Tensor,
}

/// Appends one group's 32 values (`0..16`, in order) in GGUF's nibble order.
fn push_group(out: &mut Vec<u8>, values: &[u8]) {
    out.extend((0..16).map(|j| (values[j] & 0x0f) | (values[j + 16] << 4)));
}

impl Int4Weight {
    /// Reads a GGUF Q4_0, Q4_1 or Q4_K tensor of `rows × cols` (`None` for other types, or a
    /// shape the kernel cannot take: columns in groups of 32, rows in multiples of 16).
    pub fn from_gguf(ty: GgmlType, bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        let block_bytes = match ty {
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q4K => return Self::from_q4_k(bytes, rows, cols),
            _ => return None,
        };
        let groups = cols / GROUP as usize;
        // The CPU packing takes rows in multiples of 16.
        if !cols.is_multiple_of(GROUP as usize)
            || !rows.is_multiple_of(16)
            || bytes.len() != rows * groups * block_bytes
        {
            return None;
        }
        let mut q = Vec::with_capacity(rows * cols / 2);
        let mut sm = Vec::with_capacity(rows * groups * 2);
        for b in bytes.chunks_exact(block_bytes) {
            let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
            // Q4_0: (q - 8)·d; Q4_1: q·d + m. The nibbles are already in the order kept here.
            let (min, qs) = match ty {
                GgmlType::Q4_0 => (-8.0 * d, &b[2..]),
                _ => (f16::from_le_bytes([b[2], b[3]]).to_f32(), &b[4..]),
            };
            q.extend_from_slice(qs);
            sm.extend([d, min]);
        }
        Some(Self::from_parts(q, sm, rows, cols))
    }

    fn from_parts(q: Vec<u8>, sm: Vec<f32>, rows: usize, cols: usize) -> Self {
        let (rows, cols) = (rows as i64, cols as i64);
        Self {
            q: Tensor::from_slice(&q).reshape([rows, cols / 2]),
            sm: Tensor::from_slice(&sm).reshape([rows, cols / GROUP, 2]),
        }
    }

    /// Q4_K: superblocks of 256 (`d`, `dmin`, eight 6-bit scales and mins, 4-bit values), each
    /// 32-element sub-block `d·sc·q − dmin·m`: scale `d·sc`, min `−dmin·m`.
    fn from_q4_k(bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if !cols.is_multiple_of(256)
            || !rows.is_multiple_of(16)
            || bytes.len() != rows * cols / 256 * 144
        {
            return None;
        }
        let groups = cols / GROUP as usize;
        let mut q = Vec::with_capacity(rows * cols / 2);
        let mut sm = Vec::with_capacity(rows * groups * 2);
        let half = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
        let mut values = [0u8; 32];
        for b in bytes.chunks_exact(144) {
            let (d, dmin) = (half(b, 0), half(b, 2));
            let (scales, qs) = (&b[4..16], &b[16..144]);
            // 32 bytes hold two sub-blocks: the low nibbles one, the high nibbles the next.
            for (chunk, bytes) in qs.chunks_exact(32).enumerate() {
                for (j, shift) in [(2 * chunk, 0), (2 * chunk + 1, 4)] {
                    let (sc, m) = crate::dequant_k::scale_min_k4(j, scales);
                    sm.extend([d * sc, -dmin * m]);
                    for (v, &byte) in values.iter_mut().zip(bytes) {
                        *v = (byte >> shift) & 0x0f;
                    }
                    push_group(&mut q, &values);
                }
            }
        }
        Some(Self::from_parts(q, sm, rows, cols))
    }

    pub fn rows(&self) -> i64 {
        self.q.size()[0]
    }

    pub fn cols(&self) -> i64 {
        self.q.size()[1] * 2
    }

    /// Bytes its tensors hold.
    pub fn bytes(&self) -> u64 {
        tensor_bytes(&self.q) + tensor_bytes(&self.sm)
    }

    /// The same rows reordered by `f` (a function of a `[rows, n]` matrix that permutes rows).
    pub fn map_rows(self, f: impl Fn(&Tensor) -> Tensor) -> Self {
        let (rows, groups) = (self.rows(), self.cols() / GROUP);
        Self {
            q: f(&self.q),
            sm: f(&self.sm.reshape([rows, groups * 2])).reshape([rows, groups, 2]),
        }
    }

    /// The same weight on `device`.
    pub fn to_device(&self, device: Device) -> Self {
        Self {
            q: self.q.to_device(device),
            sm: self.sm.to_device(device),
        }
    }

    /// The values `q` as `[rows, cols / 32, 32]` uint8 in `0..16`, in order.
    fn unpack(&self) -> Tensor {
        let (rows, groups) = (self.rows(), self.cols() / GROUP);
        let q = self.q.reshape([rows, groups, GROUP / 2]);
        Tensor::cat(
            &[q.bitwise_and(0x0f), q.bitwise_right_shift_tensor_scalar(4)],
            -1,
        )
    }

    /// The values as `kind` (`[rows, cols]`): what a dequantising load holds.
    pub fn dequantize(&self, kind: Kind) -> Tensor {
        let (rows, cols) = (self.rows(), self.cols());
        let q = self.unpack().to_kind(Kind::Float);
        let w = self
            .sm
            .narrow(2, 1, 1)
            .addcmul(&q, &self.sm.narrow(2, 0, 1));
        w.reshape([rows, cols]).to_kind(kind)
    }

    /// Its values and (scale, min) pairs, read in place.
    ///
    /// # Safety
    /// The weight must be on the CPU and contiguous, and outlive the slices.
    unsafe fn host(&self) -> (&[u8], &[f32]) {
        (
            std::slice::from_raw_parts(self.q.data_ptr() as *const u8, self.q.numel()),
            std::slice::from_raw_parts(self.sm.data_ptr() as *const f32, self.sm.numel()),
        )
    }

    /// The same weight, contiguous on the CPU (for Tessera's integer kernel).
    pub fn for_int_dot(self) -> Linear {
        Linear::from_held(Held::Int4Dot(Int4Weight {
            q: self.q.to_device(Device::Cpu).contiguous(),
            sm: self.sm.to_device(Device::Cpu).contiguous(),
        }))
    }

    /// `x · wᵀ` on the CPU: 16-bit activations through the integer kernel up to
    /// [`INT_DOT_ROWS`] rows, dequantised blocks and BLAS for more. (Decode calls this a hundred
    /// times a token: it makes as few tensor calls as it can.)
    pub(crate) fn int_dot(&self, x: &Tensor) -> Tensor {
        let (rows, cols) = (self.rows(), self.cols());
        let kind = x.kind();
        let flat = if kind == Kind::Float && x.is_contiguous() {
            x.shallow_clone()
        } else {
            x.to_kind(Kind::Float).contiguous()
        };
        let m = flat.numel() as i64 / cols;
        // SAFETY: `for_int_dot` made both tensors contiguous CPU ones; `self` outlives the call.
        let (q, sm) = unsafe { self.host() };
        let (ucols, groups) = (cols as usize, cols as usize / GROUP as usize);
        let mut shape = x.size();
        *shape.last_mut().expect("a dimension") = rows;
        let y = if m <= INT_DOT_ROWS {
            let y = Tensor::empty(shape.as_slice(), (Kind::Float, Device::Cpu));
            // SAFETY: `flat` is a contiguous float32 CPU tensor, alive and unwritten here; `y` a
            // new contiguous float32 tensor of `m × rows` values, written only here.
            self.kernel_rows(unsafe { int_dot::floats(&flat) }, m as usize, unsafe {
                int_dot::floats_mut(&y)
            });
            y
        } else {
            let flat = flat.view([m, cols]);
            int_dot::blocks_matmul(&flat, rows, cols, |first, n, out| {
                int_dot::dequantize_int4_into(
                    &q[first * ucols / 2..(first + n) * ucols / 2],
                    &sm[first * groups * 2..(first + n) * groups * 2],
                    out,
                )
            })
            .view(shape.as_slice())
        };
        if kind == Kind::Float {
            y
        } else {
            y.to_kind(kind)
        }
    }

    /// The integer kernel on `m` rows of float32 values (`x` `[m, cols]`, `out` `[m, rows]`,
    /// row-major), for a weight made by [`Int4Weight::for_int_dot`].
    pub(crate) fn kernel_rows(&self, x: &[f32], m: usize, out: &mut [f32]) {
        // SAFETY: `for_int_dot` made both tensors contiguous CPU ones; `self` outlives the call.
        let (q, sm) = unsafe { self.host() };
        let xs = int_dot::QuantRows::quantize(x, m, self.cols() as usize);
        int_dot::int4_matmul_into(q, sm, self.rows() as usize, &xs, out);
    }

    /// Rows `start .. start + len`: a column-parallel shard (q, k, v, gate, up).
    pub fn narrow_rows(&self, start: i64, len: i64) -> Self {
        Self {
            q: self.q.narrow(0, start, len).contiguous(),
            sm: self.sm.narrow(0, start, len).contiguous(),
        }
    }

    /// Columns `start .. start + len`: a row-parallel shard (o, down). `None` unless both fall
    /// on group boundaries (a group's scale and min cover 32 columns).
    pub fn narrow_cols(&self, start: i64, len: i64) -> Option<Self> {
        (start % GROUP == 0 && len % GROUP == 0).then(|| Self {
            q: self.q.narrow(1, start / 2, len / 2).contiguous(),
            sm: self.sm.narrow(1, start / GROUP, len / GROUP).contiguous(),
        })
    }

    /// Stacks weights by rows (fused projections).
    pub fn cat(parts: &[&Int4Weight]) -> Self {
        let qs: Vec<&Tensor> = parts.iter().map(|p| &p.q).collect();
        let sms: Vec<&Tensor> = parts.iter().map(|p| &p.sm).collect();
        Self {
            q: Tensor::cat(&qs, 0),
            sm: Tensor::cat(&sms, 0),
        }
    }

    /// Packs it for the CPU kernel, with scales and zeros in `act` (the activation dtype). The
    /// kernel computes `(q − 8)·scale + zero`, so `zero = min + 8·scale`.
    pub fn pack(&self, act: Kind) -> Linear {
        let (rows, cols) = (self.rows(), self.cols());
        let q = self.unpack().reshape([rows, cols]).to_kind(Kind::Int);
        Linear::from_held(Held::Int4Cpu {
            packed: q.internal_convert_weight_to_int4pack_for_cpu(2),
            sz: self.scales_and_zeros().to_kind(act).contiguous(),
            out: rows,
            act,
        })
    }

    /// The kernels' `[cols / 32, rows, 2]` (scale, zero) per group, float32: `zero = min +
    /// 8·scale`, since they compute `(q − 8)·scale + zero`.
    fn scales_and_zeros(&self) -> Tensor {
        let scale = self.sm.narrow(2, 0, 1);
        let zero = self.sm.narrow(2, 1, 1) + &scale * 8.0;
        Tensor::cat(&[scale, zero], 2).transpose(0, 1)
    }

    /// Packs it for torch's CUDA int4 kernel on `device` (bfloat16 activations, scales and
    /// zeros): the values in [`Int4Weight::cuda_bytes`]' order, as many inner k-tiles (8, 4 or
    /// 2 of 16 values) as the columns allow.
    pub fn pack_for_cuda(&self, device: Device) -> Linear {
        let (rows, cols) = (self.rows(), self.cols());
        let inner = [8, 4, 2]
            .into_iter()
            .find(|t| cols % (t * 16) == 0)
            .expect("columns come in groups of 32");
        Linear::from_held(Held::Int4Cuda {
            packed: self
                .cuda_bytes()
                .to_device(device)
                .internal_convert_weight_to_int4pack(inner),
            sz: self
                .scales_and_zeros()
                .to_kind(Kind::BFloat16)
                .to_device(device)
                .contiguous(),
            out: rows,
        })
    }

    /// The values as `[rows, cols / 2]` uint8 in the order torch's CUDA packing reads: value
    /// `2i` of a row in the high nibble of byte `i`, value `2i + 1` in the low nibble.
    pub fn cuda_bytes(&self) -> Tensor {
        let (rows, cols) = (self.rows(), self.cols());
        let values = self.unpack().reshape([rows, cols]).to_kind(Kind::Int);
        let even = values.slice(1, 0, cols, 2);
        let odd = values.slice(1, 1, cols, 2);
        (even * 16 + odd).to_kind(Kind::Uint8).contiguous()
    }
}

/// Rows of activations up to which Tessera's integer kernel runs the integer kernel; more take
/// dequantised blocks and BLAS. On the 2-core EPYC here (SmolLM2, `step_breakdown`), the kernel
/// decoded 16 streams 1.6x faster than the blocks, and 32 on par.
pub const INT_DOT_ROWS: i64 = 32;

/// Bytes a tensor's values take.
pub fn tensor_bytes(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

/// Decode-sized matmul times on this CPU (one row of a SmolLM2-sized projection, `[1, 576]` by
/// `[1536, 576]`): the float32 matmul, torch's int4 kernel with float32 and bfloat16 activations,
/// and Tessera's integer kernel on 16-bit activations.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    pub dense_f32_s: f64,
    pub int4_f32_s: f64,
    pub int4_bf16_s: f64,
    pub int4_dot_s: f64,
}

impl Probe {
    /// The fastest way to hold 4-bit weights packed, with its time.
    pub fn best(&self) -> (Int4Mode, f64) {
        [
            (Int4Mode::Kernel(Kind::Float), self.int4_f32_s),
            (Int4Mode::Kernel(Kind::BFloat16), self.int4_bf16_s),
            (Int4Mode::IntDot, self.int4_dot_s),
        ]
        .into_iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .expect("three candidates")
    }

    /// [`Probe::best`] when it beats the float32 matmul, else `None`.
    pub fn packed_if_faster(&self) -> Option<Int4Mode> {
        let (mode, s) = self.best();
        (s < self.dense_f32_s).then_some(mode)
    }
}

/// Measures [`Probe`] (a few ms): each candidate as a fused decode step runs it
/// ([`Linear::apply_rows`] on one row, inside one parallel region of torch's threads, where a
/// split of Tessera's kernel is cheap and torch's own kernels run on one thread), the best of
/// five rounds (the small CPUs here are noisy from one millisecond to the next).
pub fn probe() -> Probe {
    let (rows, cols) = (1536i64, 576i64);
    let w = Int4Weight {
        q: Tensor::randint(256, [rows, cols / 2], (Kind::Uint8, Device::Cpu)),
        sm: Tensor::rand([rows, cols / GROUP, 2], (Kind::Float, Device::Cpu)),
    };
    let x = Vec::<f32>::try_from(Tensor::randn([cols], (Kind::Float, Device::Cpu)))
        .expect("float32 values");
    let time = |lin: &Linear| {
        let mut out = vec![0f32; rows as usize];
        crate::threads::one_region(|| {
            lin.apply_rows(&x, 1, &mut out);
            (0..5)
                .map(|_| {
                    let t = std::time::Instant::now();
                    for _ in 0..10 {
                        lin.apply_rows(&x, 1, &mut out);
                    }
                    t.elapsed().as_secs_f64() / 10.0
                })
                .fold(f64::INFINITY, f64::min)
        })
    };
    let p = Probe {
        dense_f32_s: time(&Linear::dense(w.dequantize(Kind::Float))),
        int4_f32_s: time(&w.pack(Kind::Float)),
        int4_bf16_s: time(&w.pack(Kind::BFloat16)),
        int4_dot_s: time(
            &Int4Weight {
                q: w.q.shallow_clone(),
                sm: w.sm.shallow_clone(),
            }
            .for_int_dot(),
        ),
    };
    tracing::info!(
        dense_f32_us = p.dense_f32_s * 1e6,
        int4_f32_us = p.int4_f32_s * 1e6,
        int4_bf16_us = p.int4_bf16_s * 1e6,
        int4_dot_us = p.int4_dot_s * 1e6,
        "int4 matmul probe (one decode row)"
    );
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dequant::dequantize;

    fn blocks(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut rng = crate::test_rng::Lcg::new(seed);
        let mut next = || rng.next_u32();
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
            let diff = f64::try_from((w.dequantize(Kind::Float) - &dense).abs().max()).unwrap();
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
        let mut rng = crate::test_rng::Lcg::new(11);
        let mut next = || rng.next_u32() as u8;
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
        let diff = f64::try_from((w.dequantize(Kind::Float) - &dense).abs().max()).unwrap();
        assert!(diff < 1e-5, "{diff}");
        let x = Tensor::randn([4, cols as i64], (Kind::Float, Device::Cpu));
        let got = w.pack(Kind::Float).apply(&x);
        let diff = f64::try_from((got - x.linear::<Tensor>(&dense, None)).abs().max()).unwrap();
        assert!(diff < 1e-3, "{diff}");
    }

    /// What the CUDA packing takes, checked where there is no GPU (the kernel itself:
    /// `tests/packed_cuda.rs`): byte `i` of a row holds value `2i` in its high nibble and `2i + 1`
    /// in its low one, and the kernels' scales and zeros give back the weight by their formula.
    #[test]
    fn cuda_bytes_pair_values_high_nibble_first_and_zeros_follow_the_kernel_formula() {
        let (rows, cols) = (16usize, 96usize);
        let bytes = blocks(GgmlType::Q4_1, rows, cols, 5);
        let w = Int4Weight::from_gguf(GgmlType::Q4_1, &bytes, rows, cols).unwrap();
        let packed = w.cuda_bytes();
        assert_eq!(packed.size(), [rows as i64, cols as i64 / 2]);
        assert_eq!(packed.kind(), Kind::Uint8);
        let packed: Vec<u8> = Vec::try_from(packed.reshape([-1])).unwrap();
        let values = w.unpack().reshape([rows as i64, cols as i64]);
        let values: Vec<u8> = Vec::try_from(values.reshape([-1])).unwrap();
        for (pair, byte) in values.chunks_exact(2).zip(&packed) {
            assert_eq!((byte >> 4, byte & 0x0f), (pair[0], pair[1]));
        }
        // (q − 8)·scale + zero, each group's pair broadcast over its 32 columns.
        let sz = w.scales_and_zeros().transpose(0, 1); // [rows, groups, 2]
        let q = w.unpack().to_kind(Kind::Float); // [rows, groups, 32]
        let rebuilt = (q - 8.0) * sz.narrow(2, 0, 1) + sz.narrow(2, 1, 1);
        let dense =
            Tensor::from_slice(&dequantize("w", GgmlType::Q4_1, &bytes, rows * cols).unwrap());
        let diff = f64::try_from((rebuilt.reshape([-1]) - dense).abs().max()).unwrap();
        assert!(diff < 1e-6, "{diff}");
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
        let (da, db) = (a.dequantize(Kind::Float), b.dequantize(Kind::Float));
        let both = Int4Weight::cat(&[&a, &b]);
        assert!(both
            .dequantize(Kind::Float)
            .equal(&Tensor::cat(&[&da, &db], 0)));
        let flipped = both.map_rows(|t| t.flip([0]));
        assert!(flipped
            .dequantize(Kind::Float)
            .equal(&Tensor::cat(&[&da, &db], 0).flip([0])));
    }
}
