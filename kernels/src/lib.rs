//! CPU kernels that Candle lacks.
//!
//! [`QuantMatrix`] multiplies GGUF Q4_1 or Q8_0 weight blocks with activations without dequantizing the
//! matrix (`blocks`): decoding streams 92 MB of Q4_1 a token instead of 540 MB of f32. [`dense_matmul`]
//! multiplies dense f32 or bf16 weights with a few activation rows (`dense`).
//!
//! [`run_products`] runs a decode step's small products (q/k/v, gate/up, …) as one parallel pass on a
//! [`Team`] of spinning threads; [`decode_attention`] reads the KV cache once per decode step; [`silu_mul`]
//! and [`log_softmax`] are its element-wise work, with a vectorised exponential;
//! [`swiglu_forward`] / [`swiglu_backward`] fuse the MLP gate for training; [`lora_forward`] /
//! [`lora_backward`] run a LoRA linear's products as GEMMs that accumulate into their results;
//! [`causal_attention_forward`] / [`causal_attention_backward`] run training's attention one task per
//! (sequence, kv head).
//!
//! AVX2 + FMA + F16C kernels are chosen at run time; other CPUs use the portable scalar version, which is also
//! the reference the SIMD kernels are tested against.

mod adamw;
// AMX tiles are x86 only: elsewhere the bf16 products take the portable path (see `cpu`).
#[cfg(target_arch = "x86_64")]
mod amx;
mod attention;
#[cfg(target_arch = "x86_64")]
mod bf16_dot;
mod bf16_gemm;
mod blocks;
mod causal_attention;
mod convert;
mod cpu;
mod dense;
mod elementwise;
mod frozen;
#[cfg(target_arch = "x86_64")]
mod gemm512;
mod heads;
mod lora;
mod matmul;
mod products;
mod quant_matrix;
mod rms_norm;
mod swiglu;
mod team;

pub use adamw::{adamw_step, AdamWCoefs, AdamWTensor, AdamWUpdated};
#[cfg(target_arch = "x86_64")]
pub use amx::{amx_status, AmxStatus};
pub use attention::{decode_attention, DecodeShape, KvView};
pub use bf16_gemm::{
    matmul_bf16, matmul_bf16_emulated, matmul_sum, product_sum, round_bf16, Bf16Operand, Bf16Rows,
    Bf16Term, Elements,
};
pub use blocks::{row_dot_scalar, rows_dot_i16_simd, Int16Row, Int16Rows};
pub use causal_attention::{causal_attention_backward, causal_attention_forward, AttentionShape};
pub use convert::bf16_to_f32;
pub use cpu::{avx512_available, bf16_products_native, cpu_features, kernel_paths, simd_available};
pub use dense::DenseWeight;
pub use elementwise::{log_softmax, silu_mul};
pub use frozen::{f32_weights_in_bf16, set_f32_weights_in_bf16, Frozen};
pub use heads::{from_heads, to_heads, HeadsShape, Rope};
pub use lora::{
    lora_backward, lora_backward_shared, lora_forward, lora_forward_shared, lora_input_kept,
    LoraGrads, LoraPair, SharedGrads,
};
pub use matmul::{linear_team, matmul, matmul_serial, Operand};
pub use products::{run_products, Product, Weights};
pub use quant_matrix::{BlockFormat, BlockRow, QuantMatrix, BLOCK};
pub use rms_norm::{rms_norm_backward, rms_norm_forward};
pub use swiglu::{swiglu_backward, swiglu_forward};
pub use team::{sum_of, zeroed, Team};

