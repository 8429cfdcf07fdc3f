//! bf16 → f32 for a frozen bf16 weight about to enter an f32 GEMM. A bf16 is the top half of an f32, so
//! the conversion is a 16-bit shift that the compiler vectorizes; Candle's `to_dtype` converts element by
//! element on one thread (a third of a training step in bf16 mode).

use half::bf16;
use rayon::prelude::*;

/// Elements per parallel chunk.
const CHUNK: usize = 1 << 16;

pub fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "bf16_to_f32: lengths differ");
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| {
            for (o, i) in d.iter_mut().zip(s) {
                *o = f32::from_bits((i.to_bits() as u32) << 16);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_half_for_every_bf16() {
        let src: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
        let mut dst = vec![0f32; src.len()];
        bf16_to_f32(&src, &mut dst);
        for (s, d) in src.iter().zip(&dst) {
            assert!(s.to_f32().to_bits() == d.to_bits() || (s.is_nan() && d.is_nan()));
        }
    }
}
