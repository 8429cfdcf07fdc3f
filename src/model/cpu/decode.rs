//! The in-place decode step on the CPU: one new token per row, on plain f32 buffers.
//!
//! Through [`Llama::forward`] a decode step is ~750 small tensor ops, whose allocations and thread hand-offs
//! cost as much as the arithmetic at batch 1. [`Llama::decode_logits`] is the same math on flat buffers
//! (tests/decode.rs checks it against `forward`); the projections that share an input — q/k/v, gate/up —
//! run as one parallel pass.

use anyhow::{bail, ensure, Result};
use candle_core::{Device, Storage, Tensor};
use introspect_kernels::{DecodeShape, KvView, Product, Weights};

use super::linear::uses_kernel;
use super::{CpuF32, DenseSlice};
use crate::lora::{LoraPair, Target};
use crate::model::cache::KvCache;
use crate::model::decode::DecodeRows;
use crate::model::hooks::HookPoint;
use crate::model::linear::Linear;
use crate::model::ops;
use crate::model::Llama;

impl Llama {
    /// Next-token log-probabilities (b × vocab) of every row, from [`Llama::decode_logits`].
    pub(crate) fn decode_logprobs(
        &self,
        rows: &DecodeRows,
        cache: &mut KvCache,
    ) -> Result<Vec<Vec<f32>>> {
        let logits = self.decode_logits(rows, cache)?;
        Ok(logits
            .chunks(self.cfg.vocab_size)
            .map(introspect_kernels::log_softmax)
            .collect())
    }

    /// Next-token logits, (b × vocab) row-major, computed on the CPU's f32 buffers.
    pub fn decode_logits(&self, rows: &DecodeRows, cache: &mut KvCache) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let b = rows.ids.len();
        ensure!(
            rows.positions.len() == b && rows.pads.len() == b,
            "one position and one padding count per row"
        );
        let (h, nh, nkv, hd) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let eps = cfg.rms_norm_eps as f32;
        let embed = DenseSlice::of(&self.embed_tokens)?;
        let mut x = Vec::with_capacity(b * h);
        for &id in rows.ids {
            let id = id as usize;
            ensure!(
                id < cfg.vocab_size,
                "token id {id} is outside the vocabulary"
            );
            embed.row_f32(id, h, &mut x);
        }
        let rope = Rope::new(&self.inv_freq, rows.positions)?;
        // Attention sees every cached position after the row's padding, and this step's own.
        let past = cache.len();
        let mut mask = vec![0f32; b * (past + 1)];
        for (r, &p) in rows.pads.iter().enumerate() {
            mask[r * (past + 1)..r * (past + 1) + p.min(past)].fill(f32::NEG_INFINITY);
        }
        let any_pad = rows.pads.iter().any(|&p| p > 0);

