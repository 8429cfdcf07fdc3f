//! Several `y = x Wᵀ` products for a few activation rows, run as one parallel pass.
//!
//! Decoding multiplies one or a few activation rows by each projection. Each such product is too small to be
//! worth waking the thread pool for on its own, and q/k/v (or gate/up) share their input, so a decode step
//! hands them over together: their weight rows are cut into tasks that both threads share.

use crate::blocks::{row_dot_scalar, rows_dot_i16_simd, Int16Rows};
use crate::team::{DisjointOut, Team};
use half::bf16;

use crate::dense::dense_rows;
use crate::{simd_available, QuantMatrix};

/// A row-major weight matrix (rows × cols).
#[derive(Clone, Copy)]
pub enum Weights<'a> {
    /// GGUF Q4_1 / Q8_0 blocks, multiplied without dequantizing.
    Blocks(&'a QuantMatrix),
    Dense {
        w: &'a [f32],
        rows: usize,
        cols: usize,
    },
    /// bf16 (half of f32's bytes to stream), times activations rounded to bf16: `vdpbf16ps` dot products
    /// where the CPU has avx512_bf16 ([`crate::bf16_dot`]), else the f32 kernels below on the rounded rows.
    Bf16 {
        w: &'a [bf16],
        rows: usize,
        cols: usize,
    },
}

impl Weights<'_> {
    pub fn rows(&self) -> usize {
        match self {
            Weights::Blocks(q) => q.rows,
            Weights::Dense { rows, .. } | Weights::Bf16 { rows, .. } => *rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Weights::Blocks(q) => q.cols,
            Weights::Dense { cols, .. } | Weights::Bf16 { cols, .. } => *cols,
        }
    }
}

/// `y = x Wᵀ`: x is (m × cols), y is (m × rows), both row-major.
pub struct Product<'a> {
    pub weights: Weights<'a>,
    pub x: &'a [f32],
    pub y: &'a mut [f32],
}

/// Tasks per product and thread: one contiguous stretch of rows per thread streams from memory fastest
/// (hardware prefetchers follow one long run; 32-row tasks ran at 5.5 GB/s, one stretch per thread at 9 GB/s).
const TASKS_PER_THREAD: usize = 1;
/// Below this many multiply-adds in all, waking the pool costs more than it saves.
const PARALLEL_MIN_MACS: usize = 1 << 16;

/// Runs every product; `m` activation rows each.
pub fn run_products(products: &mut [Product], m: usize) {
    for p in products.iter() {
        assert_eq!(p.x.len(), m * p.weights.cols(), "activation shape");
        assert_eq!(p.y.len(), m * p.weights.rows(), "output shape");
    }
    let prepared: Vec<Prepared> = products.iter().map(|p| Prepared::new(p, m)).collect();
    let split = Team::global().threads() * TASKS_PER_THREAD;
    let tasks: Vec<(usize, usize, usize)> = products
        .iter()
        .enumerate()
        .flat_map(|(p, prod)| {
            let rows = prod.weights.rows();
            // An even stretch, so the two-row kernels pair rows within it; whole units of block rows.
            let align = match prod.weights {
                Weights::Blocks(q) => q.unit.max(2),
                _ => 2,
            };
            let per_task = rows.div_ceil(split).next_multiple_of(align).max(align);
            (0..rows)
                .step_by(per_task)
                .map(move |r0| (p, r0, (r0 + per_task).min(rows)))
        })
        .collect();
    // Each task writes y[i, r0..r1] of its product for every activation row i: disjoint runs of y.
    let outs: Vec<DisjointOut> = products.iter_mut().map(|p| DisjointOut::new(p.y)).collect();
    let inputs: Vec<(Weights, &[f32])> = products.iter().map(|p| (p.weights, p.x)).collect();
    let work = |t: usize| {
        let (p, r0, r1) = tasks[t];
        let ((weights, x), rows) = (inputs[p], inputs[p].0.rows());
        #[cfg(target_arch = "x86_64")]
        if let (Prepared::Bf16(xb), Weights::Bf16 { w, cols, .. }) = (&prepared[p], weights) {
            let y = crate::bf16_dot::Strided {
                ptr: outs[p].ptr(),
                row_stride: rows,
                col_stride: 1,
            };
            let y = crate::bf16_dot::Strided {
                // SAFETY: r0 < rows, within y.
                ptr: unsafe { y.ptr.add(r0) },
                ..y
            };
            // SAFETY: avx512_bf16 checked when xb was made; tasks write disjoint columns r0..r1 of y.
            unsafe { crate::bf16_dot::dot_rows(w, cols, xb, m, (r0, r1), y) };
            return;
        }
        let x = prepared[p].f32_rows().unwrap_or(x);
        let x16 = prepared[p].int16_rows();
        if m == 1 {
            // SAFETY: tasks' row ranges of one product are disjoint, and y outlives the run.
            let y = unsafe { outs[p].slice(r0, r1) };
            rows_block(weights, x, x16, m, r0, r1, y);
            return;
        }
        // part[(r - r0)·m + i] = y[i, r]
        let mut part = vec![0f32; (r1 - r0) * m];
        rows_block(weights, x, x16, m, r0, r1, &mut part);
        for i in 0..m {
            // SAFETY: as above.
            let y = unsafe { outs[p].slice(i * rows + r0, i * rows + r1) };
            for (r, v) in y.iter_mut().enumerate() {
                *v = part[r * m + i];
            }
        }
    };
    let macs: usize = inputs.iter().map(|(w, _)| w.rows() * w.cols() * m).sum();
    if macs < PARALLEL_MIN_MACS {
        (0..tasks.len()).for_each(work);
    } else {
        Team::global().run(tasks.len(), &work);
    }
}

