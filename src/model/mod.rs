//! A runnable model: weights + tokenizer + chat template, loaded from an HF directory or a GGUF file.

pub mod cache;
pub mod chat;
pub mod config;
pub mod cpu;
pub mod decode;
pub mod export;
pub mod hooks;
pub mod intervention;
pub mod linear;
pub mod llama;
pub mod ops;
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
    /// GGUF blocks for the projections and the head: a GGUF's own blocks kept, dense checkpoints (HF)
    /// quantized at load to `--quantize` (smaller, faster decode; slightly different numerics).
    Quantized,
    /// The projections, embedding and head as bf16 (half of f32's memory: what lets an 8B base train in
    /// 24 GiB). Products are bf16 × bf16 with f32 accumulation (on the CPU `vdpbf16ps` where it exists,
    /// emulated with the same rounding elsewhere; where the CPU has them, training's LoRA products too, as
    /// under PyTorch's autocast); the residual stream, norms, LoRA weights and optimizer stay f32.
    Bf16,
}

/// The GGUF block type that `--weights quantized` quantizes dense checkpoints (HF safetensors, F16/F32
/// GGUF tensors) to at load.
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
pub enum QuantType {
    /// 8.5 bits a weight; introspect's CPU block kernels read it.
    #[default]
    #[value(name = "q8_0")]
    #[serde(rename = "q8_0")]
    Q8_0,
    /// 5 bits a weight; read by the CPU block kernels too.
    #[value(name = "q4_1")]
    #[serde(rename = "q4_1")]
    Q4_1,
    /// 4.5 bits a weight, rows a multiple of 256 columns (Llama-3's); Candle's quantized matmul.
    #[value(name = "q4_k")]
    #[serde(rename = "q4_k")]
    Q4K,
}

impl QuantType {
    pub fn ggml(self) -> candle_core::quantized::GgmlDType {
        use candle_core::quantized::GgmlDType;
        match self {
            QuantType::Q8_0 => GgmlDType::Q8_0,
            QuantType::Q4_1 => GgmlDType::Q4_1,
            QuantType::Q4K => GgmlDType::Q4K,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantType::Q8_0 => "q8_0",
            QuantType::Q4_1 => "q4_1",
            QuantType::Q4K => "q4_k",
        }
    }
}

/// How a checkpoint's weights are held once loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadSpec {
    pub mode: WeightMode,
    /// The block type dense weights are quantized to in [`WeightMode::Quantized`].
    pub quantize: QuantType,
}

impl From<WeightMode> for LoadSpec {
    fn from(mode: WeightMode) -> Self {
        Self {
            mode,
            quantize: QuantType::default(),
        }
    }
}

/// A progress bar over the bytes of a model's files (hidden when stderr is not a terminal).
pub(crate) fn load_progress(files: &[PathBuf]) -> indicatif::ProgressBar {
    let total: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "loading {msg} {bar:30} {binary_bytes}/{binary_total_bytes} ({eta})",
        )
        .expect("a valid template"),
    );
    if let Some(name) = files
        .first()
        .and_then(|f| f.parent())
        .and_then(|d| d.file_name())
    {
        bar.set_message(name.to_string_lossy().into_owned());
    }
    bar
}

pub struct LoadedModel {
    pub llama: Llama,
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
    /// Generation stops at any of these.
    pub eos_ids: Vec<u32>,
    /// The file or directory the model came from.
    pub path: PathBuf,
    /// How its weights are held.
    pub spec: LoadSpec,
}

/// A model's config without its weights: config.json of an HF directory, or a GGUF's header.
pub fn read_config(path: &Path) -> Result<LlamaConfig> {
    if path.is_dir() {
        return LlamaConfig::from_hf_file(&path.join("config.json"));
    }
    let (content, _) = read_gguf_header(path)?;
    let mut cfg = LlamaConfig::from_gguf(&content, None)
        .with_context(|| format!("in GGUF {}", path.display()))?;
    cfg.tie_word_embeddings = !content.tensor_infos.contains_key("output.weight");
    Ok(cfg)
}

