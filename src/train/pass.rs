//! One training pass of a Llama with LoRA adapters: the forward of every block, the loss on the chosen
//! positions, and the backward written out by hand, block by block (as llm.c does).
//!
//! Why by hand rather than Candle's autograd: Candle's fused ops (rms_norm, rope, softmax, quantized
//! matmul) have no backward and silently cut the graph, and its matmul backward always forms the gradient
//! of the frozen weight (a third of the work and gigabytes of memory). Here the base weights are frozen
//! by construction: only `dx = dy W` is computed for them, and only A and B get gradients. Each layer
//! keeps the activations its backward needs; the backward stops at the lowest adapted layer.
//!
//! With activation checkpointing a block keeps only its input (and the dropout stream's state) and runs
//! its forward again just before its backward: one more forward per step, for about 1/20 of the
//! activations of a Llama block (the input is `hidden` floats a token; the rest is ~16× that).

use anyhow::{bail, Result};
use candle_core::{Device, Tensor, D};
use candle_nn::ops::{log_softmax, sigmoid, softmax_last_dim};
use candle_nn::rotary_emb::rope;
use rand::{Rng, SeedableRng};

use crate::lora::{Adapter, Target};
use crate::model::cpu::train::{self as kernels, AttentionDims, LoraKept, LoraOperands};
use crate::model::cpu::Kernels;
use crate::model::linear::Linear;
use crate::model::llama::{Batch, Block, Llama};
use crate::model::ops::{self, causal_mask, rms_norm_backward, rms_norm_saving};

/// Right-padded token rows and the positions whose next token is a target.
pub struct TrainBatch {
    /// (b, t) u32
    pub ids: Tensor,
    /// (n,) u32: flat indices `row * t + i` of the positions that predict a target
    pub loss_rows: Tensor,
    /// (n,) u32: the token each of those positions should predict
    pub targets: Tensor,
}

impl TrainBatch {
    /// `rows[k]` = (ids, loss_mask) where `loss_mask[i]` says whether `ids[i]` is a target (predicted
    /// from position i-1). Rows are right-padded with `pad_id`.
    pub fn new(rows: &[(Vec<u32>, Vec<bool>)], pad_id: u32, device: &Device) -> Result<Self> {
        let t = rows.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
        if t < 2 {
            bail!("a training batch needs rows of at least 2 tokens");
        }
        let mut ids = Vec::with_capacity(rows.len() * t);
        let (mut loss_rows, mut targets) = (Vec::new(), Vec::new());
        for (r, (row, mask)) in rows.iter().enumerate() {
            ids.extend_from_slice(row);
            ids.extend(std::iter::repeat_n(pad_id, t - row.len()));
            for i in 1..row.len() {
                if mask[i] {
                    loss_rows.push((r * t + i - 1) as u32);
                    targets.push(row[i]);
                }
            }
        }
        let n = targets.len();
        Ok(Self {
            ids: Tensor::from_vec(ids, (rows.len(), t), device)?,
            loss_rows: Tensor::from_vec(loss_rows, n, device)?,
            targets: Tensor::from_vec(targets, n, device)?,
        })
    }

    /// From transformers-style `labels` (same shape as `ids`, -100 = no loss, shifted inside the loss).
    pub fn from_labels(ids: &[Vec<u32>], labels: &[Vec<i64>], device: &Device) -> Result<Self> {
        let t = ids.first().map_or(0, Vec::len);
        if ids.iter().any(|r| r.len() != t)
            || labels.iter().zip(ids).any(|(l, r)| l.len() != r.len())
        {
            bail!("ids and labels must be rectangular and of the same shape");
        }
        let (mut loss_rows, mut targets) = (Vec::new(), Vec::new());
        for (r, row) in labels.iter().enumerate() {
            for (i, &lab) in row.iter().enumerate().skip(1) {
                if lab != -100 {
                    loss_rows.push((r * t + i - 1) as u32);
                    targets.push(lab as u32);
                }
            }
        }
        let n = targets.len();
        Ok(Self {
            ids: Tensor::from_vec(ids.concat(), (ids.len(), t), device)?,
            loss_rows: Tensor::from_vec(loss_rows, n, device)?,
            targets: Tensor::from_vec(targets, n, device)?,
        })
    }

