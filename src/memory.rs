//! The memory plan: what a run will hold on its device (weights, KV cache, training activations, the
//! optimizer), what the device has free, and the choices that make a run fit (activation checkpointing,
//! micro-batch rows, generation rows). All sizes are computed from the model's shapes, as
//! PyTorch users do by hand; the figures are printed so a refusal can be checked.

use std::fmt;

use anyhow::{bail, Result};
use candle_core::Device;

use crate::lora::{LoraBase, Target};
use crate::model::{LlamaConfig, LoadSpec, QuantType, WeightMode};

const GIB: f64 = (1u64 << 30) as f64;

/// A GPU's (free, total) bytes: CUDA's `cuMemGetInfo`. None elsewhere (Metal's working-set size is not
/// exposed through Candle).
pub fn device_memory(device: &Device) -> Option<(u64, u64)> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => d
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, total)| (free as u64, total as u64)),
        _ => None,
    }
}

/// Bytes free on `device`: the GPU's free memory, the CPU's MemAvailable; None where it cannot be
/// read (Metal).
pub fn free_bytes(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
            Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
        }),
        _ => device_memory(device).map(|(free, _)| free),
    }
}

/// Bytes a weight takes in `mode` (projections and head; `embedding` for the token table, which the
/// quantized mode keeps as bf16 rows).
fn bytes_per_weight(spec: LoadSpec, embedding: bool) -> f64 {
    match (spec.mode, embedding) {
        (WeightMode::F32, _) => 4.0,
        (WeightMode::Bf16, _) | (WeightMode::Quantized, true) => 2.0,
        (WeightMode::Quantized, false) => match spec.quantize {
            QuantType::Q8_0 => 34.0 / 32.0,
            QuantType::Q4_1 => 20.0 / 32.0,
            QuantType::Q4K => 144.0 / 256.0,
        },
    }
}

/// The weights as loaded in `spec` (a GGUF's own blocks are counted as `spec.quantize`'s size: an
/// estimate for quantized GGUF files, exact for every dense mode).
pub fn weight_bytes(cfg: &LlamaConfig, spec: LoadSpec) -> u64 {
    let h = cfg.hidden_size;
    let per_layer: usize = Target::ALL
        .iter()
        .map(|&t| {
            let (out, inp) = cfg.projection_shape(t);
            out * inp
        })
        .sum();
    let projections = (per_layer * cfg.num_hidden_layers) as f64;
    let table = (cfg.vocab_size * h) as f64;
    // A quantized tied model keeps a quantized copy of the table as its head.
    let head = match (cfg.tie_word_embeddings, spec.mode) {
        (true, WeightMode::Quantized) | (false, _) => table,
        (true, _) => 0.0,
    };
    let norms = ((2 * cfg.num_hidden_layers + 1) * h * 4) as f64;
    let w = bytes_per_weight(spec, false);
    ((projections + head) * w + table * bytes_per_weight(spec, true) + norms) as u64
}

/// A KV cache for `rows` sequences of `positions` tokens, `elem` bytes a value (f32 4, bf16 2).
pub fn kv_cache_bytes(cfg: &LlamaConfig, rows: usize, positions: usize, elem: usize) -> u64 {
    let per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem;
    (rows * positions * per_token) as u64
}

/// The training pass's memory for one micro-batch of `rows` × `t` tokens: what the blocks keep for
/// the backward (all of it, or with checkpointing only each block's input plus one block's worth),
/// and the largest transient of one block's backward.
pub fn activation_bytes(
    cfg: &LlamaConfig,
    rows: usize,
    t: usize,
    rank: usize,
    targets: &[Target],
    checkpoint: bool,
) -> u64 {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (
        cfg.projection_shape(Target::Q).0,
        cfg.projection_shape(Target::K).0,
    );
    let n = (rows * t) as u64;
    // Per token, as BlockSaved holds it: x, x1, the two normed inputs the adapters read, q, k, v, the
    // attention output, gate, up and their product, and each adapter's z; plus the probabilities.
    let per_token = (4 * h + 2 * q + 2 * kv + 3 * i + targets.len() * rank) as u64;
    let probs = (rows * cfg.num_attention_heads * t * t) as u64;
    let block = (n * per_token + probs) * 4;
    // One block's backward makes gradients of about the same size as what it keeps.
    let transient = block;
    let layers = cfg.num_hidden_layers as u64;
    if checkpoint {
        layers * n * h as u64 * 4 + block + transient
    } else {
        layers * block + transient
    }
}

