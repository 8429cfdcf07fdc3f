//! The CPU kernels of the training pass (`train/pass.rs`): each returns None where they do not apply (the
//! generic path, or data that is not contiguous f32 in CPU memory), and the pass runs its Candle ops.

use anyhow::Result;
use candle_core::{Shape, Tensor};

use introspect_kernels::zeroed;

use super::linear::FrozenWeight;
use super::DenseSlice;
use super::Kernels;
use crate::lora::LoraPair;
use crate::model::linear::Linear;

/// Attention's layout: `b` sequences of `t` positions, `kv_heads` groups of `group` query heads of `head_dim`.
#[derive(Clone, Copy)]
pub struct AttentionDims {
    pub b: usize,
    pub t: usize,
    pub kv_heads: usize,
    pub group: usize,
    pub head_dim: usize,
}

impl AttentionDims {
    fn shape(self) -> introspect_kernels::AttentionShape {
        introspect_kernels::AttentionShape {
            batch: self.b,
            kv_heads: self.kv_heads,
            group: self.group,
            seq: self.t,
            head_dim: self.head_dim,
        }
    }
}

/// `silu(gate) · up`.
pub fn swiglu(k: Kernels, gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    let m = k.f32_slices(&[gate, up], |s| {
        introspect_kernels::swiglu_forward(s[0], s[1])
    })?;
    m.map(|m| Ok(Tensor::from_vec(m, gate.shape(), gate.device())?))
        .transpose()
}

/// A projection's rows (b·t, n·d) as heads (b, n, t, d) with `to_heads`, else heads back to rows; each
/// head's values rotated by RoPE (tables (t, d/2)) if given (before they move back).
pub fn move_heads(
    k: Kernels,
    x: &Tensor,
    (b, t, n, d): (usize, usize, usize, usize),
    rope: Option<(&Tensor, &Tensor)>,
    to_heads: bool,
) -> Result<Option<Tensor>> {
    let shape = introspect_kernels::HeadsShape {
        batch: b,
        seq: t,
        heads: n,
        dim: d,
    };
    let mut ts = vec![x];
    if let Some((cos, sin)) = rope {
        ts.extend([cos, sin]);
    }
    let moved = k.f32_slices(&ts, |s| {
        let rope = (s.len() == 3).then(|| introspect_kernels::Rope {
            cos: s[1],
            sin: s[2],
        });
        if to_heads {
            introspect_kernels::to_heads(s[0], shape, rope)
        } else {
            introspect_kernels::from_heads(s[0], shape, rope)
        }
    })?;
    let dims: Shape = if to_heads {
        (b, n, t, d).into()
    } else {
        (b * t, n * d).into()
    };
    moved
        .map(|v| Ok(Tensor::from_vec(v, dims, x.device())?))
        .transpose()
}

/// `parts[0] + parts[1] + …` (one shape), summed in that order by the kernel team.
pub fn sum(k: Kernels, parts: &[&Tensor]) -> Result<Option<Tensor>> {
    let Some(first) = parts.first() else {
        return Ok(None);
    };
    if parts.iter().any(|p| p.shape() != first.shape()) {
        return Ok(None);
    }
    let s = k.f32_slices(parts, introspect_kernels::sum_of)?;
    s.map(|s| Ok(Tensor::from_vec(s, first.shape(), first.device())?))
        .transpose()
}

/// The gradients of gate and up from that of `silu(gate) · up`.
pub fn swiglu_backward(
    k: Kernels,
    gate: &Tensor,
    up: &Tensor,
    dm: &Tensor,
) -> Result<Option<(Tensor, Tensor)>> {
    let out = k.f32_slices(&[gate, up, dm], |s| {
        introspect_kernels::swiglu_backward(s[0], s[1], s[2])
    })?;
    let Some((dg, du)) = out else { return Ok(None) };
    Ok(Some((
        Tensor::from_vec(dg, gate.shape(), gate.device())?,
        Tensor::from_vec(du, gate.shape(), gate.device())?,
    )))
}

