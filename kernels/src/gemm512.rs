//! The AVX-512 GEMM the frozen products run on: `dst (m × n) = a (m × k) · b (k × n)`, over 32-bit units of
//! k — a pair of bf16 (`vdpbf16ps`: two products a lane) or one f32 (`vfmadd`: one).
//!
//! The usual recipe (BLIS): a's rows are read in place, one unit broadcast per row and step; b is packed per
//! thread into column panels of [`NR`] columns, `panel[unit][column]`; an [`MR`] × NR register tile (24
//! accumulators, eight broadcasts and three loads a step) runs over a block of [`KU`] units, which keeps the
//! b panel in L1 while the rows of a stream by. A weight stored as rows along k (`x Wᵀ`) is packed by 16 × 16
//! transposes in registers; one stored along n (`dy W`) by copying rows (f32) or interleaving two rows (bf16).
//!
//! f32 runs here on AVX-512 CPUs instead of the `gemm` crate's kernels, which ran 64-row products with
//! k = 1536 at half speed on Zen 4 (83 against 170 GFLOP/s with its AVX2 ones).

use half::bf16;

use crate::team::{DisjointOut, Team};

/// Rows of a in one register tile.
pub(crate) const MR: usize = 8;
/// Columns of b in one register tile: three vectors of 16 f32.
pub(crate) const NR: usize = 48;
/// Units of k per packed block: a b panel (KU × NR × 4 bytes) is 24 KiB and stays in L1.
const KU: usize = 128;
/// Rows of a per block (MC × KU units = 64 KiB, in L2), run against every panel of b in turn.
const MC: usize = 128;
/// Columns of b packed at once, whole panels (≈ 0.5 MiB, in L2): the 49152-column head is not packed whole.
const NC: usize = 22 * NR;

/// A weight's elements: bf16 (units are pairs along k) or f32 (units are single values); or f32 rounded
/// to bf16 pairs as it is packed (a k × n operand by rows, such as dy in LoRA's dBᵀ = zᵀ dy: one pass
/// over it instead of rounding it whole first).
#[derive(Clone, Copy)]
pub(crate) enum Units<'a> {
    Bf16(&'a [bf16]),
    F32(&'a [f32]),
    Rounded(&'a [f32]),
}

impl Units<'_> {
    /// Elements of k in one unit.
    fn per_unit(&self) -> usize {
        match self {
            Units::Bf16(_) | Units::Rounded(_) => 2,
            Units::F32(_) => 1,
        }
    }
}

/// The right operand: `k × n`, or stored as its transpose (a weight W in `x Wᵀ`).
pub(crate) struct PackSource<'a> {
    pub w: Units<'a>,
    pub k: usize,
    pub n: usize,
    pub transposed: bool,
}

/// `dst = a · b` (or `+=`): a as `m` rows of `lda` units (bf16 pairs for a bf16 b, f32 values for an f32
/// one), on all threads of the kernel team.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL, and avx512_bf16 for a bf16 b; dst is m × n, a's rows hold ⌈k / unit⌉
/// units each.
pub(crate) unsafe fn matmul(
    dst: &mut [f32],
    (a, lda): (&[u32], usize),
    m: usize,
    b: &PackSource,
    accumulate: bool,
) {
    let team = Team::global();
    let tasks = rectangles((m, b.n), (MR, NR), team.threads());
    let out = DisjointOut::new(dst);
    let work = |t: usize| {
        // SAFETY: tasks cover disjoint rectangles of dst; the CPU's features are the caller's promise.
        unsafe { block(out.ptr(), b.n, (a, lda), b, tasks[t], accumulate) };
    };
    if tasks.len() == 1 {
        work(0);
    } else {
        team.run(tasks.len(), &work);
    }
}

