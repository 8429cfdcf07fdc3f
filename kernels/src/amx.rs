//! AMX tiles (Intel Sapphire Rapids and later) for the bf16 GEMM: `tdpbf16ps` multiplies a 16 × 32 bf16 tile
//! of a (16 rows of 16 pairs along k) by a tile of b (16 pairs × 16 columns: the pair layout the AVX-512 path
//! packs) into 16 × 16 f32 sums — 16 times the work of one `vdpbf16ps`. Four sum tiles make a 32 × 32 block
//! of the result; b is packed in panels of 32 columns, a's rows are laid out tile by tile when they are
//! rounded (see [`block`]).
//!
//! Linux hands out AMX tile state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), and a VM may refuse
//! it: llama.cpp's AMX path dies with SIGILL at its first `tileloadd` where nobody asked. This module asks
//! once; where the CPU lacks AMX, the kernel refuses, or a first product disagrees with the AVX-512 kernel's,
//! the GEMM stays on AVX-512 ([`amx_status`] says which). `INTROSPECT_AMX=off` keeps it there on any CPU.

use std::mem::MaybeUninit;
use std::sync::OnceLock;

use crate::bf16_gemm::{rows_of_pairs, PairLayout};
use crate::gemm512::{pack_b, PackSource, Units};

/// Pairs in a row of k values laid out for the tiles: ⌈k/2⌉ bf16 pairs padded to whole tiles (16 pairs).
pub(crate) fn tile_row_pairs(k: usize) -> usize {
    k.div_ceil(2).next_multiple_of(16)
}

/// Rows and columns of one block of sums (2 × 2 tiles of 16 × 16).
const BLOCK: usize = 32;
/// Columns of b packed at once (measured: 8, 16, 32, 64 and all panels; 32 and more alike).
const NC: usize = 32 * BLOCK;

/// Why AMX runs or does not.
#[derive(Debug, Clone, PartialEq)]
pub enum AmxStatus {
    On,
    NotOnThisCpu,
    Off,
    Refused(String),
    Disagreed(f32),
}

/// Whether the bf16 GEMM runs on AMX tiles (see [`amx_status`]).
pub fn amx_available() -> bool {
    amx_status() == &AmxStatus::On
}

/// AMX's state in this process, decided on first use: asked for, checked against AVX-512, kept.
pub fn amx_status() -> &'static AmxStatus {
    static STATUS: OnceLock<AmxStatus> = OnceLock::new();
    STATUS.get_or_init(probe)
}

fn probe() -> AmxStatus {
    if std::env::var("INTROSPECT_AMX").is_ok_and(|v| v == "off" || v == "0") {
        return AmxStatus::Off;
    }
    if !cpu_has_amx() || !crate::bf16_products_native() {
        return AmxStatus::NotOnThisCpu;
    }
    if let Err(why) = request_tile_data() {
        return AmxStatus::Refused(why);
    }
    match self_check() {
        d if d <= 1.0 => AmxStatus::On,
        d => {
            eprintln!(
                "introspect: AMX products disagreed with the AVX-512 ones ({d:.1}× the rounding bound); \
                 the bf16 GEMM stays on AVX-512"
            );
            AmxStatus::Disagreed(d)
        }
    }
}

/// CPUID leaf 7: AMX-BF16 (EDX bit 22) and AMX-TILE (bit 24).
fn cpu_has_amx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let r = std::arch::x86_64::__cpuid_count(7, 0);
        (r.edx >> 22) & 1 == 1 && (r.edx >> 24) & 1 == 1
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Asks Linux for the tile data state (XFEATURE 18) for this process.
fn request_tile_data() -> Result<(), String> {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        const ARCH_GET_XCOMP_SUPP: libc::c_long = 0x1021;
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        let mut supported: u64 = 0;
        // SAFETY: arch_prctl writes one u64 through the pointer, which lives across the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_GET_XCOMP_SUPP,
                &mut supported as *mut u64,
            )
        };
        if rc != 0 || supported & (1 << XFEATURE_XTILEDATA) == 0 {
            return Err("the kernel offers no AMX tile state".into());
        }
        // SAFETY: a request by number; no memory is passed.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        if rc != 0 {
            return Err(format!(
                "the kernel refused AMX tile state: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        Err("AMX is asked for on Linux only".into())
    }
}

