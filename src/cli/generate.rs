//! `generate`: chat completions from the command line.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use std::sync::Arc;

use introspect::engine::{GenerationParams, Generator};
use introspect::lora::{Adapter, AdapterSet};
use introspect::model::hooks::RowHooks;
use introspect::model::intervention::{row_interventions, InterventionSpec, Prepared};
use introspect::model::{LoadedModel, Message};

use super::{load, load_adapters, ModelArgs};

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// JSON array of {"role","content"} messages.
    #[arg(long, conflicts_with = "messages_file")]
    pub messages: Option<String>,
    /// JSONL file, one {"messages": [...]} per line; writes one JSON object per line.
    #[arg(long)]
    pub messages_file: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Samples per prompt.
    #[arg(long, default_value_t = 1)]
    pub n: usize,
    /// Stop strings (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Print JSON with ids and the top-10 log-probabilities of the first generated position.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub rows: RowArgs,
}

/// What every row of a run carries: the adapter it runs with and its interventions.
#[derive(clap::Args)]
pub struct RowArgs {
    /// A PEFT LoRA adapter directory, optionally named: `NAME=DIR` (repeatable).
    #[arg(long)]
    pub adapter: Vec<String>,
    /// Which loaded adapter to use (default: the only one given).
    #[arg(long)]
    pub use_adapter: Option<String>,
    /// An intervention on the residual stream, JSON or @FILE.json (repeatable, applied in order):
    /// {"hook": "blocks.19.hook_resid_post", "op": "add"|"replace"|"scale"|"zero",
    /// "vector": [floats] | {"file": "v.safetensors", "name": "TENSOR"}, "alpha": 8, "scale":
    /// "raw"|"unit"|"relative", "factor": 0.5, "positions": {"from": P}|{"span": [A, B]}|{"at": I}|
    /// {"all": true}|{"generated": true}|{"text": S, "occurrence": K}|{"from_text": S}|{"turn": I}}.
    #[arg(long)]
    pub intervene: Vec<String>,
}

pub fn parse_messages(text: &str, origin: &str) -> Result<Vec<Message>> {
    let msgs: Vec<Message> = serde_json::from_str(text).with_context(|| {
        format!("{origin}: expected a JSON array of {{\"role\", \"content\"}} objects")
    })?;
    if msgs.is_empty() {
        bail!("{origin}: no messages");
    }
    Ok(msgs)
}

/// The conversations of `--messages` or `--messages-file`.
pub fn read_conversations(
    messages: &Option<String>,
    messages_file: &Option<PathBuf>,
) -> Result<Vec<Vec<Message>>> {
    match (messages, messages_file) {
        (Some(m), None) => Ok(vec![parse_messages(m, "--messages")?]),
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
            Ok(out)
        }
        _ => bail!("give --messages or --messages-file"),
    }
}

/// The adapter `--use-adapter` names, or the only one loaded.
pub fn chosen_adapter<'a>(
    adapters: &'a AdapterSet,
    use_adapter: &Option<String>,
) -> Result<Option<&'a Arc<Adapter>>> {
    Ok(match (use_adapter, adapters.len()) {
        (Some(name), _) => Some(adapters.get(name)?),
        (None, 0) => None,
        (None, 1) => Some(adapters.get(adapters.names().next().expect("one"))?),
        (None, _) => bail!(
            "several adapters loaded ({}); choose one with --use-adapter NAME",
            adapters.names().collect::<Vec<_>>().join(", ")
        ),
    })
}

/// Each `--intervene` checked against the model, its vector loaded.
pub fn prepare_interventions(specs: &[String], model: &LoadedModel) -> Result<Vec<Prepared>> {
    let cfg = &model.llama.cfg;
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let origin = format!("--intervene #{}", i + 1);
            InterventionSpec::parse(s, &origin)?
                .prepare(cfg.num_hidden_layers, cfg.hidden_size)
                .with_context(|| origin.clone())
        })
        .collect()
}

pub fn generate(args: GenerateArgs) -> Result<()> {
    let conversations = read_conversations(&args.messages, &args.messages_file)?;
    let model = load(&args.model)?;
    let adapters = load_adapters(&args.rows.adapter, &model)?;
    let adapter = chosen_adapter(&adapters, &args.rows.use_adapter)?;
    let interventions = prepare_interventions(&args.rows.intervene, &model)?;
    let mut prompts = vec![];
    let mut hooks = vec![];
    for (i, c) in conversations.iter().enumerate() {
        let (ids, chat) = model.render_chat(c)?;
        hooks.push(if interventions.is_empty() {
            None
        } else {
            let interventions = row_interventions(&interventions, ids.len(), Some(&chat))
                .with_context(|| format!("conversation {}", i + 1))?;
            Some(Arc::new(RowHooks {
                interventions,
                captures: vec![],
            }))
        });
        prompts.push(ids);
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
    gen.adapter = adapter.cloned();
    let bar = indicatif::ProgressBar::new(prompts.len() as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{pos}/{len} prompts {wide_bar} {per_sec} eta {eta}",
        )
        .unwrap(),
    );
    let mut stdout = std::io::stdout().lock();
    let chunk = gen.max_batch_rows.max(1);
    for (ci, (batch, batch_hooks)) in prompts.chunks(chunk).zip(hooks.chunks(chunk)).enumerate() {
        let results = gen.generate_hooked(batch, batch_hooks, &params)?;
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
