//! Decode-sized matmuls of quantised weights in integers (issue 14), the way llama.cpp runs them
//! on CPUs, with more precise activations: each row of activations is quantised per group of 32
//! to 16 bits (`x ≈ d·q`, `q` int16, `d = max|x| / 32767`), and every group's dot product with a
//! 4-bit or 8-bit weight is summed in integers (AVX2's `madd`: 16 products in one instruction)
//! before its two scales apply. A decode step is bound by reading the weights; this reads half a
//! byte (4-bit) or one byte (8-bit) per weight, with no float conversion per weight.
//!
//! Larger batches go the other way ([`blocks_matmul`]): blocks of weight rows are dequantised into
//! one cache-sized float32 buffer and multiplied by BLAS, so they compute what the dequantised
//! model computes.
//!
//! The work is split by weight rows over torch's own OpenMP threads ([`split_rows`]).

use tch::{Device, Kind, Tensor};

use crate::cpu::simd;
use crate::threads::split_rows;

/// The largest quantised activation: 16-bit activations keep ~15 bits per group of 32 (8-bit
/// ones, llama.cpp's, moved SmolLM2's decode perplexity by 1.2% and its argmax at 5% of
/// positions).
pub const QMAX: f32 = 32767.0;

/// Elements per group (a GGUF Q4/Q8 block).
pub const GROUP: usize = 32;

/// Rows of activations quantised per group of 32: `q = round(x / d)`, `d = max|x| / 32767`, with
/// each group's exact float sum (what a weight's per-group min multiplies).
pub struct QuantRows {
    /// `[m, cols]`.
    pub q: Vec<i16>,
    /// `[m, cols / 32]`.
    pub d: Vec<f32>,
    /// `[m, cols / 32]`: `Σ x` over the group.
    pub sum: Vec<f32>,
    pub m: usize,
    pub cols: usize,
}

