//! CPU kernels that Candle lacks.
//!
//! [`QuantMatrix`] multiplies GGUF Q4_1 or Q8_0 weight blocks with f32 activations without dequantizing the
//! matrix (`blocks`): decoding streams 92 MB of Q4_1 a token instead of 540 MB of f32.
//!
//! [`run_products`] runs a decode step's small products (q/k/v, gate/up, …) as one parallel pass on a
//! [`Team`] of spinning threads; [`decode_attention`] reads the KV cache once per decode step;
//! [`swiglu_forward`] / [`swiglu_backward`] fuse the MLP gate for training; [`lora_forward`] /
//! [`lora_backward`] run a LoRA linear's products as GEMMs that accumulate into their results;
//! [`causal_attention_forward`] / [`causal_attention_backward`] run training's attention one task per
//! (sequence, kv head).
//!
//! AVX2 + FMA + F16C kernels are chosen at run time; other CPUs use the portable scalar version, which is also
//! the reference the SIMD kernels are tested against.

mod attention;
mod blocks;
mod causal_attention;
mod convert;
mod lora;
mod matmul;
mod products;
mod swiglu;
mod team;

pub use attention::{decode_attention, DecodeShape, KvView};
pub use blocks::{row_dot_scalar, row_dot_x4_simd, row_pair_dot_simd};
pub use causal_attention::{causal_attention_backward, causal_attention_forward, AttentionShape};
pub use convert::bf16_to_f32;
pub use lora::{lora_backward, lora_forward, LoraGrads, LoraPair};
pub use matmul::{matmul, matmul_serial, Operand};
pub use products::{run_products, Product, Weights};
pub use swiglu::{swiglu_backward, swiglu_forward};
pub use team::Team;

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
    pub(crate) data: Vec<u8>,
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

    pub(crate) fn row_bytes(&self) -> usize {
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
        run_products(
            &mut [Product {
                weights: Weights::Blocks(self),
                x,
                y,
            }],
            m,
        );
    }
}

/// `y = x Wᵀ` for a dense row-major f32 W (rows × cols) and a few activation rows (decode): one pass over
/// W, which the GEMM libraries' small-m paths are several times slower at here.
pub fn dense_matmul(w: &[f32], rows: usize, cols: usize, x: &[f32], m: usize, y: &mut [f32]) {
    assert_eq!(w.len(), rows * cols, "weight shape");
    run_products(
        &mut [Product {
            weights: Weights::Dense { w, rows, cols },
            x,
            y,
        }],
        m,
    );
}

/// Dot products of two weight rows with four activation rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn tile_2x4(w0: &[f32], w1: &[f32], x: [&[f32]; 4]) -> [[f32; 4]; 2] {
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
pub(crate) unsafe fn tile_2x4(w0: &[f32], w1: &[f32], x: [&[f32]; 4]) -> [[f32; 4]; 2] {
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| p * q).sum();
    [
        [dot(w0, x[0]), dot(w0, x[1]), dot(w0, x[2]), dot(w0, x[3])],
        [dot(w1, x[0]), dot(w1, x[1]), dot(w1, x[2]), dot(w1, x[3])],
    ]
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

/// `y += a · x`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_simd(y: &mut [f32], a: f32, x: &[f32]) {
    use std::arch::x86_64::*;
    let n = y.len().min(x.len());
    let (py, px) = (y.as_mut_ptr(), x.as_ptr());
    let av = _mm256_set1_ps(a);
    let mut k = 0;
    while k + 8 <= n {
        let r = _mm256_fmadd_ps(av, _mm256_loadu_ps(px.add(k)), _mm256_loadu_ps(py.add(k)));
        _mm256_storeu_ps(py.add(k), r);
        k += 8;
    }
    while k < n {
        *py.add(k) += a * *px.add(k);
        k += 1;
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn axpy_simd(y: &mut [f32], a: f32, x: &[f32]) {
    for (acc, val) in y.iter_mut().zip(x) {
        *acc += a * val;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn hsum256(v: std::arch::x86_64::__m256) -> f32 {
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
            for m in [1, 3, 6] {
                let (rows, cols) = (71, 96);
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
                            "{format:?} m={m} [{i},{r}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_result_alone_or_in_a_batch() {
        for format in [BlockFormat::Q4_1, BlockFormat::Q8_0] {
            let (rows, cols) = (101, 576);
            let w = random(format, rows, cols, 11);
            let x: Vec<f32> = (0..3 * cols)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 17.0)
                .collect();
            let mut batch = vec![0f32; 3 * rows];
            w.matmul(&x, 3, &mut batch);
            for i in 0..3 {
                let mut alone = vec![0f32; rows];
                w.matmul(&x[i * cols..(i + 1) * cols], 1, &mut alone);
                assert_eq!(alone, batch[i * rows..(i + 1) * rows], "{format:?} row {i}");
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
            let row = |r: usize| &w.data[r * w.row_bytes()..(r + 1) * w.row_bytes()];
            for r in 0..4 {
                let pair = [row(r), row((r + 1) % 4)];
                let want = pair.map(|p| row_dot_scalar(format, p, &x, &xsum));
                let got = unsafe { row_pair_dot_simd(format, pair, &x, &xsum) };
                for (a, b) in want.iter().zip(got) {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + a.abs()),
                        "{format:?}: {a} vs {b}"
                    );
                }
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
            dense_matmul(&w, rows, cols, &x, m, &mut y);
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
