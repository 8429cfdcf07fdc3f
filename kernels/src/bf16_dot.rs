//! bf16 × bf16 → f32 products for a few activation rows (decode, batched decode, a few rows of logits): dot
//! products along k of rows that are both stored along k — the activation rows rounded to bf16 once, the
//! weight rows read in place — so nothing is packed. llama.cpp's tinyBLAS does its bf16 products this way.
//!
//! A register tile holds 16 products of T activation rows × F weight rows (T·F = 16: 4 × 4 for four rows
//! or more, 2 × 8, 1 × 16 for one), each 16 lanes of `vdpbf16ps` partial sums along k; at the end one
//! shuffle tree reduces the 16 vectors to one vector of 16 sums (45 instructions instead of 16
//! horizontal sums of 8 each). The GEMM ([`crate::bf16_gemm`]) takes over above a few tens of rows,
//! where packing the weight once pays for itself.
//!
//! The reference is the same as the GEMM's: the rounded operands' products summed in f64 (tests).

use half::bf16;

/// Where the products go: element (activation row i, weight row r) at `ptr[i · row_stride + (r − r0) ·
/// col_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct Strided {
    pub ptr: *mut f32,
    pub row_stride: usize,
    pub col_stride: usize,
}

/// Products of weight rows r0..r1 of w (rows of k bf16) with the m rows of x (m × k bf16), into `out`.
///
/// # Safety
/// The CPU must have what [`crate::bf16_products_native`] checks; `out` must address every (i, r) written
/// and nothing else may write there meanwhile.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn dot_rows(
    w: &[bf16],
    k: usize,
    x: &[bf16],
    m: usize,
    (r0, r1): (usize, usize),
    out: Strided,
) {
    assert!(x.len() >= m * k && w.len() >= r1 * k, "shapes");
    if m == 1 {
        return one_row(w, k, x, (r0, r1), out);
    }
    let mut i0 = 0;
    while i0 < m {
        let left = m - i0;
        let t = if left >= 4 {
            4
        } else if left >= 2 {
            2
        } else {
            1
        };
        match t {
            4 => rows_tiles::<4, 4>(w, k, x, (i0, m.min(i0 + 4 * (left / 4))), (r0, r1), out),
            2 => rows_tiles::<2, 8>(w, k, x, (i0, i0 + 2), (r0, r1), out),
            _ => rows_tiles::<1, 16>(w, k, x, (i0, i0 + 1), (r0, r1), out),
        }
        i0 += if t == 4 { 4 * (left / 4) } else { t };
    }
}

/// One activation row (decode): the weight rows one after another, a single stream through memory — a
/// tile of 16 rows read side by side ran the 49152-row head 1.4× slower than this, from DRAM.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn one_row(w: &[bf16], k: usize, x: &[bf16], (r0, r1): (usize, usize), out: Strided) {
    use std::arch::x86_64::*;
    let (wp, xp) = (w.as_ptr() as *const u16, x.as_ptr() as *const i16);
    for r in r0..r1 {
        let row = wp.add(r * k) as *const i16;
        let mut acc = [_mm512_setzero_ps(); 2];
        let mut p = 0;
        while p + 64 <= k {
            for (h, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_loadu_si512(xp.add(p + 32 * h) as *const __m512i);
                let wv = _mm512_loadu_si512(row.add(p + 32 * h) as *const __m512i);
                *a = _mm512_dpbf16_ps(*a, bh(xv), bh(wv));
            }
            p += 64;
        }
        while p < k {
            let mask: __mmask32 = if k - p >= 32 {
                u32::MAX
            } else {
                (1u32 << (k - p)) - 1
            };
            let xv = _mm512_maskz_loadu_epi16(mask, xp.add(p));
            let wv = _mm512_maskz_loadu_epi16(mask, row.add(p));
            acc[0] = _mm512_dpbf16_ps(acc[0], bh(xv), bh(wv));
            p += 32;
        }
        *out.ptr.add((r - r0) * out.col_stride) =
            _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn bh(v: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512bh {
    // SAFETY: both are 64 bytes of plain bits.
    unsafe { std::mem::transmute(v) }
}

/// Tiles of T activation rows (i0..i1, a multiple of T) × F weight rows over r0..r1.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn rows_tiles<const T: usize, const F: usize>(
    w: &[bf16],
    k: usize,
    x: &[bf16],
    (i0, i1): (usize, usize),
    (r0, r1): (usize, usize),
    out: Strided,
) {
    let (wp, xp) = (w.as_ptr() as *const u16, x.as_ptr() as *const u16);
    for rf in (r0..r1).step_by(F) {
        let feats = (r1 - rf).min(F);
        // Weight rows past the end repeat the last one; their sums are not stored.
        let wr: [*const u16; F] = std::array::from_fn(|f| wp.add((rf + f.min(feats - 1)) * k));
        for it in (i0..i1).step_by(T) {
            let xr: [*const u16; T] = std::array::from_fn(|i| xp.add((it + i) * k));
            let sums = tile::<T, F>(k, xr, wr);
            for f in 0..feats {
                for i in 0..T {
                    // The tile's product s = T·f + i sits in lane 4·(s mod 4) + s / 4 (see `reduce16`).
                    let s = T * f + i;
                    let v = sums[4 * (s % 4) + s / 4];
                    *out.ptr
                        .add((it + i) * out.row_stride + (rf + f - r0) * out.col_stride) = v;
                }
            }
        }
    }
}

/// The 16 dot products of T x rows × F w rows along k, as lanes of one vector (order: see `reduce16`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
unsafe fn tile<const T: usize, const F: usize>(
    k: usize,
    x: [*const u16; T],
    w: [*const u16; F],
) -> [f32; 16] {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 16];
    let load = |p: *const u16, mask: __mmask32| -> __m512bh {
        std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(mask, p as *const i16))
    };
    let mut p = 0;
    let mut step = |p: usize, mask: __mmask32| {
        let xv: [__m512bh; T] = std::array::from_fn(|i| load(x[i].add(p), mask));
        for f in 0..F {
            let wv = load(w[f].add(p), mask);
            for i in 0..T {
                acc[T * f + i] = _mm512_dpbf16_ps(acc[T * f + i], xv[i], wv);
            }
        }
    };
    while p + 32 <= k {
        step(p, u32::MAX);
        p += 32;
    }
    if p < k {
        step(p, (1u32 << (k - p)) - 1);
    }
    let mut sums = [0f32; 16];
    _mm512_storeu_ps(sums.as_mut_ptr(), reduce16(acc));
    sums
}