impl QuantRows {
    /// `x`: `[m, cols]` row-major, `cols` a multiple of 32.
    pub fn quantize(x: &[f32], m: usize, cols: usize) -> Self {
        assert_eq!(x.len(), m * cols);
        assert_eq!(cols % GROUP, 0);
        let groups = m * cols / GROUP;
        let mut out = Self {
            q: vec![0i16; m * cols],
            d: vec![0f32; groups],
            sum: vec![0f32; groups],
            m,
            cols,
        };
        #[cfg(target_arch = "x86_64")]
        if simd() {
            // SAFETY: the CPU has AVX2 and FMA (`simd`).
            unsafe { quantize_avx2(x, &mut out) };
            return out;
        }
        quantize_portable(x, &mut out);
        out
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_avx2(x: &[f32], out: &mut QuantRows) {
    quantize_portable(x, out)
}

/// Rounds half to even (`vroundps` where it is vectorised).
#[inline(always)]
fn quantize_portable(x: &[f32], out: &mut QuantRows) {
    for (((xs, qs), d), sum) in x
        .chunks_exact(GROUP)
        .zip(out.q.chunks_exact_mut(GROUP))
        .zip(out.d.iter_mut())
        .zip(out.sum.iter_mut())
    {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let inv = if amax > 0.0 { QMAX / amax } else { 0.0 };
        for (q, &v) in qs.iter_mut().zip(xs) {
            *q = (v * inv).round_ties_even() as i16;
        }
        *d = amax / QMAX;
        *sum = xs.iter().sum();
    }
}

/// A raw pointer to the output that threads write disjoint parts of.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: every thread writes only its own rows' cells (see `split_rows`' callers).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The cell `i` (a method, so closures capture the whole `Sync` wrapper).
    pub(crate) fn at(self, i: usize) -> *mut f32 {
        // SAFETY (of the callers' writes): `i` is inside the buffer this points into.
        self.0.wrapping_add(i)
    }
}

/// `x · wᵀ` for a 4-bit weight (`q`: `[rows, cols / 2]` nibbles in GGUF's order, byte `j` of a
/// group holding values `j` and `16 + j`; `sm`: `[rows, cols / 32]` pairs (scale, min), `w =
/// q·scale + min`) on quantised activations, into `out`: `[m, rows]` row-major.
pub fn int4_matmul_into(q: &[u8], sm: &[f32], rows: usize, x: &QuantRows, out: &mut [f32]) {
    let cols = x.cols;
    let groups = cols / GROUP;
    assert_eq!(q.len(), rows * cols / 2);
    assert_eq!(sm.len(), rows * groups * 2);
    each_row(
        rows,
        x.m,
        out,
        |r, i0, v| {
            let (wq, wsm) = (
                &q[r * cols / 2..(r + 1) * cols / 2],
                &sm[r * groups * 2..(r + 1) * groups * 2],
            );
            int4_dots(wq, wsm, x, i0, v)
        },
        |r, v| {
            #[cfg(target_arch = "x86_64")]
            if simd() {
                let (wq, wsm) = (
                    &q[r * cols / 2..(r + WEIGHT_ROWS_AT_ONCE) * cols / 2],
                    &sm[r * groups * 2..(r + WEIGHT_ROWS_AT_ONCE) * groups * 2],
                );
                if crate::cpu::avx512() {
                    // SAFETY: the CPU has AVX-512 F/BW/DQ/VNNI, AVX2 and FMA (`avx512`).
                    unsafe { int4_weight_rows_avx512(wq, wsm, x, v) };
                } else {
                    // SAFETY: the CPU has AVX2 and FMA (`simd`).
                    unsafe { int4_weight_rows_avx2(wq, wsm, x, v) };
                }
                return true;
            }
            let _ = (r, v);
            false
        },
    );
}

/// Weight rows one activation row is multiplied with at once (single-row decode).
const WEIGHT_ROWS_AT_ONCE: usize = 4;

/// Fills `out` (`m × rows`, row-major) split by weight rows between threads: `dots(r, i0, v)`
/// writes weight row `r`'s products with activation rows `i0 .. i0 + v.len()` into `v`. With one
/// activation row, `four(r, v)` first writes rows `r .. r + 4` at once where it can (it says
/// whether it did): the activations are then read once for four weight rows.
fn each_row(
    rows: usize,
    m: usize,
    out: &mut [f32],
    dots: impl Fn(usize, usize, &mut [f32]) + Sync,
    four: impl Fn(usize, &mut [f32; WEIGHT_ROWS_AT_ONCE]) -> bool + Sync,
) {
    assert_eq!(out.len(), m * rows);
    let ptr = OutPtr(out.as_mut_ptr());
    split_rows(rows, 8, |first, n| {
        let end = first + n;
        let mut r = first;
        if m == 1 {
            let mut v = [0f32; WEIGHT_ROWS_AT_ONCE];
            while r + WEIGHT_ROWS_AT_ONCE <= end && four(r, &mut v) {
                for (k, &v) in v.iter().enumerate() {
                    // SAFETY: row `r + k` is inside `out` and belongs to this share only.
                    unsafe { *ptr.at(r + k) = v };
                }
                r += WEIGHT_ROWS_AT_ONCE;
            }
        }
        let mut v = [0f32; ROWS_AT_ONCE];
        for r in r..end {
            for i0 in (0..m).step_by(ROWS_AT_ONCE) {
                let k = ROWS_AT_ONCE.min(m - i0);
                dots(r, i0, &mut v[..k]);
                for (i, &v) in (i0..).zip(&v[..k]) {
                    // SAFETY: `(i, r)` is inside `out`, and row `r` belongs to this share only.
                    unsafe { *ptr.at(i * rows + r) = v };
                }
            }
        }
    });
}

/// `x · wᵀ` for an 8-bit weight (`q`: `[rows, cols]` int8, `d`: `[rows, cols / 32]`, `w = q·d`,
/// GGUF's Q8_0) on quantised activations, into `out`: `[m, rows]` row-major.
pub fn int8_matmul_into(q: &[i8], d: &[f32], rows: usize, x: &QuantRows, out: &mut [f32]) {
    let cols = x.cols;
    let groups = cols / GROUP;
    assert_eq!(q.len(), rows * cols);
    assert_eq!(d.len(), rows * groups);
    each_row(
        rows,
        x.m,
        out,
        |r, i0, v| {
            let (wq, wd) = (
                &q[r * cols..(r + 1) * cols],
                &d[r * groups..(r + 1) * groups],
            );
            int8_dots(wq, wd, x, i0, v)
        },
        |r, v| {
            #[cfg(target_arch = "x86_64")]
            if simd() {
                let (wq, wd) = (
                    &q[r * cols..(r + WEIGHT_ROWS_AT_ONCE) * cols],
                    &d[r * groups..(r + WEIGHT_ROWS_AT_ONCE) * groups],
                );
                if crate::cpu::avx512() {
                    // SAFETY: the CPU has AVX-512 F/BW/DQ/VNNI, AVX2 and FMA (`avx512`).
                    unsafe { int8_weight_rows_avx512(wq, wd, x, v) };
                } else {
                    // SAFETY: the CPU has AVX2 and FMA (`simd`).
                    unsafe { int8_weight_rows_avx2(wq, wd, x, v) };
                }
                return true;
            }
            let _ = (r, v);
            false
        },
    );
}

/// Activation rows one weight row is multiplied with at once (its values unpacked once).
const ROWS_AT_ONCE: usize = 4;

/// `f::<N>(args)` for `N` = `n` rows, 1 to [`ROWS_AT_ONCE`].
macro_rules! by_rows {
    ($n:expr, $f:ident($($arg:expr),*)) => {
        match $n {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            _ => $f::<4>($($arg),*),
        }
    };
}

/// One 4-bit weight row against activation rows `i0 .. i0 + out.len()` (at most
/// [`ROWS_AT_ONCE`]). Each row's sum is the same whichever rows share the call.
#[inline]
fn int4_dots(wq: &[u8], wsm: &[f32], x: &QuantRows, i0: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: the CPU has AVX2 and FMA (`simd`); rows `i0 ..` exist in `x`.
        unsafe { by_rows!(out.len(), int4_rows_avx2(wq, wsm, x, i0, out)) };
        return;
    }
    for (k, o) in out.iter_mut().enumerate() {
        *o = int4_dot(wq, wsm, x, i0 + k);
    }
}

