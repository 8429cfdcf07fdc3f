//! Hook points in the residual stream: where a row's interventions write and its captures read as a walk
//! passes them (../shared/spec/activation-introspection.md §1–2).
//!
//! Names are TransformerLens' with HF Llama's meaning: `blocks.L.hook_resid_pre` (the block's input),
//! `hook_attn_out` (o_proj's output), `hook_resid_mid` (`resid_pre + attn_out`), `hook_mlp_out`
//! (down_proj's output), `hook_resid_post` (the block's output) and `ln_final.hook_normalized` (the final
//! norm's output, weight applied: the head's input). Each row of a batch carries its own [`RowHooks`];
//! positions are absolute (left padding not counted), so a hook means the same in a prefill, a decode step
//! and a one-by-one run. An intervention on a prompt position changes the keys and values later layers
//! cache there, and so every later token: it is baked into the KV cache as in a full recompute.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::chat::RenderedChat;

/// A place in the walk where the residual stream (or what is added to it) can be read or written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HookPoint {
    ResidPre(usize),
    AttnOut(usize),
    ResidMid(usize),
    MlpOut(usize),
    ResidPost(usize),
    LnFinal,
}

const BLOCK_HOOKS: [&str; 5] = [
    "hook_resid_pre",
    "hook_attn_out",
    "hook_resid_mid",
    "hook_mlp_out",
    "hook_resid_post",
];

impl HookPoint {
    /// TransformerLens' name, e.g. `blocks.9.hook_resid_post`.
    pub fn name(&self) -> String {
        match self {
            HookPoint::ResidPre(l) => format!("blocks.{l}.hook_resid_pre"),
            HookPoint::AttnOut(l) => format!("blocks.{l}.hook_attn_out"),
            HookPoint::ResidMid(l) => format!("blocks.{l}.hook_resid_mid"),
            HookPoint::MlpOut(l) => format!("blocks.{l}.hook_mlp_out"),
            HookPoint::ResidPost(l) => format!("blocks.{l}.hook_resid_post"),
            HookPoint::LnFinal => "ln_final.hook_normalized".into(),
        }
    }

    /// Every hook point of a model with `layers` blocks, in the order a forward passes them.
    pub fn all(layers: usize) -> Vec<HookPoint> {
        let mut v: Vec<HookPoint> = (0..layers)
            .flat_map(|l| {
                [
                    HookPoint::ResidPre(l),
                    HookPoint::AttnOut(l),
                    HookPoint::ResidMid(l),
                    HookPoint::MlpOut(l),
                    HookPoint::ResidPost(l),
                ]
            })
            .collect();
        v.push(HookPoint::LnFinal);
        v
    }

    /// A hook point by name; the layer must exist in a model of `layers` blocks.
    pub fn parse(name: &str, layers: usize) -> Result<HookPoint> {
        if name == "ln_final.hook_normalized" {
            return Ok(HookPoint::LnFinal);
        }
        let bad = || {
            format!(
                "unknown hook point `{name}`: expected blocks.L.{{{}}} or ln_final.hook_normalized",
                BLOCK_HOOKS.join(",")
            )
        };
        let rest = name.strip_prefix("blocks.").with_context(bad)?;
        let (layer, hook) = rest.split_once('.').with_context(bad)?;
        let l: usize = layer.parse().ok().with_context(bad)?;
        ensure!(
            l < layers,
            "hook point `{name}`: the model has layers 0..{}",
            layers.saturating_sub(1)
        );
        Ok(match hook {
            "hook_resid_pre" => HookPoint::ResidPre(l),
            "hook_attn_out" => HookPoint::AttnOut(l),
            "hook_resid_mid" => HookPoint::ResidMid(l),
            "hook_mlp_out" => HookPoint::MlpOut(l),
            "hook_resid_post" => HookPoint::ResidPost(l),
            _ => bail!(bad()),
        })
    }

    /// The hook points whose names match `pattern`, where `*` stands for any run of characters (e.g.
    /// `blocks.*.hook_resid_post`); several patterns may be joined by commas. An error if none match.
    pub fn matching(pattern: &str, layers: usize) -> Result<Vec<HookPoint>> {
        let mut out = BTreeSet::new();
        for p in pattern.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let before = out.len();
            out.extend(
                HookPoint::all(layers)
                    .into_iter()
                    .filter(|h| glob(p, &h.name())),
            );
            ensure!(out.len() > before, "no hook point matches `{p}`");
        }
        ensure!(!out.is_empty(), "no hook pattern given");
        Ok(out.into_iter().collect())
    }
}