/// The largest |AMX − AVX-512| on a product with every edge (rows, columns, odd k across blocks), in units
/// of the f32 rounding bound; ≤ 1 passes.
fn self_check() -> f32 {
    let (m, k, n) = (45, 1100, 70);
    let val =
        |i: usize, s: u32| (((i as u32).wrapping_mul(2654435761) ^ s) % 2001) as f32 / 1000.0 - 1.0;
    let a: Vec<f32> = (0..m * k).map(|i| val(i, 1)).collect();
    let w: Vec<half::bf16> = (0..n * k)
        .map(|i| half::bf16::from_f32(val(i, 2)))
        .collect();
    let b = PackSource {
        w: Units::Bf16(&w),
        k,
        n,
        transposed: true,
    };
    let (mut got, mut want) = (vec![0f32; m * n], vec![0f32; m * n]);
    // SAFETY: AMX permission granted and AVX-512 BF16 present (checked before the call).
    unsafe {
        matmul(&mut got, &a, m, &b, false);
        crate::bf16_gemm::avx512_matmul(&mut want, &a, m, &b, false);
    }
    let mut worst = 0f32;
    for i in 0..m {
        for j in 0..n {
            let mag: f32 = (0..k)
                .map(|p| (a[i * k + p] * w[j * k + p].to_f32()).abs())
                .sum();
            let bound = 2.0 * k as f32 * f32::EPSILON * mag + 1e-30;
            let d = (got[i * n + j] - want[i * n + j]).abs() / bound;
            worst = worst.max(if d.is_nan() { f32::INFINITY } else { d });
        }
    }
    worst
}

/// `dst (m × n) = a · b` (or `+=`) on AMX tiles, all threads of the kernel team.
///
/// # Safety
/// AMX permission must have been granted ([`amx_available`], or the probe itself) and the CPU must have
/// AVX-512 BF16 (b is packed with it); shapes as [`crate::matmul_bf16`] checks them.
pub(crate) unsafe fn matmul(
    dst: &mut [f32],
    a: &[f32],
    m: usize,
    b: &PackSource,
    accumulate: bool,
) {
    with_sums(dst, a, m, b, accumulate, Tiles::Amx)
}

/// Who makes a 32 × 32 block of sums: the AMX tiles ([`sums`]), or the tests' plain reference of the same
/// operands, so that the driver around the tiles runs on any AVX-512 BF16 CPU.
#[derive(Clone, Copy, PartialEq)]
enum Tiles {
    Amx,
    #[cfg(test)]
    Reference,
}

impl Tiles {
    /// One 32 × 32 block of sums over every part: (steps, a, b) as [`sums`] takes them.
    unsafe fn sums(
        self,
        parts: &[(usize, *const u32, *const u32)],
        c: (*mut f32, usize),
        add: bool,
    ) {
        match self {
            Tiles::Amx => sums(parts, c, add),
            #[cfg(test)]
            Tiles::Reference => {
                for (i, &(steps, a, b)) in parts.iter().enumerate() {
                    tests::sums_reference(steps, a, b, c, add || i > 0)
                }
            }
        }
    }
}

/// One product of a sum `dst = Σ a · b` ([`matmul_terms`]): a's pairs in tiles ([`PairLayout::Tiles`]) with
/// their row length `lda` in pairs, and b.
#[derive(Clone, Copy)]
pub(crate) struct Term<'a> {
    pub a: &'a [u32],
    pub lda: usize,
    pub b: &'a PackSource<'a>,
}

