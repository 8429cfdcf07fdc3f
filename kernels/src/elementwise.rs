//! The decode step's element-wise work with a vectorised exponential: the SwiGLU gate and the vocabulary's
//! log-softmax. Both ran one libm `expf` per value on the thread that the other one waits for: ~46 k values
//! a token for the gate (30 layers) and 49 k for SmolLM2's vocabulary, ~5% of a quantized decode step.

use std::mem::MaybeUninit;

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

/// `m = silu(g) · u` into `m` (the training forward keeps g), every element written.
pub fn silu_mul_into(g: &[f32], u: &[f32], m: &mut [MaybeUninit<f32>]) {
    assert!(
        g.len() == u.len() && g.len() == m.len(),
        "gate, up and out lengths"
    );
    #[cfg(target_arch = "x86_64")]
    if crate::simd_available() {
        // SAFETY: the CPU has AVX2 and FMA; lengths checked above.
        return unsafe { silu_mul_into_simd(g, u, m) };
    }
    for ((o, &gi), &ui) in m.iter_mut().zip(g).zip(u) {
        o.write(silu_times(gi, ui));
    }
}

/// From `dm` to `dg = dm · u · silu'(g)` and `du = dm · silu(g)`, with silu'(x) = σ(x)(1 + x(1 − σ(x))),
/// every element of both written.
pub fn silu_mul_backward(
    g: &[f32],
    u: &[f32],
    dm: &[f32],
    dg: &mut [MaybeUninit<f32>],
    du: &mut [MaybeUninit<f32>],
) {
    let n = g.len();
    assert!(u.len() == n && dm.len() == n && dg.len() == n && du.len() == n);
    #[cfg(target_arch = "x86_64")]
    if crate::simd_available() {
        // SAFETY: the CPU has AVX2 and FMA; lengths checked above.
        return unsafe { silu_mul_backward_simd(g, u, dm, dg, du) };
    }
    silu_mul_backward_scalar(g, u, dm, dg, du);
}

fn silu_mul_backward_scalar(
    g: &[f32],
    u: &[f32],
    dm: &[f32],
    dg: &mut [MaybeUninit<f32>],
    du: &mut [MaybeUninit<f32>],
) {
    let ins = g.iter().zip(u).zip(dm);
    for ((dgi, dui), ((&gi, &ui), &d)) in dg.iter_mut().zip(du.iter_mut()).zip(ins) {
        let s = 1.0 / (1.0 + (-gi).exp());
        dui.write(d * gi * s);
        dgi.write(d * ui * s * (1.0 + gi * (1.0 - s)));
    }
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
        *gi = silu_times(*gi, ui);
    }
}

/// `silu(g) · u` of one value.
fn silu_times(g: f32, u: f32) -> f32 {
    g / (1.0 + (-g).exp()) * u
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
unsafe fn silu_mul_into_simd(g: &[f32], u: &[f32], m: &mut [MaybeUninit<f32>]) {
    use std::arch::x86_64::*;
    let whole = g.len() / 8 * 8;
    let out = m.as_mut_ptr() as *mut f32;
    for i in (0..whole).step_by(8) {
        let x = _mm256_loadu_ps(g.as_ptr().add(i));
        let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
        let s = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e));
        _mm256_storeu_ps(
            out.add(i),
            _mm256_mul_ps(s, _mm256_loadu_ps(u.as_ptr().add(i))),
        );
    }
    for i in whole..g.len() {
        m[i].write(silu_times(g[i], u[i]));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_backward_simd(
    g: &[f32],
    u: &[f32],
    dm: &[f32],
    dg: &mut [MaybeUninit<f32>],
    du: &mut [MaybeUninit<f32>],
) {
    use std::arch::x86_64::*;
    let whole = g.len() / 8 * 8;
    let one = _mm256_set1_ps(1.0);
    let (dg_out, du_out) = (dg.as_mut_ptr() as *mut f32, du.as_mut_ptr() as *mut f32);
    for i in (0..whole).step_by(8) {
        let x = _mm256_loadu_ps(g.as_ptr().add(i));
        let d = _mm256_loadu_ps(dm.as_ptr().add(i));
        let s = _mm256_div_ps(
            one,
            _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))),
        );
        _mm256_storeu_ps(du_out.add(i), _mm256_mul_ps(_mm256_mul_ps(d, x), s));
        let slope = _mm256_fmadd_ps(x, _mm256_sub_ps(one, s), one);
        let dus = _mm256_mul_ps(_mm256_mul_ps(d, _mm256_loadu_ps(u.as_ptr().add(i))), s);
        _mm256_storeu_ps(dg_out.add(i), _mm256_mul_ps(dus, slope));
    }
    silu_mul_backward_scalar(
        &g[whole..],
        &u[whole..],
        &dm[whole..],
        &mut dg[whole..],
        &mut du[whole..],
    );
}

