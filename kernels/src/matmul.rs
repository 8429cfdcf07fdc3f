//! Products of row-major f32 matrices, either operand possibly transposed, as direct calls to the `gemm`
//! crate (the GEMM Candle uses): the destination can be accumulated into, and a product can run on the
//! calling thread alone inside tasks that are already parallel.

use gemm::Parallelism;

/// A row-major matrix, or the transpose of one: `rows × cols` as the product sees it.
#[derive(Clone, Copy)]
pub struct Operand<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    /// Stored as its transpose (cols × rows, row-major).
    pub transposed: bool,
}

impl<'a> Operand<'a> {
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Operand {
            data,
            rows,
            cols,
            transposed: false,
        }
    }

    /// The transpose of a row-major `rows × cols` matrix: `cols × rows`.
    pub fn t(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Operand {
            data,
            rows: cols,
            cols: rows,
            transposed: true,
        }
    }

    /// (row stride, column stride) of the logical matrix.
    fn strides(&self) -> (isize, isize) {
        if self.transposed {
            (1, self.rows as isize)
        } else {
            (self.cols as isize, 1)
        }
    }
}

/// `dst (m × n) = scale · lhs · rhs`, or `dst += scale · lhs · rhs` with `accumulate`, on all threads of the
/// [`Team`](crate::Team): the larger of dst's dimensions split (the gemm crate's rayon split left the team's
/// helper spinning, between the team's jobs, on a core that rayon's workers wanted).
pub fn matmul(dst: &mut [f32], lhs: Operand, rhs: Operand, scale: f32, accumulate: bool) {
    #[cfg(target_arch = "x86_64")]
    if crate::gemm512::matmul_f32_avx512(dst, lhs, rhs, scale, accumulate) {
        return;
    }
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if m * n * k < TEAM_MIN_MACS || crate::Team::global().threads() == 1 {
        return gemm_call(dst, lhs, rhs, scale, accumulate);
    }
    gemm_split(dst, lhs, rhs, (scale, accumulate), m >= n);
}

/// Below this many multiply-adds a product runs on the calling thread alone.
const TEAM_MIN_MACS: usize = 1 << 18;

/// [`matmul`] on the calling thread only: for small products inside tasks that are already parallel.
pub fn matmul_serial(dst: &mut [f32], lhs: Operand, rhs: Operand, scale: f32, accumulate: bool) {
    gemm_call(dst, lhs, rhs, scale, accumulate);
}

/// `y (m × n) = x (m × k) · Wᵀ` for a row-major W (n × k): W's rows split into one stretch per thread of the
/// [`Team`](crate::Team), each stretch one single-threaded GEMM into its columns of y. For prefill-sized
/// products (tens to hundreds of rows) this avoids the GEMM's rayon hand-offs, whose idle workers yield and
/// sleep between the ~200 products of a forward pass.
pub fn linear_team(x: &[f32], m: usize, w: &[f32], n: usize, k: usize, y: &mut [f32]) {
    assert!(
        x.len() == m * k && w.len() == n * k && y.len() == m * n,
        "shapes"
    );
    if m == 0 || n == 0 {
        return;
    }
    let (lhs, rhs) = (Operand::new(x, m, k), Operand::t(w, n, k));
    gemm_split(y, lhs, rhs, (1.0, false), false);
}

/// `dst (=|+=) scale · lhs · rhs` with dst's rows (or columns) in one stretch per team thread, each a
/// single-threaded GEMM.
fn gemm_split(
    dst: &mut [f32],
    lhs: Operand,
    rhs: Operand,
    (scale, accumulate): (f32, bool),
    by_rows: bool,
) {
    let (m, k, n) = shapes(dst, lhs, rhs);
    let team = crate::Team::global();
    let long = if by_rows { m } else { n };
    // Whole 16-row or 16-column panels, so each GEMM keeps its full-width tiles.
    let per = long.div_ceil(team.threads()).next_multiple_of(16);
    let (lrs, lcs) = lhs.strides();
    let (rrs, rcs) = rhs.strides();
    let out = crate::team::DisjointOut::new(dst);
    team.run(long.div_ceil(per), &|t| {
        let (s0, s1) = (t * per, ((t + 1) * per).min(long));
        // Task t's rows (or columns) of dst, and the rows of lhs (columns of rhs) they need.
        let (rows, cols, d0, l0, r0) = if by_rows {
            (s1 - s0, n, s0 * n, s0 as isize * lrs, 0)
        } else {
            (m, s1 - s0, s0, 0, s0 as isize * rcs)
        };
        // SAFETY: task t writes only its own rows (columns) of dst, within m × n (disjoint across tasks);
        // the offsets and strides stay within lhs (m × k) and rhs (k × n), which dst aliases neither.
        unsafe {
            gemm::gemm(
                rows,
                cols,
                k,
                out.ptr().add(d0),
                1,
                n as isize,
                accumulate,
                lhs.data.as_ptr().offset(l0),
                lcs,
                lrs,
                rhs.data.as_ptr().offset(r0),
                rcs,
                rrs,
                1.0,
                scale,
                false,
                false,
                false,
                Parallelism::None,
            )
        }
    });
}