    pub fn num_targets(&self) -> usize {
        self.targets.elem_count()
    }

    pub fn num_tokens(&self) -> usize {
        self.ids.elem_count()
    }
}

/// Gradients of A and B for every adapted (layer, target): `grads[l][target]`.
pub type Grads = Vec<[Option<(Tensor, Tensor)>; 7]>;

/// Adds `other` into `acc` (gradient accumulation over micro-batches).
pub fn accumulate(acc: &mut Option<Grads>, other: Grads) -> Result<()> {
    match acc {
        None => *acc = Some(other),
        Some(acc) => {
            for (row, orow) in acc.iter_mut().zip(other) {
                for (slot, o) in row.iter_mut().zip(orow) {
                    if let (Some((a, b)), Some((oa, ob))) = (slot.as_mut(), o) {
                        *a = (&*a + oa)?;
                        *b = (&*b + ob)?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// What a LoRA projection keeps for its backward.
struct LoraSaved {
    /// The input to A (after dropout, if any); None for the down projection between forward and backward,
    /// whose input `silu(gate) · up` is made again from the kept gate and up (1536 of a block's 8448 kept
    /// floats a token; with it the bf16 step peaked at 0.53× PyTorch's memory).
    x_in: Option<Tensor>,
    /// `scale · x_in Aᵀ`, (N, r)
    z: Tensor,
    /// Dropout's scaled keep-mask (0 or 1/(1-p)), if dropout is on.
    keep: Option<Tensor>,
}

/// What one block keeps from its forward for its backward.
struct BlockSaved {
    x: Tensor,
    inv_rms1: Tensor,
    /// Rotated queries grouped per kv head (b, kv_heads, g·t, d), keys and values (b, kv_heads, t, d).
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// Attention probabilities (b, kv_heads, g·t, t).
    probs: Tensor,
    x1: Tensor,
    inv_rms2: Tensor,
    gate: Tensor,
    up: Tensor,
    lora: [Option<LoraSaved>; 7],
}

/// What every block of one pass shares: the batch shape, the head layout, the RoPE tables (and their
/// inverse rotation for the backward) and the causal mask, computed once per pass.
struct Geometry {
    b: usize,
    t: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    cos: Tensor,
    sin: Tensor,
    neg_sin: Tensor,
    mask: Tensor,
    /// The model's kernels: the CPU's, or the generic ops alone.
    kernels: Kernels,
}

impl Geometry {
    fn attention_dims(&self) -> AttentionDims {
        AttentionDims {
            b: self.b,
            t: self.t,
            kv_heads: self.kv_heads,
            group: self.heads / self.kv_heads,
            head_dim: self.head_dim,
        }
    }
}

/// The model, the adapter being trained and the per-pass settings.
pub struct Pass<'a> {
    pub llama: &'a Llama,
    pub adapter: &'a Adapter,
    /// Dropout on the adapters' inputs, seeded per pass so a resumed run draws the same masks.
    pub dropout_seed: u64,
    /// Keep each block's input only and recompute its forward in the backward (same gradients).
    pub checkpoint: bool,
}

/// What the backward has of a block: everything its forward made, or (checkpointed) its input and the
/// dropout stream as it stood, to make everything again.
enum Kept {
    Saved(BlockSaved),
    Input(Tensor, rand::rngs::StdRng),
}

/// `silu(gate) · up`.
fn swiglu(k: Kernels, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    match kernels::swiglu(k, gate, up)? {
        Some(m) => Ok(m),
        None => Ok((gate.silu()? * up)?),
    }
}

/// A projection's rows (b·t, n·d) as heads (b, n, t, d), rotated by RoPE if given.
fn to_heads(
    k: Kernels,
    y: &Tensor,
    dims: (usize, usize, usize, usize),
    rotation: Option<(&Tensor, &Tensor)>,
) -> Result<Tensor> {
    if let Some(h) = kernels::move_heads(k, y, dims, rotation, true)? {
        return Ok(h);
    }
    let h = y.reshape(dims)?.transpose(1, 2)?.contiguous()?;
    Ok(match rotation {
        Some((cos, sin)) => rope(&h, cos, sin)?,
        None => h,
    })
}

/// Heads (b, n, t, d) back to rows (b·t, n·d), rotated by RoPE first if given (the backward's −sin
/// undoes the forward's rotation).
fn from_heads(
    k: Kernels,
    x: &Tensor,
    (b, n, t, d): (usize, usize, usize, usize),
    rotation: Option<(&Tensor, &Tensor)>,
) -> Result<Tensor> {
    if let Some(r) = kernels::move_heads(k, x, (b, t, n, d), rotation, false)? {
        return Ok(r);
    }
    let x = x.reshape((b, n, t, d))?;
    let x = match rotation {
        Some((cos, sin)) => rope(&x.contiguous()?, cos, sin)?,
        None => x,
    };
    Ok(x.transpose(1, 2)?.reshape((b * t, n * d))?)
}

/// `parts[0] + parts[1] + …`: the residual adds and the sums of input gradients.
fn sum(k: Kernels, parts: &[&Tensor]) -> Result<Tensor> {
    if let Some(s) = kernels::sum(k, parts)? {
        return Ok(s);
    }
    let mut acc = parts[0].clone();
    for p in &parts[1..] {
        acc = (acc + *p)?;
    }
    Ok(acc)
}

/// RMSNorm keeping what its backward needs.
fn norm(k: Kernels, x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    match kernels::rms_norm_forward(k, x, w, eps)? {
        Some(r) => Ok(r),
        None => rms_norm_saving(x, w, eps),
    }
}

/// `residual + ` the gradient of x through [`norm`], given that of its output.
fn norm_backward(
    k: Kernels,
    (x, inv, w): (&Tensor, &Tensor, &Tensor),
    dy: &Tensor,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let dy = dy.contiguous()?;
    if let Some(dx) = kernels::rms_norm_backward(k, x, inv, w, &dy, residual)? {
        return Ok(dx);
    }
    let dx = rms_norm_backward(x, inv, w, &dy)?;
    Ok(match residual {
        Some(r) => (r + dx)?,
        None => dx,
    })
}

/// The gradients of gate and up from that of `silu(gate) · up`.
fn swiglu_backward(
    k: Kernels,
    gate: &Tensor,
    up: &Tensor,
    dm: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let dm = dm.contiguous()?;
    if let Some(g) = kernels::swiglu_backward(k, gate, up, &dm)? {
        return Ok(g);
    }
    let sg = sigmoid(gate)?;
    // silu'(x) = σ(x)·(1 + x·(1 − σ(x)))
    let dsilu = (&sg * ((gate * (1.0 - &sg)?)? + 1.0)?)?;
    Ok(((((&dm * up)? * dsilu)?), (&dm * gate.silu()?)?))
}

/// Causal attention of one layer: `probs` (b, kv_heads, g·t, t) and `o` (b, kv_heads, g·t, d) from q
/// (b, kv_heads, g·t, d) and k, v (b, kv_heads, t, d). On the CPU one task per (sequence, kv head).
fn attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    geo: &Geometry,
) -> Result<(Tensor, Tensor)> {
    let (b, t, nh, nkv, hd) = (geo.b, geo.t, geo.heads, geo.kv_heads, geo.head_dim);
    let (g, scale) = (nh / nkv, 1.0 / (hd as f64).sqrt());
    if let Some(r) =
        kernels::attention_forward(geo.kernels, q, k, v, geo.attention_dims(), scale as f32)?
    {
        return Ok(r);
    }
    let scores = (q.matmul(&k.t()?)? * scale)?
        .reshape((b, nh, t, t))?
        .broadcast_add(&geo.mask)?;
    let probs = softmax_last_dim(&scores)?.reshape((b, nkv, g * t, t))?;
    let o = probs.matmul(v)?;
    Ok((probs, o))
}

/// Backward of [`attention_forward`]: dq (b, kv_heads, g·t, d), dk and dv (b, kv_heads, t, d) from d_o.
fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probs: &Tensor,
    d_o: &Tensor,
    geo: &Geometry,
) -> Result<(Tensor, Tensor, Tensor)> {
    let scale = 1.0 / (geo.head_dim as f64).sqrt();
    let dims = geo.attention_dims();
    if let Some(r) =
        kernels::attention_backward(geo.kernels, q, k, v, probs, d_o, dims, scale as f32)?
    {
        return Ok(r);
    }
    let dprobs = d_o.matmul(&v.t()?)?;
    let dv = probs.t()?.matmul(d_o)?;
    let row_dot = (&dprobs * probs)?.sum_keepdim(D::Minus1)?;
    let dscores = ((probs * dprobs.broadcast_sub(&row_dot)?)? * scale)?;
    Ok((dscores.matmul(k)?, dscores.t()?.matmul(q)?, dv))
}

impl Pass<'_> {
    /// `linear(x) + scale · (x Aᵀ) Bᵀ`, keeping what the backward needs.
    fn project(
        &self,
        layer: usize,
        target: Target,
        linear: &Linear,
        x: &Tensor,
        saved: &mut [Option<LoraSaved>; 7],
        rng: &mut rand::rngs::StdRng,
    ) -> Result<Tensor> {
        let k = self.llama.kernels;
        let Some(p) = self.adapter.pair(layer, target) else {
            return linear.forward(x, k);
        };
        let dropout = self.adapter.config.dropout;
        let keep = if dropout > 0.0 {
            let scale = 1.0 / (1.0 - dropout as f32);
            let mask: Vec<f32> = (0..x.elem_count())
                .map(|_| {
                    if rng.random::<f64>() < dropout {
                        0.0
                    } else {
                        scale
                    }
                })
                .collect();
            Some(Tensor::from_vec(mask, x.shape(), x.device())?)
        } else {
            None
        };
        let x = x.contiguous()?;
        let x_in = match &keep {
            Some(k) => (&x * k)?,
            None => x.clone(),
        };
        let scale = self.adapter.scale;
        let out = p.b.dim(0)?;
        let inp = p.a.dim(1)?;
        let m = x.elem_count() / inp;
        let mut out_dims = x.dims().to_vec();
        *out_dims.last_mut().expect("x has a last dimension") = out;
        // On the CPU: the fused kernel (z Bᵀ accumulated into y); elsewhere Candle's ops.
        let operands = LoraOperands {
            linear,
            pair: p,
            scale: scale as f32,
        };
        // The down projection's input, silu(gate) · up, is made again in the backward from gate and up.
        let keep_input = target != Target::Down;
        let fused =
            kernels::lora_forward(k, &x, &x_in, operands, out_dims.clone().into(), keep_input)?;
        let (y, z, x_in) = match fused {
            Some(yz) => yz,
            None => {
                let z = ops::lora_down(&x_in.reshape((m, inp))?, p, scale)?;
                let y = (linear.forward(&x, k)?.reshape((m, out))? + ops::lora_up(&z, p)?)?
                    .reshape(out_dims)?;
                (y, z, keep_input.then_some(x_in))
            }
        };
        saved[target.index()] = Some(LoraSaved { x_in, z, keep });
        Ok(y)
    }

    /// Backward of [`Pass::project`]: the gradients of A and B into `grads`, and dx unless `need_dx` is false.
    #[allow(clippy::too_many_arguments)] // the layer's pieces, kept explicit as llm.c does
    fn project_backward(
        &self,
        layer: usize,
        target: Target,
        linear: &Linear,
        dy: &Tensor,
        saved: &mut [Option<LoraSaved>; 7],
        grads: &mut [Option<(Tensor, Tensor)>; 7],
        need_dx: bool,
    ) -> Result<Option<Tensor>> {
        let k = self.llama.kernels;
        let (Some(p), Some(s)) = (
            self.adapter.pair(layer, target),
            saved[target.index()].take(),
        ) else {
            return Ok(if need_dx {
                Some(linear.backward_input(dy, k)?)
            } else {
                None
            });
        };
        let scale = self.adapter.scale;
        let dy = dy.contiguous()?;
        let (out, inp) = (p.b.dim(0)?, p.a.dim(1)?);
        let m = dy.elem_count() / out;
        let keep = s.keep.as_ref().map(|k| k.contiguous()).transpose()?;
        let operands = LoraOperands {
            linear,
            pair: p,
            scale: scale as f32,
        };
        let x_in = s
            .x_in
            .as_ref()
            .expect("the input to A is kept or made again");
        let kept = LoraKept {
            x_in,
            z: &s.z,
            keep: keep.as_ref(),
        };
        let fused = kernels::lora_backward(k, &dy, operands, kept, need_dx)?;
        let (dx, da, db) = match fused {
            Some(g) => g,
            None => {
                let dy = dy.reshape((m, out))?;
                let x_in = x_in.reshape((m, inp))?;
                let db = dy.t()?.matmul(&s.z)?;
                let dz = (dy.matmul(&p.b)? * scale)?;
                let da = dz.t()?.matmul(&x_in)?;
                let dx = if need_dx {
                    let mut dxl = dz.matmul(&p.a)?;
                    if let Some(k) = &keep {
                        dxl = (dxl * k.reshape((m, inp))?)?;
                    }
                    Some((linear.backward_input(&dy, k)? + dxl)?)
                } else {
                    None
                };
                (dx, da, db)
            }
        };
        grads[target.index()] = Some((da, db));
        Ok(dx)
    }

    /// [`Pass::project`] of the projections that read x (q, k, v of the first norm's output; gate, up of
    /// the second's): without dropout, on the CPU, x is rounded once for all of them.
    fn project_shared<const N: usize>(
        &self,
        layer: usize,
        projections: [(Target, &Linear); N],
        x: &Tensor,
        saved: &mut [Option<LoraSaved>; 7],
        rng: &mut rand::rngs::StdRng,
    ) -> Result<[Tensor; N]> {
        let pairs: Option<Vec<_>> = projections
            .iter()
            .map(|&(target, _)| self.adapter.pair(layer, target))
            .collect();
        if let (Some(pairs), 0.0) = (pairs, self.adapter.config.dropout) {
            let x = x.contiguous()?;
            let scale = self.adapter.scale as f32;
            let operands: Vec<_> = projections
                .iter()
                .zip(pairs)
                .map(|(&(_, linear), pair)| LoraOperands {
                    linear,
                    pair,
                    scale,
                })
                .collect();
            let k = self.llama.kernels;
            if let Some((yz, x_in)) = kernels::lora_forward_shared(k, &x, &operands)? {
                let mut ys = Vec::with_capacity(N);
                for ((target, _), (y, z)) in projections.iter().zip(yz) {
                    saved[target.index()] = Some(LoraSaved {
                        x_in: Some(x_in.clone()),
                        z,
                        keep: None,
                    });
                    ys.push(y);
                }
                return Ok(ys.try_into().expect("one output a projection"));
            }
        }
        let mut ys = Vec::with_capacity(N);
        for (target, linear) in projections {
            ys.push(self.project(layer, target, linear, x, saved, rng)?);
        }
        Ok(ys.try_into().expect("one output a projection"))
    }

    /// Backward of [`Pass::project_shared`] from each projection's dy: the sum of their input gradients
    /// (None without `need_dx`).
    fn project_backward_shared(
        &self,
        layer: usize,
        projections: &[(Target, &Linear, &Tensor)],
        saved: &mut [Option<LoraSaved>; 7],
        grads: &mut [Option<(Tensor, Tensor)>; 7],
        need_dx: bool,
    ) -> Result<Option<Tensor>> {
        let k = self.llama.kernels;
        let shared: Option<Vec<_>> = projections
            .iter()
            .map(|&(target, linear, dy)| {
                let pair = self.adapter.pair(layer, target)?;
                let s = saved[target.index()].as_ref()?;
                let x_in = s.x_in.as_ref().filter(|_| s.keep.is_none())?;
                Some((x_in, dy, linear, pair, &s.z))
            })
            .collect();
        if let Some(shared) = shared {
            let x = shared[0].0.clone();
            let dys = shared
                .iter()
                .map(|(_, dy, ..)| dy.contiguous())
                .collect::<candle_core::Result<Vec<_>>>()?;
            let scale = self.adapter.scale as f32;
            let parts: Vec<_> = shared
                .iter()
                .zip(&dys)
                .map(|(&(_, _, linear, pair, z), dy)| {
                    let operands = LoraOperands {
                        linear,
                        pair,
                        scale,
                    };
                    (dy, operands, z)
                })
                .collect();
            if let Some((dx, g)) = kernels::lora_backward_shared(k, &x, &parts, need_dx)? {
                for (&(target, ..), g) in projections.iter().zip(g) {
                    saved[target.index()] = None;
                    grads[target.index()] = Some(g);
                }
                return Ok(dx);
            }
        }
        let mut dxs = Vec::with_capacity(projections.len());
        for &(target, linear, dy) in projections {
            dxs.extend(self.project_backward(layer, target, linear, dy, saved, grads, need_dx)?);
        }
        if !need_dx {
            return Ok(None);
        }
        Ok(Some(sum(k, &dxs.iter().collect::<Vec<_>>())?))
    }

    fn block_forward(
        &self,
        layer: usize,
        block: &Block,
        x: Tensor,
        geo: &Geometry,
        rng: &mut rand::rngs::StdRng,
    ) -> Result<(Tensor, BlockSaved)> {
        let cfg = &self.llama.cfg;
        let (b, t, nh, nkv, hd) = (geo.b, geo.t, geo.heads, geo.kv_heads, geo.head_dim);
        let g = nh / nkv;
        let (cos, sin) = (&geo.cos, &geo.sin);
        let mut lora: [Option<LoraSaved>; 7] = Default::default();
        let attn = &block.self_attn;

        let kn = self.llama.kernels;
        let (h1, inv_rms1) = norm(kn, &x, &block.input_layernorm, cfg.rms_norm_eps)?;
        let qkv = [
            (Target::Q, &attn.q_proj),
            (Target::K, &attn.k_proj),
            (Target::V, &attn.v_proj),
        ];
        let [q, k, v] = self.project_shared(layer, qkv, &h1, &mut lora, rng)?;
        let q = to_heads(kn, &q, (b, t, nh, hd), Some((cos, sin)))?.reshape((b, nkv, g * t, hd))?;
        let k = to_heads(kn, &k, (b, t, nkv, hd), Some((cos, sin)))?;
        let v = to_heads(kn, &v, (b, t, nkv, hd), None)?;
        let (probs, o) = attention_forward(&q, &k, &v, geo)?;
        let o = from_heads(kn, &o, (b, nh, t, hd), None)?;
        let attn_out = self.project(layer, Target::O, &attn.o_proj, &o, &mut lora, rng)?;
        let x1 = sum(kn, &[&x, &attn_out])?;

        let mlp = &block.mlp;
        let (h2, inv_rms2) = norm(kn, &x1, &block.post_attention_layernorm, cfg.rms_norm_eps)?;
        let gate_up = [(Target::Gate, &mlp.gate_proj), (Target::Up, &mlp.up_proj)];
        let [gate, up] = self.project_shared(layer, gate_up, &h2, &mut lora, rng)?;
        let m = swiglu(self.llama.kernels, &gate, &up)?;
        let down = self.project(layer, Target::Down, &mlp.down_proj, &m, &mut lora, rng)?;
        let x2 = sum(kn, &[&x1, &down])?;
        Ok((
            x2,
            BlockSaved {
                x,
                inv_rms1,
                q,
                k,
                v,
                probs,
                x1,
                inv_rms2,
                gate,
                up,
                lora,
            },
        ))
    }

    /// From the gradient of the block's output to that of its input (None for the lowest adapted layer,
    /// where nothing below needs it); the adapters' gradients go to `grads`.
    #[allow(clippy::too_many_arguments)]
    fn block_backward(
        &self,
        layer: usize,
        block: &Block,
        mut s: BlockSaved,
        dx2: Tensor,
        geo: &Geometry,
        grads: &mut [Option<(Tensor, Tensor)>; 7],
        need_dx: bool,
    ) -> Result<Option<Tensor>> {
        let (b, t, nh, nkv, hd) = (geo.b, geo.t, geo.heads, geo.kv_heads, geo.head_dim);
        let g = nh / nkv;
        let (cos, neg_sin) = (&geo.cos, &geo.neg_sin);
        let (mlp, attn) = (&block.mlp, &block.self_attn);
        if let Some(d) = s.lora[Target::Down.index()].as_mut() {
            if d.x_in.is_none() {
                let m = swiglu(self.llama.kernels, &s.gate, &s.up)?;
                d.x_in = Some(match &d.keep {
                    Some(keep) => (m * keep)?,
                    None => m,
                });
            }
        }
        let lora = &mut s.lora;

        // MLP: x2 = x1 + down(silu(gate) · up).
        let dm = self
            .project_backward(layer, Target::Down, &mlp.down_proj, &dx2, lora, grads, true)?
            .expect("dx requested");
        let (dgate, dup) = swiglu_backward(self.llama.kernels, &s.gate, &s.up, &dm)?;
        let gate_up = [
            (Target::Gate, &mlp.gate_proj, &dgate),
            (Target::Up, &mlp.up_proj, &dup),
        ];
        let dh2 = self
            .project_backward_shared(layer, &gate_up, lora, grads, true)?
            .expect("dx requested");
        let kn = self.llama.kernels;
        let post_norm = (&s.x1, &s.inv_rms2, &block.post_attention_layernorm);
        let dx1 = norm_backward(kn, post_norm, &dh2, Some(&dx2))?;

        // Attention: x1 = x + o_proj(softmax(q kᵀ/√d + mask) v).
        let d_o = self
            .project_backward(layer, Target::O, &attn.o_proj, &dx1, lora, grads, true)?
            .expect("dx requested");
        let d_o = to_heads(kn, &d_o, (b, t, nh, hd), None)?.reshape((b, nkv, g * t, hd))?;
        let (dq, dk, dv) = attention_backward(&s.q, &s.k, &s.v, &s.probs, &d_o, geo)?;
        // RoPE is a rotation: its transpose rotates back by the same angle.
        let dq = from_heads(kn, &dq, (b, nh, t, hd), Some((cos, neg_sin)))?;
        let dk = from_heads(kn, &dk, (b, nkv, t, hd), Some((cos, neg_sin)))?;
        let dv = from_heads(kn, &dv, (b, nkv, t, hd), None)?;
        let qkv = [
            (Target::Q, &attn.q_proj, &dq),
            (Target::K, &attn.k_proj, &dk),
            (Target::V, &attn.v_proj, &dv),
        ];
        let Some(dh1) = self.project_backward_shared(layer, &qkv, lora, grads, need_dx)? else {
            return Ok(None);
        };
        let input_norm = (&s.x, &s.inv_rms1, &block.input_layernorm);
        Ok(Some(norm_backward(kn, input_norm, &dh1, Some(&dx1))?))
    }

    /// Forward and backward over one batch. Returns the summed cross-entropy over the batch's targets
    /// and the adapters' gradients of `sum / loss_norm` (pass the target count of the whole
    /// accumulated batch, so micro-batches add up to the gradient of its mean).
    pub fn forward_backward(&self, batch: &TrainBatch, loss_norm: f64) -> Result<(f64, Grads)> {
        let llama = self.llama;
        let cfg = &llama.cfg;
        let dev = llama.device();
        let (b, t) = batch.ids.dims2()?;
        let n_layers = llama.layers.len();
        let Some(lowest) = self.adapter.lowest_layer() else {
            bail!("the adapter has no LoRA weights to train");
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.dropout_seed);

        let positions = Tensor::arange(0f32, t as f32, dev)?;
        let (cos, sin) = ops::rope_tables(&positions, &llama.inv_freq)?;
        // Right padding: the plain causal mask already keeps real tokens from seeing padding.
        let Some(mask) = causal_mask(&[0], t, 0, dev)? else {
            bail!("a training batch needs rows of at least 2 tokens");
        };
        let geo = Geometry {
            b,
            t,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            cos,
            neg_sin: sin.neg()?,
            sin,
            mask,
            kernels: llama.kernels,
        };

        let mut x = llama
            .embed_tokens
            .index_select(&batch.ids.flatten_all()?, 0)?
            .to_dtype(candle_core::DType::F32)?;
        let mut kept = Vec::with_capacity(n_layers);
        for (l, block) in llama.layers.iter().enumerate() {
            let before = (self.checkpoint && l >= lowest).then(|| (x.clone(), rng.clone()));
            let (x2, s) = self.block_forward(l, block, x, &geo, &mut rng)?;
            // Blocks below the lowest adapter need nothing kept.
            kept.push(match before {
                Some((input, rng)) => Some(Kept::Input(input, rng)),
                None => (l >= lowest).then_some(Kept::Saved(s)),
            });
            x = x2;
        }

        // Loss on the selected positions only: the head never sees the other rows.
        let xs = x.index_select(&batch.loss_rows, 0)?;
        let (hn, inv_f) = norm(llama.kernels, &xs, &llama.norm, cfg.rms_norm_eps)?;
        let logits = llama.lm_head.forward(&hn, llama.kernels)?;
        let logp = log_softmax(&logits, D::Minus1)?;
        let targets = batch.targets.unsqueeze(1)?;
        let picked = logp.gather(&targets, 1)?;
        let loss_sum = -ops::sum_to_host(&picked)?;
        let n = batch.num_targets();
        let minus_one = Tensor::full(-1f32, (n, 1), dev)?;
        let dlogits = (logp.exp()?.scatter_add(&targets, &minus_one, 1)? / loss_norm)?;
        let dhn = llama.lm_head.backward_input(&dlogits, llama.kernels)?;
        let dxs = norm_backward(llama.kernels, (&xs, &inv_f, &llama.norm), &dhn, None)?;
        let mut dx = x.zeros_like()?.index_add(&batch.loss_rows, &dxs, 0)?;

        let mut grads: Grads = vec![Default::default(); n_layers];
        for l in (lowest..n_layers).rev() {
            let block = &llama.layers[l];
            let s = match kept[l].take().expect("kept for every adapted layer") {
                Kept::Saved(s) => s,
                Kept::Input(input, mut rng) => {
                    self.block_forward(l, block, input, &geo, &mut rng)?.1
                }
            };
            let need_dx = l > lowest;
            match self.block_backward(l, block, s, dx, &geo, &mut grads[l], need_dx)? {
                Some(d) => dx = d,
                None => break,
            }
        }
        Ok((loss_sum, grads))
    }
}

/// The summed cross-entropy of `batch`'s targets under the model with `adapter`, forward only (the
/// inference path: validation loss).
pub fn eval_loss(llama: &Llama, adapter: Option<&Adapter>, batch: &TrainBatch) -> Result<f64> {
    let dev = llama.device();
    let (b, t) = batch.ids.dims2()?;
    let positions = Tensor::arange(0f32, t as f32, dev)?
        .unsqueeze(0)?
        .repeat((b, 1))?;
    let mask = causal_mask(&vec![0; b], t, 0, dev)?;
    let h = llama.forward(
        &Batch {
            ids: &batch.ids,
            positions: &positions,
            mask: mask.as_ref(),
            adapters: crate::lora::RowAdapters::Same(adapter),
            hooks: None,
        },
        None,
    )?;
    let rows = h.reshape((b * t, ()))?.index_select(&batch.loss_rows, 0)?;
    let logp = log_softmax(&llama.logits(&rows)?, D::Minus1)?;
    let picked = logp.gather(&batch.targets.unsqueeze(1)?, 1)?;
    Ok(-ops::sum_to_host(&picked)?)
}