        let (mut q, mut k, mut v) = (
            vec![0f32; b * nh * hd],
            vec![0f32; b * nkv * hd],
            vec![0f32; b * nkv * hd],
        );
        let mut o = vec![0f32; b * h];
        let inter = cfg.intermediate_size;
        let (mut gate, mut up, mut down) = (
            vec![0f32; b * inter],
            vec![0f32; b * inter],
            vec![0f32; b * h],
        );
        // The hook points, as the tensor forward passes them (`Block::forward`).
        let hook = |point, x: &mut Vec<f32>| {
            if let Some(hooks) = rows.hooks {
                hooks.apply_flat(point, x, h);
            }
        };
        for (l, layer) in self.layers.iter().enumerate() {
            hook(HookPoint::ResidPre(l), &mut x);
            let lora = |t: Target| {
                rows.adapter
                    .and_then(|a| a.pair(l, t).map(|p| (p, a.scale)))
            };
            let attn = &layer.self_attn;
            let hn = rms_norm(&x, &CpuF32::of(&layer.input_layernorm)?, eps);
            project(
                &[
                    (&attn.q_proj, &hn, lora(Target::Q)),
                    (&attn.k_proj, &hn, lora(Target::K)),
                    (&attn.v_proj, &hn, lora(Target::V)),
                ],
                [&mut q, &mut k, &mut v],
                b,
            )?;
            rope.apply(&mut q);
            rope.apply(&mut k);
            let kt = Tensor::from_slice(&k, (b, nkv, 1, hd), &Device::Cpu)?;
            let vt = Tensor::from_slice(&v, (b, nkv, 1, hd), &Device::Cpu)?;
            let (kc, vc) = cache.append(l, &kt, &vt)?;
            let att = attend_cached(
                &q,
                &kc,
                &vc,
                any_pad.then_some(&mask[..]),
                (nkv, nh / nkv, hd),
            )?;
            project(&[(&attn.o_proj, &att, lora(Target::O))], [&mut o], b)?;
            hook(HookPoint::AttnOut(l), &mut o);
            add_into(&mut x, &o);
            hook(HookPoint::ResidMid(l), &mut x);

            let mlp = &layer.mlp;
            let hn = rms_norm(&x, &CpuF32::of(&layer.post_attention_layernorm)?, eps);
            project(
                &[
                    (&mlp.gate_proj, &hn, lora(Target::Gate)),
                    (&mlp.up_proj, &hn, lora(Target::Up)),
                ],
                [&mut gate, &mut up],
                b,
            )?;
            introspect_kernels::silu_mul(&mut gate, &up);
            project(
                &[(&mlp.down_proj, &gate, lora(Target::Down))],
                [&mut down],
                b,
            )?;
            hook(HookPoint::MlpOut(l), &mut down);
            add_into(&mut x, &down);
            hook(HookPoint::ResidPost(l), &mut x);
        }
        let mut hn = rms_norm(&x, &CpuF32::of(&self.norm)?, eps);
        hook(HookPoint::LnFinal, &mut hn);
        let mut logits = vec![0f32; b * cfg.vocab_size];
        project(&[(&self.lm_head, &hn, None)], [&mut logits], b)?;
        Ok(logits)
    }
}

/// One projection of a decode step: the frozen weight, its input rows and its LoRA pair (with scale).
type Job<'a> = (&'a Linear, &'a [f32], Option<(&'a LoraPair, f64)>);

/// `ys[j] = xs[j] W_jᵀ (+ LoRA)` for `m` rows each: the products the block and mat-vec kernels suit run
/// as one parallel pass; the rest (many rows, other GGUF types) as Candle matmuls.
fn project<const N: usize>(jobs: &[Job; N], mut ys: [&mut Vec<f32>; N], m: usize) -> Result<()> {
    let dense: Vec<Option<DenseSlice>> = jobs
        .iter()
        .map(|(lin, _, _)| match lin {
            Linear::Dense(w) if uses_kernel(lin, m) => DenseSlice::of(w).map(Some),
            _ => Ok(None),
        })
        .collect::<Result<_>>()?;
    let mut products = vec![];
    for ((&(lin, x, _), y), w) in jobs.iter().zip(ys.iter_mut()).zip(&dense) {
        let weights = match (lin, w) {
            (Linear::Blocks(q), _) if uses_kernel(lin, m) => Weights::Blocks(q),
            (Linear::Dense(t), Some(w)) => {
                let (rows, cols) = t.dims2()?;
                w.weights(rows, cols)
            }
            _ => {
                let k = x.len() / m;
                let out = lin.forward(
                    &Tensor::from_slice(x, (m, k), &Device::Cpu)?,
                    super::Kernels::Cpu,
                )?;
                y.copy_from_slice(&out.flatten_all()?.to_vec1::<f32>()?);
                continue;
            }
        };
        products.push(Product {
            weights,
            x,
            y: y.as_mut_slice(),
        });
    }
    introspect_kernels::run_products(&mut products, m);
    drop(products);
    for (&(_, x, pair), y) in jobs.iter().zip(ys) {
        if let Some((pair, scale)) = pair {
            add_lora(pair, scale as f32, x, y, m)?;
        }
    }
    Ok(())
}

