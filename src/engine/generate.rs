//! Batched generation: prompts of different lengths are left-padded into one forward pass, share a KV
//! cache, fan out to n samples after one prefill, and leave the batch as soon as they finish.

use anyhow::{bail, Result};
use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::sampling::{sample, top_k, OrderedF32, TokenLogprob};
use crate::lora::Adapter;
use crate::model::cache::KvCache;
use crate::model::llama::{causal_mask, last_position, log_softmax, Batch};
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An EOS id or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenStep {
    pub id: u32,
    pub logprob: OrderedF32,
    /// The `top_logprobs` most likely tokens at this position.
    pub top: Vec<TokenLogprob>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    pub text: String,
    /// Generated ids, without the final EOS.
    pub token_ids: Vec<u32>,
    pub steps: Vec<TokenStep>,
    pub finish_reason: FinishReason,
}

pub struct Generator<'a> {
    pub llama: &'a Llama,
    /// Needed for text and stop strings; without it completions carry ids only.
    pub tokenizer: Option<&'a TextTokenizer>,
    pub eos_ids: &'a [u32],
    /// Most sequences decoded together (samples count one each).
    pub max_batch_rows: usize,
    /// A LoRA adapter on top of the model's weights.
    pub adapter: Option<&'a Adapter>,
}

/// One sequence being decoded.
struct Row {
    request: usize,
    pad: usize,
    prompt_len: usize,
    ids: Vec<u32>,
    steps: Vec<TokenStep>,
    rng: StdRng,
    finish: Option<FinishReason>,
    text_cut: Option<usize>,
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
        if !params.stop.is_empty() && self.tokenizer.is_none() {
            bail!("stop strings need a tokenizer");
        }
        if params.n == 0 {
            bail!("n must be at least 1");
        }
        if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
            bail!("prompt {i} is empty");
        }
        let max_pos = self.llama.cfg.max_position_embeddings;
        if let Some(i) = prompts
            .iter()
            .position(|p| p.len() + params.max_tokens > max_pos)
        {
            bail!(
                "prompt {i} has {} tokens; with max_tokens {} it exceeds the model's {max_pos} positions",
                prompts[i].len(),
                params.max_tokens
            );
        }
        // Similar lengths together keep padding small.
        let mut order: Vec<usize> = (0..prompts.len()).collect();
        order.sort_by_key(|&i| prompts[i].len());
        let per_chunk = (self.max_batch_rows / params.n).max(1);
        let mut out: Vec<Vec<Completion>> = vec![vec![]; prompts.len()];
        for chunk in order.chunks(per_chunk) {
            let batch: Vec<&[u32]> = chunk.iter().map(|&i| prompts[i].as_slice()).collect();
            for (k, completions) in self.generate_batch(&batch, params)?.into_iter().enumerate() {
                out[chunk[k]] = completions;
            }
        }
        Ok(out)
    }

    fn generate_batch(
        &self,
        prompts: &[&[u32]],
        params: &GenerationParams,
    ) -> Result<Vec<Vec<Completion>>> {
        let llama = self.llama;
        let dev = llama.device();
        let t = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let pads: Vec<usize> = prompts.iter().map(|p| t - p.len()).collect();
        let mut ids = Vec::with_capacity(prompts.len() * t);
        let mut positions = Vec::with_capacity(prompts.len() * t);
        for (p, &pad) in prompts.iter().zip(&pads) {
            ids.extend(std::iter::repeat_n(0u32, pad).chain(p.iter().copied()));
            positions.extend((0..t).map(|j| j.saturating_sub(pad) as f32));
        }
        let ids = Tensor::from_vec(ids, (prompts.len(), t), dev)?;
        let positions = Tensor::from_vec(positions, (prompts.len(), t), dev)?;
        let mask = causal_mask(&pads, t, 0, dev)?;
        let mut cache = KvCache::new(llama.cfg.num_hidden_layers);
        let hidden = llama.forward(
            &Batch {
                ids: &ids,
                positions: &positions,
                mask: mask.as_ref(),
                adapter: self.adapter,
            },
            Some(&mut cache),
        )?;
        let mut logprobs =
            log_softmax(&llama.logits(&last_position(&hidden)?)?)?.to_vec2::<f32>()?;

        // Fan each prompt out to its n samples.
        let mut rows: Vec<Row> = Vec::new();
        let mut fan = Vec::new();
        for (r, p) in prompts.iter().enumerate() {
            for s in 0..params.n {
                fan.push(r as u32);
                rows.push(Row {
                    request: r,
                    pad: pads[r],
                    prompt_len: p.len(),
                    ids: vec![],
                    steps: vec![],
                    rng: StdRng::seed_from_u64(
                        params
                            .seed
                            .wrapping_add((s as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                    ),
                    finish: None,
                    text_cut: None,
                });
            }
        }
        if params.n > 1 {
            cache.select_rows(&Tensor::new(fan.as_slice(), dev)?)?;
            logprobs = fan.iter().map(|&r| logprobs[r as usize].clone()).collect();
        }
        let mut active: Vec<usize> = (0..rows.len()).collect();
        if params.max_tokens == 0 {
            for row in &mut rows {
                row.finish = Some(FinishReason::Length);
            }
            active.clear();
        }
        while !active.is_empty() {
            let mut still = Vec::with_capacity(active.len());
            for (k, &ri) in active.iter().enumerate() {
                let row = &mut rows[ri];
                let lp = &logprobs[k];
                let id = sample(lp, params.temperature, params.top_p, &mut row.rng);
                row.steps.push(TokenStep {
                    id,
                    logprob: OrderedF32(lp[id as usize]),
                    top: top_k(lp, params.top_logprobs),
                });
                if self.eos_ids.contains(&id) {
                    row.finish = Some(FinishReason::Stop);
                } else {
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
                }
                if row.finish.is_none() {
                    still.push((k, ri));
                }
            }
            if still.is_empty() {
                break;
            }
            if still.len() < active.len() {
                let keep: Vec<u32> = still.iter().map(|&(k, _)| k as u32).collect();
                cache.select_rows(&Tensor::new(keep.as_slice(), dev)?)?;
            }
            active = still.iter().map(|&(_, ri)| ri).collect();
            let b = active.len();
            let next: Vec<u32> = active
                .iter()
                .map(|&ri| *rows[ri].ids.last().unwrap())
                .collect();
            let pos: Vec<f32> = active
                .iter()
                .map(|&ri| (rows[ri].prompt_len + rows[ri].ids.len() - 1) as f32)
                .collect();
            let step_pads: Vec<usize> = active.iter().map(|&ri| rows[ri].pad).collect();
            let ids = Tensor::from_vec(next, (b, 1), dev)?;
            let positions = Tensor::from_vec(pos, (b, 1), dev)?;
            let mask = causal_mask(&step_pads, 1, cache.len(), dev)?;
            let hidden = llama.forward(
                &Batch {
                    ids: &ids,
                    positions: &positions,
                    mask: mask.as_ref(),
                    adapter: self.adapter,
                },
                Some(&mut cache),
            )?;
            logprobs = log_softmax(&llama.logits(&last_position(&hidden)?)?)?.to_vec2::<f32>()?;
        }

        let mut out: Vec<Vec<Completion>> = vec![vec![]; prompts.len()];
        for row in rows {
            let mut text = self.decode(&row.ids)?;
            if let Some(cut) = row.text_cut {
                text.truncate(cut);
            }
            out[row.request].push(Completion {
                text,
                token_ids: row.ids,
                steps: row.steps,
                finish_reason: row.finish.unwrap_or(FinishReason::Length),
            });
        }
        Ok(out)
    }
}
