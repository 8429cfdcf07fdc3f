//! Interventions as requests write them (the CLI's `--intervene`, a run's config): JSON of the shape
//! `{"hook", "op", "vector", "alpha", "scale", "positions"}`, with the vector inline or named in a
//! safetensors file. [`InterventionSpec::prepare`] checks it against a model and loads its vector once;
//! [`Prepared::for_prompt`] resolves its positions for each prompt.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::chat::RenderedChat;
use super::hooks::{CaptureSpec, HookPoint, Intervention, Op, PositionSpec, ScaleMode};

/// What an intervention does (spec §2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OpName {
    /// h + Δ (see `scale` and `alpha`)
    #[default]
    Add,
    /// h := vector
    Replace,
    /// h := factor · h
    Scale,
    /// h := 0
    Zero,
}

/// A vector inline, or a tensor of a safetensors file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum VectorSpec {
    Values(Vec<f32>),
    File { file: PathBuf, name: String },
}

/// One intervention as written in JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterventionSpec {
    /// A hook point's name, e.g. `blocks.19.hook_resid_post`.
    pub hook: String,
    #[serde(default)]
    pub op: OpName,
    /// For `add` and `replace`.
    #[serde(default)]
    pub vector: Option<VectorSpec>,
    /// For `add`: Δ's strength (default 1).
    #[serde(default)]
    pub alpha: Option<f32>,
    /// For `add`: raw (α·v), unit (α·v/‖v‖) or relative (α·‖h_t‖·v/‖v‖).
    #[serde(default)]
    pub scale: ScaleMode,
    /// For `scale`: the factor.
    #[serde(default)]
    pub factor: Option<f32>,
    /// Which positions (default: all, generated tokens included).
    #[serde(default)]
    pub positions: Option<PositionSpec>,
}

/// An intervention checked against a model, its vector loaded; positions still to resolve per prompt.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub point: HookPoint,
    pub op: Op,
    pub positions: PositionSpec,
    /// ‖v‖ of the vector (0 without one), for run records.
    pub vector_norm: f32,
}

impl InterventionSpec {
    /// `text` is JSON, or `@FILE` naming a JSON file; `origin` names where it came from in errors.
    /// Relative vector files resolve against the JSON file's folder (or the working directory).
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let (json, base, origin) = match text.strip_prefix('@') {
            Some(path) => (
                std::fs::read_to_string(path)
                    .with_context(|| format!("{origin}: cannot read {path}"))?,
                Path::new(path).parent().map(Path::to_path_buf),
                format!("{origin} ({path})"),
            ),
            None => (text.to_string(), None, origin.to_string()),
        };
        let mut spec: InterventionSpec = serde_json::from_str(&json).with_context(|| {
            format!(
                "{origin}: expected {{\"hook\", \"op\", \"vector\", \"alpha\", \"scale\", \"positions\"}}"
            )
        })?;
        if let (Some(VectorSpec::File { file, .. }), Some(base)) = (&mut spec.vector, base) {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        }
        Ok(spec)
    }

    /// Checks the spec against a model of `layers` blocks and residual width `d`, and loads the vector.
    pub fn prepare(&self, layers: usize, d: usize) -> Result<Prepared> {
        let point = HookPoint::parse(&self.hook, layers).context("field `hook`")?;
        let vector = match &self.vector {
            None => None,
            Some(v) => Some(load_vector(v, d).context("field `vector`")?),
        };
        let vector_norm = vector
            .as_ref()
            .map_or(0.0, |v| v.iter().map(|x| x * x).sum::<f32>().sqrt());
        let needs_vector = matches!(self.op, OpName::Add | OpName::Replace);
        ensure!(
            needs_vector == vector.is_some(),
            "field `vector`: {} for op {:?}",
            if needs_vector {
                "required"
            } else {
                "not taken"
            },
            self.op
        );
        ensure!(
            self.op == OpName::Add || (self.alpha.is_none() && self.scale == ScaleMode::Raw),
            "fields `alpha` and `scale` belong to op add"
        );
        ensure!(
            (self.op == OpName::Scale) == self.factor.is_some(),
            "field `factor`: {} for op {:?}",
            if self.op == OpName::Scale {
                "required"
            } else {
                "not taken"
            },
            self.op
        );
        let op = match (self.op, vector) {
            (OpName::Add, Some(v)) => {
                Op::add(&v, self.alpha.unwrap_or(1.0), self.scale).context("field `vector`")?
            }
            (OpName::Replace, Some(v)) => Op::Replace(v.into()),
            (OpName::Scale, None) => Op::Scale(self.factor.expect("checked")),
            (OpName::Zero, None) => Op::Scale(0.0),
            _ => unreachable!("checked above"),
        };
        Ok(Prepared {
            point,
            op,
            positions: self
                .positions
                .clone()
                .unwrap_or(PositionSpec::All { all: true }),
            vector_norm,
        })
    }
}