/// `row[i] = e^(row[i] − max)` for every value; returns their sum.
pub fn exp_in_place(row: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::simd_available() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { exp_in_place_simd(row, max) };
    }
    exp_in_place_scalar(row, max)
}

fn exp_in_place_scalar(row: &mut [f32], max: f32) -> f32 {
    row.iter_mut()
        .map(|x| {
            *x = (*x - max).exp();
            *x
        })
        .sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_in_place_simd(row: &mut [f32], max: f32) -> f32 {
    use std::arch::x86_64::*;
    let whole = row.len() / 8 * 8;
    let m = _mm256_set1_ps(max);
    let mut acc = _mm256_setzero_ps();
    for c in row[..whole].chunks_exact_mut(8) {
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m));
        _mm256_storeu_ps(c.as_mut_ptr(), e);
        acc = _mm256_add_ps(acc, e);
    }
    crate::hsum256(acc) + exp_in_place_scalar(&mut row[whole..], max)
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

    /// The training pass's two: SwiGLU's backward and the softmax's exponentials, with a tail past the
    /// last full vector, against their f64 definitions.
    #[test]
    fn silu_backward_and_exp_in_place_match_their_definitions() {
        let n = 1_003;
        let g: Vec<f32> = (0..n).map(|i| (i as f32 - 500.0) / 25.0).collect();
        let u: Vec<f32> = (0..n).map(|i| ((i % 13) as f32 - 6.0) / 3.0).collect();
        let dm: Vec<f32> = (0..n).map(|i| ((i % 7) as f32 - 3.0) / 2.0).collect();
        let (mut dg, mut du) = (vec![0f32; n], vec![0f32; n]);
        let (dg_out, du_out) = (
            crate::team::as_uninit(&mut dg),
            crate::team::as_uninit(&mut du),
        );
        silu_mul_backward(&g, &u, &dm, dg_out, du_out);
        for i in 0..n {
            let (x, s) = (g[i] as f64, 1.0 / (1.0 + (-g[i] as f64).exp()));
            let want_du = dm[i] as f64 * x * s;
            let want_dg = dm[i] as f64 * u[i] as f64 * s * (1.0 + x * (1.0 - s));
            assert!(
                (du[i] as f64 - want_du).abs() <= 1e-5 * (1.0 + want_du.abs()),
                "du {i}"
            );
            assert!(
                (dg[i] as f64 - want_dg).abs() <= 1e-5 * (1.0 + want_dg.abs()),
                "dg {i}"
            );
        }
        let mut row: Vec<f32> = (0..n)
            .map(|i| ((i * 37) % 101) as f32 / 7.0 - 5.0)
            .collect();
        let want: Vec<f64> = row.iter().map(|&v| (v as f64 - 9.0).exp()).collect();
        let sum = exp_in_place(&mut row, 9.0);
        for i in 0..n {
            assert!((row[i] as f64 - want[i]).abs() <= 1e-6 * want[i], "exp {i}");
        }
        let total: f64 = want.iter().sum();
        assert!((sum as f64 - total).abs() <= 1e-5 * total);
    }
}
