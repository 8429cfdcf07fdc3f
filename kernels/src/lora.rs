//! A LoRA linear for training, `y = x Wᵀ + s·(x' Aᵀ) Bᵀ`, forward and backward on flat row-major buffers,
//! with every product a direct call to the `gemm` crate (the GEMM Candle itself uses) that accumulates
//! into its destination.
//!
//! Why not Candle's ops: composed from `matmul` and `+`, each of a projection's six rank-r products
//! allocates, fills and then adds a full-width (rows × out) or (rows × in) temporary, and the rank-r
//! products with K = r spend most of their time in those passes over memory. Here `z Bᵀ` is accumulated
//! straight into `y`, and `dz A` straight into `dx`: one write of each wide result.
//!
//! Shapes: x, x' (m × in), W (out × in), A (r × in), B (out × r), y (m × out), z = s·x' Aᵀ (m × r).
//! x' is x after dropout (x itself without it); `keep` is the dropout mask with its 1/(1−p) scale.
//!
//! Where W takes bf16 products (bf16 weights) on a CPU that has them (avx512_bf16, AMX), the four products
//! whose left operand is by rows — x'Aᵀ, zBᵀ, dy·B, dz·A — are bf16 × bf16 → f32 too, as under PyTorch's
//! bf16 autocast, and x (dy) is rounded once for W's product and A's (B's): on AMX the step ran ~15%
//! faster. On AMX zBᵀ is summed with x Wᵀ, and dz·A with dy W (without dropout), in the tiles before one
//! store ([`crate::matmul_sum`]): alone, with k = r, each was a pass over y (dx) for one step of
//! products. Where bf16 products are emulated they would only add rounding passes, so LoRA stays f32 there.
//! The gradients' own products, dA = dzᵀx' and dB = dyᵀz (as dBᵀ = zᵀdy), are bf16 there too, their
//! small r × m left operands transposed by rows, x' and dy rounded as they are packed.
//!
//! Projections that read one input without dropout (q, k, v; gate, up) run together
//! ([`lora_forward_shared`], [`lora_backward_shared`]): the input rounded once, packed once for all their
//! dA, and their input gradients summed in the tiles — the bf16 step ~1.24 → ~1.19 s on AMX.

use crate::bf16_gemm::{product_sum, Bf16Operand, Bf16Rows, Elements};
use crate::frozen::Frozen;
use crate::matmul::{matmul, Operand};
use crate::team::zeroed;

/// The adapter of one projection: A (r × in), B (out × r) and the scale alpha/r.
#[derive(Clone, Copy)]
pub struct LoraPair<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub r: usize,
    pub scale: f32,
}

/// Forward: `y = x Wᵀ + z Bᵀ` (returned, m × out) with `z = s·x' Aᵀ`, which the backward needs and is
/// written to `z`.
pub fn lora_forward(
    x: &[f32],
    x_in: &[f32],
    m: usize,
    w: Frozen,
    p: LoraPair,
    z: &mut [f32],
) -> Vec<f32> {
    let (k, out) = (w.inp, w.out);
    if bf16_lora(w) {
        return lora_forward_bf16(x, x_in, m, w, p, z);
    }
    let mut y = zeroed(m * out);
    w.forward(x, m, &mut y);
    matmul(
        z,
        Operand::new(x_in, m, k),
        Operand::t(p.a, p.r, k),
        p.scale,
        false,
    );
    matmul(
        &mut y,
        Operand::new(z, m, p.r),
        Operand::t(p.b, out, p.r),
        1.0,
        true,
    );
    y
}

/// Whether this projection's LoRA products are bf16 (see the module's note).
fn bf16_lora(w: Frozen) -> bool {
    w.bf16_products() && crate::bf16_products_native()
}

/// [`lora_forward`] with bf16 products (see the module's note).
fn lora_forward_bf16(
    x: &[f32],
    x_in: &[f32],
    m: usize,
    w: Frozen,
    p: LoraPair,
    z: &mut [f32],
) -> Vec<f32> {
    let x_rows = Bf16Rows::new(x, m, w.inp);
    // Without dropout x' is x itself (the same buffer): its rows are already rounded.
    if std::ptr::eq(x, x_in) {
        forward_on_rows(&x_rows, &x_rows, w, p, z)
    } else {
        forward_on_rows(&x_rows, &Bf16Rows::new(x_in, m, w.inp), w, p, z)
    }
}

