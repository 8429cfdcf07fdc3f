//! The CPU kernels of a frozen projection `y = x Wᵀ`: mat-vec and tiled products for decode, GGUF Q4_1 / Q8_0
//! blocks multiplied without dequantizing, and prefill GEMMs split across the kernel team.

use std::sync::Arc;

use anyhow::Result;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use introspect_kernels::{BlockFormat, Elements, Frozen, Product, QuantMatrix};

use super::{CpuSlice, DenseSlice};
use crate::model::linear::Linear;

/// GGUF blocks in the layout introspect's block kernels read.
pub type BlockMatrix = QuantMatrix;

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

/// Q4_1 / Q8_0 matrices in the block kernels' layout; None for the GGUF types they do not read.
pub fn block_matrix(q: &QTensor) -> Result<Option<Arc<BlockMatrix>>> {
    let format = match q.dtype() {
        GgmlDType::Q4_1 if q.rank() == 2 => BlockFormat::Q4_1,
        GgmlDType::Q8_0 if q.rank() == 2 => BlockFormat::Q8_0,
        _ => return Ok(None),
    };
    let dims = q.shape().dims();
    let m = QuantMatrix::new(format, dims[0], dims[1], q.data()?.into_owned())
        .map_err(anyhow::Error::msg)?;
    Ok(Some(Arc::new(m)))
}

/// Whether `rows` activation rows go to the decode kernels rather than a GEMM (prefill).
pub fn uses_kernel(linear: &Linear, rows: usize) -> bool {
    match linear {
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

/// `x Wᵀ` on the CPU kernels, (..., in) → (..., out); None where they do not apply (other GGUF types, x not
/// f32 in CPU memory), and the caller runs the generic product.
pub fn forward(linear: &Linear, x: &Tensor) -> Result<Option<Tensor>> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let dims = x.dims();
    let k = dims[dims.len() - 1];
    let rows = x.elem_count() / k;
    let mut out_dims = dims.to_vec();
    let kernel = uses_kernel(linear, rows);
    Ok(Some(match linear {
        Linear::Dense(w) if w.device().is_cpu() => {
            let n = w.dim(0)?;
            *out_dims.last_mut().expect("x has a last dimension") = n;
            if kernel {
                let ws = DenseSlice::of(w)?;
                on_cpu(x, rows, n, out_dims, |xs, y| {
                    introspect_kernels::run_products(
                        &mut [Product {
                            weights: ws.weights(n, k),
                            x: xs,
                            y,
                        }],
                        rows,
                    )
                })?
            } else {
                let w = FrozenWeight::of(linear)?;
                on_cpu(x, rows, n, out_dims, |xs, y| w.get().forward(xs, rows, y))?
            }
        }
        Linear::Blocks(m) => {
            *out_dims.last_mut().expect("x has a last dimension") = m.rows;
            if kernel {
                on_cpu(x, rows, m.rows, out_dims, |xs, y| m.matmul(xs, rows, y))?
            } else {
                let w = FrozenWeight::of(linear)?;
                on_cpu(x, rows, m.rows, out_dims, |xs, y| {
                    w.get().forward(xs, rows, y)
                })?
            }
        }
        Linear::Dense(_) | Linear::Quant(_) => return Ok(None),
    }))
}

/// `dy W` on the CPU kernels, (rows, out) → (rows, in); None where they do not apply (x not f32 in CPU
/// memory, other GGUF types, weights elsewhere).
pub fn backward_input(linear: &Linear, dy: &Tensor) -> Result<Option<Tensor>> {
    if !dy.device().is_cpu() || dy.dtype() != DType::F32 {
        return Ok(None);
    }
    match linear {
        Linear::Dense(w) if w.device().is_cpu() => {}
        Linear::Blocks(_) => {}
        _ => return Ok(None),
    }
    let w = FrozenWeight::of(linear)?;
    let frozen = w.get();
    let rows = dy.elem_count() / frozen.out;
    let mut dx = vec![0f32; rows * frozen.inp];
    let dys = dy.flatten_all()?.to_vec1::<f32>()?;
    frozen.backward(&dys, rows, &mut dx, false);
    Ok(Some(Tensor::from_vec(dx, (rows, frozen.inp), dy.device())?))
}

/// A frozen weight as the GEMM-sized products read it: dense f32 or bf16 in place, GGUF blocks (or another
/// dtype) converted to f32. Whether its products are bf16 follows from that ([`Frozen::bf16_products`]).
pub struct FrozenWeight<'a> {
    data: FrozenData<'a>,
    out: usize,
    inp: usize,
}

enum FrozenData<'a> {
    Dense(DenseSlice<'a>),
    Converted(Vec<f32>),
}

impl<'a> FrozenWeight<'a> {
    /// A CPU projection's weight (dense or blocks); Candle's quantized types are converted to f32.
    pub fn of(linear: &'a Linear) -> Result<Self> {
        let (data, out, inp) = match linear {
            Linear::Dense(w)
                if matches!(w.dtype(), DType::F32 | DType::BF16) && w.is_contiguous() =>
            {
                let (out, inp) = w.dims2()?;
                (FrozenData::Dense(DenseSlice::of(w)?), out, inp)
            }
            Linear::Blocks(m) => (FrozenData::Converted(m.dequantize()), m.rows, m.cols),
            other => {
                let w = other.dense_weight()?;
                let (out, inp) = w.dims2()?;
                (
                    FrozenData::Converted(w.flatten_all()?.to_vec1::<f32>()?),
                    out,
                    inp,
                )
            }
        };
        Ok(FrozenWeight { data, out, inp })
    }

    pub fn get(&self) -> Frozen<'_> {
        let w = match &self.data {
            FrozenData::Dense(DenseSlice::F32(w)) => Elements::F32(w),
            FrozenData::Dense(DenseSlice::Bf16(w)) => Elements::Bf16(w),
            FrozenData::Converted(w) => Elements::F32(w),
        };
        Frozen {
            w,
            out: self.out,
            inp: self.inp,
        }
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

/// A dense CPU weight as f32: itself, or a bf16 one converted on all threads into a fresh buffer.
pub fn dense_f32(w: &Tensor) -> Result<Tensor> {
    if w.dtype() != DType::BF16 {
        return Ok(w.to_dtype(DType::F32)?);
    }
    let w = w.contiguous()?;
    let src = CpuSlice::<half::bf16>::of(&w)?;
    let mut out = vec![0f32; src.len()];
    introspect_kernels::bf16_to_f32(&src, &mut out);
    Ok(Tensor::from_vec(out, w.shape(), w.device())?)
}

/// Block weights dequantized to a dense f32 (rows, cols) tensor.
pub fn dequantize(m: &BlockMatrix) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        m.dequantize(),
        (m.rows, m.cols),
        &candle_core::Device::Cpu,
    )?)
}