/// One 4-bit weight row against activation row `i` (the portable path).
fn int4_dot(wq: &[u8], wsm: &[f32], x: &QuantRows, i: usize) -> f32 {
    let groups = x.cols / GROUP;
    let (xq, xd, xs) = (
        &x.q[i * x.cols..(i + 1) * x.cols],
        &x.d[i * groups..(i + 1) * groups],
        &x.sum[i * groups..(i + 1) * groups],
    );
    let mut total = 0f32;
    for g in 0..groups {
        let (b, xg) = (&wq[g * 16..g * 16 + 16], &xq[g * GROUP..][..GROUP]);
        let mut acc = 0i32;
        for j in 0..16 {
            acc += (b[j] & 0x0f) as i32 * xg[j] as i32 + (b[j] >> 4) as i32 * xg[16 + j] as i32;
        }
        total += wsm[2 * g] * xd[g] * acc as f32 + wsm[2 * g + 1] * xs[g];
    }
    total
}

/// One 8-bit weight row against activation rows `i0 .. i0 + out.len()` (at most
/// [`ROWS_AT_ONCE`]).
#[inline]
fn int8_dots(wq: &[i8], wd: &[f32], x: &QuantRows, i0: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: the CPU has AVX2 and FMA (`simd`); rows `i0 ..` exist in `x`.
        unsafe { by_rows!(out.len(), int8_rows_avx2(wq, wd, x, i0, out)) };
        return;
    }
    let groups = x.cols / GROUP;
    for (k, o) in out.iter_mut().enumerate() {
        let i = i0 + k;
        let (xq, xd) = (
            &x.q[i * x.cols..(i + 1) * x.cols],
            &x.d[i * groups..(i + 1) * groups],
        );
        let mut total = 0f32;
        for g in 0..groups {
            let acc: i32 = wq[g * GROUP..][..GROUP]
                .iter()
                .zip(&xq[g * GROUP..][..GROUP])
                .map(|(&w, &x)| w as i32 * x as i32)
                .sum();
            total += wd[g] * xd[g] * acc as f32;
        }
        *o = total;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// Group `g` of one 4-bit weight row against `N` activation rows, added to `acc` and `mins`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn int4_group_rows<const N: usize>(
    wq: &[u8],
    wsm: &[f32],
    x: &QuantRows,
    i0: usize,
    g: usize,
    acc: &mut [std::arch::x86_64::__m256; N],
    mins: &mut [f32; N],
) {
    use std::arch::x86_64::*;
    let (cols, groups) = (x.cols, x.cols / GROUP);
    let b = _mm_loadu_si128(wq.as_ptr().add(g * 16) as *const __m128i);
    let low = _mm_set1_epi8(0x0f);
    // Values 0..16 of the group, then 16..32, widened to i16.
    let w0 = _mm256_cvtepu8_epi16(_mm_and_si128(b, low));
    let w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), low));
    let (scale, min) = (*wsm.get_unchecked(2 * g), *wsm.get_unchecked(2 * g + 1));
    for k in 0..N {
        let row = i0 + k;
        let xp = x.q.as_ptr().add(row * cols + g * GROUP);
        let x0 = _mm256_loadu_si256(xp as *const __m256i);
        let x1 = _mm256_loadu_si256(xp.add(16) as *const __m256i);
        // i16 pairs summed to i32 (each sum at most 2·15·32767).
        let p = _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
        let s = _mm256_set1_ps(scale * *x.d.get_unchecked(row * groups + g));
        acc[k] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(p), acc[k]);
        mins[k] += min * *x.sum.get_unchecked(row * groups + g);
    }
}

/// `N` activation rows against one 4-bit weight row: each group's values are unpacked once and
/// multiplied with every row's int16 values. Even and odd groups sum in two chains (so one's
/// latency hides behind the other's), the same for any `N`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)]
unsafe fn int4_rows_avx2<const N: usize>(
    wq: &[u8],
    wsm: &[f32],
    x: &QuantRows,
    i0: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (cols, groups) = (x.cols, x.cols / GROUP);
    assert!(wq.len() * 2 == cols && wsm.len() == 2 * groups && (i0 + N) * cols <= x.q.len());
    let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
    let (mut mins0, mut mins1) = ([0f32; N], [0f32; N]);
    let mut g = 0;
    while g + 1 < groups {
        int4_group_rows::<N>(wq, wsm, x, i0, g, &mut acc0, &mut mins0);
        int4_group_rows::<N>(wq, wsm, x, i0, g + 1, &mut acc1, &mut mins1);
        g += 2;
    }
    if g < groups {
        int4_group_rows::<N>(wq, wsm, x, i0, g, &mut acc0, &mut mins0);
    }
    let (acc, mins) = ([acc0, acc1], [mins0, mins1]);
    for k in 0..N {
        out[k] = hsum(_mm256_add_ps(acc[0][k], acc[1][k])) + (mins[0][k] + mins[1][k]);
    }
}

/// `N` activation rows against one 8-bit weight row, each group widened to int16 once.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)]
unsafe fn int8_rows_avx2<const N: usize>(
    wq: &[i8],
    wd: &[f32],
    x: &QuantRows,
    i0: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (cols, groups) = (x.cols, x.cols / GROUP);
    assert!(wq.len() == cols && wd.len() == groups && (i0 + N) * cols <= x.q.len());
    let mut acc = [_mm256_setzero_ps(); N];
    for g in 0..groups {
        let w = _mm256_loadu_si256(wq.as_ptr().add(g * GROUP) as *const __m256i);
        let w0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(w));
        let w1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(w, 1));
        let d = *wd.get_unchecked(g);
        for k in 0..N {
            let row = i0 + k;
            let xp = x.q.as_ptr().add(row * cols + g * GROUP);
            let x0 = _mm256_loadu_si256(xp as *const __m256i);
            let x1 = _mm256_loadu_si256(xp.add(16) as *const __m256i);
            // i16 pairs summed to i32 (each sum at most 2·128·32767).
            let p = _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
            let s = _mm256_set1_ps(d * *x.d.get_unchecked(row * groups + g));
            acc[k] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(p), acc[k]);
        }
    }
    for k in 0..N {
        out[k] = hsum(acc[k]);
    }
}

