//! RMSNorm for training, forward and backward, one pass over each row (rows in parallel).
//!
//! Why: composed from Candle's element-wise ops the forward is six passes over the (tokens × hidden)
//! activations and the backward (with the residual add after it) eight, each on Candle's thread pool —
//! together with the residual adds ~10% of a bf16 training step on 2 cores.
//!
//! `y = x · inv · w` with `inv = 1/√(mean(x²) + ε)` per row; the backward, from dy:
//! `dx = residual + inv·(dy·w) − x · inv³/h · Σ(dy·w·x)`. Row groups run on the kernel team.

use std::mem::MaybeUninit;

use crate::team::{written_by, DisjointOut, Team};

/// Rows per parallel task: a few hundred KiB of activations.
const ROWS_PER_TASK: usize = 64;

/// `y` (rows × h) and `inv` (rows) from x (rows × h) and the weight w (h), in fresh buffers.
pub fn rms_norm_forward(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let h = w.len();
    assert!(
        h > 0 && x.len().is_multiple_of(h),
        "x is rows of the weight's length"
    );
    let rows = x.len() / h;
    let fill = |y: &mut [MaybeUninit<f32>], inv: &mut [MaybeUninit<f32>]| {
        let (y, inv) = (DisjointOut::new(y), DisjointOut::new(inv));
        Team::global().run(rows.div_ceil(ROWS_PER_TASK), &|t| {
            let (r0, r1) = (t * ROWS_PER_TASK, ((t + 1) * ROWS_PER_TASK).min(rows));
            // SAFETY: each task takes its own rows of both outputs.
            let (y, inv) = unsafe { (y.slice(r0 * h, r1 * h), inv.slice(r0, r1)) };
            let x = &x[r0 * h..r1 * h];
            for ((yr, iv), xr) in y.chunks_exact_mut(h).zip(inv).zip(x.chunks_exact(h)) {
                let ss: f32 = xr.iter().map(|v| v * v).sum();
                let iv = *iv.write(1.0 / (ss / h as f32 + eps).sqrt());
                for ((o, &v), &wv) in yr.iter_mut().zip(xr).zip(w) {
                    o.write(v * iv * wv);
                }
            }
        });
    };
    let mut inv = Vec::new();
    // SAFETY: the tasks' rows cover every row, each writing its inv and all h values of y.
    let y = unsafe {
        written_by(rows * h, |y| {
            inv = written_by(rows, |inv| fill(y, inv));
        })
    };
    (y, inv)
}

/// `dx = residual + ∂/∂x` of [`rms_norm_forward`] given dy (all rows × h), in a fresh buffer; without a
/// residual, the derivative alone.
pub fn rms_norm_backward(
    x: &[f32],
    inv: &[f32],
    w: &[f32],
    dy: &[f32],
    residual: Option<&[f32]>,
) -> Vec<f32> {
    let h = w.len();
    assert!(
        h > 0 && x.len().is_multiple_of(h) && inv.len() == x.len() / h,
        "x, inv shapes"
    );
    assert!(dy.len() == x.len(), "dy shape");
    assert!(
        residual.is_none_or(|r| r.len() == x.len()),
        "residual shape"
    );
    let rows = inv.len();
    let fill = |dx: &mut [MaybeUninit<f32>]| {
        let out = DisjointOut::new(dx);
        Team::global().run(rows.div_ceil(ROWS_PER_TASK), &|t| {
            let (r0, r1) = (t * ROWS_PER_TASK, ((t + 1) * ROWS_PER_TASK).min(rows));
            // SAFETY: each task takes its own rows.
            let dx = unsafe { out.slice(r0 * h, r1 * h) };
            for (i, dxr) in dx.chunks_exact_mut(h).enumerate() {
                let r = r0 + i;
                let (xr, dyr, iv) = (&x[r * h..(r + 1) * h], &dy[r * h..(r + 1) * h], inv[r]);
                let dot: f32 = xr.iter().zip(dyr).zip(w).map(|((a, d), g)| a * d * g).sum();
                let coef = iv * iv * iv * dot / h as f32;
                let res = residual.map(|res| &res[r * h..(r + 1) * h]);
                for j in 0..h {
                    let d = iv * dyr[j] * w[j] - xr[j] * coef;
                    dxr[j].write(res.map_or(d, |res| d + res[j]));
                }
            }
        });
    };
    // SAFETY: the tasks' rows cover every row, each writing all h values.
    unsafe { written_by(rows * h, fill) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both against f64 arithmetic of the definitions, the backward also against finite differences of
    /// the forward's loss Σ y·dy.
    #[test]
    fn forward_and_backward_match_their_definitions() {
        let (rows, h, eps) = (130, 24, 1e-5f32);
        let val = |i: usize, s: usize| ((i * 7919 + s * 104_729) % 2001) as f64 / 1000.0 - 1.0;
        let x: Vec<f32> = (0..rows * h).map(|i| val(i, 1) as f32).collect();
        let w: Vec<f32> = (0..h).map(|i| 0.5 + val(i, 2) as f32).collect();
        let dy: Vec<f32> = (0..rows * h).map(|i| val(i, 3) as f32).collect();
        let res: Vec<f32> = (0..rows * h).map(|i| val(i, 4) as f32).collect();
        let (y, inv) = rms_norm_forward(&x, &w, eps);
        let dx = rms_norm_backward(&x, &inv, &w, &dy, Some(res.as_slice()));
        let alone = rms_norm_backward(&x, &inv, &w, &dy, None);
        for i in 0..rows * h {
            assert!(
                (alone[i] + res[i] - dx[i]).abs() < 1e-6,
                "without the residual [{i}]"
            );
        }
        let norm = |xr: &[f64]| {
            let iv = 1.0 / (xr.iter().map(|v| v * v).sum::<f64>() / h as f64 + eps as f64).sqrt();
            xr.iter()
                .zip(&w)
                .map(|(v, g)| v * iv * *g as f64)
                .collect::<Vec<f64>>()
        };
        for r in 0..rows {
            let xr: Vec<f64> = x[r * h..(r + 1) * h].iter().map(|&v| v as f64).collect();
            let want = norm(&xr);
            for i in 0..h {
                assert!((y[r * h + i] as f64 - want[i]).abs() < 1e-5, "y[{r},{i}]");
            }
            // d/dx_i of Σ_j y_j dy_j, by central differences in f64.
            let loss = |xr: &[f64]| -> f64 {
                norm(xr)
                    .iter()
                    .zip(&dy[r * h..])
                    .map(|(a, b)| a * *b as f64)
                    .sum()
            };
            for i in 0..h {
                let (mut up, mut down) = (xr.clone(), xr.clone());
                up[i] += 1e-6;
                down[i] -= 1e-6;
                let want = res[r * h + i] as f64 + (loss(&up) - loss(&down)) / 2e-6;
                let got = dx[r * h + i] as f64;
                assert!(
                    (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "dx[{r},{i}]: {got} vs {want}"
                );
            }
        }
    }
}