/// Whether `name` matches `pattern` with `*` as any run of characters.
fn glob(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, tail)) => {
            let Some(rest) = name.strip_prefix(head) else {
                return false;
            };
            (0..=rest.len())
                .filter(|&i| rest.is_char_boundary(i))
                .any(|i| glob(tail, &rest[i..]))
        }
    }
}

/// Which positions of a row a hook acts on, as a request names them (spec §2.3); [`PositionSpec::resolve`]
/// turns it into absolute positions once the prompt is known.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum PositionSpec {
    /// Every position t ≥ p, generated tokens included.
    From { from: usize },
    /// a ≤ t < b.
    Span { span: [usize; 2] },
    /// One prompt position; negative counts from the prompt's end (−1: the last prompt token).
    At { at: i64 },
    /// Every position (`{"all": true}`).
    All { all: bool },
    /// The generated tokens only (`{"generated": true}`).
    Generated { generated: bool },
    /// The tokens of the `occurrence`-th (0-based) occurrence of `text` in the rendered prompt: every token
    /// whose bytes meet it, the boundary tokens included.
    Text {
        text: String,
        #[serde(default)]
        occurrence: usize,
    },
    /// From the first token of a [`PositionSpec::Text`] on, generated tokens included.
    FromText {
        from_text: String,
        #[serde(default)]
        occurrence: usize,
    },
    /// The content tokens of message `turn` (0-based, of the messages given; no header or end-of-turn
    /// tokens).
    Turn { turn: usize },
}

/// Absolute positions: a union of ranges, `end == usize::MAX` for "to the end, generated tokens included".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Positions(pub Vec<(usize, usize)>);

impl Positions {
    pub fn contains(&self, t: usize) -> bool {
        self.0.iter().any(|&(a, b)| a <= t && t < b)
    }
}

impl PositionSpec {
    /// The absolute positions this names in a row whose prompt has `prompt_len` tokens (selectors that
    /// name text or turns need [`PositionSpec::resolve_in`]).
    pub fn resolve(&self, prompt_len: usize) -> Result<Positions> {
        self.resolve_in(prompt_len, None)
    }

    /// The absolute positions this names in a prompt of `prompt_len` tokens rendered as `chat`.
    pub fn resolve_in(&self, prompt_len: usize, chat: Option<&RenderedChat>) -> Result<Positions> {
        let chat = || {
            chat.with_context(|| {
                format!("positions {self:?}: needs the rendered chat (a chat prompt, not raw ids)")
            })
        };
        Ok(Positions(match self {
            PositionSpec::From { from } => vec![(*from, usize::MAX)],
            PositionSpec::Span { span: [a, b] } => {
                ensure!(a < b, "positions: span [{a}, {b}] is empty");
                vec![(*a, *b)]
            }
            PositionSpec::At { at } => {
                let t = if *at < 0 { prompt_len as i64 + at } else { *at };
                ensure!(
                    (0..prompt_len as i64).contains(&t),
                    "positions: at {at} is outside the prompt's {prompt_len} tokens"
                );
                vec![(t as usize, t as usize + 1)]
            }
            PositionSpec::All { all } => {
                ensure!(*all, "positions: write {{\"all\": true}}");
                vec![(0, usize::MAX)]
            }
            PositionSpec::Generated { generated } => {
                ensure!(*generated, "positions: write {{\"generated\": true}}");
                vec![(prompt_len, usize::MAX)]
            }
            PositionSpec::Text { text, occurrence } => {
                let c = chat()?;
                vec![tokens_meeting(
                    c,
                    occurrence_of(&c.text, text, *occurrence)?,
                )?]
            }
            PositionSpec::FromText {
                from_text,
                occurrence,
            } => {
                let c = chat()?;
                let (a, _) = tokens_meeting(c, occurrence_of(&c.text, from_text, *occurrence)?)?;
                vec![(a, usize::MAX)]
            }
            PositionSpec::Turn { turn } => {
                let c = chat()?;
                let turns = c.turns()?;
                let range = *turns.get(*turn).with_context(|| {
                    format!(
                        "positions: turn {turn}, but the chat has {} messages",
                        turns.len()
                    )
                })?;
                vec![tokens_meeting(c, range)?]
            }
        }))
    }
}

