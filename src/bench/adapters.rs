//! What mixing adapters in one batch costs (`introspect bench --only adapters`): decode tokens/s of 64
//! rows on the base model, and of 64 rows spread over 1, 2, 4 and 8 distinct LoRA adapters (rank 32, all
//! seven projections, row r on adapter r mod k). Each rep runs every variant once, in turn (interleaved,
//! so a drifting host moves them alike); medians are reported.

use std::sync::Arc;

use anyhow::Result;
use candle_core::Tensor;

use super::median;
use crate::engine::{Generator, RowSpec};
use crate::lora::{Adapter, LoraConfig};
use crate::model::LoadedModel;

pub const ROWS: usize = 64;
const TOKENS: usize = 32;
pub const DISTINCT: [usize; 4] = [1, 2, 4, 8];

#[derive(Debug, Clone, serde::Serialize)]
pub struct MixedFigure {
    pub distinct: usize,
    pub tokens_per_s: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterFigures {
    pub weights: String,
    pub rows: usize,
    pub base_tokens_per_s: f64,
    pub adapters: Vec<MixedFigure>,
}

/// A rank-32 adapter on every projection with A as PEFT initialises it and B drawn in ±0.01 (as after
/// some training: B = 0 would cost the same but leave the adapter without effect).
fn adapter(model: &LoadedModel, seed: u64) -> Result<Arc<Adapter>> {
    let config = LoraConfig::every_projection(32, 64.0);
    let mut a = Adapter::init(config, &model.llama.cfg, seed, model.llama.device())?;
    let params = a
        .params()
        .into_iter()
        .map(|(name, t)| {
            if name.contains("lora_B") {
                Ok(Tensor::rand(-0.01f32, 0.01, t.shape(), t.device())?)
            } else {
                Ok(t)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    a.set_params(params)?;
    Ok(Arc::new(a))
}

pub fn run(model: &LoadedModel, weights: &str, reps: usize) -> Result<AdapterFigures> {
    let vocab = model.llama.cfg.vocab_size as u32;
    let mut gen = Generator::for_ids(&model.llama, &[]);
    gen.max_batch_rows = ROWS;
    // 64 prompts of 24–39 tokens.
    let prompts: Vec<Vec<u32>> = (0..ROWS)
        .map(|r| {
            (0..24 + (r % 16) as u32)
                .map(|i| (i * 7919 + 13 * r as u32 + 1) % vocab)
                .collect()
        })
        .collect();
    let adapters: Vec<Arc<Adapter>> = (0..*DISTINCT.iter().max().expect("some"))
        .map(|k| adapter(model, k as u64))
        .collect::<Result<_>>()?;
    let spread = |k: usize| -> Vec<RowSpec> {
        (0..ROWS)
            .map(|r| RowSpec {
                adapter: Some(adapters[r % k].clone()),
                hooks: None,
            })
            .collect()
    };
    let mut variants = vec![vec![RowSpec::default(); ROWS]];
    variants.extend(DISTINCT.iter().map(|&k| spread(k)));
    let mut t: Vec<Vec<f64>> = vec![vec![]; variants.len()];
    for rep in 0..=reps {
        for (v, rows) in t.iter_mut().zip(&variants) {
            let rate = super::decode_rate(&gen, &prompts, rows, TOKENS)?;
            // The first round warms up.
            if rep > 0 {
                v.push(rate);
            }
        }
    }
    let mut rates = t.into_iter().map(median);
    let base = rates.next().expect("the base");
    Ok(AdapterFigures {
        weights: weights.into(),
        rows: ROWS,
        base_tokens_per_s: base,
        adapters: DISTINCT
            .iter()
            .zip(rates)
            .map(|(&distinct, tokens_per_s)| MixedFigure {
                distinct,
                tokens_per_s,
            })
            .collect(),
    })
}

pub fn markdown(rows: &[AdapterFigures]) -> String {
    let mut s = format!(
        "| weights | decode tok/s, {ROWS} rows: base / 1 / 2 / 4 / 8 adapters | ratio to one adapter: 2 / 4 / 8 | one adapter / base |\n|---|---|---|---|\n"
    );
    for f in rows {
        let one = f.adapters[0].tokens_per_s;
        let rates: Vec<String> = f
            .adapters
            .iter()
            .map(|a| format!("{:.0}", a.tokens_per_s))
            .collect();
        let ratios: Vec<String> = f.adapters[1..]
            .iter()
            .map(|a| format!("{:.3}", a.tokens_per_s / one))
            .collect();
        s += &format!(
            "| {} | {:.0} / {} | {} | {:.3} |\n",
            f.weights,
            f.base_tokens_per_s,
            rates.join(" / "),
            ratios.join(" / "),
            one / f.base_tokens_per_s,
        );
    }
    s
}
