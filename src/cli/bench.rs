//! `bench`, `plan` and `verify`: measuring, planning memory, checking against the golden references.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use introspect::model::{LoadSpec, LoadedModel, QuantType, WeightMode};
use introspect::registry;
use introspect::runtime::{self, DeviceKind};

#[derive(clap::Args)]
pub struct PlanArgs {
    /// Registry id, HF directory (config.json is enough) or .gguf file.
    #[arg(long)]
    pub model: String,
    #[arg(long, value_enum, default_value_t = WeightMode::Bf16)]
    pub weights: WeightMode,
    #[arg(long, value_enum, default_value_t = QuantType::Q8_0)]
    pub quantize: QuantType,
    #[arg(long, default_value_t = 16)]
    pub micro_batch_size: usize,
    /// Tokens in the longest training row.
    #[arg(long, default_value_t = 200)]
    pub seq_len: usize,
    /// Target (loss) tokens per row.
    #[arg(long, default_value_t = 8)]
    pub targets_per_row: usize,
    #[arg(long, default_value_t = 32)]
    pub rank: usize,
    #[arg(long, default_value = "all")]
    pub targets: String,
    /// The card's memory in GiB (default: what this machine's CPU memory has free).
    #[arg(long)]
    pub gib: Option<f64>,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    #[arg(long, default_value = "smollm2-135m-instruct")]
    pub model: String,
    /// Repetitions per figure (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Also write the figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Run only this part.
    #[arg(long, value_enum)]
    pub only: Option<BenchPart>,
    /// Measure this weights mode only (the training step then runs in this process).
    #[arg(long, value_enum)]
    pub weights: Option<WeightMode>,
    /// Where to run: the CPU, or a GPU (a build with `--features cuda` or `metal`).
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
    /// The training step with activation checkpointing (with --weights; without it, each mode is
    /// measured both ways).
    #[arg(long)]
    pub checkpointing: bool,
    /// Print the figures as one JSON line at the end (used between bench processes).
    #[arg(long, hide = true)]
    pub json_stdout: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchPart {
    /// Prefill, decode and batched generation.
    Engine,
    /// One LoRA optimizer step (16 × 64 tokens, rank 32, all seven projections).
    Train,
    /// The self-prediction loop: 500-row object-level and hypothetical runs (f32, batch 32).
    Tasks,
    /// What hook points cost: decode with one add (every row, half the rows), prefill with one capture.
    Hooks,
    /// Mixed adapters in one batch: decode of 64 rows on the base and over 1, 2, 4, 8 adapters.
    Adapters,
}

/// A bench part measured on the model in each weights mode (or the one `--weights` names).
struct PerMode<'a> {
    path: &'a std::path::Path,
    device: &'a candle_core::Device,
    weights: Option<WeightMode>,
    what: String,
}

impl PerMode<'_> {
    /// `measure` on each mode's model, the rows in mode order.
    fn run<T>(&self, measure: impl Fn(&LoadedModel, &'static str) -> Result<T>) -> Result<Vec<T>> {
        let mut rows = vec![];
        for mode in [WeightMode::F32, WeightMode::Bf16, WeightMode::Quantized]
            .into_iter()
            .filter(|m| self.weights.is_none_or(|w| w == *m))
        {
            let m = LoadedModel::load(self.path, mode, self.device)?;
            eprintln!("benchmarking {}, {} …", self.what, mode_name(mode));
            rows.push(measure(&m, mode_name(mode))?);
        }
        Ok(rows)
    }
}

pub fn bench(args: &BenchArgs) -> Result<()> {
    let path = registry::resolve(&args.model)?;
    let device = runtime::device(args.device)?;
    let (only, weights, reps) = (args.only, args.weights, args.reps);
    let mut out = serde_json::Map::new();
    out.insert("cpu".into(), introspect::bench::cpu_model().into());
    out.insert("kernels".into(), introspect_kernels::kernel_paths().into());
    println!(
        "device: {:?} ({}); threads: {}\n{}\n",
        args.device,
        introspect::bench::cpu_model(),
        rayon::current_num_threads(),
        introspect_kernels::kernel_paths()
    );
    if only.is_none() || only == Some(BenchPart::Tasks) {
        let m = LoadedModel::load(&path, WeightMode::F32, &device)?;
        let mut backend = introspect::backend::LocalBackend::new(m, WeightMode::F32)?;
        eprintln!("benchmarking the self-prediction loop (batch 32) …");
        let rows = introspect::bench::task_loop(&mut backend, 500, 32)?;
        println!("{}", introspect::bench::task_markdown(&rows));
        out.insert("tasks".into(), serde_json::to_value(&rows)?);
    }
    let per_mode = |what: &str| PerMode {
        path: &path,
        device: &device,
        weights,
        what: what.to_string(),
    };
    if only.is_none() || only == Some(BenchPart::Engine) {
        let rows = per_mode("the engine").run(|m, name| introspect::bench::run(m, name, reps))?;
        println!("{}", introspect::bench::markdown(&rows));
        out.insert("engine".into(), serde_json::to_value(&rows)?);
    }
    if only.is_none() || only == Some(BenchPart::Hooks) {
        let rows =
            per_mode("hook points").run(|m, name| introspect::bench::hooks::run(m, name, reps))?;
        println!("{}", introspect::bench::hooks::markdown(&rows));
        out.insert("hooks".into(), serde_json::to_value(&rows)?);
    }
    if only.is_none() || only == Some(BenchPart::Adapters) {
        let rows = per_mode("mixed adapters")
            .run(|m, name| introspect::bench::adapters::run(m, name, reps))?;
        println!("{}", introspect::bench::adapters::markdown(&rows));
        out.insert("adapters".into(), serde_json::to_value(&rows)?);
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

pub fn plan(args: &PlanArgs) -> Result<()> {
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

pub fn verify(
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

pub static JSON_STDOUT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

pub fn mode_name(mode: WeightMode) -> &'static str {
    match mode {
        WeightMode::F32 => "f32",
        WeightMode::Quantized => "quantized",
        WeightMode::Bf16 => "bf16",
    }
}
