//! PEFT's on-disk adapter format: `adapter_config.json` + `adapter_model.safetensors` with keys such as
//! `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`, so adapters move freely between
//! introspect, PEFT, transformers and vLLM.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use super::{Adapter, LoraBase, LoraConfig, LoraPair, Target};
use crate::fsutil::write_atomic;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.model.layers.";

pub(crate) fn key(layer: usize, t: Target, which: &str) -> String {
    format!(
        "{PREFIX}{layer}.{}.{}.lora_{which}.weight",
        t.module(),
        t.hub_name()
    )
}

/// Writes the adapter in PEFT's layout; both files are replaced atomically.
pub fn save(adapter: &Adapter, dir: &Path, base_model: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tensors = HashMap::new();
    for (l, t, p) in adapter.pairs() {
        tensors.insert(key(l, t, "A"), p.a.contiguous()?);
        tensors.insert(key(l, t, "B"), p.b.contiguous()?);
    }
    let tmp = dir.join(format!(".{WEIGHTS_FILE}.partial"));
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join(WEIGHTS_FILE))
        .with_context(|| format!("cannot write {}", dir.join(WEIGHTS_FILE).display()))?;
    let c = &adapter.config;
    let cfg = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": c.r,
        "lora_alpha": c.alpha,
        "lora_dropout": c.dropout,
        "target_modules": c.targets.iter().map(|t| t.hub_name()).collect::<Vec<_>>(),
        "layers_to_transform": c.layers,
        "use_rslora": c.use_rslora,
        "use_dora": false,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    write_atomic(
        &dir.join(CONFIG_FILE),
        serde_json::to_string_pretty(&cfg)?.as_bytes(),
    )
}

/// Loads a PEFT LoRA adapter and checks it against the base model it is meant for.
pub fn load(dir: &Path, model: &impl LoraBase, device: &Device) -> Result<Adapter> {
    let cfg_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).with_context(|| {
        format!(
            "{}: cannot read; an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}",
            cfg_path.display()
        )
    })?;
    let cfg: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", cfg_path.display()))?;
    let config = parse_config(&cfg).with_context(|| format!("in {}", cfg_path.display()))?;

    let w_path = dir.join(WEIGHTS_FILE);
    let tensors = candle_core::safetensors::load(&w_path, device)
        .with_context(|| format!("{}: not a readable safetensors file", w_path.display()))?;
    let mut layers: Vec<[Option<LoraPair>; 7]> = vec![Default::default(); model.num_layers()];
    let mut halves: HashMap<(usize, Target), (Option<Tensor>, Option<Tensor>)> = HashMap::new();
    for (name, t) in tensors {
        let (layer, target, which) = parse_key(&name).with_context(|| {
            format!(
                "{}: tensor `{name}` is not a LoRA weight of a Llama projection \
                 (expected `{PREFIX}N.self_attn|mlp.<proj>.lora_A|lora_B.weight`); \
                 is this an adapter for another architecture?",
                w_path.display()
            )
        })?;
        if layer >= model.num_layers() {
            bail!(
                "{}: tensor `{name}` is for layer {layer}, but the base model has {} layers; \
                 the adapter was trained on another base model",
                w_path.display(),
                model.num_layers()
            );
        }
        let (out, inp) = model.projection_shape(target);
        let want = if which == 'A' {
            (config.r, inp)
        } else {
            (out, config.r)
        };
        if t.dims() != [want.0, want.1] {
            bail!(
                "{}: tensor `{name}` has shape {:?}, but r = {} and the base model's {} is {out}×{inp} \
                 need {:?}; the adapter was trained on another base model",
                w_path.display(),
                t.dims(),
                config.r,
                target.hub_name(),
                [want.0, want.1]
            );
        }
        let t = t.to_dtype(DType::F32)?;
        let slot = halves.entry((layer, target)).or_default();
        if which == 'A' {
            slot.0 = Some(t)
        } else {
            slot.1 = Some(t)
        }
    }
    if halves.is_empty() {
        bail!("{}: holds no LoRA weights", w_path.display());
    }
    for ((layer, target), pair) in halves {
        match pair {
            (Some(a), Some(b)) => layers[layer][target.index()] = Some(LoraPair { a, b }),
            (a, _) => bail!(
                "{}: `{}` has no matching `{}`",
                w_path.display(),
                key(layer, target, if a.is_some() { "A" } else { "B" }),
                key(layer, target, if a.is_some() { "B" } else { "A" })
            ),
        }
    }
    Ok(Adapter {
        scale: config.scale(),
        config,
        layers,
    })
}

fn parse_key(name: &str) -> Option<(usize, Target, char)> {
    let rest = name.strip_prefix(PREFIX)?;
    let (layer, rest) = rest.split_once('.')?;
    let mut parts = rest.split('.');
    let (module, proj, lora, weight) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let target = Target::from_hub_name(proj)?;
    if parts.next().is_some() || weight != "weight" || module != target.module() {
        return None;
    }
    let which = match lora {
        "lora_A" => 'A',
        "lora_B" => 'B',
        _ => return None,
    };
    Some((layer.parse().ok()?, target, which))
}

fn parse_config(cfg: &Value) -> Result<LoraConfig> {
    let field = |k: &str| cfg.get(k).filter(|v| !v.is_null());
    match field("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        other => bail!("field `peft_type`: {other:?} is not supported; only LORA adapters are"),
    }
    let unsupported = |k: &str, ok: &dyn Fn(&Value) -> bool| -> Result<()> {
        match field(k) {
            Some(v) if !ok(v) => bail!("field `{k}`: {v} is not supported"),
            _ => Ok(()),
        }
    };
    unsupported("use_dora", &|v| v == &Value::Bool(false))?;
    unsupported("fan_in_fan_out", &|v| v == &Value::Bool(false))?;
    unsupported("bias", &|v| v == "none")?;
    unsupported("modules_to_save", &|v| {
        v.as_array().is_some_and(|a| a.is_empty())
    })?;
    unsupported("rank_pattern", &|v| {
        v.as_object().is_some_and(|o| o.is_empty())
    })?;
    unsupported("alpha_pattern", &|v| {
        v.as_object().is_some_and(|o| o.is_empty())
    })?;
    let r = field("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .context("field `r`: missing or not a positive integer")? as usize;
    let alpha = field("lora_alpha")
        .and_then(Value::as_f64)
        .context("field `lora_alpha`: missing or not a number")?;
    let dropout = field("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
    let targets = match field("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .filter_map(Target::from_hub_name)
            .collect(),
        _ => Target::ALL.to_vec(),
    };
    let layers = match field("layers_to_transform") {
        Some(Value::Number(n)) => Some(vec![n.as_u64().unwrap_or(0) as usize]),
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|v| v.as_u64().map(|x| x as usize))
                .collect::<Option<Vec<_>>>()
                .context("field `layers_to_transform`: expected integers")?,
        ),
        _ => None,
    };
    Ok(LoraConfig {
        r,
        alpha,
        dropout,
        targets,
        layers,
        use_rslora: field("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    })
}