/// [`crate::matmul::matmul`] on this tile where it applies — an AVX-512 CPU, the left operand stored by rows,
/// and no scaled accumulation (a scale is applied after): the LoRA products and f32 weights' `dy W`, which
/// the `gemm` crate ran at a fraction of the tile's speed on rank-32 shapes. False leaves it to the caller.
pub(crate) fn matmul_f32_avx512(
    dst: &mut [f32],
    lhs: crate::matmul::Operand,
    rhs: crate::matmul::Operand,
    scale: f32,
    accumulate: bool,
) -> bool {
    if !crate::cpu::avx512_available() || lhs.transposed || (accumulate && scale != 1.0) {
        return false;
    }
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert!(
        rhs.rows == k && dst.len() == m * n && lhs.data.len() == m * k && rhs.data.len() == k * n,
        "shapes"
    );
    if crate::matmul::empty_product(dst, (m, n, k), accumulate) {
        return true;
    }
    let b = PackSource {
        w: Units::F32(rhs.data),
        k,
        n,
        transposed: rhs.transposed,
    };
    // SAFETY: AVX-512 checked above; an f32 row is its own units (same bits, 4 bytes each).
    unsafe {
        let units = std::slice::from_raw_parts(lhs.data.as_ptr() as *const u32, lhs.data.len());
        matmul(dst, (units, k), m, &b, accumulate);
    }
    if scale != 1.0 {
        dst.iter_mut().for_each(|v| *v *= scale);
    }
    true
}

/// `y (m × n) = x (m × k) · Wᵀ` in f32 for a row-major W (n × k), where the CPU has AVX-512.
pub fn linear_f32_avx512(
    x: &[f32],
    m: usize,
    w: &[f32],
    n: usize,
    k: usize,
    y: &mut [f32],
) -> bool {
    if !crate::cpu::avx512_available() {
        return false;
    }
    assert!(
        x.len() == m * k && w.len() == n * k && y.len() == m * n,
        "shapes"
    );
    if crate::matmul::empty_product(y, (m, n, k), false) {
        return true;
    }
    let b = PackSource {
        w: Units::F32(w),
        k,
        n,
        transposed: true,
    };
    // SAFETY: AVX-512 checked above; an f32 row is its own units (same bits, 4 bytes each).
    unsafe {
        let units = std::slice::from_raw_parts(x.as_ptr() as *const u32, x.len());
        matmul(y, (units, k), m, &b, false);
    }
    true
}

/// One rectangle of (rows, columns) of the result per thread, in whole units of the register tile: the
/// columns split while each thread keeps at least two units of them, else the rows.
pub(crate) type Rectangle = ((usize, usize), (usize, usize));

pub(crate) fn rectangles(
    (m, n): (usize, usize),
    (row_unit, col_unit): (usize, usize),
    threads: usize,
) -> Vec<Rectangle> {
    let (row_parts, col_parts) = if n.div_ceil(col_unit) >= 2 * threads {
        (1, threads)
    } else {
        (threads.min(m.div_ceil(row_unit)), 1)
    };
    let rows_per = m.div_ceil(row_parts).next_multiple_of(row_unit);
    let cols_per = n.div_ceil(col_parts).next_multiple_of(col_unit);
    (0..m)
        .step_by(rows_per)
        .flat_map(|i0| {
            (0..n)
                .step_by(cols_per)
                .map(move |j0| ((i0, (i0 + rows_per).min(m)), (j0, (j0 + cols_per).min(n))))
        })
        .collect()
}