/// RMSNorm keeping `inv` (shaped as x with a last dimension of 1) for [`rms_norm_backward`].
pub fn rms_norm_forward(
    k: Kernels,
    x: &Tensor,
    w: &Tensor,
    eps: f64,
) -> Result<Option<(Tensor, Tensor)>> {
    let out = k.f32_slices(&[x, w], |s| {
        introspect_kernels::rms_norm_forward(s[0], s[1], eps as f32)
    })?;
    let Some((y, inv)) = out else { return Ok(None) };
    let mut inv_dims = x.dims().to_vec();
    *inv_dims.last_mut().expect("x has a last dimension") = 1;
    Ok(Some((
        Tensor::from_vec(y, x.shape(), x.device())?,
        Tensor::from_vec(inv, inv_dims, x.device())?,
    )))
}

/// `residual + ∂/∂x` of [`rms_norm_forward`] given dy (the derivative alone without a residual).
pub fn rms_norm_backward(
    k: Kernels,
    x: &Tensor,
    inv: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    residual: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let mut ts = vec![x, inv, w, dy];
    ts.extend(residual);
    let out = k.f32_slices(&ts, |s| {
        introspect_kernels::rms_norm_backward(s[0], s[1], s[2], s[3], s.get(4).copied())
    })?;
    out.map(|dx| Ok(Tensor::from_vec(dx, x.shape(), x.device())?))
        .transpose()
}

/// Causal attention, one task per (sequence, kv head): `probs` (b, kv_heads, g·t, t) and `o` (b, kv_heads,
/// g·t, d).
pub fn attention_forward(
    k: Kernels,
    q: &Tensor,
    key: &Tensor,
    v: &Tensor,
    dims: AttentionDims,
    scale: f32,
) -> Result<Option<(Tensor, Tensor)>> {
    let AttentionDims {
        b,
        t,
        kv_heads,
        group,
        head_dim,
    } = dims;
    let out = k.f32_slices(&[q, key, v], |s| {
        let mut probs = zeroed(b * kv_heads * group * t * t);
        let mut o = zeroed(s[0].len());
        introspect_kernels::causal_attention_forward(
            s[0],
            s[1],
            s[2],
            dims.shape(),
            scale,
            &mut probs,
            &mut o,
        );
        (probs, o)
    })?;
    let Some((probs, o)) = out else {
        return Ok(None);
    };
    let dev = q.device();
    Ok(Some((
        Tensor::from_vec(probs, (b, kv_heads, group * t, t), dev)?,
        Tensor::from_vec(o, (b, kv_heads, group * t, head_dim), dev)?,
    )))
}

/// Backward of [`attention_forward`]: dq, dk, dv.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    k: Kernels,
    q: &Tensor,
    key: &Tensor,
    v: &Tensor,
    probs: &Tensor,
    d_o: &Tensor,
    dims: AttentionDims,
    scale: f32,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let out = k.f32_slices(&[q, key, v, probs, d_o], |s| {
        let (mut dq, mut dk, mut dv) = (zeroed(s[0].len()), zeroed(s[1].len()), zeroed(s[2].len()));
        introspect_kernels::causal_attention_backward(
            s[0],
            s[1],
            s[2],
            s[3],
            s[4],
            dims.shape(),
            scale,
            &mut dq,
            &mut dk,
            &mut dv,
        );
        (dq, dk, dv)
    })?;
    let Some((dq, dk, dv)) = out else {
        return Ok(None);
    };
    let dev = q.device();
    Ok(Some((
        Tensor::from_vec(dq, q.shape(), dev)?,
        Tensor::from_vec(dk, key.shape(), dev)?,
        Tensor::from_vec(dv, v.shape(), dev)?,
    )))
}

/// A LoRA linear's operands: the frozen projection, its pair (A (r, in), B (out, r)) and the scale.
pub struct LoraOperands<'a> {
    pub linear: &'a Linear,
    pub pair: &'a LoraPair,
    pub scale: f32,
}

