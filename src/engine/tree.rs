//! Exact answer distributions: every continuation whose probability stays above a threshold is expanded,
//! up to a depth, sharing each prompt's prefill (the KV-cache rows fan out to the children). What falls
//! below the threshold or outside the top-k is counted as pruned mass, so coverage is known.

use anyhow::Result;
use candle_core::Tensor;

use super::generate::Generator;
use crate::lora::RowAdapters;
use crate::model::decode::{DecodeRows, Want};

#[derive(Debug, Clone, Copy)]
pub struct TreeParams {
    /// Tokens at most (the paper's calibration: 3).
    pub max_depth: usize,
    /// Sequences less likely than this are not expanded (their mass counts as pruned).
    pub min_prob: f64,
    /// Children considered per node.
    pub top_k: usize,
    /// Open sequences kept per prompt and level (the most likely).
    pub max_open: usize,
}

impl Default for TreeParams {
    fn default() -> Self {
        Self {
            max_depth: 3,
            min_prob: 1e-3,
            top_k: 20,
            max_open: 48,
        }
    }
}

/// A finished sequence: its ids (without the EOS), probability, and whether it ended with EOS.
#[derive(Debug, Clone, PartialEq)]
pub struct Leaf {
    pub ids: Vec<u32>,
    pub prob: f64,
    pub ended: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Expansion {
    pub leaves: Vec<Leaf>,
    /// Probability mass not expanded.
    pub pruned: f64,
}

struct Open {
    prompt: usize,
    ids: Vec<u32>,
    prob: f64,
}

impl Generator<'_> {
    /// Expands every prompt's continuations. `done(ids)` ends a sequence early once what is asked of it
    /// is determined (e.g. its second character is known).
    pub fn expand(
        &self,
        prompts: &[Vec<u32>],
        params: &TreeParams,
        done: &dyn Fn(&[u32]) -> bool,
    ) -> Result<Vec<Expansion>> {
        let mut out = vec![Expansion::default(); prompts.len()];
        let mut order: Vec<usize> = (0..prompts.len()).collect();
        order.sort_by_key(|&i| prompts[i].len());
        // Each prompt fans out to up to max_open rows: few prompts per batch.
        let per_batch = (self.max_batch_rows / 4).max(1);
        for chunk in order.chunks(per_batch) {
            let batch: Vec<&[u32]> = chunk.iter().map(|&i| prompts[i].as_slice()).collect();
            for (k, e) in self
                .expand_batch(&batch, params, done)?
                .into_iter()
                .enumerate()
            {
                out[chunk[k]] = e;
            }
        }
        Ok(out)
    }

    fn expand_batch(
        &self,
        prompts: &[&[u32]],
        params: &TreeParams,
        done: &dyn Fn(&[u32]) -> bool,
    ) -> Result<Vec<Expansion>> {
        let llama = self.llama;
        let dev = llama.device();
        // The same prefill as generation (shared prompt starts computed once).
        let adapters = vec![self.adapter.as_deref(); prompts.len()];
        let (mut cache, pads, mut logprobs, _) = self.forward_prompts(
            prompts,
            &adapters,
            &[],
            params.max_depth + 1,
            Want::Best(params.top_k),
        )?;
        let mut open: Vec<Open> = (0..prompts.len())
            .map(|prompt| Open {
                prompt,
                ids: vec![],
                prob: 1.0,
            })
            .collect();
        let mut out = vec![Expansion::default(); prompts.len()];
        for depth in 0..params.max_depth {
            // (parent row, child) for every child that stays open.
            let mut next: Vec<(usize, Open)> = vec![];
            for (row, node) in open.iter().enumerate() {
                let top = super::sampling::best(&logprobs[row], params.top_k);
                let mut kept = 0.0;
                for cand in top {
                    let p = node.prob * (cand.logprob.0 as f64).exp();
                    if p < params.min_prob {
                        continue;
                    }
                    kept += p;
                    let e = &mut out[node.prompt];
                    if self.eos_ids.contains(&cand.id) {
                        e.leaves.push(Leaf {
                            ids: node.ids.clone(),
                            prob: p,
                            ended: true,
                        });
                        continue;
                    }
                    let mut child = node.ids.clone();
                    child.push(cand.id);
                    if depth + 1 == params.max_depth || done(&child) {
                        e.leaves.push(Leaf {
                            ids: child,
                            prob: p,
                            ended: false,
                        });
                    } else {
                        next.push((
                            row,
                            Open {
                                prompt: node.prompt,
                                ids: child,
                                prob: p,
                            },
                        ));
                    }
                }
                out[node.prompt].pruned += (node.prob - kept).max(0.0);
            }
            // Keep the most likely open sequences of each prompt.
            next.sort_by(|a, b| {
                a.1.prompt
                    .cmp(&b.1.prompt)
                    .then(b.1.prob.total_cmp(&a.1.prob))
            });
            let mut kept_next = vec![];
            let mut count = vec![0usize; prompts.len()];
            for (row, node) in next {
                if count[node.prompt] < params.max_open {
                    count[node.prompt] += 1;
                    kept_next.push((row, node));
                } else {
                    out[node.prompt].pruned += node.prob;
                }
            }
            if kept_next.is_empty() {
                break;
            }
            let parents: Vec<u32> = kept_next.iter().map(|(r, _)| *r as u32).collect();
            cache.select_rows(&Tensor::new(parents.as_slice(), dev)?)?;
            open = kept_next.into_iter().map(|(_, n)| n).collect();
            let step_ids: Vec<u32> = open.iter().map(|n| *n.ids.last().unwrap()).collect();
            let pos: Vec<f32> = open
                .iter()
                .map(|n| (prompts[n.prompt].len() + n.ids.len() - 1) as f32)
                .collect();
            let step_pads: Vec<usize> = open.iter().map(|n| pads[n.prompt]).collect();
            logprobs = llama.next_token_logprobs(
                &DecodeRows {
                    ids: &step_ids,
                    positions: &pos,
                    pads: &step_pads,
                    adapters: RowAdapters::Same(self.adapter.as_deref()),
                    hooks: None,
                },
                &mut cache,
                Want::Best(params.top_k),
            )?;
        }
        Ok(out)
    }
}
