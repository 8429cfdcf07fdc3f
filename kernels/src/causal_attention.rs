//! Causal self-attention over whole sequences for training, forward and backward, one task per
//! (sequence, kv head) with its g query heads stacked.
//!
//! Why not Candle's batched matmul: it multiplies the 48 (sequence, kv head) pairs of a layer one after the
//! other, each product (192 × 64 × 64) split over all threads, so the threads meet 48 times per product and
//! the mask, scale and softmax each make another pass over the (b, h, t, t) scores. Here each task runs its
//! products on one thread (`matmul_serial`) with the scores still in cache, and the tasks run in parallel
//! on the kernel team (as the projections around them do).
//!
//! Layouts (row-major, "head-major"): q, o, dq (b, kv_heads, g·t, d), i.e. (b, heads, t, d) with the g query
//! heads of a kv head adjacent; k, v, dk, dv (b, kv_heads, t, d); probs (b, kv_heads, g·t, t). Rows
//! attend to positions ≤ their own (right padding needs no other mask).

use crate::matmul::{matmul_serial, Operand};
use crate::team::{DisjointOut, Team};

#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub batch: usize,
    pub kv_heads: usize,
    /// Query heads per kv head.
    pub group: usize,
    pub seq: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    fn q_len(&self) -> usize {
        self.group * self.seq * self.head_dim
    }
    fn kv_len(&self) -> usize {
        self.seq * self.head_dim
    }
    fn p_len(&self) -> usize {
        self.group * self.seq * self.seq
    }
    fn tasks(&self) -> usize {
        self.batch * self.kv_heads
    }
    fn check(&self, q: &[f32], k: &[f32], v: &[f32]) {
        assert_eq!(q.len(), self.tasks() * self.q_len(), "q shape");
        assert_eq!(k.len(), self.tasks() * self.kv_len(), "k shape");
        assert_eq!(v.len(), self.tasks() * self.kv_len(), "v shape");
    }
}

/// `probs = softmax(q kᵀ · scale, causal)`, `o = probs v`.
pub fn causal_attention_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttentionShape,
    scale: f32,
    probs: &mut [f32],
    o: &mut [f32],
) {
    s.check(q, k, v);
    assert_eq!(probs.len(), s.tasks() * s.p_len(), "probs shape");
    assert_eq!(o.len(), q.len(), "o shape");
    let (gt, t, d) = (s.group * s.seq, s.seq, s.head_dim);
    let (pl, ql, kl) = (s.p_len(), s.q_len(), s.kv_len());
    let (probs, o) = (DisjointOut::new(probs), DisjointOut::new(o));
    Team::global().run(s.tasks(), &|i| {
        // SAFETY: each task takes its own (sequence, kv head) of both outputs.
        let (p, o) = unsafe {
            (
                probs.slice(i * pl, (i + 1) * pl),
                o.slice(i * ql, (i + 1) * ql),
            )
        };
        let (q, k, v) = (
            &q[i * ql..(i + 1) * ql],
            &k[i * kl..(i + 1) * kl],
            &v[i * kl..(i + 1) * kl],
        );
        matmul_serial(p, Operand::new(q, gt, d), Operand::t(k, t, d), scale, false);
        for (r, row) in p.chunks_mut(t).enumerate() {
            causal_softmax(row, r % t);
        }
        matmul_serial(o, Operand::new(p, gt, t), Operand::new(v, t, d), 1.0, false);
    });
}

/// Softmax over `row[..=last]`; the positions after `last` get probability 0.
fn causal_softmax(row: &mut [f32], last: usize) {
    let (seen, hidden) = row.split_at_mut(last + 1);
    let max = seen.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum = crate::elementwise::exp_in_place(seen, max);
    let inv = 1.0 / sum;
    seen.iter_mut().for_each(|x| *x *= inv);
    hidden.fill(0.0);
}

