//! A runnable model: weights + tokenizer + chat template, loaded from an HF directory or a GGUF file.

pub mod cache;
pub mod chat;
pub mod config;
pub mod decode;
pub mod export;
pub mod linear;
pub mod llama;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::Device;

pub use chat::{ChatTemplate, Message};
pub use config::LlamaConfig;
pub use llama::Llama;
pub use tokenizer::TextTokenizer;
pub use weights::WeightStore;

/// How GGUF weights are held in memory.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum WeightMode {
    /// Dequantize everything to f32 (exact against transformers' f32).
    #[default]
    F32,
    /// Keep GGUF blocks for the projections (smaller, faster decode; slightly different numerics).
    Quantized,
    /// Store the seven projections of every block as bf16 (half of f32's memory: what lets an 8B base
    /// train in 24 GiB); each product reads them as f32, so activations, LoRA and optimizer stay f32.
    /// Embeddings, head and norms stay f32.
    Bf16,
}

pub struct LoadedModel {
    pub llama: Llama,
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
    /// Generation stops at any of these.
    pub eos_ids: Vec<u32>,
    /// The file or directory the model came from.
    pub path: PathBuf,
}

impl LoadedModel {
    /// Loads an HF directory (config.json + safetensors + tokenizer.json) or a `.gguf` file.
    pub fn load(path: &Path, mode: WeightMode, device: &Device) -> Result<Self> {
        if path.is_dir() {
            Self::load_hf_dir(path, mode, device)
        } else if path.extension().is_some_and(|e| e == "gguf") {
            Self::load_gguf(path, mode, device)
        } else if !path.exists() {
            bail!("{}: no such file or directory", path.display())
        } else {
            bail!(
                "{}: not a model; expected an HF directory or a .gguf file",
                path.display()
            )
        }
    }

    pub fn load_hf_dir(dir: &Path, mode: WeightMode, device: &Device) -> Result<Self> {
        let mut cfg = LlamaConfig::from_hf_file(&dir.join("config.json"))?;
        // generation_config.json may name more EOS ids than config.json (Llama 3.x does).
        let gen_cfg = dir.join("generation_config.json");
        if gen_cfg.exists() {
            let text = std::fs::read_to_string(&gen_cfg)?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", gen_cfg.display()))?;
            let ids: Vec<u64> = match json.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => n.as_u64().into_iter().collect(),
                Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64()).collect(),
                _ => vec![],
            };
            for id in ids {
                if !cfg.eos_token_ids.contains(&(id as u32)) {
                    cfg.eos_token_ids.push(id as u32);
                }
            }
            cfg.validate()
                .with_context(|| format!("in {}", gen_cfg.display()))?;
        }
        let mut weights = WeightStore::from_hf_dir(dir, device)?;
        if mode == WeightMode::Bf16 {
            weights.projections_to_bf16()?;
        }
        let llama = Llama::load(cfg, &weights, device)?;
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            bail!("{}: missing tokenizer.json", dir.display());
        }
        let tokenizer = TextTokenizer::from_file(&tok_path)?;
        let template = ChatTemplate::from_hf_dir(dir)?;
        let mut eos_ids = llama.cfg.eos_token_ids.clone();
        if eos_ids.is_empty() {
            eos_ids.extend(tokenizer.token_id(&template.eos_token));
        }
        Ok(Self {
            llama,
            tokenizer,
            template,
            eos_ids,
            path: dir.to_path_buf(),
        })
    }

    pub fn load_gguf(path: &Path, mode: WeightMode, device: &Device) -> Result<Self> {
        let (content, mut file) = read_gguf_header(path)?;
        let rope_freqs = match content.tensor_infos.contains_key("rope_freqs.weight") {
            true => Some(
                content
                    .tensor(&mut file, "rope_freqs.weight", device)?
                    .dequantize(device)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            ),
            false => None,
        };
        let mut cfg = LlamaConfig::from_gguf(&content, rope_freqs)
            .with_context(|| format!("in GGUF {}", path.display()))?;
        cfg.tie_word_embeddings = !content.tensor_infos.contains_key("output.weight");
        let tokenizer = TextTokenizer::from_gguf(&content, path)?;
        let field = |k: &str| {
            content
                .metadata
                .get(k)
                .and_then(|v| v.to_string().ok())
                .cloned()
        };
        let template_src = field("tokenizer.chat_template").with_context(|| {
            format!(
                "{}: missing field `tokenizer.chat_template`",
                path.display()
            )
        })?;
        let id_text = |id: Option<u32>| id.map(|i| tokenizer.token(i)).unwrap_or_default();
        let template = ChatTemplate::new(
            &template_src,
            &format!("{} field `tokenizer.chat_template`", path.display()),
            &id_text(cfg.bos_token_id),
            &id_text(cfg.eos_token_ids.first().copied()),
        )?;
        let mut weights = WeightStore::from_gguf(
            path,
            &content,
            &mut file,
            &cfg,
            mode == WeightMode::Quantized,
            device,
        )?;
        if mode == WeightMode::Bf16 {
            weights.projections_to_bf16()?;
        }
        let eos_ids = cfg.eos_token_ids.clone();
        let llama = Llama::load(cfg, &weights, device)?;
        Ok(Self {
            llama,
            tokenizer,
            template,
            eos_ids,
            path: path.to_path_buf(),
        })
    }

    /// Renders `messages` with the model's template and tokenizes the result.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<(String, Vec<u32>)> {
        let text = self.template.render(messages, true)?;
        let ids = self.tokenizer.encode(&text)?;
        Ok((text, ids))
    }
}

pub fn read_gguf_header(path: &Path) -> Result<(gguf_file::Content, std::fs::File)> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let content = gguf_file::Content::read(&mut file).with_context(|| {
        format!(
            "{}: not a readable GGUF file (bad or truncated header)",
            path.display()
        )
    })?;
    Ok((content, file))
}
