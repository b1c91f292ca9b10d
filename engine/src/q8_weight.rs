//! A Q8_0 matrix (or a Q5_0 one, exactly) kept 8-bit (issue 14): a token table (the embedding, and the `lm_head` it is tied
//! to) or a projection, as int8 values with one float32 scale per 32 (GGUF's Q8_0, `w = d·q`), a
//! quarter of float32's bytes. A lookup dequantises only the rows it reads. The matmul reads the
//! int8 rows with the integer kernel (`crate::int_dot`) for decode-sized batches, and dequantises
//! blocks of rows for BLAS otherwise (the whole matrix at once when autograd needs the graph).
//! Training's head takes its logits and their gradient by blocks without autograd
//! ([`Q8Weight::matmul_t_blocks`], [`Q8Weight::matmul_blocks`]).

use half::f16;
use tch::{Device, Kind, Tensor};

use crate::gguf::GgmlType;
use crate::int_dot;
use crate::packed::tensor_bytes;

const GROUP: usize = 32;
/// Rows of activations up to which the int8 kernel runs; more go to blocks + BLAS (the kernel
/// measured faster up to 32 rows on the CPUs here, as `Linear::Int4Dot`'s).
const KERNEL_ROWS: i64 = crate::packed::INT_DOT_ROWS;
/// Table rows dequantised at once on the autograd-free path off the CPU.
const BLOCK_ROWS: i64 = 1024;

/// A `[rows, cols]` matrix in Q8_0.
pub struct Q8Weight {
    /// `[rows, cols]` int8.
    q: Tensor,
    /// `[rows, cols / 32]` float32.
    d: Tensor,
}

impl Q8Weight {
    /// Reads a GGUF Q8_0 tensor of `rows × cols`, or a Q5_0 one, whose values `(q − 16)·d` are
    /// 8-bit values with the same scale exactly (`None` for another type or a partial block).
    pub fn from_gguf(ty: GgmlType, bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        let block_bytes = match ty {
            GgmlType::Q8_0 => 34,
            GgmlType::Q5_0 => 22,
            _ => return None,
        };
        if !cols.is_multiple_of(GROUP) || bytes.len() != rows * cols / GROUP * block_bytes {
            return None;
        }
        let mut q = Vec::with_capacity(rows * cols);
        let mut d = Vec::with_capacity(rows * cols / GROUP);
        for b in bytes.chunks_exact(block_bytes) {
            d.push(f16::from_le_bytes([b[0], b[1]]).to_f32());
            if ty == GgmlType::Q8_0 {
                q.extend(b[2..].iter().map(|&v| v as i8));
            } else {
                q.extend(crate::dequant::q5_values(&b[2..]).map(|v| v as i8 - 16));
            }
        }
        let (rows, cols) = (rows as i64, cols as i64);
        Some(Self {
            q: Tensor::from_slice(&q).reshape([rows, cols]),
            d: Tensor::from_slice(&d).reshape([rows, cols / GROUP as i64]),
        })
    }

    pub fn rows(&self) -> i64 {
        self.q.size()[0]
    }

    pub fn cols(&self) -> i64 {
        self.q.size()[1]
    }

    /// Bytes its tensors hold.
    pub fn bytes(&self) -> u64 {
        tensor_bytes(&self.q) + tensor_bytes(&self.d)
    }

    /// The same table on `device`.
    pub fn to_device(&self, device: Device) -> Self {
        Self {
            q: self.q.to_device(device),
            d: self.d.to_device(device),
        }
    }

    /// The same rows reordered by `f` (a function of a `[rows, n]` matrix that permutes rows).
    pub fn map_rows(self, f: impl Fn(&Tensor) -> Tensor) -> Self {
        Self {
            q: f(&self.q).contiguous(),
            d: f(&self.d).contiguous(),
        }
    }

    /// Rows `start .. start + len`: a column-parallel shard.
    pub fn narrow_rows(&self, start: i64, len: i64) -> Self {
        Self {
            q: self.q.narrow(0, start, len).contiguous(),
            d: self.d.narrow(0, start, len).contiguous(),
        }
    }

