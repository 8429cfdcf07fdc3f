//! GGUF Q4_1 / Q8_0 weight matrices, kept quantized, with the bytes laid out for the kernels.
//!
//! A GGUF row interleaves each block's f16 scale (and Q4_1's f16 minimum) with its quants. Here the rows are
//! stored in units of `unit` consecutive rows, so that a unit holds a whole number of groups of eight blocks
//! (SmolLM2's 576 columns are 18 blocks: four rows make 72 blocks, nine groups). A unit holds its scales, then
//! its minimums, then its quants with each group of eight blocks interleaved two bytes at a time (see
//! `blocks`): the same bytes, but a group's scales load as one vector and its quants feed one vector of sums,
//! lane i for block i, and no lane is idle (groups of six, one row's 18 blocks in three, left a quarter of
//! every vector unused).

use half::f16;
use rayon::prelude::*;

/// Values per quantization block.
pub const BLOCK: usize = 32;

/// Blocks the kernels multiply together: one vector of eight 32-bit sums and eight scales.
pub(crate) const MAX_GROUP: usize = 8;

/// Bytes past the last unit that a kernel may read (16-byte loads of scales near a unit's end).
const READ_PAST: usize = 16;

/// Rows per stored unit for rows of `nb` blocks: the fewest whose blocks fill whole groups of eight.
pub(crate) fn unit_rows(nb: usize) -> usize {
    (1..=MAX_GROUP)
        .find(|u| (u * nb).is_multiple_of(MAX_GROUP))
        .unwrap_or(MAX_GROUP)
}

/// Where element k (of `per_block` bytes or values) of block b sits, with groups of `group` blocks: element
/// pairs (2t, 2t+1) of the group's blocks side by side for each t.
pub(crate) fn interleaved(group: usize, per_block: usize, b: usize, k: usize) -> usize {
    let (g, i) = (b / group, b % group);
    g * group * per_block + (k / 2) * 2 * group + 2 * i + k % 2
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    /// f16 scale d, f16 min m, 16 bytes of nibbles: w[j] = d·(q[j]&15) + m, w[j+16] = d·(q[j]>>4) + m.
    Q4_1,
    /// f16 scale d, 32 signed bytes: w[j] = d·q[j].
    Q8_0,
}

impl BlockFormat {
    pub fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q4_1 => 20,
            BlockFormat::Q8_0 => 34,
        }
    }

    /// Bytes of quants per block (after the f16 scale and minimum).
    pub(crate) fn quant_bytes(self) -> usize {
        match self {
            BlockFormat::Q4_1 => 16,
            BlockFormat::Q8_0 => 32,
        }
    }

    fn has_min(self) -> bool {
        self == BlockFormat::Q4_1
    }
}

/// A row-major (rows × cols) weight matrix of GGUF blocks along each row, stored in units of rows (see the
/// module).
pub struct QuantMatrix {
    pub format: BlockFormat,
    pub rows: usize,
    pub cols: usize,
    /// Rows per unit ([`unit_rows`]); the last unit is padded with zero blocks.
    pub(crate) unit: usize,
    /// The units, then `READ_PAST` zero bytes.
    data: Vec<u8>,
}

/// Blocks of one stored unit: `span` scales (f16), minimums (f16, Q4_1 only), then the quants (and the bytes
/// after them that a kernel may read). As a row's view, blocks `first..first + blocks` of the unit.
#[derive(Clone, Copy)]
pub struct BlockRow<'a> {
    pub format: BlockFormat,
    pub blocks: usize,
    first: usize,
    pub(crate) span: usize,
    bytes: &'a [u8],
}

