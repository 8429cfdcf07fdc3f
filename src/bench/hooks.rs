//! What the hook points cost (`introspect bench --only hooks`): decode tokens/s of a 16-row batch without
//! hooks, with one `add` at one layer on every row, and with half the rows steered; prefill tokens/s of a
//! 512-token prompt without hooks and capturing one hook's last position. Each rep runs every variant once,
//! in turn (interleaved, so a drifting host moves them alike); medians are reported.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use candle_core::Tensor;

use super::median;
use crate::engine::{Generator, RowSpec};
use crate::model::hooks::{
    CaptureSpec, HookPoint, Intervention, Op, Positions, RowHooks, ScaleMode, StepHooks,
};
use crate::model::llama::{causal_mask, last_position, Batch};
use crate::model::LoadedModel;

#[derive(Debug, Clone, serde::Serialize)]
pub struct HookFigures {
    pub weights: String,
    /// Decode tokens/s (16 rows × 32 tokens after their prompts).
    pub decode_plain: f64,
    pub decode_one_add: f64,
    pub decode_half_steered: f64,
    /// Prefill tokens/s of 512 tokens.
    pub prefill_plain: f64,
    pub prefill_capture_last: f64,
}

const ROWS: usize = 16;
const TOKENS: usize = 32;

/// Decode tokens/s of `prompts`, each with its row's hooks.
fn decode_rate(
    gen: &Generator,
    prompts: &[Vec<u32>],
    hooks: &[Option<Arc<RowHooks>>],
) -> Result<f64> {
    let rows: Vec<RowSpec> = (0..prompts.len())
        .map(|i| RowSpec {
            adapter: None,
            hooks: hooks.get(i).cloned().flatten(),
        })
        .collect();
    super::decode_rate(gen, prompts, &rows, TOKENS)
}

fn prefill_rate(model: &LoadedModel, ids: &Tensor, hooks: Option<&RowHooks>) -> Result<f64> {
    let llama = &model.llama;
    let (dev, n) = (llama.device(), ids.dim(1)?);
    let positions = Tensor::arange(0f32, n as f32, dev)?.unsqueeze(0)?;
    let mask = causal_mask(&[0], n, 0, dev)?;
    let step = hooks.map(|h| StepHooks::new(vec![Some(h)], vec![(0..n).map(Some).collect()]));
    let t = Instant::now();
    let h = llama.forward(
        &Batch {
            ids,
            positions: &positions,
            mask: mask.as_ref(),
            adapters: crate::lora::RowAdapters::Same(None),
            hooks: step.as_ref(),
        },
        None,
    )?;
    llama.logits(&last_position(&h)?)?.to_vec2::<f32>()?;
    let rate = n as f64 / t.elapsed().as_secs_f64();
    if let Some(step) = step {
        assert_eq!(step.into_captured()[0].len(), 1, "one position read");
    }
    Ok(rate)
}

pub fn run(model: &LoadedModel, weights: &str, reps: usize) -> Result<HookFigures> {
    let cfg = &model.llama.cfg;
    let (layers, d, vocab) = (
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.vocab_size as u32,
    );
    let gen = Generator::for_ids(&model.llama, &[]);
    // 16 prompts of 24–39 tokens.
    let prompts: Vec<Vec<u32>> = (0..ROWS)
        .map(|r| {
            (0..24 + r as u32)
                .map(|i| (i * 7919 + 13 * r as u32 + 1) % vocab)
                .collect()
        })
        .collect();
    let layer = layers / 2;
    let vector: Vec<f32> = (0..d)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
        .collect();
    let steer = Arc::new(RowHooks {
        interventions: vec![Intervention {
            point: HookPoint::ResidPost(layer),
            op: Op::add(&vector, 4.0, ScaleMode::Unit)?,
            positions: Positions(vec![(0, usize::MAX)]),
        }],
        captures: vec![],
    });
    let every: Vec<_> = (0..ROWS).map(|_| Some(steer.clone())).collect();
    let half: Vec<_> = (0..ROWS)
        .map(|r| (r % 2 == 0).then(|| steer.clone()))
        .collect();
    let ids: Vec<u32> = (0..512u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let ids = Tensor::from_vec(ids, (1, 512), model.llama.device())?;
    let capture = RowHooks {
        interventions: vec![],
        captures: vec![CaptureSpec {
            point: HookPoint::ResidPost(layer),
            positions: Positions(vec![(511, 512)]),
        }],
    };
    let mut t: [Vec<f64>; 5] = Default::default();
    for rep in 0..=reps {
        let figures = [
            decode_rate(&gen, &prompts, &[])?,
            decode_rate(&gen, &prompts, &every)?,
            decode_rate(&gen, &prompts, &half)?,
            prefill_rate(model, &ids, None)?,
            prefill_rate(model, &ids, Some(&capture))?,
        ];
        // The first round warms up.
        if rep > 0 {
            for (v, f) in t.iter_mut().zip(figures) {
                v.push(f);
            }
        }
    }
    let [a, b, c, p, q] = t.map(median);
    Ok(HookFigures {
        weights: weights.into(),
        decode_plain: a,
        decode_one_add: b,
        decode_half_steered: c,
        prefill_plain: p,
        prefill_capture_last: q,
    })
}

pub fn markdown(rows: &[HookFigures]) -> String {
    let mut s = String::from(
        "| weights | decode tok/s: no hooks / one add, every row / half the rows | ratio to no hooks | prefill 512 tok/s: no hooks / one capture | ratio |\n|---|---|---|---|---|\n",
    );
    for f in rows {
        s += &format!(
            "| {} | {:.0} / {:.0} / {:.0} | {:.3} / {:.3} | {:.0} / {:.0} | {:.3} |\n",
            f.weights,
            f.decode_plain,
            f.decode_one_add,
            f.decode_half_steered,
            f.decode_one_add / f.decode_plain,
            f.decode_half_steered / f.decode_plain,
            f.prefill_plain,
            f.prefill_capture_last,
            f.prefill_capture_last / f.prefill_plain,
        );
    }
    s
}
