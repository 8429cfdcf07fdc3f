//! Dot products of GGUF block rows (Q4_1, Q8_0) with activation rows.
//!
//! Activation rows are rounded to 16-bit integers with one f32 scale per 32-value block ([`Int16Rows`]), so
//! a block's dot product is integer multiply-adds (`vpmaddwd`) on the quants as stored. 16 bits keep each
//! activation to 1/65534 of its block's largest value: the products differ from f32 ones by ~1e-5 relative
//! (llama.cpp rounds activations to 8 bits, 1/254, and its greedy text drifts from the f32 model's).
//! Q4_1's minimum multiplies each block's exact f32 sum: Σ (d·q + m)·x = d·Σ q·x + m·Σ x.
//!
//! A group of eight blocks is multiplied together: [`QuantMatrix`](crate::QuantMatrix) interleaves their
//! quants two bytes at a time, and [`Int16Rows`] the activations the same way, so lane i of each `vpmaddwd`
//! belongs to block i. After the group's 16 (Q8_0) or 8 (Q4_1) steps, the lanes hold the blocks' sums,
//! scaled by one vector of scales — no horizontal sums, which cost more than the products on AMD cores.
//! Groups run over a unit of rows (four rows of SmolLM2's 576 columns are nine groups), and the activations
//! are repeated once per row of the unit; where a row ends inside a group, the lanes before its end finish
//! that row's sum and the rest start the next one's.
//!
//! Up to four activation rows share each weight load and unpacking (batched decode); every row's result is
//! computed by the same operations in the same order, so a row gets the same result alone or in a batch.

use std::ops::Range;

#[cfg(target_arch = "x86_64")]
use crate::quant_matrix::BlockFormat;
use crate::quant_matrix::{interleaved, BlockRow, QuantMatrix, BLOCK, MAX_GROUP};

/// Bytes ahead of the current group to prefetch: long rows of blocks stream from memory, and the hardware
/// prefetcher alone kept the kernel at ~60% of a core's read bandwidth.
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 4096;

/// Activation rows as 16-bit integers, interleaved as the weights' quants and repeated once per row of the
/// weights' unit (see the module), with one f32 scale per block and each block's exact f32 sum.
pub struct Int16Rows {
    q: Vec<i16>,
    scale: Vec<f32>,
    sum: Vec<f32>,
    #[cfg(target_arch = "x86_64")]
    rows: usize,
    /// Groups of eight blocks in one row's values (a weight unit's span).
    groups: usize,
}

/// One row of [`Int16Rows`].
#[derive(Clone, Copy)]
pub struct Int16Row<'a> {
    pub q: &'a [i16],
    pub scale: &'a [f32],
    pub sum: &'a [f32],
}

/// Values of one group of one activation row: 16 steps of 16 lanes.
const GROUP_VALUES: usize = 16 * 2 * MAX_GROUP;

impl Int16Row<'_> {
    /// Value v of block b, as the kernels see it (`q · scale`).
    pub fn value(&self, b: usize, v: usize) -> f32 {
        let (g, i) = (b / MAX_GROUP, b % MAX_GROUP);
        let q = self.q[g * GROUP_VALUES + interleaved(MAX_GROUP, BLOCK, i, v)];
        q as f32 * self.scale[g * MAX_GROUP + i]
    }
}

