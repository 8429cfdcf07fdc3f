//! Batched generation: prompts of different lengths are left-padded into one forward pass, share a KV
//! cache, fan out to n samples after one prefill, and leave the batch as soon as they finish.

use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::live::{Event, LiveBatch, Row, RowSpec, Sequence};

use super::sampling::{best, choose, OrderedF32, TokenLogprob};
use crate::lora::{same_adapter, Adapter, RowAdapters};
use crate::model::cache::KvCache;
use crate::model::decode::{DecodeRows, RowLogprobs, Want};
use crate::model::hooks::{Captured, RowHooks, StepHooks};
use crate::model::llama::{causal_mask, Batch};
use crate::model::{Llama, LoadedModel, TextTokenizer};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationParams {
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    /// Samples per prompt.
    pub n: usize,
    /// Generation stops when the text contains one of these; the text is cut before it.
    pub stop: Vec<String>,
    /// How many alternatives to record at each generated position (0 = none).
    pub top_logprobs: usize,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            n: 1,
            stop: vec![],
            top_logprobs: 0,
        }
    }
}

impl GenerationParams {
    /// What a step must return of each row: greedy decoding needs only the best few, chosen on the device.
    pub(super) fn want(&self) -> Want {
        if self.temperature <= 0.0 {
            Want::Best(self.top_logprobs.max(1))
        } else {
            Want::All
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An EOS id or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    /// OpenAI's `finish_reason`.
    pub fn name(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenStep {
    pub id: u32,
    pub logprob: OrderedF32,
    /// The `top_logprobs` most likely tokens at this position.
    pub top: Vec<TokenLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    pub text: String,
    /// Generated ids, without the final EOS.
    pub token_ids: Vec<u32>,
    pub steps: Vec<TokenStep>,
    pub finish_reason: FinishReason,
    /// What the row's captures read: the prompt's positions, then each generated token's (the last
    /// generated token is never run through the model, so it has none).
    #[serde(skip)]
    pub captures: Vec<Captured>,
}

/// A prefill's cache, each row's padding, its next-token log-probabilities and what its captures read.
pub(super) type Prefilled = (KvCache, Vec<usize>, Vec<RowLogprobs>, Vec<Vec<Captured>>);

/// Prompts sharing at least this many first tokens compute them once.
const MIN_SHARED_PREFIX: usize = 8;

/// The mask for prompt rests that follow a shared start of `past` positions, each row's `pad[r]`
/// padding columns sitting between the start and its rest.
fn hole_mask(
    pad: &[usize],
    t: usize,
    past: usize,
    device: &candle_core::Device,
) -> Result<Option<Tensor>> {
    let hidden: Vec<_> = pad.iter().map(|&p| past..past + p).collect();
    crate::model::ops::attention_mask(&hidden, t, past, device)
}

pub struct Generator<'a> {
    pub llama: &'a Llama,
    /// Needed for text and stop strings; without it completions carry ids only.
    pub tokenizer: Option<&'a TextTokenizer>,
    pub eos_ids: &'a [u32],
    /// Most sequences decoded together (samples count one each).
    pub max_batch_rows: usize,
    /// The LoRA adapter of the rows of `generate` and tree expansion (rows given to
    /// [`Generator::generate_rows`] name their own).
    pub adapter: Option<Arc<Adapter>>,
}

impl<'a> Generator<'a> {
    pub fn new(model: &'a LoadedModel) -> Self {
        Self {
            llama: &model.llama,
            tokenizer: Some(&model.tokenizer),
            eos_ids: &model.eos_ids,
            max_batch_rows: 16,
            adapter: None,
        }
    }

    /// A generator over raw ids (no tokenizer: no text, no stop strings).
    pub fn for_ids(llama: &'a Llama, eos_ids: &'a [u32]) -> Self {
        Self {
            llama,
            tokenizer: None,
            eos_ids,
            max_batch_rows: 16,
            adapter: None,
        }
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        match self.tokenizer {
            Some(t) => t.decode(ids, true),
            None => Ok(String::new()),
        }
    }

    /// n completions for every prompt, in the order given.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        params: &GenerationParams,
    ) -> Result<Vec<Vec<Completion>>> {
        let mut out: Vec<Vec<Completion>> = vec![vec![]; prompts.len()];
        self.generate_each(prompts, params, &mut |i, c| {
            out[i] = c;
            Ok(())
        })?;
        Ok(out)
    }

    /// Like `generate`, handing each prompt's n completions to `done(prompt index, completions)` as
    /// soon as they are finished (in finishing order), so callers can save work as it lands.
    pub fn generate_each(
        &self,
        prompts: &[Vec<u32>],
        params: &GenerationParams,
        done: &mut dyn FnMut(usize, Vec<Completion>) -> Result<()>,
    ) -> Result<()> {
        self.generate_each_hooked(prompts, &[], params, done)
    }

    /// [`Generator::generate`] with each prompt's interventions and captures (`hooks[i]` for prompt i;
    /// prompts past the end of `hooks` have none).
    pub fn generate_hooked(
        &self,
        prompts: &[Vec<u32>],
        hooks: &[Option<Arc<RowHooks>>],
        params: &GenerationParams,
    ) -> Result<Vec<Vec<Completion>>> {
        let mut out: Vec<Vec<Completion>> = vec![vec![]; prompts.len()];
        self.generate_each_hooked(prompts, hooks, params, &mut |i, c| {
            out[i] = c;
            Ok(())
        })?;
        Ok(out)
    }

    /// [`Generator::generate_each`] with each prompt's hooks, as [`Generator::generate_hooked`].
    pub fn generate_each_hooked(
        &self,
        prompts: &[Vec<u32>],
        hooks: &[Option<Arc<RowHooks>>],
        params: &GenerationParams,
        done: &mut dyn FnMut(usize, Vec<Completion>) -> Result<()>,
    ) -> Result<()> {
        ensure!(hooks.len() <= prompts.len(), "more hook lists than prompts");
        let rows: Vec<RowSpec> = (0..prompts.len())
            .map(|i| RowSpec {
                adapter: self.adapter.clone(),
                hooks: hooks.get(i).cloned().flatten(),
            })
            .collect();
        self.generate_rows(prompts, &rows, params, done)
    }

    /// n completions of every prompt, prompt i with `rows[i]`'s adapter and hooks, handed to
    /// `done(prompt index, completions)` as they finish. Rows of different adapters decode together.
    pub fn generate_rows(
        &self,
        prompts: &[Vec<u32>],
        rows: &[RowSpec],
        params: &GenerationParams,
        done: &mut dyn FnMut(usize, Vec<Completion>) -> Result<()>,
    ) -> Result<()> {
        ensure!(rows.len() == prompts.len(), "one row spec per prompt");
        for h in rows.iter().filter_map(|r| r.hooks.as_ref()) {
            h.check(self.llama.cfg.hidden_size)?;
        }
        for (i, p) in prompts.iter().enumerate() {
            self.check(p, params)
                .with_context(|| format!("prompt {i}"))?;
        }
        // Prompts enter (shortest first) whenever enough rows have finished, so one long answer does
        // not hold a whole batch of finished ones.
        let mut queue: std::collections::VecDeque<usize> = (0..prompts.len()).collect();
        queue.make_contiguous().sort_by_key(|&i| prompts[i].len());
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0) + params.max_tokens;
        let cap = self.rows_that_fit(longest).max(params.n);
        let refill_at = (cap / 4).max(params.n);
        let shared = Arc::new(params.clone());
        let mut out: Vec<Vec<Option<Completion>>> = vec![vec![None; params.n]; prompts.len()];
        let mut batch = LiveBatch::default();
        loop {
            let free = cap - batch.len();
            if !queue.is_empty() && (batch.is_empty() || free >= refill_at) {
                let take = (free / params.n).max(1).min(queue.len());
                let seqs: Vec<Sequence> = queue
                    .drain(..take)
                    .map(|i| Sequence {
                        key: i,
                        prompt: &prompts[i],
                        params: shared.clone(),
                        row: rows[i].clone(),
                    })
                    .collect();
                batch.admit(self, &seqs)?;
            }
            if batch.is_empty() {
                break;
            }
            batch.step(self, &mut |event| {
                let Event::Done {
                    key,
                    sample,
                    completion,
                } = event
                else {
                    return Ok(());
                };
                out[key][sample] = Some(completion);
                if out[key].iter().all(Option::is_some) {
                    let cs = std::mem::take(&mut out[key]);
                    done(key, cs.into_iter().map(|c| c.expect("finished")).collect())?;
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Whether `prompt` can be generated from with `params` (a clear error when not).
    pub fn check(&self, prompt: &[u32], params: &GenerationParams) -> Result<()> {
        if !params.stop.is_empty() && self.tokenizer.is_none() {
            bail!("stop strings need a tokenizer");
        }
        if params.n == 0 {
            bail!("n must be at least 1");
        }
        if prompt.is_empty() {
            bail!("the prompt is empty");
        }
        let max_pos = self.llama.cfg.max_position_embeddings;
        if prompt.len() + params.max_tokens > max_pos {
            bail!(
                "the prompt has {} tokens; with max_tokens {} it exceeds the model's {max_pos} positions",
                prompt.len(),
                params.max_tokens
            );
        }
        Ok(())
    }

    /// Most rows (up to `max_batch_rows`) whose caches of `longest` positions the device's free memory
    /// holds: on a 24 GB card beside an 8B model's weights, that is what bounds a batch.
    pub fn rows_that_fit(&self, longest: usize) -> usize {
        let free = crate::memory::free_bytes(self.llama.device());
        let elem = self.llama.kv_dtype().size_in_bytes();
        crate::memory::generation_rows(&self.llama.cfg, free, longest, elem, self.max_batch_rows)
    }

    /// Runs prompts into a fresh cache, left-padded to a common length; returns the cache, each row's
    /// padding and the log-probabilities at each prompt's last position (as much as `want` asks). Prompts
    /// that share a long start (the chat header and task template of a run's prompts) compute it once. The
    /// cache keeps room for `room` more positions. With `hooks` (one per prompt, or none at all) each row's
    /// interventions act on its positions and its captures come back, per prompt; rows with hooks share no
    /// start (an intervention on a shared position would act on every row).
    pub(super) fn forward_prompts(
        &self,
        prompts: &[&[u32]],
        adapters: &[Option<&Adapter>],
        hooks: &[Option<Arc<RowHooks>>],
        room: usize,
        want: Want,
    ) -> Result<Prefilled> {
        ensure!(
            adapters.len() == prompts.len(),
            "one adapter slot per prompt"
        );
        let llama = self.llama;
        let dev = llama.device();
        let b = prompts.len();
        let min_len = prompts.iter().map(|p| p.len()).min().unwrap_or(0);
        // Every row keeps at least one token of its own, whose position yields its logits.
        let hooked = hooks.iter().any(Option::is_some);
        let shared = (0..min_len.saturating_sub(1))
            .take_while(|&j| prompts.iter().all(|p| p[j] == prompts[0][j]))
            .count();
        let shared = if hooked { 0 } else { shared };
        let mut cache = KvCache::with_room(llama.cfg.num_hidden_layers, room);
        let run = |ids: Vec<u32>,
                   positions: Vec<f32>,
                   (t, rows): (usize, usize),
                   adapters: &[Option<&Adapter>],
                   mask: Option<Tensor>,
                   hooks: Option<&StepHooks>,
                   cache: &mut KvCache|
         -> Result<Vec<RowLogprobs>> {
            let hidden = llama.forward(
                &Batch {
                    ids: &Tensor::from_vec(ids, (rows, t), dev)?,
                    positions: &Tensor::from_vec(positions, (rows, t), dev)?,
                    mask: mask.as_ref(),
                    adapters: RowAdapters::Each(adapters),
                    hooks,
                },
                Some(cache),
            )?;
            llama.next_logprobs(&hidden, want)
        };
        if b < 2 || shared < MIN_SHARED_PREFIX {
            let t = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
            let pads: Vec<usize> = prompts.iter().map(|p| t - p.len()).collect();
            let mut ids = Vec::with_capacity(b * t);
            let mut positions = Vec::with_capacity(b * t);
            for (p, &pad) in prompts.iter().zip(&pads) {
                ids.extend(std::iter::repeat_n(0u32, pad).chain(p.iter().copied()));
                positions.extend((0..t).map(|j| j.saturating_sub(pad) as f32));
            }
            let mask = causal_mask(&pads, t, 0, dev)?;
            if !hooked {
                let first = run(ids, positions, (t, b), adapters, mask, None, &mut cache)?;
                let captured = vec![vec![]; b];
                return Ok((cache, pads, first, captured));
            }
            let rows = (0..b).map(|r| hooks.get(r).and_then(|h| h.as_deref()));
            let columns = pads
                .iter()
                .map(|&pad| (0..t).map(|j| j.checked_sub(pad)).collect())
                .collect();
            let step_hooks = StepHooks::new(rows.collect(), columns);
            let first = run(
                ids,
                positions,
                (t, b),
                adapters,
                mask,
                Some(&step_hooks),
                &mut cache,
            )?;
            return Ok((cache, pads, first, step_hooks.into_captured()));
        }
        // The shared start once per adapter (its keys and values depend on it), fanned out to every row.
        let mut starts: Vec<Option<&Adapter>> = vec![];
        let mut start_of = Vec::with_capacity(b);
        for &a in adapters {
            let at = match starts.iter().position(|&s| same_adapter(s, a)) {
                Some(at) => at,
                None => {
                    starts.push(a);
                    starts.len() - 1
                }
            };
            start_of.push(at as u32);
        }
        // One row per run, so each row's start is the same numbers as when its adapter runs alone.
        for &adapter in &starts {
            let mut one = KvCache::with_room(llama.cfg.num_hidden_layers, room);
            run(
                prompts[0][..shared].to_vec(),
                (0..shared).map(|j| j as f32).collect(),
                (shared, 1),
                &[adapter],
                causal_mask(&[0], shared, 0, dev)?,
                None,
                &mut one,
            )?;
            cache.merge(one)?;
        }
        cache.select_rows(&Tensor::new(start_of.as_slice(), dev)?)?;
        // The rest of each prompt, left-padded after the shared start: [start][pad][rest].
        let t = prompts.iter().map(|p| p.len() - shared).max().unwrap_or(0);
        let pads: Vec<usize> = prompts.iter().map(|p| t - (p.len() - shared)).collect();
        let mut ids = Vec::with_capacity(b * t);
        let mut positions = Vec::with_capacity(b * t);
        for (p, &pad) in prompts.iter().zip(&pads) {
            ids.extend(std::iter::repeat_n(0u32, pad).chain(p[shared..].iter().copied()));
            positions.extend((0..t).map(|j| (shared + j.saturating_sub(pad)) as f32));
        }
        let mask = hole_mask(&pads, t, shared, dev)?;
        let first = run(ids, positions, (t, b), adapters, mask, None, &mut cache)?;
        // Move each row's padding to the front, [pad][start][rest], where the rest of the engine
        // (masks, merges, trimming) expects it. Keys carry their positions already, so order is free.
        let orders: Vec<Vec<u32>> = pads
            .iter()
            .map(|&pad| {
                (shared..shared + pad)
                    .chain(0..shared)
                    .chain(shared + pad..shared + t)
                    .map(|c| c as u32)
                    .collect()
            })
            .collect();
        cache.reorder_positions(&orders)?;
        Ok((cache, pads, first, vec![vec![]; b]))
    }

    /// Samples the next token of `row` and records whether it finished.
    pub(super) fn advance(&self, row: &mut Row, lp: &RowLogprobs) -> Result<()> {
        let params = row.params.clone();
        let TokenLogprob { id, logprob } =
            choose(lp, params.temperature, params.top_p, &mut row.rng)?;
        row.steps.push(TokenStep {
            id,
            logprob,
            top: best(lp, params.top_logprobs),
        });
        if self.eos_ids.contains(&id) {
            row.finish = Some(FinishReason::Stop);
            return Ok(());
        }
        row.ids.push(id);
        if !params.stop.is_empty() {
            let text = self.decode(&row.ids)?;
            if let Some(cut) = params
                .stop
                .iter()
                .filter_map(|s| text.find(s.as_str()))
                .min()
            {
                row.text_cut = Some(cut);
                row.finish = Some(FinishReason::Stop);
            }
        }
        if row.finish.is_none() && row.ids.len() >= params.max_tokens {
            row.finish = Some(FinishReason::Length);
        }
        Ok(())
    }

    /// One decode step for every live row: their last tokens in, next-token log-probabilities out.
    pub(super) fn step(
        &self,
        live: &[Row],
        cache: &mut KvCache,
        want: Want,
    ) -> Result<(Vec<RowLogprobs>, Vec<Vec<Captured>>)> {
        let llama = self.llama;
        let next: Vec<u32> = live.iter().map(|r| *r.ids.last().unwrap()).collect();
        let pos: Vec<f32> = live
            .iter()
            .map(|r| (r.prompt_len + r.ids.len() - 1) as f32)
            .collect();
        let pads: Vec<usize> = live.iter().map(|r| r.pad).collect();
        let adapters: Vec<Option<&Adapter>> = live.iter().map(|r| r.adapter.as_deref()).collect();
        let hooks = live.iter().any(|r| r.hooks.is_some()).then(|| {
            StepHooks::new(
                live.iter().map(|r| r.hooks.as_deref()).collect(),
                pos.iter().map(|&p| vec![Some(p as usize)]).collect(),
            )
        });
        let lp = llama.next_token_logprobs(
            &DecodeRows {
                ids: &next,
                positions: &pos,
                pads: &pads,
                adapters: RowAdapters::Each(&adapters),
                hooks: hooks.as_ref(),
            },
            cache,
            want,
        )?;
        let captured = match hooks {
            Some(h) => h.into_captured(),
            None => vec![vec![]; live.len()],
        };
        Ok((lp, captured))
    }

    pub(super) fn complete(&self, row: Row) -> Result<Completion> {
        let mut text = self.decode(&row.ids)?;
        if let Some(cut) = row.text_cut {
            text.truncate(cut);
        }
        Ok(Completion {
            text,
            token_ids: row.ids,
            steps: row.steps,
            finish_reason: row.finish.unwrap_or(FinishReason::Length),
            captures: row.captured,
        })
    }
}
