//! One HTTP client for every OpenAI-compatible endpoint introspect calls (chat completions, files,
//! fine-tuning jobs): the API key, a per-request timeout, and retries of transient failures (408, 409,
//! 429, 5xx, timeouts, refused connections) with exponential backoff and full jitter, honouring
//! Retry-After. Any other 4xx is reported with the server's message and not retried.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rand::Rng;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::OpenAiConfig;

pub struct ApiClient {
    base_url: String,
    api_key: Option<String>,
    agent: ureq::Agent,
    max_retries: usize,
    /// Retried attempts so far (shown in a run's summary).
    pub retries: AtomicUsize,
}

/// What a request carries.
pub enum Payload {
    None,
    Json(Vec<u8>),
    /// multipart/form-data: the boundary and the encoded body.
    Form(String, Vec<u8>),
}

/// Whether repeating a request after an unclear failure is harmless. Creating a fine-tuning job is not:
/// a timeout may come after the server made the job, so only answers that say nothing was done (429,
/// a connection never made) are retried.
#[derive(Clone, Copy, PartialEq)]
pub enum Repeat {
    Safe,
    OnlyUnprocessed,
}

/// How one attempt failed.
enum Failure {
    /// Worth another attempt, after at least this long (Retry-After) if given.
    Transient(String, Option<Duration>, bool),
    /// The server refused the request itself: retrying cannot help.
    Refused(String),
}

impl ApiClient {
    pub fn new(config: &OpenAiConfig) -> Result<Self> {
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
            base_url: config.base_url.trim_end_matches('/').to_string(),
            api_key,
            agent,
            max_retries: config.max_retries,
            retries: AtomicUsize::new(0),
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.base_url)
    }

    pub fn post_json<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
        repeat: Repeat,
    ) -> Result<T> {
        self.request(
            "POST",
            path,
            &Payload::Json(serde_json::to_vec(body)?),
            repeat,
        )
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.request("GET", path, &Payload::None, Repeat::Safe)
    }

    /// One request with retries: exponential backoff from 0.5 s to 30 s with full jitter, or the
    /// server's Retry-After when it is longer.
    pub fn request<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        payload: &Payload,
        repeat: Repeat,
    ) -> Result<T> {
        let url = self.url(path);
        let mut tries = 0;
        loop {
            match self.attempt(method, &url, payload) {
                Ok(text) => {
                    return serde_json::from_str(&text).with_context(|| {
                        format!("{method} {url}: unexpected answer: {}", snippet(&text))
                    })
                }
                Err(Failure::Refused(m)) => bail!("{method} {url}: {m}"),
                Err(Failure::Transient(m, wait, unprocessed)) => {
                    if tries >= self.max_retries
                        || (repeat == Repeat::OnlyUnprocessed && !unprocessed)
                    {
                        bail!("{method} {url}: {m} (gave up after {} attempts)", tries + 1);
                    }
                    let cap = (0.5 * 2f64.powi(tries as i32)).min(30.0);
                    let jitter = Duration::from_secs_f64(rand::rng().random_range(0.0..=cap));
                    std::thread::sleep(wait.map_or(jitter, |w| w.max(jitter)));
                    tries += 1;
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("{method} {url}: {m}; retry {tries}");
                }
            }
        }
    }

    /// One attempt, classified; the answer's text on success.
    fn attempt(&self, method: &str, url: &str, payload: &Payload) -> Result<String, Failure> {
        let mut req = self.agent.request(method, url);
        if let Some(key) = &self.api_key {
            req = req.set("Authorization", &format!("Bearer {key}"));
        }
        let sent = match payload {
            Payload::None => req.call(),
            Payload::Json(bytes) => req
                .set("Content-Type", "application/json")
                .send_bytes(bytes),
            Payload::Form(boundary, bytes) => req
                .set(
                    "Content-Type",
                    &format!("multipart/form-data; boundary={boundary}"),
                )
                .send_bytes(bytes),
        };
        match sent {
            Ok(resp) => resp
                .into_string()
                .map_err(|e| Failure::Transient(format!("reading the answer: {e}"), None, false)),
            Err(ureq::Error::Status(code, resp)) => {
                let wait = retry_after(&resp);
                let text = resp.into_string().unwrap_or_default();
                let message = format!("HTTP {code}: {}", error_message(&text));
                if matches!(code, 408 | 409 | 429) || code >= 500 {
                    Err(Failure::Transient(message, wait, code == 429))
                } else {
                    Err(Failure::Refused(message))
                }
            }
            Err(ureq::Error::Transport(t)) => {
                let unprocessed = matches!(
                    t.kind(),
                    ureq::ErrorKind::ConnectionFailed | ureq::ErrorKind::Dns
                );
                Err(Failure::Transient(t.to_string(), None, unprocessed))
            }
        }
    }
}

/// A multipart/form-data body of text fields and one file.
pub fn form(fields: &[(&str, &str)], file_field: &str, file_name: &str, file: &[u8]) -> Payload {
    let boundary = format!("introspect-{:016x}", rand::rng().random::<u64>());
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                .as_bytes(),
        );
    }
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{file_field}\"; filename=\"{file_name}\"\r\nContent-Type: application/jsonl\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(file);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    Payload::Form(boundary, body)
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

pub fn snippet(text: &str) -> String {
    let t: String = text.chars().take(300).collect();
    if t.len() < text.len() {
        format!("{t}…")
    } else {
        t
    }
}
