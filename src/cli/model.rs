//! `model` and `lora`: installing, listing and exporting models; merging and inspecting adapters.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use introspect::registry;

#[derive(Subcommand)]
pub enum LoraCmd {
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

#[derive(Subcommand)]
pub enum ModelCmd {
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

pub fn model_cmd(cmd: ModelCmd) -> Result<()> {
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

pub fn lora_cmd(cmd: LoraCmd) -> Result<()> {
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
