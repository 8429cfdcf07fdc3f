//! GGUF → HF layout (config.json, model.safetensors, tokenizer.json, tokenizer_config.json with the chat
//! template), so the safetensors path runs on real weights and other tools can read what introspect reads.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

use super::{read_gguf_header, ChatTemplate, LlamaConfig, TextTokenizer, WeightStore};
use crate::fsutil::write_atomic;
use crate::lora::Adapter;

/// Writes `model` (a .gguf file or an HF directory) as an HF directory, with `adapter` folded into the
/// weights (`W + scale·B·A`) when given (`introspect lora merge`).
pub fn export_hf(model: &Path, adapter: Option<&Adapter>, out: &Path) -> Result<()> {
    if model.is_dir() {
        copy_hf_dir(model, adapter, out)
    } else {
        export_gguf_to_hf(model, adapter, out)
    }
}

/// `lora merge`: folds the PEFT adapter in `adapter_dir` into `model` and writes an HF directory. Only the
/// config is read to check the adapter's shapes; the export reads the weights once.
pub fn merge_adapter(model: &Path, adapter_dir: &Path, out: &Path) -> Result<()> {
    let cfg = if model.is_dir() {
        LlamaConfig::from_hf_file(&model.join("config.json"))?
    } else {
        let (content, _) = read_gguf_header(model)?;
        LlamaConfig::from_gguf(&content, None)
            .with_context(|| format!("in GGUF {}", model.display()))?
    };
    let adapter = crate::lora::peft::load(adapter_dir, &cfg, &Device::Cpu)
        .with_context(|| format!("adapter {}", adapter_dir.display()))?;
    export_hf(model, Some(&adapter), out)
}

/// Folds the adapter's `scale·B·A` into the matching `model.layers.N.*.weight` tensors.
fn merge(tensors: &mut HashMap<String, Tensor>, adapter: Option<&Adapter>) -> Result<()> {
    let Some(adapter) = adapter else {
        return Ok(());
    };
    for (l, t, _) in adapter.pairs() {
        let name = format!("model.layers.{l}.{}.{}.weight", t.module(), t.hub_name());
        let w = tensors
            .get(&name)
            .with_context(|| format!("the base model has no tensor `{name}` to merge into"))?;
        let delta = adapter.delta(l, t)?.expect("listed by pairs()");
        let merged = (w + delta)?;
        tensors.insert(name, merged);
    }
    Ok(())
}

fn save_tensors(tensors: &HashMap<String, Tensor>, out: &Path) -> Result<()> {
    let tmp = out.join(".model.safetensors.partial");
    candle_core::safetensors::save(tensors, &tmp)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, out.join("model.safetensors"))?;
    Ok(())
}

fn copy_hf_dir(dir: &Path, adapter: Option<&Adapter>, out: &Path) -> Result<()> {
    let weights = WeightStore::from_hf_dir(dir, &Device::Cpu)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for f in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ] {
        let src = dir.join(f);
        if src.exists() {
            let bytes =
                std::fs::read(&src).with_context(|| format!("cannot read {}", src.display()))?;
            write_atomic(&out.join(f), &bytes)?;
        }
    }
    let mut tensors = weights.all_dense()?;
    merge(&mut tensors, adapter)?;
    save_tensors(&tensors, out)
}

fn export_gguf_to_hf(gguf: &Path, adapter: Option<&Adapter>, out: &Path) -> Result<()> {
    let dev = Device::Cpu;
    let (content, mut file) = read_gguf_header(gguf)?;
    let mut cfg = LlamaConfig::from_gguf(&content, None)
        .with_context(|| format!("in GGUF {}", gguf.display()))?;
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        anyhow::bail!(
            "{}: exporting GGUFs with `rope_freqs.weight` is not supported",
            gguf.display()
        );
    }
    cfg.tie_word_embeddings = !content.tensor_infos.contains_key("output.weight");
    let tokenizer = TextTokenizer::from_gguf(&content, gguf)?;
    let template_src = content
        .metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .with_context(|| {
            format!(
                "{}: missing field `tokenizer.chat_template`",
                gguf.display()
            )
        })?;
    let tok = |id: Option<u32>| id.map(|i| tokenizer.token(i)).unwrap_or_default();
    let (bos, eos) = (
        tok(cfg.bos_token_id),
        tok(cfg.eos_token_ids.first().copied()),
    );
    // Parse it now so a broken template fails the export, not a later run.
    ChatTemplate::new(&template_src, "tokenizer.chat_template", &bos, &eos)?;
    let weights =
        WeightStore::from_gguf(gguf, &content, &mut file, &cfg, Default::default(), &dev)?;

    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    write_atomic(
        &out.join("config.json"),
        serde_json::to_string_pretty(&cfg.to_hf_json())?.as_bytes(),
    )?;
    let gen =
        serde_json::json!({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids});
    write_atomic(
        &out.join("generation_config.json"),
        serde_json::to_string_pretty(&gen)?.as_bytes(),
    )?;
    let tok_cfg = serde_json::json!({
        "bos_token": bos, "eos_token": eos, "pad_token": eos,
        "add_bos_token": false, "chat_template": template_src,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    write_atomic(
        &out.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tok_cfg)?.as_bytes(),
    )?;
    let tmp = out.join(".tokenizer.json.partial");
    tokenizer.save(&tmp)?;
    std::fs::rename(&tmp, out.join("tokenizer.json"))?;
    let mut tensors = weights.all_dense()?;
    merge(&mut tensors, adapter)?;
    save_tensors(&tensors, out)
}
