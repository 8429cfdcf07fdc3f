//! bf16 × bf16 → f32 products: `dst (m × n) = a (m × k) · b (k × n)` with both operands rounded to bf16
//! (round to nearest even) and every product summed in f32 — what PyTorch's bf16 autocast and cuBLAS do,
//! except that the result stays f32 instead of being rounded to bf16 once more.
//!
//! On CPUs with avx512_bf16 the inner loop is `vdpbf16ps`: 16 f32 lanes, each adding the two products of a
//! pair of adjacent k, 64 flops an instruction where an f32 FMA does 32. The layout follows the usual
//! GEMM recipe (BLIS): `a` is rounded once into rows of bf16 pairs along k (one u32 each), which the tile
//! reads in place, `b` is packed per thread into column panels of [`NR`] columns of such pairs, and a
//! register tile of [`MR`] × NR f32 sums runs over a block of [`KC`] k. Elsewhere the operands are rounded the same way and multiplied by the f32 GEMM
//! ([`matmul`](crate::matmul)): the same products, summed in another order.
//!
//! The reference for both is [`tests::naive_bf16`]: a triple loop over the rounded operands.

use half::bf16;

#[cfg(target_arch = "x86_64")]
use crate::amx::Term;
use crate::cpu::bf16_products_native;
#[cfg(target_arch = "x86_64")]
use crate::gemm512::{PackSource, Units};
use crate::matmul::{matmul, Operand};
use crate::team::zeroed;
#[cfg(target_arch = "x86_64")]
use crate::team::{DisjointOut, Team};

