//! A frozen projection `y = x Wᵀ`: dense f32, or GGUF blocks multiplied without dequantizing.

use std::sync::Arc;

use anyhow::Result;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use introspect_kernels::{BlockFormat, QuantMatrix};

use super::decode::CpuF32;
use super::weights::Weight;

pub enum Linear {
    Dense(Tensor),
    /// Q4_1 / Q8_0 on the CPU: introspect's SIMD kernels, activations rounded to 16 bits per block.
    Blocks(Arc<QuantMatrix>),
    /// Other GGUF types or devices: Candle's quantized matmul.
    Quant(QMatMul),
}

/// Up to this many activation rows the block kernels run (a 4-row tile from 4 rows on: batched decode);
/// above it, dequantizing the matrix and running f32 GEMM is faster (prefill). At 32 rows the tile matches
/// GEMM on an already dense matrix (`cargo bench --bench kernels`), so it wins once dequantizing is counted.
const MAX_BLOCK_KERNEL_ROWS: usize = 32;
/// Up to this many rows a dense matrix uses the mat-vec kernel instead of GEMM (decode).
const MAX_DENSE_KERNEL_ROWS: usize = 2;
/// Up to this many rows (batched decode) the tiled kernel beats GEMM, which packs the whole weight —
/// for the layers' projections, not for the 49152-row head, where GEMM's blocking wins
/// (`cargo bench --bench kernels`).
const MAX_DENSE_TILED_ROWS: usize = 32;
const MAX_DENSE_TILED_OUT: usize = 8192;

impl Linear {
    pub fn new(w: Weight, device: &Device) -> Result<Self> {
        Ok(match w {
            Weight::Dense(t) => Linear::Dense(t),
            Weight::Quant(q) => match (block_format(&q), device) {
                (Some(format), Device::Cpu) => {
                    let dims = q.shape().dims();
                    let m = QuantMatrix::new(format, dims[0], dims[1], q.data()?.into_owned())
                        .map_err(anyhow::Error::msg)?;
                    Linear::Blocks(Arc::new(m))
                }
                _ => Linear::Quant(QMatMul::from_arc(q)?),
            },
        })
    }

    /// Whether `rows` activation rows go to introspect's kernels (decode) rather than a GEMM (prefill).
    pub fn uses_kernel(&self, rows: usize) -> bool {
        match self {
            Linear::Dense(w) => {
                let n = w.dims().first().copied().unwrap_or(0);
                w.device().is_cpu()
                    && matches!(w.dtype(), DType::F32 | DType::BF16)
                    && w.is_contiguous()
                    && (rows <= MAX_DENSE_KERNEL_ROWS
                        || (rows <= MAX_DENSE_TILED_ROWS && n <= MAX_DENSE_TILED_OUT))
            }
            Linear::Blocks(_) => rows <= MAX_BLOCK_KERNEL_ROWS,
            Linear::Quant(_) => false,
        }
    }

    /// `x`: (..., in) → (..., out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let k = dims[dims.len() - 1];
        let rows = x.elem_count() / k;
        let mut out_dims = dims.to_vec();
        let kernel = x.device().is_cpu() && self.uses_kernel(rows);
        Ok(match self {
            Linear::Dense(w) => {
                let n = w.dim(0)?;
                *out_dims.last_mut().unwrap() = n;
                if kernel {
                    let ws = super::decode::DenseSlice::of(w)?;
                    on_cpu(x, rows, n, out_dims, |xs, y| {
                        introspect_kernels::run_products(
                            &mut [introspect_kernels::Product {
                                weights: ws.weights(n, k),
                                x: xs,
                                y,
                            }],
                            rows,
                        )
                    })?
                } else if x.device().is_cpu() && x.dtype() == DType::F32 {
                    // A bf16 weight is read as f32: activations and accumulation stay f32.
                    let w = self.dense_weight()?.contiguous()?;
                    let ws = CpuF32::of(&w)?;
                    on_cpu(x, rows, n, out_dims, |xs, y| {
                        introspect_kernels::linear_team(xs, rows, &ws, n, k, y)
                    })?
                } else {
                    let w = self.dense_weight()?;
                    x.reshape((rows, k))?.matmul(&w.t()?)?.reshape(out_dims)?
                }
            }
            Linear::Blocks(m) => {
                *out_dims.last_mut().unwrap() = m.rows;
                if kernel {
                    on_cpu(x, rows, m.rows, out_dims, |xs, y| m.matmul(xs, rows, y))?
                } else {
                    let w = m.dequantize();
                    on_cpu(x, rows, m.rows, out_dims, |xs, y| {
                        introspect_kernels::linear_team(xs, rows, &w, m.rows, k, y)
                    })?
                }
            }
            Linear::Quant(q) => q.forward(x)?,
        })
    }
}

/// `f(x, y)` on the CPU's flat buffers: x as (rows × in), y as (rows × n), returned shaped `out_dims`. The
/// decode kernels take few rows; above them, a prefill's rows go to a GEMM split across the kernel team.
fn on_cpu(
    x: &Tensor,
    rows: usize,
    n: usize,
    out_dims: Vec<usize>,
    f: impl FnOnce(&[f32], &mut [f32]),
) -> Result<Tensor> {
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let mut y = vec![0f32; rows * n];
    f(&xs, &mut y);
    Ok(Tensor::from_vec(y, out_dims, x.device())?)
}

fn block_format(q: &QTensor) -> Option<BlockFormat> {
    match q.dtype() {
        GgmlDType::Q4_1 if q.rank() == 2 => Some(BlockFormat::Q4_1),
        GgmlDType::Q8_0 if q.rank() == 2 => Some(BlockFormat::Q8_0),
        _ => None,
    }
}

impl Linear {
    /// The weight as dense f32 (out, in); quantized and bf16 weights are converted into a fresh buffer.
    pub fn dense_weight(&self) -> Result<Tensor> {
        Ok(match self {
            Linear::Dense(w) if w.dtype() == DType::BF16 && w.device().is_cpu() => bf16_as_f32(w)?,
            Linear::Dense(w) => w.to_dtype(DType::F32)?,
            Linear::Blocks(m) => Tensor::from_vec(m.dequantize(), (m.rows, m.cols), &Device::Cpu)?,
            Linear::Quant(QMatMul::QTensor(q)) => q.dequantize(&q.device())?,
            Linear::Quant(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => {
                t.to_dtype(candle_core::DType::F32)?
            }
        })
    }

    /// The gradient with respect to the input of `y = x Wᵀ`: `dy W`, (rows, out) → (rows, in). The
    /// weight is frozen, so its own gradient is never formed.
    pub fn backward_input(&self, dy: &Tensor) -> Result<Tensor> {
        Ok(dy.matmul(&self.dense_weight()?)?)
    }
}

/// A bf16 CPU tensor as a fresh f32 one, converted on all threads.
fn bf16_as_f32(w: &Tensor) -> Result<Tensor> {
    let w = w.contiguous()?;
    let src = super::decode::CpuSlice::<half::bf16>::of(&w)?;
    let mut out = vec![0f32; src.len()];
    introspect_kernels::bf16_to_f32(&src, &mut out);
    Ok(Tensor::from_vec(out, w.shape(), w.device())?)
}