/// `y = x Wᵀ + z Bᵀ` with `z = s·x' Aᵀ` on x and x' already rounded: y in one pass over it.
fn forward_on_rows(
    x_rows: &Bf16Rows,
    x_in_rows: &Bf16Rows,
    w: Frozen,
    p: LoraPair,
    z: &mut [f32],
) -> Vec<f32> {
    x_in_rows.matmul(z, Bf16Operand::f32(p.a, w.inp, p.r, true), false);
    z.iter_mut().for_each(|v| *v *= p.scale);
    let b_t = Bf16Operand::f32(p.b, p.r, w.out, true);
    let z_rows = Bf16Rows::new(z, x_rows.rows(), p.r);
    product_sum(&[(x_rows, w.transposed()), (&z_rows, b_t)])
}

/// [`lora_forward`] of each projection that reads x without dropout (q, k and v read the first norm's
/// output; gate and up the second's): `(y, z)` of each, x rounded once for all of them.
pub fn lora_forward_shared(
    x: &[f32],
    m: usize,
    projections: &[(Frozen, LoraPair)],
) -> Vec<(Vec<f32>, Vec<f32>)> {
    let bf16 = projections.iter().all(|(w, _)| bf16_lora(*w));
    let x_rows = match projections.first() {
        Some((w, _)) if bf16 => Some(Bf16Rows::new(x, m, w.inp)),
        _ => None,
    };
    projections
        .iter()
        .map(|&(w, p)| {
            let mut z = zeroed(m * p.r);
            let y = match &x_rows {
                Some(rows) => forward_on_rows(rows, rows, w, p, &mut z),
                None => lora_forward(x, x, m, w, p, &mut z),
            };
            (y, z)
        })
        .collect()
}

/// v (rows × cols, row-major) transposed: the rank-r operands (m × r) as r rows of m. Sixteen rows at a
/// time, so each write is a whole cache line and the reads stay in L1.
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; v.len()];
    for i0 in (0..rows).step_by(16) {
        let block = &v[i0 * cols..(i0 + 16).min(rows) * cols];
        for j in 0..cols {
            let dst = &mut t[j * rows + i0..][..block.len() / cols];
            for (d, row) in dst.iter_mut().zip(block.chunks_exact(cols)) {
                *d = row[j];
            }
        }
    }
    t
}

/// What the backward of one adapted projection reads (kept by the forward) and writes.
pub struct LoraGrads<'a> {
    pub pair: LoraPair<'a>,
    /// f32, or rounded to bf16 where the products are bf16 ([`lora_input_kept`]).
    pub x_in: Elements<'a>,
    pub z: &'a [f32],
    pub keep: Option<&'a [f32]>,
    /// (r × in)
    pub da: &'a mut [f32],
    /// (out × r)
    pub db: &'a mut [f32],
}