/// The byte range of the k-th occurrence of `needle` in `text`.
fn occurrence_of(text: &str, needle: &str, k: usize) -> Result<(usize, usize)> {
    ensure!(!needle.is_empty(), "positions: the text to find is empty");
    let at = text
        .match_indices(needle)
        .nth(k)
        .with_context(|| {
            format!("positions: occurrence {k} of {needle:?} is not in the rendered prompt")
        })?
        .0;
    Ok((at, at + needle.len()))
}

/// The tokens whose byte ranges meet `[a, b)`, as one range of positions (spec §2.3: boundary tokens
/// included).
fn tokens_meeting(chat: &RenderedChat, (a, b): (usize, usize)) -> Result<(usize, usize)> {
    let hit: Vec<usize> = (chat.offsets.iter().enumerate())
        .filter(|(_, &(s, e))| s < b && a < e)
        .map(|(i, _)| i)
        .collect();
    match (hit.first(), hit.last()) {
        (Some(&first), Some(&last)) => Ok((first, last + 1)),
        _ => bail!("positions: no token covers bytes {a}..{b} of the rendered prompt"),
    }
}

/// How an `add` scales its vector v at position t (spec §2.2; the golden generator's `Steer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ScaleMode {
    /// Δ = α·v
    #[default]
    Raw,
    /// Δ = α·v/‖v‖
    Unit,
    /// Δ = α·‖h_t‖·v/‖v‖, ‖h_t‖ the position's norm before the addition.
    Relative,
}

/// What an intervention does at a selected position.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// h + Δ: for `Raw` and `Unit` `delta` is Δ itself; for `Relative` it is α·v/‖v‖, times ‖h_t‖.
    Add { delta: Arc<[f32]>, relative: bool },
    /// h := v
    Replace(Arc<[f32]>),
    /// h := c·h (`zero` is c = 0)
    Scale(f32),
}

impl Op {
    /// `add` with its scale mode, Δ computed in f32 as the reference does (α·v, then / ‖v‖).
    pub fn add(vector: &[f32], alpha: f32, mode: ScaleMode) -> Result<Op> {
        let norm = vector.iter().map(|v| v * v).sum::<f32>().sqrt();
        if mode != ScaleMode::Raw {
            ensure!(
                norm > 0.0 && norm.is_finite(),
                "a {mode:?} add needs a vector of finite, non-zero norm"
            );
        }
        let delta: Vec<f32> = match mode {
            ScaleMode::Raw => vector.iter().map(|v| alpha * v).collect(),
            _ => vector.iter().map(|v| alpha * v / norm).collect(),
        };
        Ok(Op::Add {
            delta: delta.into(),
            relative: mode == ScaleMode::Relative,
        })
    }

    fn width(&self) -> Option<usize> {
        match self {
            Op::Add { delta, .. } => Some(delta.len()),
            Op::Replace(v) => Some(v.len()),
            Op::Scale(_) => None,
        }
    }

    /// Applies the op to one position's values.
    fn apply(&self, h: &mut [f32]) {
        match self {
            Op::Add { delta, relative } => {
                let k = if *relative { norm(h) } else { 1.0 };
                for (x, d) in h.iter_mut().zip(delta.iter()) {
                    *x += if *relative { k * d } else { *d };
                }
            }
            Op::Replace(v) => h.copy_from_slice(v),
            Op::Scale(c) => h.iter_mut().for_each(|x| *x *= c),
        }
    }
}

fn norm(h: &[f32]) -> f32 {
    h.iter().map(|v| v * v).sum::<f32>().sqrt()
}

/// One write into the residual stream.
#[derive(Clone, Debug, PartialEq)]
pub struct Intervention {
    pub point: HookPoint,
    pub op: Op,
    pub positions: Positions,
}

/// One read: the values at `point` on `positions`, after the row's interventions there.
#[derive(Clone, Debug, PartialEq)]
pub struct CaptureSpec {
    pub point: HookPoint,
    pub positions: Positions,
}

