//! The OpenAI-compatible backend: `/v1/chat/completions` on any base URL (vLLM, OpenAI, Fireworks,
//! Together, `introspect serve`). Requests run with bounded concurrency; transient failures (408, 409,
//! 429, 5xx, timeouts, refused connections) are retried with exponential backoff and full jitter, honouring
//! Retry-After; any other 4xx is reported with the server's message and not retried. `n` is split across
//! requests where a server caps it, and topped up where one silently returns fewer choices.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};

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
        }
    }
}

pub struct OpenAiBackend {
    pub config: OpenAiConfig,
    /// The model as the server names it; requests naming an adapter send that name instead.
    pub model: String,
    api_key: Option<String>,
    agent: ureq::Agent,
    usage: UsageCounter,
    /// Retried attempts so far (shown in the run's summary).
    pub retries: AtomicUsize,
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

/// How one attempt failed.
enum Failure {
    /// Worth another attempt, after at least this long (Retry-After) if given.
    Transient(String, Option<Duration>),
    /// The server refused the request itself: retrying cannot help.
    Refused(String),
}

impl OpenAiBackend {
    pub fn new(config: OpenAiConfig, model: &str) -> Result<Self> {
        if !(config.base_url.starts_with("http://") || config.base_url.starts_with("https://")) {
            bail!(
                "base URL `{}` must start with http:// or https:// (e.g. http://127.0.0.1:8000/v1)",
                config.base_url
            );
        }
        let api_key =
            match &config.api_key_env {
                None => None,
                Some(var) => Some(std::env::var(var).with_context(|| {
                    format!("the API key's environment variable {var} is not set")
                })?),
            };
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs_f64(config.timeout_s.max(0.001)))
            .build();
        Ok(Self {
            config,
            model: model.into(),
            api_key,
            agent,
            usage: UsageCounter::default(),
            retries: AtomicUsize::new(0),
        })
    }

    fn url(&self) -> String {
        format!(
            "{}/chat/completions",
            self.config.base_url.trim_end_matches('/')
        )
    }

    /// One POST, classified.
    fn attempt(&self, body: &WireRequest) -> std::result::Result<WireResponse, Failure> {
        let mut req = self.agent.post(&self.url());
        if let Some(key) = &self.api_key {
            req = req.set("Authorization", &format!("Bearer {key}"));
        }
        match req.send_json(body) {
            Ok(resp) => {
                let text = resp
                    .into_string()
                    .map_err(|e| Failure::Transient(format!("reading the answer: {e}"), None))?;
                serde_json::from_str(&text).map_err(|e| {
                    Failure::Refused(format!(
                        "the answer is not a chat completion ({e}): {}",
                        snippet(&text)
                    ))
                })
            }
            Err(ureq::Error::Status(code, resp)) => {
                let wait = retry_after(&resp);
                let text = resp.into_string().unwrap_or_default();
                let message = format!("HTTP {code}: {}", error_message(&text));
                if matches!(code, 408 | 409 | 429) || code >= 500 {
                    Err(Failure::Transient(message, wait))
                } else {
                    Err(Failure::Refused(message))
                }
            }
            Err(e) => Err(Failure::Transient(e.to_string(), None)),
        }
    }

    /// One POST with retries: exponential backoff from 0.5 s to 30 s with full jitter, or the server's
    /// Retry-After when it is longer.
    fn post(&self, body: &WireRequest) -> Result<WireResponse> {
        let mut tries = 0;
        loop {
            match self.attempt(body) {
                Ok(r) => return Ok(r),
                Err(Failure::Refused(m)) => bail!("POST {}: {m}", self.url()),
                Err(Failure::Transient(m, wait)) => {
                    if tries >= self.config.max_retries {
                        bail!(
                            "POST {}: {m} (gave up after {} attempts)",
                            self.url(),
                            tries + 1
                        );
                    }
                    let cap = (0.5 * 2f64.powi(tries as i32)).min(30.0);
                    let jitter = Duration::from_secs_f64(rand::rng().random_range(0.0..=cap));
                    std::thread::sleep(wait.map_or(jitter, |w| w.max(jitter)));
                    tries += 1;
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("POST {}: {m}; retry {tries}", self.url());
                }
            }
        }
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
            let mut answer = self.post(&body)?;
            if let Some(u) = answer.usage {
                self.usage.add(&u);
                usage = Some(usage.unwrap_or_default() + u);
            }
            if answer.choices.is_empty() {
                bail!(
                    "POST {}: the server answered n = {n} with no choices",
                    self.url()
                );
            }
            answer.choices.sort_by_key(|c| c.index);
            choices.extend(answer.choices.into_iter().take(n).map(|c| Choice {
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

/// The server's Retry-After (seconds) or retry-after-ms, if any.
fn retry_after(resp: &ureq::Response) -> Option<Duration> {
    if let Some(ms) = resp
        .header("retry-after-ms")
        .and_then(|v| v.trim().parse::<f64>().ok())
    {
        return Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    resp.header("retry-after")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|s| Duration::from_secs_f64(s.clamp(0.0, 600.0)))
}

/// OpenAI's `{"error": {"message": ...}}`, or the body itself.
fn error_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            let e = v.get("error").unwrap_or(&v);
            e.get("message")
                .and_then(|m| m.as_str())
                .map(String::from)
                .or_else(|| e.as_str().map(String::from))
        })
        .unwrap_or_else(|| snippet(body))
}

fn snippet(text: &str) -> String {
    let t: String = text.chars().take(300).collect();
    if t.len() < text.len() {
        format!("{t}…")
    } else {
        t
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
