//! The decode step's element-wise work with a vectorised exponential: the SwiGLU gate and the vocabulary's
//! log-softmax. Both ran one libm `expf` per value on the thread that the other one waits for: ~46 k values
//! a token for the gate (30 layers) and 49 k for SmolLM2's vocabulary, ~5% of a quantized decode step.

/// `g = silu(g) · u`, element by element.
pub fn silu_mul(g: &mut [f32], u: &[f32]) {
    assert_eq!(g.len(), u.len(), "gate and up lengths");
    #[cfg(target_arch = "x86_64")]
    if crate::simd_available() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { silu_mul_simd(g, u) };
    }
    silu_mul_scalar(g, u);
}

/// `log_softmax(logits)`: each value minus the log of the sum of all values' exponentials.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let shift = max + sum_exp(logits, max).ln();
    logits.iter().map(|v| v - shift).collect()
}

/// The portable `silu_mul`, and the SIMD version's tail.
fn silu_mul_scalar(g: &mut [f32], u: &[f32]) {
    for (gi, &ui) in g.iter_mut().zip(u) {
        *gi = *gi / (1.0 + (-*gi).exp()) * ui;
    }
}

/// Σ e^(v − max) over the values.
fn sum_exp(values: &[f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::simd_available() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { sum_exp_simd(values, max) };
    }
    sum_exp_scalar(values, max)
}

fn sum_exp_scalar(values: &[f32], max: f32) -> f32 {
    values.iter().map(|v| (v - max).exp()).sum()
}

/// e^x in eight lanes (Cephes' expf: x = n·ln 2 + r, a degree-6 polynomial for e^r, 2^n built in the
/// exponent bits): within 2 ulp of the correctly rounded value for |x| ≤ 87; clamped to e^±87 beyond.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
        _mm256_set1_ps(87.0),
    );
    let n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    // ln 2 in two parts, so n·ln2_hi is exact and r keeps its low bits.
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let y = _mm256_add_ps(
        _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
        _mm256_set1_ps(1.0),
    );
    let two_n = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
        23,
    );
    _mm256_mul_ps(y, _mm256_castsi256_ps(two_n))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_simd(g: &mut [f32], u: &[f32]) {
    use std::arch::x86_64::*;
    let whole = g.len() / 8 * 8;
    for (gc, uc) in g[..whole].chunks_exact_mut(8).zip(u.chunks_exact(8)) {
        let x = _mm256_loadu_ps(gc.as_ptr());
        let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
        let s = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e));
        _mm256_storeu_ps(
            gc.as_mut_ptr(),
            _mm256_mul_ps(s, _mm256_loadu_ps(uc.as_ptr())),
        );
    }
    silu_mul_scalar(&mut g[whole..], &u[whole..]);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_exp_simd(values: &[f32], max: f32) -> f32 {
    use std::arch::x86_64::*;
    let whole = values.len() / 8 * 8;
    let m = _mm256_set1_ps(max);
    let mut acc = _mm256_setzero_ps();
    for c in values[..whole].chunks_exact(8) {
        acc = _mm256_add_ps(acc, exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m)));
    }
    crate::hsum256(acc) + sum_exp_scalar(&values[whole..], max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_exp_is_within_two_ulp() {
        #[cfg(target_arch = "x86_64")]
        if crate::simd_available() {
            use std::arch::x86_64::*;
            let mut worst = 0f64;
            for i in 0..200_000 {
                let x = -87.0 + 174.0 * i as f32 / 200_000.0;
                // SAFETY: checked above.
                let got = unsafe {
                    let mut out = [0f32; 8];
                    _mm256_storeu_ps(out.as_mut_ptr(), exp8(_mm256_set1_ps(x)));
                    out[0]
                };
                let want = (x as f64).exp();
                let ulp = (want as f32).to_bits().abs_diff(got.to_bits());
                worst = worst.max(ulp as f64);
            }
            assert!(worst <= 2.0, "worst error {worst} ulp");
        }
    }

    #[test]
    fn silu_and_log_softmax_match_their_definitions() {
        let n = 1_003; // a tail past the last full vector
        let g: Vec<f32> = (0..n).map(|i| (i as f32 - 500.0) / 25.0).collect();
        let u: Vec<f32> = (0..n).map(|i| ((i % 13) as f32 - 6.0) / 3.0).collect();
        let mut got = g.clone();
        silu_mul(&mut got, &u);
        for i in 0..n {
            let want = g[i] as f64 / (1.0 + (-g[i] as f64).exp()) * u[i] as f64;
            assert!(
                (got[i] as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "silu {i}"
            );
        }
        let logits: Vec<f32> = (0..n)
            .map(|i| ((i * 37) % 101) as f32 / 7.0 - 5.0)
            .collect();
        let lp = log_softmax(&logits);
        let max = logits.iter().fold(f64::MIN, |a, &v| a.max(v as f64));
        let lse = max
            + logits
                .iter()
                .map(|&v| (v as f64 - max).exp())
                .sum::<f64>()
                .ln();
        for i in 0..n {
            assert!(
                (lp[i] as f64 - (logits[i] as f64 - lse)).abs() < 1e-5,
                "log_softmax {i}"
            );
        }
        let total: f64 = lp.iter().map(|&v| (v as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
    }
}
