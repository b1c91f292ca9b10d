//! Decode-sized float32 products in plain Rust: the dot product the fused decode step's loops
//! use, and `x · Wᵀ` for a float32 weight ([`dense_rows`]) split by weight rows over the step's
//! threads. Inside a step's one parallel region (`crate::threads::one_region`) torch's matmul
//! would run on one thread; a packed model's float projections (a Q4_K_M file's Q6_K tensors,
//! dequantised) and float heads go through this instead.

use crate::int_dot::OutPtr;

/// `a · b` in eight independent lanes (so it vectorises), then their sum.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `x · wᵀ` for `m` rows of `x` (`[m, cols]`) and `w` (`[rows, cols]`), into `out` (`[m, rows]`),
/// all row-major: each weight row is read once (the step is bound by reading weights) and dotted
/// with every row of `x` while it is in cache; weight rows split between threads.
pub fn dense_rows(w: &[f32], x: &[f32], m: usize, out: &mut [f32]) {
    assert!(m > 0 && x.len().is_multiple_of(m));
    let cols = x.len() / m;
    assert!(cols > 0 && w.len().is_multiple_of(cols));
    let rows = w.len() / cols;
    assert_eq!(out.len(), m * rows);
    let out = OutPtr(out.as_mut_ptr());
    crate::threads::split_rows(rows, 8, |first, n| {
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::simd() {
            // SAFETY: the CPU has AVX2 and FMA (`simd`); this share writes its own columns.
            return unsafe { dense_share_avx2(w, x, m, first, n, out) };
        }
        // SAFETY: this share writes its own columns.
        unsafe { dense_share(w, x, m, first, n, out) }
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dense_share_avx2(w: &[f32], x: &[f32], m: usize, first: usize, n: usize, out: OutPtr) {
    dense_share(w, x, m, first, n, out)
}

/// Columns `first .. first + n` of [`dense_rows`]' output.
///
/// # Safety
/// `out` points to `[m, rows]` values of which no other thread writes these columns.
#[inline(always)]
unsafe fn dense_share(w: &[f32], x: &[f32], m: usize, first: usize, n: usize, out: OutPtr) {
    let cols = x.len() / m;
    let rows = w.len() / cols;
    for r in first..first + n {
        let wr = &w[r * cols..(r + 1) * cols];
        for (i, xr) in x.chunks_exact(cols).enumerate() {
            *out.at(i * rows + r) = dot(xr, wr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind, Tensor};

    #[test]
    fn dense_rows_compute_torchs_matmul_on_any_thread_count() {
        for threads in [1, 2] {
            tch::set_num_threads(threads);
            for (m, rows, cols) in [(1, 1, 3), (1, 100, 576), (5, 37, 64), (32, 96, 40)] {
                let w = Tensor::randn([rows, cols], (Kind::Float, Device::Cpu));
                let x = Tensor::randn([m, cols], (Kind::Float, Device::Cpu));
                let want = Vec::<f32>::try_from(x.matmul(&w.tr()).flatten(0, 1)).unwrap();
                let (wv, xv) = (
                    Vec::<f32>::try_from(w.flatten(0, 1)).unwrap(),
                    Vec::<f32>::try_from(x.flatten(0, 1)).unwrap(),
                );
                let mut got = vec![f32::NAN; (m * rows) as usize];
                crate::threads::one_region(|| dense_rows(&wv, &xv, m as usize, &mut got));
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
                }
            }
        }
    }
}
