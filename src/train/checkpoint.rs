//! Checkpoints: the adapter (PEFT files), the optimizer's moments and the trainer's position, written to
//! a temporary directory and renamed into place, so a kill at any moment leaves the last whole one.
//! Data order and dropout masks derive from (seed, step), so the step is all the RNG state there is.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::adamw::AdamW;
use crate::fsutil::write_atomic;
use crate::lora::{peft, Adapter};
use crate::model::LlamaConfig;

pub const DIR: &str = "checkpoints";
const STATE: &str = "state.json";
const OPTIMIZER: &str = "optimizer.safetensors";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer updates done.
    pub step: usize,
    pub total_steps: usize,
    /// The settings and data the run started with; a resume must match them.
    pub fingerprint: serde_json::Value,
}

pub struct Checkpoint {
    pub adapter: Adapter,
    pub optimizer: AdamW,
    pub state: TrainerState,
}

fn step_dir(out: &Path, step: usize) -> PathBuf {
    out.join(DIR).join(format!("step-{step:06}"))
}

pub fn save(
    out: &Path,
    adapter: &Adapter,
    opt: &AdamW,
    state: &TrainerState,
    base_model: &str,
    keep: usize,
) -> Result<()> {
    let root = out.join(DIR);
    let tmp = root.join(format!(".partial-step-{:06}", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    peft::save(adapter, &tmp, base_model)?;
    let mut moments = HashMap::new();
    for (i, (name, _)) in adapter.params().into_iter().enumerate() {
        moments.insert(format!("exp_avg.{name}"), opt.exp_avg[i].clone());
        moments.insert(format!("exp_avg_sq.{name}"), opt.exp_avg_sq[i].clone());
    }
    let opt_path = tmp.join(OPTIMIZER);
    candle_core::safetensors::save(&moments, &opt_path)?;
    std::fs::File::open(&opt_path)?.sync_all()?;
    let mut state_json = serde_json::to_value(state)?;
    state_json["optimizer_step"] = opt.step.into();
    state_json["adamw"] = serde_json::to_value(opt.params)?;
    write_atomic(
        &tmp.join(STATE),
        serde_json::to_string_pretty(&state_json)?.as_bytes(),
    )?;
    let dest = step_dir(out, state.step);
    if dest.exists() {
        std::fs::remove_dir_all(&dest)?;
    }
    std::fs::rename(&tmp, &dest).with_context(|| format!("cannot write {}", dest.display()))?;
    std::fs::File::open(&root)?.sync_all()?;
    // Older checkpoints go only once the new one is in place.
    let mut all = list(out)?;
    all.sort();
    while all.len() > keep.max(1) {
        std::fs::remove_dir_all(step_dir(out, all.remove(0)))?;
    }
    Ok(())
}

/// Steps of the complete checkpoints under `out`.
pub fn list(out: &Path) -> Result<Vec<usize>> {
    let root = out.join(DIR);
    if !root.exists() {
        return Ok(vec![]);
    }
    let mut steps = vec![];
    for e in std::fs::read_dir(&root)? {
        let name = e?.file_name().to_string_lossy().to_string();
        if let Some(s) = name.strip_prefix("step-").and_then(|s| s.parse().ok()) {
            steps.push(s);
        }
    }
    steps.sort();
    Ok(steps)
}

/// The newest complete checkpoint, if any.
pub fn load_latest(out: &Path, model: &LlamaConfig, device: &Device) -> Result<Option<Checkpoint>> {
    let Some(&step) = list(out)?.last() else {
        return Ok(None);
    };
    let dir = step_dir(out, step);
    let adapter = peft::load(&dir, model, device)?;
    let state_path = dir.join(STATE);
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("cannot read {}", state_path.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", state_path.display()))?;
    let state: TrainerState = serde_json::from_value(json.clone())
        .with_context(|| format!("{}: not a trainer state", state_path.display()))?;
    let params = serde_json::from_value(json["adamw"].clone())
        .with_context(|| format!("{}: field `adamw`", state_path.display()))?;
    let mut optimizer = AdamW::new(params, &adapter)?;
    optimizer.step = json["optimizer_step"]
        .as_u64()
        .with_context(|| format!("{}: field `optimizer_step`", state_path.display()))?;
    let opt_path = dir.join(OPTIMIZER);
    let moments = candle_core::safetensors::load(&opt_path, device)
        .with_context(|| format!("{}: not readable", opt_path.display()))?;
    let get = |k: String| -> Result<Tensor> {
        match moments.get(&k) {
            Some(t) => Ok(t.clone()),
            None => bail!("{}: missing tensor `{k}`", opt_path.display()),
        }
    };
    for (i, (name, _)) in adapter.params().into_iter().enumerate() {
        optimizer.exp_avg[i] = get(format!("exp_avg.{name}"))?;
        optimizer.exp_avg_sq[i] = get(format!("exp_avg_sq.{name}"))?;
    }
    Ok(Some(Checkpoint {
        adapter,
        optimizer,
        state,
    }))
}