/// The weights' part of the memory plan, from the config (or the GGUF header) alone: what loading
/// `path` in `spec` will hold on `device`, beside what the device has free.
pub fn weight_plan(
    path: &Path,
    spec: LoadSpec,
    device: &Device,
) -> Result<crate::memory::MemoryPlan> {
    let bytes = if path.is_dir() {
        crate::memory::weight_bytes(&read_config(path)?, spec)
    } else {
        let (content, _) = read_gguf_header(path)?;
        match spec.mode {
            // A GGUF's own blocks: the sizes as stored, the table as bf16 rows (and as stored
            // again when it is also the head).
            WeightMode::Quantized => content
                .tensor_infos
                .iter()
                .map(|(name, info)| {
                    let n = info.shape.elem_count() as u64;
                    let stored = n / info.ggml_dtype.block_size() as u64
                        * info.ggml_dtype.type_size() as u64;
                    match name.as_str() {
                        "token_embd.weight"
                            if content.tensor_infos.contains_key("output.weight") =>
                        {
                            2 * n
                        }
                        "token_embd.weight" => 2 * n + stored,
                        _ if info.shape.dims().len() == 1 => 4 * n,
                        _ => stored,
                    }
                })
                .sum(),
            _ => crate::memory::weight_bytes(&read_config(path)?, spec),
        }
    };
    Ok(crate::memory::MemoryPlan {
        items: vec![(
            format!("weights ({})", crate::memory::spec_name(spec)),
            bytes,
        )],
        free: crate::memory::free_bytes(device),
        resident: 0,
    })
}

impl LoadedModel {
    /// Loads an HF directory (config.json + safetensors + tokenizer.json) or a `.gguf` file. A model
    /// whose weights cannot fit the device's free memory is refused before any is read.
    pub fn load(path: &Path, spec: impl Into<LoadSpec>, device: &Device) -> Result<Self> {
        let spec = spec.into();
        if path.is_dir() || path.extension().is_some_and(|e| e == "gguf") {
            weight_plan(path, spec, device)?.check(&format!("loading {}", path.display()))?;
        }
        if path.is_dir() {
            Self::load_hf_dir(path, spec, device)
        } else if path.extension().is_some_and(|e| e == "gguf") {
            Self::load_gguf(path, spec, device)
        } else if !path.exists() {
            bail!("{}: no such file or directory", path.display())
        } else {
            bail!(
                "{}: not a model; expected an HF directory or a .gguf file",
                path.display()
            )
        }
    }

    pub fn load_hf_dir(dir: &Path, spec: LoadSpec, device: &Device) -> Result<Self> {
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
        let weights = WeightStore::from_hf_dir_as(dir, spec, cfg.tie_word_embeddings, device)?;
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
            spec,
        })
    }

    pub fn load_gguf(path: &Path, spec: LoadSpec, device: &Device) -> Result<Self> {
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
        let weights = WeightStore::from_gguf(path, &content, &mut file, &cfg, spec, device)?;
        let eos_ids = cfg.eos_token_ids.clone();
        let llama = Llama::load(cfg, &weights, device)?;
        Ok(Self {
            llama,
            tokenizer,
            template,
            eos_ids,
            path: path.to_path_buf(),
            spec,
        })
    }

    /// Renders `messages` with the model's template and tokenizes the result.
    pub fn encode_chat(&self, messages: &[Message]) -> Result<(String, Vec<u32>)> {
        let text = self.template.render(messages, true)?;
        let ids = self.tokenizer.encode(&text)?;
        Ok((text, ids))
    }

    /// [`LoadedModel::encode_chat`] with each token's byte range in the text, for the position selectors
    /// that name text or chat turns.
    pub fn render_chat(&self, messages: &[Message]) -> Result<(Vec<u32>, chat::RenderedChat)> {
        let text = self.template.render(messages, true)?;
        let (ids, offsets) = self.tokenizer.encode_with_offsets(&text)?;
        Ok((
            ids,
            chat::RenderedChat {
                text,
                offsets,
                messages: messages.to_vec(),
            },
        ))
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
