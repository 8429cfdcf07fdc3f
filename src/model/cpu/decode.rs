//! The in-place decode step on the CPU: one new token per row, on plain f32 buffers.
//!
//! Through [`Llama::forward`] a decode step is ~750 small tensor ops, whose allocations and thread hand-offs
//! cost as much as the arithmetic at batch 1. [`Llama::decode_logits`] is the same math on flat buffers
//! (tests/decode.rs checks it against `forward`); the projections that share an input — q/k/v, gate/up —
//! run as one parallel pass.

use anyhow::{bail, ensure, Result};
use candle_core::{Device, Storage, Tensor};
use introspect_kernels::{DecodeShape, KvView, Operand, Product, Weights};

use super::linear::uses_kernel;
use super::{CpuF32, DenseSlice};
use crate::lora::{Adapter, LoraPair, RowGroups, Target};
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
        let groups = rows.adapters.groups(b);
        for (l, layer) in self.layers.iter().enumerate() {
            hook(HookPoint::ResidPre(l), &mut x);
            let lora = Some(StepLora {
                groups: &groups,
                layer: l,
            });
            let attn = &layer.self_attn;
            let hn = rms_norm(&x, &CpuF32::of(&layer.input_layernorm)?, eps);
            project(
                &[
                    (&attn.q_proj, &hn, Some(Target::Q)),
                    (&attn.k_proj, &hn, Some(Target::K)),
                    (&attn.v_proj, &hn, Some(Target::V)),
                ],
                [&mut q, &mut k, &mut v],
                b,
                lora,
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
            project(&[(&attn.o_proj, &att, Some(Target::O))], [&mut o], b, lora)?;
            hook(HookPoint::AttnOut(l), &mut o);
            add_into(&mut x, &o);
            hook(HookPoint::ResidMid(l), &mut x);

            let mlp = &layer.mlp;
            let hn = rms_norm(&x, &CpuF32::of(&layer.post_attention_layernorm)?, eps);
            project(
                &[
                    (&mlp.gate_proj, &hn, Some(Target::Gate)),
                    (&mlp.up_proj, &hn, Some(Target::Up)),
                ],
                [&mut gate, &mut up],
                b,
                lora,
            )?;
            introspect_kernels::silu_mul(&mut gate, &up);
            project(
                &[(&mlp.down_proj, &gate, Some(Target::Down))],
                [&mut down],
                b,
                lora,
            )?;
            hook(HookPoint::MlpOut(l), &mut down);
            add_into(&mut x, &down);
            hook(HookPoint::ResidPost(l), &mut x);
        }
        let mut hn = rms_norm(&x, &CpuF32::of(&self.norm)?, eps);
        hook(HookPoint::LnFinal, &mut hn);
        let mut logits = vec![0f32; b * cfg.vocab_size];
        project(&[(&self.lm_head, &hn, None)], [&mut logits], b, None)?;
        Ok(logits)
    }
}

/// One projection of a decode step: the frozen weight, its input rows and the projection an adapter may
/// adapt (None: the head).
type Job<'a> = (&'a Linear, &'a [f32], Option<Target>);

/// The rows' adapters at one layer of a decode step.
#[derive(Clone, Copy)]
struct StepLora<'a> {
    groups: &'a RowGroups<'a>,
    layer: usize,
}

/// `ys[j] = xs[j] W_jᵀ (+ each row's LoRA)` for `m` rows each: the products the block and mat-vec kernels
/// suit run as one parallel pass; the rest (many rows, other GGUF types) as Candle matmuls.
fn project<const N: usize>(
    jobs: &[Job; N],
    mut ys: [&mut Vec<f32>; N],
    m: usize,
    lora: Option<StepLora>,
) -> Result<()> {
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
    match lora {
        Some(lora) => add_lora(jobs, ys, m, lora),
        None => Ok(()),
    }
}

/// Up to this many rows, an adapter's products in a decode step read its weights directly (the dense
/// kernels); more rows go to the GEMM, whose packing of A and B then pays for itself.
const FEW_ROWS: usize = 16;

/// What one adapter adds to one projection of some rows: its pair, those rows' inputs and how many.
struct LoraPart<'p> {
    job: usize,
    pair: &'p LoraPair,
    scale: f32,
    rows: Option<&'p [usize]>,
    input: LoraInput<'p>,
    m: usize,
}

/// A part's input rows: the projection's whole input, or one of the gathered copies.
enum LoraInput<'p> {
    All(&'p [f32]),
    Gathered(usize),
}