impl Int16Rows {
    /// Rounds `m` rows of `w.cols` values each, laid out for the weights `w`.
    pub fn new(x: &[f32], m: usize, w: &QuantMatrix) -> Self {
        let (cols, unit) = (w.cols, w.unit);
        assert_eq!(x.len(), m * cols, "activation shape");
        let nb = cols / BLOCK;
        let groups = unit * nb / MAX_GROUP;
        let mut q = vec![0i16; m * groups * GROUP_VALUES];
        let mut scale = vec![0f32; m * groups * MAX_GROUP];
        let mut sum = vec![0f32; m * groups * MAX_GROUP];
        #[cfg(target_arch = "x86_64")]
        let simd = crate::simd_available();
        for i in 0..m {
            for b in 0..nb {
                let xb: &[f32; BLOCK] = x[i * cols + b * BLOCK..][..BLOCK].try_into().unwrap();
                #[cfg(target_arch = "x86_64")]
                let rounded = match simd {
                    // SAFETY: the CPU has AVX2 and FMA.
                    true => unsafe { round_block_simd(xb) },
                    false => round_block(xb),
                };
                #[cfg(not(target_arch = "x86_64"))]
                let rounded = round_block(xb);
                let (values, amax, block_sum) = rounded;
                // Copy c sits at block c·nb + b of the unit: lane (that % 8) of group (that / 8).
                for c in 0..unit {
                    let (g, lane) = ((c * nb + b) / MAX_GROUP, (c * nb + b) % MAX_GROUP);
                    let slot = (i * groups + g) * MAX_GROUP + lane;
                    let qg = &mut q[(i * groups + g) * GROUP_VALUES..];
                    // Values (2t, 2t+1) side by side at step t's lane (`interleaved`, without its divisions).
                    for (t, pair) in values.chunks_exact(2).enumerate() {
                        let at = 2 * MAX_GROUP * t + 2 * lane;
                        qg[at..at + 2].copy_from_slice(pair);
                    }
                    scale[slot] = amax / i16::MAX as f32;
                    sum[slot] = block_sum;
                }
            }
        }
        Self {
            q,
            scale,
            sum,
            #[cfg(target_arch = "x86_64")]
            rows: m,
            groups,
        }
    }

    #[inline]
    pub fn row(&self, i: usize) -> Int16Row<'_> {
        let (gv, gs) = (self.groups * GROUP_VALUES, self.groups * MAX_GROUP);
        Int16Row {
            q: &self.q[i * gv..(i + 1) * gv],
            scale: &self.scale[i * gs..(i + 1) * gs],
            sum: &self.sum[i * gs..(i + 1) * gs],
        }
    }
}

/// A block's values rounded to steps of amax/32767 (ties to even), its largest magnitude amax and its sum.
fn round_block(xb: &[f32; BLOCK]) -> ([i16; BLOCK], f32, f32) {
    let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
    let inv = if amax > 0.0 {
        i16::MAX as f32 / amax
    } else {
        0.0
    };
    let values = xb.map(|v| (v * inv).round_ties_even() as i16);
    (values, amax, xb.iter().sum())
}

/// [`round_block`] in four vectors (the sum in another order); `vcvtps2dq` rounds ties to even as the
/// scalar version does (without SSE4.1 at compile time, `round_ties_even` was a libm call per value).
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn round_block_simd(xb: &[f32; BLOCK]) -> ([i16; BLOCK], f32, f32) {
    use std::arch::x86_64::*;
    let v: [__m256; 4] = std::array::from_fn(|j| _mm256_loadu_ps(xb.as_ptr().add(8 * j)));
    let magnitude = |x| _mm256_andnot_ps(_mm256_set1_ps(-0.0), x);
    let m = _mm256_max_ps(
        _mm256_max_ps(magnitude(v[0]), magnitude(v[1])),
        _mm256_max_ps(magnitude(v[2]), magnitude(v[3])),
    );
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1)));
    let sum = crate::hsum256(_mm256_add_ps(
        _mm256_add_ps(v[0], v[1]),
        _mm256_add_ps(v[2], v[3]),
    ));
    let inv = _mm256_set1_ps(if amax > 0.0 {
        i16::MAX as f32 / amax
    } else {
        0.0
    });
    let q = v.map(|x| _mm256_cvtps_epi32(_mm256_mul_ps(x, inv)));
    // packs works within 128-bit lanes: (a0-3 b0-3 a4-7 b4-7) → reorder the 64-bit quarters.
    let lo = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0b11_01_10_00);
    let hi = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0b11_01_10_00);
    let mut values = [0i16; BLOCK];
    _mm256_storeu_si256(values.as_mut_ptr() as *mut __m256i, lo);
    _mm256_storeu_si256(values.as_mut_ptr().add(16) as *mut __m256i, hi);
    (values, amax, sum)
}

/// One weight row times one f32 activation row, dequantizing each block: the portable reference.
pub fn row_dot_scalar(row: BlockRow, x: &[f32]) -> f32 {
    let mut w = [0f32; BLOCK];
    (0..row.blocks)
        .map(|b| {
            row.dequantize_block(b, &mut w);
            w.iter()
                .zip(&x[b * BLOCK..])
                .map(|(a, v)| a * v)
                .sum::<f32>()
        })
        .sum()
}

