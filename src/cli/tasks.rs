//! `dataset`, `object`, `hypothetical` and `evaluate`: the paper's self-prediction pipeline.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use introspect::backend::{Backend, CachedBackend, LocalBackend};
use introspect::eval::{self, report, Variant};
use introspect::registry;
use introspect::runs::calibrate::{self, Calibration, CalibrationSettings, Method};
use introspect::runs::training::{self, TrainingSetConfig};
use introspect::runs::{self, Run, RunKind, RunSettings};
use introspect::tasks::generate::Generator as StringGenerator;
use introspect::tasks::task::Source;
use introspect::tasks::{build, datarow, Property, Task, TASKS};

#[derive(clap::Subcommand)]
pub enum DatasetCmd {
    /// The paper's tasks: role, where their strings come from, properties.
    List,
    /// Write DataRow files for a task: generated strings (train/ and val/ splits) or your own strings.
    Build {
        #[arg(long)]
        task: String,
        #[arg(long)]
        out: PathBuf,
        /// JSONL with `string` (and `target`) per line, for tasks without a generator (or to override it).
        #[arg(long)]
        strings: Option<PathBuf>,
        /// Generated strings: train and val sizes (default: the paper's).
        #[arg(long)]
        n_train: Option<usize>,
        #[arg(long)]
        n_val: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Comma-separated properties (default: the task's own list).
        #[arg(long)]
        properties: Option<String>,
    },
    /// Rebuild every row from (original_question, original_dataset, behavioral_property) and compare;
    /// exits non-zero naming the first row and field that differ.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Self-/cross-prediction SFT data (OpenAI chat JSONL) from object-level runs.
    Training {
        /// Object-level run directories (the model whose behaviour is to be predicted).
        #[arg(long, required = true, num_args = 1..)]
        object: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// Examples per (task, property) at most.
        #[arg(long, default_value_t = 1000)]
        per_pair: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Comma-separated properties (default: each task's own list).
        #[arg(long)]
        properties: Option<String>,
    },
}

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: super::ModelArgs,
    #[command(flatten)]
    pub backend: super::BackendArgs,
    /// A PEFT LoRA adapter: `DIR` or `NAME=DIR` (local backend; a server names its adapters as models).
    #[arg(long)]
    pub adapter: Option<String>,
    /// DataRow JSONL files (the paper's release or `introspect dataset build`).
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Run directory: run.json and the append-only log; rerunning resumes. For `extract`: the
    /// object-level run whose answers are read (the extractions go under OUT/extracted/).
    #[arg(long)]
    pub out: PathBuf,
    /// Samples per prompt; above 1 the modal answer is kept (the paper's mode-of-n).
    #[arg(long, default_value_t = 1)]
    pub n: usize,
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Default: 256 for object-level prompts, 32 for hypothetical ones.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sequences decoded together (continuous batching: finished rows are replaced at once).
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// At most this many rows from each data file (the first ones).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Do not answer repeated requests from the request cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Where the request cache lives (default: $INTROSPECT_HOME/cache).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Hypothetical runs: only strings this object-level run answered without a `default` failure (the
    /// paper asks its predictor only about those).
    #[arg(long)]
    pub filter_by: Option<PathBuf>,
}

fn parse_properties(s: &str) -> Result<Vec<Property>> {
    s.split(',')
        .map(|p| {
            Property::parse(p.trim()).with_context(|| {
                format!(
                    "unknown property `{p}`; known: {}",
                    Property::ALL.map(|p| p.name()).join(", ")
                )
            })
        })
        .collect()
}

pub fn dataset(cmd: DatasetCmd) -> Result<()> {
    match cmd {
        DatasetCmd::List => {
            println!("{:<22} {:<6} {:<30} properties", "task", "role", "strings");
            for t in TASKS {
                let source = match t.source {
                    Source::Generated(g) => format!("generator `{g}`"),
                    Source::External(stem) => format!("your JSONL (paper: {stem})"),
                };
                println!(
                    "{:<22} {:<6} {:<30} {}",
                    t.name,
                    format!("{:?}", t.role).to_lowercase(),
                    source,
                    t.properties
                        .iter()
                        .map(|p| p.name())
                        .collect::<Vec<_>>()
                        .join(",")
                );
            }
            Ok(())
        }
        DatasetCmd::Build {
            task,
            out,
            strings,
            n_train,
            n_val,
            seed,
            properties,
        } => {
            let task = Task::get(&task)?;
            let props = match properties {
                Some(p) => parse_properties(&p)?,
                None => task.properties.to_vec(),
            };
            let mut files = vec![];
            match (strings, task.source) {
                (Some(path), _) => {
                    let s = build::read_strings(&path)?;
                    files.extend(build::write_task_files(&out, task, &s, &props)?);
                }
                (None, Source::Generated(name)) => {
                    let g = StringGenerator::get(name)?;
                    let (train, val) = g.generate(
                        n_train.unwrap_or(g.sizes.0),
                        n_val.unwrap_or(g.sizes.1),
                        seed,
                    )?;
                    for (split, strings) in [("train", train), ("val", val)] {
                        let s: Vec<build::SourceString> = strings
                            .into_iter()
                            .map(|string| build::SourceString {
                                string,
                                target: None,
                            })
                            .collect();
                        files.extend(build::write_task_files(&out.join(split), task, &s, &props)?);
                    }
                }
                (None, Source::External(stem)) => bail!(
                    "task {} needs external text: give --strings FILE.jsonl ({{\"string\", \"target\"}} per line; the paper's {stem} split)",
                    task.name
                ),
            }
            for f in files {
                println!("{}", f.display());
            }
            Ok(())
        }
        DatasetCmd::Validate { files } => {
            let mut failed = None;
            for f in &files {
                match datarow::validate_file(f) {
                    Ok(v) => println!(
                        "{}: {} rows match the paper's templates{}",
                        f.display(),
                        v.rows,
                        if v.layout_differs > 0 {
                            format!(
                                " ({} laid out differently from the paper's JSON)",
                                v.layout_differs
                            )
                        } else {
                            " byte for byte".into()
                        }
                    ),
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        failed.get_or_insert(e);
                    }
                }
            }
            match failed {
                Some(_) => bail!("validation failed"),
                None => Ok(()),
            }
        }
        DatasetCmd::Training {
            object,
            out,
            per_pair,
            seed,
            properties,
        } => {
            let mut records = vec![];
            for dir in &object {
                records.extend(runs::read_run(dir, RunKind::Object)?.1);
            }
            let cfg = TrainingSetConfig {
                per_pair,
                seed,
                properties: properties.as_deref().map(parse_properties).transpose()?,
                ..Default::default()
            };
            let (examples, counts) = training::build(&records, &cfg)?;
            if examples.is_empty() {
                bail!("no examples: every object-level answer was non-compliant or its property undefined");
            }
            introspect::fsutil::write_atomic(&out, training::to_jsonl(&examples).as_bytes())?;
            println!(
                "{:<22} {:<28} {:>8} {:>14} {:>10}",
                "task", "property", "examples", "non-compliant", "undefined"
            );
            for ((t, p), c) in &counts {
                println!(
                    "{t:<22} {p:<28} {:>8} {:>14} {:>10}",
                    c.examples, c.non_compliant, c.undefined
                );
            }
            println!("{} examples → {}", examples.len(), out.display());
            Ok(())
        }
    }
}

