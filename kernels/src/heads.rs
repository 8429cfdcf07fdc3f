//! Attention's layout changes in the training pass, with RoPE on the way: a projection's rows
//! (b, t, heads, d) to head-major (b, heads, t, d) and back, each value read and written once, on the
//! kernel team. Composed from Candle's ops each was a strided copy on one thread (and RoPE another pass on
//! rayon's pool, while the team's helper spun): ~5% of a bf16 training step.
//!
//! RoPE as Llama's "rotate half" with tables `cos`, `sin` (t × d/2), the same arithmetic as
//! `candle_nn::rotary_emb::rope`: `y[i] = x[i]·cos − x[i + d/2]·sin`, `y[i + d/2] = x[i]·sin + x[i + d/2]·cos`.
//! Its transpose is the rotation by −sin, which the backward passes as `sin`.

use std::mem::MaybeUninit;

use crate::team::{written_by, DisjointOut, Team};

/// The shape of one layer's heads: `batch` sequences of `seq` positions, `heads` heads of `dim` values.
#[derive(Clone, Copy, Debug)]
pub struct HeadsShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub dim: usize,
}

/// The RoPE tables (seq × dim/2 each).
#[derive(Clone, Copy)]
pub struct Rope<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
}

impl HeadsShape {
    fn len(&self) -> usize {
        self.batch * self.seq * self.heads * self.dim
    }
}

/// (b, t, heads, d) → (b, heads, t, d) in a fresh buffer, each head's values rotated by `rope` if given.
pub fn to_heads(x: &[f32], s: HeadsShape, rope: Option<Rope>) -> Vec<f32> {
    relayout(x, s, rope, true)
}

/// (b, heads, t, d) → (b, t, heads, d) in a fresh buffer, each head's values rotated by `rope` first if given.
pub fn from_heads(x: &[f32], s: HeadsShape, rope: Option<Rope>) -> Vec<f32> {
    relayout(x, s, rope, false)
}

fn relayout(x: &[f32], s: HeadsShape, rope: Option<Rope>, to_heads: bool) -> Vec<f32> {
    let (t, n, d) = (s.seq, s.heads, s.dim);
    assert_eq!(x.len(), s.len(), "x is not {s:?}");
    assert!(d % 2 == 0, "an even head dimension");
    if let Some(r) = rope {
        assert!(
            r.cos.len() >= t * d / 2 && r.sin.len() >= t * d / 2,
            "RoPE tables of {t} positions"
        );
    }
    // Offsets of position p of head h of sequence bi in the row layout and in the head-major one.
    let rows = move |bi: usize, p: usize, h: usize| ((bi * t + p) * n + h) * d;
    let heads = move |bi: usize, p: usize, h: usize| ((bi * n + h) * t + p) * d;
    let fill = |out: &mut [MaybeUninit<f32>]| {
        let out = DisjointOut::new(out);
        // One task per (sequence, head): t × d values.
        Team::global().run(s.batch * n, &|task| {
            let (bi, h) = (task / n, task % n);
            for p in 0..t {
                let (src, dst) = if to_heads {
                    (rows(bi, p, h), heads(bi, p, h))
                } else {
                    (heads(bi, p, h), rows(bi, p, h))
                };
                // SAFETY: each (sequence, head, position) is written by its task alone.
                let y = unsafe { out.slice(dst, dst + d) };
                let x = &x[src..src + d];
                match rope {
                    Some(r) => rotate(
                        x,
                        &r.cos[p * d / 2..][..d / 2],
                        &r.sin[p * d / 2..][..d / 2],
                        y,
                    ),
                    None => {
                        for (o, &v) in y.iter_mut().zip(x) {
                            o.write(v);
                        }
                    }
                }
            }
        });
    };
    // SAFETY: the tasks cover every (sequence, head, position), each writing its d values.
    unsafe { written_by(s.len(), fill) }
}

/// One head's values rotated: the arithmetic of Candle's rope.
fn rotate(x: &[f32], cos: &[f32], sin: &[f32], y: &mut [MaybeUninit<f32>]) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (y1, y2) = y.split_at_mut(half);
    for i in 0..half {
        y1[i].write(x1[i] * cos[i] - x2[i] * sin[i]);
        y2[i].write(x1[i] * sin[i] + x2[i] * cos[i]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the definitions: every value moved to its place, rotated as Candle rotates; from_heads
    /// undoes to_heads, and with −sin undoes its rotation too (up to rounding).
    #[test]
    fn heads_move_and_rotate_every_value() {
        let s = HeadsShape {
            batch: 3,
            seq: 5,
            heads: 4,
            dim: 6,
        };
        let (t, n, d) = (s.seq, s.heads, s.dim);
        let x: Vec<f32> = (0..s.len()).map(|i| (i as f32 * 0.37).sin()).collect();
        let cos: Vec<f32> = (0..t * d / 2).map(|i| (i as f32 * 0.1).cos()).collect();
        let sin: Vec<f32> = (0..t * d / 2).map(|i| (i as f32 * 0.1).sin()).collect();
        let neg_sin: Vec<f32> = sin.iter().map(|v| -v).collect();
        let plain = to_heads(&x, s, None);
        let rope = Rope {
            cos: &cos,
            sin: &sin,
        };
        let rotated = to_heads(&x, s, Some(rope));
        for bi in 0..s.batch {
            for p in 0..t {
                for h in 0..n {
                    let src = &x[((bi * t + p) * n + h) * d..][..d];
                    let at = ((bi * n + h) * t + p) * d;
                    assert_eq!(&plain[at..at + d], src, "({bi}, {p}, {h})");
                    for i in 0..d / 2 {
                        let (c, sn) = (cos[p * d / 2 + i], sin[p * d / 2 + i]);
                        let (a, b) = (src[i], src[i + d / 2]);
                        assert_eq!(rotated[at + i], a * c - b * sn);
                        assert_eq!(rotated[at + i + d / 2], a * sn + b * c);
                    }
                }
            }
        }
        assert_eq!(from_heads(&plain, s, None), x);
        let back = Rope {
            cos: &cos,
            sin: &neg_sin,
        };
        let undone = from_heads(&rotated, s, Some(back));
        assert!(undone.iter().zip(&x).all(|(a, b)| (a - b).abs() < 1e-6));
    }
}