/// `out[(r - rows.start)·m + i]` = weight row r times rounded activation row i, for the m rows of x, AVX2
/// (see the module): four activation rows at a time share each weight load, the rest one by one. Whole units
/// are computed; a range that starts or ends inside one costs that unit's other rows.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn rows_dot_i16_simd(
    w: &QuantMatrix,
    rows: Range<usize>,
    x: &Int16Rows,
    out: &mut [f32],
) {
    let m = x.rows;
    assert!(
        rows.end <= w.rows && out.len() == rows.len() * m,
        "output shape"
    );
    assert!(
        x.groups * MAX_GROUP * BLOCK == w.unit * w.cols,
        "activations rounded for these weights"
    );
    match w.format {
        BlockFormat::Q4_1 => dot_rows::<true>(w, rows, x, out),
        BlockFormat::Q8_0 => dot_rows::<false>(w, rows, x, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows<const Q4: bool>(
    w: &QuantMatrix,
    rows: Range<usize>,
    x: &Int16Rows,
    out: &mut [f32],
) {
    let (m, unit, nb) = (x.rows, w.unit, w.blocks_per_row());
    let xrows: Vec<Int16Row> = (0..m).map(|i| x.row(i)).collect();
    let quads = m / 4 * 4;
    // One unit's rows × activation rows, then the rows in range copied out.
    let mut sums = vec![0f32; unit * m];
    for u in rows.start / unit..rows.end.div_ceil(unit) {
        let block_row = w.unit(u);
        for i in (0..quads).step_by(4) {
            let xs = [xrows[i], xrows[i + 1], xrows[i + 2], xrows[i + 3]];
            dot_unit::<Q4, 4>(block_row, nb, xs, &mut sums[i..], m);
        }
        for i in quads..m {
            dot_unit::<Q4, 1>(block_row, nb, [xrows[i]], &mut sums[i..], m);
        }
        for r in (u * unit).max(rows.start)..((u + 1) * unit).min(rows.end) {
            let (at, from) = ((r - rows.start) * m, (r - u * unit) * m);
            out[at..at + m].copy_from_slice(&sums[from..from + m]);
        }
    }
}

/// Lanes below j set, for j = 0..=8: where a row ends inside a group, the lanes before its end.
#[cfg(target_arch = "x86_64")]
static LANES_BELOW: [[i32; MAX_GROUP]; MAX_GROUP + 1] = {
    let mut masks = [[0i32; MAX_GROUP]; MAX_GROUP + 1];
    let mut j = 0;
    while j <= MAX_GROUP {
        let mut lane = 0;
        while lane < j {
            masks[j][lane] = -1;
            lane += 1;
        }
        j += 1;
    }
    masks
};

/// One unit's rows (of `nb` blocks each) times N activation rows: `out[k·m + n]` for the unit's row k.
/// Q4_1 (`Q4`) or Q8_0 blocks, one copy of the loop each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_unit<const Q4: bool, const N: usize>(
    unit: BlockRow,
    nb: usize,
    xs: [Int16Row; N],
    out: &mut [f32],
    m: usize,
) {
    use std::arch::x86_64::*;
    const GS: usize = MAX_GROUP;
    let qb = if Q4 { 16 } else { 32 };
    let (scales, mins, quants) = (
        unit.scales().as_ptr(),
        unit.mins().as_ptr(),
        unit.quants().as_ptr(),
    );
    let f16x8 = |p: *const u8| _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
    let below = |j: usize| _mm256_loadu_ps(LANES_BELOW[j].as_ptr() as *const f32);
    let mut acc = [_mm256_setzero_ps(); N];
    // The unit's row being summed, and the block where it ends.
    let (mut k, mut row_end) = (0, nb);
    for g in 0..unit.span / GS {
        let qg = quants.add(g * GS * qb);
        for line in (0..GS * qb).step_by(64) {
            _mm_prefetch(
                qg.wrapping_add(line + PREFETCH_AHEAD) as *const i8,
                _MM_HINT_T0,
            );
        }
        // Step t: bytes (2t, 2t+1) of each of the group's blocks, and the activations' values (2t, 2t+1) of
        // each block.
        let wt = |t: usize| _mm_loadu_si128(qg.add(2 * GS * t) as *const __m128i);
        let xt = |n: usize, t: usize| {
            _mm256_loadu_si256(
                xs[n].q.as_ptr().add(g * GROUP_VALUES + 2 * MAX_GROUP * t) as *const __m256i
            )
        };
        let mut s = [_mm256_setzero_si256(); N];
        if Q4 {
            // Byte k of a Q4_1 block holds values k (low nibble) and k + 16 (high nibble).
            for t in 0..8 {
                let v = _mm256_cvtepu8_epi16(wt(t));
                let (lo, hi) = (
                    _mm256_and_si256(v, _mm256_set1_epi16(15)),
                    _mm256_srli_epi16(v, 4),
                );
                for (n, sn) in s.iter_mut().enumerate() {
                    let p = _mm256_add_epi32(
                        _mm256_madd_epi16(lo, xt(n, t)),
                        _mm256_madd_epi16(hi, xt(n, t + 8)),
                    );
                    *sn = _mm256_add_epi32(*sn, p);
                }
            }
        } else {
            for t in 0..16 {
                let w = _mm256_cvtepi8_epi16(wt(t));
                for (n, sn) in s.iter_mut().enumerate() {
                    *sn = _mm256_add_epi32(*sn, _mm256_madd_epi16(w, xt(n, t)));
                }
            }
        }
        // The group's contribution, lane by lane: s·d·xs (+ m·Σx).
        let d = f16x8(scales.add(2 * g * GS));
        let mn = if Q4 { f16x8(mins.add(2 * g * GS)) } else { d };
        let mut part = [_mm256_setzero_ps(); N];
        for (n, p) in part.iter_mut().enumerate() {
            let (xs_g, sum_g) = (
                xs[n].scale.as_ptr().add(g * MAX_GROUP),
                xs[n].sum.as_ptr().add(g * MAX_GROUP),
            );
            let dx = _mm256_mul_ps(d, _mm256_loadu_ps(xs_g));
            *p = _mm256_mul_ps(_mm256_cvtepi32_ps(s[n]), dx);
            if Q4 {
                *p = _mm256_fmadd_ps(mn, _mm256_loadu_ps(sum_g), *p);
            }
        }
        // Rows ending inside this group take the lanes before their end; the rest carry on.
        while row_end <= (g + 1) * GS {
            let j = below(row_end - g * GS);
            for n in 0..N {
                let sum = _mm256_add_ps(acc[n], _mm256_and_ps(j, part[n]));
                out[k * m + n] = crate::hsum256(sum);
                acc[n] = _mm256_setzero_ps();
                part[n] = _mm256_andnot_ps(j, part[n]);
            }
            k += 1;
            row_end += nb;
        }
        for n in 0..N {
            acc[n] = _mm256_add_ps(acc[n], part[n]);
        }
    }
}

/// Off x86 there is no 16-bit kernel: [`crate::simd_available`] is false, so nothing rounds to 16 bits.
///
/// # Safety
/// Never to be called (it panics).
#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn rows_dot_i16_simd(_: &QuantMatrix, _: Range<usize>, _: &Int16Rows, _: &mut [f32]) {
    unreachable!(
        "activations are rounded to 16 bits only where the SIMD kernels run (`simd_available`)"
    )
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn vector_rounding_equals_the_scalar_rounding() {
        if !crate::simd_available() {
            return;
        }
        let mut s = 7u64;
        for case in 0..200 {
            let xb: [f32; BLOCK] = std::array::from_fn(|j| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                match case % 4 {
                    // Halves of the step: ties, which both must round to even.
                    0 => (j as f32 - 16.0) * 0.5 / i16::MAX as f32 * 3.0,
                    1 => 0.0,
                    _ => u * 10f32.powi(case % 7 - 3),
                }
            });
            let (want, amax, sum) = round_block(&xb);
            // SAFETY: checked above.
            let (got, got_amax, got_sum) = unsafe { round_block_simd(&xb) };
            assert_eq!(got, want, "case {case}");
            assert_eq!(got_amax, amax, "case {case}");
            let scale = xb.iter().map(|v| v.abs()).sum::<f32>();
            assert!((got_sum - sum).abs() <= 1e-6 * scale, "case {case}");
        }
    }
}