/// Asks for the cache line of `p` (never faults).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch<T>(p: *const T) {
    use std::arch::x86_64::*;
    _mm_prefetch(p as *const i8, _MM_HINT_T0);
}

/// Group `g` of four 4-bit weight rows against activation row 0, added to `acc` and `mins`: the
/// same products and sums as [`int4_group_rows`] makes for each of them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::needless_range_loop)]
unsafe fn int4_group_weight_rows(
    wq: &[u8],
    wsm: &[f32],
    x: &QuantRows,
    g: usize,
    acc: &mut [std::arch::x86_64::__m256; WEIGHT_ROWS_AT_ONCE],
    mins: &mut [f32; WEIGHT_ROWS_AT_ONCE],
) {
    use std::arch::x86_64::*;
    let (cols, groups) = (x.cols, x.cols / GROUP);
    let low = _mm_set1_epi8(0x0f);
    let xp = x.q.as_ptr().add(g * GROUP);
    let x0 = _mm256_loadu_si256(xp as *const __m256i);
    let x1 = _mm256_loadu_si256(xp.add(16) as *const __m256i);
    let (xd, xs) = (*x.d.get_unchecked(g), *x.sum.get_unchecked(g));
    // The next four rows' same group, on its way while these are multiplied: four short
    // interleaved streams are more than the hardware prefetcher follows (measured: a decode's
    // projections ~15% faster with it, and without it the 8-bit head half as fast as one row at
    // a time). A prefetch never faults, so past the end is harmless.
    for k in WEIGHT_ROWS_AT_ONCE..2 * WEIGHT_ROWS_AT_ONCE {
        prefetch(wq.as_ptr().wrapping_add(k * cols / 2 + g * 16));
        prefetch(wsm.as_ptr().wrapping_add(2 * (k * groups + g)));
    }
    for k in 0..WEIGHT_ROWS_AT_ONCE {
        let b = _mm_loadu_si128(wq.as_ptr().add(k * cols / 2 + g * 16) as *const __m128i);
        let w0 = _mm256_cvtepu8_epi16(_mm_and_si128(b, low));
        let w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), low));
        let at = 2 * (k * groups + g);
        let (scale, min) = (*wsm.get_unchecked(at), *wsm.get_unchecked(at + 1));
        let p = _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
        let s = _mm256_set1_ps(scale * xd);
        acc[k] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(p), acc[k]);
        mins[k] += min * xs;
    }
}

/// One activation row (row 0 of `x`) against four 4-bit weight rows (`wq`, `wsm`: theirs, one
/// after the other): each group's activations are loaded once for the four, and the four rows'
/// chains run side by side. Each row's sum is the one [`int4_rows_avx2`] gives (two chains of
/// groups, the same operations in the same order), so a sequence's logits do not depend on
/// whether it decodes alone.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)]
unsafe fn int4_weight_rows_avx2(
    wq: &[u8],
    wsm: &[f32],
    x: &QuantRows,
    out: &mut [f32; WEIGHT_ROWS_AT_ONCE],
) {
    use std::arch::x86_64::*;
    let (cols, groups) = (x.cols, x.cols / GROUP);
    let n = WEIGHT_ROWS_AT_ONCE;
    assert!(wq.len() * 2 == n * cols && wsm.len() == 2 * n * groups && cols <= x.q.len());
    let (mut acc0, mut acc1) = (
        [_mm256_setzero_ps(); WEIGHT_ROWS_AT_ONCE],
        [_mm256_setzero_ps(); WEIGHT_ROWS_AT_ONCE],
    );
    let (mut mins0, mut mins1) = ([0f32; WEIGHT_ROWS_AT_ONCE], [0f32; WEIGHT_ROWS_AT_ONCE]);
    let mut g = 0;
    while g + 1 < groups {
        int4_group_weight_rows(wq, wsm, x, g, &mut acc0, &mut mins0);
        int4_group_weight_rows(wq, wsm, x, g + 1, &mut acc1, &mut mins1);
        g += 2;
    }
    if g < groups {
        int4_group_weight_rows(wq, wsm, x, g, &mut acc0, &mut mins0);
    }
    for k in 0..n {
        out[k] = hsum(_mm256_add_ps(acc0[k], acc1[k])) + (mins0[k] + mins1[k]);
    }
}

