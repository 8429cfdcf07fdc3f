//! AdamW with torch.optim.AdamW's semantics (decoupled weight decay applied before the moment update,
//! bias-corrected step, eps added after the square root) and clipping by global gradient norm.

use anyhow::Result;
use candle_core::Tensor;

use super::pass::Grads;
use crate::lora::Adapter;
use crate::model::cpu::Kernels;

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

impl AdamWParams {
    /// The kernel's coefficients for a step with learning rate `lr` and bias corrections `bc1`, `bc2`:
    /// each as the f32 that Candle's scalar ops in [`AdamW::step_by_ops`] apply.
    fn coefs(&self, lr: f64, (bc1, bc2): (f64, f64)) -> introspect_kernels::AdamWCoefs {
        introspect_kernels::AdamWCoefs {
            decay: (1.0 - lr * self.weight_decay) as f32,
            beta1: self.beta1 as f32,
            one_minus_beta1: (1.0 - self.beta1) as f32,
            beta2: self.beta2 as f32,
            one_minus_beta2: (1.0 - self.beta2) as f32,
            inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
            eps: self.eps as f32,
            step_size: (lr / bc1) as f32,
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
        let params: Vec<Tensor> = adapter.params().into_iter().map(|(_, t)| t).collect();
        let coefs = p.coefs(lr, (bc1, bc2));
        let updated = match self.step_on_cpu(&params, grads, coefs)? {
            Some(updated) => updated,
            None => self.step_by_ops(&params, grads, lr, (bc1, bc2))?,
        };
        adapter.set_params(updated)
    }

    /// [`AdamW::step`] by the CPU kernel (every tensor in one pass, the same f32 operations), where the
    /// CPU kernels run and all tensors are contiguous f32 in CPU memory; None elsewhere.
    fn step_on_cpu(
        &mut self,
        params: &[Tensor],
        grads: &[Tensor],
        coefs: introspect_kernels::AdamWCoefs,
    ) -> Result<Option<Vec<Tensor>>> {
        let Some(first) = params.first() else {
            return Ok(Some(vec![]));
        };
        let n = params.len();
        let all: Vec<&Tensor> = (params.iter().chain(grads))
            .chain(&self.exp_avg)
            .chain(&self.exp_avg_sq)
            .collect();
        let updated = Kernels::for_device(first.device()).f32_slices(&all, |s| {
            let tensors: Vec<_> = (0..n)
                .map(|i| introspect_kernels::AdamWTensor {
                    param: s[i],
                    grad: s[n + i],
                    exp_avg: s[2 * n + i],
                    exp_avg_sq: s[3 * n + i],
                })
                .collect();
            introspect_kernels::adamw_step(&tensors, coefs)
        })?;
        let Some(updated) = updated else {
            return Ok(None);
        };
        let mut new_params = Vec::with_capacity(n);
        for (i, u) in updated.into_iter().enumerate() {
            let (shape, dev) = (params[i].shape(), params[i].device());
            new_params.push(Tensor::from_vec(u.param, shape, dev)?);
            self.exp_avg[i] = Tensor::from_vec(u.exp_avg, shape, dev)?;
            self.exp_avg_sq[i] = Tensor::from_vec(u.exp_avg_sq, shape, dev)?;
        }
        Ok(Some(new_params))
    }

    /// The step composed from Candle's ops (any device); returns the new parameters.
    fn step_by_ops(
        &mut self,
        params: &[Tensor],
        grads: &[Tensor],
        lr: f64,
        (bc1, bc2): (f64, f64),
    ) -> Result<Vec<Tensor>> {
        let p = self.params;
        let mut updated = Vec::with_capacity(grads.len());
        for (i, (param, g)) in params.iter().zip(grads).enumerate() {
            let param = (param * (1.0 - lr * p.weight_decay))?;
            self.exp_avg[i] = ((&self.exp_avg[i] * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            self.exp_avg_sq[i] =
                ((&self.exp_avg_sq[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let denom = ((self.exp_avg_sq[i].sqrt()? / bc2.sqrt())? + p.eps)?;
            let update = ((&self.exp_avg[i] / denom)? * (lr / bc1))?;
            updated.push((param - update)?);
        }
        Ok(updated)
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The CPU kernel's step equals the composition of Candle's ops value for value, over three steps
    /// (moments carried), with weight decay and bias correction.
    #[test]
    fn the_kernel_step_equals_the_ops() -> Result<()> {
        let dev = Device::Cpu;
        let val = |i: usize, s: u32| {
            (((i as u32).wrapping_mul(2654435761) ^ s) % 2001) as f32 / 1000.0 - 1.0
        };
        let shapes = [(32usize, 70usize), (90, 32), (1, 5)];
        let tensors = |s: u32| -> candle_core::Result<Vec<Tensor>> {
            let data = |(r, c): (usize, usize)| (0..r * c).map(|i| val(i, s)).collect::<Vec<_>>();
            shapes
                .iter()
                .map(|&sh| Tensor::from_vec(data(sh), sh, &dev))
                .collect()
        };
        let mut params = tensors(1)?;
        let fresh = |params: &[Tensor]| -> candle_core::Result<AdamW> {
            let zeros: Vec<Tensor> = params
                .iter()
                .map(|t| t.zeros_like())
                .collect::<candle_core::Result<_>>()?;
            Ok(AdamW {
                params: AdamWParams::default(),
                step: 0,
                exp_avg: zeros.clone(),
                exp_avg_sq: zeros,
            })
        };
        let (mut by_kernel, mut by_ops) = (fresh(&params)?, fresh(&params)?);
        let lr = 2e-3;
        for step in 1..=3 {
            let grads = tensors(10 + step)?;
            let bc = (
                1.0 - 0.9f64.powi(step as i32),
                1.0 - 0.999f64.powi(step as i32),
            );
            let coefs = by_kernel.params.coefs(lr, bc);
            let got = by_kernel
                .step_on_cpu(&params, &grads, coefs)?
                .expect("CPU tensors");
            let want = by_ops.step_by_ops(&params, &grads, lr, bc)?;
            let pairs = [
                (&got, &want),
                (&by_kernel.exp_avg, &by_ops.exp_avg),
                (&by_kernel.exp_avg_sq, &by_ops.exp_avg_sq),
            ];
            for (g, w) in pairs.into_iter().flat_map(|(g, w)| g.iter().zip(w)) {
                let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
                assert_eq!(flat(g)?, flat(w)?, "step {step}");
            }
            params = got;
        }
        Ok(())
    }
}
