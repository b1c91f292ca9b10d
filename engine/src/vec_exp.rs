//! `e^x` over float32 slices, eight lanes at a time on AVX2 (Cephes' `expf`: a degree-5
//! polynomial after range reduction by `ln 2`, within 2 ulp of the true value over float32's
//! range), for the loops that take tens of thousands of exponentials a token: the softmax
//! normaliser of greedy sampling (a 49k-entry row took torch's `logsumexp` ~0.15 ms on the EPYC
//! here; its reduction of one row is not vectorised) and SwiGLU in fused decode steps. Without
//! AVX2 and FMA, `f32::exp`.

/// `Σ e^(x − shift)` over `x`, summed in float32 lanes within blocks of 1024 and in float64
/// across them.
pub fn sum_exp(x: &[f32], shift: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::simd() {
        // SAFETY: the CPU has AVX2 and FMA (`simd`).
        return unsafe { sum_exp_avx2(x, shift) };
    }
    x.chunks(1024)
        .map(|b| b.iter().map(|&v| (v - shift).exp()).sum::<f32>() as f64)
        .sum()
}

/// `silu(gate)·up` into `out`: `g / (1 + e^−g) · u`, torch's SiLU times the up projection.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(gate.len() == out.len() && up.len() == out.len());
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::simd() {
        // SAFETY: the CPU has AVX2 and FMA (`simd`).
        return unsafe { silu_mul_avx2(gate, up, out) };
    }
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_exp_avx2(x: &[f32], shift: f32) -> f64 {
    use std::arch::x86_64::*;
    let s = _mm256_set1_ps(shift);
    let mut total = 0f64;
    for block in x.chunks(1024) {
        let mut acc = _mm256_setzero_ps();
        let chunks = block.chunks_exact(8);
        let tail: f32 = chunks.remainder().iter().map(|&v| (v - shift).exp()).sum();
        for c in chunks {
            let v = _mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), s);
            acc = _mm256_add_ps(acc, exp8(v));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        total += lanes.iter().map(|&v| v as f64).sum::<f64>() + tail as f64;
    }
    total
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = out.len() / 8 * 8;
    let one = _mm256_set1_ps(1.0);
    let zero = _mm256_setzero_ps();
    for i in (0..n).step_by(8) {
        let g = _mm256_loadu_ps(gate.as_ptr().add(i));
        let u = _mm256_loadu_ps(up.as_ptr().add(i));
        let e = exp8(_mm256_sub_ps(zero, g));
        let y = _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u);
        _mm256_storeu_ps(out.as_mut_ptr().add(i), y);
    }
    for i in n..out.len() {
        out[i] = gate[i] / (1.0 + (-gate[i]).exp()) * up[i];
    }
}

/// Cephes' `expf` on eight lanes: `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`, `e^r` by a degree-5
/// polynomial, times `2^n` built in the exponent bits. Inputs are clamped to `±88.376` (below,
/// the result underflows towards 0 as `expf`'s does). NaN stays NaN: `min`/`max` return their
/// second operand when either is NaN, so `x` goes second, and the polynomial keeps it.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let x = _mm256_min_ps(_mm256_set1_ps(88.376_26), x);
    let x = _mm256_max_ps(_mm256_set1_ps(-88.376_26), x);
    let n = _mm256_floor_ps(_mm256_fmadd_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
        _mm256_set1_ps(0.5),
    ));
    // ln 2 in two parts, so `n·ln 2` is exact enough.
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut y = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
    }
    let y = _mm256_add_ps(
        _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r),
        _mm256_set1_ps(1.0),
    );
    let pow2n = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
        23,
    );
    _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponentials_are_within_a_few_ulp_of_libm() {
        let x: Vec<f32> = (0..20_001).map(|i| -87.0 + i as f32 * 0.0087).collect();
        // One at a time: the sum of a single value is that value's exponential.
        for &v in x.iter().step_by(7) {
            let (got, want) = (sum_exp(&[v; 8], 0.0) / 8.0, (v as f64).exp());
            assert!(
                ((got - want) / want).abs() < 4.0 * f32::EPSILON as f64,
                "e^{v}: {got} vs {want}"
            );
        }
        let total: f64 = x.iter().map(|&v| ((v - 1.5) as f64).exp()).sum();
        let got = sum_exp(&x, 1.5);
        assert!(((got - total) / total).abs() < 1e-6, "{got} vs {total}");
        // Far below: as good as nothing (expf's own underflow is at −103).
        assert!(sum_exp(&[-1e30, f32::NEG_INFINITY], 0.0) < 1e-37);
    }

    #[test]
    fn nan_stays_nan_on_every_path() {
        // Eight lanes and a tail, one NaN in each.
        let mut x = vec![0.5f32; 19];
        x[3] = f32::NAN;
        x[17] = f32::NAN;
        assert!(sum_exp(&x, 0.0).is_nan());
        let mut out = vec![0.0f32; 19];
        silu_mul(&x, &[1.0; 19], &mut out);
        assert!(out[3].is_nan() && out[17].is_nan(), "{out:?}");
        assert!(out[0].is_finite() && out[18].is_finite());
    }

    #[test]
    fn silu_times_up_is_torchs() {
        let gate: Vec<f32> = (0..203).map(|i| (i as f32 - 100.0) * 0.37).collect();
        let up: Vec<f32> = (0..203).map(|i| 1.0 + i as f32 * 0.01).collect();
        let mut got = vec![0f32; gate.len()];
        silu_mul(&gate, &up, &mut got);
        let want = tch::Tensor::from_slice(&gate).silu() * tch::Tensor::from_slice(&up);
        let want: Vec<f32> = Vec::try_from(want).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 4.0 * f32::EPSILON * w.abs().max(1e-30),
                "{i}: {g} vs {w}"
            );
        }
    }
}
