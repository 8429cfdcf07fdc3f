//! `introspect verify`: the golden checks on whatever device the binary runs on — tiny-llama3 against
//! PyTorch + transformers (f32 and bf16 logits, greedy ids with the KV cache, decode vs the full
//! forward) and against PEFT (an adapter's logits, one training step's loss, gradients and AdamW
//! update, with and without activation checkpointing). The test suite holds the same checks on the
//! CPU; this is what a GPU machine without a test harness runs (scripts/gpu-check).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::engine::{GenerationParams, Generator};
use crate::lora::peft;
use crate::model::{Llama, LlamaConfig, LoadSpec, WeightMode, WeightStore};
use crate::train::adamw::{self, AdamW, AdamWParams};
use crate::train::pass::{Pass, TrainBatch};

/// One measured figure beside its tolerance.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub name: String,
    pub measured: f64,
    pub tolerance: f64,
}

impl Check {
    fn new(name: impl Into<String>, measured: f64, tolerance: f64) -> Self {
        Self {
            name: name.into(),
            measured,
            tolerance,
        }
    }

    pub fn passed(&self) -> bool {
        self.measured <= self.tolerance
    }
}

/// The checks as a markdown table.
pub struct Report<'a>(pub &'a [Check]);

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "| check | measured | tolerance | |\n|---|---|---|---|")?;
        for c in self.0 {
            let mark = if c.passed() { "ok" } else { "FAILED" };
            writeln!(
                f,
                "| {} | {:.3e} | {:.1e} | {mark} |",
                c.name, c.measured, c.tolerance
            )?;
        }
        Ok(())
    }
}

fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max)
}

/// max |a − b| relative to b's largest magnitude (the golden README's convention).
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (values(a)?, values(b)?);
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12) as f64;
    Ok(max_abs_diff(&a, &b) / scale)
}

fn ids(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.flatten_all()?
        .to_dtype(DType::I64)?
        .to_vec1::<i64>()?
        .into_iter()
        .map(|i| i as u32)
        .collect())
}

/// A JSON array of token ids (an empty list for anything else).
fn json_ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect()
        })
        .unwrap_or_default()
}

fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("cannot read {}", path.display()))
}

fn tiny(dir: &Path, mode: WeightMode, device: &Device) -> Result<Llama> {
    let cfg = LlamaConfig::from_hf_file(&dir.join("config.json"))?;
    let w =
        WeightStore::from_hf_dir_as(dir, LoadSpec::from(mode), cfg.tie_word_embeddings, device)?;
    Llama::load(cfg, &w, device)
}

/// Every check on ../shared/golden/tiny-llama3 (`dir`), on `device`. Tolerances are the test suite's
/// on the CPU; elsewhere f32 sums run in another order (cuBLAS, Metal), so they are 10× wider.
pub fn tiny_llama3(dir: &Path, device: &Device) -> Result<Vec<Check>> {
    let wide = if device.is_cpu() { 1.0 } else { 10.0 };
    let exp = read_tensors(&dir.join("expected.safetensors"))?;
    let mut checks = vec![];
    let f32_model = tiny(dir, WeightMode::F32, device)?;
    let bf16_model = tiny(dir, WeightMode::Bf16, device)?;
    for case in ["a", "b"] {
        let input = ids(&exp[&format!("input_ids_{case}")])?;
        let want = values(&exp[&format!("logits_{case}")])?;
        let got = values(&f32_model.full_logits(&input)?)?;
        checks.push(Check::new(
            format!("f32 logits vs transformers, case {case} (max |Δ|)"),
            max_abs_diff(&got, &want),
            1e-4 * wide,
        ));
        let got = values(&bf16_model.full_logits(&input)?)?;
        checks.push(Check::new(
            format!("bf16 logits vs transformers f32, case {case} (max |Δ|)"),
            max_abs_diff(&got, &want),
            0.1,
        ));
    }

    // Greedy ids with the KV cache: the count of tokens that differ from transformers'.
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected-greedy.json"))?)?;
    let (prompt, want) = (json_ids(&g["prompt_ids"]), json_ids(&g["greedy_new_ids"]));
    let gen = Generator::for_ids(&f32_model, &[]);
    let params = GenerationParams {
        max_tokens: want.len(),
        ..Default::default()
    };
    let got = &gen.generate(std::slice::from_ref(&prompt), &params)?[0][0].token_ids;
    let differ =
        got.iter().zip(&want).filter(|(a, b)| a != b).count() + want.len().abs_diff(got.len());
    checks.push(Check::new(
        "greedy ids with the KV cache vs transformers (tokens differing)",
        differ as f64,
        0.0,
    ));

    // Decode with the cache vs the full forward: the last position's log-probabilities.
    let input = ids(&exp["input_ids_b"])?;
    checks.push(Check::new(
        "decode (KV cache) vs full forward, last log-probs (max |Δ|)",
        decode_vs_forward(&f32_model, &input)?,
        1e-4 * wide,
    ));

    // A PEFT adapter's logits.
    let adapter_dir = dir.join("peft-adapter");
    let adapter = peft::load(&adapter_dir, &f32_model.cfg, device)?;
    let pexp = read_tensors(&adapter_dir.join("expected.safetensors"))?;
    let input = ids(&pexp["input_ids_a"])?;
    let got = values(&f32_model.full_logits_with(&input, Some(&adapter))?)?;
    checks.push(Check::new(
        "PEFT adapter logits (max |Δ|)",
        max_abs_diff(&got, &values(&pexp["logits_a"])?),
        1e-4 * wide,
    ));

    checks.extend(training_step(dir, &f32_model, &bf16_model, device, wide)?);
    Ok(checks)
}