/// Whether a product with an empty dimension is done: nothing to write, or (k = 0) zeros unless accumulating.
pub(crate) fn empty_product(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) -> bool {
    if k == 0 && !accumulate {
        dst.fill(0.0);
    }
    m == 0 || n == 0 || k == 0
}

/// (m, k, n) of `dst (m × n) = lhs (m × k) · rhs (k × n)`, every slice checked against them.
fn shapes(dst: &[f32], lhs: Operand, rhs: Operand) -> (usize, usize, usize) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert_eq!(rhs.rows, k, "inner dimensions differ");
    assert_eq!(dst.len(), m * n, "destination is not {m} × {n}");
    assert_eq!(lhs.data.len(), m * k, "lhs is not {m} × {k}");
    assert_eq!(rhs.data.len(), k * n, "rhs is not {k} × {n}");
    (m, k, n)
}

/// One single-threaded gemm call (the team splits above it).
fn gemm_call(dst: &mut [f32], lhs: Operand, rhs: Operand, scale: f32, accumulate: bool) {
    let (m, k, n) = shapes(dst, lhs, rhs);
    if empty_product(dst, (m, n, k), accumulate) {
        return;
    }
    let (lrs, lcs) = lhs.strides();
    let (rrs, rcs) = rhs.strides();
    // SAFETY: the asserts above bound every index the strides reach within the three slices, and `dst`
    // is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lcs,
            lrs,
            rhs.data.as_ptr(),
            rcs,
            rrs,
            1.0,
            scale,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Plain triple loop: the reference.
    pub(crate) fn naive(lhs: Operand, rhs: Operand) -> Vec<f32> {
        let at = |o: &Operand, i: usize, j: usize| {
            if o.transposed {
                o.data[j * o.rows + i]
            } else {
                o.data[i * o.cols + j]
            }
        };
        let mut y = vec![0f32; lhs.rows * rhs.cols];
        for i in 0..lhs.rows {
            for j in 0..rhs.cols {
                y[i * rhs.cols + j] = (0..lhs.cols).map(|p| at(&lhs, i, p) * at(&rhs, p, j)).sum();
            }
        }
        y
    }

    pub(crate) fn fill(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    pub(crate) fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn team_linear_matches_the_naive_product() {
        // Column stretches of 16-wide panels with a ragged last one; a single row; a single column.
        for (m, k, n) in [(37, 29, 70), (1, 64, 33), (5, 8, 1)] {
            let (x, w) = (fill(m * k, 3), fill(n * k, 4));
            let want = naive(Operand::new(&x, m, k), Operand::t(&w, n, k));
            let mut y = vec![f32::NAN; m * n];
            linear_team(&x, m, &w, n, k, &mut y);
            assert!(max_diff(&y, &want) < 1e-5, "{m}×{k}×{n}");
        }
    }

    #[test]
    fn matmul_matches_the_naive_product_in_every_layout() {
        for (m, k, n) in [(7, 13, 5), (130, 64, 40), (40, 70, 150)] {
            every_layout(m, k, n);
        }
    }

    /// Small (one thread), and above TEAM_MIN_MACS split by rows (m ≥ n) and by columns, ragged stretches.
    fn every_layout(m: usize, k: usize, n: usize) {
        let (a, b) = (fill(m * k, 1), fill(k * n, 2));
        for (lt, rt) in [(false, false), (true, false), (false, true), (true, true)] {
            let lhs = if lt {
                Operand::t(&a, k, m)
            } else {
                Operand::new(&a, m, k)
            };
            let rhs = if rt {
                Operand::t(&b, n, k)
            } else {
                Operand::new(&b, k, n)
            };
            let want = naive(lhs, rhs);
            let acc: Vec<f32> = want.iter().map(|w| 1.0 + 0.5 * w).collect();
            let mut y = vec![1f32; m * n];
            matmul(&mut y, lhs, rhs, 0.5, true);
            assert!(max_diff(&y, &acc) < 1e-4, "{m}×{k}×{n} layout {lt} {rt}");
            for by_rows in [false, true] {
                let mut y = vec![1f32; m * n];
                gemm_split(&mut y, lhs, rhs, (0.5, true), by_rows);
                let what = format!("split by rows {by_rows}, {m}×{k}×{n} layout {lt} {rt}");
                assert!(max_diff(&y, &acc) < 1e-4, "{what}");
            }
            let mut y = vec![1f32; m * n];
            matmul_serial(&mut y, lhs, rhs, 0.5, false);
            let plain: Vec<f32> = want.iter().map(|w| 0.5 * w).collect();
            assert!(max_diff(&y, &plain) < 1e-4, "serial, layout {lt} {rt}");
        }
    }
}