/// Backward: `dx = dy W + (dz A)·keep` with `dz = s·dy B` (returned with `need_dx`), `dA = dzᵀ x'`,
/// `dB = dyᵀ z`. The frozen W gets no gradient.
pub fn lora_backward(
    dy: &[f32],
    m: usize,
    w: Frozen,
    need_dx: bool,
    g: LoraGrads,
) -> Option<Vec<f32>> {
    let (k, out) = (w.inp, w.out);
    let p = g.pair;
    if bf16_lora(w) {
        let Some(keep) = g.keep else {
            let one = SharedGrads {
                dy,
                w,
                pair: p,
                z: g.z,
                da: g.da,
                db: g.db,
            };
            return lora_backward_shared(g.x_in, m, vec![one], need_dx);
        };
        let dy_rows = Bf16Rows::new(dy, m, out);
        let dz = dz_bf16(&dy_rows, p);
        grads_bf16(&dz, g.x_in, (dy, g.z, p.r), (g.da, g.db));
        if !need_dx {
            return None;
        }
        // Dropout sits between x and A, so its mask scales dz·A only.
        let mut dx = product_sum(&[(&dy_rows, w.as_stored())]);
        let a = Bf16Operand::f32(p.a, p.r, k, false);
        let dxl = product_sum(&[(&Bf16Rows::new(&dz, m, p.r), a)]);
        add_masked(&mut dx, &dxl, keep);
        return Some(dx);
    }
    let dy_op = Operand::new(dy, m, out);
    let mut dz = vec![0f32; m * p.r];
    matmul(&mut dz, dy_op, Operand::new(p.b, out, p.r), p.scale, false);
    matmul(
        g.db,
        Operand::t(dy, m, out),
        Operand::new(g.z, m, p.r),
        1.0,
        false,
    );
    matmul(
        g.da,
        Operand::t(&dz, m, p.r),
        Operand::new(&widened(g.x_in), m, k),
        1.0,
        false,
    );
    if !need_dx {
        return None;
    }
    let mut dx = zeroed(m * k);
    w.backward(dy, m, &mut dx, false);
    let dz_a = |dst: &mut [f32], accumulate: bool| {
        matmul(
            dst,
            Operand::new(&dz, m, p.r),
            Operand::new(p.a, p.r, k),
            1.0,
            accumulate,
        )
    };
    match g.keep {
        None => dz_a(&mut dx, true),
        Some(keep) => {
            let mut dxl = vec![0f32; m * k];
            dz_a(&mut dxl, false);
            add_masked(&mut dx, &dxl, keep);
        }
    }
    Some(dx)
}

/// The input to A as the backward will read it, to keep from the forward: rounded to bf16 where this
/// projection's LoRA products are bf16 (its dA product rounds x' just so: the same gradients from half the
/// memory), else None (keep the f32).
pub fn lora_input_kept(x_in: &[f32], w: Frozen) -> Option<Vec<half::bf16>> {
    #[cfg(target_arch = "x86_64")]
    if bf16_lora(w) {
        return Some(crate::bf16_gemm::round_slice(x_in));
    }
    let _ = (x_in, w);
    None
}

/// Kept elements as f32 (the f32 products' operand).
fn widened(e: Elements) -> std::borrow::Cow<[f32]> {
    match e {
        Elements::F32(v) => v.into(),
        Elements::Bf16(v) => {
            let mut out = vec![0f32; v.len()];
            crate::bf16_to_f32(v, &mut out);
            out.into()
        }
    }
}

/// `dx += dxl · keep`.
fn add_masked(dx: &mut [f32], dxl: &[f32], keep: &[f32]) {
    for ((d, l), kp) in dx.iter_mut().zip(dxl).zip(keep) {
        *d += l * kp;
    }
}

/// `dz = s·dy B` (m × r) on dy already rounded.
fn dz_bf16(dy_rows: &Bf16Rows, p: LoraPair) -> Vec<f32> {
    let out = p.b.len() / p.r;
    let mut dz = zeroed(dy_rows.rows() * p.r);
    dy_rows.matmul(&mut dz, Bf16Operand::f32(p.b, out, p.r, false), false);
    dz.iter_mut().for_each(|v| *v *= p.scale);
    dz
}

/// The gradients' products with k = m as bf16 products, their small left operands transposed by rows:
/// `dBᵀ = zᵀ dy` (then transposed into dB) and `dA = dzᵀ x'`.
fn grads_bf16(
    dz: &[f32],
    x_in: Elements,
    (dy, z, r): (&[f32], &[f32], usize),
    (da, db): (&mut [f32], &mut [f32]),
) {
    let m = z.len() / r;
    db_bf16(z, dy, r, db);
    let x_b = Bf16Operand {
        elems: x_in,
        rows: m,
        cols: x_in.len() / m,
        transposed: false,
    };
    Bf16Rows::new(&transpose(dz, m, r), r, m).matmul(da, x_b, false);
}

/// `dB = dyᵀ z` as `dBᵀ = zᵀ dy` (bf16 products), transposed into db (out × r).
fn db_bf16(z: &[f32], dy: &[f32], r: usize, db: &mut [f32]) {
    let m = z.len() / r;
    let out = dy.len() / m;
    let dy_b = Bf16Operand::f32(dy, m, out, false);
    let db_t = product_sum(&[(&Bf16Rows::new(&transpose(z, m, r), r, m), dy_b)]);
    db.copy_from_slice(&transpose(&db_t, r, out));
}