/// LoRA A and B, their accumulated gradient, this step's gradient and AdamW's two moments, all f32.
pub fn optimizer_bytes(cfg: &LlamaConfig, rank: usize, targets: &[Target]) -> u64 {
    let per_layer: usize = targets
        .iter()
        .map(|&t| {
            let (out, inp) = cfg.projection_shape(t);
            rank * (inp + out)
        })
        .sum();
    (per_layer * cfg.num_hidden_layers * 5 * 4) as u64
}

/// The loss's logits, log-probabilities and their gradient for `targets` positions, f32.
pub fn head_bytes(cfg: &LlamaConfig, targets: usize) -> u64 {
    (targets * cfg.vocab_size * 4 * 3) as u64
}

/// A plan: named amounts beside what the device has free.
#[derive(Debug, Clone, Default)]
pub struct MemoryPlan {
    pub items: Vec<(String, u64)>,
    /// Free on the device when the plan was made (None: unknown, the plan is not checked).
    pub free: Option<u64>,
    /// What the free figure already excludes (the weights, once loaded).
    pub resident: u64,
}

impl MemoryPlan {
    pub fn needed(&self) -> u64 {
        self.items.iter().map(|(_, b)| b).sum::<u64>() - self.resident
    }

    /// Whether it fits in 90% of the free memory (the rest for allocator slack and the CUDA context).
    pub fn fits(&self) -> bool {
        self.free
            .is_none_or(|f| self.needed() as f64 <= 0.9 * f as f64)
    }

    /// An error with the plan's numbers, when it does not fit.
    pub fn check(&self, what: &str) -> Result<()> {
        if !self.fits() {
            bail!(
                "{what} does not fit: it needs {:.2} GiB and the device has {:.2} GiB free\n{self}",
                self.needed() as f64 / GIB,
                self.free.unwrap_or(0) as f64 / GIB
            );
        }
        Ok(())
    }
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, bytes) in &self.items {
            writeln!(f, "  {name:<52} {:>8.2} GiB", *bytes as f64 / GIB)?;
        }
        let total: u64 = self.items.iter().map(|(_, b)| b).sum();
        write!(f, "  {:<52} {:>8.2} GiB", "total", total as f64 / GIB)?;
        match self.free {
            Some(free) if self.resident > 0 => write!(
                f,
                "; free beside the loaded weights {:.2} GiB",
                free as f64 / GIB
            ),
            Some(free) => write!(f, "; free {:.2} GiB", free as f64 / GIB),
            None => write!(f, "; free memory not checked"),
        }
    }
}

/// The training choices that fit: checkpointing and micro-batch rows.
#[derive(Debug, Clone)]
pub struct TrainFit {
    pub checkpoint: bool,
    pub micro_batch: usize,
    pub plan: MemoryPlan,
}

/// Whether to checkpoint activations.
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
pub enum Checkpointing {
    /// On when the plan does not fit without it.
    #[default]
    Auto,
    On,
    Off,
}

impl Checkpointing {
    pub fn is_auto(&self) -> bool {
        *self == Checkpointing::Auto
    }
}