/// `y += scale · (x Aᵀ) Bᵀ`, as PEFT adds an adapter.
fn add_lora(pair: &LoraPair, scale: f32, x: &[f32], y: &mut [f32], m: usize) -> Result<()> {
    let ((r, k), (n, _)) = (pair.a.dims2()?, pair.b.dims2()?);
    let mut z = vec![0f32; m * r];
    introspect_kernels::dense_matmul(&CpuF32::of(&pair.a)?, r, k, x, m, &mut z);
    let mut delta = vec![0f32; m * n];
    introspect_kernels::dense_matmul(&CpuF32::of(&pair.b)?, n, r, &z, m, &mut delta);
    for (yi, d) in y.iter_mut().zip(&delta) {
        *yi += d * scale;
    }
    Ok(())
}

/// RMSNorm of each row of x (rows of `w.len()`), as Candle's `rms_norm` computes it.
fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(w.len()) {
        let sum2: f32 = row.iter().map(|v| v * v).sum();
        let m = (sum2 / w.len() as f32 + eps).sqrt();
        out.extend(row.iter().zip(w).map(|(v, g)| v / m * g));
    }
    out
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// cos and sin of each row's position times the inverse frequencies, in f32 as transformers computes them.
struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl Rope {
    fn new(inv_freq: &Tensor, positions: &[f32]) -> Result<Self> {
        let positions = Tensor::new(positions, &Device::Cpu)?;
        let (cos, sin) = ops::rope_tables(&positions, inv_freq)?;
        Ok(Self {
            cos: cos.flatten_all()?.to_vec1()?,
            sin: sin.flatten_all()?.to_vec1()?,
            half: inv_freq.elem_count(),
        })
    }

    /// Rotates every head of x (rows × heads × 2·half) in place, the half-split layout of HF checkpoints.
    fn apply(&self, x: &mut [f32]) {
        let rows = self.cos.len() / self.half;
        let row_len = x.len() / rows;
        for (r, row) in x.chunks_mut(row_len).enumerate() {
            let cos = &self.cos[r * self.half..(r + 1) * self.half];
            let sin = &self.sin[r * self.half..(r + 1) * self.half];
            for head in row.chunks_mut(2 * self.half) {
                let (x1, x2) = head.split_at_mut(self.half);
                for i in 0..self.half {
                    let (a, b) = (x1[i], x2[i]);
                    x1[i] = a * cos[i] - b * sin[i];
                    x2[i] = a * sin[i] + b * cos[i];
                }
            }
        }
    }
}

/// One new query per row attended over the cache in place (see `introspect_kernels::decode_attention`):
/// q (b, heads·d), k/v (b, kv_heads, positions, d) views, mask (b, positions) → (b, heads·d).
fn attend_cached(
    q: &[f32],
    k: &Tensor,
    v: &Tensor,
    mask: Option<&[f32]>,
    (kv_heads, group, head_dim): (usize, usize, usize),
) -> Result<Vec<f32>> {
    let (b, _, positions, _) = k.dims4()?;
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (Storage::Cpu(kc), Storage::Cpu(vc)) = (&*ks, &*vs) else {
        bail!("decode attention runs on the CPU");
    };
    let view = |data, l: &candle_core::Layout| -> Result<KvView> {
        let st = l.stride();
        ensure!(st[3] == 1, "the cache's last dimension must be contiguous");
        Ok(KvView {
            data,
            start: l.start_offset(),
            stride_b: st[0],
            stride_h: st[1],
            stride_t: st[2],
        })
    };
    let mut out = vec![0f32; q.len()];
    introspect_kernels::decode_attention(
        q,
        view(kc.as_slice::<f32>()?, kl)?,
        view(vc.as_slice::<f32>()?, vl)?,
        mask,
        DecodeShape {
            batch: b,
            kv_heads,
            group,
            head_dim,
            positions,
        },
        1.0 / (head_dim as f32).sqrt(),
        &mut out,
    );
    Ok(out)
}
