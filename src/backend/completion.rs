//! Raw-prompt completions (OpenAI's legacy `/v1/completions`) on the local engine: no chat template,
//! prompts as token ids, and with `echo` the prompt's own log-probs — what lm-eval-harness's loglikelihood
//! tasks score (`token_logprobs[ctxlen:-1]` of the echoed prompt plus one generated token).

use std::collections::BTreeMap;

use anyhow::Result;

use super::local::LocalBackend;
use super::Usage;
use crate::engine::sampling::top_k;
use crate::engine::{GenerationParams, RowSpec};
use crate::model::llama::log_softmax;

#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    pub prompt: Vec<u32>,
    /// An adapter name; None: the base model.
    pub model: Option<String>,
    pub n: usize,
    pub temperature: f32,
    pub top_p: f32,
    /// 0 is allowed with `echo` (score the prompt only).
    pub max_tokens: usize,
    pub seed: u64,
    /// Log-probs of every token and this many alternatives per position (OpenAI's integer `logprobs`).
    pub logprobs: Option<usize>,
    /// Put the prompt in front of the text (and of the log-probs).
    pub echo: bool,
    pub stop: Vec<String>,
}

/// OpenAI's legacy log-prob columns, one entry per token of the text.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LegacyLogprobs {
    pub tokens: Vec<String>,
    /// None for the prompt's first token, which has nothing before it.
    pub token_logprobs: Vec<Option<f32>>,
    /// The most likely tokens at each position, the chosen one included (up to logprobs + 1 entries).
    pub top_logprobs: Vec<Option<Vec<(String, f32)>>>,
    /// Each token's offset in the text, in characters.
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CompletionChoice {
    pub text: String,
    pub finish_reason: String,
    pub logprobs: Option<LegacyLogprobs>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CompletionResponse {
    pub choices: Vec<CompletionChoice>,
    pub usage: Usage,
}

impl CompletionRequest {
    /// The engine's settings for this request (requests with equal settings generate together).
    fn params(&self) -> GenerationParams {
        GenerationParams {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            n: self.n.max(1),
            stop: self.stop.clone(),
            top_logprobs: self.logprobs.unwrap_or(0),
        }
    }
}

impl LocalBackend {
    /// Answers raw-prompt requests, in order; requests sharing sampling settings generate together, each
    /// row with its request's adapter.
    pub fn complete(&self, requests: &[CompletionRequest]) -> Result<Vec<CompletionResponse>> {
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, r) in requests.iter().enumerate() {
            let key = serde_json::to_string(&r.params())?;
            groups.entry(key).or_default().push(i);
        }
        let mut out: Vec<Option<CompletionResponse>> = vec![None; requests.len()];
        let gen = self.base_generator();
        for idx in groups.values() {
            let params = requests[idx[0]].params();
            let prompts: Vec<Vec<u32>> = idx.iter().map(|&i| requests[i].prompt.clone()).collect();
            let rows: Vec<RowSpec> = idx
                .iter()
                .map(|&i| {
                    Ok(RowSpec {
                        adapter: requests[i]
                            .model
                            .as_deref()
                            .map(|m| self.adapter(m).cloned())
                            .transpose()?,
                        hooks: None,
                    })
                })
                .collect::<Result<_>>()?;
            let mut generated = vec![vec![]; prompts.len()];
            gen.generate_rows(&prompts, &rows, &params, &mut |k, c| {
                generated[k] = c;
                Ok(())
            })?;
            for (k, completions) in generated.into_iter().enumerate() {
                let r = &requests[idx[k]];
                let adapter = rows[k].adapter.as_deref();
                let echoed = match (r.echo, r.logprobs) {
                    (true, Some(top)) => Some(self.prompt_logprobs(&r.prompt, top, adapter)?),
                    _ => None,
                };
                let prompt_text = if r.echo {
                    self.model.tokenizer.decode(&r.prompt, false)?
                } else {
                    String::new()
                };
                let usage = Usage {
                    prompt_tokens: r.prompt.len() as u64,
                    completion_tokens: completions.iter().map(|c| c.steps.len() as u64).sum(),
                };
                let choices = completions
                    .into_iter()
                    .map(|c| {
                        let logprobs = r.logprobs.map(|_| {
                            let mut l = echoed.clone().unwrap_or_default();
                            for s in &c.steps {
                                let token = self.token_text(s.id);
                                let mut top: Vec<(String, f32)> = s
                                    .top
                                    .iter()
                                    .map(|t| (self.token_text(t.id), t.logprob.0))
                                    .collect();
                                if !s.top.iter().any(|t| t.id == s.id) {
                                    top.push((token.clone(), s.logprob.0));
                                }
                                l.tokens.push(token);
                                l.token_logprobs.push(Some(s.logprob.0));
                                l.top_logprobs.push(Some(top));
                            }
                            l.text_offset = offsets(&l.tokens);
                            l
                        });
                        CompletionChoice {
                            text: format!("{prompt_text}{}", c.text),
                            finish_reason: c.finish_reason.name().into(),
                            logprobs,
                        }
                    })
                    .collect();
                self.usage_counter().add(&usage);
                out[idx[k]] = Some(CompletionResponse { choices, usage });
            }
        }
        Ok(out
            .into_iter()
            .map(|r| r.expect("every request answered"))
            .collect())
    }

    /// Each prompt token's log-prob given the ones before it (None for the first) and the `top` most
    /// likely tokens at its position, the token itself included.
    fn prompt_logprobs(
        &self,
        prompt: &[u32],
        top: usize,
        adapter: Option<&crate::lora::Adapter>,
    ) -> Result<LegacyLogprobs> {
        let rows =
            log_softmax(&self.model.llama.full_logits_with(prompt, adapter)?)?.to_vec2::<f32>()?;
        let mut l = LegacyLogprobs::default();
        for (j, &id) in prompt.iter().enumerate() {
            let token = self.token_text(id);
            if j == 0 {
                l.token_logprobs.push(None);
                l.top_logprobs.push(None);
            } else {
                let row = &rows[j - 1];
                let mut alternatives: Vec<(String, f32)> = top_k(row, top)
                    .into_iter()
                    .map(|t| (self.token_text(t.id), t.logprob.0))
                    .collect();
                if !alternatives.iter().any(|(t, _)| *t == token) {
                    alternatives.push((token.clone(), row[id as usize]));
                }
                l.token_logprobs.push(Some(row[id as usize]));
                l.top_logprobs.push(Some(alternatives));
            }
            l.tokens.push(token);
        }
        Ok(l)
    }
}

/// Where each token starts in their concatenation, in characters.
fn offsets(tokens: &[String]) -> Vec<usize> {
    let mut at = 0;
    tokens
        .iter()
        .map(|t| {
            let start = at;
            at += t.chars().count();
            start
        })
        .collect()
}
