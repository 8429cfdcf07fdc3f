//! A frozen projection's two GEMM-sized products — `y = x Wᵀ` (training forward, prefill) and `dx = dy W`
//! (training backward) — in f32 or as bf16 × bf16 → f32.
//!
//! Which one is the weight's storage and one process-wide switch: bf16 weights always take bf16 products
//! (as on GPUs; native `vdpbf16ps` on avx512_bf16, emulated with the same rounding elsewhere), f32 weights
//! take f32 products unless [`set_f32_weights_in_bf16`] asked for bf16 ones too.

use std::sync::atomic::{AtomicU8, Ordering};

use crate::bf16_gemm::{matmul_bf16, Bf16Operand, Elements};
use crate::matmul::{linear_team, matmul, Operand};

/// 0: not yet read from the environment; 1: off; 2: on.
static F32_WEIGHTS_IN_BF16: AtomicU8 = AtomicU8::new(0);

/// Whether f32 weights' GEMM-sized products (training, prefill) round both operands to bf16 too: off unless
/// asked — by this, or by `INTROSPECT_BF16_PRODUCTS=all` — so f32 stays exact. Decode's few-row products
/// keep f32 weights in f32.
pub fn set_f32_weights_in_bf16(on: bool) {
    F32_WEIGHTS_IN_BF16.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

pub fn f32_weights_in_bf16() -> bool {
    match F32_WEIGHTS_IN_BF16.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("INTROSPECT_BF16_PRODUCTS").is_ok_and(|v| v == "all");
            set_f32_weights_in_bf16(on);
            on
        }
        state => state == 2,
    }
}

/// A frozen weight W (out × inp, row-major).
#[derive(Clone, Copy)]
pub struct Frozen<'a> {
    pub w: Elements<'a>,
    pub out: usize,
    pub inp: usize,
}

impl<'a> Frozen<'a> {
    /// Whether this weight's products are bf16 × bf16.
    pub fn bf16_products(&self) -> bool {
        matches!(self.w, Elements::Bf16(_)) || f32_weights_in_bf16()
    }

    /// Wᵀ (inp × out) as the right operand of `x Wᵀ`.
    pub(crate) fn transposed(&self) -> Bf16Operand<'a> {
        Bf16Operand {
            elems: self.w,
            rows: self.inp,
            cols: self.out,
            transposed: true,
        }
    }

    /// W (out × inp) as the right operand of `dy W`.
    pub(crate) fn as_stored(&self) -> Bf16Operand<'a> {
        Bf16Operand {
            elems: self.w,
            rows: self.out,
            cols: self.inp,
            transposed: false,
        }
    }

    /// `y (m × out) = x (m × inp) · Wᵀ`.
    pub fn forward(&self, x: &[f32], m: usize, y: &mut [f32]) {
        match self.w {
            _ if self.bf16_products() => matmul_bf16(y, x, m, self.transposed(), false),
            Elements::F32(w) => {
                #[cfg(target_arch = "x86_64")]
                if crate::gemm512::linear_f32_avx512(x, m, w, self.out, self.inp, y) {
                    return;
                }
                linear_team(x, m, w, self.out, self.inp, y)
            }
            Elements::Bf16(_) => unreachable!("bf16 weights take bf16 products"),
        }
    }

    /// `dx (m × inp) = dy (m × out) · W`, or `dx +=` with `accumulate`.
    pub fn backward(&self, dy: &[f32], m: usize, dx: &mut [f32], accumulate: bool) {
        match self.w {
            _ if self.bf16_products() => matmul_bf16(dx, dy, m, self.as_stored(), accumulate),
            Elements::F32(w) => matmul(
                dx,
                Operand::new(dy, m, self.out),
                Operand::new(w, self.out, self.inp),
                1.0,
                accumulate,
            ),
            Elements::Bf16(_) => unreachable!("bf16 weights take bf16 products"),
        }
    }
}
