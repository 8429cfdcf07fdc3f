//! Attention for one new token per row (decode) read straight from the KV cache: each (row, kv head)
//! scores its g query heads against the cached keys, softmaxes and sums the values. GEMM libraries
//! repack the whole cache for every such tiny product; this reads it once.

use crate::team::{DisjointOut, Team};

/// A (b, heads, positions, d) tensor in memory, last dimension contiguous; strides in elements.
#[derive(Clone, Copy)]
pub struct KvView<'a> {
    pub data: &'a [f32],
    pub start: usize,
    pub stride_b: usize,
    pub stride_h: usize,
    pub stride_t: usize,
}

impl KvView<'_> {
    fn row(&self, b: usize, h: usize, t: usize, d: usize) -> &[f32] {
        let at = self.start + b * self.stride_b + h * self.stride_h + t * self.stride_t;
        &self.data[at..at + d]
    }
}

/// Shapes of one decode-attention call.
#[derive(Clone, Copy)]
pub struct DecodeShape {
    pub batch: usize,
    pub kv_heads: usize,
    /// Query heads per kv head.
    pub group: usize,
    pub head_dim: usize,
    /// Cached positions (including this step's).
    pub positions: usize,
}

/// `q`, `out`: (batch, kv_heads, group, head_dim) contiguous. `mask`: (batch, positions) additive
/// (−inf hides a position), or none.
pub fn decode_attention(
    q: &[f32],
    k: KvView,
    v: KvView,
    mask: Option<&[f32]>,
    s: DecodeShape,
    scale: f32,
    out: &mut [f32],
) {
    let DecodeShape {
        batch,
        kv_heads,
        group,
        head_dim: d,
        positions: t,
    } = s;
    assert_eq!(q.len(), batch * kv_heads * group * d, "query shape");
    assert_eq!(out.len(), q.len(), "output shape");
    if let Some(m) = mask {
        assert_eq!(m.len(), batch * t, "mask shape");
    }
    let out = DisjointOut::new(out);
    // One task per (row, query head); the g heads of a kv head read the same cached keys and values.
    let work = |task: usize| {
        let (b, h) = (task / (kv_heads * group), task / group % kv_heads);
        let qi = &q[task * d..(task + 1) * d];
        // SAFETY: each task writes only its own head's d outputs.
        let oi = unsafe { out.slice(task * d, (task + 1) * d) };
        let simd = crate::simd_available();
        let mut scores = vec![0f32; t];
        let mut max = f32::NEG_INFINITY;
        for (j, sc) in scores.iter_mut().enumerate() {
            let kj = k.row(b, h, j, d);
            let dot = if simd {
                // SAFETY: AVX2 and FMA are available (checked).
                unsafe { crate::dense::dot_simd(qi, kj) }
            } else {
                qi.iter().zip(kj).map(|(a, b)| a * b).sum()
            };
            *sc = dot * scale + mask.map_or(0.0, |m| m[b * t + j]);
            max = max.max(*sc);
        }
        let mut sum = 0f32;
        for sc in scores.iter_mut() {
            *sc = (*sc - max).exp();
            sum += *sc;
        }
        oi.fill(0.0);
        for (j, &p) in scores.iter().enumerate() {
            if p == 0.0 {
                continue;
            }
            let (w, vj) = (p / sum, v.row(b, h, j, d));
            if simd {
                // SAFETY: AVX2 and FMA are available (checked).
                unsafe { crate::axpy_simd(oi, w, vj) }
            } else {
                for (acc, val) in oi.iter_mut().zip(vj) {
                    *acc += w * val;
                }
            }
        }
    };
    let tasks = batch * kv_heads * group;
    if tasks * t * d < PARALLEL_MIN_MACS {
        (0..tasks).for_each(work);
    } else {
        Team::global().run(tasks, &work);
    }
}

/// Below this many multiply-adds (short contexts) one thread is faster than handing the work over.
const PARALLEL_MIN_MACS: usize = 1 << 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_naive_softmax_attention() {
        let (batch, kv_heads, group, d, t, cap) = (2, 3, 2, 8, 5, 7);
        let gen = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i + seed) * 37 % 101) as f32 - 50.0) / 40.0)
                .collect()
        };
        let q = gen(batch * kv_heads * group * d, 1);
        // Cache buffers with spare capacity: (b, h, cap, d), the first t positions filled.
        let kb = gen(batch * kv_heads * cap * d, 2);
        let vb = gen(batch * kv_heads * cap * d, 3);
        let view = |data| KvView {
            data,
            start: 0,
            stride_b: kv_heads * cap * d,
            stride_h: cap * d,
            stride_t: d,
        };
        // Row 1 has two padding positions.
        let mut mask = vec![0f32; batch * t];
        mask[t] = f32::NEG_INFINITY;
        mask[t + 1] = f32::NEG_INFINITY;
        let mut out = vec![0f32; q.len()];
        let shape = DecodeShape {
            batch,
            kv_heads,
            group,
            head_dim: d,
            positions: t,
        };
        decode_attention(&q, view(&kb), view(&vb), Some(&mask), shape, 0.3, &mut out);
        for b in 0..batch {
            for h in 0..kv_heads {
                for g in 0..group {
                    let qi = &q[((b * kv_heads + h) * group + g) * d..][..d];
                    let at = |j: usize| (b * kv_heads + h) * cap * d + j * d;
                    let s: Vec<f32> = (0..t)
                        .map(|j| {
                            let dot: f32 = (0..d).map(|e| qi[e] * kb[at(j) + e]).sum();
                            dot * 0.3 + mask[b * t + j]
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f32 = e.iter().sum();
                    for c in 0..d {
                        let want: f32 = (0..t).map(|j| e[j] / z * vb[at(j) + c]).sum();
                        let got = out[((b * kv_heads + h) * group + g) * d + c];
                        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
                    }
                }
            }
        }
    }
}