std::thread_local! {
    /// Packed panels of b, reused across calls on each thread.
    static PACKED_B: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// dst[rows, cols] (= or +=) a[rows, :] · b[:, cols] on the calling thread.
///
/// # Safety
/// As [`matmul`]; the rectangle lies within dst (row stride ldc) and no one else writes it meanwhile.
unsafe fn block(
    dst: *mut f32,
    ldc: usize,
    (a, lda): (&[u32], usize),
    b: &PackSource,
    ((i0, i1), (j0, j1)): Rectangle,
    accumulate: bool,
) {
    let unit = b.w.per_unit();
    let kc = KU * unit; // k per block
    PACKED_B.with_borrow_mut(|bp| {
        for jn in (j0..j1).step_by(NC) {
            let jn1 = (jn + NC).min(j1);
            let panels = (jn1 - jn).div_ceil(NR);
            for pc in (0..b.k).step_by(kc) {
                let units = (b.k - pc).min(kc).div_ceil(unit);
                bp.resize(panels * units * NR, 0);
                pack_b(bp, b, (pc, (pc + kc).min(b.k)), (jn, jn1), (NR, units));
                let add = accumulate || pc > 0;
                for ic in (i0..i1).step_by(MC) {
                    let mc = (i1 - ic).min(MC);
                    for jp in 0..panels {
                        let jc = jn + jp * NR;
                        let cols = (jn1 - jc).min(NR);
                        let bpan = bp.as_ptr().add(jp * units * NR);
                        for ir in (ic..ic + mc).step_by(MR) {
                            let rows = (ic + mc - ir).min(MR);
                            // Rows past the edge repeat the last one; their sums are not stored.
                            let a_rows: [*const u32; MR] = std::array::from_fn(|r| {
                                a.as_ptr().add((ir + r.min(rows - 1)) * lda + pc / unit)
                            });
                            let c = (dst.add(ir * ldc + jc), ldc);
                            match b.w {
                                Units::Bf16(_) | Units::Rounded(_) => {
                                    tile_bf16(units, a_rows, bpan, c, (rows, cols), add)
                                }
                                Units::F32(_) => {
                                    tile_f32(units, a_rows, bpan, c, (rows, cols), add)
                                }
                            }
                        }
                    }
                }
            }
        }
    })
}

/// b's k range and columns c0..c1 as panels of `nr` columns: `bp[panel][unit][column]`, each panel `stored`
/// units long (≥ the range's), zero beyond the edges.
pub(crate) fn pack_b(
    bp: &mut [u32],
    b: &PackSource,
    (p0, p1): (usize, usize),
    (c0, c1): (usize, usize),
    (nr, stored): (usize, usize),
) {
    let units = (p1 - p0).div_ceil(b.w.per_unit());
    let ragged = (p1 - p0) % b.w.per_unit() == 1;
    // Pairs of rows go to every panel at once, reading the rows in order (panel by panel read each row
    // in 64-byte pieces far apart: for an f32 dy from memory that took 3× as long).
    let pairs_by_rows = !b.transposed && !matches!(b.w, Units::F32(_));
    for (jp, panel) in bp.chunks_exact_mut(stored * nr).enumerate() {
        let j = c0 + jp * nr;
        let cols = (c1 - j).min(nr);
        if cols < nr || ragged {
            panel.fill(0);
        } else if stored > units {
            panel[units * nr..].fill(0);
        }
        if pairs_by_rows {
            continue;
        }
        // SAFETY: AVX-512 F/BW/VL are checked before any native path runs; the reads stay within b.
        unsafe {
            match (b.w, b.transposed) {
                (Units::Rounded(_), true) => unreachable!("rounded while packed from rows only"),
                (_, true) => pack_rows_as_columns(panel, nr, b, (p0, p1), (j, cols)),
                (Units::F32(w), false) => pack_rows(panel, nr, (w, b.n), (p0, p1), (j, cols)),
                (_, false) => unreachable!("packed by rows below"),
            }
        }
    }
    if pairs_by_rows {
        // SAFETY: as above; bf16 b (or rounded f32) runs on CPUs with avx512_bf16 only.
        unsafe { pack_row_pairs(bp, (nr, stored), b, (p0, p1), (c0, c1)) }
    }
}

/// Columns j.. of b stored as rows of w (n × k): column c's unit q is row j + c's unit at k = p0 + q·unit —
/// 16 rows of 16 units read and transposed in registers at a time.
#[target_feature(enable = "avx512f")]
unsafe fn pack_rows_as_columns(
    panel: &mut [u32],
    nr: usize,
    b: &PackSource,
    (p0, p1): (usize, usize),
    (j, cols): (usize, usize),
) {
    use std::arch::x86_64::*;
    let unit = b.w.per_unit();
    let full = (p1 - p0) / unit;
    // Row r of w from k = p, as 32-bit units.
    let at = |r: usize, p: usize| -> *const i32 {
        match b.w {
            Units::Bf16(w) => w.as_ptr().add(r * b.k + p) as *const i32,
            Units::F32(w) | Units::Rounded(w) => w.as_ptr().add(r * b.k + p) as *const i32,
        }
    };
    for v in 0..cols.div_ceil(16) {
        let lanes = (cols - 16 * v).min(16);
        for q0 in (0..full).step_by(16) {
            let n = (full - q0).min(16);
            let mask: __mmask16 = if n == 16 { 0xffff } else { (1 << n) - 1 };
            let rows: [__m512i; 16] = std::array::from_fn(|c| {
                if c < lanes {
                    _mm512_maskz_loadu_epi32(mask, at(j + 16 * v + c, p0 + unit * q0))
                } else {
                    _mm512_setzero_si512()
                }
            });
            let columns = transpose_16x16(rows);
            for (t, column) in columns.iter().enumerate().take(n) {
                _mm512_storeu_si512(
                    panel.as_mut_ptr().add((q0 + t) * nr + 16 * v) as *mut __m512i,
                    *column,
                );
            }
        }
    }
    if let (Units::Bf16(w), true) = (b.w, (p1 - p0) % 2 == 1) {
        for c in 0..cols {
            panel[full * nr + c] = w[(j + c) * b.k + p1 - 1].to_bits() as u32;
        }
    }
}

/// out[c][r] = rows[r][c] for 16 × 16 u32: 32-bit, then 64-bit interleaves, then two rounds of 128-bit lane
/// shuffles (64 shuffles for 256 elements, where a gather per output vector ran several times slower).
#[target_feature(enable = "avx512f")]
unsafe fn transpose_16x16(r: [std::arch::x86_64::__m512i; 16]) -> [std::arch::x86_64::__m512i; 16] {
    use std::arch::x86_64::*;
    // t: within each 128-bit lane i, rows (2a, 2a+1) interleaved: lo = elements 4i, 4i+1; hi = 4i+2, 4i+3.
    let t: [__m512i; 16] = std::array::from_fn(|x| {
        let (a, hi) = (x / 2, x % 2 == 1);
        if hi {
            _mm512_unpackhi_epi32(r[2 * a], r[2 * a + 1])
        } else {
            _mm512_unpacklo_epi32(r[2 * a], r[2 * a + 1])
        }
    });
    // u[4R + e], lane i = rows 4R..4R+3 of column 4i + e.
    let u: [__m512i; 16] = std::array::from_fn(|x| {
        let (block, e) = (x / 4, x % 4);
        let (lo, hi) = (t[4 * block + e / 2], t[4 * block + 2 + e / 2]);
        if e % 2 == 0 {
            _mm512_unpacklo_epi64(lo, hi)
        } else {
            _mm512_unpackhi_epi64(lo, hi)
        }
    });
    // For column 4i + e: lanes [u[e].i, u[4 + e].i, u[8 + e].i, u[12 + e].i].
    let mut out = [_mm512_setzero_si512(); 16];
    for e in 0..4 {
        let a = _mm512_shuffle_i32x4::<0x44>(u[e], u[4 + e]);
        let b = _mm512_shuffle_i32x4::<0xEE>(u[e], u[4 + e]);
        let c = _mm512_shuffle_i32x4::<0x44>(u[8 + e], u[12 + e]);
        let d = _mm512_shuffle_i32x4::<0xEE>(u[8 + e], u[12 + e]);
        out[e] = _mm512_shuffle_i32x4::<0x88>(a, c);
        out[4 + e] = _mm512_shuffle_i32x4::<0xDD>(a, c);
        out[8 + e] = _mm512_shuffle_i32x4::<0x88>(b, d);
        out[12 + e] = _mm512_shuffle_i32x4::<0xDD>(b, d);
    }
    out
}

/// Columns c0..c1 of a bf16 (or rounded f32) b stored as rows (k × n) into panels of `nr` columns, each
/// `stored` pairs long: column c's pair q is b[p0 + 2q][c] and b[p0 + 2q + 1][c], two rows' 16 values
/// interleaved at a time, each pair of rows read once across all the panels.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn pack_row_pairs(
    bp: &mut [u32],
    (nr, stored): (usize, usize),
    b: &PackSource,
    (p0, p1): (usize, usize),
    (c0, c1): (usize, usize),
) {
    use std::arch::x86_64::*;
    debug_assert!(nr % 16 == 0, "panels of whole 16-column strips");
    let (n, cols) = (b.n, c1 - c0);
    // 16 values of row p from column c, as bf16 bits in the low halves of 32-bit lanes.
    let row16 = |p: usize, c: usize, mask: __mmask16| -> __m512i {
        match b.w {
            Units::Bf16(w) => _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(
                mask,
                w.as_ptr().add(p * n + c) as *const i16,
            )),
            Units::Rounded(w) => {
                let x = _mm512_maskz_loadu_ps(mask, w.as_ptr().add(p * n + c));
                _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(
                    _mm512_cvtneps_pbh(x),
                ))
            }
            Units::F32(_) => unreachable!("f32 b is packed by pack_rows"),
        }
    };
    let at = |q: usize, c: usize| (c / nr) * stored * nr + q * nr + c % nr;
    let full = (p1 - p0) / 2;
    for q in 0..full {
        let p = p0 + 2 * q;
        for c in (0..cols).step_by(16) {
            let mask = lane_mask(cols - c);
            let pair = _mm512_or_si512(
                row16(p, c0 + c, mask),
                _mm512_slli_epi32::<16>(row16(p + 1, c0 + c, mask)),
            );
            _mm512_storeu_si512(bp.as_mut_ptr().add(at(q, c)) as *mut __m512i, pair);
        }
    }
    if (p1 - p0) % 2 == 1 {
        for c in (0..cols).step_by(16) {
            let mask = lane_mask(cols - c);
            _mm512_storeu_si512(
                bp.as_mut_ptr().add(at(full, c)) as *mut __m512i,
                row16(p1 - 1, c0 + c, mask),
            );
        }
    }
}

