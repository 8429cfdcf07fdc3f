//! The `introspect` command line: parses arguments, calls the library, prints.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use introspect::engine::{GenerationParams, Generator};
use introspect::lora::{peft, AdapterSet};
use introspect::model::{LoadSpec, LoadedModel, Message, QuantType, WeightMode};
use introspect::registry;
use introspect::runtime::{self, DeviceKind};
use introspect::train::trainer::{Finetune, FinetuneConfig};

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
        command: ModelCmd,
    },
    /// Generate a chat completion.
    Generate(GenerateArgs),
    /// Train a LoRA adapter on chat JSONL (OpenAI fine-tuning format); writes a PEFT adapter to --out.
    Finetune(FinetuneArgs),
    /// Work with LoRA adapters.
    Lora {
        #[command(subcommand)]
        command: LoraCmd,
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
    Bench(BenchArgs),
    /// The memory plan of a finetune without loading anything: weights, activations with and without
    /// checkpointing, the optimizer, and the choices that fit a given card (a directory with only
    /// config.json will do).
    Plan(PlanArgs),
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

#[derive(clap::Args)]
struct PlanArgs {
    /// Registry id, HF directory (config.json is enough) or .gguf file.
    #[arg(long)]
    model: String,
    #[arg(long, value_enum, default_value_t = WeightMode::Bf16)]
    weights: WeightMode,
    #[arg(long, value_enum, default_value_t = QuantType::Q8_0)]
    quantize: QuantType,
    #[arg(long, default_value_t = 16)]
    micro_batch_size: usize,
    /// Tokens in the longest training row.
    #[arg(long, default_value_t = 200)]
    seq_len: usize,
    /// Target (loss) tokens per row.
    #[arg(long, default_value_t = 8)]
    targets_per_row: usize,
    #[arg(long, default_value_t = 32)]
    rank: usize,
    #[arg(long, default_value = "all")]
    targets: String,
    /// The card's memory in GiB (default: what this machine's CPU memory has free).
    #[arg(long)]
    gib: Option<f64>,
}

#[derive(clap::Args)]
struct BenchArgs {
    #[arg(long, default_value = "smollm2-135m-instruct")]
    model: String,
    /// Repetitions per figure (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Also write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run only this part.
    #[arg(long, value_enum)]
    only: Option<BenchPart>,
    /// Measure this weights mode only (the training step then runs in this process).
    #[arg(long, value_enum)]
    weights: Option<WeightMode>,
    /// Where to run: the CPU, or a GPU (a build with `--features cuda` or `metal`).
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    device: DeviceKind,
    /// The training step with activation checkpointing (with --weights; without it, each mode is
    /// measured both ways).
    #[arg(long)]
    checkpointing: bool,
    /// Print the figures as one JSON line at the end (used between bench processes).
    #[arg(long, hide = true)]
    json_stdout: bool,
}

#[derive(Subcommand)]
enum LoraCmd {
    /// Fold an adapter into the base weights and write an HF directory (f32 safetensors).
    Merge {
        #[arg(long)]
        model: String,
        /// A PEFT adapter directory.
        #[arg(long)]
        adapter: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args)]
struct FinetuneArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Chat JSONL, one {"messages": [...]} per line; the loss falls on assistant turns.
    #[arg(long)]
    train: PathBuf,
    /// Validation chat JSONL.
    #[arg(long)]
    val: Option<PathBuf>,
    /// Run directory: the adapter, checkpoints, metrics.jsonl, loss.svg.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 32)]
    rank: usize,
    /// LoRA alpha (scale = alpha / rank).
    #[arg(long, default_value_t = 64.0)]
    alpha: f64,
    #[arg(long, default_value_t = 0.0)]
    dropout: f64,
    /// Adapted projections: comma-separated hub names, or `all`.
    #[arg(long, default_value = "all")]
    targets: String,
    #[arg(long, default_value_t = 2e-5)]
    lr: f64,
    #[arg(long, value_enum, default_value_t = introspect::train::schedule::ScheduleKind::Constant)]
    schedule: introspect::train::schedule::ScheduleKind,
    #[arg(long, default_value_t = 0)]
    warmup_steps: usize,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Clip the global gradient norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Examples per optimizer step.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Examples per forward/backward; gradients accumulate up to --batch-size.
    #[arg(long, default_value_t = 16)]
    micro_batch_size: usize,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Longer rows are an error (file and line named).
    #[arg(long, default_value_t = 1024)]
    max_seq_len: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Checkpoint every N steps (and at the end).
    #[arg(long, default_value_t = 50)]
    save_every: usize,
    /// Validation loss every N steps (0: at the end only).
    #[arg(long, default_value_t = 0)]
    eval_every: usize,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    resume: bool,
    /// Activation checkpointing: keep each block's input only and recompute its forward in the
    /// backward (one more forward per step, ~1/16 of the activations). auto: on when the memory plan
    /// does not fit without it; the micro-batch is then halved until it fits.
    #[arg(long, value_enum, default_value_t = introspect::memory::Checkpointing::Auto)]
    checkpointing: introspect::memory::Checkpointing,
}

