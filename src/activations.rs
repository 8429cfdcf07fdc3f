//! Reading the residual stream of chats: each prompt's captures at the requested hook points and positions
//! (after any interventions), gathered per hook point, written as one safetensors file whose metadata say
//! what was read — `introspect activations`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use safetensors::tensor::{Dtype, TensorView};

use crate::engine::{GenerationParams, Generator};
use crate::model::chat::RenderedChat;
use crate::model::hooks::{CaptureSpec, HookPoint, PositionSpec, RowHooks};
use crate::model::intervention::{row_interventions, Prepared};

/// What to read, and what to do to the stream before reading it.
pub struct Request {
    pub points: Vec<HookPoint>,
    pub positions: PositionSpec,
    pub interventions: Vec<Prepared>,
    /// Tokens to generate (greedy) after the prompt; their positions are read too where `positions`
    /// includes them. 0: the prompt alone.
    pub max_tokens: usize,
}

/// One prompt's reads.
pub struct Record {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    /// The positions read, in order; the same for every hook point.
    pub positions: Vec<usize>,
    /// Per hook point, positions × d values, row-major.
    pub values: BTreeMap<HookPoint, Vec<f32>>,
}

/// Runs every prompt (batched, continuous) and gathers its captures; `chats[i]`, where given, is prompt i
/// as rendered (for the selectors that name text or turns).
pub fn capture(
    gen: &Generator,
    prompts: &[Vec<u32>],
    chats: &[RenderedChat],
    req: &Request,
) -> Result<Vec<Record>> {
    ensure!(!req.points.is_empty(), "no hook point to read");
    let hooks = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| -> Result<_> {
            let chat = chats.get(i);
            let positions = req
                .positions
                .resolve_in(p.len(), chat)
                .with_context(|| format!("prompt {i}: positions"))?;
            Ok(Some(Arc::new(RowHooks {
                interventions: row_interventions(&req.interventions, p.len(), chat)
                    .with_context(|| format!("prompt {i}"))?,
                captures: req
                    .points
                    .iter()
                    .map(|&point| CaptureSpec {
                        point,
                        positions: positions.clone(),
                    })
                    .collect(),
            })))
        })
        .collect::<Result<Vec<_>>>()?;
    let params = GenerationParams {
        max_tokens: req.max_tokens,
        ..Default::default()
    };
    let out = gen.generate_hooked(prompts, &hooks, &params)?;
    let mut records = vec![];
    for (i, (prompt, mut completions)) in prompts.iter().zip(out).enumerate() {
        let c = completions.pop().context("a completion per prompt")?;
        let mut values: BTreeMap<HookPoint, Vec<f32>> = BTreeMap::new();
        let mut positions = vec![];
        for cap in &c.captures {
            if cap.point == req.points[0] {
                positions.push(cap.position);
            }
            values.entry(cap.point).or_default().extend(&cap.values);
        }
        ensure!(
            !positions.is_empty(),
            "prompt {i}: the positions select none of its {} tokens",
            prompt.len()
        );
        records.push(Record {
            prompt_ids: prompt.clone(),
            generated_ids: c.token_ids,
            positions,
            values,
        });
    }
    Ok(records)
}

/// Writes the records as safetensors: each tensor [positions, d] f32, keyed by the hook point's name
/// (`single`: one prompt) or `INDEX.HOOK` (INDEX the prompt's 0-based place); `metadata` plus, per prompt,
/// its token ids, generated ids and positions as JSON.
pub fn write(
    path: &Path,
    records: &[Record],
    d: usize,
    single: bool,
    mut metadata: BTreeMap<String, String>,
) -> Result<()> {
    let mut bytes: Vec<(String, Vec<u8>, Vec<usize>)> = vec![];
    for (i, r) in records.iter().enumerate() {
        let prefix = if single {
            String::new()
        } else {
            format!("{i}.")
        };
        for (point, v) in &r.values {
            let raw: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            bytes.push((
                format!("{prefix}{}", point.name()),
                raw,
                vec![v.len() / d, d],
            ));
        }
        let per = serde_json::json!({
            "token_ids": r.prompt_ids,
            "generated_ids": r.generated_ids,
            "positions": r.positions,
        });
        metadata.insert(
            if single {
                "prompt".into()
            } else {
                format!("{i}.prompt")
            },
            per.to_string(),
        );
    }
    let views = bytes
        .iter()
        .map(|(name, raw, shape)| {
            Ok((
                name.clone(),
                TensorView::new(Dtype::F32, shape.clone(), raw)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // Written beside the target and renamed, so a kill leaves no half file.
    let tmp = path.with_extension("safetensors.partial");
    let info: HashMap<String, String> = metadata.into_iter().collect();
    safetensors::tensor::serialize_to_file(views, Some(info), &tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
