//! The ops of a Llama block, defined once for the three walks: the tensor forward (`llama.rs`), the CPU
//! decode step (`cpu/decode.rs`) and the training pass (`train/pass.rs`).
//!
//! These are device-generic Candle: the generic path may use only ops with CUDA and Metal kernels for the
//! dtypes it uses (f32, bf16, u32 ids), and never f64 (Metal has none):
//! matmul (f32, bf16; batched, with transposed operands), `QMatMul::forward` (contiguous input),
//! element-wise arithmetic and broadcasts, `sqr`/`sqrt`/`recip`/`exp`/`powf`/`neg`/`silu`/`sigmoid`/`cos`/`sin`/`maximum`,
//! `to_dtype` between f32 and bf16, `candle_nn::ops::{rms_norm, softmax_last_dim, log_softmax}`,
//! `candle_nn::rotary_emb::rope`, `sum_keepdim`/`mean_keepdim`/`sum_all`/`max_keepdim`/`argmax_keepdim`,
//! `index_select`, `index_add`, `gather`, `scatter_add`, `scatter_set`, `narrow`, `cat`, `slice_set`, `reshape`,
//! `transpose`, `contiguous`, `zeros`/`full`/`arange`, `to_scalar::<f32>`/`to_vec*`.

use std::ops::Range;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};

use crate::lora::LoraPair;

