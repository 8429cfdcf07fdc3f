//! The `introspect` command line: parses arguments, calls the library, prints.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use introspect::runtime::{self, DeviceKind};

mod cli;

#[derive(Parser)]
#[command(
    name = "introspect",
    version,
    about = "Test whether language models can introspect, on your own hardware"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install, list and export models.
    Model {
        #[command(subcommand)]
        command: cli::model::ModelCmd,
    },
    /// Generate a chat completion.
    Generate(cli::generate::GenerateArgs),
    /// Read the residual stream of chats at hook points (TransformerLens names) into a safetensors file.
    Activations(cli::activations::ActivationsArgs),
    /// Train a LoRA adapter on chat JSONL (OpenAI fine-tuning format); writes a PEFT adapter to --out.
    Finetune(cli::finetune::FinetuneArgs),
    /// Work with LoRA adapters.
    Lora {
        #[command(subcommand)]
        command: cli::model::LoraCmd,
    },
    /// Build, list and validate task datasets (the paper's DataRow JSONL) and self-prediction training sets.
    Dataset {
        #[command(subcommand)]
        command: cli::tasks::DatasetCmd,
    },
    /// Object-level run: answer the task prompts of DataRow files; resumable, one log per run.
    Object(cli::tasks::RunArgs),
    /// Hypothetical run: answer the questions about the answers the model would have given.
    Hypothetical(cli::tasks::RunArgs),
    /// The LLM-extracted properties (main character name, sympathetic advice) of the object-level run in
    /// --out, read by this model through the authors' extraction prompts; resumable, cached, logged.
    Extract(cli::tasks::RunArgs),
    /// Calibration: object-level vs hypothetical answer distributions per string, binned, MAD.
    Calibrate(cli::tasks::CalibrateArgs),
    /// Serve the model (and adapters, as model names) over OpenAI's API: /v1/models, /v1/chat/completions.
    Serve(cli::serve::ServeArgs),
    /// Load-test `serve` on loopback: concurrent clients, a slow and a vanishing one; requests/s,
    /// tokens/s, latency and peak RSS beside the engine answering the same requests in one call.
    LoadTest(cli::serve::LoadTestArgs),
    /// Accuracy of a predictor's hypothetical answers against a target's object-level answers.
    Evaluate {
        /// The target's object-level run directory.
        #[arg(long)]
        object: PathBuf,
        /// The predictor's hypothetical run directory.
        #[arg(long)]
        hypothetical: PathBuf,
        /// The predictor's own object-level run, when it is not the target: the notebook's rules score
        /// it only on strings its own answer complied with.
        #[arg(long)]
        predictor_object: Option<PathBuf>,
        /// Path B by the authors' notebook (the paper's numbers) or by the spec; both are reported, this
        /// one first.
        #[arg(long, value_enum, default_value_t = introspect::eval::Rules::Notebook)]
        rules: introspect::eval::Rules,
        /// Write metrics.json, report.md and rows.jsonl here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Experiments end to end (self vs cross prediction, behaviour shift, calibration) from one TOML.
    Experiment {
        #[command(subcommand)]
        command: cli::experiment::ExperimentCmd,
    },
    /// Measure prefill and decode tokens/s and batched prompts/s (f32, bf16 and quantized weights).
    Bench(cli::bench::BenchArgs),
    /// The memory plan of a finetune without loading anything: weights, activations with and without
    /// checkpointing, the optimizer, and the choices that fit a given card (a directory with only
    /// config.json will do).
    Plan(cli::bench::PlanArgs),
    /// The golden checks on a device: tiny-llama3 against transformers and PEFT (f32 and bf16 logits,
    /// greedy ids, decode vs forward, a training step), and SmolLM2 where it is installed. Exits 1 if
    /// any check fails.
    Verify {
        /// The golden references (../shared/golden, or a copy).
        #[arg(long, default_value = "../shared/golden")]
        golden: PathBuf,
        #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
        device: DeviceKind,
        /// Also write the checks as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn main() {
    // Die quietly when the reader of stdout goes away (`introspect dataset list | head`).
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    runtime::init_threads();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Model { command } => cli::model::model_cmd(command),
        Cmd::Generate(args) => cli::generate::generate(args),
        Cmd::Activations(args) => cli::activations::activations(args),
        Cmd::Finetune(args) => cli::finetune::finetune(args),
        Cmd::Lora { command } => cli::model::lora_cmd(command),
        Cmd::Dataset { command } => cli::tasks::dataset(command),
        Cmd::Object(args) => cli::tasks::run(introspect::runs::RunKind::Object, args),
        Cmd::Hypothetical(args) => cli::tasks::run(introspect::runs::RunKind::Hypothetical, args),
        Cmd::Extract(args) => cli::tasks::extract(args),
        Cmd::Calibrate(args) => cli::tasks::calibrate(args),
        Cmd::Serve(args) => cli::serve::serve(args),
        Cmd::LoadTest(args) => cli::serve::load_test(args),
        Cmd::Experiment { command } => cli::experiment::experiment(command),
        Cmd::Evaluate {
            object,
            hypothetical,
            predictor_object,
            rules,
            out,
        } => cli::tasks::evaluate(
            &object,
            &hypothetical,
            predictor_object.as_deref(),
            rules,
            out.as_deref(),
        ),
        Cmd::Plan(args) => cli::bench::plan(&args),
        Cmd::Verify {
            golden,
            device,
            json,
        } => cli::bench::verify(&golden, device, json.as_deref()),
        Cmd::Bench(args) => {
            cli::bench::JSON_STDOUT.get_or_init(|| args.json_stdout);
            cli::bench::bench(&args)
        }
    }
}
