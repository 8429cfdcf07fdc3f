//! Dense weight rows — f32, or bf16 widened to f32 — times f32 activation rows: the decode mat-vec and the
//! batched-decode 2 × 4 tile. A bf16 weight streams half of f32's bytes; each element becomes the f32 with
//! the same upper 16 bits. These kernels run bf16 weights only where the CPU lacks avx512_bf16, on
//! activations rounded to bf16 (`products`): the bf16 × bf16 products, in f32.

use half::bf16;

use crate::Weights;

/// A weight element the dense kernels read as f32.
pub trait DenseWeight: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;

    /// A row-major (rows × cols) matrix of these, as a product's weights.
    fn weights(w: &[Self], rows: usize, cols: usize) -> Weights<'_>;

    /// Eight elements from p, as f32.
    ///
    /// # Safety
    /// The CPU must have AVX2; p must point to eight readable elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl DenseWeight for f32 {
    fn to_f32(self) -> f32 {
        self
    }

    fn weights(w: &[Self], rows: usize, cols: usize) -> Weights<'_> {
        Weights::Dense { w, rows, cols }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl DenseWeight for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }

    fn weights(w: &[Self], rows: usize, cols: usize) -> Weights<'_> {
        Weights::Bf16 { w, rows, cols }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
        _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16))
    }
}

/// w · x, SIMD where the CPU has it.
pub(crate) fn dot<T: DenseWeight>(w: &[T], x: &[f32]) -> f32 {
    if crate::simd_available() {
        // SAFETY: AVX2 and FMA are available (checked).
        unsafe { dot_simd(w, x) }
    } else {
        w.iter().zip(x).map(|(a, b)| a.to_f32() * b).sum()
    }
}

/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn dot_simd<T: DenseWeight>(w: &[T], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = w.len().min(x.len());
    let (pw, px) = (w.as_ptr(), x.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut k = 0;
    while k + 32 <= n {
        for (j, a_j) in acc.iter_mut().enumerate() {
            let wv = T::load8(pw.add(k + 8 * j));
            *a_j = _mm256_fmadd_ps(wv, _mm256_loadu_ps(px.add(k + 8 * j)), *a_j);
        }
        k += 32;
    }
    let mut s = crate::hsum256(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
    while k < n {
        s += w[k].to_f32() * x[k];
        k += 1;
    }
    s
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn dot_simd<T: DenseWeight>(w: &[T], x: &[f32]) -> f32 {
    w.iter().zip(x).map(|(a, b)| a.to_f32() * b).sum()
}

/// Dot products of two weight rows with four activation rows: a register tile that reads each weight element
/// once per four rows without packing the weight, which is what GEMM libraries spend most of their time on
/// at a few rows.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn tile_2x4<T: DenseWeight>(w0: &[T], w1: &[T], x: [&[f32]; 4]) -> [[f32; 4]; 2] {
    use std::arch::x86_64::*;
    let n = w0.len();
    let mut acc = [[_mm256_setzero_ps(); 4]; 2];
    let mut k = 0;
    while k + 8 <= n {
        let a0 = T::load8(w0.as_ptr().add(k));
        let a1 = T::load8(w1.as_ptr().add(k));
        for j in 0..4 {
            let b = _mm256_loadu_ps(x[j].as_ptr().add(k));
            acc[0][j] = _mm256_fmadd_ps(a0, b, acc[0][j]);
            acc[1][j] = _mm256_fmadd_ps(a1, b, acc[1][j]);
        }
        k += 8;
    }
    let mut out = [[0f32; 4]; 2];
    for j in 0..4 {
        out[0][j] = crate::hsum256(acc[0][j]);
        out[1][j] = crate::hsum256(acc[1][j]);
        for kk in k..n {
            out[0][j] += w0[kk].to_f32() * x[j][kk];
            out[1][j] += w1[kk].to_f32() * x[j][kk];
        }
    }
    out
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn tile_2x4<T: DenseWeight>(w0: &[T], w1: &[T], x: [&[f32]; 4]) -> [[f32; 4]; 2] {
    let dot = |a: &[T], b: &[f32]| a.iter().zip(b).map(|(p, q)| p.to_f32() * q).sum();
    [
        [dot(w0, x[0]), dot(w0, x[1]), dot(w0, x[2]), dot(w0, x[3])],
        [dot(w1, x[0]), dot(w1, x[1]), dot(w1, x[2]), dot(w1, x[3])],
    ]
}

/// `part[(r - r0)·m + i]` = weight row r of w (rows of `cols`) times activation row i, for rows r0..r1.
pub(crate) fn dense_rows<T: DenseWeight>(
    w: &[T],
    cols: usize,
    x: &[f32],
    m: usize,
    (r0, r1): (usize, usize),
    part: &mut [f32],
) {
    if !(crate::simd_available() && m >= 4) {
        for r in r0..r1 {
            let wr = &w[r * cols..(r + 1) * cols];
            for i in 0..m {
                part[(r - r0) * m + i] = dot(wr, &x[i * cols..(i + 1) * cols]);
            }
        }
        return;
    }
    let mut r = r0;
    while r < r1 {
        let pair = (r1 - r).min(2);
        let w0 = &w[r * cols..(r + 1) * cols];
        let w1 = if pair == 2 {
            &w[(r + 1) * cols..(r + 2) * cols]
        } else {
            w0
        };
        for i in (0..m).step_by(4) {
            let quad = (m - i).min(4);
            let xr = |j: usize| {
                let ii = i + j.min(quad - 1);
                &x[ii * cols..(ii + 1) * cols]
            };
            // SAFETY: AVX2 and FMA are available (checked).
            let out = unsafe { tile_2x4(w0, w1, [xr(0), xr(1), xr(2), xr(3)]) };
            for j in 0..quad {
                part[(r - r0) * m + i + j] = out[0][j];
                if pair == 2 {
                    part[(r + 1 - r0) * m + i + j] = out[1][j];
                }
            }
        }
        r += 2;
    }
}
