//! The local backend: the Candle engine, with LoRA adapters loaded side by side and chosen per request.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use super::{
    Backend, CapturedTensor, ChatRequest, ChatResponse, Choice, TokenLogprob, TopLogprob, Usage,
    UsageCounter,
};
use crate::engine::{GenerationParams, Generator, RowSpec};
use crate::lora::{peft, AdapterSet};
use crate::model::chat::RenderedChat;
use crate::model::hooks::RowHooks;
use crate::model::{LoadSpec, LoadedModel, WeightMode};

pub struct LocalBackend {
    pub model: LoadedModel,
    adapters: AdapterSet,
    base_fingerprint: String,
    adapter_fingerprints: BTreeMap<String, String>,
    /// Sequences decoded together.
    pub batch_size: usize,
    usage: UsageCounter,
}

/// Identifies files cheaply (path, size, modification time): hashing a 16 GB checkpoint on every run is
/// not worth it to key a cache.
fn stamp(path: &Path) -> Result<String> {
    let mut parts = vec![];
    let files: Vec<std::path::PathBuf> = if path.is_dir() {
        let mut v: Vec<_> = std::fs::read_dir(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    for f in files {
        let m = std::fs::metadata(&f).with_context(|| format!("cannot stat {}", f.display()))?;
        let mtime = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        parts.push(format!("{}:{}:{mtime}", f.display(), m.len()));
    }
    Ok(parts.join("|"))
}

impl LocalBackend {
    pub fn new(model: LoadedModel, spec: impl Into<LoadSpec>) -> Result<Self> {
        let spec = spec.into();
        let mut weights = format!("{:?}", spec.mode);
        if spec.mode == WeightMode::Quantized {
            weights += &format!("|{}", spec.quantize.name());
        }
        let base_fingerprint = crate::registry::sha256_bytes(
            format!("local|{}|{weights}", stamp(&model.path.canonicalize()?)?).as_bytes(),
        );
        Ok(Self {
            model,
            adapters: AdapterSet::default(),
            base_fingerprint,
            adapter_fingerprints: BTreeMap::new(),
            batch_size: 16,
            usage: UsageCounter::default(),
        })
    }

    /// Loads a PEFT adapter directory under `name`; its files' contents key the cache.
    pub fn add_adapter(&mut self, name: &str, dir: &Path) -> Result<()> {
        let adapter = peft::load(dir, &self.model.llama.cfg, self.model.llama.device())
            .with_context(|| format!("adapter {name} ({})", dir.display()))?;
        let mut h = Sha256::new();
        for f in [peft::CONFIG_FILE, peft::WEIGHTS_FILE] {
            let p = dir.join(f);
            h.update(std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?);
        }
        let content: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        self.adapter_fingerprints.insert(name.into(), content);
        self.adapters.insert(name, adapter);
        Ok(())
    }

    /// Drops the adapter named `name`; false when there was none.
    pub fn remove_adapter(&mut self, name: &str) -> bool {
        self.adapter_fingerprints.remove(name);
        self.adapters.remove(name)
    }

    pub fn adapter(&self, name: &str) -> Result<&Arc<crate::lora::Adapter>> {
        self.adapters.get(name)
    }

    /// A generator over the base model decoding up to `batch_size` rows together (rows given to
    /// `generate_rows` bring their own adapters).
    pub fn base_generator(&self) -> Generator<'_> {
        let mut gen = Generator::new(&self.model);
        gen.max_batch_rows = self.batch_size.max(1);
        gen
    }

    /// [`LocalBackend::base_generator`] with the adapter `model` names (None: the base) for its rows.
    pub fn generator(&self, model: Option<&str>) -> Result<Generator<'_>> {
        let mut gen = self.base_generator();
        gen.adapter = model
            .map(|name| self.adapters.get(name))
            .transpose()?
            .cloned();
        Ok(gen)
    }

    /// The prompt's length in tokens, as the engine will see it (chat template applied).
    pub fn prompt_tokens(&self, r: &ChatRequest) -> Result<usize> {
        Ok(self.model.encode_chat(&r.messages)?.1.len())
    }

    pub fn adapter_names(&self) -> Vec<String> {
        self.adapters.names().map(String::from).collect()
    }

    /// Requests with equal keys (sampling settings) decode in one batch, each row with its own adapter.
    /// Rows of a batch are left-padded to its longest prompt, which moves their values across SIMD lanes,
    /// so results are exact to the last bit only between equal groupings: the server groups as this
    /// backend does.
    pub(crate) fn batch_key(r: &ChatRequest) -> String {
        serde_json::to_string(&(Self::params(r), r.logprobs)).expect("a request serializes")
    }

    pub(crate) fn params(r: &ChatRequest) -> GenerationParams {
        GenerationParams {
            max_tokens: r.max_tokens,
            temperature: r.temperature,
            top_p: r.top_p,
            seed: r.seed,
            n: r.n.max(1),
            stop: r.stop.clone(),
            top_logprobs: if r.logprobs { r.top_logprobs } else { 0 },
        }
    }
}