/// What one row of a batch does at the hook points.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RowHooks {
    /// Applied in this order where several act at one point.
    pub interventions: Vec<Intervention>,
    pub captures: Vec<CaptureSpec>,
}

impl RowHooks {
    pub fn is_empty(&self) -> bool {
        self.interventions.is_empty() && self.captures.is_empty()
    }

    /// Every vector fits a residual of width `d`.
    pub fn check(&self, d: usize) -> Result<()> {
        for i in &self.interventions {
            if let Some(w) = i.op.width() {
                ensure!(
                    w == d,
                    "the intervention at {} has a vector of {w} values; the model's residual has {d}",
                    i.point.name()
                );
            }
        }
        Ok(())
    }
}

/// The values one capture read at one position.
#[derive(Clone, Debug, PartialEq)]
pub struct Captured {
    pub point: HookPoint,
    pub position: usize,
    pub values: Vec<f32>,
}

/// The hooks of one walk call: each row's [`RowHooks`] and the absolute position of each of its columns
/// (None for padding), and what the captures read, per row.
pub struct StepHooks<'a> {
    rows: Vec<Option<&'a RowHooks>>,
    /// rows × columns
    columns: Vec<Vec<Option<usize>>>,
    /// The points any row acts at: the walk skips the rest without a look.
    points: BTreeSet<HookPoint>,
    captured: RefCell<Vec<Vec<Captured>>>,
}

impl<'a> StepHooks<'a> {
    /// `columns[r][c]`: row r's position at column c of this call, None for a padding column.
    pub fn new(rows: Vec<Option<&'a RowHooks>>, columns: Vec<Vec<Option<usize>>>) -> Self {
        assert_eq!(rows.len(), columns.len(), "one column list per row");
        let points = rows
            .iter()
            .flatten()
            .flat_map(|h| {
                (h.interventions.iter().map(|i| i.point)).chain(h.captures.iter().map(|c| c.point))
            })
            .collect();
        let captured = RefCell::new(vec![vec![]; rows.len()]);
        Self {
            rows,
            columns,
            points,
            captured,
        }
    }

    /// Whether any row acts at `point`.
    pub fn touches(&self, point: HookPoint) -> bool {
        self.points.contains(&point)
    }

    /// What the captures read, per row, in the order the walk passed them.
    pub fn into_captured(self) -> Vec<Vec<Captured>> {
        self.captured.into_inner()
    }

    /// The hook at `point` on flat rows-major values x (rows·columns × d), in place: the CPU decode's
    /// buffers.
    pub fn apply_flat(&self, point: HookPoint, x: &mut [f32], d: usize) {
        if !self.touches(point) {
            return;
        }
        let t = self.columns.first().map_or(0, Vec::len);
        let mut captured = self.captured.borrow_mut();
        for (r, hooks) in self.rows.iter().enumerate() {
            let Some(hooks) = hooks else { continue };
            for (c, pos) in self.columns[r].iter().enumerate() {
                let Some(pos) = *pos else { continue };
                let h = &mut x[(r * t + c) * d..(r * t + c + 1) * d];
                for i in &hooks.interventions {
                    if i.point == point && i.positions.contains(pos) {
                        i.op.apply(h);
                    }
                }
                for cap in &hooks.captures {
                    if cap.point == point && cap.positions.contains(pos) {
                        captured[r].push(Captured {
                            point,
                            position: pos,
                            values: h.to_vec(),
                        });
                    }
                }
            }
        }
    }

