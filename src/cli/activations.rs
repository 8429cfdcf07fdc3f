//! `activations`: the residual stream of chats at chosen hook points and positions, as safetensors.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use introspect::activations::{self, Request};
use introspect::engine::Generator;
use introspect::model::hooks::{HookPoint, PositionSpec};

use super::generate::{chosen_adapter, prepare_interventions, read_conversations, RowArgs};
use super::{load, load_adapters, ModelArgs};

#[derive(clap::Args)]
pub struct ActivationsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// JSON array of {"role","content"} messages: the file's keys are the hook names, each [positions, d].
    #[arg(long, conflicts_with = "messages_file")]
    pub messages: Option<String>,
    /// JSONL file, one {"messages": [...]} per line: keys INDEX.HOOK, INDEX the line's 0-based place.
    #[arg(long)]
    pub messages_file: Option<PathBuf>,
    /// Hook points by name, `*` for any run of characters, comma-separated: blocks.*.hook_resid_post,
    /// blocks.9.hook_attn_out, ln_final.hook_normalized, '*' (every one).
    #[arg(long)]
    pub hooks: String,
    /// Which positions, JSON: {"at": -1} (the last prompt token), {"from": P}, {"span": [A, B]},
    /// {"all": true}, {"generated": true}, {"text": "S", "occurrence": K} (the tokens meeting the K-th
    /// S in the rendered prompt), {"from_text": "S"}, {"turn": I} (message I's content tokens).
    #[arg(long, default_value = r#"{"all": true}"#)]
    pub positions: String,
    /// Greedy tokens to generate after each prompt (their positions are read where --positions takes them).
    #[arg(long, default_value_t = 0)]
    pub max_tokens: usize,
    /// The adapter, and interventions applied before reading.
    #[command(flatten)]
    pub rows: RowArgs,
    /// Sequences run together.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// The safetensors file to write.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn activations(args: ActivationsArgs) -> Result<()> {
    let conversations = read_conversations(&args.messages, &args.messages_file)?;
    let positions: PositionSpec = serde_json::from_str(&args.positions).with_context(|| {
        "--positions: expected {\"at\": I}, {\"from\": P}, {\"span\": [A, B]}, {\"all\": true}, {\"generated\": true}, {\"text\": S}, {\"from_text\": S} or {\"turn\": I}"
    })?;
    let model = load(&args.model)?;
    let cfg = &model.llama.cfg;
    let points = HookPoint::matching(&args.hooks, cfg.num_hidden_layers).context("--hooks")?;
    let adapters = load_adapters(&args.rows.adapter, &model)?;
    let mut gen = Generator::new(&model);
    gen.adapter = chosen_adapter(&adapters, &args.rows.use_adapter)?.cloned();
    gen.max_batch_rows = args.batch_size.max(1);
    let request = Request {
        points: points.clone(),
        positions,
        interventions: prepare_interventions(&args.rows.intervene, &model)?,
        max_tokens: args.max_tokens,
    };
    let (prompts, chats): (Vec<_>, Vec<_>) = conversations
        .iter()
        .map(|c| model.render_chat(c))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    let records = activations::capture(&gen, &prompts, &chats, &request)?;
    let mut metadata = BTreeMap::new();
    let weights_sha = if model.path.is_file() {
        introspect::registry::sha256_file(&model.path)?
    } else {
        weights_digest(&model.path)?
    };
    for (k, v) in [
        ("model", model.path.display().to_string()),
        ("model_sha256", weights_sha),
        (
            "weights",
            format!("{:?}", args.model.weights).to_lowercase(),
        ),
        (
            "chat_template_sha256",
            introspect::registry::sha256_bytes(model.template.source.as_bytes()),
        ),
        (
            "hooks",
            serde_json::to_string(&points.iter().map(HookPoint::name).collect::<Vec<_>>())?,
        ),
        ("positions", args.positions.clone()),
        (
            "interventions",
            serde_json::to_string(&args.rows.intervene)?,
        ),
        (
            "adapter",
            gen.adapter
                .as_ref()
                .map(|_| args.rows.adapter.join(","))
                .unwrap_or_default(),
        ),
        (
            "introspect_commit",
            env!("INTROSPECT_GIT_COMMIT").to_string(),
        ),
    ] {
        metadata.insert(k.to_string(), v);
    }
    activations::write(
        &args.out,
        &records,
        cfg.hidden_size,
        args.messages.is_some(),
        metadata,
    )?;
    let read: usize = records.iter().map(|r| r.positions.len()).sum();
    eprintln!(
        "{} hook points × {read} positions of {} prompts → {}",
        points.len(),
        records.len(),
        args.out.display()
    );
    Ok(())
}

/// sha256 over the sha256 of each weight file of an HF directory, in name order.
fn weights_digest(dir: &std::path::Path) -> Result<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    let mut all = String::new();
    for f in files {
        all += &introspect::registry::sha256_file(&f)?;
    }
    Ok(introspect::registry::sha256_bytes(all.as_bytes()))
}