#[derive(Subcommand)]
enum ModelCmd {
    /// Install a registry model into the model cache ($INTROSPECT_HOME).
    Pull {
        id: String,
        /// Use this already downloaded archive instead of fetching it.
        #[arg(long)]
        archive: Option<PathBuf>,
    },
    /// Known models and whether they are installed.
    List,
    /// Write an HF-layout directory (config.json, model.safetensors, tokenizer files) from a GGUF model.
    Export {
        #[arg(long)]
        model: String,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args)]
struct ModelArgs {
    /// Registry id, HF directory, .gguf file or hf-hub repo id.
    #[arg(long, default_value = "smollm2-135m-instruct")]
    model: String,
    /// f32 (exact), bf16 (half the memory), or quantized (GGUF blocks kept; dense checkpoints quantized
    /// at load to --quantize).
    #[arg(long, value_enum, default_value_t = WeightMode::F32)]
    weights: WeightMode,
    /// The block type `--weights quantized` quantizes dense (HF) weights to.
    #[arg(long, value_enum, default_value_t = QuantType::Q8_0)]
    quantize: QuantType,
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    device: DeviceKind,
}

#[derive(clap::Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// JSON array of {"role","content"} messages.
    #[arg(long, conflicts_with = "messages_file")]
    messages: Option<String>,
    /// JSONL file, one {"messages": [...]} per line; writes one JSON object per line.
    #[arg(long)]
    messages_file: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Samples per prompt.
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// Stop strings (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Print JSON with ids and the top-10 log-probabilities of the first generated position.
    #[arg(long)]
    json: bool,
    /// A PEFT LoRA adapter directory, optionally named: `NAME=DIR` (repeatable).
    #[arg(long)]
    adapter: Vec<String>,
    /// Which loaded adapter to use (default: the only one given).
    #[arg(long)]
    use_adapter: Option<String>,
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
        Cmd::Model { command } => model_cmd(command),
        Cmd::Generate(args) => generate(args),
        Cmd::Finetune(args) => finetune(args),
        Cmd::Lora { command } => lora_cmd(command),
        Cmd::Dataset { command } => cli::tasks::dataset(command),
        Cmd::Object(args) => cli::tasks::run(introspect::runs::RunKind::Object, args),
        Cmd::Hypothetical(args) => cli::tasks::run(introspect::runs::RunKind::Hypothetical, args),
        Cmd::Calibrate(args) => cli::tasks::calibrate(args),
        Cmd::Serve(args) => cli::serve::serve(args),
        Cmd::LoadTest(args) => cli::serve::load_test(args),
        Cmd::Experiment { command } => cli::experiment::experiment(command),
        Cmd::Evaluate {
            object,
            hypothetical,
            out,
        } => cli::tasks::evaluate(&object, &hypothetical, out.as_deref()),
        Cmd::Plan(args) => plan(&args),
        Cmd::Verify {
            golden,
            device,
            json,
        } => verify(&golden, device, json.as_deref()),
        Cmd::Bench(args) => {
            JSON_STDOUT.get_or_init(|| args.json_stdout);
            bench(&args)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchPart {
    /// Prefill, decode and batched generation.
    Engine,
    /// One LoRA optimizer step (16 × 64 tokens, rank 32, all seven projections).
    Train,
    /// The self-prediction loop: 500-row object-level and hypothetical runs (f32, batch 32).
    Tasks,
}

fn bench(args: &BenchArgs) -> Result<()> {
    let path = registry::resolve(&args.model)?;
    let device = runtime::device(args.device)?;
    let (only, weights, reps) = (args.only, args.weights, args.reps);
    let mut out = serde_json::Map::new();
    println!(
        "device: {:?} ({}); threads: {}\n",
        args.device,
        introspect::bench::cpu_model(),
        rayon::current_num_threads()
    );
    if only.is_none() || only == Some(BenchPart::Tasks) {
        let m = LoadedModel::load(&path, WeightMode::F32, &device)?;
        let mut backend = introspect::backend::LocalBackend::new(m, WeightMode::F32)?;
        eprintln!("benchmarking the self-prediction loop (batch 32) …");
        let rows = introspect::bench::task_loop(&mut backend, 500, 32)?;
        println!("{}", introspect::bench::task_markdown(&rows));
        out.insert("tasks".into(), serde_json::to_value(&rows)?);
    }
    if only.is_none() || only == Some(BenchPart::Engine) {
        let mut rows = vec![];
        let modes = [WeightMode::F32, WeightMode::Bf16, WeightMode::Quantized];
        for mode in modes
            .into_iter()
            .filter(|m| weights.is_none_or(|w| w == *m))
        {
            let m = LoadedModel::load(&path, mode, &device)?;
            let name = mode_name(mode);
            eprintln!("benchmarking {name} …");
            rows.push(introspect::bench::run(&m, name, reps)?);
        }
        println!("{}", introspect::bench::markdown(&rows));
        out.insert("engine".into(), serde_json::to_value(&rows)?);
    }
    if only.is_none() || only == Some(BenchPart::Train) {
        let mut rows = vec![];
        match weights {
            // In this process: its peak RSS is the step's.
            Some(mode) => {
                let m = LoadedModel::load(&path, mode, &device)?;
                eprintln!("benchmarking a LoRA step, {} base …", mode_name(mode));
                rows.push(introspect::bench::train_step(
                    &m,
                    mode_name(mode),
                    reps.min(3),
                    args.checkpointing,
                )?);
            }
            // One child process per mode and checkpointing, so each peak RSS is that run's alone.
            None => {
                for mode in [WeightMode::F32, WeightMode::Bf16, WeightMode::Quantized] {
                    for checkpointing in [false, true] {
                        let o = std::process::Command::new(std::env::current_exe()?)
                            .args(["bench", "--only", "train", "--json-stdout", "--model"])
                            .arg(&args.model)
                            .args(["--reps", &reps.to_string(), "--weights", mode_name(mode)])
                            .args(["--device", &format!("{:?}", args.device).to_lowercase()])
                            .args(checkpointing.then_some("--checkpointing"))
                            .stderr(std::process::Stdio::inherit())
                            .output()?;
                        if !o.status.success() {
                            bail!("the {} training benchmark failed", mode_name(mode));
                        }
                        let text = String::from_utf8_lossy(&o.stdout);
                        let last = text.lines().last().unwrap_or_default();
                        let v: serde_json::Value = serde_json::from_str(last)
                            .with_context(|| format!("bench child printed {last:?}"))?;
                        rows.extend(serde_json::from_value::<
                            Vec<introspect::bench::TrainFigures>,
                        >(v["train"].clone())?);
                    }
                }
            }
        }
        print!("{}", introspect::bench::train_markdown(&rows));
        out.insert("train".into(), serde_json::to_value(&rows)?);
    }
    let out = serde_json::Value::Object(out);
    if let Some(p) = &args.json {
        introspect::fsutil::write_atomic(p, serde_json::to_string_pretty(&out)?.as_bytes())?;
    }
    if JSON_STDOUT.get() == Some(&true) {
        println!("{out}");
    }
    Ok(())
}

fn plan(args: &PlanArgs) -> Result<()> {
    use introspect::memory;
    let path = registry::resolve(&args.model)?;
    let spec = LoadSpec {
        mode: args.weights,
        quantize: args.quantize,
    };
    let cfg = introspect::model::read_config(&path)?;
    let targets = introspect::lora::parse_targets(&args.targets)?;
    // A card of `gib`: what is left beside the weights and ~0.5 GiB of CUDA context.
    let weights = introspect::model::weight_plan(&path, spec, &candle_core::Device::Cpu)?;
    let free = match args.gib {
        Some(g) => Some(((g - 0.5) * (1u64 << 30) as f64) as u64),
        None => weights.free,
    };
    let weight_bytes = weights.items[0].1;
    if free.is_some_and(|f| f < weight_bytes) {
        bail!(
            "the weights alone ({:.2} GiB) do not fit in {:.2} GiB",
            weight_bytes as f64 / (1u64 << 30) as f64,
            free.unwrap_or(0) as f64 / (1u64 << 30) as f64
        );
    }
    let free_beside = free.map(|f| f - weight_bytes);
    for checkpointing in [memory::Checkpointing::Off, memory::Checkpointing::On] {
        let fit = memory::fit_training(
            &cfg,
            spec,
            None,
            args.micro_batch_size,
            args.seq_len,
            args.targets_per_row,
            args.rank,
            &targets,
            checkpointing,
        )?;
        println!("checkpointing {checkpointing:?}:\n{}\n", fit.plan);
    }
    let fit = memory::fit_training(
        &cfg,
        spec,
        free_beside,
        args.micro_batch_size,
        args.seq_len,
        args.targets_per_row,
        args.rank,
        &targets,
        memory::Checkpointing::Auto,
    )?;
    println!(
        "on {}: fits with micro-batch {} and checkpointing {}",
        args.gib
            .map_or("this machine's free memory".into(), |g| format!(
                "a {g} GiB card"
            )),
        fit.micro_batch,
        if fit.checkpoint { "on" } else { "off" }
    );
    Ok(())
}

fn verify(
    golden: &std::path::Path,
    kind: DeviceKind,
    json: Option<&std::path::Path>,
) -> Result<()> {
    let device = runtime::device(kind)?;
    let mut checks = introspect::verify::tiny_llama3(&golden.join("tiny-llama3"), &device)?;
    let cases = golden.join("smollm2/cases.json");
    match registry::resolve("smollm2-135m-instruct") {
        Ok(path) if cases.exists() => {
            let m = LoadedModel::load(&path, WeightMode::F32, &device)?;
            checks.extend(introspect::verify::smollm2(&m, &cases)?);
        }
        _ => eprintln!("SmolLM2 or its cases are not here: its checks are skipped"),
    }
    println!("{}", introspect::verify::Report(&checks));
    if let Some(p) = json {
        introspect::fsutil::write_atomic(p, serde_json::to_string_pretty(&checks)?.as_bytes())?;
    }
    let failed = checks.iter().filter(|c| !c.passed()).count();
    if failed > 0 {
        bail!("{failed} of {} checks failed on {kind:?}", checks.len());
    }
    println!("all {} checks passed on {kind:?}", checks.len());
    Ok(())
}

static JSON_STDOUT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

fn mode_name(mode: WeightMode) -> &'static str {
    match mode {
        WeightMode::F32 => "f32",
        WeightMode::Quantized => "quantized",
        WeightMode::Bf16 => "bf16",
    }
}

