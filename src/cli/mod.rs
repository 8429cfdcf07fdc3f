//! Subcommands of the `introspect` binary that are more than a few lines: each parses nothing itself
//! (clap did), calls the library and prints.

pub mod experiment;
pub mod serve;
pub mod tasks;

use anyhow::{bail, Result};
use introspect::backend::{OpenAiBackend, OpenAiConfig};

/// Where a run's model answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// The Candle engine in this process.
    Local,
    /// An OpenAI-compatible server (vLLM, OpenAI, Fireworks, `introspect serve`); `--model` names the model
    /// (or adapter) as the server does.
    Openai,
}

/// The backend a run talks to (shared by object, hypothetical, calibrate).
#[derive(clap::Args, Debug, Clone)]
pub struct BackendArgs {
    #[arg(long, value_enum, default_value_t = BackendKind::Local)]
    pub backend: BackendKind,
    /// The server's base URL up to /v1 (`--backend openai`), e.g. http://127.0.0.1:8000/v1.
    #[arg(long)]
    pub base_url: Option<String>,
    /// The environment variable holding the server's API key.
    #[arg(long)]
    pub api_key_env: Option<String>,
    /// Requests in flight at once (`--backend openai`).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// The most choices one request asks for; a larger n is split (llama.cpp's server: 1).
    #[arg(long, default_value_t = 128)]
    pub max_n: usize,
    /// Seconds before a request is abandoned and retried.
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,
}

impl BackendArgs {
    /// The OpenAI-compatible backend for `model`, or None for the local engine.
    pub fn openai(&self, model: &str) -> Result<Option<OpenAiBackend>> {
        if self.backend == BackendKind::Local {
            if self.base_url.is_some() {
                bail!("--base-url needs --backend openai");
            }
            return Ok(None);
        }
        let Some(base_url) = &self.base_url else {
            bail!("--backend openai needs --base-url (e.g. http://127.0.0.1:8000/v1)");
        };
        let config = OpenAiConfig {
            api_key_env: self.api_key_env.clone(),
            concurrency: self.concurrency.max(1),
            max_n: self.max_n.max(1),
            timeout_s: self.timeout,
            ..OpenAiConfig::new(base_url)
        };
        Ok(Some(OpenAiBackend::new(config, model)?))
    }
}
