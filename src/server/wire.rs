//! OpenAI's request and response shapes as the server reads and writes them, and the checks that turn a
//! bad request into a 400 naming its parameter (what the openai SDK raises as `BadRequestError`).

use serde::{Deserialize, Serialize};

use super::ApiError;
use crate::backend::{ChatRequest, ChatResponse, TokenLogprob, Usage};
use crate::model::intervention::{CaptureRequest, InterventionSpec, VectorSpec};
use crate::model::Message;

/// The most choices one request may ask for (the paper (b) authors' client asks up to 128).
pub const MAX_N: usize = 128;
/// OpenAI's cap on alternatives per position.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// `POST /v1/chat/completions`. Fields OpenAI has and this engine ignores (user, penalties at their
/// defaults, ...) are accepted and ignored, as vLLM does.
#[derive(Debug, Deserialize)]
pub struct ChatBody {
    pub model: String,
    pub messages: Vec<MessageIn>,
    #[serde(default)]
    pub n: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default, alias = "max_completion_tokens")]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<i64>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// introspect's extension: interventions on the residual stream, as `generate --intervene` takes them
    /// (vectors inline only).
    #[serde(default)]
    pub intervene: Option<serde_json::Value>,
    /// introspect's extension: `{"hooks": PATTERN, "positions": SPEC}`, read into each choice's `captures`.
    #[serde(default)]
    pub capture: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct MessageIn {
    pub role: String,
    pub content: Content,
}

/// A message's content: a string, or OpenAI's list of parts (text parts only).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

fn bad(param: &str, message: String) -> ApiError {
    ApiError::bad_request(message, Some(param))
}

/// The sampling fields chat and legacy completions share, checked (OpenAI's defaults: n 1, T 1, top_p 1).
struct Sampling {
    n: usize,
    temperature: f32,
    top_p: f32,
    stop: Vec<String>,
}

fn sampling(
    n: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    stop: &Option<Stop>,
) -> Result<Sampling, ApiError> {
    let n = n.unwrap_or(1);
    if !(1..=MAX_N as i64).contains(&n) {
        return Err(bad(
            "n",
            format!("n must be between 1 and {MAX_N}, not {n}"),
        ));
    }
    let temperature = temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad(
            "temperature",
            format!("temperature must be between 0 and 2, not {temperature}"),
        ));
    }
    let top_p = top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad(
            "top_p",
            format!("top_p must be in (0, 1], not {top_p}"),
        ));
    }
    let stop = match stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(bad("stop", "stop takes at most 4 non-empty strings".into()));
    }
    Ok(Sampling {
        n: n as usize,
        temperature: temperature as f32,
        top_p: top_p as f32,
        stop,
    })
}

