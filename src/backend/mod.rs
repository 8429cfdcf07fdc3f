//! Chat completions behind one trait, in OpenAI's shapes, so the task runners do not care whether the
//! model runs here (`local`: the Candle engine, adapters chosen by name) or behind an OpenAI-compatible
//! server. No Candle types cross this boundary.

pub mod cache;
pub mod client;
pub mod completion;
pub mod hosted;
pub mod local;
pub mod openai;

use std::collections::BTreeMap;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::model::intervention::{CaptureRequest, InterventionSpec};
use crate::model::Message;

pub use cache::CachedBackend;
pub use completion::{CompletionChoice, CompletionRequest, CompletionResponse, LegacyLogprobs};
pub use local::LocalBackend;
pub use openai::{OpenAiBackend, OpenAiConfig};

/// One chat-completion request (OpenAI's fields; `model` names an adapter, `None` the base model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub model: Option<String>,
    pub n: usize,
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub max_tokens: usize,
    pub seed: u64,
    /// Record the chosen token's log-probability at each position.
    pub logprobs: bool,
    /// And this many alternatives per position.
    pub top_logprobs: usize,
    /// Generation ends when the text contains one of these; the text is cut before it. (Left out of the
    /// serialized request, and so of the cache key, while empty: keys made before it existed still hit.)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// Interventions on the residual stream (introspect's extension; the local engine and `introspect
    /// serve` take them). Left out of the serialized request while empty, as `stop`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub intervene: Vec<InterventionSpec>,
    /// Hook points and positions to read into each choice's `captures` (introspect's extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<CaptureRequest>,
}

impl ChatRequest {
    /// A greedy request for one completion.
    pub fn greedy(messages: Vec<Message>, max_tokens: usize) -> Self {
        Self {
            messages,
            model: None,
            n: 1,
            temperature: 0.0,
            top_p: 1.0,
            max_tokens,
            seed: 0,
            logprobs: false,
            top_logprobs: 0,
            stop: vec![],
            intervene: vec![],
            capture: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
}

/// OpenAI's `logprobs.content[i]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    pub text: String,
    /// `stop` (end of turn or stop string) or `length` (max_tokens).
    pub finish_reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// What the request's `capture` read, by hook name (introspect's extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub captures: Option<BTreeMap<String, CapturedTensor>>,
}

/// One hook point's reads in a response: the positions, shape [positions, d] and the f32 values,
/// little-endian, base64.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapturedTensor {
    pub positions: Vec<usize>,
    pub shape: [usize; 2],
    pub data: String,
}

impl CapturedTensor {
    /// The values, [positions × d] row-major.
    pub fn values(&self) -> Result<Vec<f32>> {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD.decode(&self.data)?;
        anyhow::ensure!(
            bytes.len() == 4 * self.shape[0] * self.shape[1],
            "captured data holds {} bytes for shape {:?}",
            bytes.len(),
            self.shape
        );
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// A completion's captures by hook name.
    pub fn gather(captured: &[crate::model::hooks::Captured]) -> BTreeMap<String, CapturedTensor> {
        use base64::Engine;
        let mut by: BTreeMap<crate::model::hooks::HookPoint, (Vec<usize>, Vec<u8>, usize)> =
            BTreeMap::new();
        for c in captured {
            let e = by.entry(c.point).or_default();
            e.0.push(c.position);
            e.1.extend(c.values.iter().flat_map(|v| v.to_le_bytes()));
            e.2 = c.values.len();
        }
        by.into_iter()
            .map(|(point, (positions, bytes, d))| {
                let tensor = CapturedTensor {
                    shape: [positions.len(), d],
                    positions,
                    data: base64::engine::general_purpose::STANDARD.encode(bytes),
                };
                (point.name(), tensor)
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatResponse {
    pub choices: Vec<Choice>,
    /// The tokens this answer took (the prompt once, every choice's completion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// Tokens a backend has processed (OpenAI's `usage`): what a hosted API bills.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
}

impl std::ops::Sub for Usage {
    type Output = Usage;
    fn sub(self, o: Usage) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens.saturating_sub(o.prompt_tokens),
            completion_tokens: self.completion_tokens.saturating_sub(o.completion_tokens),
        }
    }
}

impl std::ops::Add for Usage {
    type Output = Usage;
    fn add(self, o: Usage) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens + o.prompt_tokens,
            completion_tokens: self.completion_tokens + o.completion_tokens,
        }
    }
}

/// A running total of [`Usage`], shared by a backend's threads.
#[derive(Debug, Default)]
pub struct UsageCounter {
    prompt: std::sync::atomic::AtomicU64,
    completion: std::sync::atomic::AtomicU64,
}

impl UsageCounter {
    pub fn add(&self, u: &Usage) {
        use std::sync::atomic::Ordering::Relaxed;
        self.prompt.fetch_add(u.prompt_tokens, Relaxed);
        self.completion.fetch_add(u.completion_tokens, Relaxed);
    }

    pub fn get(&self) -> Usage {
        use std::sync::atomic::Ordering::Relaxed;
        Usage {
            prompt_tokens: self.prompt.load(Relaxed),
            completion_tokens: self.completion.load(Relaxed),
        }
    }
}

pub trait Backend {
    /// What produced the answers to requests for `model` (an adapter name or the base): weights,
    /// adapter contents, precision. Requests are cached under it, so it must change when they change.
    fn fingerprint(&self, model: Option<&str>) -> Result<String>;

    /// Answers every request, in order. Implementations batch and parallelise as they can.
    fn chat(&self, requests: &[ChatRequest]) -> Result<Vec<ChatResponse>> {
        let mut out: Vec<Option<ChatResponse>> = vec![None; requests.len()];
        self.chat_each(requests, &mut |i, r| {
            out[i] = Some(r);
            Ok(())
        })?;
        Ok(out
            .into_iter()
            .map(|r| r.expect("every request answered"))
            .collect())
    }

    /// Answers every request, handing each answer to `done(request index, answer)` as soon as it is
    /// ready, in any order.
    fn chat_each(
        &self,
        requests: &[ChatRequest],
        done: &mut dyn FnMut(usize, ChatResponse) -> Result<()>,
    ) -> Result<()>;

    /// Tokens processed so far (requests answered from a cache count nothing).
    fn usage(&self) -> Usage;

    /// The engine itself, for what only it can do (expanding a model's exact answer distribution).
    fn as_local(&self) -> Option<&LocalBackend> {
        None
    }
}
