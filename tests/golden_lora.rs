//! LoRA against PEFT on ../shared/golden/tiny-llama3: a PEFT adapter's logits, and one training step's
//! loss, gradients and AdamW update.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use introspect::lora::{peft, Adapter};
use introspect::model::{Llama, LlamaConfig, WeightStore};
use introspect::train::adamw::{self, AdamW, AdamWParams};
use introspect::train::pass::{Pass, TrainBatch};

fn tiny() -> Llama {
    let dir = common::golden().join("tiny-llama3");
    let cfg = LlamaConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let w = WeightStore::from_hf_dir(&dir, &Device::Cpu).unwrap();
    Llama::load(cfg, &w, &Device::Cpu).unwrap()
}

fn golden_adapter(m: &Llama) -> Adapter {
    peft::load(
        &common::golden().join("tiny-llama3/peft-adapter"),
        &m.cfg,
        &Device::Cpu,
    )
    .unwrap()
}

fn load(path: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(common::golden().join(path), &Device::Cpu).unwrap()
}

fn rows_i64(t: &Tensor) -> Vec<Vec<i64>> {
    t.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap()
}

fn vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// max |a-b| / max(max |b|, tiny): relative to the tensor's scale, as the golden README's tolerances are.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (vec(a), vec(b));
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    common::max_abs_diff(&a, &b) / scale
}

#[test]
fn peft_adapter_reproduces_its_logits() {
    let m = tiny();
    let adapter = golden_adapter(&m);
    assert_eq!(adapter.config.r, 8);
    assert_eq!(adapter.scale, 2.0);
    assert_eq!(adapter.pairs().count(), 2 * 7);
    let exp = load("tiny-llama3/peft-adapter/expected.safetensors");
    let ids: Vec<u32> = rows_i64(&exp["input_ids_a"].unsqueeze(0).unwrap())[0]
        .iter()
        .map(|&i| i as u32)
        .collect();
    let got = m.full_logits_with(&ids, Some(&adapter)).unwrap();
    let diff = common::max_abs_diff(&vec(&got), &vec(&exp["logits_a"]));
    eprintln!("adapter logits max diff {diff}");
    assert!(diff < 1e-4, "logits differ from PEFT by {diff}");
    // The adapter must matter: the base model's logits are far from these.
    let base = m.full_logits(&ids).unwrap();
    assert!(common::max_abs_diff(&vec(&base), &vec(&exp["logits_a"])) > 1e-2);
}

#[test]
fn one_training_step_matches_peft() {
    let m = tiny();
    let mut adapter = golden_adapter(&m);
    let step = load("tiny-llama3/train-step.safetensors");
    for (name, t) in adapter.params() {
        assert_eq!(vec(&t), vec(&step[&format!("before.{name}")]), "{name}");
    }
    let ids: Vec<Vec<u32>> = rows_i64(&step["input_ids"])
        .into_iter()
        .map(|r| r.into_iter().map(|i| i as u32).collect())
        .collect();
    let batch = TrainBatch::from_labels(&ids, &rows_i64(&step["labels"]), &Device::Cpu).unwrap();
    let n = batch.num_targets() as f64;
    let pass = |checkpoint| Pass {
        llama: &m,
        adapter: &adapter,
        dropout_seed: 0,
        checkpoint,
    };
    let (loss_sum, grads) = pass(false).forward_backward(&batch, n).unwrap();
    // Activation checkpointing runs each block's forward again before its backward: the same ops on
    // the same inputs, so the same loss and gradients to the bit.
    let (loss_ck, grads_ck) = pass(true).forward_backward(&batch, n).unwrap();
    assert_eq!(loss_ck, loss_sum);
    let (plain, ck) = (
        adamw::flatten(&adapter, grads.clone()),
        adamw::flatten(&adapter, grads_ck),
    );
    for (a, b) in plain.iter().zip(&ck) {
        assert_eq!(vec(a), vec(b), "checkpointed gradients differ");
    }
    let want_loss = step["loss"]
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0];
    assert!(
        ((loss_sum / n) - want_loss).abs() < 1e-5 * want_loss.abs().max(1.0),
        "loss {} vs PEFT {want_loss}",
        loss_sum / n
    );

    let grads = adamw::flatten(&adapter, grads);
    let names: Vec<String> = adapter.params().into_iter().map(|(k, _)| k).collect();
    assert_eq!(grads.len(), 28);
    let mut worst = (0f32, String::new());
    for (name, g) in names.iter().zip(&grads) {
        let e = rel_err(g, &step[&format!("grad.{name}")]);
        if e > worst.0 {
            worst = (e, name.clone());
        }
    }
    eprintln!(
        "loss {} vs {want_loss}; worst gradient error {} ({})",
        loss_sum / n,
        worst.0,
        worst.1
    );
    assert!(
        worst.0 < 1e-4,
        "gradient of {} off by {} (relative)",
        worst.1,
        worst.0
    );

    let mut opt = AdamW::new(
        AdamWParams {
            weight_decay: 0.01,
            ..Default::default()
        },
        &adapter,
    )
    .unwrap();
    opt.step(&mut adapter, &grads, 1e-3).unwrap();
    let mut worst_after = 0f32;
    for (name, t) in adapter.params() {
        let e = rel_err(&t, &step[&format!("after.{name}")]);
        worst_after = worst_after.max(e);
        assert!(e < 1e-4, "updated {name} off by {e} (relative)");
    }
    eprintln!("worst updated-parameter error {worst_after}");
}