/// The sequence but its last token prefilled into a KV cache, then one decode step for the last token,
/// against the full forward's last position: max |Δ log-prob|.
fn decode_vs_forward(model: &Llama, input: &[u32]) -> Result<f64> {
    use crate::model::cache::KvCache;
    use crate::model::decode::{DecodeRows, Want};
    use crate::model::llama::{causal_mask, log_softmax, Batch};
    let dev = model.device();
    let n = input.len();
    let mut cache = KvCache::new(model.cfg.num_hidden_layers);
    let prefix = Tensor::new(&input[..n - 1], dev)?.unsqueeze(0)?;
    let positions = Tensor::arange(0f32, (n - 1) as f32, dev)?.unsqueeze(0)?;
    model.forward(
        &Batch {
            ids: &prefix,
            positions: &positions,
            mask: causal_mask(&[0], n - 1, 0, dev)?.as_ref(),
            adapters: crate::lora::RowAdapters::Same(None),
            hooks: None,
        },
        Some(&mut cache),
    )?;
    let step = model.next_token_logprobs(
        &DecodeRows {
            ids: &input[n - 1..],
            positions: &[(n - 1) as f32],
            pads: &[0],
            adapters: crate::lora::RowAdapters::Same(None),
            hooks: None,
        },
        &mut cache,
        Want::All,
    )?;
    let step = step.into_iter().next().context("no row")?.into_whole()?;
    let full = log_softmax(&model.full_logits(input)?.narrow(0, n - 1, 1)?)?;
    Ok(max_abs_diff(&step, &values(&full)?))
}