fn model_cmd(cmd: ModelCmd) -> Result<()> {
    match cmd {
        ModelCmd::Pull { id, archive } => {
            let path = registry::pull(&id, archive.as_deref())?;
            println!("{id} installed at {}", path.display());
        }
        ModelCmd::List => {
            println!(
                "{:<26} {:<10} {:<9} description",
                "id", "source", "installed"
            );
            for e in registry::entries() {
                let inst = if registry::is_installed(&e) {
                    "yes"
                } else {
                    "no"
                };
                println!(
                    "{:<26} {:<10} {:<9} {}",
                    e.id, e.source, inst, e.description
                );
            }
            println!("model cache: {}", registry::home().display());
        }
        ModelCmd::Export { model, out } => {
            let path = registry::resolve(&model)?;
            if path.is_dir() {
                bail!(
                    "{}: already an HF directory; export converts a .gguf model",
                    path.display()
                );
            }
            introspect::model::export::export_hf(&path, None, &out)?;
            println!("exported {} to {}", path.display(), out.display());
        }
    }
    Ok(())
}

fn load(args: &ModelArgs) -> Result<LoadedModel> {
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
    fn spec(&self) -> LoadSpec {
        LoadSpec {
            mode: self.weights,
            quantize: self.quantize,
        }
    }
}

