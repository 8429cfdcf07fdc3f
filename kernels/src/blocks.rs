//! Dot products of GGUF block rows (Q4_1, Q8_0) with activation rows.
//!
//! Activation rows are rounded to 16-bit integers with one f32 scale per 32-value block ([`Int16Rows`]), so
//! a block's dot product is integer multiply-adds (`vpmaddwd`) on the quants as stored. 16 bits keep each
//! activation to 1/65534 of its block's largest value: the products differ from f32 ones by ~1e-5 relative
//! (llama.cpp rounds activations to 8 bits, 1/254, and its greedy text drifts from the f32 model's).
//! Q4_1's minimum multiplies each block's exact f32 sum: Σ (d·q + m)·x = d·Σ q·x + m·Σ x.
//!
//! A group of up to eight blocks is multiplied together: [`QuantMatrix`](crate::QuantMatrix) interleaves
//! their quants two bytes at a time, and [`Int16Rows`] the activations the same way, so lane i of each
//! `vpmaddwd` belongs to block i. After the group's 16 (Q8_0) or 8 (Q4_1) steps, the lanes hold the blocks'
//! sums, scaled by one vector of scales — no horizontal sums, which cost more than the products on AMD
//! cores. Groups tile the row exactly (six blocks for SmolLM2's 576 columns): a group of fewer than eight
//! leaves lanes unused, which was cheaper than summing a remainder block by block.
//!
//! Up to four activation rows share each weight load and unpacking (batched decode); every row's result is
//! computed by the same operations in the same order, so a row gets the same result alone or in a batch.

use std::ops::Range;

use crate::quant_matrix::{
    group_size, interleaved, BlockFormat, BlockRow, QuantMatrix, BLOCK, MAX_GROUP,
};

/// Bytes ahead of the current group to prefetch: long rows of blocks stream from memory, and the hardware
/// prefetcher alone kept the kernel at ~60% of a core's read bandwidth.
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 4096;

/// Activation rows as 16-bit integers, interleaved as the weights' quants (see the module), with one f32
/// scale per block and each block's exact f32 sum; each group of blocks has eight lanes of values, scales and
/// sums, zero past its blocks.
pub struct Int16Rows {
    q: Vec<i16>,
    scale: Vec<f32>,
    sum: Vec<f32>,
    rows: usize,
    group: usize,
    groups: usize,
}

/// One row of [`Int16Rows`].
#[derive(Clone, Copy)]
pub struct Int16Row<'a> {
    pub q: &'a [i16],
    pub scale: &'a [f32],
    pub sum: &'a [f32],
    group: usize,
}

/// Values of one group of one activation row: 16 steps of 16 lanes.
const GROUP_VALUES: usize = 16 * 2 * MAX_GROUP;

impl Int16Row<'_> {
    /// Value v of block b, as the kernels see it (`q · scale`).
    pub fn value(&self, b: usize, v: usize) -> f32 {
        let (g, i) = (b / self.group, b % self.group);
        let q = self.q[g * GROUP_VALUES + interleaved(MAX_GROUP, BLOCK, i, v)];
        q as f32 * self.scale[g * MAX_GROUP + i]
    }
}