    /// Columns `start .. start + len`: a row-parallel shard. `None` unless both fall on block
    /// boundaries (a block's scale covers 32 columns).
    pub fn narrow_cols(&self, start: i64, len: i64) -> Option<Self> {
        let group = GROUP as i64;
        (start % group == 0 && len % group == 0).then(|| Self {
            q: self.q.narrow(1, start, len).contiguous(),
            d: self.d.narrow(1, start / group, len / group).contiguous(),
        })
    }

    /// Stacks matrices by rows (fused projections).
    pub fn cat(parts: &[&Q8Weight]) -> Self {
        let qs: Vec<&Tensor> = parts.iter().map(|p| &p.q).collect();
        let ds: Vec<&Tensor> = parts.iter().map(|p| &p.d).collect();
        Self {
            q: Tensor::cat(&qs, 0),
            d: Tensor::cat(&ds, 0),
        }
    }

    /// Another handle on the same tensors (a tied `lm_head`).
    pub fn shallow_clone(&self) -> Self {
        Self {
            q: self.q.shallow_clone(),
            d: self.d.shallow_clone(),
        }
    }

    pub fn tensors(&self) -> Vec<Tensor> {
        vec![self.q.shallow_clone(), self.d.shallow_clone()]
    }

    /// Rows `from .. from + n` as `kind`.
    fn block(&self, from: i64, n: i64, kind: Kind) -> Tensor {
        let groups = self.cols() / GROUP as i64;
        let q = self.q.narrow(0, from, n).to_kind(Kind::Float);
        let d = self.d.narrow(0, from, n).unsqueeze(-1);
        (q.reshape([n, groups, GROUP as i64]) * d)
            .reshape([n, self.cols()])
            .to_kind(kind)
    }

    /// The whole table as `kind` (`[rows, cols]`).
    pub fn dequantize(&self, kind: Kind) -> Tensor {
        self.block(0, self.rows(), kind)
    }

    /// The rows `ids` (any shape, int64) as `kind`: `[..ids, cols]`.
    pub fn lookup(&self, ids: &Tensor, kind: Kind) -> Tensor {
        let flat = ids.reshape([-1]).to_device(self.q.device());
        let n = flat.size()[0];
        let groups = self.cols() / GROUP as i64;
        let q = self.q.index_select(0, &flat).to_kind(Kind::Float);
        let d = self.d.index_select(0, &flat).unsqueeze(-1);
        let mut shape = ids.size();
        shape.push(self.cols());
        (q.reshape([n, groups, GROUP as i64]) * d)
            .reshape(shape.as_slice())
            .to_kind(kind)
    }

    /// `x · tableᵀ` for `x` of shape `[..., cols]`: `[..., rows]` in `x`'s dtype.
    pub fn matmul_t(&self, x: &Tensor) -> Tensor {
        let size = x.size();
        let cols = self.cols();
        let flat = x.reshape([-1, cols]);
        let m = flat.size()[0];
        let cpu = self.q.device() == Device::Cpu;
        let y = if m <= KERNEL_ROWS && !x.requires_grad() && cpu {
            self.kernel(&flat.to_kind(Kind::Float).contiguous())
                .to_kind(x.kind())
        } else if !x.requires_grad() && cpu {
            self.blocks(&flat.to_kind(Kind::Float).contiguous())
                .to_kind(x.kind())
        } else if x.requires_grad() {
            // Under autograd, one block: the gradient `∂y · table` is then the float model's
            // own matmul, bit for bit (a sum over blocks would round differently).
            flat.linear::<Tensor>(&self.dequantize(x.kind()), None)
        } else {
            self.device_blocks(&flat, x.kind())
        };
        let mut shape = size;
        *shape.last_mut().expect("a dimension") = self.rows();
        y.reshape(shape.as_slice())
    }

