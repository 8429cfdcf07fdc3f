//! Dot products of GGUF block rows (Q4_1, Q8_0) with f32 activations.
//!
//! Activations stay f32: quantizing them to 8 bits per block (llama.cpp's way) made the greedy text of
//! SmolLM2's quantized path drift from the f32 path's after six tokens, as llama.cpp's does, and decoding
//! streams weights from memory, where the integer kernel was not faster. Each weight is converted to f32
//! instead, so the result differs from the dequantized f32 product only by summation order.

use half::f16;

use crate::{BlockFormat, BLOCK};

/// Bytes ahead of the current block to prefetch (a few blocks, a few hundred cycles of work).
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 512;

/// One weight row times one f32 activation row x (`xsum`: its per-block sums, which carry the Q4_1 minimum:
/// Σ (d·q + min)·x = d·Σ q·x + min·Σ x). Portable reference of [`row_pair_dot_simd`].
pub fn row_dot_scalar(format: BlockFormat, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in row.chunks_exact(format.block_bytes()).enumerate() {
        let xb = &x[b * BLOCK..(b + 1) * BLOCK];
        let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        match format {
            BlockFormat::Q4_1 => {
                let m = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
                let mut s = 0f32;
                for j in 0..16 {
                    s += (blk[4 + j] & 15) as f32 * xb[j] + (blk[4 + j] >> 4) as f32 * xb[j + 16];
                }
                acc += d * s + m * xsum[b];
            }
            BlockFormat::Q8_0 => {
                let s: f32 = (0..32).map(|j| blk[2 + j] as i8 as f32 * xb[j]).sum();
                acc += d * s;
            }
        }
    }
    acc
}

/// The f16 at `p` as f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_at_simd(p: *const u8) -> f32 {
    use std::arch::x86_64::*;
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
        (p as *const u16).read_unaligned() as i32,
    )))
}

/// A block's 32 quantized values (Q4_1 nibbles, Q8_0 signed bytes) as four vectors of eight f32, unscaled.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_values(format: BlockFormat, blk: *const u8) -> [std::arch::x86_64::__m256; 4] {
    use std::arch::x86_64::*;
    match format {
        BlockFormat::Q4_1 => {
            // Low nibbles are values 0..16, high nibbles 16..32.
            let q = _mm_loadu_si128(blk.add(4) as *const __m128i);
            let nib = _mm_set1_epi8(15);
            let lo = _mm_and_si128(q, nib);
            let hi = _mm_and_si128(_mm_srli_epi16(q, 4), nib);
            [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)]
                .map(|v| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)))
        }
        BlockFormat::Q8_0 => {
            let q0 = _mm_loadu_si128(blk.add(2) as *const __m128i);
            let q1 = _mm_loadu_si128(blk.add(18) as *const __m128i);
            [q0, _mm_srli_si128(q0, 8), q1, _mm_srli_si128(q1, 8)]
                .map(|v| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)))
        }
    }
}

/// [`row_dot_scalar`] for two weight rows at once, with AVX2: the rows share each activation block's loads,
/// and their two accumulators keep two dependency chains in flight.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; both rows hold the same number of blocks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn row_pair_dot_simd(
    format: BlockFormat,
    rows: [&[u8]; 2],
    x: &[f32],
    xsum: &[f32],
) -> [f32; 2] {
    use std::arch::x86_64::*;
    let bb = format.block_bytes();
    let nb = rows[0].len() / bb;
    let xp = x.as_ptr();
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut min_acc = [0f32; 2];
    for b in 0..nb {
        let xb = xp.add(b * BLOCK);
        let xs = [
            _mm256_loadu_ps(xb),
            _mm256_loadu_ps(xb.add(8)),
            _mm256_loadu_ps(xb.add(16)),
            _mm256_loadu_ps(xb.add(24)),
        ];
        for k in 0..2 {
            let blk = rows[k].as_ptr().add(b * bb);
            // The rows stream from memory: ask for the blocks a few iterations ahead.
            _mm_prefetch(blk.wrapping_add(PREFETCH_AHEAD) as *const i8, _MM_HINT_T0);
            if format == BlockFormat::Q4_1 {
                min_acc[k] += f16_at_simd(blk.add(2)) * *xsum.get_unchecked(b);
            }
            let w = block_values(format, blk);
            let s0 = _mm256_mul_ps(w[0], xs[0]);
            let s1 = _mm256_fmadd_ps(w[1], xs[1], s0);
            let s2 = _mm256_fmadd_ps(w[2], xs[2], s1);
            let dot = _mm256_fmadd_ps(w[3], xs[3], s2);
            acc[k] = _mm256_fmadd_ps(dot, _mm256_set1_ps(f16_at_simd(blk)), acc[k]);
        }
    }
    [
        crate::hsum256(acc[0]) + min_acc[0],
        crate::hsum256(acc[1]) + min_acc[1],
    ]
}

#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn row_pair_dot_simd(
    format: BlockFormat,
    rows: [&[u8]; 2],
    x: &[f32],
    xsum: &[f32],
) -> [f32; 2] {
    rows.map(|row| row_dot_scalar(format, row, x, xsum))
}

/// One weight row times four f32 activation rows, AVX2 (batched decode): each block is dequantized to f32
/// once (d·q + min) and reused by the four rows.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; every x holds the row's number of columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn row_dot_x4_simd(format: BlockFormat, row: &[u8], xs: [&[f32]; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let bb = format.block_bytes();
    let nb = row.len() / bb;
    let mut acc = [_mm256_setzero_ps(); 4];
    for b in 0..nb {
        let blk = row.as_ptr().add(b * bb);
        let d = _mm256_set1_ps(f16_at_simd(blk));
        let w = match format {
            BlockFormat::Q4_1 => {
                let m = _mm256_set1_ps(f16_at_simd(blk.add(2)));
                block_values(format, blk).map(|v| _mm256_fmadd_ps(v, d, m))
            }
            BlockFormat::Q8_0 => block_values(format, blk).map(|v| _mm256_mul_ps(v, d)),
        };
        for (j, x) in xs.iter().enumerate() {
            let xb = x.as_ptr().add(b * BLOCK);
            for (k, wk) in w.iter().enumerate() {
                acc[j] = _mm256_fmadd_ps(*wk, _mm256_loadu_ps(xb.add(8 * k)), acc[j]);
            }
        }
    }
    acc.map(|a| crate::hsum256(a))
}

#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn row_dot_x4_simd(format: BlockFormat, row: &[u8], xs: [&[f32]; 4]) -> [f32; 4] {
    xs.map(|x| {
        let xsum: Vec<f32> = x.chunks(BLOCK).map(|c| c.iter().sum()).collect();
        row_dot_scalar(format, row, x, &xsum)
    })
}