/// `y = x Wᵀ + z Bᵀ` with `z = scale · x_in Aᵀ`: (y shaped `y_shape`, z (m, r), and with `keep_input` the
/// input to A as the backward reads it ([`kept_input`])).
pub fn lora_forward(
    k: Kernels,
    x: &Tensor,
    x_in: &Tensor,
    p: LoraOperands,
    y_shape: Shape,
    keep_input: bool,
) -> Result<Option<(Tensor, Tensor, Option<Tensor>)>> {
    if !k.cpu() {
        return Ok(None); // before reading the weight: the generic path never reads it here
    }
    let w = FrozenWeight::of(p.linear)?;
    let frozen = w.get();
    let (m, r) = (x.elem_count() / frozen.inp, p.pair.a.dim(0)?);
    let res = k.f32_slices(&[x, x_in, &p.pair.a, &p.pair.b], |s| {
        let mut z = zeroed(m * r);
        let pair = introspect_kernels::LoraPair {
            a: s[2],
            b: s[3],
            r,
            scale: p.scale,
        };
        let y = introspect_kernels::lora_forward(s[0], s[1], m, frozen, pair, &mut z);
        let kept = keep_input.then(|| introspect_kernels::lora_input_kept(s[1], frozen));
        (y, z, kept)
    })?;
    let Some((y, z, kept)) = res else {
        return Ok(None);
    };
    Ok(Some((
        Tensor::from_vec(y, y_shape, x.device())?,
        Tensor::from_vec(z, (m, r), x.device())?,
        kept.map(|v| kept_input(x_in, v)).transpose()?,
    )))
}

/// The input to A as the backward reads it: rounded to bf16 where the projection's LoRA products are bf16
/// (the same gradients from half the memory), else x_in itself.
fn kept_input(x_in: &Tensor, rounded: Option<Vec<half::bf16>>) -> Result<Tensor> {
    Ok(match rounded {
        Some(v) => Tensor::from_vec(v, x_in.shape(), x_in.device())?,
        None => x_in.clone(),
    })
}