impl<'a> BlockRow<'a> {
    #[inline]
    pub(crate) fn scales(&self) -> &'a [u8] {
        &self.bytes[..2 * self.span]
    }

    /// Q4_1's per-block minimums (empty for Q8_0).
    #[inline]
    pub(crate) fn mins(&self) -> &'a [u8] {
        match self.format.has_min() {
            true => &self.bytes[2 * self.span..4 * self.span],
            false => &[],
        }
    }

    #[inline]
    pub(crate) fn quants(&self) -> &'a [u8] {
        let start = if self.format.has_min() { 4 } else { 2 } * self.span;
        &self.bytes[start..]
    }

    pub fn scale(&self, b: usize) -> f32 {
        f16_at(self.scales(), self.first + b)
    }

    pub fn min(&self, b: usize) -> f32 {
        match self.format.has_min() {
            true => f16_at(self.mins(), self.first + b),
            false => 0.0,
        }
    }

    /// Block b's 32 values as f32.
    pub fn dequantize_block(&self, b: usize, out: &mut [f32]) {
        let (d, m) = (self.scale(b), self.min(b));
        let (b, gs, qb) = (self.first + b, MAX_GROUP, self.format.quant_bytes());
        // The block's bytes back in order: pair t sits at step t of its group, at the block's lane.
        let base = (b / gs) * gs * qb + 2 * (b % gs);
        let mut q = [0u8; 32];
        for (t, pair) in q[..qb].chunks_exact_mut(2).enumerate() {
            pair.copy_from_slice(&self.quants()[base + 2 * gs * t..base + 2 * gs * t + 2]);
        }
        match self.format {
            BlockFormat::Q4_1 => {
                let (lo, hi) = out[..BLOCK].split_at_mut(16);
                for ((l, h), &byte) in lo.iter_mut().zip(hi).zip(&q[..16]) {
                    *l = d * (byte & 15) as f32 + m;
                    *h = d * (byte >> 4) as f32 + m;
                }
            }
            BlockFormat::Q8_0 => {
                for (v, &byte) in out[..BLOCK].iter_mut().zip(&q) {
                    *v = d * byte as i8 as f32;
                }
            }
        }
    }
}

fn f16_at(bytes: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f32()
}

impl QuantMatrix {
    /// From GGUF block bytes (rows × cols/32 blocks, row-major).
    pub fn new(
        format: BlockFormat,
        rows: usize,
        cols: usize,
        gguf: Vec<u8>,
    ) -> Result<Self, String> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(format!(
                "{cols} columns is not a multiple of the block size {BLOCK}"
            ));
        }
        let want = rows * cols / BLOCK * format.block_bytes();
        if gguf.len() != want {
            return Err(format!(
                "{:?} {rows}×{cols} needs {want} bytes, got {}",
                format,
                gguf.len()
            ));
        }
        let (nb, bb, qb) = (cols / BLOCK, format.block_bytes(), format.quant_bytes());
        let unit = unit_rows(nb);
        let span = unit * nb;
        let mut data = vec![0u8; rows.div_ceil(unit) * span * bb + READ_PAST];
        data[..rows.div_ceil(unit) * span * bb]
            .par_chunks_mut(span * bb)
            .zip(gguf.par_chunks(span * bb))
            .for_each(|(out, unit_rows)| {
                let header = bb - qb;
                let (heads, quants) = out.split_at_mut(header * span);
                // The last unit's missing rows stay zero: zero scales, zero products.
                for (b, blk) in unit_rows.chunks_exact(bb).enumerate() {
                    heads[2 * b..2 * b + 2].copy_from_slice(&blk[..2]);
                    if format.has_min() {
                        heads[2 * (span + b)..2 * (span + b) + 2].copy_from_slice(&blk[2..4]);
                    }
                    for (k, &q) in blk[header..].iter().enumerate() {
                        quants[interleaved(MAX_GROUP, qb, b, k)] = q;
                    }
                }
            });
        Ok(Self {
            format,
            rows,
            cols,
            unit,
            data,
        })
    }

    #[inline]
    pub fn blocks_per_row(&self) -> usize {
        self.cols / BLOCK
    }

    /// Unit u's blocks, all of them.
    #[inline]
    pub(crate) fn unit(&self, u: usize) -> BlockRow<'_> {
        let span = self.unit * self.blocks_per_row();
        let ub = span * self.format.block_bytes();
        BlockRow {
            format: self.format,
            blocks: span,
            first: 0,
            span,
            bytes: &self.data[u * ub..(u + 1) * ub + READ_PAST],
        }
    }

    /// Row r's blocks.
    #[inline]
    pub fn row(&self, r: usize) -> BlockRow<'_> {
        let nb = self.blocks_per_row();
        BlockRow {
            blocks: nb,
            first: (r % self.unit) * nb,
            ..self.unit(r / self.unit)
        }
    }

    /// The f32 values of row `r`, block by block: the portable reference ([`Self::dequantize`] is the fast
    /// path).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.cols, "row length");
        let row = self.row(r);
        for (b, o) in out.chunks_exact_mut(BLOCK).enumerate() {
            row.dequantize_block(b, o);
        }
    }

    /// The whole matrix as f32, row-major, a unit at a time.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        let unit_values = self.unit * self.cols;
        out.par_chunks_mut(unit_values)
            .enumerate()
            .for_each(|(u, o)| {
                #[cfg(target_arch = "x86_64")]
                if crate::simd_available() {
                    if o.len() == unit_values {
                        // SAFETY: the CPU has AVX2, FMA and F16C; `o` holds the unit.
                        unsafe { dequantize_unit_simd(self.unit(u), o) };
                    } else {
                        let mut all = vec![0f32; unit_values];
                        // SAFETY: as above, into a whole unit's buffer (the last unit is padded).
                        unsafe { dequantize_unit_simd(self.unit(u), &mut all) };
                        o.copy_from_slice(&all[..o.len()]);
                    }
                    return;
                }
                for (i, row) in o.chunks_exact_mut(self.cols).enumerate() {
                    self.dequantize_row(u * self.unit + i, row);
                }
            });
        out
    }
}

