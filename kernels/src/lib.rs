//! CPU kernels that Candle lacks.
//!
//! [`QuantMatrix`] multiplies GGUF Q4_1 or Q8_0 weight blocks with f32 activations without dequantizing the
//! matrix: decoding streams 92 MB of Q4_1 a token instead of 540 MB of f32, which is what makes quantized
//! decode fast on a memory-bound CPU. Activations stay f32 (llama.cpp quantizes them to Q8), so the result
//! differs from the dequantized f32 product only by summation order.
//!
//! [`swiglu_forward`] / [`swiglu_backward`] fuse the MLP gate for training; [`decode_attention`] reads the
//! KV cache once per decode step; [`dense_matmul_rows`] multiplies a few activation rows without packing.
//!
//! AVX2 + FMA + F16C kernels are chosen at run time; other CPUs use the portable scalar version, which is also
//! the reference the SIMD kernels are tested against.

mod attention;
mod swiglu;

pub use attention::{decode_attention, DecodeShape, KvView};
pub use swiglu::{swiglu_backward, swiglu_forward};

/// A dot product, SIMD where the CPU has it.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    if simd_available() {
        // SAFETY: AVX2 and FMA are available (checked).
        unsafe { dot_f32_simd(a, b) }
    } else {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }
}

use half::f16;
use rayon::prelude::*;

pub const BLOCK: usize = 32;

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
}

/// A row-major (rows × cols) weight matrix stored as GGUF blocks along each row.
pub struct QuantMatrix {
    pub format: BlockFormat,
    pub rows: usize,
    pub cols: usize,
    data: Vec<u8>,
}

impl QuantMatrix {
    pub fn new(
        format: BlockFormat,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> Result<Self, String> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(format!(
                "{cols} columns is not a multiple of the block size {BLOCK}"
            ));
        }
        let want = rows * cols / BLOCK * format.block_bytes();
        if data.len() != want {
            return Err(format!(
                "{:?} {rows}×{cols} needs {want} bytes, got {}",
                format,
                data.len()
            ));
        }
        Ok(Self {
            format,
            rows,
            cols,
            data,
        })
    }

    fn row_bytes(&self) -> usize {
        self.cols / BLOCK * self.format.block_bytes()
    }

    /// The f32 values of row `r`.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        let row = &self.data[r * rb..(r + 1) * rb];
        for (b, blk) in row.chunks_exact(self.format.block_bytes()).enumerate() {
            let o = &mut out[b * BLOCK..(b + 1) * BLOCK];
            let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            match self.format {
                BlockFormat::Q4_1 => {
                    let m = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
                    for j in 0..16 {
                        o[j] = d * (blk[4 + j] & 15) as f32 + m;
                        o[j + 16] = d * (blk[4 + j] >> 4) as f32 + m;
                    }
                }
                BlockFormat::Q8_0 => {
                    for j in 0..32 {
                        o[j] = d * blk[2 + j] as i8 as f32;
                    }
                }
            }
        }
    }

    /// The whole matrix as f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(r, o)| self.dequantize_row(r, o));
        out
    }

    /// `y = x Wᵀ` for `m` activation rows: x is (m × cols), y is (m × rows), both row-major.
    pub fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) {
        assert_eq!(x.len(), m * self.cols, "activation shape");
        assert_eq!(y.len(), m * self.rows, "output shape");
        // Per-block sums of x carry the Q4_1 minimum: Σ (d·q + m)·x = d·Σ q·x + m·Σ x.
        let nb = self.cols / BLOCK;
        let xsum: Vec<f32> = x.chunks_exact(BLOCK).map(|c| c.iter().sum()).collect();
        let simd = simd_available();
        let rb = self.row_bytes();
        for_row_blocks(self.rows, m, y, |r| {
            let row = &self.data[r * rb..(r + 1) * rb];
            let (xsum, format, cols) = (&xsum, self.format, self.cols);
            move |i: usize| {
                let xi = &x[i * cols..(i + 1) * cols];
                let si = &xsum[i * nb..(i + 1) * nb];
                if simd {
                    // SAFETY: AVX2, FMA and F16C are available (checked above).
                    unsafe { row_dot_simd(format, row, xi, si) }
                } else {
                    row_dot_scalar(format, row, xi, si)
                }
            }
        });
    }
}

