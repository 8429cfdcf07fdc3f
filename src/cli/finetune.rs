//! `finetune`: a LoRA adapter from chat JSONL.

use std::path::PathBuf;

use anyhow::Result;
use introspect::backend::hosted::{HostedFinetune, HostedHyperparameters};
use introspect::train::trainer::{Finetune, FinetuneConfig};

use super::{load, BackendArgs, ModelArgs};

#[derive(clap::Args)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// `--backend openai`: train through the server's /v1/files and /v1/fine_tuning/jobs (OpenAI,
    /// `introspect serve --state-dir`); --epochs, --batch-size and --seed go with the job, the rest of the
    /// recipe is the provider's; OUT/hosted.json records the job and the model it made.
    #[command(flatten)]
    pub backend: BackendArgs,
    /// `--backend openai`: the job's learning_rate_multiplier (default: the provider's "auto").
    #[arg(long)]
    pub lr_multiplier: Option<f64>,
    /// `--backend openai`: the suffix of the trained model's name.
    #[arg(long)]
    pub suffix: Option<String>,
    /// `--backend openai`: seconds before the first poll of the job (then 1.5× longer each, up to 60).
    #[arg(long, default_value_t = 10.0)]
    pub poll_seconds: f64,
    /// Chat JSONL, one {"messages": [...]} per line; the loss falls on assistant turns.
    #[arg(long)]
    pub train: PathBuf,
    /// Validation chat JSONL.
    #[arg(long)]
    pub val: Option<PathBuf>,
    /// Run directory: the adapter, checkpoints, metrics.jsonl, loss.svg.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 32)]
    pub rank: usize,
    /// LoRA alpha (scale = alpha / rank).
    #[arg(long, default_value_t = 64.0)]
    pub alpha: f64,
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    /// Adapted projections: comma-separated hub names, or `all`.
    #[arg(long, default_value = "all")]
    pub targets: String,
    #[arg(long, default_value_t = 2e-5)]
    pub lr: f64,
    #[arg(long, value_enum, default_value_t = introspect::train::schedule::ScheduleKind::Constant)]
    pub schedule: introspect::train::schedule::ScheduleKind,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Clip the global gradient norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Examples per optimizer step.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Examples per forward/backward; gradients accumulate up to --batch-size.
    #[arg(long, default_value_t = 16)]
    pub micro_batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Longer rows are an error (file and line named).
    #[arg(long, default_value_t = 1024)]
    pub max_seq_len: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Checkpoint every N steps (and at the end).
    #[arg(long, default_value_t = 50)]
    pub save_every: usize,
    /// Validation loss every N steps (0: at the end only).
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// Activation checkpointing: keep each block's input only and recompute its forward in the
    /// backward (one more forward per step, ~1/16 of the activations). auto: on when the memory plan
    /// does not fit without it; the micro-batch is then halved until it fits.
    #[arg(long, value_enum, default_value_t = introspect::memory::Checkpointing::Auto)]
    pub checkpointing: introspect::memory::Checkpointing,
}

pub fn finetune(args: FinetuneArgs) -> Result<()> {
    if let Some(config) = args.backend.config()? {
        return hosted(args, config);
    }
    let model = load(&args.model)?;
    let config = FinetuneConfig {
        rank: args.rank,
        alpha: args.alpha,
        dropout: args.dropout,
        targets: introspect::lora::parse_targets(&args.targets)?
            .iter()
            .map(|t| t.hub_name().to_string())
            .collect(),
        lr: args.lr,
        schedule: args.schedule,
        warmup_steps: args.warmup_steps,
        weight_decay: args.weight_decay,
        max_grad_norm: args.max_grad_norm,
        batch_size: args.batch_size,
        micro_batch_size: args.micro_batch_size,
        epochs: args.epochs,
        max_seq_len: args.max_seq_len,
        seed: args.seed,
        save_every: args.save_every,
        eval_every: args.eval_every,
        checkpointing: args.checkpointing,
    };
    let summary = Finetune {
        model: &model,
        base_model: args.model.model.clone(),
        config,
        train: args.train,
        val: args.val,
        out: args.out.clone(),
        resume: args.resume,
        progress: true,
    }
    .run()?;
    println!(
        "trained {} steps in {:.1} s ({:.0} tokens/s); final train loss {}; validation loss {}",
        summary.steps,
        summary.seconds,
        summary.tokens_per_s,
        summary
            .final_train_loss
            .map_or("-".into(), |l| format!("{l:.4}")),
        summary.val_loss.map_or("-".into(), |l| format!("{l:.4}")),
    );
    println!(
        "adapter: {}  (metrics.jsonl, loss.svg, checkpoints/ beside it)",
        summary.adapter_dir.display()
    );
    Ok(())
}

fn hosted(args: FinetuneArgs, config: introspect::backend::OpenAiConfig) -> Result<()> {
    let record = HostedFinetune {
        config,
        model: args.model.model.clone(),
        train: args.train,
        val: args.val,
        out: args.out.clone(),
        hyperparameters: HostedHyperparameters {
            n_epochs: Some(args.epochs),
            batch_size: Some(args.batch_size),
            learning_rate_multiplier: args.lr_multiplier,
        },
        seed: args.seed,
        suffix: args.suffix,
        poll: std::time::Duration::from_secs_f64(args.poll_seconds.max(0.01)),
        progress: true,
    }
    .run()?;
    println!(
        "job {} succeeded in {:.0} s; final train loss {}; trained model: {}",
        record.job_id.as_deref().unwrap_or_default(),
        record.seconds,
        record
            .final_train_loss
            .map_or("-".into(), |l| format!("{l:.4}")),
        record.fine_tuned_model.as_deref().unwrap_or_default()
    );
    println!(
        "recorded in {}",
        args.out
            .join(introspect::backend::hosted::RECORD_FILE)
            .display()
    );
    Ok(())
}