/// The additive attention mask (b, 1, t, past + t): a query sees keys at or before its own position, never
/// the columns `hidden[row]` (padding), except itself (a padding query keeps its unused state finite).
/// None when no entry would be masked.
pub fn attention_mask(
    hidden: &[Range<usize>],
    t: usize,
    past: usize,
    device: &Device,
) -> Result<Option<Tensor>> {
    if t == 1 && hidden.iter().all(|h| h.is_empty()) {
        return Ok(None);
    }
    let kv = past + t;
    let mut m = vec![0f32; hidden.len() * t * kv];
    for (r, h) in hidden.iter().enumerate() {
        for i in 0..t {
            for j in 0..kv {
                if j > past + i || (h.contains(&j) && j != past + i) {
                    m[(r * t + i) * kv + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    Ok(Some(Tensor::from_vec(m, (hidden.len(), 1, t, kv), device)?))
}

/// The mask for rows left-padded by `pad[row]` columns (see [`attention_mask`]).
pub fn causal_mask(
    pad: &[usize],
    t: usize,
    past: usize,
    device: &Device,
) -> Result<Option<Tensor>> {
    let hidden: Vec<Range<usize>> = pad.iter().map(|&p| 0..p).collect();
    attention_mask(&hidden, t, past, device)
}

/// RoPE's cos and sin of each position times the inverse frequencies, in f32 as transformers computes
/// them: positions (..., t) → (..., t, head_dim/2) each.
pub fn rope_tables(positions: &Tensor, inv_freq: &Tensor) -> Result<(Tensor, Tensor)> {
    let n = inv_freq.elem_count();
    let mut shape = positions.dims().to_vec();
    shape.push(1);
    let mut freq_shape = vec![1; positions.rank()];
    freq_shape.push(n);
    let freqs = positions
        .to_dtype(DType::F32)?
        .reshape(shape)?
        .broadcast_mul(&inv_freq.reshape(freq_shape)?)?;
    Ok((freqs.cos()?.contiguous()?, freqs.sin()?.contiguous()?))
}

/// RMSNorm for inference: Candle's fused kernel.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(candle_nn::ops::rms_norm(x, w, eps as f32)?)
}

/// RMSNorm keeping `inv = 1/√(mean(x²)+ε)` for [`rms_norm_backward`].
pub fn rms_norm_saving(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    Ok((x.broadcast_mul(&inv)?.broadcast_mul(w)?, inv))
}

/// y = x·inv·w: dx = inv·(dy w) − x·inv³/h·Σ(dy w x).
pub fn rms_norm_backward(x: &Tensor, inv: &Tensor, w: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let h = x.dim(D::Minus1)? as f64;
    let gw = dy.broadcast_mul(w)?;
    let dot = (&gw * x)?.sum_keepdim(D::Minus1)?;
    let coef = ((inv.powf(3.0)? * dot)? / h)?;
    Ok((gw.broadcast_mul(inv)? - x.broadcast_mul(&coef)?)?)
}

/// LoRA's narrow product `z = scale · x Aᵀ`, x (m, in) → (m, r): the scale goes here, not on the wide output.
pub fn lora_down(x: &Tensor, pair: &LoraPair, scale: f64) -> Result<Tensor> {
    Ok((x.matmul(&pair.a.t()?)? * scale)?)
}

/// LoRA's contribution `z Bᵀ`, (m, r) → (m, out), as PEFT adds it to the frozen product.
pub fn lora_up(z: &Tensor, pair: &LoraPair) -> Result<Tensor> {
    Ok(z.matmul(&pair.b.t()?)?)
}

/// The hidden state of the last position of every row, contiguous: (b, t, h) → (b, h).
pub fn last_position(hidden: &Tensor) -> Result<Tensor> {
    let t = hidden.dim(1)?;
    Ok(hidden.narrow(1, t - 1, 1)?.squeeze(1)?.contiguous()?)
}

/// Log-softmax over the vocabulary, in f32.
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(
        &logits.to_dtype(DType::F32)?,
        D::Minus1,
    )?)
}

/// Each row's `k` largest entries of `x` (b, n), largest first, found on x's device: k rounds of argmax,
/// gather and a scatter of −∞ over the winner, so only b × k ids and values reach the host (a full sort is
/// no option: Candle's CUDA and Metal arg-sorts hold a whole row in one block's shared memory, far short of a
/// 128k vocabulary). Ties go to the lower id on the CPU; CUDA's argmax may take either.
pub fn top_k_rows(x: &Tensor, k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
    let (b, n) = x.dims2()?;
    let k = k.min(n);
    if k == 0 {
        return Ok(vec![vec![]; b]);
    }
    let x = x.to_dtype(DType::F32)?;
    // The rounds overwrite a copy in which −∞ entries are raised to the lowest finite value, so that a
    // winner replaced by −∞ ranks below every entry still in (argmax takes the first of equal maxima).
    let left = x.maximum(f32::MIN)?;
    let gone = Tensor::full(f32::NEG_INFINITY, (b, 1), x.device())?;
    let (mut ids, mut values) = (vec![], vec![]);
    for _ in 0..k {
        let id = left.argmax_keepdim(D::Minus1)?;
        values.push(x.gather(&id, D::Minus1)?);
        left.scatter_set(&id, &gone, D::Minus1)?;
        ids.push(id);
    }
    let ids = Tensor::cat(&ids, 1)?.to_vec2::<u32>()?;
    let values = Tensor::cat(&values, 1)?.to_vec2::<f32>()?;
    Ok(ids
        .into_iter()
        .zip(values)
        .map(|(i, v)| i.into_iter().zip(v).collect())
        .collect())
}

/// The sum of a tensor's elements as an f64 on the host (Metal has no f64: sum in f32 on the device,
/// widen here).
pub fn sum_to_host(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_rows_is_a_sort_truncated() {
        // Ties (the lower id first, as the host's top-k), −∞ entries, and k past the row's length.
        let rows = [
            [0.5f32, -1.0, 2.0, 2.0, f32::NEG_INFINITY, 0.25],
            [-3.0, -0.5, -0.5, -7.0, -0.1, -0.5],
        ];
        let x = Tensor::new(&rows, &Device::Cpu).unwrap();
        for k in [1, 3, 6, 9] {
            let got = top_k_rows(&x, k).unwrap();
            for (row, best) in rows.iter().zip(&got) {
                let mut want: Vec<(u32, f32)> = row
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| (i as u32, v))
                    .collect();
                want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                want.truncate(k);
                assert_eq!(best, &want, "k {k}");
            }
        }
        // The input is left as it was.
        assert_eq!(x.to_vec2::<f32>().unwrap(), rows);
    }
}