/// `y = x Wᵀ` for a dense row-major f32 W (rows × cols) and m activation rows: one pass over W per call,
/// which is what decode needs (the GEMM libraries' m=1 paths are several times slower here).
pub fn dense_matmul(w: &[f32], rows: usize, cols: usize, x: &[f32], m: usize, y: &mut [f32]) {
    assert_eq!(w.len(), rows * cols, "weight shape");
    assert_eq!(x.len(), m * cols, "activation shape");
    assert_eq!(y.len(), m * rows, "output shape");
    let simd = simd_available();
    for_row_blocks(rows, m, y, |r| {
        let wr = &w[r * cols..(r + 1) * cols];
        move |i: usize| {
            let xi = &x[i * cols..(i + 1) * cols];
            if simd {
                // SAFETY: AVX2 and FMA are available (checked above).
                unsafe { dot_f32_simd(wr, xi) }
            } else {
                wr.iter().zip(xi).map(|(a, b)| a * b).sum()
            }
        }
    });
}

/// `y = x Wᵀ` for a few activation rows (batched decode, m ≈ 4–64): a 2 × 4 register tile (two weight
/// rows against four activation rows) reads each weight element once per four rows without packing
/// the weight, which is what GEMM libraries spend most of their time on at this m.
pub fn dense_matmul_rows(w: &[f32], rows: usize, cols: usize, x: &[f32], m: usize, y: &mut [f32]) {
    assert_eq!(w.len(), rows * cols, "weight shape");
    assert_eq!(x.len(), m * cols, "activation shape");
    assert_eq!(y.len(), m * rows, "output shape");
    if !simd_available() {
        return dense_matmul(w, rows, cols, x, m, y);
    }
    const ROWS_PER_TASK: usize = 32;
    let tasks = rows.div_ceil(ROWS_PER_TASK);
    let parts: Vec<Vec<f32>> = (0..tasks)
        .into_par_iter()
        .map(|t| {
            let (r0, r1) = (t * ROWS_PER_TASK, ((t + 1) * ROWS_PER_TASK).min(rows));
            // part[(r - r0) * m + i] = y[i, r]
            let mut part = vec![0f32; (r1 - r0) * m];
            let mut r = r0;
            while r < r1 {
                let pair = (r1 - r).min(2);
                let w0 = &w[r * cols..(r + 1) * cols];
                let w1 = if pair == 2 {
                    &w[(r + 1) * cols..(r + 2) * cols]
                } else {
                    w0
                };
                let mut i = 0;
                while i < m {
                    let quad = (m - i).min(4);
                    let xr = |j: usize| {
                        let ii = i + j.min(quad - 1);
                        &x[ii * cols..(ii + 1) * cols]
                    };
                    // SAFETY: AVX2 and FMA are available (checked above).
                    let out = unsafe { tile_2x4(w0, w1, [xr(0), xr(1), xr(2), xr(3)]) };
                    for j in 0..quad {
                        part[(r - r0) * m + i + j] = out[0][j];
                        if pair == 2 {
                            part[(r + 1 - r0) * m + i + j] = out[1][j];
                        }
                    }
                    i += 4;
                }
                r += 2;
            }
            part
        })
        .collect();
    scatter_parts(&parts, ROWS_PER_TASK, m, rows, y);
}

/// Writes per-task results (`part[(r - r0) * m + i]` for the task's weight rows r) into y (m × rows).
fn scatter_parts(parts: &[Vec<f32>], rows_per_task: usize, m: usize, rows: usize, y: &mut [f32]) {
    for (t, part) in parts.iter().enumerate() {
        for (k, v) in part.iter().enumerate() {
            y[(k % m) * rows + t * rows_per_task + k / m] = *v;
        }
    }
}