/// The backward of one projection among those that read one input without dropout
/// ([`lora_forward_shared`]): what it reads and where its gradients go.
pub struct SharedGrads<'a> {
    pub dy: &'a [f32],
    pub w: Frozen<'a>,
    pub pair: LoraPair<'a>,
    pub z: &'a [f32],
    /// (r × in)
    pub da: &'a mut [f32],
    /// (out × r)
    pub db: &'a mut [f32],
}

/// [`lora_backward`] of the projections that read x (x' = x) in [`lora_forward_shared`], and the sum of
/// their input gradients (with `need_dx`). With bf16 products x is packed once for all their dA (one
/// product, the dz's stacked), and dx = Σ (dy W + dz A) is summed in the tiles before one store, where
/// each projection's dx and then their sum had been three passes over memory.
pub fn lora_backward_shared(
    x: Elements,
    m: usize,
    mut projections: Vec<SharedGrads>,
    need_dx: bool,
) -> Option<Vec<f32>> {
    let k = projections.first()?.w.inp;
    if !projections.iter().all(|g| bf16_lora(g.w)) {
        let dxs: Vec<Vec<f32>> = projections
            .into_iter()
            .filter_map(|g| {
                let grads = LoraGrads {
                    pair: g.pair,
                    x_in: x,
                    z: g.z,
                    keep: None,
                    da: g.da,
                    db: g.db,
                };
                lora_backward(g.dy, m, g.w, need_dx, grads)
            })
            .collect();
        return need_dx.then(|| crate::sum_of(&dxs.iter().map(Vec::as_slice).collect::<Vec<_>>()));
    }
    let dy_rows: Vec<Bf16Rows> = projections
        .iter()
        .map(|g| Bf16Rows::new(g.dy, m, g.w.out))
        .collect();
    let dzs: Vec<Vec<f32>> = projections
        .iter()
        .zip(&dy_rows)
        .map(|(g, rows)| dz_bf16(rows, g.pair))
        .collect();
    // Every dA in one product with x: the dz's transposed and stacked.
    let rank: usize = projections.iter().map(|g| g.pair.r).sum();
    let mut dz_t = Vec::with_capacity(rank * m);
    for (g, dz) in projections.iter().zip(&dzs) {
        dz_t.extend_from_slice(&transpose(dz, m, g.pair.r));
    }
    let x_b = Bf16Operand {
        elems: x,
        rows: m,
        cols: k,
        transposed: false,
    };
    let da = product_sum(&[(&Bf16Rows::new(&dz_t, rank, m), x_b)]);
    let mut das = da.chunks_exact(k);
    for g in projections.iter_mut() {
        for (dst, src) in g.da.chunks_exact_mut(k).zip(das.by_ref().take(g.pair.r)) {
            dst.copy_from_slice(src);
        }
        db_bf16(g.z, g.dy, g.pair.r, g.db);
    }
    if !need_dx {
        return None;
    }
    let dz_rows: Vec<Bf16Rows> = dzs
        .iter()
        .zip(&projections)
        .map(|(dz, g)| Bf16Rows::new(dz, m, g.pair.r))
        .collect();
    let mut terms = Vec::with_capacity(2 * projections.len());
    for ((g, dy), dz) in projections.iter().zip(&dy_rows).zip(&dz_rows) {
        terms.push((dy, g.w.as_stored()));
        terms.push((dz, Bf16Operand::f32(g.pair.a, g.pair.r, k, false)));
    }
    Some(product_sum(&terms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Elements;

    use crate::matmul::tests::{fill, max_diff as close, naive};

    #[test]
    fn transpose_moves_every_element() {
        for (rows, cols) in [(1, 1), (70, 8), (16, 3), (33, 17)] {
            let v: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let t = transpose(&v, rows, cols);
            for i in 0..rows {
                for j in 0..cols {
                    assert_eq!(t[j * rows + i], v[i * cols + j], "{rows}×{cols} ({i}, {j})");
                }
            }
        }
    }

    /// The fused forward and backward against the unfused composition of naive products.
    #[test]
    fn lora_linear_matches_the_unfused_composition() {
        let (m, inp, out, r, s) = (9, 12, 10, 4, 2.0f32);
        let (x, w, a, b, dy) = (
            fill(m * inp, 3),
            fill(out * inp, 4),
            fill(r * inp, 5),
            fill(out * r, 6),
            fill(m * out, 7),
        );
        let keep: Vec<f32> = (0..m * inp)
            .map(|i| if i % 3 == 0 { 0.0 } else { 1.5 })
            .collect();
        let x_in: Vec<f32> = x.iter().zip(&keep).map(|(v, k)| v * k).collect();
        let pair = LoraPair {
            a: &a,
            b: &b,
            r,
            scale: s,
        };

        let mut z = vec![0f32; m * r];
        let frozen = Frozen {
            w: crate::Elements::F32(&w),
            out,
            inp,
        };
        let y = lora_forward(&x, &x_in, m, frozen, pair, &mut z);
        let z_ref: Vec<f32> = naive(Operand::new(&x_in, m, inp), Operand::t(&a, r, inp))
            .iter()
            .map(|v| v * s)
            .collect();
        let xw = naive(Operand::new(&x, m, inp), Operand::t(&w, out, inp));
        let zb = naive(Operand::new(&z_ref, m, r), Operand::t(&b, out, r));
        let y_ref: Vec<f32> = xw.iter().zip(&zb).map(|(p, q)| p + q).collect();
        assert!(close(&z, &z_ref) < 1e-5);
        assert!(close(&y, &y_ref) < 1e-5);

        let (mut da, mut db) = (vec![0f32; r * inp], vec![0f32; out * r]);
        let grads = LoraGrads {
            pair,
            x_in: Elements::F32(&x_in),
            z: &z,
            keep: Some(&keep),
            da: &mut da,
            db: &mut db,
        };
        let dx = lora_backward(&dy, m, frozen, true, grads).expect("dx asked for");
        let dz: Vec<f32> = naive(Operand::new(&dy, m, out), Operand::new(&b, out, r))
            .iter()
            .map(|v| v * s)
            .collect();
        let dzl = naive(Operand::new(&dz, m, r), Operand::new(&a, r, inp));
        let dyw = naive(Operand::new(&dy, m, out), Operand::new(&w, out, inp));
        let dx_ref: Vec<f32> = dyw
            .iter()
            .zip(&dzl)
            .zip(&keep)
            .map(|((p, q), k)| p + q * k)
            .collect();
        let da_ref = naive(Operand::t(&dz, m, r), Operand::new(&x_in, m, inp));
        let db_ref = naive(Operand::t(&dy, m, out), Operand::new(&z_ref, m, r));
        assert!(close(&dx, &dx_ref) < 1e-4);
        assert!(close(&da, &da_ref) < 1e-4);
        assert!(close(&db, &db_ref) < 1e-4);
    }

    /// With bf16 weights on a CPU with bf16 products the four by-rows products are bf16 × bf16 → f32: against the composition of the
    /// rounded-operand reference (`naive_bf16`) — with and without dropout (without it x' is x's own
    /// buffer, rounded once for W and A).
    #[test]
    fn bf16_weights_take_bf16_lora_products() {
        use crate::bf16_gemm::tests::naive_bf16;
        if !crate::bf16_products_native() {
            eprintln!(
                "this CPU has no avx512_bf16: LoRA products stay f32 (the f32 test covers them)"
            );
            return;
        }
        use half::bf16;
        let (m, inp, out, r, s) = (70, 96, 80, 8, 2.0f32);
        let (x, w, a, b, dy) = (
            fill(m * inp, 13),
            fill(out * inp, 14),
            fill(r * inp, 15),
            fill(out * r, 16),
            fill(m * out, 17),
        );
        let w16: Vec<bf16> = w.iter().map(|v| bf16::from_f32(*v)).collect();
        let frozen = Frozen {
            w: Elements::Bf16(&w16),
            out,
            inp,
        };
        let pair = LoraPair {
            a: &a,
            b: &b,
            r,
            scale: s,
        };
        let w_t = Bf16Operand {
            elems: Elements::Bf16(&w16),
            rows: inp,
            cols: out,
            transposed: true,
        };
        let w_op = Bf16Operand {
            transposed: false,
            rows: out,
            cols: inp,
            ..w_t
        };
        let keep: Vec<f32> = (0..m * inp)
            .map(|i| if i % 3 == 0 { 0.0 } else { 1.5 })
            .collect();
        let dropped: Vec<f32> = x.iter().zip(&keep).map(|(v, k)| v * k).collect();
        for dropout in [false, true] {
            let x_in: &[f32] = if dropout { &dropped } else { &x };
            let mut z = vec![0f32; m * r];
            let y = lora_forward(&x, x_in, m, frozen, pair, &mut z);
            let z_ref: Vec<f32> = naive_bf16(x_in, m, &Bf16Operand::f32(&a, inp, r, true))
                .iter()
                .map(|v| v * s)
                .collect();
            let xw = naive_bf16(&x, m, &w_t);
            // z is rounded to bf16 again where it meets B: from the kernel's own z, so that a value
            // rounded the other way at a tie (summation order) cannot flip the comparison.
            let zb = naive_bf16(&z, m, &Bf16Operand::f32(&b, r, out, true));
            let y_ref: Vec<f32> = xw.iter().zip(&zb).map(|(p, q)| p + q).collect();
            assert!(close(&z, &z_ref) < 1e-4, "z, dropout {dropout}");
            assert!(close(&y, &y_ref) < 1e-3, "y, dropout {dropout}");

            let (mut da, mut db) = (vec![0f32; r * inp], vec![0f32; out * r]);
            let grads = LoraGrads {
                pair,
                x_in: Elements::F32(x_in),
                z: &z,
                keep: dropout.then_some(&keep[..]),
                da: &mut da,
                db: &mut db,
            };
            let dx = lora_backward(&dy, m, frozen, true, grads).expect("dx asked for");
            // The input kept as bf16 (as the training pass keeps it here): the same gradients.
            let kept = lora_input_kept(x_in, frozen).expect("bf16 products keep bf16");
            let (mut da_kept, mut db_kept) = (vec![0f32; r * inp], vec![0f32; out * r]);
            let grads = LoraGrads {
                pair,
                x_in: Elements::Bf16(&kept),
                z: &z,
                keep: dropout.then_some(&keep[..]),
                da: &mut da_kept,
                db: &mut db_kept,
            };
            let dx_kept = lora_backward(&dy, m, frozen, true, grads).expect("dx asked for");
            assert_eq!(
                (&dx_kept, &da_kept, &db_kept),
                (&dx, &da, &db),
                "kept as bf16"
            );
            let dz: Vec<f32> = naive_bf16(&dy, m, &Bf16Operand::f32(&b, out, r, false))
                .iter()
                .map(|v| v * s)
                .collect();
            // As for z: dz·A from dz as the kernel rounds it (the same product, then the scale).
            let mut dz_own = vec![0f32; m * r];
            Bf16Rows::new(&dy, m, out).matmul(
                &mut dz_own,
                Bf16Operand::f32(&b, out, r, false),
                false,
            );
            dz_own.iter_mut().for_each(|v| *v *= s);
            assert!(close(&dz_own, &dz) < 1e-4, "dz, dropout {dropout}");
            let dzl = naive_bf16(&dz_own, m, &Bf16Operand::f32(&a, r, inp, false));
            let dyw = naive_bf16(&dy, m, &w_op);
            let dx_ref: Vec<f32> = dyw
                .iter()
                .zip(&dzl)
                .zip(&keep)
                .map(|((p, q), k)| p + q * if dropout { *k } else { 1.0 })
                .collect();
            // dA and dB from bf16 operands too: dz (as the kernel rounds it) and x', z and dy.
            let x_b = Bf16Operand::f32(x_in, m, inp, false);
            let da_ref = naive_bf16(&transpose(&dz_own, m, r), r, &x_b);
            let dy_b = Bf16Operand::f32(&dy, m, out, false);
            let db_ref = transpose(&naive_bf16(&transpose(&z, m, r), r, &dy_b), r, out);
            assert!(close(&dx, &dx_ref) < 1e-3, "dx, dropout {dropout}");
            assert!(close(&da, &da_ref) < 1e-3, "dA, dropout {dropout}");
            assert!(close(&db, &db_ref) < 1e-3, "dB, dropout {dropout}");
        }
    }

    /// The projections that share an input, forward and backward together, against each on its own: the
    /// same y, z, dA and dB, and dx the sum of their dx's (summed in another order where the tiles add
    /// them). Bf16 weights: bf16 products where the CPU has them, emulated (each on its own) elsewhere.
    #[test]
    fn shared_input_equals_each_projection_alone() {
        use half::bf16;
        let (m, inp) = (70, 48);
        let shapes = [(40, 8), (24, 8), (24, 4)];
        let x = fill(m * inp, 21);
        let ws: Vec<Vec<bf16>> = (0..shapes.len())
            .map(|i| {
                let w = fill(shapes[i].0 * inp, 22 + i as u32);
                w.iter().map(|v| bf16::from_f32(*v)).collect()
            })
            .collect();
        let abs: Vec<(Vec<f32>, Vec<f32>)> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(out, r))| (fill(r * inp, 30 + i as u32), fill(out * r, 40 + i as u32)))
            .collect();
        let dys: Vec<Vec<f32>> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(out, _))| fill(m * out, 50 + i as u32))
            .collect();
        let projections: Vec<(Frozen, LoraPair)> = shapes
            .iter()
            .zip(&ws)
            .zip(&abs)
            .map(|((&(out, r), w), (a, b))| {
                let frozen = Frozen {
                    w: Elements::Bf16(w),
                    out,
                    inp,
                };
                (
                    frozen,
                    LoraPair {
                        a,
                        b,
                        r,
                        scale: 2.0,
                    },
                )
            })
            .collect();
        let shared = lora_forward_shared(&x, m, &projections);
        let mut alone_dx = vec![0f32; m * inp];
        let mut grads = Vec::new();
        for ((y, z), &(w, p)) in shared.iter().zip(&projections) {
            let mut z_alone = vec![0f32; m * p.r];
            let y_alone = lora_forward(&x, &x, m, w, p, &mut z_alone);
            assert_eq!((y, z), (&y_alone, &z_alone), "forward of {} rows", w.out);
            let (mut da, mut db) = (vec![0f32; p.r * inp], vec![0f32; w.out * p.r]);
            let g = LoraGrads {
                pair: p,
                x_in: Elements::F32(&x),
                z,
                keep: None,
                da: &mut da,
                db: &mut db,
            };
            let dy = &dys[grads.len()];
            let dx = lora_backward(dy, m, w, true, g).expect("dx asked for");
            alone_dx.iter_mut().zip(&dx).for_each(|(s, d)| *s += d);
            grads.push((da, db));
        }
        // The input kept as f32, and as bf16 where the products are bf16 (the same gradients).
        let kept = lora_input_kept(&x, projections[0].0);
        let mut inputs = vec![Elements::F32(&x)];
        inputs.extend(kept.as_deref().map(Elements::Bf16));
        let mut dxs = Vec::new();
        for x_in in inputs {
            let mut shared_grads: Vec<(Vec<f32>, Vec<f32>)> = projections
                .iter()
                .map(|(w, p)| (vec![0f32; p.r * inp], vec![0f32; w.out * p.r]))
                .collect();
            let members = projections
                .iter()
                .zip(&shared)
                .zip(&dys)
                .zip(&mut shared_grads)
                .map(|((((w, p), (_, z)), dy), (da, db))| SharedGrads {
                    dy,
                    w: *w,
                    pair: *p,
                    z,
                    da,
                    db,
                })
                .collect();
            dxs.push(lora_backward_shared(x_in, m, members, true).expect("dx asked for"));
            assert_eq!(shared_grads, grads, "dA and dB");
        }
        assert!(
            dxs.iter().all(|dx| dx == &dxs[0]),
            "dx from a bf16-kept input"
        );
        let dx = &dxs[0];
        let scale = alone_dx.iter().fold(0f32, |s, v| s.max(v.abs()));
        assert!(close(dx, &alone_dx) < 1e-5 * scale, "dx");
    }
}