/// Lane 4t + u of the result = the sum of a[4u + t]'s 16 lanes: 128-bit halves, then quarters, then
/// 32- and 64-bit interleaves within each 128-bit chunk, adding at each level.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn reduce16(a: [std::arch::x86_64::__m512; 16]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // b[j]: chunks 0–1 hold a[2j] folded in half, chunks 2–3 a[2j + 1].
    let b: [__m512; 8] = std::array::from_fn(|j| {
        let (x, y) = (a[2 * j], a[2 * j + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(x, y),
            _mm512_shuffle_f32x4::<0xEE>(x, y),
        )
    });
    // c[j]: chunk q holds a[4j + q] folded to four lanes.
    let c: [__m512; 4] = std::array::from_fn(|j| {
        let (x, y) = (b[2 * j], b[2 * j + 1]);
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(x, y),
            _mm512_shuffle_f32x4::<0xDD>(x, y),
        )
    });
    // d[j], chunk q: [c[2j] (lanes 0+2), c[2j+1] (0+2), c[2j] (1+3), c[2j+1] (1+3)].
    let d: [__m512; 2] = std::array::from_fn(|j| {
        let (x, y) = (c[2 * j], c[2 * j + 1]);
        _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y))
    });
    // chunk q: [c[0], c[1], c[2], c[3]] summed whole, each for source a[4u + q].
    let (x, y) = (_mm512_castps_pd(d[0]), _mm512_castps_pd(d[1]));
    _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
        _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)),
    )
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::matmul::tests::fill;

    #[test]
    fn the_shuffle_tree_sums_each_vector_into_its_lane() {
        if !crate::bf16_products_native() {
            eprintln!("this CPU has no avx512_bf16: the dot kernels are not tested here");
            return;
        }
        use std::arch::x86_64::*;
        let vals: Vec<f32> = (0..256).map(|i| (i * 7 % 31) as f32).collect();
        // SAFETY: AVX-512 checked above.
        let got = unsafe {
            let a: [__m512; 16] = std::array::from_fn(|s| _mm512_loadu_ps(vals[16 * s..].as_ptr()));
            let mut out = [0f32; 16];
            _mm512_storeu_ps(out.as_mut_ptr(), reduce16(a));
            out
        };
        for t in 0..4 {
            for u in 0..4 {
                let want: f32 = vals[16 * (4 * u + t)..16 * (4 * u + t + 1)].iter().sum();
                assert_eq!(got[4 * t + u], want, "lane {}", 4 * t + u);
            }
        }
    }

    /// Every tile shape and edge: 1–9 activation rows, weight rows not a multiple of any F, k with a
    /// partial last step (odd too), a sub-range of weight rows, both output layouts.
    #[test]
    fn dot_rows_match_the_rounded_reference() {
        if !crate::bf16_products_native() {
            eprintln!("this CPU has no avx512_bf16: the dot kernels are not tested here");
            return;
        }
        for (m, k, rows) in [
            (1, 64, 17),
            (2, 45, 9),
            (3, 33, 40),
            (5, 100, 21),
            (9, 576, 35),
        ] {
            let x: Vec<bf16> = fill(m * k, 5).iter().map(|v| bf16::from_f32(*v)).collect();
            let w: Vec<bf16> = fill(rows * k, 6)
                .iter()
                .map(|v| bf16::from_f32(*v))
                .collect();
            let (r0, r1) = (3.min(rows - 1), rows);
            let mut y = vec![f32::NAN; m * rows];
            let mut part = vec![f32::NAN; (r1 - r0) * m];
            // SAFETY: AVX-512 BF16 checked above; each layout addresses its own buffer.
            unsafe {
                let y_out = Strided {
                    ptr: y.as_mut_ptr().add(r0),
                    row_stride: rows,
                    col_stride: 1,
                };
                dot_rows(&w, k, &x, m, (r0, r1), y_out);
                let part_out = Strided {
                    ptr: part.as_mut_ptr(),
                    row_stride: 1,
                    col_stride: m,
                };
                dot_rows(&w, k, &x, m, (r0, r1), part_out);
            }
            for i in 0..m {
                for r in r0..r1 {
                    let terms = (0..k).map(|p| x[i * k + p].to_f64() * w[r * k + p].to_f64());
                    let want: f64 = terms.clone().sum();
                    let mag: f64 = terms.map(f64::abs).sum();
                    let tol = (k as f64 + 2.0) * f32::EPSILON as f64 * mag + 1e-30;
                    let (a, b) = (y[i * rows + r] as f64, part[(r - r0) * m + i] as f64);
                    assert!(
                        (a - want).abs() <= tol,
                        "{m}×{k}×{rows} y[{i},{r}] {a} vs {want}"
                    );
                    assert_eq!(a, b, "the two layouts hold the same sums");
                }
            }
        }
    }
}