    /// `x · tableᵀ` in float32 by blocks of dequantised rows, never the whole table at once, and
    /// without autograd (training's head on a packed base: [`Q8Weight::matmul_blocks`] gives the
    /// input's gradient). `x` `[m, cols]` → `[m, rows]` float32.
    pub fn matmul_t_blocks(&self, x: &Tensor) -> Tensor {
        let x = x.to_kind(Kind::Float).contiguous();
        if self.q.device() == Device::Cpu {
            self.blocks(&x)
        } else {
            self.device_blocks(&x, Kind::Float)
        }
    }

    /// `g · table` in float32 by blocks of dequantised rows: the gradient of `x · tableᵀ` with
    /// respect to `x`, given the output's gradient `g` `[m, rows]`. `[m, cols]` float32.
    pub fn matmul_blocks(&self, g: &Tensor) -> Tensor {
        let g = g.to_kind(Kind::Float).contiguous();
        if self.q.device() == Device::Cpu {
            // SAFETY: a CPU table (checked).
            let rows = unsafe { self.row_writer() };
            return int_dot::blocks_matmul_back(&g, self.rows(), self.cols(), rows);
        }
        let mut out = Tensor::zeros([g.size()[0], self.cols()], (Kind::Float, g.device()));
        for from in (0..self.rows()).step_by(BLOCK_ROWS as usize) {
            let n = BLOCK_ROWS.min(self.rows() - from);
            let _ = out.addmm_(&g.narrow(1, from, n), &self.block(from, n, Kind::Float));
        }
        out
    }

    /// `x · tableᵀ` off the CPU, `BLOCK_ROWS` rows of the table dequantised to `kind` at a time:
    /// `x` `[m, cols]` → `[m, rows]`.
    fn device_blocks(&self, x: &Tensor, kind: Kind) -> Tensor {
        let parts: Vec<Tensor> = (0..self.rows())
            .step_by(BLOCK_ROWS as usize)
            .map(|from| {
                let n = BLOCK_ROWS.min(self.rows() - from);
                x.linear::<Tensor>(&self.block(from, n, kind), None)
            })
            .collect();
        Tensor::cat(&parts, 1)
    }

    /// Its values and scales, read in place.
    ///
    /// # Safety
    /// The table must be on the CPU, and outlive the slices.
    unsafe fn host(&self) -> (&[i8], &[f32]) {
        (
            std::slice::from_raw_parts(self.q.data_ptr() as *const i8, self.q.numel()),
            std::slice::from_raw_parts(self.d.data_ptr() as *const f32, self.d.numel()),
        )
    }

    /// Blocks of rows dequantised into one cache-sized float32 buffer, each multiplied by BLAS:
    /// `x` `[m, cols]` float32 contiguous on the CPU → `[m, rows]` float32.
    fn blocks(&self, x: &Tensor) -> Tensor {
        // SAFETY: a CPU table (the caller checked).
        let rows = unsafe { self.row_writer() };
        int_dot::blocks_matmul(x, self.rows(), self.cols(), rows)
    }