/// Columns j.. of an f32 b stored as rows (k × n): the rows' stretches copied.
#[target_feature(enable = "avx512f")]
unsafe fn pack_rows(
    panel: &mut [u32],
    nr: usize,
    (w, n): (&[f32], usize),
    (p0, p1): (usize, usize),
    (j, cols): (usize, usize),
) {
    use std::arch::x86_64::*;
    for v in 0..cols.div_ceil(16) {
        let mask = lane_mask(cols - 16 * v);
        for p in p0..p1 {
            let row = _mm512_maskz_loadu_ps(mask, w.as_ptr().add(p * n + j + 16 * v));
            _mm512_storeu_ps(
                panel.as_mut_ptr().add((p - p0) * nr + 16 * v) as *mut f32,
                row,
            );
        }
    }
}

/// The first `lanes` (≤ 16, else all) of 16.
#[inline(always)]
fn lane_mask(lanes: usize) -> u16 {
    if lanes >= 16 {
        0xffff
    } else {
        (1 << lanes) - 1
    }
}

/// Adds (or stores) a tile's rows × cols sums at c: a macro, so the accumulators stay in registers (as a
/// function it was not inlined, and the tile spilled them: 9% of a product).
macro_rules! store_tile {
    ($acc:expr, $c:expr, $size:expr, $add:expr) => {
        let ((c, ldc), (rows, cols)): ((*mut f32, usize), (usize, usize)) = ($c, $size);
        for (r, acc_r) in $acc.iter().enumerate().take(rows) {
            for (v, sum) in acc_r.iter().enumerate() {
                let lanes = cols.saturating_sub(16 * v).min(16);
                if lanes == 0 {
                    break;
                }
                let mask = lane_mask(lanes);
                let p = c.add(r * ldc + 16 * v);
                let mut s = *sum;
                if $add {
                    s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(mask, p));
                }
                _mm512_mask_storeu_ps(p, mask, s);
            }
        }
    };
}