/// A matrix's elements as stored: f32 (rounded to bf16 as they are packed) or bf16.
#[derive(Clone, Copy)]
pub enum Elements<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl Elements<'_> {
    pub fn len(&self) -> usize {
        match self {
            Elements::F32(v) => v.len(),
            Elements::Bf16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` as bf16 bits (the tests' reference).
    #[cfg(test)]
    fn bits(&self, i: usize) -> u32 {
        match self {
            Elements::F32(v) => round_bf16(v[i]) as u32,
            Elements::Bf16(v) => v[i].to_bits() as u32,
        }
    }

    /// Every element as the f32 value of its bf16 rounding.
    fn rounded_f32(&self) -> Vec<f32> {
        match self {
            Elements::F32(v) => v
                .iter()
                .map(|x| f32::from_bits((round_bf16(*x) as u32) << 16))
                .collect(),
            Elements::Bf16(v) => {
                let mut out = vec![0f32; v.len()];
                crate::bf16_to_f32(v, &mut out);
                out
            }
        }
    }
}

/// The right operand, `rows × cols` as the product sees it (rows = k, cols = n).
#[derive(Clone, Copy)]
pub struct Bf16Operand<'a> {
    pub elems: Elements<'a>,
    pub rows: usize,
    pub cols: usize,
    /// Stored as its transpose (cols × rows, row-major): a weight W in `x Wᵀ`.
    pub transposed: bool,
}

impl<'a> Bf16Operand<'a> {
    /// An f32 matrix (rounded to bf16 as it is packed), `rows × cols` as the product sees it.
    pub fn f32(v: &'a [f32], rows: usize, cols: usize, transposed: bool) -> Self {
        Bf16Operand {
            elems: Elements::F32(v),
            rows,
            cols,
            transposed,
        }
    }

    /// Element (p, j) as bf16 bits (the tests' reference).
    #[cfg(test)]
    fn bits(&self, p: usize, j: usize) -> u32 {
        if self.transposed {
            self.elems.bits(j * self.rows + p)
        } else {
            self.elems.bits(p * self.cols + j)
        }
    }
}

/// f32 → bf16 bits as `vcvtneps2bf16` rounds: to nearest even, NaN stays NaN, subnormals become zero
/// (keeping their sign).
#[inline(always)]
pub fn round_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    if x.is_subnormal() {
        return (b >> 16) as u16 & 0x8000;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// `dst (m × n) = a (m × k) · b`, or `dst +=` with `accumulate`; a is row-major f32, both operands rounded
/// to bf16, products summed in f32, on all threads of the kernel team.
pub fn matmul_bf16(dst: &mut [f32], a: &[f32], m: usize, b: Bf16Operand, accumulate: bool) {
    let (k, n) = (b.rows, b.cols);
    assert_eq!(a.len(), m * k, "a is not {m} × {k}");
    assert_eq!(b.elems.len(), k * n, "b is not {k} × {n}");
    assert_eq!(dst.len(), m * n, "destination is not {m} × {n}");
    if bf16_products_native() {
        // SAFETY: the CPU has avx512f and avx512bf16 (checked); shapes checked above.
        unsafe { native(dst, a, m, b, accumulate) }
    } else {
        emulated(dst, a, m, b, accumulate)
    }
}

/// A left operand rounded to bf16 pairs once, for several products (a projection's frozen weight and its
/// LoRA matrix share their input): every [`Bf16Rows::matmul`] is [`matmul_bf16`] without converting a again.
pub struct Bf16Rows<'a> {
    a: &'a [f32],
    m: usize,
    k: usize,
    /// a's pairs padded for the AMX tiles, laid out for them where AMX runs (else by rows, for the AVX-512
    /// kernel), and their row length in pairs; None where the products are emulated.
    #[cfg(target_arch = "x86_64")]
    pairs: Option<(PairRows, usize)>,
}

impl<'a> Bf16Rows<'a> {
    /// a (m × k, row-major f32).
    pub fn new(a: &'a [f32], m: usize, k: usize) -> Self {
        assert_eq!(a.len(), m * k, "a is not {m} × {k}");
        #[cfg(target_arch = "x86_64")]
        let pairs = (bf16_products_native() && m * k > 0).then(|| {
            let lda = crate::amx::tile_row_pairs(k);
            // Decided on the calling thread, outside any team job: the probe runs products of its own.
            let layout = if crate::amx::amx_available() {
                PairLayout::Tiles
            } else {
                PairLayout::Rows
            };
            let rows = m.next_multiple_of(32);
            (rows_of_pairs(a, m, k, (lda, rows), layout), lda)
        });
        Self {
            a,
            m,
            k,
            #[cfg(target_arch = "x86_64")]
            pairs,
        }
    }

    /// `dst (m × n) = a · b`, or `dst +=` with `accumulate`, as [`matmul_bf16`].
    pub fn matmul(&self, dst: &mut [f32], b: Bf16Operand, accumulate: bool) {
        let (m, k, n) = (self.m, b.rows, b.cols);
        assert_eq!(k, self.k, "b has {k} rows, a {} columns", self.k);
        assert_eq!(b.elems.len(), k * n, "b is not {k} × {n}");
        assert_eq!(dst.len(), m * n, "destination is not {m} × {n}");
        #[cfg(target_arch = "x86_64")]
        if let Some((pairs, lda)) = &self.pairs {
            // SAFETY: the pairs exist only where the CPU has avx512f and avx512bf16; shapes checked above.
            return unsafe { native_pairs(dst, (pairs, *lda), m, b, accumulate) };
        }
        if crate::matmul::empty_product(dst, (m, n, k), accumulate) {
            return;
        }
        emulated(dst, self.a, m, b, accumulate)
    }

    /// a's rows (m).
    pub fn rows(&self) -> usize {
        self.m
    }
}

/// One product of a sum [`matmul_sum`]: a left operand rounded once and a right operand.
pub type Bf16Term<'a, 'b> = (&'b Bf16Rows<'a>, Bf16Operand<'b>);

/// `dst (m × n) = Σ aᵢ · bᵢ` (or `+=` with `accumulate`) over the terms, every aᵢ with m rows and every bᵢ with
/// n columns: on AMX each block of sums takes every product in the tiles before one store (LoRA's rank-r
/// term beside the frozen product, the projections that share an input summed into one gradient), without
/// a pass over dst per product; elsewhere one product after the other.
pub fn matmul_sum(dst: &mut [f32], terms: &[Bf16Term], accumulate: bool) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: dst is initialized.
    if unsafe { sum_on_tiles(crate::team::as_uninit(dst), terms, accumulate) } {
        return;
    }
    for (i, (a, b)) in terms.iter().enumerate() {
        a.matmul(dst, *b, accumulate || i > 0);
    }
}

/// [`matmul_sum`] into a new m × n buffer, not zeroed first where the tiles run: they store every block of
/// sums whole (zeroing the outputs had been a tenth of a training step).
pub fn product_sum(terms: &[Bf16Term]) -> Vec<f32> {
    let len = terms[0].0.m * terms[0].1.cols;
    #[cfg(target_arch = "x86_64")]
    {
        let mut dst = Vec::with_capacity(len);
        // SAFETY: without accumulate nothing is read; where it runs, every element is written.
        if unsafe { sum_on_tiles(&mut dst.spare_capacity_mut()[..len], terms, false) } {
            // SAFETY: all len elements were written.
            unsafe { dst.set_len(len) };
            return dst;
        }
    }
    let mut dst = zeroed(len);
    matmul_sum(&mut dst, terms, false);
    dst
}

/// Every product on AMX tiles where every left operand is laid out for them; false (nothing written)
/// elsewhere.
///
/// # Safety
/// With `accumulate` dst is initialized.
#[cfg(target_arch = "x86_64")]
unsafe fn sum_on_tiles(
    dst: &mut [std::mem::MaybeUninit<f32>],
    terms: &[Bf16Term],
    accumulate: bool,
) -> bool {
    let Some((first, b0)) = terms.first() else {
        return false;
    };
    let (m, n) = (first.m, b0.cols);
    assert_eq!(dst.len(), m * n, "destination is not {m} × {n}");
    let mut tiles = Vec::with_capacity(terms.len());
    for (a, b) in terms {
        assert_eq!(a.m, m, "every product has {m} rows");
        assert_eq!(b.cols, n, "every product has {n} columns");
        assert_eq!(b.rows, a.k, "b has {} rows, a {} columns", b.rows, a.k);
        assert_eq!(b.elems.len(), b.rows * n, "b is not {} × {n}", b.rows);
        match &a.pairs {
            Some((p, lda)) if p.layout == PairLayout::Tiles && b.rows > 0 => {
                tiles.push((p.as_slice(), *lda))
            }
            _ => return false,
        }
    }
    let rounded: Vec<_> = terms.iter().map(|(_, b)| rounded_copy(*b)).collect();
    let sources: Vec<PackSource> = terms
        .iter()
        .zip(&rounded)
        .map(|((_, b), r)| source(*b, r))
        .collect();
    let terms: Vec<Term> = tiles
        .iter()
        .zip(&sources)
        .map(|(&(a, lda), b)| Term { a, lda, b })
        .collect();
    // SAFETY: Tiles layouts exist only where AMX runs; shapes checked above; accumulate reads dst only
    // where the caller promises it initialized.
    unsafe { crate::amx::matmul_terms(dst, &terms, m, accumulate) };
    true
}

/// f32 b stored transposed (LoRA's A and B, small) rounded first, for [`source`].
#[cfg(target_arch = "x86_64")]
fn rounded_copy(b: Bf16Operand) -> Option<Vec<bf16>> {
    match (b.elems, b.transposed) {
        (Elements::F32(v), true) => Some(round_slice(v)),
        _ => None,
    }
}

/// b as the packers read it: bf16 as stored; f32 by rows rounded as it is packed; f32 stored transposed
/// from its [`rounded_copy`].
#[cfg(target_arch = "x86_64")]
fn source<'b>(b: Bf16Operand<'b>, rounded: &'b Option<Vec<bf16>>) -> PackSource<'b> {
    let w = match (b.elems, rounded) {
        (_, Some(r)) => Units::Bf16(r),
        (Elements::Bf16(v), None) => Units::Bf16(v),
        (Elements::F32(v), None) => Units::Rounded(v),
    };
    PackSource {
        w,
        k: b.rows,
        n: b.cols,
        transposed: b.transposed,
    }
}

/// [`source`] handed to `f`.
#[cfg(target_arch = "x86_64")]
fn with_source<R>(b: Bf16Operand, f: impl FnOnce(&PackSource) -> R) -> R {
    let rounded = rounded_copy(b);
    f(&source(b, &rounded))
}

/// [`native`]'s GEMM on a's rows already in pairs (padded as [`Bf16Rows`] pads them): on AMX tiles where
/// they are laid out for them, else on AVX-512.
#[cfg(target_arch = "x86_64")]
unsafe fn native_pairs(
    dst: &mut [f32],
    (pairs, lda): (&PairRows, usize),
    m: usize,
    b: Bf16Operand,
    accumulate: bool,
) {
    let (k, n) = (b.rows, b.cols);
    if crate::matmul::empty_product(dst, (m, n, k), accumulate) {
        return;
    }
    let a = pairs.as_slice();
    with_source(b, |b| match pairs.layout {
        PairLayout::Tiles => {
            let dst = crate::team::as_uninit(dst);
            crate::amx::matmul_terms(dst, &[Term { a, lda, b }], m, accumulate)
        }
        PairLayout::Rows => crate::gemm512::matmul(dst, (a, lda), m, b, accumulate),
    })
}

/// The same products through the f32 GEMM: the operands rounded to bf16 and widened back, so each product
/// is exact and only the order of the f32 sums differs from the native path.
pub fn matmul_bf16_emulated(
    dst: &mut [f32],
    a: &[f32],
    m: usize,
    b: Bf16Operand,
    accumulate: bool,
) {
    let (k, n) = (b.rows, b.cols);
    assert_eq!(a.len(), m * k, "a is not {m} × {k}");
    assert_eq!(b.elems.len(), k * n, "b is not {k} × {n}");
    assert_eq!(dst.len(), m * n, "destination is not {m} × {n}");
    emulated(dst, a, m, b, accumulate)
}

fn emulated(dst: &mut [f32], a: &[f32], m: usize, b: Bf16Operand, accumulate: bool) {
    let (k, n) = (b.rows, b.cols);
    let a = Elements::F32(a).rounded_f32();
    let bw = b.elems.rounded_f32();
    match (b.transposed, accumulate) {
        // `x Wᵀ` as the f32 prefill runs it (rayon's GEMM ran 64 rows at half the team's speed).
        (true, false) => {
            #[cfg(target_arch = "x86_64")]
            if crate::gemm512::linear_f32_avx512(&a, m, &bw, n, k, dst) {
                return;
            }
            crate::matmul::linear_team(&a, m, &bw, n, k, dst)
        }
        (true, true) => matmul(
            dst,
            Operand::new(&a, m, k),
            Operand::t(&bw, n, k),
            1.0,
            true,
        ),
        (false, _) => matmul(
            dst,
            Operand::new(&a, m, k),
            Operand::new(&bw, k, n),
            1.0,
            accumulate,
        ),
    }
}

#[cfg(target_arch = "x86_64")]
unsafe fn native(dst: &mut [f32], a: &[f32], m: usize, b: Bf16Operand, accumulate: bool) {
    let (k, n) = (b.rows, b.cols);
    if crate::matmul::empty_product(dst, (m, n, k), accumulate) {
        return;
    }
    if let (Elements::Bf16(w), true, false) = (b.elems, b.transposed, accumulate) {
        if m <= DOT_MAX_ROWS {
            return few_rows(dst, a, m, w, k, n);
        }
    }
    Bf16Rows::new(a, m, k).matmul(dst, b, accumulate)
}

/// The AVX-512 GEMM on bf16 pairs: a rounded once into rows of pairs, which the tile reads in place.
///
/// # Safety
/// The CPU must have what [`bf16_products_native`] checks; shapes as [`matmul_bf16`] checks them.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn avx512_matmul(
    dst: &mut [f32],
    a: &[f32],
    m: usize,
    b: &PackSource,
    accumulate: bool,
) {
    let lda = b.k.div_ceil(2);
    let a_pairs = rows_of_pairs(a, m, b.k, (lda, m), PairLayout::Rows);
    crate::gemm512::matmul(dst, (a_pairs.as_slice(), lda), m, b, accumulate);
}

/// Up to this many rows of a, `a · wᵀ` with w stored along k runs as dot products
/// ([`crate::bf16_dot`]), without packing w: at 64 rows packing the weight cost a fifth of the product.
#[cfg(target_arch = "x86_64")]
const DOT_MAX_ROWS: usize = 32;

/// dst = a · wᵀ for a few rows of a, the team splitting w's rows.
#[cfg(target_arch = "x86_64")]
unsafe fn few_rows(dst: &mut [f32], a: &[f32], m: usize, w: &[bf16], k: usize, n: usize) {
    use crate::bf16_dot::{dot_rows, Strided};
    let x = round_slice(a);
    let team = Team::global();
    let per = n.div_ceil(team.threads()).next_multiple_of(16);
    let out = DisjointOut::new(dst);
    team.run(n.div_ceil(per), &|t| {
        let (r0, r1) = (t * per, ((t + 1) * per).min(n));
        let y = Strided {
            // SAFETY: r0 < n, within dst's first row.
            ptr: unsafe { out.ptr().add(r0) },
            row_stride: n,
            col_stride: 1,
        };
        // SAFETY: avx512_bf16 checked by the caller; tasks write disjoint columns r0..r1 of dst.
        unsafe { dot_rows(w, k, &x, m, (r0, r1), y) };
    });
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn native(dst: &mut [f32], a: &[f32], m: usize, b: Bf16Operand, accumulate: bool) {
    emulated(dst, a, m, b, accumulate)
}

/// How [`rows_of_pairs`] lays a's pairs out.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum PairLayout {
    /// Row after row, `lda` pairs each: the AVX-512 kernel reads the rows in place.
    Rows,
    /// As the AMX tiles load them: per block of 32 rows, per 16 pairs of k, two tiles (rows 0–15, then
    /// 16–31) of 16 rows × 16 pairs, each 1 KiB in a row. A block's tiles for all of k are one contiguous
    /// run, so the tiles read a in place instead of copying it per block (the copy and its cache misses
    /// were a sixth of the AMX driver's time).
    Tiles,
}

#[cfg(target_arch = "x86_64")]
impl PairLayout {
    /// Where row r's pairs start, and how far apart its runs of 16 pairs lie.
    fn row(self, r: usize, lda: usize) -> (usize, usize) {
        match self {
            PairLayout::Rows => (r * lda, 16),
            // Row r of its block is row r % 16 of tile (r % 32) / 16: (r % 32) · 16 pairs in.
            PairLayout::Tiles => (r / 32 * 32 * lda + r % 32 * 16, 32 * 16),
        }
    }
}

/// a's rows as bf16 pairs ([`rows_of_pairs`]), starting on a cache line so that every row of a tile load
/// (a multiple of 16 pairs apart) is whole lines.
#[cfg(target_arch = "x86_64")]
pub(crate) struct PairRows {
    buf: Vec<u32>,
    start: usize,
    pub(crate) layout: PairLayout,
}

#[cfg(target_arch = "x86_64")]
impl PairRows {
    pub(crate) fn as_slice(&self) -> &[u32] {
        &self.buf[self.start..]
    }
}

/// Rows of a converted per task of the team: below this many values one thread does it all.
#[cfg(target_arch = "x86_64")]
const PAIRS_PER_TEAM_TASK: usize = 1 << 15;

/// a (m × k f32) as `rows` rows of `lda` bf16 pairs (the low half the even k): ⌈k/2⌉ pairs of each of a's
/// rows, a zero high half past an odd k, zeros after (padding for the AMX tiles), laid out as `layout`
/// says ([`PairLayout::Tiles`] wants `lda` a multiple of 16 and `rows` of 32). The team converts disjoint
/// blocks of 32 rows: at 1024 rows one thread alone took ~9% of a training step while the other waited.
#[cfg(target_arch = "x86_64")]
pub(crate) fn rows_of_pairs(
    a: &[f32],
    m: usize,
    k: usize,
    (lda, rows): (usize, usize),
    layout: PairLayout,
) -> PairRows {
    assert!(lda >= k.div_ceil(2) && rows >= m, "padding, not truncation");
    assert!(a.len() >= m * k, "a holds m rows of k");
    if layout == PairLayout::Tiles {
        assert!(lda % 16 == 0 && rows % 32 == 0, "whole tiles");
    }
    let mut buf: Vec<u32> = Vec::with_capacity(rows * lda + 15);
    let start = buf.as_ptr().align_offset(64).min(15);
    let out = DisjointOut::new(&mut buf.spare_capacity_mut()[..start + rows * lda]);
    let team = Team::global();
    let tasks = (rows * lda / PAIRS_PER_TEAM_TASK).clamp(1, 2 * team.threads());
    let per = rows.div_ceil(tasks).next_multiple_of(32);
    team.run(rows.div_ceil(per), &|t| {
        for r in t * per..((t + 1) * per).min(rows) {
            let (at, stride) = layout.row(r, lda);
            let row = if r < m { &a[r * k..(r + 1) * k] } else { &[] };
            // SAFETY: each task writes its own blocks of rows (every layout keeps a block's rows within
            // the block's 32 · lda pairs), all lda pairs of each row; avx512bf16 is checked before the
            // native path runs.
            unsafe { pair_row(row, out.ptr().add(start + at).cast(), lda, stride) };
        }
    });
    // SAFETY: the first `start` elements are not read; all rows · lda after them were written above.
    unsafe { buf.set_len(start + rows * lda) };
    PairRows { buf, start, layout }
}

/// One row rounded into `lda` pairs (zeros past the row's end), 32 values a `vcvtne2ps2bf16`; its runs of
/// 16 pairs `stride` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pair_row(row: &[f32], dst: *mut u32, lda: usize, stride: usize) {
    use std::arch::x86_64::*;
    let at = |q: usize| dst.add(q / 16 * stride + q % 16);
    let mut q = 0;
    while 2 * q + 32 <= row.len() {
        let lo = _mm512_loadu_ps(row.as_ptr().add(2 * q));
        let hi = _mm512_loadu_ps(row.as_ptr().add(2 * q + 16));
        let v = _mm512_cvtne2ps_pbh(hi, lo);
        _mm512_storeu_si512(
            at(q) as *mut __m512i,
            std::mem::transmute::<__m512bh, __m512i>(v),
        );
        q += 16;
    }
    let half = |i: usize| row.get(i).map_or(0, |v| round_bf16(*v) as u32);
    while q < lda {
        at(q).write(half(2 * q) | half(2 * q + 1) << 16);
        q += 1;
    }
}

/// f32 → bf16 for a whole matrix, 16 values a `vcvtneps2bf16`.
#[cfg(target_arch = "x86_64")]
pub(crate) fn round_slice(v: &[f32]) -> Vec<bf16> {
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn run(v: &[f32], out: &mut [half::bf16]) {
        use std::arch::x86_64::*;
        let mut i = 0;
        while i + 16 <= v.len() {
            let r = _mm512_cvtneps_pbh(_mm512_loadu_ps(v.as_ptr().add(i)));
            _mm256_storeu_si256(
                out.as_mut_ptr().add(i) as *mut __m256i,
                std::mem::transmute::<__m256bh, __m256i>(r),
            );
            i += 16;
        }
        for j in i..v.len() {
            out[j] = half::bf16::from_bits(round_bf16(v[j]));
        }
    }
    let mut out = vec![bf16::ZERO; v.len()];
    // SAFETY: avx512bf16 is checked before the native path runs.
    unsafe { run(v, &mut out) };
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::matmul::tests::fill;

    /// The reference: the rounded operands multiplied and summed in f64, so only the native and emulated
    /// paths' f32 summation orders are measured against it.
    pub(crate) fn naive_bf16(a: &[f32], m: usize, b: &Bf16Operand) -> Vec<f32> {
        let (k, n) = (b.rows, b.cols);
        let r = |bits: u32| f32::from_bits(bits << 16) as f64;
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|p| r(round_bf16(a[i * k + p]) as u32) * r(b.bits(p, j)))
                    .sum();
                y[i * n + j] = s as f32;
            }
        }
        y
    }

    /// |got − want| within f32 summation error: k · 2⁻²³ · Σ|products| per element.
    fn assert_close(got: &[f32], want: &[f32], a: &[f32], m: usize, b: &Bf16Operand, what: &str) {
        let (k, n) = (b.rows, b.cols);
        for i in 0..m {
            for j in 0..n {
                let mag: f32 = (0..k)
                    .map(|p| (a[i * k + p] * f32::from_bits(b.bits(p, j) << 16)).abs())
                    .sum();
                let tol = (k as f32 + 2.0) * f32::EPSILON * mag + 1e-30;
                let (g, w) = (got[i * n + j], want[i * n + j]);
                assert!(
                    (g - w).abs() <= tol,
                    "{what} [{i},{j}]: {g} vs {w} (tolerance {tol})"
                );
            }
        }
    }

    fn operands(m: usize, k: usize, n: usize, seed: u32) -> (Vec<f32>, Vec<f32>) {
        (fill(m * k, seed), fill(k * n, seed + 1))
    }

    /// Edges in every direction (rows not a multiple of MR, columns of NR, odd k, k across KC blocks,
    /// more rows than MC), both layouts of b, f32 and bf16 storage, overwrite and accumulate.
    #[test]
    fn both_paths_match_the_rounded_reference() {
        let native = bf16_products_native();
        if !native {
            eprintln!("this CPU has no avx512_bf16: the native path is not tested here, the emulated one is");
        }
        for (m, k, n) in [
            (1, 1, 1),
            (9, 7, 50),
            (17, 300, 97),
            (150, 513, 130),
            (3, 64, 2),
        ] {
            let (a, bw) = operands(m, k, n, (m * 31 + k) as u32);
            let b16: Vec<bf16> = bw.iter().map(|v| bf16::from_f32(*v)).collect();
            for transposed in [false, true] {
                for elems in [Elements::F32(&bw), Elements::Bf16(&b16)] {
                    let b = Bf16Operand {
                        elems,
                        rows: k,
                        cols: n,
                        transposed,
                    };
                    let want = naive_bf16(&a, m, &b);
                    let start: Vec<f32> = (0..m * n).map(|i| (i % 7) as f32 - 3.0).collect();
                    let plus: Vec<f32> = want.iter().zip(&start).map(|(w, s)| w + s).collect();
                    let what = format!("{m}×{k}×{n} transposed {transposed}");
                    let mut y = vec![f32::NAN; m * n];
                    matmul_bf16_emulated(&mut y, &a, m, b, false);
                    assert_close(&y, &want, &a, m, &b, &format!("emulated {what}"));
                    if native {
                        let mut y = vec![f32::NAN; m * n];
                        matmul_bf16(&mut y, &a, m, b, false);
                        assert_close(&y, &want, &a, m, &b, &format!("native {what}"));
                        let mut y = start.clone();
                        matmul_bf16(&mut y, &a, m, b, true);
                        assert_close(&y, &plus, &a, m, &b, &format!("native += {what}"));
                    }
                }
            }
        }
    }

    #[test]
    fn rounding_is_to_nearest_even_as_half_rounds_with_subnormals_flushed() {
        for bits in (0..=u32::MAX).step_by(65_521) {
            let x = f32::from_bits(bits);
            let want = bf16::from_f32(if x.is_subnormal() {
                0.0 * x.signum()
            } else {
                x
            });
            let got = bf16::from_bits(round_bf16(x));
            assert!(
                got.to_bits() == want.to_bits() || (x.is_nan() && got.is_nan()),
                "{x:e}"
            );
        }
        // Ties go to even: 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷.
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), bf16::from_f32(1.0).to_bits());
    }
}
