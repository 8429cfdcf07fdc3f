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
//! store ([`Bf16Rows::matmul_plus`]): alone, with k = r, each was a pass over y (dx) for one step of
//! products. Where bf16 products are emulated they would only add rounding passes, so LoRA stays f32 there.
//! The gradients' own products, dA = dzᵀx' and dB = dyᵀz (as dBᵀ = zᵀdy), are bf16 there too, their
//! small r × m left operands transposed by rows, x' and dy rounded as they are packed.

use crate::bf16_gemm::{Bf16Operand, Bf16Rows};
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
    let (k, out) = (w.inp, w.out);
    let x_rows = Bf16Rows::new(x, m, k);
    let a_t = Bf16Operand::f32(p.a, k, p.r, true);
    // Without dropout x' is x itself (the same buffer): its rows are already rounded.
    if std::ptr::eq(x, x_in) {
        x_rows.matmul(z, a_t, false);
    } else {
        Bf16Rows::new(x_in, m, k).matmul(z, a_t, false);
    }
    z.iter_mut().for_each(|v| *v *= p.scale);
    let b_t = Bf16Operand::f32(p.b, p.r, out, true);
    // y = x Wᵀ + z Bᵀ in one pass over y.
    x_rows.product_plus(w.transposed(), (&Bf16Rows::new(z, m, p.r), b_t))
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
    pub x_in: &'a [f32],
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
    let dy_op = Operand::new(dy, m, out);
    let p = g.pair;
    let mut dz = vec![0f32; m * p.r];
    let dy_rows = bf16_lora(w).then(|| Bf16Rows::new(dy, m, out));
    match &dy_rows {
        Some(rows) => {
            let b = Bf16Operand::f32(p.b, out, p.r, false);
            rows.matmul(&mut dz, b, false);
            dz.iter_mut().for_each(|v| *v *= p.scale);
        }
        None => matmul(&mut dz, dy_op, Operand::new(p.b, out, p.r), p.scale, false),
    }
    if dy_rows.is_some() {
        // The gradients' products with k = m as bf16 too, their small left operand transposed by rows:
        // dBᵀ = zᵀ dy (then transposed into dB) and dA = dzᵀ x'.
        let mut db_t = vec![0f32; p.r * out];
        let dy_b = Bf16Operand::f32(dy, m, out, false);
        Bf16Rows::new(&transpose(g.z, m, p.r), p.r, m).matmul(&mut db_t, dy_b, false);
        g.db.copy_from_slice(&transpose(&db_t, p.r, out));
        let x_b = Bf16Operand::f32(g.x_in, m, k, false);
        Bf16Rows::new(&transpose(&dz, m, p.r), p.r, m).matmul(g.da, x_b, false);
    } else {
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
            Operand::new(g.x_in, m, k),
            1.0,
            false,
        );
    }
    if !need_dx {
        return None;
    }
    if let (Some(rows), None) = (&dy_rows, g.keep) {
        // dx = dy W + dz A in one pass over dx.
        let a = Bf16Operand::f32(p.a, p.r, k, false);
        let dz_rows = Bf16Rows::new(&dz, m, p.r);
        return Some(rows.product_plus(w.as_stored(), (&dz_rows, a)));
    }
    let mut dx = zeroed(m * k);
    match &dy_rows {
        Some(rows) => w.backward_rows(rows, &mut dx, false),
        None => w.backward(dy, m, &mut dx, false),
    }
    // dz·A, into dst (added with `accumulate`).
    let dz_a = |dst: &mut [f32], accumulate: bool| match &dy_rows {
        Some(_) => {
            let a = Bf16Operand::f32(p.a, p.r, k, false);
            Bf16Rows::new(&dz, m, p.r).matmul(dst, a, accumulate)
        }
        None => matmul(
            dst,
            Operand::new(&dz, m, p.r),
            Operand::new(p.a, p.r, k),
            1.0,
            accumulate,
        ),
    };
    match g.keep {
        None => dz_a(&mut dx, true),
        Some(keep) => {
            // Dropout sits between x and A, so its mask scales this term only.
            let mut dxl = vec![0f32; m * k];
            dz_a(&mut dxl, false);
            for ((d, l), kp) in dx.iter_mut().zip(&dxl).zip(keep) {
                *d += l * kp;
            }
        }
    }
    Some(dx)
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
            x_in: &x_in,
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
                x_in,
                z: &z,
                keep: dropout.then_some(&keep[..]),
                da: &mut da,
                db: &mut db,
            };
            let dx = lora_backward(&dy, m, frozen, true, grads).expect("dx asked for");
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
}