/// The local backend: the model, and each adapter under its name (returned in order).
pub fn local_backend(
    model: &super::ModelArgs,
    adapters: &[String],
) -> Result<(LocalBackend, Vec<String>)> {
    let loaded = super::load(model)?;
    let mut backend = LocalBackend::new(loaded, model.spec())?;
    let mut names = vec![];
    for spec in adapters {
        let (name, dir) = super::adapter_spec(spec);
        backend.add_adapter(&name, &dir)?;
        names.push(name);
    }
    Ok((backend, names))
}

#[derive(clap::Args)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// With `--backend openai`, `--object-adapter` / `--hypothetical-adapter` name models on the server
    /// (and only `--method sampled` runs: the exact method expands the engine's own distribution).
    #[command(flatten)]
    pub backend: super::BackendArgs,
    /// PEFT LoRA adapters to load: `DIR` or `NAME=DIR` (repeatable; local backend).
    #[arg(long)]
    pub adapter: Vec<String>,
    /// The adapter answering the object-level prompts (default: the base model).
    #[arg(long)]
    pub object_adapter: Option<String>,
    /// The adapter answering the hypothetical prompts (default: the base model).
    #[arg(long)]
    pub hypothetical_adapter: Option<String>,
    /// DataRow files whose strings are used (the paper: the first 500 of val animals).
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    #[arg(long, default_value_t = 500)]
    pub limit: usize,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = Method::Sampled)]
    pub method: Method,
    /// Samples per prompt (sampled method).
    #[arg(long, default_value_t = 20)]
    pub samples: usize,
    /// The character asked about.
    #[arg(long, default_value = "second_character")]
    pub property: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
}