/// A unit's values straight from the interleaved layout, a group at a time: step t's load holds bytes
/// (2t, 2t+1) of each of the group's blocks, so each lane pair converts to two values of one block, stored
/// where they belong: a 1536×576 Q4_1 matrix in 0.11 ms on two threads, was 0.51 ms gathering each block's
/// bytes first.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C, and `out` must hold the unit's `span · 32` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequantize_unit_simd(row: BlockRow, out: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(out.len() >= row.span * BLOCK, "a unit's values");
    let (gs, qb) = (MAX_GROUP, row.format.quant_bytes());
    let q4 = row.format.has_min();
    let (scales, mins, quants) = (
        row.scales().as_ptr(),
        row.mins().as_ptr(),
        row.quants().as_ptr(),
    );
    let out = out.as_mut_ptr();
    // Lanes (2i, 2i+1) of a half take block i's scale (and minimum).
    let (first, second) = (
        _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
        _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7),
    );
    for g in 0..row.span / gs {
        let d = _mm256_cvtph_ps(_mm_loadu_si128(scales.add(2 * g * gs) as *const __m128i));
        let m = match q4 {
            true => _mm256_cvtph_ps(_mm_loadu_si128(mins.add(2 * g * gs) as *const __m128i)),
            false => _mm256_setzero_ps(),
        };
        let halves = [
            (
                _mm256_permutevar8x32_ps(d, first),
                _mm256_permutevar8x32_ps(m, first),
            ),
            (
                _mm256_permutevar8x32_ps(d, second),
                _mm256_permutevar8x32_ps(m, second),
            ),
        ];
        let qg = quants.add(g * gs * qb);
        let block0 = out.add(g * gs * BLOCK);
        // Values (k, k+1) of each block from one 8-byte vector of ints: 2 per block, 4 blocks.
        let store = |v: __m256i, half: usize, k: usize| {
            let (dh, mh) = halves[half];
            let f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), dh, mh);
            let pairs: [u64; 4] = std::mem::transmute(f);
            for (i, pair) in pairs.iter().enumerate() {
                (block0.add((4 * half + i) * BLOCK + k) as *mut u64).write_unaligned(*pair);
            }
        };
        for t in 0..qb / 2 {
            let v = _mm_loadu_si128(qg.add(2 * gs * t) as *const __m128i);
            if q4 {
                // Byte k of a Q4_1 block holds values k (low nibble) and k + 16 (high nibble).
                let nib = _mm_set1_epi8(15);
                let lo = _mm_and_si128(v, nib);
                let hi = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
                store(_mm256_cvtepu8_epi32(lo), 0, 2 * t);
                store(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(lo, lo)), 1, 2 * t);
                store(_mm256_cvtepu8_epi32(hi), 0, 16 + 2 * t);
                store(
                    _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(hi, hi)),
                    1,
                    16 + 2 * t,
                );
            } else {
                store(_mm256_cvtepi8_epi32(v), 0, 2 * t);
                store(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(v, v)), 1, 2 * t);
            }
        }
    }
}