fn parse_messages(text: &str, origin: &str) -> Result<Vec<Message>> {
    let msgs: Vec<Message> = serde_json::from_str(text).with_context(|| {
        format!("{origin}: expected a JSON array of {{\"role\", \"content\"}} objects")
    })?;
    if msgs.is_empty() {
        bail!("{origin}: no messages");
    }
    Ok(msgs)
}

fn generate(args: GenerateArgs) -> Result<()> {
    let conversations: Vec<Vec<Message>> = match (&args.messages, &args.messages_file) {
        (Some(m), None) => vec![parse_messages(m, "--messages")?],
        (None, Some(f)) => {
            let file =
                std::fs::File::open(f).with_context(|| format!("cannot open {}", f.display()))?;
            let mut out = vec![];
            for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
                let line = line?;
                if line.trim().is_empty() {
                    continue;
                }
                let origin = format!("{}:{}", f.display(), i + 1);
                let v: serde_json::Value = serde_json::from_str(&line)
                    .with_context(|| format!("{origin}: not valid JSON"))?;
                let m = v
                    .get("messages")
                    .with_context(|| format!("{origin}: missing field `messages`"))?;
                out.push(parse_messages(
                    &m.to_string(),
                    &format!("{origin} field `messages`"),
                )?);
            }
            out
        }
        _ => bail!("give --messages or --messages-file"),
    };
    let model = load(&args.model)?;
    let adapters = load_adapters(&args.adapter, &model)?;
    let adapter = match (&args.use_adapter, adapters.len()) {
        (Some(name), _) => Some(adapters.get(name)?),
        (None, 0) => None,
        (None, 1) => Some(adapters.get(adapters.names().next().expect("one"))?),
        (None, _) => bail!(
            "several adapters loaded ({}); choose one with --use-adapter NAME",
            adapters.names().collect::<Vec<_>>().join(", ")
        ),
    };
    let mut prompts = vec![];
    for c in &conversations {
        prompts.push(model.encode_chat(c)?.1);
    }
    let params = GenerationParams {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        n: args.n,
        stop: args.stop.clone(),
        top_logprobs: if args.json || args.messages_file.is_some() {
            10
        } else {
            0
        },
    };
    let mut gen = Generator::new(&model);
    gen.max_batch_rows = args.batch_size.max(1);
    gen.adapter = adapter;
    let bar = indicatif::ProgressBar::new(prompts.len() as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{pos}/{len} prompts {wide_bar} {per_sec} eta {eta}",
        )
        .unwrap(),
    );
    let mut stdout = std::io::stdout().lock();
    let chunk = gen.max_batch_rows.max(1);
    for (ci, batch) in prompts.chunks(chunk).enumerate() {
        let results = gen.generate(batch, &params)?;
        for (k, completions) in results.iter().enumerate() {
            let prompt_ids = &batch[k];
            for c in completions {
                if args.json || args.messages_file.is_some() {
                    let top: Vec<serde_json::Value> = c
                        .steps
                        .first()
                        .map(|s| {
                            s.top
                                .iter()
                                .map(|t| serde_json::json!({"id": t.id, "token": model.tokenizer.token(t.id), "logprob": t.logprob.0}))
                                .collect()
                        })
                        .unwrap_or_default();
                    let obj = serde_json::json!({
                        "index": ci * chunk + k,
                        "text": c.text,
                        "prompt_ids": prompt_ids,
                        "token_ids": c.token_ids,
                        "finish_reason": c.finish_reason,
                        "top_logprobs": top,
                    });
                    writeln!(stdout, "{obj}")?;
                } else {
                    writeln!(stdout, "{}", c.text)?;
                }
            }
        }
        if args.messages_file.is_some() {
            bar.inc(batch.len() as u64);
        }
    }
    bar.finish_and_clear();
    Ok(())
}

/// `NAME=DIR` or `DIR` (named after the directory).
fn adapter_spec(spec: &str) -> (String, PathBuf) {
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

fn load_adapters(specs: &[String], model: &LoadedModel) -> Result<AdapterSet> {
    let mut set = AdapterSet::default();
    for spec in specs {
        let (name, dir) = adapter_spec(spec);
        let adapter = peft::load(&dir, &model.llama.cfg, model.llama.device())
            .with_context(|| format!("--adapter {spec}"))?;
        set.insert(&name, adapter);
    }
    Ok(set)
}

fn finetune(args: FinetuneArgs) -> Result<()> {
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

fn lora_cmd(cmd: LoraCmd) -> Result<()> {
    match cmd {
        LoraCmd::Merge {
            model,
            adapter,
            out,
        } => {
            let path = registry::resolve(&model)?;
            introspect::model::export::merge_adapter(&path, &adapter, &out)
                .with_context(|| format!("--adapter {}", adapter.display()))?;
            println!(
                "merged {} into {}: {}",
                adapter.display(),
                path.display(),
                out.display()
            );
        }
    }
    Ok(())
}