/// `dst (m × n) = Σ a · b` (or `+=`) over the terms, each 32 × 32 block of sums summed over every term in
/// the tiles before one store; a's pairs already in tiles, `lda` a whole number of tiles (16 pairs), the
/// rows padded with zeros to whole blocks (32 rows), as [`crate::Bf16Rows`] makes them where AMX runs.
/// (LoRA's rank-r term beside the frozen product: on its own, with k = r, it was one pass over dst's
/// memory for a single step of products.)
///
/// # Safety
/// As [`matmul`]; with `accumulate` dst is initialized (without it every element is written, none read).
pub(crate) unsafe fn matmul_terms(
    dst: &mut [MaybeUninit<f32>],
    terms: &[Term],
    m: usize,
    accumulate: bool,
) {
    for t in terms {
        assert!(
            t.lda % 16 == 0 && t.lda >= t.b.k.div_ceil(2),
            "a's rows are whole tiles"
        );
        assert!(
            t.a.len() >= m.next_multiple_of(BLOCK) * t.lda,
            "a's rows fill whole blocks"
        );
        assert_eq!(t.b.n, terms[0].b.n, "the terms' products have one shape");
    }
    sums_over(dst, terms, m, accumulate, Tiles::Amx)
}

unsafe fn with_sums(
    dst: &mut [f32],
    a: &[f32],
    m: usize,
    b: &PackSource,
    accumulate: bool,
    tiles: Tiles,
) {
    let k = b.k;
    // a in tiles, each row padded to whole tiles (16 pairs) and the rows to whole blocks, zeros.
    let lda = tile_row_pairs(k);
    let rows = m.next_multiple_of(BLOCK);
    let a_pairs = rows_of_pairs(a, m, k, (lda, rows), PairLayout::Tiles);
    let term = Term {
        a: a_pairs.as_slice(),
        lda,
        b,
    };
    sums_over(crate::team::as_uninit(dst), &[term], m, accumulate, tiles)
}

/// # Safety
/// As [`matmul_terms`].
unsafe fn sums_over(
    dst: &mut [MaybeUninit<f32>],
    terms: &[Term],
    m: usize,
    accumulate: bool,
    tiles: Tiles,
) {
    let n = terms[0].b.n;
    let team = crate::Team::global();
    let tasks = crate::gemm512::rectangles((m, n), (BLOCK, BLOCK), team.threads());
    let out = crate::team::DisjointOut::new(dst);
    let work = |t: usize| {
        // SAFETY: tasks cover disjoint rectangles of dst, which is read only with accumulate (and then
        // initialized); AMX permission is the caller's promise.
        unsafe { block(out.ptr().cast(), n, terms, tasks[t], accumulate, tiles) };
    };
    team.run(tasks.len(), &work);
}

std::thread_local! {
    /// Packed panels of b, reused across calls on each thread.
    static PACKED: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The tile palette: all eight tiles 16 rows of 64 bytes — sums tmm0–3, a tmm4–5, b tmm6–7.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn all_16x64() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1; // palette 1
        for t in 0..8 {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes()); // bytes per row
            c[48 + t] = 16; // rows
        }
        TileConfig(c)
    }
}

/// One tile of a ([`PairLayout::Tiles`]): 16 rows × 16 pairs. A block's step s holds its two tiles (rows
/// 0–15, then 16–31) at `2 · A_TILE · s`.
const A_TILE: usize = 16 * 16;

/// A 64-byte aligned part of `buf`, at least `len` long (grown as needed).
fn aligned(buf: &mut Vec<u32>, len: usize) -> &mut [u32] {
    // Grown, never shrunk: a resize up after one down wrote zeros over the difference on every call.
    if buf.len() < len + 15 {
        buf.resize(len + 15, 0);
    }
    let off = buf.as_ptr().align_offset(64).min(15);
    &mut buf[off..off + len]
}