/// [`lora_forward`] of the projections that read x without dropout (q, k, v; gate, up), x rounded once for
/// all: (y, z) of each, y shaped as x with the projection's width last, and x as their backward reads it.
#[allow(clippy::type_complexity)]
pub fn lora_forward_shared(
    k: Kernels,
    x: &Tensor,
    projections: &[LoraOperands],
) -> Result<Option<(Vec<(Tensor, Tensor)>, Tensor)>> {
    if !k.cpu() {
        return Ok(None);
    }
    let ws = projections
        .iter()
        .map(|p| FrozenWeight::of(p.linear))
        .collect::<Result<Vec<_>>>()?;
    let Some(first) = ws.first().map(|w| w.get()) else {
        return Ok(None);
    };
    let (m, inp) = (x.elem_count() / first.inp, first.inp);
    let mut ts = vec![x];
    for p in projections {
        ts.extend([&p.pair.a, &p.pair.b]);
    }
    let res = k.f32_slices(&ts, |s| {
        let members: Vec<_> = ws
            .iter()
            .zip(projections)
            .zip(s[1..].chunks_exact(2))
            .map(|((w, p), ab)| {
                let pair = introspect_kernels::LoraPair {
                    a: ab[0],
                    b: ab[1],
                    r: ab[0].len() / inp,
                    scale: p.scale,
                };
                (w.get(), pair)
            })
            .collect();
        let yz = introspect_kernels::lora_forward_shared(s[0], m, &members);
        (yz, introspect_kernels::lora_input_kept(s[0], first))
    })?;
    let Some((res, kept)) = res else {
        return Ok(None);
    };
    let dev = x.device();
    let out = res
        .into_iter()
        .zip(&ws)
        .map(|((y, z), w)| {
            let mut dims = x.dims().to_vec();
            *dims.last_mut().expect("x has a last dimension") = w.get().out;
            let r = z.len() / m.max(1);
            Ok((
                Tensor::from_vec(y, dims, dev)?,
                Tensor::from_vec(z, (m, r), dev)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some((out, kept_input(x, kept)?)))
}

/// Backward of [`lora_forward_shared`] from each projection's (dy, operands, z): the sum of their input
/// gradients if `need_dx`, and (dA, dB) of each.
#[allow(clippy::type_complexity)]
pub fn lora_backward_shared(
    k: Kernels,
    x: &Tensor,
    projections: &[(&Tensor, LoraOperands, &Tensor)],
    need_dx: bool,
) -> Result<Option<(Option<Tensor>, Vec<(Tensor, Tensor)>)>> {
    if !k.cpu() {
        return Ok(None);
    }
    let ws = projections
        .iter()
        .map(|(_, p, _)| FrozenWeight::of(p.linear))
        .collect::<Result<Vec<_>>>()?;
    let Some(inp) = ws.first().map(|w| w.get().inp) else {
        return Ok(None);
    };
    let m = x.elem_count() / inp;
    let x_in = DenseSlice::of(x)?;
    let mut ts = Vec::new();
    for (dy, p, z) in projections {
        ts.extend([*dy, &p.pair.a, &p.pair.b, *z]);
    }
    let res = k.f32_slices(&ts, |s| {
        let mut grads: Vec<(Vec<f32>, Vec<f32>)> = ws
            .iter()
            .zip(s.chunks_exact(4))
            .map(|(w, v)| {
                let (f, r) = (w.get(), v[1].len() / inp);
                (zeroed(r * f.inp), zeroed(f.out * r))
            })
            .collect();
        let members = ws
            .iter()
            .zip(projections)
            .zip(s.chunks_exact(4))
            .zip(&mut grads)
            .map(
                |(((w, (_, p, _)), v), (da, db))| introspect_kernels::SharedGrads {
                    dy: v[0],
                    w: w.get(),
                    pair: introspect_kernels::LoraPair {
                        a: v[1],
                        b: v[2],
                        r: v[1].len() / inp,
                        scale: p.scale,
                    },
                    z: v[3],
                    da,
                    db,
                },
            )
            .collect();
        let dx = introspect_kernels::lora_backward_shared(x_in.elements(), m, members, need_dx);
        (dx, grads)
    })?;
    let Some((dx, grads)) = res else {
        return Ok(None);
    };
    let dev = x.device();
    let grads = grads
        .into_iter()
        .zip(&ws)
        .map(|((da, db), w)| {
            let r = db.len() / w.get().out;
            Ok((
                Tensor::from_vec(da, (r, inp), dev)?,
                Tensor::from_vec(db, (w.get().out, r), dev)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let dx = dx.map(|d| Tensor::from_vec(d, (m, inp), dev)).transpose()?;
    Ok(Some((dx, grads)))
}

/// What [`lora_forward`] kept: the input to A, z, and dropout's scaled keep-mask if any.
pub struct LoraKept<'a> {
    pub x_in: &'a Tensor,
    pub z: &'a Tensor,
    pub keep: Option<&'a Tensor>,
}

/// Backward of [`lora_forward`]: (dx if `need_dx`, dA, dB).
pub fn lora_backward(
    k: Kernels,
    dy: &Tensor,
    p: LoraOperands,
    kept: LoraKept,
    need_dx: bool,
) -> Result<Option<(Option<Tensor>, Tensor, Tensor)>> {
    if !k.cpu() {
        return Ok(None);
    }
    let w = FrozenWeight::of(p.linear)?;
    let frozen = w.get();
    let (out, inp) = (frozen.out, frozen.inp);
    let (m, r) = (dy.elem_count() / out, p.pair.a.dim(0)?);
    let mut ts = vec![dy, &p.pair.a, &p.pair.b, kept.z];
    ts.extend(kept.keep);
    let x_in = DenseSlice::of(kept.x_in)?;
    let res = k.f32_slices(&ts, |v| {
        let (mut da, mut db) = (zeroed(r * inp), zeroed(out * r));
        let g = introspect_kernels::LoraGrads {
            pair: introspect_kernels::LoraPair {
                a: v[1],
                b: v[2],
                r,
                scale: p.scale,
            },
            x_in: x_in.elements(),
            z: v[3],
            keep: v.get(4).copied(),
            da: &mut da,
            db: &mut db,
        };
        let dx = introspect_kernels::lora_backward(v[0], m, frozen, need_dx, g);
        (dx, da, db)
    })?;
    let Some((dx, da, db)) = res else {
        return Ok(None);
    };
    let dev = dy.device();
    Ok(Some((
        dx.map(|d| Tensor::from_vec(d, (m, inp), dev)).transpose()?,
        Tensor::from_vec(da, (r, inp), dev)?,
        Tensor::from_vec(db, (out, r), dev)?,
    )))
}
