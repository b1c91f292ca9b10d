//! Which of Tessera's own CPU kernels run on this machine: the AVX-512 VNNI ones where the CPU has
//! it, the AVX2 + FMA ones where it has both, the portable scalar loops elsewhere, or where
//! `TESSERA_CPU_KERNELS=scalar` asks for them (the test command runs the numerically sensitive
//! tests a second time that way, beside torch's `ATEN_CPU_CAPABILITY=default`, so a result that
//! holds only on one code path shows up on any machine). Decided once per process.

use std::sync::OnceLock;

/// Whether the AVX2 + FMA kernels run here.
#[cfg(target_arch = "x86_64")]
pub(crate) fn simd() -> bool {
    static SIMD: OnceLock<bool> = OnceLock::new();
    *SIMD.get_or_init(|| {
        let forced_scalar = std::env::var("TESSERA_CPU_KERNELS").is_ok_and(|v| v == "scalar");
        if forced_scalar {
            tracing::info!(
                "TESSERA_CPU_KERNELS=scalar: Tessera's CPU kernels run their portable loops"
            );
        }
        !forced_scalar
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
    })
}

/// Elsewhere only the portable loops exist.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn simd() -> bool {
    false
}

/// Whether the AVX-512 kernels (512-bit registers and VNNI's `vpdpwssd`: 32 int16 products summed
/// into int32 lanes in one instruction) run here: the CPU has AVX-512 F, BW, DQ and VNNI besides
/// AVX2 and FMA, and neither `TESSERA_CPU_KERNELS=scalar` nor `=avx2` holds them back (the test
/// command runs the numerically sensitive tests on the lower paths too). Each of these kernels
/// gives its AVX2 twin's results bit for bit.
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512() -> bool {
    static AVX512: OnceLock<bool> = OnceLock::new();
    *AVX512.get_or_init(|| {
        let held = std::env::var("TESSERA_CPU_KERNELS").is_ok_and(|v| v == "avx2");
        let has = simd()
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512dq")
            && std::is_x86_feature_detected!("avx512vnni");
        if has && held {
            tracing::info!("TESSERA_CPU_KERNELS=avx2: Tessera's AVX-512 kernels are not used");
        }
        has && !held
    })
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn avx512() -> bool {
    false
}
