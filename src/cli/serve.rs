//! `introspect serve`: the local engine behind OpenAI's API (see `introspect::server`).

use std::net::SocketAddr;

use anyhow::{Context, Result};
use introspect::server::{self, Limits, ServeConfig};
use introspect::train::trainer::FinetuneConfig;

#[derive(clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// PEFT LoRA adapters served as models: `NAME=DIR` or `DIR` (repeatable); requests pick one by `model`.
    #[arg(long)]
    pub adapter: Vec<String>,
    /// The name the base model answers to (default: --model as given).
    #[arg(long)]
    pub served_model_name: Option<String>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0: any free port (the one bound is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The environment variable holding the key clients must send (`Authorization: Bearer`).
    #[arg(long)]
    pub api_key_env: Option<String>,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Requests waiting for the engine before new ones are answered 503.
    #[arg(long, default_value_t = 1024)]
    pub max_queued: usize,
    /// Largest request body, in MiB.
    #[arg(long, default_value_t = 2.0)]
    pub max_body_mib: f64,
    /// Accept vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter (they read any directory
    /// this process can).
    #[arg(long)]
    pub runtime_lora: bool,
    /// Accept OpenAI's /v1/files and /v1/fine_tuning/jobs, keeping uploads, jobs and their adapters
    /// here; a restart serves finished jobs' models and resumes unfinished ones.
    #[arg(long)]
    pub state_dir: Option<std::path::PathBuf>,
    /// The recipe fine-tuning jobs start from (a TOML of `finetune`'s settings, e.g. an experiment's
    /// [finetune] table); a job sets n_epochs, batch_size, seed and learning_rate_multiplier × its lr.
    /// Default: the paper's Llama recipe (rank 32, alpha 64, lr 2e-5, batch 16, 1 epoch).
    #[arg(long, requires = "state_dir")]
    pub finetune_config: Option<std::path::PathBuf>,
    /// Largest upload to /v1/files, in MiB.
    #[arg(long, default_value_t = 512.0)]
    pub max_file_mib: f64,
}

pub fn serve(args: ServeArgs) -> Result<()> {
    let api_key = args
        .api_key_env
        .as_ref()
        .map(|var| {
            std::env::var(var)
                .with_context(|| format!("--api-key-env {var}: the variable is not set"))
        })
        .transpose()?;
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .with_context(|| format!("--host {} --port {}: not an address", args.host, args.port))?;
    let (mut backend, _) = super::tasks::local_backend(&args.model, &args.adapter)?;
    backend.batch_size = args.batch_size.max(1);
    let base_name = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| args.model.model.clone());
    let models: Vec<String> = std::iter::once(base_name.clone())
        .chain(backend.adapter_names())
        .collect();
    let fine_tuning = match &args.state_dir {
        None => None,
        Some(dir) => Some(server::fine_tuning::FineTuningConfig {
            dir: dir.clone(),
            recipe: match &args.finetune_config {
                None => FinetuneConfig::default(),
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    toml::from_str(&text)
                        .with_context(|| format!("{}: not a finetune recipe", path.display()))?
                }
            },
        }),
    };
    let config = ServeConfig {
        base_name,
        api_key,
        limits: Limits {
            max_body_bytes: (args.max_body_mib * 1048576.0) as usize,
            max_queued: args.max_queued,
            max_file_bytes: (args.max_file_mib * 1048576.0) as usize,
            ..Limits::default()
        },
        runtime_lora: args.runtime_lora,
        fine_tuning,
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let (bound, server) =
                server::bind(backend, config, addr, server::shutdown_signal()).await?;
            eprintln!(
                "introspect serve: listening on http://{bound}/v1 (models: {})",
                models.join(", ")
            );
            server.await.context("serving")
        })
}

#[derive(clap::Args)]
pub struct LoadTestArgs {
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// Clients sending requests at once.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Chat requests in all.
    #[arg(long, default_value_t = 2000)]
    pub requests: usize,
    #[arg(long, default_value_t = 8)]
    pub max_tokens: usize,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Also write the figures as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

pub fn load_test(args: LoadTestArgs) -> Result<()> {
    let spec = server::load::LoadSpec {
        clients: args.clients,
        requests: args.requests,
        max_tokens: args.max_tokens,
    };
    server::load::check(&spec)?;
    let (mut backend, _) = super::tasks::local_backend(&args.model, &[])?;
    backend.batch_size = args.batch_size.max(1);
    let report = server::load::run(backend, &args.model.model, &spec)?;
    println!("{report}");
    if let Some(path) = &args.json {
        introspect::fsutil::write_atomic(path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    if report.errors > 0 {
        anyhow::bail!("{} of {} requests failed", report.errors, report.requests);
    }
    Ok(())
}
