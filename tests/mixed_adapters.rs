//! Rows with different LoRA adapters (and rows on the base model) prefill and decode in one batch: each
//! row's answer equals its adapter's run alone. On the CPU kernels that is the in-place decode step with
//! each adapter's rows gathered; with `INTROSPECT_KERNELS=off`, the tensor forward's gathered rank-r
//! products. SmolLM2's real weights and chat template, adapters of rank 32 on all seven projections.

mod common;

use std::sync::Arc;

use candle_core::Device;
use introspect::engine::{Completion, GenerationParams, Generator, RowSpec};
use introspect::lora::{Adapter, LoraConfig};
use introspect::model::LoadedModel;

fn adapter(model: &LoadedModel, seed: u64) -> Arc<Adapter> {
    let config = LoraConfig::every_projection(32, 64.0);
    let mut a = Adapter::init(config, &model.llama.cfg, seed, &Device::Cpu).unwrap();
    common::seed_lora_b(&mut a, seed + 100, 0.05);
    Arc::new(a)
}

fn prompts(model: &LoadedModel) -> Vec<Vec<u32>> {
    [
        "Name a colour.",
        "What is the capital of France? Answer in one word.",
        "Count from one to five.",
        "Write a haiku about the sea.",
        "Is a tomato a fruit?",
        "Say hello in Spanish.",
        "What is 7 times 8?",
        "Give me one word that rhymes with cat.",
    ]
    .iter()
    .map(|q| {
        let messages = vec![introspect::model::chat::Message::new("user", q)];
        model.render_chat(&messages).unwrap().0
    })
    .collect()
}

fn params() -> GenerationParams {
    GenerationParams {
        max_tokens: 12,
        top_logprobs: 3,
        ..Default::default()
    }
}

/// Each prompt's answer with the adapter `adapters[i]`: all rows in one batch.
fn mixed(
    model: &LoadedModel,
    prompts: &[Vec<u32>],
    adapters: &[Option<Arc<Adapter>>],
) -> Vec<Completion> {
    let rows: Vec<RowSpec> = adapters
        .iter()
        .map(|a| RowSpec {
            adapter: a.clone(),
            hooks: None,
        })
        .collect();
    let mut out = vec![None; prompts.len()];
    Generator::new(model)
        .generate_rows(prompts, &rows, &params(), &mut |i, mut c| {
            out[i] = c.pop();
            Ok(())
        })
        .unwrap();
    out.into_iter().map(Option::unwrap).collect()
}

/// The same answers, each adapter run alone: the whole batch with that adapter on every row (the same
/// prompts, so the same padding and row counts), each row's answer taken from its adapter's run.
fn alone(
    model: &LoadedModel,
    prompts: &[Vec<u32>],
    adapters: &[Option<Arc<Adapter>>],
) -> Vec<Completion> {
    let mut out: Vec<Option<Completion>> = vec![None; prompts.len()];
    for i in 0..prompts.len() {
        if out[i].is_some() {
            continue;
        }
        let mut gen = Generator::new(model);
        gen.adapter = adapters[i].clone();
        let all = gen.generate(prompts, &params()).unwrap();
        for (j, mut c) in all.into_iter().enumerate() {
            let same = match (&adapters[i], &adapters[j]) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            };
            if same {
                out[j] = c.pop();
            }
        }
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// Largest |Δ| between the chosen tokens' log-probs and between their top alternatives', up to where the
/// two answers part. They may part only at a near tie: there each run's choice is the other's runner-up
/// within `tolerance`.
fn logprob_diff(a: &Completion, b: &Completion, tolerance: f32) -> f32 {
    let mut worst = 0f32;
    for (j, (s, t)) in a.steps.iter().zip(&b.steps).enumerate() {
        if s.id != t.id {
            let other = t.top.iter().find(|x| x.id == s.id);
            let gap = other.map_or(f32::INFINITY, |x| (x.logprob.0 - s.logprob.0).abs());
            assert!(
                gap <= tolerance && (s.logprob.0 - t.logprob.0).abs() <= tolerance,
                "the answers part at step {j} without a near tie: {:?} vs {:?}",
                (s.id, s.logprob.0, &s.top),
                (t.id, t.logprob.0, &t.top)
            );
            break;
        }
        worst = worst.max((s.logprob.0 - t.logprob.0).abs());
        // Alternatives in a near tie may swap places: compare each by id.
        for x in &s.top {
            if let Some(y) = t.top.iter().find(|y| y.id == x.id) {
                worst = worst.max((x.logprob.0 - y.logprob.0).abs());
            }
        }
    }
    worst
}

fn check(model: &LoadedModel, tolerance: f32) {
    let prompts = prompts(model);
    let (a, b, c) = (adapter(model, 1), adapter(model, 2), adapter(model, 3));
    let adapters = vec![
        Some(a.clone()),
        Some(b.clone()),
        None,
        Some(c.clone()),
        Some(a),
        Some(b),
        None,
        Some(c),
    ];
    let together = mixed(model, &prompts, &adapters);
    let apart = alone(model, &prompts, &adapters);
    let base = alone(model, &prompts, &vec![None; prompts.len()]);
    let mut worst = 0f32;
    let mut changed = 0;
    let mut parted = 0;
    for (i, (t, s)) in together.iter().zip(&apart).enumerate() {
        let d = logprob_diff(t, s, tolerance);
        if adapters[i].is_none() {
            // Gathering other rows' adapters leaves a base row's numbers alone.
            assert_eq!(d, 0.0, "prompt {i} (base): bit-identical");
            assert_eq!(t.token_ids, s.token_ids);
        }
        if t.token_ids != s.token_ids {
            parted += 1;
        }
        worst = worst.max(d);
        if adapters[i].is_some() && t.token_ids != base[i].token_ids {
            changed += 1;
        }
    }
    eprintln!(
        "mixed vs alone: max |Δ log-prob| {worst:.2e}; {parted} of 8 answers part at a near tie; \
         {changed} of 6 adapted answers differ from the base's"
    );
    assert!(parted <= 2, "{parted} answers parted");
    assert!(worst <= tolerance, "{worst} > {tolerance}");
    // The adapters matter, so a row that ran the wrong one (or none) would show.
    assert!(
        changed >= 4,
        "only {changed} adapted answers differ from the base"
    );
}

// Base rows come out bit-identical. An adapter's rank-r products over its gathered rows (m = 2 here)
// round differently from the same products over the whole batch (m = 8): measured 1.7e-5 on the CPU
// kernels and 1.8e-5 on the generic path after 12 f32 steps (7.9e-6 at the first), the noise of any
// change of batch shape. With Q4_1 weights the activations are rounded to blocks before each product,
// which turns such differences into whole rounding steps: 2.2e-3 on the CPU kernels (16-bit blocks,
// greedy ids identical); on the generic path Candle rounds them to 8 bits and the same 1e-7 grows to
// 0.25 (measured), so there the bound is loose and answers may part at a near tie.

#[test]
fn mixed_adapters_equal_each_adapter_alone_quantized() {
    let model = common::smollm2_quantized();
    let tolerance = if model.llama.kernels.cpu() { 1e-2 } else { 0.4 };
    check(model, tolerance);
}

#[test]
fn mixed_adapters_equal_each_adapter_alone_f32() {
    check(common::smollm2_f32(), 5e-5);
}
