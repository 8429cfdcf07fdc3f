//! Decoding: one new token per row. On the CPU kernels the step runs in place on flat buffers
//! ([`super::cpu::decode`]); the generic path runs it through the tensor forward with the KV cache.

use anyhow::{bail, Result};
use candle_core::Tensor;

use super::cache::KvCache;
use super::hooks::StepHooks;
use super::llama::{Batch, Llama};
use super::ops::{causal_mask, last_position, log_softmax, top_k_rows};
use crate::lora::RowAdapters;

/// The rows of one decode step.
pub struct DecodeRows<'a> {
    /// Each row's newest token.
    pub ids: &'a [u32],
    /// Its position (left padding not counted).
    pub positions: &'a [f32],
    /// Left-padding columns of each row in the cache; attention skips them.
    pub pads: &'a [usize],
    /// Each row's LoRA adapter.
    pub adapters: RowAdapters<'a>,
    /// Each row's interventions and captures (one column per row, at its position).
    pub hooks: Option<&'a StepHooks<'a>>,
}

/// How much of each row's next-token distribution a caller needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Whole rows: sampling at a temperature, or a check against a reference.
    All,
    /// The k most likely tokens: greedy choice (1), top log-probs, a tree's branches.
    Best(usize),
}

/// One row of a step's next-token log-probabilities.
#[derive(Debug, Clone, PartialEq)]
pub enum RowLogprobs {
    /// The whole vocabulary.
    All(Vec<f32>),
    /// The most likely (id, log-prob) pairs, most likely first, chosen on the device: a decode step then
    /// moves b × k numbers to the host instead of b × vocabulary.
    Best(Vec<(u32, f32)>),
}

impl RowLogprobs {
    /// The whole row, for callers that asked for [`Want::All`].
    pub fn into_whole(self) -> Result<Vec<f32>> {
        match self {
            RowLogprobs::All(lp) => Ok(lp),
            RowLogprobs::Best(_) => {
                bail!("a decode step asked for whole rows returned only the best")
            }
        }
    }
}

impl Llama {
    /// The next-token log-probabilities at the last position of `hidden` (b, t, d), as much as `want` asks.
    /// On the CPU kernels the rows are on the host already and go whole; elsewhere the log-softmax and the
    /// choice of the best run on the device.
    pub fn next_logprobs(&self, hidden: &Tensor, want: Want) -> Result<Vec<RowLogprobs>> {
        let lp = log_softmax(&self.logits(&last_position(hidden)?)?)?;
        Ok(match want {
            Want::Best(k) if !self.kernels.cpu() => top_k_rows(&lp, k)?
                .into_iter()
                .map(RowLogprobs::Best)
                .collect(),
            _ => lp
                .to_vec2::<f32>()?
                .into_iter()
                .map(RowLogprobs::All)
                .collect(),
        })
    }

    /// Next-token log-probabilities of every row, as much as `want` asks; the rows' keys and values join
    /// `cache`.
    pub fn next_token_logprobs(
        &self,
        rows: &DecodeRows,
        cache: &mut KvCache,
        want: Want,
    ) -> Result<Vec<RowLogprobs>> {
        if self.kernels.cpu() {
            let lp = self.decode_logprobs(rows, cache)?;
            return Ok(lp.into_iter().map(RowLogprobs::All).collect());
        }
        let (dev, b) = (self.device(), rows.ids.len());
        let hidden = self.forward(
            &Batch {
                ids: &Tensor::new(rows.ids, dev)?.reshape((b, 1))?,
                positions: &Tensor::new(rows.positions, dev)?.reshape((b, 1))?,
                mask: causal_mask(rows.pads, 1, cache.len(), dev)?.as_ref(),
                adapters: rows.adapters,
                hooks: rows.hooks,
            },
            Some(cache),
        )?;
        self.next_logprobs(&hidden, want)
    }
}