/// [`int4_weight_rows_avx2`] on 512-bit registers: each register holds a pair of groups, the
/// even one in its low half and the odd one in its high half, so the halves are the AVX2 kernel's
/// two chains; VNNI's `vpdpwssd` sums the int16 products into the int32 lanes `madd` + `add`
/// give. The same integers, the same float operations in the same order: the same sums, bit for
/// bit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma")]
#[allow(clippy::needless_range_loop)]
unsafe fn int4_weight_rows_avx512(
    wq: &[u8],
    wsm: &[f32],
    x: &QuantRows,
    out: &mut [f32; WEIGHT_ROWS_AT_ONCE],
) {
    use std::arch::x86_64::*;
    let (cols, groups) = (x.cols, x.cols / GROUP);
    let n = WEIGHT_ROWS_AT_ONCE;
    assert!(wq.len() * 2 == n * cols && wsm.len() == 2 * n * groups && cols <= x.q.len());
    let mut acc = [_mm512_setzero_ps(); WEIGHT_ROWS_AT_ONCE];
    let (mut mins0, mut mins1) = ([0f32; WEIGHT_ROWS_AT_ONCE], [0f32; WEIGHT_ROWS_AT_ONCE]);
    let low = _mm256_set1_epi8(0x0f);
    let mut g = 0;
    while g + 1 < groups {
        let xp = x.q.as_ptr().add(g * GROUP);
        // Values 0..16 of groups g and g + 1, then their values 16..32.
        let x0 = _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm256_loadu_si256(xp as *const __m256i)),
            _mm256_loadu_si256(xp.add(GROUP) as *const __m256i),
        );
        let x1 = _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm256_loadu_si256(xp.add(16) as *const __m256i)),
            _mm256_loadu_si256(xp.add(GROUP + 16) as *const __m256i),
        );
        let (xd0, xs0) = (*x.d.get_unchecked(g), *x.sum.get_unchecked(g));
        let (xd1, xs1) = (*x.d.get_unchecked(g + 1), *x.sum.get_unchecked(g + 1));
        // The next four rows' same groups (as in `int4_group_weight_rows`).
        for k in n..2 * n {
            prefetch(wq.as_ptr().wrapping_add(k * cols / 2 + g * 16));
            prefetch(wsm.as_ptr().wrapping_add(2 * (k * groups + g)));
        }
        for k in 0..n {
            // Groups g and g + 1 of row k: 32 bytes.
            let b = _mm256_loadu_si256(wq.as_ptr().add(k * cols / 2 + g * 16) as *const __m256i);
            let w0 = _mm512_cvtepu8_epi16(_mm256_and_si256(b, low));
            let w1 = _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(b, 4), low));
            let p =
                _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(_mm512_setzero_si512(), w0, x0), w1, x1);
            let at = 2 * (k * groups + g);
            let (scale0, min0) = (*wsm.get_unchecked(at), *wsm.get_unchecked(at + 1));
            let (scale1, min1) = (*wsm.get_unchecked(at + 2), *wsm.get_unchecked(at + 3));
            let s = _mm512_insertf32x8::<1>(
                _mm512_castps256_ps512(_mm256_set1_ps(scale0 * xd0)),
                _mm256_set1_ps(scale1 * xd1),
            );
            acc[k] = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(p), acc[k]);
            mins0[k] += min0 * xs0;
            mins1[k] += min1 * xs1;
        }
        g += 2;
    }
    for k in 0..n {
        let mut acc0 = _mm512_castps512_ps256(acc[k]);
        let acc1 = _mm512_extractf32x8_ps::<1>(acc[k]);
        if g < groups {
            // An odd last group goes to the even chain, as in the AVX2 kernel.
            let b = _mm_loadu_si128(wq.as_ptr().add(k * cols / 2 + g * 16) as *const __m128i);
            let l = _mm_set1_epi8(0x0f);
            let w0 = _mm256_cvtepu8_epi16(_mm_and_si128(b, l));
            let w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), l));
            let xp = x.q.as_ptr().add(g * GROUP);
            let x0 = _mm256_loadu_si256(xp as *const __m256i);
            let x1 = _mm256_loadu_si256(xp.add(16) as *const __m256i);
            let p = _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
            let at = 2 * (k * groups + g);
            let s = _mm256_set1_ps(*wsm.get_unchecked(at) * *x.d.get_unchecked(g));
            acc0 = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(p), acc0);
            mins0[k] += *wsm.get_unchecked(at + 1) * *x.sum.get_unchecked(g);
        }
        out[k] = hsum(_mm256_add_ps(acc0, acc1)) + (mins0[k] + mins1[k]);
    }
}

/// One activation row (row 0 of `x`) against four 8-bit weight rows (`wq`, `wd`: theirs, one
/// after the other), each row's sum the one [`int8_rows_avx2`] gives.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)]
unsafe fn int8_weight_rows_avx2(
    wq: &[i8],
    wd: &[f32],
    x: &QuantRows,
    out: &mut [f32; WEIGHT_ROWS_AT_ONCE],
) {
    use std::arch::x86_64::*;
    let (cols, groups) = (x.cols, x.cols / GROUP);
    let n = WEIGHT_ROWS_AT_ONCE;
    assert!(wq.len() == n * cols && wd.len() == n * groups && cols <= x.q.len());
    let mut acc = [_mm256_setzero_ps(); WEIGHT_ROWS_AT_ONCE];
    for g in 0..groups {
        let xp = x.q.as_ptr().add(g * GROUP);
        let x0 = _mm256_loadu_si256(xp as *const __m256i);
        let x1 = _mm256_loadu_si256(xp.add(16) as *const __m256i);
        let xd = *x.d.get_unchecked(g);
        // The next four rows' same group (as in `int4_group_weight_rows`).
        for k in n..2 * n {
            prefetch(wq.as_ptr().wrapping_add(k * cols + g * GROUP));
            prefetch(wd.as_ptr().wrapping_add(k * groups + g));
        }
        for k in 0..n {
            let w = _mm256_loadu_si256(wq.as_ptr().add(k * cols + g * GROUP) as *const __m256i);
            let w0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(w));
            let w1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(w, 1));
            let p = _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
            let s = _mm256_set1_ps(*wd.get_unchecked(k * groups + g) * xd);
            acc[k] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(p), acc[k]);
        }
    }
    for k in 0..n {
        out[k] = hsum(acc[k]);
    }
}