/// dst[rows, cols] (= or +=) a[rows, :] · b[:, cols] on the calling thread, in 32 × 32 blocks, each over
/// all of k in the tiles before one store: b's panels packed NC columns at a time (they stay in L2), a's
/// block of 32 rows read in place from its tiles. (Cutting k into L1-sized chunks stored and reloaded the
/// sums once a chunk, and the sums, 4 MiB and more, came from L3: the full-k blocks ran the products
/// 1.3–1.6× as fast.)
///
/// # Safety
/// As [`matmul`]; the rectangle lies within dst (m × ldc), starts on a block's row, and no one else writes
/// it meanwhile; a is in tiles ([`PairLayout::Tiles`]) with its rows padded to whole blocks and `lda` to
/// whole tiles.
#[cfg(target_arch = "x86_64")]
unsafe fn block(
    dst: *mut f32,
    ldc: usize,
    terms: &[Term],
    ((i0, i1), (j0, j1)): crate::gemm512::Rectangle,
    accumulate: bool,
    tiles: Tiles,
) {
    debug_assert!(i0 % BLOCK == 0, "rectangles start on a block");
    let config = TileConfig::all_16x64();
    if tiles == Tiles::Amx {
        std::arch::asm!("ldtilecfg [{}]", in(reg) &config as *const TileConfig, options(nostack, readonly));
    }
    let mut edge = [0f32; BLOCK * BLOCK];
    // Pair rows of each term's panels (its k in whole tiles).
    let stored: Vec<usize> = terms.iter().map(|t| tile_row_pairs(t.b.k)).collect();
    let mut parts = Vec::with_capacity(terms.len());
    PACKED.with_borrow_mut(|bp| {
        for jn in (j0..j1).step_by(NC) {
            let jn1 = (jn + NC).min(j1);
            let panels = (jn1 - jn).div_ceil(BLOCK);
            // Each term's panels one after the other.
            let bp = aligned(bp, panels * BLOCK * stored.iter().sum::<usize>());
            let mut at = 0;
            let mut starts = Vec::with_capacity(terms.len());
            for (t, &st) in terms.iter().zip(&stored) {
                let len = panels * st * BLOCK;
                pack_b(
                    &mut bp[at..at + len],
                    t.b,
                    (0, t.b.k),
                    (jn, jn1),
                    (BLOCK, st),
                );
                starts.push(at);
                at += len;
            }
            for ir in (i0..i1).step_by(BLOCK) {
                let rows = (i1 - ir).min(BLOCK);
                for jp in 0..panels {
                    let jc = jn + jp * BLOCK;
                    let cols = (jn1 - jc).min(BLOCK);
                    parts.clear();
                    for ((t, &st), &start) in terms.iter().zip(&stored).zip(&starts) {
                        let a = t.a.as_ptr().add(ir * t.lda);
                        parts.push((st / 16, a, bp.as_ptr().add(start + jp * st * BLOCK)));
                    }
                    let c = dst.add(ir * ldc + jc);
                    if rows == BLOCK && cols == BLOCK {
                        tiles.sums(&parts, (c, ldc), accumulate);
                    } else {
                        tiles.sums(&parts, (edge.as_mut_ptr(), BLOCK), false);
                        for r in 0..rows {
                            for j in 0..cols {
                                let (d, e) = (&mut *c.add(r * ldc + j), edge[r * BLOCK + j]);
                                *d = if accumulate { *d + e } else { e };
                            }
                        }
                    }
                }
            }
        }
    });
    if tiles == Tiles::Amx {
        std::arch::asm!("tilerelease", options(nostack, nomem));
    }
}