pub fn calibrate(args: CalibrateArgs) -> Result<()> {
    let property = parse_properties(&args.property)?[0];
    let rows = runs::items_from_files(RunKind::Object, &args.data, None)?;
    let items: Vec<_> = calibrate::items(rows)
        .into_iter()
        .take(args.limit)
        .collect();
    let backend: Box<dyn Backend> = match args.backend.openai(&args.model.model)? {
        Some(remote) => {
            if !args.adapter.is_empty() {
                bail!("--adapter is for the local backend; a server lists its adapters as models: name them in --object-adapter / --hypothetical-adapter");
            }
            if args.method == Method::Exact {
                bail!("--method exact expands the engine's own distribution and needs the local backend; with --backend openai use --method sampled");
            }
            Box::new(remote)
        }
        None => {
            let (mut local, _) = local_backend(&args.model, &args.adapter)?;
            local.batch_size = args.batch_size.max(1);
            for a in [&args.object_adapter, &args.hypothetical_adapter]
                .into_iter()
                .flatten()
            {
                local.adapter(a)?;
            }
            Box::new(local)
        }
    };
    let settings = CalibrationSettings {
        model: args.model.model.clone(),
        fingerprint_object: backend.fingerprint(args.object_adapter.as_deref())?,
        fingerprint_hypothetical: backend.fingerprint(args.hypothetical_adapter.as_deref())?,
        object_adapter: args.object_adapter.clone(),
        hypothetical_adapter: args.hypothetical_adapter.clone(),
        method: args.method,
        property,
        samples: args.samples,
        seed: args.seed,
        max_tokens: 3,
    };
    let start = std::time::Instant::now();
    let result = Calibration {
        object_backend: backend.as_ref(),
        hypothetical_backend: backend.as_ref(),
        settings,
        dir: args.out.clone(),
        chunk: args.batch_size.max(1),
        progress: true,
    }
    .run(&items)?;
    println!(
        "calibration ({:?}, {}): {} strings, {} points, MAD {:.1} pp (top-1 only: {:.1} pp); probability mass covered: object {:.0}%, hypothetical {:.0}%; {:.0} s → {}",
        args.method,
        property,
        result.strings,
        result.points.len(),
        result.mad,
        result.mad_top1,
        100.0 * result.object_coverage,
        100.0 * result.hypothetical_coverage,
        start.elapsed().as_secs_f64(),
        args.out.join("calibration.json").display()
    );
    Ok(())
}

