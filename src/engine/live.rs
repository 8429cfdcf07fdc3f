//! A decode batch that sequences join and leave between steps: continuous batching. A sequence joins
//! with its own sampling settings and number of samples (its prompt prefilled, its cache merged below the
//! rows decoding already); every step samples each row's next token, hands the caller an event per token
//! and per finished sample, and drops finished rows. `Generator::generate_each` drives one with a queue of
//! known prompts; the server's engine thread drives one per sampling setting with the requests as they
//! arrive. Each row carries its own adapter: rows of different adapters decode together.

use std::sync::Arc;

use anyhow::Result;
use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::generate::{Completion, FinishReason, GenerationParams, Generator, TokenStep};
use crate::lora::Adapter;
use crate::model::cache::KvCache;
use crate::model::decode::{RowLogprobs, Want};
use crate::model::hooks::{Captured, RowHooks};

/// What a row brings besides its prompt and sampling settings: the adapter it runs (an owned handle, so
/// dropping the adapter from its set does not pull it from under the row) and its interventions and
/// captures, at absolute positions.
#[derive(Clone, Default)]
pub struct RowSpec {
    /// None: the base model.
    pub adapter: Option<Arc<Adapter>>,
    pub hooks: Option<Arc<RowHooks>>,
}

/// A prompt joining the batch.
pub struct Sequence<'p> {
    /// The caller's name for it, handed back in its events.
    pub key: usize,
    pub prompt: &'p [u32],
    pub params: Arc<GenerationParams>,
    /// Its adapter and hooks (its samples share them).
    pub row: RowSpec,
}

/// What a step did to one sample of a sequence.
pub enum Event<'r> {
    /// The sample chose its next token; `ids` are all it generated so far (an end-of-sequence id excluded).
    Token {
        key: usize,
        sample: usize,
        step: &'r TokenStep,
        ids: &'r [u32],
    },
    /// The sample finished (after its last `Token`).
    Done {
        key: usize,
        sample: usize,
        completion: Completion,
    },
}

/// One sample being decoded.
pub(super) struct Row {
    pub key: usize,
    pub sample: usize,
    /// Left-padding columns in the cache.
    pub pad: usize,
    pub prompt_len: usize,
    pub ids: Vec<u32>,
    pub steps: Vec<TokenStep>,
    pub rng: StdRng,
    pub finish: Option<FinishReason>,
    /// Where a stop string cut the text.
    pub text_cut: Option<usize>,
    pub params: Arc<GenerationParams>,
    pub adapter: Option<Arc<Adapter>>,
    pub hooks: Option<Arc<RowHooks>>,
    /// What its captures read so far.
    pub captured: Vec<Captured>,
}

/// What a step must return of its rows: the whole distribution if any row samples, else the most
/// alternatives any row records.
fn want_of<'p>(params: impl Iterator<Item = &'p GenerationParams>) -> Want {
    let mut best = 1;
    for p in params {
        match p.want() {
            Want::All => return Want::All,
            Want::Best(k) => best = best.max(k),
        }
    }
    Want::Best(best)
}

#[derive(Default)]
pub struct LiveBatch {
    rows: Vec<Row>,
    /// Each row's next-token log-probabilities, not sampled yet.
    logprobs: Vec<RowLogprobs>,
    /// Empty (no layers) while no row decodes: the next prefill's cache takes its place.
    cache: KvCache,
}

impl LiveBatch {
    /// Rows decoding (a sequence's samples count one each).
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The most positions any row may reach (prompt + max_tokens): what bounds the batch's memory.
    pub fn longest(&self) -> usize {
        self.rows
            .iter()
            .map(|r| r.prompt_len + r.params.max_tokens)
            .max()
            .unwrap_or(0)
    }