/// `y += scale · (x Aᵀ) Bᵀ` on each row with its adapter's pair, as PEFT adds an adapter. Rows of several
/// adapters are gathered by adapter (the idea of Punica's BGMV: each adapter's rank-r products over its
/// own rows), and the products of the call — each projection's, each adapter's — run as tasks across the
/// team, each two GEMMs on its thread; with fewer of them than threads, each product uses every thread.
fn add_lora<const N: usize>(
    jobs: &[Job; N],
    mut ys: [&mut Vec<f32>; N],
    m: usize,
    lora: StepLora,
) -> Result<()> {
    let sets: Vec<(&Adapter, Option<&[usize]>)> = match lora.groups {
        RowGroups::Base => return Ok(()),
        RowGroups::Whole(a) => vec![(*a, None)],
        RowGroups::Mixed(groups) => groups
            .iter()
            .map(|g| (g.adapter, Some(g.rows.as_slice())))
            .collect(),
    };
    // Each group's rows of each distinct input, gathered once (q, k and v read one input; gate and up too).
    let mut gathered: Vec<(*const f32, usize, Vec<f32>)> = vec![];
    let mut parts = vec![];
    for (job, &(_, x, target)) in jobs.iter().enumerate() {
        let Some(target) = target else { continue };
        let k = x.len() / m;
        for (g, &(adapter, rows)) in sets.iter().enumerate() {
            let Some(pair) = adapter.pair(lora.layer, target) else {
                continue;
            };
            let input = match rows {
                None => LoraInput::All(x),
                Some(rows) => {
                    let at = gathered
                        .iter()
                        .position(|(p, group, _)| *p == x.as_ptr() && *group == g);
                    LoraInput::Gathered(at.unwrap_or_else(|| {
                        let v = rows
                            .iter()
                            .flat_map(|&r| &x[r * k..(r + 1) * k])
                            .copied()
                            .collect();
                        gathered.push((x.as_ptr(), g, v));
                        gathered.len() - 1
                    }))
                }
            };
            parts.push(LoraPart {
                job,
                pair,
                scale: adapter.scale as f32,
                rows,
                input,
                m: rows.map_or(m, <[usize]>::len),
            });
        }
    }
    let gathered: Vec<Vec<f32>> = gathered.into_iter().map(|(_, _, v)| v).collect();
    let weights: Vec<(CpuF32, CpuF32)> = parts
        .iter()
        .map(|p| Ok((CpuF32::of(&p.pair.a)?, CpuF32::of(&p.pair.b)?)))
        .collect::<Result<_>>()?;
    // z = scale · x Aᵀ (m × r), then z Bᵀ (m × n): into `out`, accumulated when asked (only on every
    // thread, with `serial` false).
    let product = |i: usize, out: &mut [f32], accumulate: bool, serial: bool| {
        let (p, (a, b)) = (&parts[i], &weights[i]);
        let r = p.pair.a.dims()[0];
        let (k, n) = (a.len() / r, b.len() / r);
        let x = match p.input {
            LoraInput::All(x) => x,
            LoraInput::Gathered(i) => &gathered[i],
        };
        let mut z = vec![0f32; p.m * r];
        // A few rows inside a team task (never accumulated): one pass over A and B, without a GEMM's
        // packing of them.
        if serial && p.m <= FEW_ROWS {
            introspect_kernels::dense_matmul_serial(a, r, k, x, p.m, &mut z);
            z.iter_mut().for_each(|v| *v *= p.scale);
            introspect_kernels::dense_matmul_serial(b, n, r, &z, p.m, out);
            return;
        }
        let matmul = if serial {
            introspect_kernels::matmul_serial
        } else {
            introspect_kernels::matmul
        };
        matmul(
            &mut z,
            Operand::new(x, p.m, k),
            Operand::t(a, r, k),
            p.scale,
            false,
        );
        matmul(
            out,
            Operand::new(&z, p.m, r),
            Operand::t(b, n, r),
            1.0,
            accumulate,
        );
    };
    let scatter = |y: &mut [f32], rows: &[usize], delta: &[f32]| {
        let n = delta.len() / rows.len();
        for (i, &r) in rows.iter().enumerate() {
            add_into(&mut y[r * n..(r + 1) * n], &delta[i * n..(i + 1) * n]);
        }
    };
    let team = introspect_kernels::Team::global();
    if parts.len() < team.threads() {
        // Few products: one at a time, each on every thread, an adapter on all rows straight into y.
        for (i, p) in parts.iter().enumerate() {
            let y = &mut ys[p.job];
            match p.rows {
                None => product(i, y, true, false),
                Some(rows) => {
                    let mut delta = vec![0f32; p.m * (y.len() / m)];
                    product(i, &mut delta, false, false);
                    scatter(y, rows, &delta);
                }
            }
        }
        return Ok(());
    }
    let deltas: Vec<std::sync::Mutex<Vec<f32>>> = parts
        .iter()
        .map(|p| std::sync::Mutex::new(vec![0f32; p.m * (ys[p.job].len() / m)]))
        .collect();
    team.run(parts.len(), &|i| {
        let mut d = deltas[i].lock().unwrap_or_else(|e| e.into_inner());
        product(i, &mut d, false, true);
    });
    for (p, delta) in parts.iter().zip(deltas) {
        let delta = delta.into_inner().unwrap_or_else(|e| e.into_inner());
        match p.rows {
            None => add_into(ys[p.job], &delta),
            Some(rows) => scatter(ys[p.job], rows, &delta),
        }
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
