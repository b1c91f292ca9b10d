//! Which of Tessera's own CPU kernels run on this machine: the AVX2 + FMA ones where the CPU has
//! both, the portable scalar loops elsewhere, or where `TESSERA_CPU_KERNELS=scalar` asks for them
//! (the test command runs the numerically sensitive tests a second time that way, beside torch's
//! `ATEN_CPU_CAPABILITY=default`, so a result that holds only on one code path shows up on any
//! machine). Decided once per process.

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