/// Dot products of two weight rows with four activation rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_2x4(w0: &[f32], w1: &[f32], x: [&[f32]; 4]) -> [[f32; 4]; 2] {
    use std::arch::x86_64::*;
    let n = w0.len();
    let mut acc = [[_mm256_setzero_ps(); 4]; 2];
    let mut k = 0;
    while k + 8 <= n {
        let a0 = _mm256_loadu_ps(w0.as_ptr().add(k));
        let a1 = _mm256_loadu_ps(w1.as_ptr().add(k));
        for j in 0..4 {
            let b = _mm256_loadu_ps(x[j].as_ptr().add(k));
            acc[0][j] = _mm256_fmadd_ps(a0, b, acc[0][j]);
            acc[1][j] = _mm256_fmadd_ps(a1, b, acc[1][j]);
        }
        k += 8;
    }
    let mut out = [[0f32; 4]; 2];
    for j in 0..4 {
        out[0][j] = hsum256(acc[0][j]);
        out[1][j] = hsum256(acc[1][j]);
        for kk in k..n {
            out[0][j] += w0[kk] * x[j][kk];
            out[1][j] += w1[kk] * x[j][kk];
        }
    }
    out
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_2x4(w0: &[f32], w1: &[f32], x: [&[f32]; 4]) -> [[f32; 4]; 2] {
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| p * q).sum();
    [
        [dot(w0, x[0]), dot(w0, x[1]), dot(w0, x[2]), dot(w0, x[3])],
        [dot(w1, x[0]), dot(w1, x[1]), dot(w1, x[2]), dot(w1, x[3])],
    ]
}