/// The bf16 register tile: `units` steps of MR broadcast pairs (row r's pair q at `a[r] + q`) × three
/// vectors of the panel, `vdpbf16ps` each.
///
/// # Safety
/// avx512f and avx512bf16; each a[r] points to `units` u32, b to a packed panel of `units` steps; c to rows ×
/// cols writable f32 with row stride ldc.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_bf16(
    units: usize,
    a: [*const u32; MR],
    b: *const u32,
    c: (*mut f32, usize),
    size: (usize, usize),
    add: bool,
) {
    use std::arch::x86_64::*;
    let bh = |v: __m512i| std::mem::transmute::<__m512i, __m512bh>(v);
    let mut acc = [[_mm512_setzero_ps(); 3]; MR];
    for q in 0..units {
        let bq = b.add(q * NR) as *const __m512i;
        let bv = [
            bh(_mm512_loadu_si512(bq)),
            bh(_mm512_loadu_si512(bq.add(1))),
            bh(_mm512_loadu_si512(bq.add(2))),
        ];
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let av = bh(_mm512_set1_epi32(*a[r].add(q) as i32));
            for (v, acc_rv) in acc_r.iter_mut().enumerate() {
                *acc_rv = _mm512_dpbf16_ps(*acc_rv, av, bv[v]);
            }
        }
    }
    store_tile!(acc, c, size, add);
}