impl ChatBody {
    /// The engine's request, or the first parameter that is out of range. `adapter` is what `model`
    /// resolved to (None: the base model).
    pub fn to_request(&self, adapter: Option<String>) -> Result<ChatRequest, ApiError> {
        if self.messages.is_empty() {
            return Err(bad("messages", "messages must not be empty".into()));
        }
        let mut messages = vec![];
        for (i, m) in self.messages.iter().enumerate() {
            if !matches!(
                m.role.as_str(),
                "system" | "developer" | "user" | "assistant"
            ) {
                return Err(bad(
                    "messages",
                    format!(
                        "messages[{i}].role `{}` is not one of system, developer, user, assistant",
                        m.role
                    ),
                ));
            }
            let content = match &m.content {
                Content::Text(t) => t.clone(),
                Content::Parts(parts) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            _ => {
                                return Err(bad(
                                    "messages",
                                    format!(
                                        "messages[{i}]: only text parts are supported, not `{}`",
                                        p.kind
                                    ),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            // The chat template knows system, user and assistant; OpenAI's developer role is the system's.
            let role = if m.role == "developer" {
                "system"
            } else {
                &m.role
            };
            messages.push(Message::new(role, &content));
        }
        let Sampling {
            n,
            temperature,
            top_p,
            stop,
        } = sampling(self.n, self.temperature, self.top_p, &self.stop)?;
        let max_tokens = self.max_tokens.unwrap_or(256);
        if max_tokens < 1 {
            return Err(bad(
                "max_tokens",
                format!("max_tokens must be at least 1, not {max_tokens}"),
            ));
        }
        let logprobs = self.logprobs.unwrap_or(false);
        let top_logprobs = self.top_logprobs.unwrap_or(0);
        if !(0..=MAX_TOP_LOGPROBS as i64).contains(&top_logprobs) {
            return Err(bad(
                "top_logprobs",
                format!(
                    "top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, not {top_logprobs}"
                ),
            ));
        }
        if top_logprobs > 0 && !logprobs {
            return Err(bad(
                "top_logprobs",
                "top_logprobs needs logprobs: true".into(),
            ));
        }
        let intervene: Vec<InterventionSpec> = match &self.intervene {
            None => vec![],
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
                bad(
                    "intervene",
                    format!("intervene: expected a list of {{\"hook\", \"op\", \"vector\", \"alpha\", \"scale\", \"positions\"}}: {e}"),
                )
            })?,
        };
        for (i, spec) in intervene.iter().enumerate() {
            // A path would have the server read its own files for a client.
            if matches!(spec.vector, Some(VectorSpec::File { .. })) {
                return Err(bad(
                    "intervene",
                    format!("intervene[{i}].vector: give the values inline; files are read only locally"),
                ));
            }
        }
        let capture: Option<CaptureRequest> = match &self.capture {
            None => None,
            Some(v) => Some(serde_json::from_value(v.clone()).map_err(|e| {
                bad(
                    "capture",
                    format!("capture: expected {{\"hooks\", \"positions\"}}: {e}"),
                )
            })?),
        };
        if capture.is_some() && self.stream == Some(true) {
            return Err(bad(
                "capture",
                "capture is not streamed: ask without stream".into(),
            ));
        }
        Ok(ChatRequest {
            messages,
            model: adapter,
            n,
            temperature,
            top_p,
            max_tokens: max_tokens as usize,
            // OpenAI's seed is a signed integer; its bits seed the engine.
            seed: self.seed.unwrap_or(0) as u64,
            logprobs,
            top_logprobs: top_logprobs as usize,
            stop,
            intervene,
            capture,
        })
    }
}

/// A log-prob as JSON can carry it: −∞ (and NaN) as −9999.0, as OpenAI and vLLM do; serde_json would
/// write `null`, which breaks clients that sum them.
pub fn finite(lp: f32) -> f32 {
    if lp.is_finite() {
        lp
    } else {
        -9999.0
    }
}

#[derive(Serialize)]
pub struct TopOut {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Serialize)]
pub struct TokenOut {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopOut>,
}

#[derive(Serialize)]
pub struct LogprobsOut {
    pub content: Vec<TokenOut>,
}

#[derive(Serialize)]
pub struct UsageOut {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl From<Usage> for UsageOut {
    fn from(u: Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
        }
    }
}

/// OpenAI's `logprobs` object of these positions.
pub fn logprobs_content(steps: &[TokenLogprob]) -> LogprobsOut {
    LogprobsOut {
        content: steps
            .iter()
            .map(|t| TokenOut {
                token: t.token.clone(),
                logprob: finite(t.logprob),
                bytes: t.token.as_bytes().to_vec(),
                top_logprobs: t
                    .top_logprobs
                    .iter()
                    .map(|a| TopOut {
                        token: a.token.clone(),
                        logprob: finite(a.logprob),
                        bytes: a.token.as_bytes().to_vec(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// The `logprobs` object of one choice.
pub fn logprobs_out(c: &crate::backend::Choice) -> Option<LogprobsOut> {
    c.logprobs.as_deref().map(logprobs_content)
}

/// A whole `chat.completion` object.
pub fn completion_json(id: &str, created: u64, model: &str, r: &ChatResponse) -> serde_json::Value {
    let choices: Vec<serde_json::Value> = r
        .choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut choice = serde_json::json!({
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": logprobs_out(c),
                "finish_reason": c.finish_reason,
            });
            if let Some(captures) = &c.captures {
                choice["captures"] = serde_json::json!(captures);
            }
            choice
        })
        .collect();
    serde_json::json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": UsageOut::from(r.usage.unwrap_or_default()),
    })
}

/// The `chat.completion.chunk` events of one streamed answer: each choice's role, then its text as it
/// settles (with its tokens' log-probs), then what of it was not sent yet and its finish reason; then
/// usage when asked.
pub struct ChatChunks {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    /// Per choice: bytes of text and tokens sent so far.
    sent: Vec<(usize, usize)>,
}

impl ChatChunks {
    pub fn new(id: String, created: u64, model: String, n: usize, include_usage: bool) -> Self {
        Self {
            id,
            created,
            model,
            include_usage,
            sent: vec![(0, 0); n],
        }
    }

    fn chunk(&self, choices: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    pub fn start(&self) -> Vec<serde_json::Value> {
        (0..self.sent.len())
            .map(|i| {
                self.chunk(serde_json::json!([{
                    "index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null
                }]))
            })
            .collect()
    }

    /// Text and tokens of choice `i` (`tokens` empty when log-probs were not asked for).
    pub fn delta(&mut self, i: usize, text: &str, tokens: &[TokenLogprob]) -> serde_json::Value {
        let Some(sent) = self.sent.get_mut(i) else {
            return serde_json::Value::Null;
        };
        sent.0 += text.len();
        sent.1 += tokens.len();
        let logprobs = (!tokens.is_empty()).then(|| logprobs_content(tokens));
        self.chunk(serde_json::json!([{
            "index": i, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": null
        }]))
    }

    /// The end of every choice: what the deltas did not carry, the finish reason; usage when asked.
    pub fn finish(&mut self, r: &ChatResponse) -> Vec<serde_json::Value> {
        let mut out = vec![];
        for (i, c) in r.choices.iter().enumerate() {
            let (bytes, tokens) = self.sent.get(i).copied().unwrap_or_default();
            let text = c.text.get(bytes..).unwrap_or_default();
            let rest = c
                .logprobs
                .as_deref()
                .map(|l| l.get(tokens..).unwrap_or_default());
            if !text.is_empty() || rest.is_some_and(|r| !r.is_empty()) {
                out.push(self.delta(i, text, rest.unwrap_or_default()));
            }
            out.push(self.chunk(serde_json::json!([{
                "index": i, "delta": {}, "logprobs": null, "finish_reason": c.finish_reason
            }])));
        }
        if self.include_usage {
            let mut last = self.chunk(serde_json::json!([]));
            last["usage"] = serde_json::to_value(UsageOut::from(r.usage.unwrap_or_default()))
                .unwrap_or(serde_json::Value::Null);
            out.push(last);
        }
        out
    }
}

/// `POST /v1/completions` (the legacy API lm-eval-harness's `local-completions` speaks).
#[derive(Debug, Deserialize)]
pub struct CompletionBody {
    pub model: String,
    pub prompt: PromptIn,
    #[serde(default)]
    pub n: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    /// An integer here (alternatives per position), unlike chat's boolean.
    #[serde(default)]
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub stream: Option<bool>,
}

/// A prompt as OpenAI takes it: a string, strings, token ids, or lists of token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptIn {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

/// One prompt, before the engine tokenizes it.
#[derive(Debug, Clone)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// A completion request whose prompts the engine still has to tokenize.
#[derive(Debug, Clone)]
pub struct CompletionJob {
    pub prompts: Vec<Prompt>,
    pub template: crate::backend::CompletionRequest,
}

impl CompletionBody {
    pub fn to_job(&self, adapter: Option<String>) -> Result<CompletionJob, ApiError> {
        if self.stream.unwrap_or(false) {
            return Err(bad(
                "stream",
                "streaming is not supported on /v1/completions yet; use /v1/chat/completions or stream: false".into(),
            ));
        }
        let prompts: Vec<Prompt> = match &self.prompt {
            PromptIn::Text(t) => vec![Prompt::Text(t.clone())],
            PromptIn::Texts(v) => v.iter().cloned().map(Prompt::Text).collect(),
            PromptIn::Ids(ids) => vec![Prompt::Ids(ids.clone())],
            PromptIn::IdLists(v) => v.iter().cloned().map(Prompt::Ids).collect(),
        };
        if prompts.is_empty() {
            return Err(bad("prompt", "prompt must not be empty".into()));
        }
        let Sampling {
            n,
            temperature,
            top_p,
            stop,
        } = sampling(self.n, self.temperature, self.top_p, &self.stop)?;
        let echo = self.echo.unwrap_or(false);
        // OpenAI's default is 16; 0 only makes sense when the prompt is echoed (scoring).
        let max_tokens = self.max_tokens.unwrap_or(16);
        if max_tokens < i64::from(!echo) {
            return Err(bad(
                "max_tokens",
                format!(
                    "max_tokens must be at least {}, not {max_tokens}",
                    u8::from(!echo)
                ),
            ));
        }
        let logprobs = match self.logprobs {
            None => None,
            Some(k) if (0..=MAX_TOP_LOGPROBS as i64).contains(&k) => Some(k as usize),
            Some(k) => {
                return Err(bad(
                    "logprobs",
                    format!("logprobs must be between 0 and {MAX_TOP_LOGPROBS}, not {k}"),
                ))
            }
        };
        Ok(CompletionJob {
            prompts,
            template: crate::backend::CompletionRequest {
                prompt: vec![],
                model: adapter,
                n,
                temperature,
                top_p,
                max_tokens: max_tokens as usize,
                seed: self.seed.unwrap_or(0) as u64,
                logprobs,
                echo,
                stop,
            },
        })
    }
}

/// A whole `text_completion` object: the choices of every prompt, prompt-major (index = prompt · n + j).
pub fn text_completion_json(
    id: &str,
    created: u64,
    model: &str,
    answers: &[crate::backend::CompletionResponse],
) -> serde_json::Value {
    let mut choices = vec![];
    let mut usage = Usage::default();
    for a in answers {
        usage = usage + a.usage;
        for c in &a.choices {
            let logprobs = c.logprobs.as_ref().map(|l| {
                serde_json::json!({
                    "tokens": l.tokens,
                    "token_logprobs": l.token_logprobs.iter().map(|v| v.map(finite)).collect::<Vec<_>>(),
                    "top_logprobs": l.top_logprobs.iter().map(|v| v.as_ref().map(|alts| {
                        alts.iter().map(|(t, lp)| (t.clone(), serde_json::json!(finite(*lp))))
                            .collect::<serde_json::Map<String, serde_json::Value>>()
                    })).collect::<Vec<_>>(),
                    "text_offset": l.text_offset,
                })
            });
            choices.push(serde_json::json!({
                "index": choices.len(),
                "text": c.text,
                "logprobs": logprobs,
                "finish_reason": c.finish_reason,
            }));
        }
    }
    serde_json::json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": UsageOut::from(usage),
    })
}
