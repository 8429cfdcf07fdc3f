//! The `introspect` command line: parses arguments, calls the library, prints.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use introspect::engine::{GenerationParams, Generator};
use introspect::model::{LoadedModel, Message, WeightMode};
use introspect::registry;
use introspect::runtime::{self, DeviceKind};

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
    /// Measure prefill and decode tokens/s and batched prompts/s (f32 and quantized weights).
    Bench {
        #[arg(long, default_value = "smollm2-135m-instruct")]
        model: String,
        /// Repetitions per figure (the median is reported).
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Also write the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
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
    /// GGUF weights dequantized to f32 (exact) or kept quantized.
    #[arg(long, value_enum, default_value_t = WeightMode::F32)]
    weights: WeightMode,
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
}

fn main() {
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
        Cmd::Bench { model, reps, json } => bench(&model, reps, json),
    }
}

fn bench(model: &str, reps: usize, json: Option<PathBuf>) -> Result<()> {
    let path = registry::resolve(model)?;
    let mut rows = vec![];
    for mode in [WeightMode::F32, WeightMode::Quantized] {
        let m = LoadedModel::load(&path, mode, &candle_core::Device::Cpu)?;
        let name = if mode == WeightMode::F32 {
            "f32"
        } else {
            "quantized"
        };
        eprintln!("benchmarking {name} …");
        rows.push(introspect::bench::run(&m, name, reps)?);
    }
    println!("threads: {}\n", rayon::current_num_threads());
    print!("{}", introspect::bench::markdown(&rows));
    if let Some(p) = json {
        introspect::fsutil::write_atomic(&p, serde_json::to_string_pretty(&rows)?.as_bytes())?;
    }
    Ok(())
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
            introspect::model::export::export_gguf_to_hf(&path, &out)?;
            println!("exported {} to {}", path.display(), out.display());
        }
    }
    Ok(())
}

fn load(args: &ModelArgs) -> Result<LoadedModel> {
    let path = registry::resolve(&args.model)?;
    let device = runtime::device(args.device)?;
    let spinner =
        indicatif::ProgressBar::new_spinner().with_message(format!("loading {}", path.display()));
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let m = LoadedModel::load(&path, args.weights, &device);
    spinner.finish_and_clear();
    m
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
