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

use crate::frozen::Frozen;
use crate::matmul::{matmul, Operand};

/// The adapter of one projection: A (r × in), B (out × r) and the scale alpha/r.
#[derive(Clone, Copy)]
pub struct LoraPair<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub r: usize,
    pub scale: f32,
}

/// Forward: `y = x Wᵀ + z Bᵀ` with `z = s·x' Aᵀ`, which the backward needs and is returned in `z`.
pub fn lora_forward(
    x: &[f32],
    x_in: &[f32],
    m: usize,
    w: Frozen,
    p: LoraPair,
    z: &mut [f32],
    y: &mut [f32],
) {
    let (k, out) = (w.inp, w.out);
    w.forward(x, m, y);
    matmul(
        z,
        Operand::new(x_in, m, k),
        Operand::t(p.a, p.r, k),
        p.scale,
        false,
    );
    matmul(
        y,
        Operand::new(z, m, p.r),
        Operand::t(p.b, out, p.r),
        1.0,
        true,
    );
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

/// Backward: `dx = dy W + (dz A)·keep` with `dz = s·dy B` (when `dx` is wanted), `dA = dzᵀ x'`,
/// `dB = dyᵀ z`. The frozen W gets no gradient.
pub fn lora_backward(dy: &[f32], m: usize, w: Frozen, dx: Option<&mut [f32]>, g: LoraGrads) {
    let (k, out) = (w.inp, w.out);
    let dy_op = Operand::new(dy, m, out);
    let p = g.pair;
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
        Operand::new(g.x_in, m, k),
        1.0,
        false,
    );
    let Some(dx) = dx else { return };
    w.backward(dy, m, dx, false);
    let dz_a = (Operand::new(&dz, m, p.r), Operand::new(p.a, p.r, k));
    match g.keep {
        None => matmul(dx, dz_a.0, dz_a.1, 1.0, true),
        Some(keep) => {
            // Dropout sits between x and A, so its mask scales this term only.
            let mut dxl = vec![0f32; m * k];
            matmul(&mut dxl, dz_a.0, dz_a.1, 1.0, false);
            for ((d, l), kp) in dx.iter_mut().zip(&dxl).zip(keep) {
                *d += l * kp;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::matmul::tests::{fill, max_diff as close, naive};

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

        let (mut y, mut z) = (vec![0f32; m * out], vec![0f32; m * r]);
        let frozen = Frozen {
            w: crate::Elements::F32(&w),
            out,
            inp,
        };
        lora_forward(&x, &x_in, m, frozen, pair, &mut z, &mut y);
        let z_ref: Vec<f32> = naive(Operand::new(&x_in, m, inp), Operand::t(&a, r, inp))
            .iter()
            .map(|v| v * s)
            .collect();
        let xw = naive(Operand::new(&x, m, inp), Operand::t(&w, out, inp));
        let zb = naive(Operand::new(&z_ref, m, r), Operand::t(&b, out, r));
        let y_ref: Vec<f32> = xw.iter().zip(&zb).map(|(p, q)| p + q).collect();
        assert!(close(&z, &z_ref) < 1e-5);
        assert!(close(&y, &y_ref) < 1e-5);

        let (mut dx, mut da, mut db) = (
            vec![0f32; m * inp],
            vec![0f32; r * inp],
            vec![0f32; out * r],
        );
        let grads = LoraGrads {
            pair,
            x_in: &x_in,
            z: &z,
            keep: Some(&keep),
            da: &mut da,
            db: &mut db,
        };
        lora_backward(&dy, m, frozen, Some(&mut dx), grads);
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
}