/// The training settings that fit `free` beside the loaded weights: the configured micro-batch
/// without checkpointing if it fits (unless it is forced on), else with it, else the micro-batch
/// halved until it fits. An error with the plan when one row does not fit either.
#[allow(clippy::too_many_arguments)]
pub fn fit_training(
    cfg: &LlamaConfig,
    spec: LoadSpec,
    free: Option<u64>,
    micro_batch: usize,
    longest_row: usize,
    targets_per_row: usize,
    rank: usize,
    lora_targets: &[Target],
    checkpointing: Checkpointing,
) -> Result<TrainFit> {
    let weights = weight_bytes(cfg, spec);
    let plan = |rows: usize, checkpoint: bool| MemoryPlan {
        items: vec![
            (format!("weights ({})", spec_name(spec)), weights),
            (
                format!(
                    "activations: {rows} rows × {longest_row} tokens{}",
                    if checkpoint { ", checkpointed" } else { "" }
                ),
                activation_bytes(cfg, rows, longest_row, rank, lora_targets, checkpoint),
            ),
            (
                format!(
                    "loss: {} target positions × vocabulary",
                    rows * targets_per_row
                ),
                head_bytes(cfg, rows * targets_per_row),
            ),
            (
                format!("LoRA r{rank} + gradients + AdamW moments"),
                optimizer_bytes(cfg, rank, lora_targets),
            ),
        ],
        free,
        resident: weights,
    };
    let choices: &[bool] = match checkpointing {
        Checkpointing::Auto => &[false, true],
        Checkpointing::On => &[true],
        Checkpointing::Off => &[false],
    };
    let mut rows = micro_batch.max(1);
    loop {
        for &checkpoint in choices {
            let p = plan(rows, checkpoint);
            if p.fits() {
                return Ok(TrainFit {
                    checkpoint,
                    micro_batch: rows,
                    plan: p,
                });
            }
        }
        if rows == 1 {
            let p = plan(1, *choices.last().expect("a choice"));
            p.check("training, even at one row per micro-batch,")?;
            unreachable!("check fails when fits does");
        }
        rows = rows.div_ceil(2);
    }
}

/// Generation rows that fit `free`: at most `wanted`, each with a KV cache of `positions` (`elem`
/// bytes a value) and a vocabulary of log-probabilities per step.
pub fn generation_rows(
    cfg: &LlamaConfig,
    free: Option<u64>,
    positions: usize,
    elem: usize,
    wanted: usize,
) -> usize {
    let Some(free) = free else { return wanted };
    let per_row = kv_cache_bytes(cfg, 1, positions, elem) + (cfg.vocab_size * 4 * 3) as u64;
    let fit = (0.8 * free as f64 / per_row as f64) as usize;
    wanted.min(fit.max(1))
}

pub fn spec_name(spec: LoadSpec) -> String {
    match spec.mode {
        WeightMode::F32 => "f32".into(),
        WeightMode::Bf16 => "bf16".into(),
        WeightMode::Quantized => format!("quantized {}", spec.quantize.name()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama_8b() -> LlamaConfig {
        let json = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
            "tie_word_embeddings": false
        });
        LlamaConfig::from_hf_json(&json).unwrap()
    }

    #[test]
    fn llama_8b_weights_match_its_published_size() {
        // Llama-3.1-8B has 8.03 B parameters: 16.06 GB in bf16 (its safetensors shards' total).
        let b = weight_bytes(&llama_8b(), WeightMode::Bf16.into());
        assert!((b as f64 / 1e9 - 16.06).abs() < 0.02, "{b}");
        let f = weight_bytes(&llama_8b(), WeightMode::F32.into());
        assert!((f as f64 / b as f64 - 2.0).abs() < 1e-3);
    }

    #[test]
    fn a_paper_step_needs_checkpointing_on_24_gib_and_not_on_80() {
        let cfg = llama_8b();
        let fit = |free_gib: f64| {
            fit_training(
                &cfg,
                WeightMode::Bf16.into(),
                Some((free_gib * GIB) as u64),
                16,
                200,
                8,
                32,
                &Target::ALL,
                Checkpointing::Auto,
            )
        };
        // Beside 15 GiB of bf16 weights and the CUDA context a 24 GiB card has ~8.5 GiB left; an
        // 80 GB card (74.5 GiB) ~59.
        let small = fit(8.5).unwrap();
        assert!(small.checkpoint, "{}", small.plan);
        let large = fit(59.0).unwrap();
        assert!(
            !large.checkpoint && large.micro_batch == 16,
            "{}",
            large.plan
        );
        let err = fit(0.1).unwrap_err().to_string();
        assert!(
            err.contains("does not fit") && err.contains("GiB free"),
            "{err}"
        );
    }
}