/// The f32 register tile: as [`tile_bf16`] with one f32 a unit and an FMA.
///
/// # Safety
/// avx512f; as [`tile_bf16`].
#[target_feature(enable = "avx512f")]
unsafe fn tile_f32(
    units: usize,
    a: [*const u32; MR],
    b: *const u32,
    c: (*mut f32, usize),
    size: (usize, usize),
    add: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 3]; MR];
    for q in 0..units {
        let bq = b.add(q * NR) as *const f32;
        let bv = [
            _mm512_loadu_ps(bq),
            _mm512_loadu_ps(bq.add(16)),
            _mm512_loadu_ps(bq.add(32)),
        ];
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(f32::from_bits(*a[r].add(q)));
            for (v, acc_rv) in acc_r.iter_mut().enumerate() {
                *acc_rv = _mm512_fmadd_ps(av, bv[v], *acc_rv);
            }
        }
    }
    store_tile!(acc, c, size, add);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::tests::{fill, naive};
    use crate::matmul::Operand;

    /// The f32 GEMM against plain loops: edges in every direction (rows not a multiple of MR, columns of
    /// NR, k across blocks and not a multiple of 16), both layouts of b, overwrite and accumulate.
    #[test]
    fn f32_products_match_the_naive_ones() {
        if !crate::cpu::avx512_available() {
            eprintln!("this CPU has no AVX-512: the f32 tile is not tested here");
            return;
        }
        for (m, k, n) in [
            (1, 1, 1),
            (9, 7, 50),
            (17, 300, 97),
            (150, 141, 130),
            (64, 1536, 576),
        ] {
            let (a, w) = (fill(m * k, 11), fill(n * k, 12));
            for transposed in [true, false] {
                let b = PackSource {
                    w: Units::F32(&w),
                    k,
                    n,
                    transposed,
                };
                let rhs = if transposed {
                    Operand::t(&w, n, k)
                } else {
                    Operand::new(&w, k, n)
                };
                let want = naive(Operand::new(&a, m, k), rhs);
                for accumulate in [false, true] {
                    let mut y = vec![if accumulate { 1.0 } else { f32::NAN }; m * n];
                    // SAFETY: AVX-512 checked above; an f32 row is its own units.
                    unsafe {
                        let units = std::slice::from_raw_parts(a.as_ptr() as *const u32, a.len());
                        matmul(&mut y, (units, k), m, &b, accumulate);
                    }
                    for (i, (g, w)) in y.iter().zip(&want).enumerate() {
                        let w = if accumulate { w + 1.0 } else { *w };
                        assert!(
                            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                            "{m}×{k}×{n} transposed {transposed} += {accumulate} [{i}]: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }
}