/// A product's activation rows as its kernel reads them.
enum Prepared {
    /// As given.
    F32,
    /// Rounded to 16 bits per block, for GGUF blocks (see `blocks`).
    Int16(Int16Rows),
    /// Rounded to bf16 for `vdpbf16ps` (bf16 weights where the CPU has avx512_bf16).
    #[cfg(target_arch = "x86_64")]
    Bf16(Vec<bf16>),
    /// Rounded to bf16 and widened (bf16 weights elsewhere): the same products, in f32.
    Bf16AsF32(Vec<f32>),
}

impl Prepared {
    fn new(p: &Product, m: usize) -> Self {
        match p.weights {
            Weights::Blocks(q) if simd_available() => Prepared::Int16(Int16Rows::new(p.x, m, q)),
            #[cfg(target_arch = "x86_64")]
            Weights::Bf16 { .. } if crate::bf16_products_native() => Prepared::Bf16(
                p.x.iter()
                    .map(|v| bf16::from_bits(crate::round_bf16(*v)))
                    .collect(),
            ),
            Weights::Bf16 { .. } => Prepared::Bf16AsF32(
                p.x.iter()
                    .map(|v| f32::from_bits((crate::round_bf16(*v) as u32) << 16))
                    .collect(),
            ),
            _ => Prepared::F32,
        }
    }

    fn f32_rows(&self) -> Option<&[f32]> {
        match self {
            Prepared::Bf16AsF32(x) => Some(x),
            _ => None,
        }
    }

    fn int16_rows(&self) -> Option<&Int16Rows> {
        match self {
            Prepared::Int16(x) => Some(x),
            _ => None,
        }
    }
}

/// y[i, r] for weight rows r0..r1 and every activation row i, as `part[(r - r0) * m + i]`.
fn rows_block(
    weights: Weights,
    x: &[f32],
    x16: Option<&Int16Rows>,
    m: usize,
    r0: usize,
    r1: usize,
    part: &mut [f32],
) {
    match weights {
        Weights::Blocks(q) => {
            let cols = q.cols;
            if let Some(x16) = x16 {
                // SAFETY: AVX2, FMA and F16C are available (checked when x16 was made).
                unsafe { rows_dot_i16_simd(q, r0..r1, x16, part) };
            } else {
                for r in r0..r1 {
                    for i in 0..m {
                        part[(r - r0) * m + i] =
                            row_dot_scalar(q.row(r), &x[i * cols..(i + 1) * cols]);
                    }
                }
            }
        }
        Weights::Dense { w, cols, .. } => dense_rows(w, cols, x, m, (r0, r1), part),
        Weights::Bf16 { w, cols, .. } => dense_rows(w, cols, x, m, (r0, r1), part),
    }
}
