//! The `introspect` binary's command families, one file each (main.rs only parses and dispatches): each
//! parses nothing itself (clap did), calls the library and prints. Here: the arguments they share — the
//! model (`ModelArgs`, `load`), adapters (`adapter_spec`, `load_adapters`) and the backend (`BackendArgs`).

pub mod activations;
pub mod bench;
pub mod experiment;
pub mod finetune;
pub mod generate;
pub mod model;
pub mod serve;
pub mod tasks;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use introspect::backend::{OpenAiBackend, OpenAiConfig};
use introspect::lora::{peft, AdapterSet};
use introspect::model::{LoadSpec, LoadedModel, QuantType, WeightMode};
use introspect::registry;
use introspect::runtime::{self, DeviceKind};

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
        self.config()?
            .map(|config| OpenAiBackend::new(config, model))
            .transpose()
    }

    /// Where the OpenAI-compatible server is, or None for the local engine.
    pub fn config(&self) -> Result<Option<OpenAiConfig>> {
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
        Ok(Some(config))
    }
}

#[derive(clap::Args)]
pub struct ModelArgs {
    /// Registry id, HF directory, .gguf file or hf-hub repo id.
    #[arg(long, default_value = "smollm2-135m-instruct")]
    pub model: String,
    /// f32 (exact), bf16 (half the memory), or quantized (GGUF blocks kept; dense checkpoints quantized
    /// at load to --quantize).
    #[arg(long, value_enum, default_value_t = WeightMode::F32)]
    pub weights: WeightMode,
    /// The block type `--weights quantized` quantizes dense (HF) weights to.
    #[arg(long, value_enum, default_value_t = QuantType::Q8_0)]
    pub quantize: QuantType,
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
}

pub fn load(args: &ModelArgs) -> Result<LoadedModel> {
    let path = registry::resolve(&args.model)?;
    let device = runtime::device(args.device)?;
    eprintln!(
        "memory plan for {}:\n{}",
        path.display(),
        introspect::model::weight_plan(&path, args.spec(), &device)?
    );
    LoadedModel::load(&path, args.spec(), &device)
}

impl ModelArgs {
    pub fn spec(&self) -> LoadSpec {
        LoadSpec {
            mode: self.weights,
            quantize: self.quantize,
        }
    }
}

/// `NAME=DIR` or `DIR` (named after the directory).
pub fn adapter_spec(spec: &str) -> (String, PathBuf) {
    match spec.split_once('=') {
        Some((n, d)) if !n.is_empty() && !n.contains('/') => (n.to_string(), PathBuf::from(d)),
        _ => {
            let dir = PathBuf::from(spec);
            let name = dir
                .file_name()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_else(|| spec.to_string());
            (name, dir)
        }
    }
}

pub fn load_adapters(specs: &[String], model: &LoadedModel) -> Result<AdapterSet> {
    let mut set = AdapterSet::default();
    for spec in specs {
        let (name, dir) = adapter_spec(spec);
        let adapter = peft::load(&dir, &model.llama.cfg, model.llama.device())
            .with_context(|| format!("--adapter {spec}"))?;
        set.insert(&name, adapter);
    }
    Ok(set)
}
