//! The SwiGLU gate of a Llama MLP, `m = silu(g) · u`, and its backward, each in one pass over memory with
//! the vectorised exponential of [`crate::elementwise`] (libm's `expf` per value was ~4% of a bf16
//! training step). Candle needs five separate element-wise ops (and three exponentials) for the backward
//! alone. Chunks run on the kernel team, as the products before and after them do: on rayon's pool the
//! team's helper spun on a core that rayon's workers wanted.

use crate::elementwise::{silu_mul_backward, silu_mul_into};
use std::mem::MaybeUninit;

use crate::team::{written_by, DisjointOut, Team};

/// Elements per parallel chunk: large enough that thread hand-off is noise.
const CHUNK: usize = 1 << 15;

/// `m = silu(g) · u`, in a fresh buffer.
pub fn swiglu_forward(g: &[f32], u: &[f32]) -> Vec<f32> {
    assert_eq!(g.len(), u.len(), "gate and up lengths");
    let n = g.len();
    let fill = |m: &mut [MaybeUninit<f32>]| {
        let out = DisjointOut::new(m);
        Team::global().run(n.div_ceil(CHUNK), &|t| {
            let (a, b) = (t * CHUNK, ((t + 1) * CHUNK).min(n));
            // SAFETY: each task takes its own chunk.
            silu_mul_into(&g[a..b], &u[a..b], unsafe { out.slice(a, b) });
        });
    };
    // SAFETY: the chunks cover all n elements, each written by silu_mul_into.
    unsafe { written_by(n, fill) }
}

/// From `dm` to `dg = dm · u · silu'(g)` and `du = dm · silu(g)` (fresh buffers), with
/// silu'(x) = σ(x)(1 + x(1 − σ(x))).
pub fn swiglu_backward(g: &[f32], u: &[f32], dm: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let n = g.len();
    assert!(u.len() == n && dm.len() == n, "gate, up and dm lengths");
    let mut du = Vec::new();
    let fill = |dg: &mut [MaybeUninit<f32>], du: &mut [MaybeUninit<f32>]| {
        let (dg, du) = (DisjointOut::new(dg), DisjointOut::new(du));
        Team::global().run(n.div_ceil(CHUNK), &|t| {
            let (a, b) = (t * CHUNK, ((t + 1) * CHUNK).min(n));
            // SAFETY: each task takes its own chunk of both outputs.
            let (dg, du) = unsafe { (dg.slice(a, b), du.slice(a, b)) };
            silu_mul_backward(&g[a..b], &u[a..b], &dm[a..b], dg, du);
        });
    };
    // SAFETY: the chunks cover all n elements of both, each written by silu_mul_backward.
    let dg = unsafe {
        written_by(n, |dg| {
            du = written_by(n, |du| fill(dg, du));
        })
    };
    (dg, du)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backward_matches_finite_differences() {
        let g: Vec<f32> = (0..100_000)
            .map(|i| ((i % 97) as f32 - 48.0) / 8.0)
            .collect();
        let u: Vec<f32> = (0..100_000)
            .map(|i| ((i % 13) as f32 - 6.0) / 3.0)
            .collect();
        let dm: Vec<f32> = (0..100_000).map(|i| ((i % 7) as f32 - 3.0) / 2.0).collect();
        let (dg, du) = swiglu_backward(&g, &u, &dm);
        let f = |g: f64, u: f64| g / (1.0 + (-g).exp()) * u;
        let h = 1e-3;
        for i in (0..g.len()).step_by(997) {
            let (gi, ui, d) = (g[i] as f64, u[i] as f64, dm[i] as f64);
            let want_dg = d * (f(gi + h, ui) - f(gi - h, ui)) / (2.0 * h);
            let want_du = d * (f(gi, ui + h) - f(gi, ui - h)) / (2.0 * h);
            assert!(
                (dg[i] as f64 - want_dg).abs() < 1e-3 * (1.0 + want_dg.abs()),
                "dg[{i}]"
            );
            assert!(
                (du[i] as f64 - want_du).abs() < 1e-3 * (1.0 + want_du.abs()),
                "du[{i}]"
            );
        }
        let m = swiglu_forward(&g, &u);
        assert!((m[5] as f64 - f(g[5] as f64, u[5] as f64)).abs() < 1e-5);
    }
}