impl Prepared {
    /// The intervention for a prompt of `prompt_len` tokens, rendered as `chat` where it was one.
    pub fn for_prompt(
        &self,
        prompt_len: usize,
        chat: Option<&RenderedChat>,
    ) -> Result<Intervention> {
        Ok(Intervention {
            point: self.point,
            op: self.op.clone(),
            positions: self
                .positions
                .resolve_in(prompt_len, chat)
                .context("field `positions`")?,
        })
    }
}

fn load_vector(v: &VectorSpec, d: usize) -> Result<Vec<f32>> {
    let values = match v {
        VectorSpec::Values(v) => v.clone(),
        VectorSpec::File { file, name } => {
            let tensors = candle_core::safetensors::load(file, &candle_core::Device::Cpu)
                .with_context(|| format!("cannot read safetensors {}", file.display()))?;
            let t = tensors
                .get(name)
                .with_context(|| format!("{} holds no tensor `{name}`", file.display()))?;
            t.to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?
        }
    };
    if values.len() != d {
        bail!(
            "the vector has {} values; the model's residual has {d}",
            values.len()
        );
    }
    ensure!(
        values.iter().all(|v| v.is_finite()),
        "the vector holds a non-finite value"
    );
    Ok(values)
}

/// What a request asks to read (the server's `capture`): hook points by name pattern (see
/// [`HookPoint::matching`]) and positions (default: all).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureRequest {
    pub hooks: String,
    #[serde(default)]
    pub positions: Option<PositionSpec>,
}

impl CaptureRequest {
    /// The captures for a prompt of `prompt_len` tokens (rendered as `chat` where it was one).
    pub fn specs(
        &self,
        layers: usize,
        prompt_len: usize,
        chat: Option<&RenderedChat>,
    ) -> Result<Vec<CaptureSpec>> {
        let points = HookPoint::matching(&self.hooks, layers).context("field `hooks`")?;
        let positions = self
            .positions
            .clone()
            .unwrap_or(PositionSpec::All { all: true })
            .resolve_in(prompt_len, chat)
            .context("field `positions`")?;
        Ok(points
            .into_iter()
            .map(|point| CaptureSpec {
                point,
                positions: positions.clone(),
            })
            .collect())
    }
}

/// The row hooks of a prompt of `prompt_len` tokens (rendered as `chat` where it was one) under every
/// prepared intervention, in order.
pub fn row_interventions(
    prepared: &[Prepared],
    prompt_len: usize,
    chat: Option<&RenderedChat>,
) -> Result<Vec<Intervention>> {
    prepared
        .iter()
        .enumerate()
        .map(|(i, p)| {
            p.for_prompt(prompt_len, chat)
                .with_context(|| format!("intervention {}", i + 1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_defaults_and_bad_ones_name_the_field() {
        let s = InterventionSpec::parse(
            r#"{"hook": "blocks.1.hook_resid_post", "vector": [1, 2], "alpha": 3, "positions": {"from": 4}}"#,
            "--intervene",
        )
        .unwrap();
        let p = s.prepare(2, 2).unwrap();
        assert_eq!(p.point, HookPoint::ResidPost(1));
        assert_eq!(
            p.op,
            Op::Add {
                delta: vec![3.0, 6.0].into(),
                relative: false
            }
        );
        assert!(p.for_prompt(3, None).unwrap().positions.contains(9));
        let err = |json: &str| {
            format!(
                "{:#}",
                InterventionSpec::parse(json, "--intervene")
                    .and_then(|s| s.prepare(2, 2).map(|_| ()))
                    .unwrap_err()
            )
        };
        assert!(err(r#"{"hook": "blocks.2.hook_resid_post", "vector": [1, 2]}"#).contains("hook"));
        assert!(err(r#"{"hook": "blocks.0.hook_resid_post", "vector": [1]}"#).contains("vector"));
        assert!(err(r#"{"hook": "blocks.0.hook_resid_post"}"#).contains("vector"));
        assert!(err(r#"{"hook": "blocks.0.hook_resid_post", "op": "scale"}"#).contains("factor"));
        assert!(
            err(r#"{"hook": "blocks.0.hook_resid_post", "vecter": [1, 2]}"#).contains("vecter")
        );
        let zero = InterventionSpec::parse(
            r#"{"hook": "ln_final.hook_normalized", "op": "zero", "positions": {"at": -1}}"#,
            "x",
        )
        .unwrap()
        .prepare(2, 2)
        .unwrap();
        assert_eq!(zero.op, Op::Scale(0.0));
        assert!(
            zero.for_prompt(0, None).is_err(),
            "at -1 of an empty prompt"
        );
    }
}