    /// The hook at `point` on x (rows, columns, d), f32, on any device: each round of interventions (the
    /// k-th of every row's list at this point) as x·F + M_add·Δ + (M_rel·‖x‖)·Δ_rel with per-position
    /// masks and per-row vectors, so the device does the arithmetic; then the captures, read to the host.
    pub fn apply_tensor(&self, point: HookPoint, x: Tensor) -> Result<Tensor> {
        if !self.touches(point) {
            return Ok(x);
        }
        let (b, t, d) = x.dims3()?;
        let dev = x.device().clone();
        let mut x = x;
        let rounds = self
            .rows
            .iter()
            .flatten()
            .map(|h| h.interventions.iter().filter(|i| i.point == point).count())
            .max()
            .unwrap_or(0);
        for k in 0..rounds {
            let mut factor = vec![1f32; b * t];
            let (mut m_add, mut m_rel) = (vec![0f32; b * t], vec![0f32; b * t]);
            let (mut add, mut rel) = (vec![0f32; b * d], vec![0f32; b * d]);
            let (mut any_add, mut any_rel) = (false, false);
            for (r, hooks) in self.rows.iter().enumerate() {
                let Some(i) =
                    hooks.and_then(|h| h.interventions.iter().filter(|i| i.point == point).nth(k))
                else {
                    continue;
                };
                let selected =
                    |c: usize| self.columns[r][c].is_some_and(|p| i.positions.contains(p));
                for c in (0..t).filter(|&c| selected(c)) {
                    let at = r * t + c;
                    match &i.op {
                        Op::Add {
                            relative: false, ..
                        } => m_add[at] = 1.0,
                        Op::Add { relative: true, .. } => m_rel[at] = 1.0,
                        Op::Replace(_) => {
                            factor[at] = 0.0;
                            m_add[at] = 1.0;
                        }
                        Op::Scale(s) => factor[at] = *s,
                    }
                }
                match &i.op {
                    Op::Add {
                        delta,
                        relative: false,
                    }
                    | Op::Replace(delta) => {
                        add[r * d..(r + 1) * d].copy_from_slice(delta);
                        any_add = true;
                    }
                    Op::Add {
                        delta,
                        relative: true,
                    } => {
                        rel[r * d..(r + 1) * d].copy_from_slice(delta);
                        any_rel = true;
                    }
                    Op::Scale(_) => {}
                }
            }
            let mut y = x.broadcast_mul(&Tensor::from_vec(factor, (b, t, 1), &dev)?)?;
            if any_add {
                let m = Tensor::from_vec(m_add, (b, t, 1), &dev)?;
                let v = Tensor::from_vec(add, (b, 1, d), &dev)?;
                y = (y + m.broadcast_mul(&v)?)?;
            }
            if any_rel {
                // ‖h_t‖ of the values before this round, in f32.
                let norms = x.sqr()?.sum_keepdim(2)?.sqrt()?;
                let m = (Tensor::from_vec(m_rel, (b, t, 1), &dev)? * norms)?;
                let v = Tensor::from_vec(rel, (b, 1, d), &dev)?;
                y = (y + m.broadcast_mul(&v)?)?;
            }
            x = y;
        }
        self.capture_tensor(point, &x)?;
        Ok(x)
    }

