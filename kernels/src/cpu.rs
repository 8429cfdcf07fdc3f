//! What this CPU offers the kernels, read once at run time (machines differ: AVX2 only, AVX-512, AVX-512
//! with avx512_bf16, AMX), and a line saying which paths run, for benchmarks and run records.

use std::sync::OnceLock;

/// AVX2 + FMA + F16C: the block, dense and element-wise kernels; the scalar reference elsewhere.
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether bf16 products run natively (`vdpbf16ps`: avx512_bf16 with AVX-512 F/BW/VL); elsewhere they are
/// emulated through the f32 kernels with the same rounding. `INTROSPECT_AVX512_BF16=off` emulates them on
/// any CPU (to test or compare that path).
pub fn bf16_products_native() -> bool {
    static NATIVE: OnceLock<bool> = OnceLock::new();
    *NATIVE.get_or_init(|| {
        let off = std::env::var("INTROSPECT_AVX512_BF16").is_ok_and(|v| v == "off" || v == "0");
        !off && has_avx512_bf16()
    })
}

fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx512_available() && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AVX-512 F/BW/VL: the f32 GEMM of the frozen products ([`crate::gemm512`]). `INTROSPECT_AVX512=off`
/// makes introspect's kernels take their AVX2 paths, as on an AVX2-only CPU (the gemm crate under
/// Candle's matmul still dispatches on its own).
pub fn avx512_available() -> bool {
    static AVX512: OnceLock<bool> = OnceLock::new();
    *AVX512.get_or_init(|| {
        let off = std::env::var("INTROSPECT_AVX512").is_ok_and(|v| v == "off" || v == "0");
        !off && has_avx512()
    })
}

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The SIMD extensions the kernels look for, as this CPU has them.
pub fn cpu_features() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        let mut f = vec![];
        macro_rules! probe {
            ($($name:tt),*) => {$(if std::is_x86_feature_detected!($name) { f.push($name) })*};
        }
        probe!(
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512bf16"
        );
        f
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        vec![]
    }
}

/// One line: the CPU's features and the kernel paths they select.
pub fn kernel_paths() -> String {
    format!(
        "features: {}; block/dense kernels: {}; f32 GEMM: {}; bf16 products: {}; f32 weights' GEMMs: {}",
        cpu_features().join(" "),
        if simd_available() { "AVX2" } else { "scalar" },
        if avx512_available() {
            "introspect's AVX-512 tile (left operand by rows: prefill, training, LoRA), gemm AVX-512 (the rest)"
        } else if has_avx512() {
            // INTROSPECT_AVX512=off: the gemm crate still chooses its own kernels.
            "gemm AVX-512 (introspect's own tile off)"
        } else if simd_available() {
            "gemm AVX2"
        } else {
            "gemm scalar"
        },
        bf16_paths(),
        if crate::f32_weights_in_bf16() { "bf16 × bf16 (INTROSPECT_BF16_PRODUCTS=all)" } else { "f32" },
    )
}

fn bf16_paths() -> String {
    if !bf16_products_native() {
        return "emulated (bf16-rounded operands through the f32 kernels)".into();
    }
    #[cfg(target_arch = "x86_64")]
    if crate::amx_status() == &crate::AmxStatus::On {
        return "vdpbf16ps; GEMMs on AMX tiles".into();
    }
    #[cfg(target_arch = "x86_64")]
    return format!("vdpbf16ps (AMX: {:?})", crate::amx_status());
    #[allow(unreachable_code)]
    "vdpbf16ps".into()
}