impl Backend for LocalBackend {
    fn fingerprint(&self, model: Option<&str>) -> Result<String> {
        Ok(match model {
            None => self.base_fingerprint.clone(),
            Some(name) => {
                self.adapters.get(name)?;
                crate::registry::sha256_bytes(
                    format!(
                        "{}|{}",
                        self.base_fingerprint, self.adapter_fingerprints[name]
                    )
                    .as_bytes(),
                )
            }
        })
    }

    fn chat_each(
        &self,
        requests: &[ChatRequest],
        done: &mut dyn FnMut(usize, ChatResponse) -> Result<()>,
    ) -> Result<()> {
        // Requests that share sampling settings run as one batched generation, each row with its adapter.
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, r) in requests.iter().enumerate() {
            groups.entry(Self::batch_key(r)).or_default().push(i);
        }
        let gen = self.base_generator();
        for idx in groups.values() {
            let first = &requests[idx[0]];
            let mut prompts = vec![];
            let mut rows = vec![];
            for &i in idx {
                let r = &requests[i];
                let (ids, chat) = self.model.render_chat(&r.messages)?;
                rows.push(RowSpec {
                    adapter: r
                        .model
                        .as_deref()
                        .map(|m| self.adapter(m).cloned())
                        .transpose()?,
                    hooks: self
                        .row_hooks(r, ids.len(), &chat)
                        .with_context(|| format!("request {i}"))?,
                });
                prompts.push(ids);
            }
            gen.generate_rows(&prompts, &rows, &Self::params(first), &mut |k, cs| {
                let r = &requests[idx[k]];
                done(idx[k], self.response(prompts[k].len(), cs, r))
            })?;
        }
        Ok(())
    }

    fn usage(&self) -> Usage {
        self.usage.get()
    }

    fn as_local(&self) -> Option<&LocalBackend> {
        Some(self)
    }
}

impl LocalBackend {
    /// A request's interventions and captures as its rows' hooks (None when it has neither); errors name
    /// the field (`intervene[i]: field …`, `capture: field …`).
    pub(crate) fn row_hooks(
        &self,
        r: &ChatRequest,
        prompt_len: usize,
        chat: &RenderedChat,
    ) -> Result<Option<Arc<RowHooks>>> {
        if r.intervene.is_empty() && r.capture.is_none() {
            return Ok(None);
        }
        let cfg = &self.model.llama.cfg;
        let mut interventions = vec![];
        for (i, spec) in r.intervene.iter().enumerate() {
            let at = || format!("intervene[{i}]");
            let prepared = spec
                .prepare(cfg.num_hidden_layers, cfg.hidden_size)
                .with_context(at)?;
            interventions.push(
                prepared
                    .for_prompt(prompt_len, Some(chat))
                    .with_context(at)?,
            );
        }
        let captures = match &r.capture {
            Some(c) => c
                .specs(cfg.num_hidden_layers, prompt_len, Some(chat))
                .context("capture")?,
            None => vec![],
        };
        Ok(Some(Arc::new(RowHooks {
            interventions,
            captures,
        })))
    }

    /// The answer to `request`, whose prompt had `prompt_len` tokens, counted in the usage.
    pub(crate) fn response(
        &self,
        prompt_len: usize,
        completions: Vec<crate::engine::Completion>,
        request: &ChatRequest,
    ) -> ChatResponse {
        let logprobs = request.logprobs;
        // As OpenAI counts: the prompt once, every choice's tokens (the end-of-turn included).
        let usage = Usage {
            prompt_tokens: prompt_len as u64,
            completion_tokens: completions.iter().map(|c| c.steps.len() as u64).sum(),
        };
        self.usage.add(&usage);
        let choices = completions
            .into_iter()
            .map(|c| Choice {
                logprobs: logprobs.then(|| c.steps.iter().map(|s| self.token_logprob(s)).collect()),
                captures: request
                    .capture
                    .is_some()
                    .then(|| CapturedTensor::gather(&c.captures)),
                text: c.text,
                finish_reason: c.finish_reason.name().into(),
            })
            .collect();
        ChatResponse {
            choices,
            usage: Some(usage),
        }
    }

    /// One generated position in OpenAI's shape.
    pub(crate) fn token_logprob(&self, s: &crate::engine::TokenStep) -> TokenLogprob {
        TokenLogprob {
            token: self.token_text(s.id),
            logprob: s.logprob.0,
            top_logprobs: s
                .top
                .iter()
                .map(|t| TopLogprob {
                    token: self.token_text(t.id),
                    logprob: t.logprob.0,
                })
                .collect(),
        }
    }

    pub(crate) fn usage_counter(&self) -> &UsageCounter {
        &self.usage
    }

    /// One token as text (its bytes decoded alone).
    pub(crate) fn token_text(&self, id: u32) -> String {
        self.model
            .tokenizer
            .decode(&[id], false)
            .unwrap_or_else(|_| self.model.tokenizer.token(id))
    }
}
