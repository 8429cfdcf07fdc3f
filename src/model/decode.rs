//! Decoding: one new token per row. On the CPU kernels the step runs in place on flat buffers
//! ([`super::cpu::decode`]); the generic path runs it through the tensor forward with the KV cache.

use anyhow::Result;
use candle_core::Tensor;

use super::cache::KvCache;
use super::llama::{Batch, Llama};
use super::ops::{causal_mask, last_position, log_softmax};
use crate::lora::Adapter;

/// The rows of one decode step.
pub struct DecodeRows<'a> {
    /// Each row's newest token.
    pub ids: &'a [u32],
    /// Its position (left padding not counted).
    pub positions: &'a [f32],
    /// Left-padding columns of each row in the cache; attention skips them.
    pub pads: &'a [usize],
    pub adapter: Option<&'a Adapter>,
}

impl Llama {
    /// Next-token log-probabilities (b × vocab) of every row; the rows' keys and values join `cache`.
    pub fn next_token_logprobs(
        &self,
        rows: &DecodeRows,
        cache: &mut KvCache,
    ) -> Result<Vec<Vec<f32>>> {
        if self.kernels.cpu() {
            return self.decode_logprobs(rows, cache);
        }
        let (dev, b) = (self.device(), rows.ids.len());
        let hidden = self.forward(
            &Batch {
                ids: &Tensor::new(rows.ids, dev)?.reshape((b, 1))?,
                positions: &Tensor::new(rows.positions, dev)?.reshape((b, 1))?,
                mask: causal_mask(rows.pads, 1, cache.len(), dev)?.as_ref(),
                adapter: rows.adapter,
            },
            Some(cache),
        )?;
        Ok(log_softmax(&self.logits(&last_position(&hidden)?)?)?.to_vec2::<f32>()?)
    }
}