/// One optimizer step against PEFT's: loss, the worst gradient, the worst updated parameter, and the
/// checkpointed pass's gradients against the plain one's.
fn training_step(
    dir: &Path,
    model: &Llama,
    bf16_model: &Llama,
    device: &Device,
    wide: f64,
) -> Result<Vec<Check>> {
    let mut adapter = peft::load(&dir.join("peft-adapter"), &model.cfg, device)?;
    let step = read_tensors(&dir.join("train-step.safetensors"))?;
    let rows =
        |k: &str| -> Result<Vec<Vec<i64>>> { Ok(step[k].to_dtype(DType::I64)?.to_vec2::<i64>()?) };
    let input: Vec<Vec<u32>> = rows("input_ids")?
        .into_iter()
        .map(|r| r.into_iter().map(|i| i as u32).collect())
        .collect();
    let batch = TrainBatch::from_labels(&input, &rows("labels")?, device)?;
    let n = batch.num_targets() as f64;
    let pass = |llama, adapter, checkpoint| Pass {
        llama,
        adapter,
        dropout_seed: 0,
        checkpoint,
    };
    let (loss, grads) = pass(model, &adapter, false).forward_backward(&batch, n)?;
    let (_, grads_ck) = pass(model, &adapter, true).forward_backward(&batch, n)?;
    let (loss_bf16, _) = pass(bf16_model, &adapter, false).forward_backward(&batch, n)?;
    let want_loss = step["loss"]
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?[0] as f64;
    let mut checks = vec![Check::new(
        "training step: loss vs PEFT (relative)",
        ((loss / n) - want_loss).abs() / want_loss.abs().max(1.0),
        1e-5 * wide,
    )];
    // PEFT's mixed precision moves the loss too; the bound for the bf16 base is 2e-3.
    checks.push(Check::new(
        "training step: bf16 base's loss vs f32 base's (relative)",
        (loss_bf16 - loss).abs() / loss.abs().max(1e-12),
        2e-3,
    ));
    let grads = adamw::flatten(&adapter, grads);
    let grads_ck = adamw::flatten(&adapter, grads_ck);
    let names: Vec<String> = adapter.params().into_iter().map(|(k, _)| k).collect();
    let mut worst = 0f64;
    let mut worst_ck = 0f64;
    for ((name, g), c) in names.iter().zip(&grads).zip(&grads_ck) {
        worst = worst.max(rel_err(g, &step[&format!("grad.{name}")])?);
        worst_ck = worst_ck.max(max_abs_diff(&values(g)?, &values(c)?));
    }
    checks.push(Check::new(
        "training step: worst LoRA gradient vs PEFT (relative)",
        worst,
        1e-4 * wide,
    ));
    checks.push(Check::new(
        "checkpointed vs plain gradients (max |Δ|)",
        worst_ck,
        0.0,
    ));
    let mut opt = AdamW::new(
        AdamWParams {
            weight_decay: 0.01,
            ..Default::default()
        },
        &adapter,
    )?;
    opt.step(&mut adapter, &grads, 1e-3)?;
    let mut worst_after = 0f64;
    for (name, t) in adapter.params() {
        worst_after = worst_after.max(rel_err(&t, &step[&format!("after.{name}")])?);
    }
    checks.push(Check::new(
        "training step: worst parameter after AdamW vs PEFT (relative)",
        worst_after,
        1e-4 * wide,
    ));
    Ok(checks)
}

/// SmolLM2 (f32) against transformers on ../shared/golden/smollm2/cases.json, all cases in one batch:
/// the cases whose greedy ids differ, and the worst first-position top-10 log-probability.
pub fn smollm2(model: &crate::model::LoadedModel, cases: &Path) -> Result<Vec<Check>> {
    let text = std::fs::read_to_string(cases)
        .with_context(|| format!("cannot read {}", cases.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let cases = v["cases"].as_array().context("cases.json: no `cases`")?;
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| json_ids(&c["prompt_ids"])).collect();
    let params = GenerationParams {
        max_tokens: 32,
        top_logprobs: 10,
        ..Default::default()
    };
    let out = Generator::new(model).generate(&prompts, &params)?;
    let (mut differ, mut worst) = (0usize, 0f64);
    for (case, c) in cases.iter().zip(&out) {
        let want: Vec<u32> = json_ids(&case["greedy_new_ids"])
            .into_iter()
            .filter(|&i| i != 2)
            .collect();
        differ += usize::from(c[0].token_ids != want);
        let top = case["first_token_top10"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for (w, g) in top.iter().zip(&c[0].steps[0].top) {
            let d = match w["id"].as_u64() == Some(g.id as u64) {
                true => (g.logprob.0 as f64 - w["logprob"].as_f64().unwrap_or(0.0)).abs(),
                false => f64::INFINITY,
            };
            worst = worst.max(d);
        }
    }
    Ok(vec![
        Check::new(
            format!(
                "SmolLM2 f32: cases whose greedy ids differ (of {})",
                cases.len()
            ),
            differ as f64,
            0.0,
        ),
        Check::new(
            "SmolLM2 f32: first-position top-10 log-probs (max |Δ|)",
            worst,
            1e-3,
        ),
    ])
}