/// One 32 × 32 block: for each part, `steps` × 16 pairs of a (two tiles a step, laid out as [`A_TILE`]
/// says) times a packed panel of b (32 columns a pair row), summed into c (row stride `ldc` f32), loaded
/// first with `add`, stored once after every part. The loads are spread between the products (a0 b0, b1,
/// a1), as oneDNN's brgemm orders them.
///
/// # Safety
/// Tiles configured by [`block`]; for each part `steps` steps of a's two tiles and `steps` × 16 rows of the
/// panel from `b` are readable, and 32 × 32 f32 at c are readable and writable.
#[cfg(target_arch = "x86_64")]
unsafe fn sums(parts: &[(usize, *const u32, *const u32)], (c, ldc): (*mut f32, usize), add: bool) {
    use std::arch::asm;
    let (sb, sc) = (BLOCK * 4, ldc * 4); // row strides in bytes
    let (c01, c10) = (c.add(16), c.add(16 * ldc));
    let c11 = c10.add(16);
    if add {
        asm!(
            "tileloadd tmm0, [{c00} + {sc}*1]",
            "tileloadd tmm1, [{c01} + {sc}*1]",
            "tileloadd tmm2, [{c10} + {sc}*1]",
            "tileloadd tmm3, [{c11} + {sc}*1]",
            c00 = in(reg) c, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11, sc = in(reg) sc,
            options(nostack, readonly),
        );
    } else {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
    }
    for &(steps, a, b) in parts {
        // Per step: a's two tiles and the panel's next 16 pair rows (2 KiB).
        asm!(
            "2:",
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm6, [{b0} + {sb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b1} + {sb}*1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a1} + {sa}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, {astep}",
            "add {a1}, {astep}",
            "add {b0}, {bstep}",
            "add {b1}, {bstep}",
            "dec {n}",
            "jnz 2b",
            a0 = inout(reg) a => _,
            a1 = inout(reg) a.add(A_TILE) => _,
            b0 = inout(reg) b => _,
            b1 = inout(reg) b.add(16) => _,
            sa = in(reg) 64usize,
            sb = in(reg) sb,
            astep = in(reg) 2 * A_TILE * 4,
            bstep = in(reg) 16 * sb,
            n = inout(reg) steps => _,
            options(nostack, readonly),
        );
    }
    asm!(
        "tilestored [{c00} + {sc}*1], tmm0",
        "tilestored [{c01} + {sc}*1], tmm1",
        "tilestored [{c10} + {sc}*1], tmm2",
        "tilestored [{c11} + {sc}*1], tmm3",
        c00 = in(reg) c, c01 = in(reg) c01, c10 = in(reg) c10, c11 = in(reg) c11, sc = in(reg) sc,
        options(nostack),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`sums`] in plain Rust: the same packed operands, pair by pair.
    pub(super) unsafe fn sums_reference(
        steps: usize,
        a: *const u32,
        b: *const u32,
        (c, ldc): (*mut f32, usize),
        add: bool,
    ) {
        let half = |v: u32, hi: bool| f32::from_bits(if hi { v & 0xffff_0000 } else { v << 16 });
        // Pair q of a's row r: step q / 16, tile r / 16, row r % 16, column q % 16.
        let at =
            |r: usize, q: usize| a.add((2 * (q / 16) + r / 16) * A_TILE + (r % 16) * 16 + q % 16);
        for r in 0..BLOCK {
            for j in 0..BLOCK {
                let mut s = if add { *c.add(r * ldc + j) } else { 0.0 };
                for q in 0..16 * steps {
                    let (x, y) = (*at(r, q), *b.add(q * BLOCK + j));
                    s += half(x, false) * half(y, false) + half(x, true) * half(y, true);
                }
                *c.add(r * ldc + j) = s;
            }
        }
    }

    /// Everything around the tiles — a's padded pairs, b's 32-column panels over k blocks, the 32 × 32
    /// blocks, edges and accumulation — with the reference in the tiles' place, against the AVX-512 GEMM.
    #[test]
    fn the_amx_driver_with_reference_tiles_matches_avx512() {
        if !crate::bf16_products_native() {
            eprintln!("this CPU has no avx512_bf16: the AMX driver is not tested here");
            return;
        }
        for (m, k, n, accumulate) in [
            (45, 1100, 70, false),
            (64, 2051, 33, true),
            (7, 30, 100, true),
        ] {
            let val = |i: usize, s: u32| {
                (((i as u32).wrapping_mul(2654435761) ^ s) % 2001) as f32 / 1000.0 - 1.0
            };
            let a: Vec<f32> = (0..m * k).map(|i| val(i, 3)).collect();
            let w: Vec<half::bf16> = (0..n * k)
                .map(|i| half::bf16::from_f32(val(i, 4)))
                .collect();
            for transposed in [true, false] {
                let b = PackSource {
                    w: Units::Bf16(&w),
                    k,
                    n,
                    transposed,
                };
                let start: Vec<f32> = (0..m * n).map(|i| (i % 5) as f32).collect();
                let (mut got, mut want) = (start.clone(), start.clone());
                // SAFETY: AVX-512 BF16 checked above; no tile instruction runs.
                unsafe {
                    with_sums(&mut got, &a, m, &b, accumulate, Tiles::Reference);
                    crate::bf16_gemm::avx512_matmul(&mut want, &a, m, &b, accumulate);
                }
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-3 * (1.0 + w.abs()),
                        "{m}×{k}×{n} [{i}]: {g} vs {w}"
                    );
                }
            }
        }
    }

    /// Two terms summed in the tiles (`a · b + a2 · b2`, the second with k = 32 as LoRA's rank-r term)
    /// with the reference in the tiles' place, against two AVX-512 products added.
    #[test]
    fn two_terms_sum_as_two_products() {
        if !crate::bf16_products_native() {
            eprintln!("this CPU has no avx512_bf16: the AMX driver is not tested here");
            return;
        }
        let val = |i: usize, s: u32| {
            (((i as u32).wrapping_mul(2654435761) ^ s) % 2001) as f32 / 1000.0 - 1.0
        };
        for (m, k, k2, n, accumulate) in [(70, 100, 32, 45, false), (33, 64, 7, 96, true)] {
            let (a, a2): (Vec<f32>, Vec<f32>) = (
                (0..m * k).map(|i| val(i, 5)).collect(),
                (0..m * k2).map(|i| val(i, 6)).collect(),
            );
            let w: Vec<half::bf16> = (0..n * k)
                .map(|i| half::bf16::from_f32(val(i, 7)))
                .collect();
            let w2: Vec<half::bf16> = (0..k2 * n)
                .map(|i| half::bf16::from_f32(val(i, 8)))
                .collect();
            let b = PackSource {
                w: Units::Bf16(&w),
                k,
                n,
                transposed: true,
            };
            let b2 = PackSource {
                w: Units::Bf16(&w2),
                k: k2,
                n,
                transposed: false,
            };
            let tiled = |a: &[f32], k: usize| {
                let lda = tile_row_pairs(k);
                (
                    rows_of_pairs(a, m, k, (lda, m.next_multiple_of(BLOCK)), PairLayout::Tiles),
                    lda,
                )
            };
            let ((p1, lda1), (p2, lda2)) = (tiled(&a, k), tiled(&a2, k2));
            let terms = [
                Term {
                    a: p1.as_slice(),
                    lda: lda1,
                    b: &b,
                },
                Term {
                    a: p2.as_slice(),
                    lda: lda2,
                    b: &b2,
                },
            ];
            let start: Vec<f32> = (0..m * n).map(|i| (i % 5) as f32).collect();
            let (mut got, mut want) = (start.clone(), start.clone());
            // SAFETY: AVX-512 BF16 checked above; no tile instruction runs.
            unsafe {
                sums_over(
                    crate::team::as_uninit(&mut got),
                    &terms,
                    m,
                    accumulate,
                    Tiles::Reference,
                );
                crate::bf16_gemm::avx512_matmul(&mut want, &a, m, &b, accumulate);
                crate::bf16_gemm::avx512_matmul(&mut want, &a2, m, &b2, true);
            }
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-3 * (1.0 + w.abs()),
                    "{m}×{k}+{k2}×{n} [{i}]: {g} vs {w}"
                );
            }
        }
    }

    /// Where the CPU has AMX and the kernel grants it, the tiles' products equal the AVX-512 kernel's within
    /// f32 rounding (the probe's own check, run again and reported); elsewhere says why it did not run.
    #[test]
    fn amx_products_match_avx512_where_the_cpu_has_amx() {
        match amx_status() {
            AmxStatus::On => {
                let d = self_check();
                assert!(d <= 1.0, "AMX off by {d}× the rounding bound");
            }
            AmxStatus::Disagreed(d) => {
                panic!("AMX products disagree with AVX-512 ({d}× the bound)")
            }
            other => eprintln!("AMX not tested here: {other:?}"),
        }
    }
}