/// [`int8_weight_rows_avx2`] with a group's 32 values widened in one 512-bit register and its
/// products summed by VNNI's `vpdpwssd`: the register's two halves, added, are the int32 lanes
/// the AVX2 kernel's two `madd`s and `add` give, and the float work is the same: the same sums,
/// bit for bit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma")]
#[allow(clippy::needless_range_loop)]
unsafe fn int8_weight_rows_avx512(
    wq: &[i8],
    wd: &[f32],
    x: &QuantRows,
    out: &mut [f32; WEIGHT_ROWS_AT_ONCE],
) {
    use std::arch::x86_64::*;
    let (cols, groups) = (x.cols, x.cols / GROUP);
    let n = WEIGHT_ROWS_AT_ONCE;
    assert!(wq.len() == n * cols && wd.len() == n * groups && cols <= x.q.len());
    let mut acc = [_mm256_setzero_ps(); WEIGHT_ROWS_AT_ONCE];
    for g in 0..groups {
        let xs = _mm512_loadu_si512(x.q.as_ptr().add(g * GROUP) as *const __m512i);
        let xd = *x.d.get_unchecked(g);
        for k in n..2 * n {
            prefetch(wq.as_ptr().wrapping_add(k * cols + g * GROUP));
            prefetch(wd.as_ptr().wrapping_add(k * groups + g));
        }
        for k in 0..n {
            let w = _mm256_loadu_si256(wq.as_ptr().add(k * cols + g * GROUP) as *const __m256i);
            let p = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_cvtepi8_epi16(w), xs);
            let p = _mm256_add_epi32(_mm512_castsi512_si256(p), _mm512_extracti64x4_epi64::<1>(p));
            let s = _mm256_set1_ps(*wd.get_unchecked(k * groups + g) * xd);
            acc[k] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(p), acc[k]);
        }
    }
    for k in 0..n {
        out[k] = hsum(acc[k]);
    }
}

