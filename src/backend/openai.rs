//! The OpenAI-compatible backend: `/v1/chat/completions` on any base URL (vLLM, OpenAI, Fireworks,
//! Together, `introspect serve`). Requests run with bounded concurrency and the retries of
//! [`ApiClient`]; `n` is split across requests where a server caps it, and topped up where one silently
//! returns fewer choices.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::client::{ApiClient, Repeat};
use super::{
    Backend, ChatRequest, ChatResponse, Choice, TokenLogprob, TopLogprob, Usage, UsageCounter,
};
use crate::model::Message;

/// Where the server is and how to talk to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiConfig {
    /// Up to and including `/v1`, e.g. `http://127.0.0.1:8000/v1` or `https://api.openai.com/v1`.
    pub base_url: String,
    /// The environment variable holding the API key (sent as `Authorization: Bearer`); none: no key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// Requests in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// The most choices one request asks for; a larger `n` is split (llama.cpp's server: 1).
    #[serde(default = "default_max_n")]
    pub max_n: usize,
    /// Seconds one request may take before it is abandoned and retried.
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// Attempts after the first before a request's failure ends the run.
    #[serde(default = "default_retries")]
    pub max_retries: usize,
    /// Seconds before the first poll of a hosted fine-tuning job (then 1.5× longer each, up to 60).
    #[serde(default = "default_poll")]
    pub poll_s: f64,
}

fn default_poll() -> f64 {
    10.0
}

fn default_concurrency() -> usize {
    16
}
fn default_max_n() -> usize {
    128
}
fn default_timeout() -> f64 {
    600.0
}
fn default_retries() -> usize {
    8
}

impl OpenAiConfig {
    pub fn new(base_url: &str) -> Self {
        Self {
            base_url: base_url.into(),
            api_key_env: None,
            concurrency: default_concurrency(),
            max_n: default_max_n(),
            timeout_s: default_timeout(),
            max_retries: default_retries(),
            poll_s: default_poll(),
        }
    }
}

pub struct OpenAiBackend {
    pub config: OpenAiConfig,
    /// The model as the server names it; requests naming an adapter send that name instead.
    pub model: String,
    pub client: ApiClient,
    usage: UsageCounter,
}

/// The request body: OpenAI's fields, only those set.
#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: &'a [Message],
    n: usize,
    temperature: f32,
    top_p: f32,
    max_tokens: usize,
    seed: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    logprobs: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_logprobs: Option<usize>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
}

#[derive(Deserialize)]
struct WireResponse {
    choices: Vec<WireChoice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct WireChoice {
    #[serde(default)]
    index: usize,
    message: WireMessage,
    #[serde(default)]
    finish_reason: Option<String>,
    #[serde(default)]
    logprobs: Option<WireLogprobs>,
}

#[derive(Deserialize)]
struct WireMessage {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct WireLogprobs {
    #[serde(default)]
    content: Option<Vec<WireTokenLogprob>>,
}

#[derive(Deserialize)]
struct WireTokenLogprob {
    token: String,
    logprob: f32,
    #[serde(default)]
    top_logprobs: Vec<WireTop>,
}

#[derive(Deserialize)]
struct WireTop {
    token: String,
    logprob: f32,
}

impl OpenAiBackend {
    pub fn new(config: OpenAiConfig, model: &str) -> Result<Self> {
        Ok(Self {
            client: ApiClient::new(&config)?,
            config,
            model: model.into(),
            usage: UsageCounter::default(),
        })
    }

    /// All `n` choices of one request: split into requests of at most `max_n`, each with its own seed,
    /// and topped up while a server returns fewer than asked.
    fn complete(&self, r: &ChatRequest) -> Result<ChatResponse> {
        let model = r.model.as_deref().unwrap_or(&self.model);
        let want = r.n.max(1);
        let mut choices = vec![];
        let mut usage: Option<Usage> = None;
        let mut part = 0u64;
        while choices.len() < want {
            let n = (want - choices.len()).min(self.config.max_n.max(1));
            let body = WireRequest {
                model,
                messages: &r.messages,
                n,
                temperature: r.temperature,
                top_p: r.top_p,
                max_tokens: r.max_tokens,
                seed: r.seed.wrapping_add(part),
                logprobs: r.logprobs,
                top_logprobs: r.logprobs.then_some(r.top_logprobs),
                stop: &r.stop,
            };
            let mut answer: WireResponse =
                self.client
                    .post_json("chat/completions", &body, Repeat::Safe)?;
            if let Some(u) = answer.usage {
                self.usage.add(&u);
                usage = Some(usage.unwrap_or_default() + u);
            }
            if answer.choices.is_empty() {
                bail!(
                    "POST {}: the server answered n = {n} with no choices",
                    self.client.url("chat/completions")
                );
            }
            answer.choices.sort_by_key(|c| c.index);
            choices.extend(answer.choices.into_iter().take(n).map(|c| Choice {
                captures: None,
                text: c.message.content.unwrap_or_default(),
                finish_reason: c.finish_reason.unwrap_or_else(|| "stop".into()),
                logprobs: r.logprobs.then(|| {
                    c.logprobs
                        .and_then(|l| l.content)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|t| TokenLogprob {
                            token: t.token,
                            logprob: t.logprob,
                            top_logprobs: t
                                .top_logprobs
                                .into_iter()
                                .map(|t| TopLogprob {
                                    token: t.token,
                                    logprob: t.logprob,
                                })
                                .collect(),
                        })
                        .collect()
                }),
            }));
            part += 1;
        }
        Ok(ChatResponse { choices, usage })
    }
}

impl Backend for OpenAiBackend {
    /// The base URL and the model name: a remote model can change under the same name, which no
    /// fingerprint taken from here can see.
    fn fingerprint(&self, model: Option<&str>) -> Result<String> {
        Ok(crate::registry::sha256_bytes(
            format!(
                "openai|{}|{}",
                self.config.base_url.trim_end_matches('/'),
                model.unwrap_or(&self.model)
            )
            .as_bytes(),
        ))
    }

    fn chat_each(
        &self,
        requests: &[ChatRequest],
        done: &mut dyn FnMut(usize, ChatResponse) -> Result<()>,
    ) -> Result<()> {
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        let (tx, rx) = std::sync::mpsc::channel::<(usize, Result<ChatResponse>)>();
        std::thread::scope(|s| {
            for _ in 0..self.config.concurrency.clamp(1, requests.len().max(1)) {
                let tx = tx.clone();
                let (next, stop) = (&next, &stop);
                s.spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= requests.len() {
                            break;
                        }
                        if tx.send((i, self.complete(&requests[i]))).is_err() {
                            break;
                        }
                    }
                });
            }
            drop(tx);
            // Answers are handed on as they come; the first failure stops the workers (requests in flight
            // finish) and is returned.
            let mut first_error = None;
            for (i, answer) in rx {
                let r = answer.and_then(|a| done(i, a));
                if let Err(e) = r {
                    stop.store(true, Ordering::Relaxed);
                    first_error.get_or_insert(e.context(format!("request {i}")));
                }
            }
            first_error.map_or(Ok(()), Err)
        })
    }

    fn usage(&self) -> Usage {
        self.usage.get()
    }
}