impl Int16Rows {
    /// Rounds `m` rows of `cols` (a multiple of 32) values each, for weights of `cols` columns.
    pub fn new(x: &[f32], m: usize, cols: usize) -> Self {
        assert_eq!(x.len(), m * cols, "activation shape");
        let nb = cols / BLOCK;
        let group = group_size(nb);
        let groups = nb / group;
        let mut q = vec![0i16; m * groups * GROUP_VALUES];
        let mut scale = vec![0f32; m * groups * MAX_GROUP];
        let mut sum = vec![0f32; m * groups * MAX_GROUP];
        for i in 0..m {
            for b in 0..nb {
                let xb = &x[i * cols + b * BLOCK..i * cols + (b + 1) * BLOCK];
                // Lane (b % group) of group b / group; the groups' lanes are eight wide whatever their size.
                let (g, lane) = (b / group, b % group);
                let slot = (i * groups + g) * MAX_GROUP + lane;
                let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
                if amax > 0.0 {
                    let inv = i16::MAX as f32 / amax;
                    let qg = &mut q[(i * groups + g) * GROUP_VALUES..];
                    for (v, xv) in xb.iter().enumerate() {
                        qg[interleaved(MAX_GROUP, BLOCK, lane, v)] =
                            (xv * inv).round_ties_even() as i16;
                    }
                    scale[slot] = amax / i16::MAX as f32;
                }
                sum[slot] = xb.iter().sum();
            }
        }
        Self {
            q,
            scale,
            sum,
            rows: m,
            group,
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
            group: self.group,
        }
    }
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
/// (see the module): four activation rows at a time share each weight load, the rest one by one.
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
        x.group == w.group && x.groups * w.group * BLOCK == w.cols,
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
    use std::arch::x86_64::*;
    let m = x.rows;
    // Lanes past a group's blocks: their sums are zero (so are the activations there), but the scales read
    // there belong to the next group, or lie past the scales, and may not be finite.
    let lanes: [i32; MAX_GROUP] = std::array::from_fn(|j| if j < w.group { -1 } else { 0 });
    let keep = _mm256_castsi256_ps(_mm256_loadu_si256(lanes.as_ptr() as *const __m256i));
    let xrows: Vec<Int16Row> = (0..m).map(|i| x.row(i)).collect();
    let quads = m / 4 * 4;
    for (r, out) in rows.clone().zip(out.chunks_exact_mut(m)) {
        let row = w.row(r);
        for i in (0..quads).step_by(4) {
            let xs = [xrows[i], xrows[i + 1], xrows[i + 2], xrows[i + 3]];
            out[i..i + 4].copy_from_slice(&dot_row::<Q4, 4>(row, xs, keep));
        }
        for (i, o) in out.iter_mut().enumerate().skip(quads) {
            *o = dot_row::<Q4, 1>(row, [xrows[i]], keep)[0];
        }
    }
}

/// One weight row times N activation rows: Q4_1 (`Q4`) or Q8_0 blocks, one copy of the loop each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_row<const Q4: bool, const N: usize>(
    row: BlockRow,
    xs: [Int16Row; N],
    keep: std::arch::x86_64::__m256,
) -> [f32; N] {
    use std::arch::x86_64::*;
    let (gs, groups) = (row.group, row.blocks / row.group);
    let qb = if Q4 { 16 } else { 32 };
    let (scales, mins, quants) = (
        row.scales().as_ptr(),
        row.mins().as_ptr(),
        row.quants().as_ptr(),
    );
    let f16x8 =
        |p: *const u8| _mm256_and_ps(keep, _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)));
    let mut acc = [_mm256_setzero_ps(); N];
    for g in 0..groups {
        let qg = quants.add(g * gs * qb);
        for line in (0..gs * qb).step_by(64) {
            _mm_prefetch(
                qg.wrapping_add(line + PREFETCH_AHEAD) as *const i8,
                _MM_HINT_T0,
            );
        }
        // Step t: bytes (2t, 2t+1) of each of the group's blocks (16 bytes read, 2·gs of them its own), and
        // the activations' values (2t, 2t+1) of each block.
        let wt = |t: usize| _mm_loadu_si128(qg.add(2 * gs * t) as *const __m128i);
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
        // acc += s·d·xs (+ m·Σx)
        let d = f16x8(scales.add(2 * g * gs));
        let m = if Q4 { f16x8(mins.add(2 * g * gs)) } else { d };
        for n in 0..N {
            let (xs_g, sum_g) = (
                xs[n].scale.as_ptr().add(g * MAX_GROUP),
                xs[n].sum.as_ptr().add(g * MAX_GROUP),
            );
            let dx = _mm256_mul_ps(d, _mm256_loadu_ps(xs_g));
            acc[n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[n]), dx, acc[n]);
            if Q4 {
                acc[n] = _mm256_fmadd_ps(m, _mm256_loadu_ps(sum_g), acc[n]);
            }
        }
    }
    acc.map(|a| crate::hsum256(a))
}

#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn rows_dot_i16_simd(_: &QuantMatrix, _: Range<usize>, _: &Int16Rows, _: &mut [f32]) {
    unreachable!(
        "activations are rounded to 16 bits only where the SIMD kernels run (`simd_available`)"
    )
}