/// From `d_o` (the gradient of `o`, head-major) and the forward's `probs`: dq, dk, dv.
#[allow(clippy::too_many_arguments)] // the attention's pieces, kept explicit as llm.c does
pub fn causal_attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    d_o: &[f32],
    s: AttentionShape,
    scale: f32,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    s.check(q, k, v);
    assert_eq!(probs.len(), s.tasks() * s.p_len(), "probs shape");
    assert!(d_o.len() == q.len() && dq.len() == q.len(), "dq shape");
    assert!(dk.len() == k.len() && dv.len() == v.len(), "dk, dv shape");
    let (gt, t, d) = (s.group * s.seq, s.seq, s.head_dim);
    let (pl, ql, kl) = (s.p_len(), s.q_len(), s.kv_len());
    let (dq, dk, dv) = (
        DisjointOut::new(dq),
        DisjointOut::new(dk),
        DisjointOut::new(dv),
    );
    Team::global().run(s.tasks(), &|i| {
        // SAFETY: each task takes its own (sequence, kv head) of the three outputs.
        let (dq, dk, dv) = unsafe {
            (
                dq.slice(i * ql, (i + 1) * ql),
                dk.slice(i * kl, (i + 1) * kl),
                dv.slice(i * kl, (i + 1) * kl),
            )
        };
        let (q, d_o, p) = (
            &q[i * ql..(i + 1) * ql],
            &d_o[i * ql..(i + 1) * ql],
            &probs[i * pl..(i + 1) * pl],
        );
        let (k, v) = (&k[i * kl..(i + 1) * kl], &v[i * kl..(i + 1) * kl]);
        let d_o = Operand::new(d_o, gt, d);
        // dv = pᵀ d_o (the g query heads' rows sum into their shared kv head).
        matmul_serial(dv, Operand::t(p, gt, t), d_o, 1.0, false);
        // dp = d_o vᵀ, then in place ds = p · (dp − Σ_j p·dp) · scale.
        let mut ds = vec![0f32; gt * t];
        matmul_serial(&mut ds, d_o, Operand::t(v, t, d), 1.0, false);
        for (dsr, pr) in ds.chunks_mut(t).zip(p.chunks(t)) {
            let dot: f32 = dsr.iter().zip(pr).map(|(a, b)| a * b).sum();
            for (x, &pj) in dsr.iter_mut().zip(pr) {
                *x = pj * (*x - dot) * scale;
            }
        }
        let ds_op = Operand::new(&ds, gt, t);
        matmul_serial(dq, ds_op, Operand::new(k, t, d), 1.0, false);
        let ds_t = Operand::t(&ds, gt, t);
        matmul_serial(dk, ds_t, Operand::new(q, gt, d), 1.0, false);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::tests::{fill, max_diff};

    /// The same attention written as plain loops over (sequence, query head): the reference.
    #[test]
    fn matches_plain_loops_forward_and_backward() {
        let s = AttentionShape {
            batch: 2,
            kv_heads: 2,
            group: 3,
            seq: 5,
            head_dim: 4,
        };
        let (g, t, d) = (s.group, s.seq, s.head_dim);
        let scale = 0.5f32;
        let q = fill(s.tasks() * s.q_len(), 11);
        let k = fill(s.tasks() * s.kv_len(), 12);
        let v = fill(s.tasks() * s.kv_len(), 13);
        let d_o = fill(q.len(), 14);

        let mut probs = vec![0f32; s.tasks() * s.p_len()];
        let mut o = vec![0f32; q.len()];
        causal_attention_forward(&q, &k, &v, s, scale, &mut probs, &mut o);
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; q.len()],
            vec![0f32; k.len()],
            vec![0f32; v.len()],
        );
        causal_attention_backward(
            &q, &k, &v, &probs, &d_o, s, scale, &mut dq, &mut dk, &mut dv,
        );

        let (mut dq_r, mut dk_r, mut dv_r) = (
            vec![0f32; q.len()],
            vec![0f32; k.len()],
            vec![0f32; v.len()],
        );
        for task in 0..s.tasks() {
            let kv = |x: &[f32], j: usize, c: usize| x[task * t * d + j * d + c];
            for h in 0..g {
                for i in 0..t {
                    let qrow = task * g * t * d + (h * t + i) * d;
                    let score =
                        |j: usize| (0..d).map(|c| q[qrow + c] * kv(&k, j, c)).sum::<f32>() * scale;
                    let max = (0..=i).map(score).fold(f32::NEG_INFINITY, f32::max);
                    let e: Vec<f32> = (0..=i).map(|j| (score(j) - max).exp()).collect();
                    let z: f32 = e.iter().sum();
                    let p: Vec<f32> = e.iter().map(|x| x / z).collect();
                    let prow = task * g * t * t + (h * t + i) * t;
                    for j in 0..t {
                        let want = if j <= i { p[j] } else { 0.0 };
                        assert!((probs[prow + j] - want).abs() < 1e-6);
                    }
                    for c in 0..d {
                        let want: f32 = (0..=i).map(|j| p[j] * kv(&v, j, c)).sum();
                        assert!((o[qrow + c] - want).abs() < 1e-5);
                    }
                    // Backward of this row.
                    let dp: Vec<f32> = (0..=i)
                        .map(|j| (0..d).map(|c| d_o[qrow + c] * kv(&v, j, c)).sum())
                        .collect();
                    let dot: f32 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                    for j in 0..=i {
                        let ds = p[j] * (dp[j] - dot) * scale;
                        for c in 0..d {
                            dq_r[qrow + c] += ds * kv(&k, j, c);
                            dk_r[task * t * d + j * d + c] += ds * q[qrow + c];
                            dv_r[task * t * d + j * d + c] += p[j] * d_o[qrow + c];
                        }
                    }
                }
            }
        }
        assert!(max_diff(&dq, &dq_r) < 1e-5);
        assert!(max_diff(&dk, &dk_r) < 1e-5);
        assert!(max_diff(&dv, &dv_r) < 1e-5);
    }
}