    /// `(first, n, out)` ↦ rows `first .. first + n` dequantised into `out` as float32: the
    /// `dequantize` of `int_dot`'s block products.
    ///
    /// # Safety
    /// The table must be on the CPU, and outlive the closure.
    unsafe fn row_writer(&self) -> impl Fn(usize, usize, &mut [f32]) + Sync + '_ {
        let cols = self.cols() as usize;
        let groups = cols / GROUP;
        // SAFETY: the caller's (a CPU table); contiguous since `from_gguf`.
        let (qs, ds) = unsafe { self.host() };
        move |first, n, out| {
            int_dot::dequantize_int8_into(
                &qs[first * cols..(first + n) * cols],
                &ds[first * groups..(first + n) * groups],
                out,
            )
        }
    }

    /// The integer kernel on 16-bit activations: `x` `[m, cols]` float32 contiguous on the CPU →
    /// `[m, rows]` float32.
    fn kernel(&self, x: &Tensor) -> Tensor {
        let m = x.size()[0];
        let y = Tensor::empty([m, self.rows()], (Kind::Float, Device::Cpu));
        // SAFETY: `x` is a contiguous float32 CPU tensor, alive and unwritten here; `y` a new
        // contiguous float32 tensor of `m × rows` values, written only here.
        self.kernel_rows(unsafe { int_dot::floats(x) }, m as usize, unsafe {
            int_dot::floats_mut(&y)
        });
        y
    }

    /// Whether [`Q8Weight::kernel_rows`] takes `m` rows (a CPU weight, decode-sized).
    pub fn kernel_takes(&self, m: usize) -> bool {
        m as i64 <= KERNEL_ROWS && self.q.device() == Device::Cpu
    }

    /// The integer kernel on `m` rows of float32 values (`x` `[m, cols]`, `out` `[m, rows]`,
    /// row-major). The weight must be on the CPU ([`Q8Weight::kernel_takes`]).
    pub fn kernel_rows(&self, x: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(
            self.q.device(),
            Device::Cpu,
            "the int8 kernel runs on the CPU"
        );
        // SAFETY: a CPU table (checked), contiguous since `from_gguf`; `self` outlives the call.
        let (qs, ds) = unsafe { self.host() };
        let xs = int_dot::QuantRows::quantize(x, m, self.cols() as usize);
        int_dot::int8_matmul_into(qs, ds, self.rows() as usize, &xs, out);
    }

    /// Rows `ids` dequantised into `out` (`[ids, cols]` float32, row-major), on the CPU.
    pub fn lookup_rows(&self, ids: &[i64], out: &mut [f32]) {
        assert_eq!(self.q.device(), Device::Cpu, "a CPU table");
        let cols = self.cols() as usize;
        let groups = cols / GROUP;
        // SAFETY: a CPU table (checked), contiguous since `from_gguf`; `self` outlives the call.
        let (qs, ds) = unsafe { self.host() };
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(cols)) {
            let id = usize::try_from(id).expect("a token id");
            assert!(id < self.rows() as usize, "token {id} outside the table");
            int_dot::dequantize_int8_into(
                &qs[id * cols..(id + 1) * cols],
                &ds[id * groups..(id + 1) * groups],
                row,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dequant::dequantize;

    fn q8_bytes(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut rng = crate::test_rng::Lcg::new(seed);
        let mut next = || rng.next_u32();
        let mut out = Vec::new();
        for _ in 0..rows * cols / GROUP {
            out.extend(f16::from_f32(0.001 + (next() % 1000) as f32 * 1e-5).to_le_bytes());
            out.extend((0..GROUP).map(|_| (next() & 0xff) as u8));
        }
        out
    }

    #[test]
    fn a_q8_weight_looks_up_and_multiplies_as_its_dequantised_values() {
        let (rows, cols) = (2501usize, 96usize);
        let bytes = q8_bytes(rows, cols, 5);
        let dense =
            Tensor::from_slice(&dequantize("t", GgmlType::Q8_0, &bytes, rows * cols).unwrap())
                .reshape([rows as i64, cols as i64]);
        let t = Q8Weight::from_gguf(GgmlType::Q8_0, &bytes, rows, cols).unwrap();
        assert!(t.dequantize(Kind::Float).equal(&dense));
        let ids = Tensor::from_slice(&[3i64, 2500, 0, 3, 1512, 7]).reshape([2, 3]);
        let rows_got = t.lookup(&ids, Kind::Float);
        assert_eq!(rows_got.size(), [2, 3, cols as i64]);
        assert!(rows_got.equal(
            &dense
                .index_select(0, &ids.reshape([-1]))
                .reshape([2, 3, -1])
        ));
        // Up to 32 rows take the kernel (in fours and a remainder), more the blocks (the last
        // partial, split unevenly between threads); both agree with the float matmul.
        for m in [1i64, 3, 4, 6, 32, 33, 41] {
            let x = Tensor::from_slice(
                &(0..m * cols as i64)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
                    .collect::<Vec<_>>(),
            )
            .reshape([m, cols as i64]);
            // The kernel multiplies 16-bit activations: against those, it is the float product.
            let x_seen = if m <= KERNEL_ROWS {
                let xs = int_dot::QuantRows::quantize(
                    &Vec::<f32>::try_from(x.reshape([-1])).unwrap(),
                    m as usize,
                    cols,
                );
                let back: Vec<f32> = (0..xs.q.len())
                    .map(|k| xs.q[k] as f32 * xs.d[k / GROUP])
                    .collect();
                Tensor::from_slice(&back).reshape([m, cols as i64])
            } else {
                x.shallow_clone()
            };
            let want = x_seen.linear::<Tensor>(&dense, None);
            let got = t.matmul_t(&x.unsqueeze(0));
            assert_eq!(got.size(), [1, m, rows as i64]);
            let diff = (got.squeeze_dim(0) - &want).abs().max().double_value(&[]);
            assert!(diff < 1e-4, "{m} rows: {diff}");
        }
        assert!(Q8Weight::from_gguf(GgmlType::Q4_0, &bytes, rows, cols).is_none());
        assert!(Q8Weight::from_gguf(GgmlType::Q8_0, &bytes[1..], rows, cols).is_none());
    }

    #[test]
    fn block_products_are_the_dequantised_tables_both_ways() {
        // More rows than one block (2 MiB of float32 rows, here 8192 of 64), the last partial.
        let (rows, cols) = (9001usize, 64usize);
        let bytes = q8_bytes(rows, cols, 11);
        let t = Q8Weight::from_gguf(GgmlType::Q8_0, &bytes, rows, cols).unwrap();
        let dense = t.dequantize(Kind::Float);
        let x = Tensor::from_slice(&crate::test_rng::Lcg::new(3).units(42 * cols))
            .reshape([42, cols as i64]);
        let y = t.matmul_t_blocks(&x);
        let diff = (&y - x.linear::<Tensor>(&dense, None))
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-4, "x · tableᵀ off by {diff}");
        let g = Tensor::from_slice(&crate::test_rng::Lcg::new(4).units(42 * rows))
            .reshape([42, rows as i64]);
        let back = t.matmul_blocks(&g);
        assert_eq!(back.size(), [42, cols as i64]);
        let diff = (&back - g.matmul(&dense)).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "g · table off by {diff}");
    }

    #[test]
    fn the_head_through_a_q8_weight_is_differentiable_in_its_input() {
        let (rows, cols) = (40usize, 64usize);
        let bytes = q8_bytes(rows, cols, 9);
        let t = Q8Weight::from_gguf(GgmlType::Q8_0, &bytes, rows, cols).unwrap();
        let dense = t.dequantize(Kind::Float);
        let x = Tensor::ones([2, cols as i64], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        t.matmul_t(&x).sum(Kind::Float).backward();
        let want = dense.sum_dim_intlist([0i64].as_slice(), false, Kind::Float);
        let diff = (x.grad() - want.unsqueeze(0)).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn a_q5_0_tensor_is_held_8_bit_with_its_exact_values() {
        let (rows, cols) = (16usize, 64usize);
        let mut rng = crate::test_rng::Lcg::new(21);
        let mut bytes = Vec::new();
        for _ in 0..rows * cols / GROUP {
            bytes.extend(f16::from_f32(0.002 + (rng.next_u32() % 100) as f32 * 1e-4).to_le_bytes());
            bytes.extend((0..20).map(|_| (rng.next_u32() & 0xff) as u8));
        }
        let dense =
            Tensor::from_slice(&dequantize("t", GgmlType::Q5_0, &bytes, rows * cols).unwrap())
                .reshape([rows as i64, cols as i64]);
        let t = Q8Weight::from_gguf(GgmlType::Q5_0, &bytes, rows, cols).unwrap();
        assert!(t.dequantize(Kind::Float).equal(&dense));
        assert!(Q8Weight::from_gguf(GgmlType::Q5_1, &bytes, rows, cols).is_none());
    }
}