/// The backend a run's requests go to (the local engine or a server), behind the request cache unless
/// `--no-cache`; `f` gets it and the adapter name requests carry. Returns `f`'s result and the requests
/// answered from the cache.
fn with_backend<T>(
    args: &RunArgs,
    f: impl FnOnce(&dyn Backend, Option<String>) -> Result<T>,
) -> Result<(T, usize)> {
    let remote = args.backend.openai(&args.model.model)?;
    if remote.is_some() && args.adapter.is_some() {
        bail!("--adapter is for the local backend; a server lists its adapters as models: pass the adapter's name as --model");
    }
    let (inner, adapter): (Box<dyn Backend>, Option<String>) = match remote {
        Some(r) => (Box::new(r), None),
        None => {
            let (mut local, names) = local_backend(&args.model, args.adapter.as_slice())?;
            local.batch_size = args.batch_size.max(1);
            (Box::new(local), names.into_iter().next())
        }
    };
    let cache = if args.no_cache {
        None
    } else {
        let dir = args
            .cache_dir
            .clone()
            .unwrap_or_else(|| registry::home().join("cache"));
        Some(CachedBackend::open(
            inner.as_ref(),
            &dir.join("completions.jsonl"),
        )?)
    };
    let backend: &dyn Backend = match &cache {
        Some(c) => c,
        None => inner.as_ref(),
    };
    let out = f(backend, adapter)?;
    let cached = cache
        .as_ref()
        .map_or(0, |c| c.hits.load(std::sync::atomic::Ordering::Relaxed));
    Ok((out, cached))
}

fn settings(
    args: &RunArgs,
    kind: RunKind,
    backend: &dyn Backend,
    adapter: Option<String>,
) -> Result<RunSettings> {
    Ok(RunSettings {
        kind,
        model: args.model.model.clone(),
        fingerprint: backend.fingerprint(adapter.as_deref())?,
        adapter,
        n: args.n,
        temperature: args.temperature,
        max_tokens: args.max_tokens.unwrap_or(match kind {
            RunKind::Object => 256,
            RunKind::Hypothetical => 32,
        }),
        seed: args.seed,
        system: Some(String::new()),
    })
}

fn summary_line(name: &str, summary: &runs::RunSummary, cached: usize, log: &Path) {
    println!(
        "{name}: {} rows ({} new, {cached} from the request cache) in {:.1} s, {:.2} prompts/s; {} prompt + {} completion tokens; {:.1}% compliant → {}",
        summary.rows,
        summary.new_rows,
        summary.seconds,
        summary.prompts_per_s,
        summary.usage.prompt_tokens,
        summary.usage.completion_tokens,
        100.0 * summary.compliant as f64 / summary.rows.max(1) as f64,
        log.display()
    );
}

pub fn run(kind: RunKind, args: RunArgs) -> Result<()> {
    if args.data.is_empty() {
        bail!("name the DataRow files to run with --data");
    }
    let mut items = runs::items_from_files(kind, &args.data, args.limit)?;
    if let Some(dir) = &args.filter_by {
        if kind != RunKind::Hypothetical {
            bail!("--filter-by applies to hypothetical runs");
        }
        let before = items.len();
        items = runs::filter_by_object(items, &runs::read_run(dir, RunKind::Object)?.1);
        eprintln!(
            "--filter-by {}: {} of {before} rows kept",
            dir.display(),
            items.len()
        );
    }
    let (summary, cached) = with_backend(&args, |backend, adapter| {
        Run {
            backend,
            settings: settings(&args, kind, backend, adapter)?,
            dir: args.out.clone(),
            chunk: 64,
            progress: true,
        }
        .run(&items)
    })?;
    summary_line(
        kind.log_name().trim_end_matches(".jsonl"),
        &summary,
        cached,
        &args.out.join(kind.log_name()),
    );
    Ok(())
}

/// `introspect extract`: the LLM-extracted properties of the object-level run in `--out`.
pub fn extract(args: RunArgs) -> Result<()> {
    if !args.data.is_empty() || args.filter_by.is_some() {
        bail!("extract reads the object-level run in --out; --data and --filter-by do not apply");
    }
    let (done, cached) = with_backend(&args, |backend, adapter| {
        let s = settings(&args, RunKind::Hypothetical, backend, adapter)?;
        runs::extract::extract(&args.out, backend, s, 64, true)
    })?;
    if done.is_empty() {
        bail!(
            "{}: no task of this run asks about an LLM-extracted property (writing_stories_pick_name, dear_abbie)",
            args.out.display()
        );
    }
    for (property, summary) in &done {
        let dir = runs::extract::dir_of(&args.out, *property);
        summary_line(
            &format!("extracted {property}"),
            summary,
            cached,
            &dir.join(RunKind::Hypothetical.log_name()),
        );
    }
    Ok(())
}

