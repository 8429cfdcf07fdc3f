//! A frozen projection `y = x Wᵀ`: dense f32, or GGUF blocks multiplied without dequantizing.

use anyhow::Result;
use candle_core::quantized::QMatMul;
use candle_core::{Module, Tensor};

use super::weights::Weight;

pub enum Linear {
    Dense(Tensor),
    Quant(QMatMul),
}

impl Linear {
    pub fn new(w: Weight) -> Result<Self> {
        Ok(match w {
            Weight::Dense(t) => Linear::Dense(t),
            Weight::Quant(q) => Linear::Quant(QMatMul::from_arc(q)?),
        })
    }

    /// `x`: (..., in) → (..., out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Linear::Dense(w) => {
                let dims = x.dims();
                let (rows, k) = (x.elem_count() / dims[dims.len() - 1], dims[dims.len() - 1]);
                let y = x.reshape((rows, k))?.matmul(&w.t()?)?;
                let mut out = dims.to_vec();
                *out.last_mut().unwrap() = w.dim(0)?;
                y.reshape(out)?
            }
            Linear::Quant(q) => q.forward(x)?,
        })
    }
}