    fn capture_tensor(&self, point: HookPoint, x: &Tensor) -> Result<()> {
        let (_, t, d) = x.dims3()?;
        let mut wanted = vec![];
        for (r, hooks) in self.rows.iter().enumerate() {
            let Some(hooks) = hooks else { continue };
            for (c, pos) in self.columns[r].iter().enumerate() {
                let Some(pos) = *pos else { continue };
                if hooks
                    .captures
                    .iter()
                    .any(|cap| cap.point == point && cap.positions.contains(pos))
                {
                    wanted.push((r, pos, (r * t + c) as u32));
                }
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let idx: Vec<u32> = wanted.iter().map(|w| w.2).collect();
        let idx = Tensor::new(idx.as_slice(), x.device())?;
        let rows = x
            .reshape(((), d))?
            .index_select(&idx, 0)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let mut captured = self.captured.borrow_mut();
        for ((r, pos, _), values) in wanted.into_iter().zip(rows) {
            captured[r].push(Captured {
                point,
                position: pos,
                values,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_patterns_match_in_forward_order() {
        for p in HookPoint::all(3) {
            assert_eq!(HookPoint::parse(&p.name(), 3).unwrap(), p);
        }
        assert!(HookPoint::parse("blocks.3.hook_resid_post", 3).is_err());
        assert!(HookPoint::parse("blocks.0.hook_resid", 3).is_err());
        let posts = HookPoint::matching("blocks.*.hook_resid_post", 3).unwrap();
        assert_eq!(
            posts,
            vec![
                HookPoint::ResidPost(0),
                HookPoint::ResidPost(1),
                HookPoint::ResidPost(2)
            ]
        );
        assert_eq!(HookPoint::matching("*", 2).unwrap().len(), 11);
        assert!(HookPoint::matching("blocks.*.nothing", 2).is_err());
    }

    #[test]
    fn positions_resolve_as_the_spec_defines_them() {
        let r = |s: &str, t| serde_json::from_str::<PositionSpec>(s).unwrap().resolve(t);
        let from = r(r#"{"from": 3}"#, 5).unwrap();
        assert!(!from.contains(2) && from.contains(3) && from.contains(100));
        let span = r(r#"{"span": [1, 3]}"#, 5).unwrap();
        assert!(!span.contains(0) && span.contains(2) && !span.contains(3));
        assert_eq!(r(r#"{"at": -1}"#, 5).unwrap(), Positions(vec![(4, 5)]));
        assert!(r(r#"{"at": 5}"#, 5).is_err());
        assert!(r(r#"{"generated": true}"#, 5).unwrap().contains(5));
        assert!(!r(r#"{"generated": true}"#, 5).unwrap().contains(4));
        assert!(r(r#"{"all": true}"#, 5).unwrap().contains(0));
        assert!(serde_json::from_str::<PositionSpec>(r#"{"form": 3}"#).is_err());
    }

    /// The tensor form (masks and per-row vectors on the device) equals the flat form (a loop per
    /// position) for every op, composed, with padding and rows without hooks.
    #[test]
    fn tensor_and_flat_hooks_agree() {
        let (b, t, d) = (3, 4, 5);
        let x: Vec<f32> = (0..b * t * d).map(|i| (i as f32 * 0.37).sin()).collect();
        let v: Vec<f32> = (0..d).map(|i| i as f32 - 1.5).collect();
        let at = |pos: PositionSpec| pos.resolve(3).unwrap();
        let p = HookPoint::ResidPost(0);
        let row0 = RowHooks {
            interventions: vec![
                Intervention {
                    point: p,
                    op: Op::add(&v, 2.0, ScaleMode::Relative).unwrap(),
                    positions: at(PositionSpec::From { from: 1 }),
                },
                Intervention {
                    point: p,
                    op: Op::Scale(0.5),
                    positions: at(PositionSpec::All { all: true }),
                },
            ],
            captures: vec![CaptureSpec {
                point: p,
                positions: at(PositionSpec::All { all: true }),
            }],
        };
        let row2 = RowHooks {
            interventions: vec![
                Intervention {
                    point: p,
                    op: Op::Replace(v.clone().into()),
                    positions: at(PositionSpec::At { at: -1 }),
                },
                Intervention {
                    point: p,
                    op: Op::add(&v, 3.0, ScaleMode::Unit).unwrap(),
                    positions: at(PositionSpec::Span { span: [0, 2] }),
                },
            ],
            captures: vec![],
        };
        // Row 0 has one padding column; rows 1 and 2 none.
        let columns = vec![
            vec![None, Some(0), Some(1), Some(2)],
            (0..4).map(Some).collect(),
            (0..4).map(Some).collect(),
        ];
        let rows = vec![Some(&row0), None, Some(&row2)];
        let flat = StepHooks::new(rows.clone(), columns.clone());
        let mut xf = x.clone();
        flat.apply_flat(p, &mut xf, d);
        let tensor = StepHooks::new(rows, columns);
        let xt = Tensor::from_vec(x.clone(), (b, t, d), &candle_core::Device::Cpu).unwrap();
        let xt = tensor.apply_tensor(p, xt).unwrap();
        let xt: Vec<f32> = xt.flatten_all().unwrap().to_vec1().unwrap();
        for (i, (a, e)) in xt.iter().zip(&xf).enumerate() {
            assert!((a - e).abs() < 1e-5, "[{i}] {a} vs {e}");
        }
        assert_ne!(xf, x, "the hooks changed something");
        assert_eq!(xf[..d], x[..d], "the padding column is untouched");
        assert_eq!(
            xf[t * d..2 * t * d],
            x[t * d..2 * t * d],
            "row 1 is untouched"
        );
        let (cf, ct) = (flat.into_captured(), tensor.into_captured());
        assert_eq!(cf[0].len(), 3);
        assert_eq!(
            cf[0].iter().map(|c| c.position).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        for (a, e) in ct[0].iter().zip(&cf[0]) {
            assert_eq!(a.position, e.position);
            assert!(a
                .values
                .iter()
                .zip(&e.values)
                .all(|(a, e)| (a - e).abs() < 1e-5));
        }
    }
}