pub fn evaluate(
    object: &Path,
    hypothetical: &Path,
    predictor_object: Option<&Path>,
    rules: eval::Rules,
    out: Option<&Path>,
) -> Result<()> {
    let (target, object_records) = runs::read_run(object, RunKind::Object)?;
    let (predictor, hyp_records) = runs::read_run(hypothetical, RunKind::Hypothetical)?;
    let (rows, unmatched) = eval::join(&hyp_records, &object_records);
    if rows.is_empty() {
        bail!(
            "no hypothetical row of {} has an object-level answer in {} (same task and string)",
            hypothetical.display(),
            object.display()
        );
    }
    // The notebook asks a predictor only about strings its own object answer complied with (§6.1).
    let loaded = predictor_object
        .map(|p| runs::read_run(p, RunKind::Object))
        .transpose()?;
    let own: Option<&[runs::Record]> = match &loaded {
        Some((_, records)) => Some(records),
        // Self-prediction: the target's run is the predictor's own.
        None if predictor.fingerprint == target.fingerprint && predictor.adapter == target.adapter => {
            Some(&object_records)
        }
        None if rules == eval::Rules::Notebook => bail!(
            "the predictor ({}) is not the target ({}): the notebook's rules score it only on strings its own object-level answer complied with; pass its object-level run with --predictor-object DIR (or --rules spec)",
            hypothetical.display(),
            object.display()
        ),
        None => None,
    };
    let notebook_rows = own.map(|o| eval::own_compliant_rows(&rows, o));
    let variants: Vec<Variant> = match &notebook_rows {
        Some(_) => vec![rules.path_b(), rules.other().path_b(), Variant::PathA],
        None => vec![Variant::PathB, Variant::PathA],
    };
    let evals: Vec<eval::Evaluation> = variants
        .iter()
        .map(|&v| {
            let chosen = match (&notebook_rows, v) {
                (Some(n), Variant::PathBNotebook) => n,
                _ => &rows,
            };
            eval::evaluate(chosen, v, &object_records)
        })
        .collect();
    let name = |s: &RunSettings| match &s.adapter {
        Some(a) => format!("{} + adapter {a}", s.model),
        None => s.model.clone(),
    };
    let mut md = report::markdown(
        "Self-prediction evaluation",
        &name(&predictor),
        &name(&target),
        &evals,
    );
    if unmatched > 0 {
        md.push_str(&format!(
            "
{unmatched} hypothetical rows had no object-level answer to join (or no modal answer) and are not counted.
"
        ));
    }
    print!("{md}");
    if let Some(dir) = out {
        let metrics = serde_json::json!({
            "predictor": predictor,
            "target": target,
            "unmatched_rows": unmatched,
            "rules": rules,
            "notebook_rows": notebook_rows.as_ref().map(Vec::len),
            "evaluations": evals,
        });
        introspect::fsutil::write_atomic(
            &dir.join("metrics.json"),
            serde_json::to_string_pretty(&metrics)?.as_bytes(),
        )?;
        introspect::fsutil::write_atomic(&dir.join("report.md"), md.as_bytes())?;
        let mut scored = String::new();
        for r in &rows {
            scored.push_str(&serde_json::to_string(r)?);
            scored.push('\n');
        }
        introspect::fsutil::write_atomic(&dir.join("rows.jsonl"), scored.as_bytes())?;
        eprintln!(
            "wrote {}/{{metrics.json, report.md, rows.jsonl}}",
            dir.display()
        );
    }
    Ok(())
}