impl QuantMatrix {
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

/// `y = x Wᵀ` for a dense row-major W (rows × cols, f32 or bf16) and a few activation rows (decode): one
/// pass over W, which the GEMM libraries' small-m paths are several times slower at here.
pub fn dense_matmul<T: DenseWeight>(
    w: &[T],
    rows: usize,
    cols: usize,
    x: &[f32],
    m: usize,
    y: &mut [f32],
) {
    assert_eq!(w.len(), rows * cols, "weight shape");
    run_products(
        &mut [Product {
            weights: T::weights(w, rows, cols),
            x,
            y,
        }],
        m,
    );
}

/// [`dense_matmul`] for f32 weights on the calling thread only, inside tasks that are already parallel
/// (a batch's per-adapter LoRA products, a few rows each).
pub fn dense_matmul_serial(
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    m: usize,
    y: &mut [f32],
) {
    assert!(
        w.len() == rows * cols && x.len() == m * cols && y.len() == m * rows,
        "shapes"
    );
    // part[r·m + i] = y[i, r]
    let mut part = vec![0f32; rows * m];
    dense::dense_rows(w, cols, x, m, (0, rows), &mut part);
    for (r, column) in part.chunks(m).enumerate() {
        for (i, v) in column.iter().enumerate() {
            y[i * rows + r] = *v;
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    /// A random matrix in `format` from a simple LCG (no test-only dependencies).
    fn random(format: BlockFormat, rows: usize, cols: usize, seed: u64) -> QuantMatrix {
        QuantMatrix::new(format, rows, cols, random_bytes(format, rows, cols, seed)).unwrap()
    }

    /// GGUF block bytes with small positive scales and negative minimums, as quantized weights have.
    fn random_bytes(format: BlockFormat, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
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
        data
    }

    #[test]
    fn matmul_matches_the_dequantized_product() {
        for format in [BlockFormat::Q4_1, BlockFormat::Q8_0] {
            for m in [1, 3, 6] {
                let (rows, cols) = (71, 320); // one group of eight blocks and two more
                let w = random(format, rows, cols, 7);
                let dense = w.dequantize();
                let x: Vec<f32> = (0..m * cols)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                    .collect();
                let mut y = vec![0f32; m * rows];
                w.matmul(&x, m, &mut y);
                // With SIMD, rows are rounded to 16 bits: half a step (1/65534 of the block's largest value)
                // per activation may move the result by up to Σ |w| times that.
                let step = |i: usize| {
                    x[i * cols..(i + 1) * cols]
                        .iter()
                        .fold(0f32, |a, v| a.max(v.abs()))
                        / 65534.0
                };
                for i in 0..m {
                    for r in 0..rows {
                        let want: f32 = (0..cols)
                            .map(|k| x[i * cols + k] * dense[r * cols + k])
                            .sum();
                        let w_abs: f32 = dense[r * cols..(r + 1) * cols]
                            .iter()
                            .map(|v| v.abs())
                            .sum();
                        let rounding = if simd_available() {
                            w_abs * step(i)
                        } else {
                            0.0
                        };
                        let got = y[i * rows + r];
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()) + rounding,
                            "{format:?} m={m} [{i},{r}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_result_alone_or_in_a_batch() {
        // Six rows: one quad sharing the weight loads and two single rows.
        for format in [BlockFormat::Q4_1, BlockFormat::Q8_0] {
            let (rows, cols) = (101, 576);
            let w = random(format, rows, cols, 11);
            let x: Vec<f32> = (0..6 * cols)
                .map(|i| ((i * 53 % 97) as f32 - 48.0) / 17.0)
                .collect();
            let mut batch = vec![0f32; 6 * rows];
            w.matmul(&x, 6, &mut batch);
            for i in 0..6 {
                let mut alone = vec![0f32; rows];
                w.matmul(&x[i * cols..(i + 1) * cols], 1, &mut alone);
                assert_eq!(alone, batch[i * rows..(i + 1) * rows], "{format:?} row {i}");
            }
        }
    }

    /// The 16-bit kernel equals the exact product with the rounded activations (to f32 rounding), and
    /// stays within the rounding's bound (half a step per value) of the f32 product.
    #[test]
    fn int16_rows_match_the_exact_product_within_the_rounding_bound() {
        if !simd_available() {
            return;
        }
        for format in [BlockFormat::Q4_1, BlockFormat::Q8_0] {
            // 18 blocks (units of four rows; five rows leave a padded unit), 8 blocks (one row a unit), 1 block
            // (units of eight rows).
            for cols in [576, 256, 32] {
                let w = random(format, 5, cols, 3);
                let x: Vec<f32> = (0..2 * cols)
                    .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0 * (1.0 + (i / 32) as f32))
                    .collect();
                let x16 = Int16Rows::new(&x, 2, &w);
                let mut wr = vec![0f32; cols];
                for r in 0..5 {
                    w.dequantize_row(r, &mut wr);
                    for i in 0..2 {
                        let (xi, qi) = (&x[i * cols..(i + 1) * cols], x16.row(i));
                        let mut got = [0f32];
                        let one = Int16Rows::new(xi, 1, &w);
                        unsafe { rows_dot_i16_simd(&w, r..r + 1, &one, &mut got) };
                        let got = got[0] as f64;
                        let (mut rounded, mut exact, mut bound) = (0f64, 0f64, 0f64);
                        for k in 0..cols {
                            let b = k / BLOCK;
                            let xr = qi.value(b, k % BLOCK) as f64;
                            // The minimum multiplies the exact sum, so only d·q sees the rounding.
                            let dq = wr[k] as f64 - w.row(r).min(b) as f64;
                            rounded += dq * xr + w.row(r).min(b) as f64 * xi[k] as f64;
                            exact += wr[k] as f64 * xi[k] as f64;
                            bound += dq.abs() * qi.scale[b] as f64 / 2.0;
                        }
                        let tol = 1e-5 * (1.0 + rounded.abs());
                        assert!(
                            (got - rounded).abs() <= tol,
                            "{format:?} {cols} [{i},{r}]: {got} vs {rounded}"
                        );
                        assert!(
                            (got - exact).abs() <= bound + tol,
                            "{format:?} {cols}: {got} vs {exact} (bound {bound})"
                        );
                        let scalar = row_dot_scalar(w.row(r), xi) as f64;
                        assert!((scalar - exact).abs() <= 1e-5 * (1.0 + exact.abs()));
                    }
                }
            }
        }
    }

    #[test]
    fn planar_rows_dequantize_as_gguf_blocks() {
        // Units of 8, 8, 4 and 1 rows, most of them padded.
        let shapes = [(3, 96), (2, 160), (6, 576), (2, 1536)];
        for (format, (rows, cols)) in [BlockFormat::Q4_1, BlockFormat::Q8_0]
            .into_iter()
            .flat_map(|f| shapes.map(|s| (f, s)))
        {
            let w = random(format, rows, cols, 5);
            let gguf = random_bytes(format, rows, cols, 5);
            let whole = w.dequantize();
            let mut got = vec![0f32; cols];
            for r in 0..rows {
                w.dequantize_row(r, &mut got);
                assert_eq!(got, whole[r * cols..(r + 1) * cols], "{format:?} row {r}");
                for b in 0..cols / BLOCK {
                    let bb = format.block_bytes();
                    let blk = &gguf[(r * cols / BLOCK + b) * bb..][..bb];
                    let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                    for j in 0..BLOCK {
                        let want = match format {
                            BlockFormat::Q4_1 => {
                                let m = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
                                let byte = blk[4 + j % 16];
                                d * (if j < 16 { byte & 15 } else { byte >> 4 }) as f32 + m
                            }
                            BlockFormat::Q8_0 => d * blk[2 + j] as i8 as f32,
                        };
                        assert_eq!(
                            got[b * BLOCK + j],
                            want,
                            "{format:?} row {r} block {b} value {j}"
                        );
                    }
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
            // The same kernel on the calling thread (a LoRA product inside a team task).
            let mut serial = vec![f32::NAN; m * rows];
            dense_matmul_serial(&w, rows, cols, &x, m, &mut serial);
            assert_eq!(serial, y, "{rows}x{cols} m={m}: serial = parallel");
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
    fn bf16_weights_give_the_product_of_bf16_rounded_activations() {
        // bf16 weights are bf16 × bf16 products: the activations rounded to bf16 too (natively by
        // `vdpbf16ps`, else widened into the f32 kernels), then summed in f32 — the f32 product of the
        // rounded values up to the order of the sums. Every tile shape: 1, 2, 3, 4 and 7 rows.
        if !bf16_products_native() {
            eprintln!("this CPU has no avx512_bf16: the emulated bf16 products are tested");
        }
        for (rows, cols, m) in [
            (67, 75, 7),
            (33, 576, 1),
            (5, 64, 4),
            (40, 96, 2),
            (17, 33, 3),
        ] {
            let w: Vec<half::bf16> = (0..rows * cols)
                .map(|i| half::bf16::from_f32(((i * 31 % 97) as f32 - 48.0) / 40.0))
                .collect();
            let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let x: Vec<f32> = (0..m * cols)
                .map(|i| ((i * 17 % 89) as f32 - 44.0) / 30.0 + 1e-3)
                .collect();
            let xr: Vec<f32> = x
                .iter()
                .map(|v| f32::from_bits((round_bf16(*v) as u32) << 16))
                .collect();
            assert!(xr != x, "the activations are not all bf16 already");
            let (mut a, mut b) = (vec![0f32; m * rows], vec![1f32; m * rows]);
            dense_matmul(&w, rows, cols, &x, m, &mut a);
            dense_matmul(&wf, rows, cols, &xr, m, &mut b);
            for (i, (p, q)) in a.iter().zip(&b).enumerate() {
                let (r, row) = (i % rows, i / rows);
                let mag: f32 = (0..cols)
                    .map(|k| (xr[row * cols + k] * wf[r * cols + k]).abs())
                    .sum();
                assert!(
                    (p - q).abs() <= 2.0 * cols as f32 * f32::EPSILON * mag,
                    "{rows}x{cols} m={m} [{row},{r}]: {p} vs {q}"
                );
            }
        }
    }

    #[test]
    fn rejects_wrong_sizes() {
        assert!(QuantMatrix::new(BlockFormat::Q4_1, 2, 33, vec![]).is_err());
        assert!(QuantMatrix::new(BlockFormat::Q4_1, 2, 32, vec![0; 39]).is_err());
    }
}