/// Runs `row(r)(i)` = y[i, r] for every weight row r and activation row i, weight rows split across threads.
fn for_row_blocks<F, G>(rows: usize, m: usize, y: &mut [f32], row: F)
where
    F: Fn(usize) -> G + Sync,
    G: Fn(usize) -> f32,
{
    const ROWS_PER_TASK: usize = 64;
    const PARALLEL_MIN_ROWS: usize = 1024;
    let tasks = rows.div_ceil(ROWS_PER_TASK);
    if m == 1 {
        // y is one row: threads write disjoint slices directly.
        let task = |(t, out): (usize, &mut [f32])| {
            for (k, o) in out.iter_mut().enumerate() {
                *o = row(t * ROWS_PER_TASK + k)(0);
            }
        };
        // Waking the pool costs more than a small product takes.
        if rows < PARALLEL_MIN_ROWS {
            y.chunks_mut(ROWS_PER_TASK).enumerate().for_each(task);
        } else {
            y.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(task);
        }
        return;
    }
    let parts: Vec<Vec<f32>> = (0..tasks)
        .into_par_iter()
        .map(|t| {
            let (r0, r1) = (t * ROWS_PER_TASK, ((t + 1) * ROWS_PER_TASK).min(rows));
            let mut out = Vec::with_capacity((r1 - r0) * m);
            for r in r0..r1 {
                let f = row(r);
                out.extend((0..m).map(&f));
            }
            out
        })
        .collect();
    scatter_parts(&parts, ROWS_PER_TASK, m, rows, y);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32_simd(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut k = 0;
    while k + 32 <= n {
        for (j, a_j) in acc.iter_mut().enumerate() {
            *a_j = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(k + 8 * j)),
                _mm256_loadu_ps(pb.add(k + 8 * j)),
                *a_j,
            );
        }
        k += 32;
    }
    let mut s = hsum256(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
    while k < n {
        s += *pa.add(k) * *pb.add(k);
        k += 1;
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum256(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let d = _mm_add_ps(q, _mm_movehl_ps(q, q));
    _mm_cvtss_f32(_mm_add_ss(d, _mm_shuffle_ps(d, d, 1)))
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_f32_simd(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

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

/// Dot product of one weight row with x, portable reference.
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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_dot_simd(format: BlockFormat, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm256_setzero_ps();
    let mut macc = 0f32;
    let bb = format.block_bytes();
    let nb = row.len() / bb;
    let xp = x.as_ptr();
    let rp = row.as_ptr();
    let h2f = |p: *const u8| {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
            (p as *const u16).read_unaligned() as i32,
        )))
    };
    for b in 0..nb {
        let blk = rp.add(b * bb);
        let xb = xp.add(b * BLOCK);
        let d = h2f(blk);
        // Eight weights at a time as f32, each times its activation.
        let f = |q8: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q8));
        let fs = |q8: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8));
        let dot = match format {
            BlockFormat::Q4_1 => {
                macc += h2f(blk.add(2)) * *xsum.get_unchecked(b);
                let q = _mm_loadu_si128(blk.add(4) as *const __m128i);
                let nib = _mm_set1_epi8(15);
                let lo = _mm_and_si128(q, nib);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), nib);
                let s0 = _mm256_mul_ps(f(lo), _mm256_loadu_ps(xb));
                let s1 = _mm256_fmadd_ps(f(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(xb.add(8)), s0);
                let s2 = _mm256_fmadd_ps(f(hi), _mm256_loadu_ps(xb.add(16)), s1);
                _mm256_fmadd_ps(f(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(xb.add(24)), s2)
            }
            BlockFormat::Q8_0 => {
                let q0 = _mm_loadu_si128(blk.add(2) as *const __m128i);
                let q1 = _mm_loadu_si128(blk.add(18) as *const __m128i);
                let s0 = _mm256_mul_ps(fs(q0), _mm256_loadu_ps(xb));
                let s1 = _mm256_fmadd_ps(fs(_mm_srli_si128(q0, 8)), _mm256_loadu_ps(xb.add(8)), s0);
                let s2 = _mm256_fmadd_ps(fs(q1), _mm256_loadu_ps(xb.add(16)), s1);
                _mm256_fmadd_ps(fs(_mm_srli_si128(q1, 8)), _mm256_loadu_ps(xb.add(24)), s2)
            }
        };
        acc = _mm256_fmadd_ps(dot, _mm256_set1_ps(d), acc);
    }
    hsum256(acc) + macc
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn row_dot_simd(format: BlockFormat, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    row_dot_scalar(format, row, x, xsum)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A random matrix in `format` from a simple LCG (no test-only dependencies).
    fn random(format: BlockFormat, rows: usize, cols: usize, seed: u64) -> QuantMatrix {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let mut data = Vec::new();
        for _ in 0..rows * cols / BLOCK {
            let d = f16::from_f32((next() % 1000) as f32 / 50000.0 + 0.001);
            data.extend_from_slice(&d.to_le_bytes());
            if format == BlockFormat::Q4_1 {
                let m = f16::from_f32(-((next() % 1000) as f32) / 20000.0);
                data.extend_from_slice(&m.to_le_bytes());
                data.extend((0..16).map(|_| next() as u8));
            } else {
                data.extend((0..32).map(|_| next() as u8));
            }
        }
        QuantMatrix::new(format, rows, cols, data).unwrap()
    }

    #[test]
    fn matmul_matches_the_dequantized_product() {
        for format in [BlockFormat::Q4_1, BlockFormat::Q8_0] {
            let (rows, cols, m) = (70, 96, 3);
            let w = random(format, rows, cols, 7);
            let dense = w.dequantize();
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let mut y = vec![0f32; m * rows];
            w.matmul(&x, m, &mut y);
            for i in 0..m {
                for r in 0..rows {
                    let want: f32 = (0..cols)
                        .map(|k| x[i * cols + k] * dense[r * cols + k])
                        .sum();
                    let got = y[i * rows + r];
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{format:?} [{i},{r}]: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn simd_and_scalar_rows_agree() {
        if !simd_available() {
            return;
        }
        for format in [BlockFormat::Q4_1, BlockFormat::Q8_0] {
            let w = random(format, 4, 576, 3);
            let x: Vec<f32> = (0..576)
                .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
                .collect();
            let xsum: Vec<f32> = x.chunks(BLOCK).map(|c| c.iter().sum()).collect();
            for r in 0..4 {
                let row = &w.data[r * w.row_bytes()..(r + 1) * w.row_bytes()];
                let a = row_dot_scalar(format, row, &x, &xsum);
                let b = unsafe { row_dot_simd(format, row, &x, &xsum) };
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + a.abs()),
                    "{format:?}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn tiled_dense_product_matches_the_naive_one() {
        // Odd sizes: a leftover weight row, leftover activation rows and a column tail.
        for (rows, cols, m) in [(67, 75, 7), (64, 64, 4), (3, 9, 1), (33, 576, 16)] {
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 31 % 97) as f32 - 48.0) / 40.0)
                .collect();
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 17 % 89) as f32 - 44.0) / 30.0)
                .collect();
            let mut y = vec![f32::NAN; m * rows];
            dense_matmul_rows(&w, rows, cols, &x, m, &mut y);
            for i in 0..m {
                for r in 0..rows {
                    let want: f32 = (0..cols).map(|k| x[i * cols + k] * w[r * cols + k]).sum();
                    let got = y[i * rows + r];
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{rows}x{cols} m={m} [{i},{r}]: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn rejects_wrong_sizes() {
        assert!(QuantMatrix::new(BlockFormat::Q4_1, 2, 33, vec![]).is_err());
        assert!(QuantMatrix::new(BlockFormat::Q4_1, 2, 32, vec![0; 39]).is_err());
    }
}
