//! A frozen projection `y = x Wᵀ`: dense (f32 or bf16), or GGUF blocks multiplied without dequantizing.
//!
//! The generic product is Candle's matmul in the weight's dtype: bf16 weights meet activations rounded to
//! bf16, with f32 accumulation and the result widened to f32 (cuBLAS / Metal bf16 GEMM, as PEFT's mixed
//! precision does). The CPU kernels ([`cpu::linear`]) multiply bf16 weights the same way (`vdpbf16ps` on
//! avx512_bf16, emulated elsewhere), keeping the f32 result without rounding it again.

use std::sync::Arc;

use anyhow::Result;
use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Tensor};

use super::cpu::{self, linear::BlockMatrix, Kernels};
use super::weights::Weight;

pub enum Linear {
    Dense(Tensor),
    /// Q4_1 / Q8_0 on the CPU kernels: activations rounded to 16 bits per block.
    Blocks(Arc<BlockMatrix>),
    /// Other GGUF types, or the generic path: Candle's quantized matmul.
    Quant(QMatMul),
}

impl Linear {
    pub fn new(w: Weight, kernels: Kernels) -> Result<Self> {
        Ok(match w {
            Weight::Dense(t) => Linear::Dense(t),
            Weight::Quant(q) => {
                let blocks = match kernels {
                    Kernels::Cpu if q.device().is_cpu() => cpu::linear::block_matrix(&q)?,
                    _ => None,
                };
                match blocks {
                    Some(m) => Linear::Blocks(m),
                    None => Linear::Quant(QMatMul::from_arc(q)?),
                }
            }
        })
    }

    /// `x`: (..., in) f32 → (..., out) f32.
    pub fn forward(&self, x: &Tensor, kernels: Kernels) -> Result<Tensor> {
        if kernels.cpu() {
            if let Some(y) = cpu::linear::forward(self, x)? {
                return Ok(y);
            }
        }
        let dims = x.dims();
        let k = dims[dims.len() - 1];
        let rows = x.elem_count() / k;
        Ok(match self {
            Linear::Dense(w) => {
                let mut out_dims = dims.to_vec();
                *out_dims.last_mut().expect("x has a last dimension") = w.dim(0)?;
                in_dtype(&x.reshape((rows, k))?, w.dtype(), |x| x.matmul(&w.t()?))?
                    .reshape(out_dims)?
            }
            Linear::Blocks(m) => {
                // Blocks exist only under the CPU kernels, which take every f32 input; a caller with
                // another dtype gets the dequantized product.
                x.matmul(&cpu::linear::dequantize(m)?.t()?)?
            }
            // Candle's quantized matmuls (CUDA, Metal and CPU alike) need a contiguous input.
            Linear::Quant(q) => q.forward(&x.contiguous()?)?,
        })
    }

    /// The weight as dense f32 (out, in); quantized and bf16 weights are converted into a fresh buffer.
    pub fn dense_weight(&self) -> Result<Tensor> {
        Ok(match self {
            Linear::Dense(w) if w.device().is_cpu() => cpu::linear::dense_f32(w)?,
            Linear::Dense(w) => w.to_dtype(DType::F32)?,
            Linear::Blocks(m) => cpu::linear::dequantize(m)?,
            Linear::Quant(QMatMul::QTensor(q)) => q.dequantize(&q.device())?,
            Linear::Quant(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.to_dtype(DType::F32)?,
        })
    }

    /// The gradient with respect to the input of `y = x Wᵀ`: `dy W`, (rows, out) → (rows, in). The
    /// weight is frozen, so its own gradient is never formed.
    pub fn backward_input(&self, dy: &Tensor, kernels: Kernels) -> Result<Tensor> {
        if kernels.cpu() {
            if let Some(dx) = cpu::linear::backward_input(self, dy)? {
                return Ok(dx);
            }
        }
        match self {
            Linear::Dense(w) => in_dtype(dy, w.dtype(), |dy| dy.matmul(w)),
            _ => Ok(dy.matmul(&self.dense_weight()?)?),
        }
    }
}

/// `f(x)` with x in `dtype` (the weight's), the result back in f32: bf16 × bf16 products accumulate in
/// f32 on every backend and round their output to bf16 once.
fn in_dtype(
    x: &Tensor,
    dtype: DType,
    f: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
) -> Result<Tensor> {
    if x.dtype() == dtype {
        return Ok(f(x)?);
    }
    Ok(f(&x.to_dtype(dtype)?)?.to_dtype(x.dtype())?)
}
