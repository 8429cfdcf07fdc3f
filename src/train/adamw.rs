//! AdamW with torch.optim.AdamW's semantics (decoupled weight decay applied before the moment update,
//! bias-corrected step, eps added after the square root) and clipping by global gradient norm.

use anyhow::Result;
use candle_core::Tensor;

use super::pass::Grads;
use crate::lora::Adapter;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    /// torch's defaults, weight decay included (0.01).
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// First and second moments per trainable tensor, in the adapter's parameter order.
pub struct AdamW {
    pub params: AdamWParams,
    /// Steps taken so far (torch's `state["step"]`).
    pub step: u64,
    pub exp_avg: Vec<Tensor>,
    pub exp_avg_sq: Vec<Tensor>,
}

impl AdamW {
    pub fn new(params: AdamWParams, adapter: &Adapter) -> Result<Self> {
        let zeros = adapter
            .params()
            .iter()
            .map(|(_, t)| t.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            params,
            step: 0,
            exp_avg: zeros.clone(),
            exp_avg_sq: zeros,
        })
    }

    /// One update of every adapter tensor with learning rate `lr`.
    pub fn step(&mut self, adapter: &mut Adapter, grads: &[Tensor], lr: f64) -> Result<()> {
        let p = self.params;
        self.step += 1;
        let bc1 = 1.0 - p.beta1.powi(self.step as i32);
        let bc2 = 1.0 - p.beta2.powi(self.step as i32);
        let mut updated = Vec::with_capacity(grads.len());
        for (i, ((_, param), g)) in adapter.params().into_iter().zip(grads).enumerate() {
            let param = (param * (1.0 - lr * p.weight_decay))?;
            self.exp_avg[i] = ((&self.exp_avg[i] * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            self.exp_avg_sq[i] =
                ((&self.exp_avg_sq[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let denom = ((self.exp_avg_sq[i].sqrt()? / bc2.sqrt())? + p.eps)?;
            let update = ((&self.exp_avg[i] / denom)? * (lr / bc1))?;
            updated.push((param - update)?);
        }
        adapter.set_params(updated)
    }
}

/// The gradients flattened in the adapter's parameter order (A then B of each pair).
pub fn flatten(adapter: &Adapter, grads: Grads) -> Vec<Tensor> {
    let mut grads = grads;
    let mut out = Vec::new();
    for (l, t, _) in adapter.pairs() {
        let (a, b) = grads[l][t.index()]
            .take()
            .expect("the pass gives a gradient for every adapted projection");
        out.push(a);
        out.push(b);
    }
    out
}

/// The global L2 norm of all gradients (torch's clip_grad_norm_ with norm_type 2).
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sum = 0f64;
    for g in grads {
        sum += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(sum.sqrt())
}

/// Scales the gradients so their global norm is at most `max_norm`; returns the norm before clipping.
pub fn clip(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    // torch: clip_coef = max_norm / (total_norm + 1e-6), applied only when below 1.
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}