    /// Prefills `seqs` together and adds their samples to the batch. The caller has checked each one
    /// (`Generator::check`).
    pub fn admit(&mut self, gen: &Generator, seqs: &[Sequence]) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        let dev = gen.llama.device();
        let prompts: Vec<&[u32]> = seqs.iter().map(|s| s.prompt).collect();
        let room = seqs.iter().map(|s| s.params.max_tokens).max().unwrap_or(0) + 1;
        let want = want_of(seqs.iter().map(|s| s.params.as_ref()));
        let hooks: Vec<Option<Arc<RowHooks>>> = seqs.iter().map(|s| s.row.hooks.clone()).collect();
        let adapters: Vec<Option<&Adapter>> =
            seqs.iter().map(|s| s.row.adapter.as_deref()).collect();
        let (mut cache, pads, first, captured) =
            gen.forward_prompts(&prompts, &adapters, &hooks, room, want)?;
        // Fan each prompt out to its samples.
        let mut fan = vec![];
        let mut rows = vec![];
        let mut logprobs = vec![];
        for (g, s) in seqs.iter().enumerate() {
            for sample in 0..s.params.n {
                fan.push(g as u32);
                logprobs.push(first[g].clone());
                rows.push(Row {
                    key: s.key,
                    sample,
                    pad: pads[g],
                    prompt_len: s.prompt.len(),
                    ids: vec![],
                    steps: vec![],
                    rng: StdRng::seed_from_u64(
                        s.params
                            .seed
                            .wrapping_add((sample as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                    ),
                    finish: None,
                    text_cut: None,
                    params: s.params.clone(),
                    adapter: s.row.adapter.clone(),
                    hooks: s.row.hooks.clone(),
                    captured: captured[g].clone(),
                });
            }
        }
        if fan.len() > seqs.len() {
            cache.select_rows(&Tensor::new(fan.as_slice(), dev)?)?;
        }
        let (grow_live, grow_new) = self.cache.merge(cache)?;
        for r in &mut self.rows {
            r.pad += grow_live;
        }
        self.rows.extend(rows.into_iter().map(|mut r| {
            r.pad += grow_new;
            r
        }));
        self.logprobs.extend(logprobs);
        Ok(())
    }

    /// Samples every row's next token (events to `on`), drops finished rows and runs the others one
    /// position on.
    pub fn step(&mut self, gen: &Generator, on: &mut dyn FnMut(Event) -> Result<()>) -> Result<()> {
        let mut keep = vec![];
        let mut still = vec![];
        for (k, mut row) in std::mem::take(&mut self.rows).into_iter().enumerate() {
            if row.params.max_tokens > 0 {
                gen.advance(&mut row, &self.logprobs[k])?;
                on(Event::Token {
                    key: row.key,
                    sample: row.sample,
                    step: row.steps.last().expect("just advanced"),
                    ids: &row.ids,
                })?;
            } else {
                row.finish = Some(FinishReason::Length);
            }
            if row.finish.is_some() {
                let (key, sample) = (row.key, row.sample);
                on(Event::Done {
                    key,
                    sample,
                    completion: gen.complete(row)?,
                })?;
            } else {
                keep.push(k as u32);
                still.push(row);
            }
        }
        self.rows = still;
        self.forward_kept(gen, &keep)
    }

    /// Drops every row of the sequences `gone` names (their callers left), mid-generation.
    pub fn cancel(&mut self, gen: &Generator, gone: &dyn Fn(usize) -> bool) -> Result<()> {
        let keep: Vec<u32> = (0..self.rows.len() as u32)
            .filter(|&k| !gone(self.rows[k as usize].key))
            .collect();
        if keep.len() == self.rows.len() {
            return Ok(());
        }
        let mut logprobs = std::mem::take(&mut self.logprobs).into_iter();
        let mut rows = std::mem::take(&mut self.rows).into_iter();
        let mut next = 0;
        for &k in &keep {
            let k = k as usize;
            self.rows.extend(rows.by_ref().nth(k - next));
            self.logprobs.extend(logprobs.by_ref().nth(k - next));
            next = k + 1;
        }
        if self.rows.is_empty() {
            self.cache = KvCache::default();
            return Ok(());
        }
        self.cache
            .select_rows(&Tensor::new(keep.as_slice(), gen.llama.device())?)?;
        Ok(())
    }

    /// After sampling, with `keep` the old indices of the rows still decoding: shrinks the cache to them
    /// and computes their next log-probabilities.
    fn forward_kept(&mut self, gen: &Generator, keep: &[u32]) -> Result<()> {
        if self.rows.is_empty() {
            self.cache = KvCache::default();
            self.logprobs.clear();
            return Ok(());
        }
        if keep.len() < self.logprobs.len() {
            self.cache
                .select_rows(&Tensor::new(keep, gen.llama.device())?)?;
        }
        // Padding every remaining row has is dead weight in attention: drop it.
        let min_pad = self.rows.iter().map(|r| r.pad).min().unwrap_or(0);
        if min_pad >= 16 {
            self.cache.trim_left(min_pad)?;
            for r in &mut self.rows {
                r.pad -= min_pad;
            }
        }
        let want = want_of(self.rows.iter().map(|r| r.params.as_ref()));
        let (logprobs, captured) = gen.step(&self.rows, &mut self.cache, want)?;
        self.logprobs = logprobs;
        for (row, c) in self.rows.iter_mut().zip(captured) {
            row.captured.extend(c);
        }
        Ok(())
    }
}

/// How much of a sample's `text` so far is final while it streams: not a trailing half character (a
/// token that ends inside a UTF-8 sequence decodes as U+FFFD until the next one completes it), and not
/// the start of a stop string, which the next tokens may complete and cut.
pub fn settled_len(text: &str, stop: &[String]) -> usize {
    let mut end = text.trim_end_matches('\u{FFFD}').len();
    for s in stop {
        if let Some(at) = text.find(s.as_str()) {
            end = end.min(at);
        }
        let head = &text[..end];
        if let Some(k) = (1..s.len())
            .rev()
            .find(|&k| s.is_char_boundary(k) && head.ends_with(&s[..k]))
        {
            end -= k;
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use super::settled_len;

    fn stops(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn text_that_may_still_change_is_held_back() {
        assert_eq!(settled_len("Hello", &[]), 5);
        // Half a character so far.
        assert_eq!(settled_len("caf\u{FFFD}", &[]), 3);
        // "\n" may begin the stop string "\n\n"; "Hel" may begin "Help".
        assert_eq!(settled_len("One\n", &stops(&["\n\n"])), 3);
        assert_eq!(settled_len("Say Hel", &stops(&["Help"])), 4);
        // A whole stop string: nothing from it on.
        assert_eq!(settled_len("One\n\nTwo", &stops(&["\n\n"])), 3);
        // The earliest of several stops wins; a stop that cannot begin here holds nothing back.
        assert_eq!(settled_len("a7b\n", &stops(&["\n\n", "7"])), 1);
        assert_eq!(settled_len("abc", &stops(&["xyz"])), 3);
        // A multi-byte stop string is split only at character boundaries.
        assert_eq!(settled_len("x é", &stops(&["éa"])), 2);
    }
}