/// `x · wᵀ` for `x` `[m, cols]` float32 contiguous on the CPU and a quantised weight of `rows ×
/// cols`, by blocks of about 2 MiB of dequantised rows: each block is multiplied by BLAS while it
/// is still in cache. `[m, rows]` float32.
pub fn blocks_matmul(
    x: &Tensor,
    rows: i64,
    cols: i64,
    dequantize: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> Tensor {
    let out = Tensor::empty([x.size()[0], rows], (Kind::Float, Device::Cpu));
    for_each_block(rows, cols, dequantize, |from, w| {
        out.narrow(1, from, w.size()[0]).copy_(&x.matmul(&w.tr()));
    });
    out
}

/// `g · w` for `g` `[m, rows]` float32 contiguous on the CPU and the same quantised weight as
/// [`blocks_matmul`]'s: the gradient of `x · wᵀ` with respect to `x`, block by block
/// (`Σ g[:, block] · w[block]`), with no float copy of the whole weight. `[m, cols]` float32.
pub fn blocks_matmul_back(
    g: &Tensor,
    rows: i64,
    cols: i64,
    dequantize: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> Tensor {
    let mut out = Tensor::zeros([g.size()[0], cols], (Kind::Float, Device::Cpu));
    for_each_block(rows, cols, dequantize, |from, w| {
        let _ = out.addmm_(&g.narrow(1, from, w.size()[0]), w);
    });
    out
}

/// Calls `f(first_row, block)` for consecutive blocks of a quantised weight's `rows × cols`,
/// about 2 MiB of float32 each (whole groups of 16 rows): `dequantize(first, n, buf)` writes
/// weight rows `first .. first + n` as float32 into one reused buffer, split over the threads.
fn for_each_block(
    rows: i64,
    cols: i64,
    dequantize: impl Fn(usize, usize, &mut [f32]) + Sync,
    mut f: impl FnMut(i64, &Tensor),
) {
    let block = ((512 * 1024 / cols).max(16) / 16 * 16).min(rows);
    let buf = Tensor::empty([block, cols], (Kind::Float, Device::Cpu));
    let ucols = cols as usize;
    let base = OutPtr(buf.data_ptr() as *mut f32);
    for from in (0..rows).step_by(block as usize) {
        let n = block.min(rows - from);
        split_rows(n as usize, 1, |first, k| {
            // SAFETY: `buf` is a contiguous float32 CPU tensor of `block × cols` values; each
            // share writes its own rows, while no tensor op reads it.
            let rows_out =
                unsafe { std::slice::from_raw_parts_mut(base.at(first * ucols), k * ucols) };
            dequantize(from as usize + first, k, rows_out);
        });
        f(from, &buf.narrow(0, 0, n));
    }
}

/// A 4-bit weight's rows as float32 (`q` and `sm` as in [`int4_matmul_into`], `out` their `2·q.len()`
/// values): `q·scale + min`, what `Int4Weight::dequantize` gives.
pub fn dequantize_int4_into(q: &[u8], sm: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: the CPU has AVX2 and FMA (`simd`).
        return unsafe { dequantize_int4_avx2(q, sm, out) };
    }
    dequantize_int4_portable(q, sm, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dequantize_int4_avx2(q: &[u8], sm: &[f32], out: &mut [f32]) {
    dequantize_int4_portable(q, sm, out)
}

#[inline(always)]
fn dequantize_int4_portable(q: &[u8], sm: &[f32], out: &mut [f32]) {
    for ((o, b), p) in out
        .chunks_exact_mut(GROUP)
        .zip(q.chunks_exact(GROUP / 2))
        .zip(sm.chunks_exact(2))
    {
        let (scale, min) = (p[0], p[1]);
        let (lo, hi) = o.split_at_mut(GROUP / 2);
        for ((l, h), &b) in lo.iter_mut().zip(hi.iter_mut()).zip(b) {
            *l = (b & 0x0f) as f32 * scale + min;
            *h = (b >> 4) as f32 * scale + min;
        }
    }
}

/// A Q8_0 weight's rows as float32 (`q` and `d` as in [`int8_matmul_into`]): `d·q`.
pub fn dequantize_int8_into(q: &[i8], d: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: the CPU has AVX2 and FMA (`simd`).
        return unsafe { dequantize_int8_avx2(q, d, out) };
    }
    dequantize_int8_portable(q, d, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dequantize_int8_avx2(q: &[i8], d: &[f32], out: &mut [f32]) {
    dequantize_int8_portable(q, d, out)
}

#[inline(always)]
fn dequantize_int8_portable(q: &[i8], d: &[f32], out: &mut [f32]) {
    for ((o, q), &d) in out
        .chunks_exact_mut(GROUP)
        .zip(q.chunks_exact(GROUP))
        .zip(d)
    {
        for (o, &q) in o.iter_mut().zip(q) {
            *o = d * q as f32;
        }
    }
}

/// The values of a contiguous float32 CPU tensor.
///
/// # Safety
/// `t` must be a contiguous float32 CPU tensor that outlives the slice and is not written while
/// it is borrowed.
pub unsafe fn floats(t: &Tensor) -> &[f32] {
    std::slice::from_raw_parts(t.data_ptr() as *const f32, t.numel())
}

/// The values of a contiguous float32 CPU tensor, to write.
///
/// # Safety
/// `t` must be a contiguous float32 CPU tensor that outlives the slice, read or written by
/// nothing else while it is borrowed.
#[allow(clippy::mut_from_ref)]
pub unsafe fn floats_mut(t: &Tensor) -> &mut [f32] {
    std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, t.numel())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        crate::test_rng::Lcg::new(seed).units(n)
    }

    #[test]
    fn activations_quantise_within_half_a_step_per_group() {
        let x = values(3 * 64, 1);
        let q = QuantRows::quantize(&x, 3, 64);
        for (g, xs) in x.chunks(GROUP).enumerate() {
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            assert!((q.d[g] - amax / QMAX).abs() < 1e-9);
            assert!((q.sum[g] - xs.iter().sum::<f32>()).abs() < 1e-5);
            for (j, &v) in xs.iter().enumerate() {
                let back = q.q[g * GROUP + j] as f32 * q.d[g];
                assert!((back - v).abs() <= q.d[g] / 2.0 + 1e-6, "{v} → {back}");
            }
        }
        let zeros = QuantRows::quantize(&[0.0; 32], 1, 32);
        assert_eq!((zeros.q, zeros.d), (vec![0; 32], vec![0.0]));
    }

    /// The kernels against the float product of the dequantised weights with the dequantised
    /// activations (the only rounding they make is the activations'; a 4-bit weight's min
    /// multiplies the group's exact sum), over uneven shares of rows.
    #[test]
    fn int4_and_int8_rows_sum_as_the_dequantised_product() {
        for m in [1usize, 7] {
            rows_sum_as_the_dequantised_product(m);
        }
    }

    /// `m` activation rows (one: four weight rows at a time, then the rest one by one).
    fn rows_sum_as_the_dequantised_product(m: usize) {
        let (rows, cols) = (37usize, 96usize);
        let groups = cols / GROUP;
        let x = QuantRows::quantize(&values(m * cols, 2), m, cols);
        let xd: Vec<f32> = (0..m * cols)
            .map(|k| x.q[k] as f32 * x.d[k / GROUP])
            .collect();
        let q4: Vec<u8> = values(rows * cols / 2, 3)
            .iter()
            .map(|v| ((v + 1.0) * 127.9) as u8)
            .collect();
        let sm: Vec<f32> = values(rows * groups * 2, 4)
            .iter()
            .map(|v| v * 0.1)
            .collect();
        let q8: Vec<i8> = q4.iter().chain(&q4).map(|&b| b as i8).collect();
        let d8: Vec<f32> = sm[..rows * groups].to_vec();
        let nibble = |r: usize, k: usize| {
            let (g, j) = (k / GROUP, k % GROUP);
            let b = q4[r * cols / 2 + g * 16 + j % 16];
            (if j < 16 { b & 0x0f } else { b >> 4 }) as f64
        };
        let (mut got4, mut got8) = (vec![0f32; m * rows], vec![0f32; m * rows]);
        int4_matmul_into(&q4, &sm, rows, &x, &mut got4);
        int8_matmul_into(&q8, &d8, rows, &x, &mut got8);
        for i in 0..m {
            for r in 0..rows {
                let scale = |k: usize| sm[(r * groups + k / GROUP) * 2] as f64;
                let want4: f64 = (0..cols)
                    .map(|k| nibble(r, k) * scale(k) * xd[i * cols + k] as f64)
                    .sum::<f64>()
                    + (0..groups)
                        .map(|g| sm[(r * groups + g) * 2 + 1] as f64 * x.sum[i * groups + g] as f64)
                        .sum::<f64>();
                let want8: f64 = (0..cols)
                    .map(|k| {
                        q8[r * cols + k] as f64
                            * d8[r * groups + k / GROUP] as f64
                            * xd[i * cols + k] as f64
                    })
                    .sum();
                let (g4, g8) = (got4[i * rows + r] as f64, got8[i * rows + r] as f64);
                assert!((g4 - want4).abs() < 1e-4, "int4 ({i},{r}): {g4} vs {want4}");
                assert!((g8 - want8).abs() < 1e-3, "int8 ({i},{r}): {g8} vs {want8}");
            }
        }
    }

    /// A row's products are the same, bit for bit, whether it is multiplied alone (four weight
    /// rows at a time) or with other rows (one weight row against up to four activation rows).
    #[test]
    fn a_row_alone_sums_as_in_a_batch() {
        let (rows, cols, m) = (40usize, 160usize, 6usize);
        let groups = cols / GROUP;
        let xs = values(m * cols, 7);
        let q4: Vec<u8> = values(rows * cols / 2, 8)
            .iter()
            .map(|v| ((v + 1.0) * 127.9) as u8)
            .collect();
        let sm = values(rows * groups * 2, 9);
        let q8: Vec<i8> = q4.iter().chain(&q4).map(|&b| b as i8).collect();
        let d8 = sm[..rows * groups].to_vec();
        let batch = QuantRows::quantize(&xs, m, cols);
        let (mut all4, mut all8) = (vec![0f32; m * rows], vec![0f32; m * rows]);
        int4_matmul_into(&q4, &sm, rows, &batch, &mut all4);
        int8_matmul_into(&q8, &d8, rows, &batch, &mut all8);
        for i in 0..m {
            let one = QuantRows::quantize(&xs[i * cols..(i + 1) * cols], 1, cols);
            let (mut got4, mut got8) = (vec![0f32; rows], vec![0f32; rows]);
            int4_matmul_into(&q4, &sm, rows, &one, &mut got4);
            int8_matmul_into(&q8, &d8, rows, &one, &mut got8);
            assert_eq!(got4, all4[i * rows..(i + 1) * rows], "int4 row {i}");
            assert_eq!(got8, all8[i * rows..(i + 1) * rows], "int8 row {i}");
        }
    }

    /// Where the CPU has AVX-512 VNNI: its kernels give the AVX2 kernels' sums bit for bit,
    /// with an even and an odd number of groups (elsewhere there is nothing to compare).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx512_kernels_sum_as_the_avx2_ones() {
        if !crate::cpu::avx512() {
            eprintln!("skipping: no AVX-512 VNNI here");
            return;
        }
        for groups in [1usize, 2, 5, 18, 48] {
            let cols = groups * GROUP;
            let n = WEIGHT_ROWS_AT_ONCE;
            let x = QuantRows::quantize(&values(cols, 11 + groups as u64), 1, cols);
            let q4: Vec<u8> = values(n * cols / 2, 12)
                .iter()
                .map(|v| ((v + 1.0) * 127.9) as u8)
                .collect();
            let sm = values(n * groups * 2, 13);
            let (mut a, mut b) = ([0f32; WEIGHT_ROWS_AT_ONCE], [0f32; WEIGHT_ROWS_AT_ONCE]);
            // SAFETY: `avx512` says the CPU has every feature both kernels use.
            unsafe {
                int4_weight_rows_avx2(&q4, &sm, &x, &mut a);
                int4_weight_rows_avx512(&q4, &sm, &x, &mut b);
            }
            assert_eq!(a.map(f32::to_bits), b.map(f32::to_bits), "{groups} groups");
            let q8: Vec<i8> = q4.iter().chain(&q4).map(|&b| b as i8).collect();
            let d8 = &sm[..n * groups];
            let (mut a, mut b) = ([0f32; WEIGHT_ROWS_AT_ONCE], [0f32; WEIGHT_ROWS_AT_ONCE]);
            // SAFETY: as above.
            unsafe {
                int8_weight_rows_avx2(&q8, d8, &x, &mut a);
                int8_weight_rows_avx512(&q8, d8, &x, &mut b);
            }
            assert_eq!(
                a.map(f32::to_bits),
                b.map(f32::to_bits),
                "int8, {groups} groups"
            );
        }
    }

    #[test]
    fn blocks_multiply_as_the_whole_weight() {
        let (rows, cols, m) = (1000i64, 64i64, 5i64);
        let w = Tensor::from_slice(&values((rows * cols) as usize, 5)).reshape([rows, cols]);
        let x = Tensor::from_slice(&values((m * cols) as usize, 6)).reshape([m, cols]);
        let wv = unsafe { floats(&w) }.to_vec();
        let got = blocks_matmul(&x, rows, cols, |first, n, out| {
            out.copy_from_slice(&wv[first * cols as usize..(first + n) * cols as usize])
        });
        let diff = (got - x.matmul(&w.tr())).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{diff}");
    }
}
