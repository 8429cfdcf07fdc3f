//! Chat completions behind one trait, in OpenAI's shapes, so the task runners do not care whether the
//! model runs here (`local`: the Candle engine, adapters chosen by name) or behind an OpenAI-compatible
//! server. No Candle types cross this boundary.

pub mod cache;
pub mod local;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::model::Message;

pub use cache::CachedBackend;
pub use local::LocalBackend;

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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatResponse {
    pub choices: Vec<Choice>,
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
}
