//! The paper's DataRow JSONL (spec §3.1): one (string, task, property) per line with both prompts.
//! Rows are rebuilt from their (original_question, original_dataset, behavioral_property), which is how a
//! file is validated and how introspect writes its own datasets — byte for byte in the paper's layout.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::property::Property;
use super::task::Task;
use crate::model::Message;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataRow {
    pub original_question: String,
    pub original_dataset: String,
    pub object_level_prompt: Vec<Message>,
    pub hypothetical_prompt: Vec<Message>,
    pub behavioral_property: String,
    /// The dataset's `target`: the behaviour-matching letter for ethical-stance tasks (also the answer
    /// key or next word elsewhere; only ethical stance reads it).
    pub option_matching_ethical_stance: Option<String>,
}

/// A row with where it was read from.
#[derive(Debug, Clone)]
pub struct SourcedRow {
    pub origin: String,
    pub row: DataRow,
    pub task: &'static Task,
    pub property: Property,
}

impl DataRow {
    /// The row for `string` of `task`, asking about `property`, as the paper built it.
    pub fn build(
        task: &Task,
        string: &str,
        property: Property,
        target: Option<&str>,
    ) -> Result<DataRow> {
        Ok(DataRow {
            original_question: string.into(),
            original_dataset: task.name.into(),
            object_level_prompt: vec![Message::new("user", &task.object_prompt(string))],
            hypothetical_prompt: vec![Message::new(
                "user",
                &task.hypothetical_prompt(string, property)?,
            )],
            behavioral_property: property.name().into(),
            option_matching_ethical_stance: target.map(String::from),
        })
    }

    /// The compact JSON line the paper's files hold.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("a DataRow always serialises")
    }

    /// The target, for rules that read it.
    pub fn target(&self) -> Option<&str> {
        self.option_matching_ethical_stance.as_deref()
    }
}

/// Parses one line, naming the field that is missing or wrong.
pub fn parse_line(line: &str, origin: &str) -> Result<SourcedRow> {
    let v: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("{origin}: not valid JSON"))?;
    for field in [
        "original_question",
        "original_dataset",
        "behavioral_property",
    ] {
        if !v.get(field).is_some_and(|x| x.is_string()) {
            bail!("{origin}: field `{field}` is missing or not a string");
        }
    }
    let row: DataRow = serde_json::from_value(v)
        .with_context(|| format!("{origin}: not a DataRow (fields original_question, original_dataset, object_level_prompt, hypothetical_prompt, behavioral_property, option_matching_ethical_stance)"))?;
    let task = Task::get(&row.original_dataset)
        .with_context(|| format!("{origin}: field `original_dataset`"))?;
    let Some(property) = Property::parse(&row.behavioral_property) else {
        bail!(
            "{origin}: field `behavioral_property` is `{}`; known: {}",
            row.behavioral_property,
            Property::ALL.map(|p| p.name()).join(", ")
        );
    };
    task.suffix(property)
        .with_context(|| format!("{origin}: field `behavioral_property`"))?;
    Ok(SourcedRow {
        origin: origin.into(),
        row,
        task,
        property,
    })
}

/// Every row of a DataRow JSONL file (blank lines skipped).
pub fn read_datarows(path: &Path) -> Result<Vec<SourcedRow>> {
    crate::fsutil::jsonl_lines(path)?
        .iter()
        .map(|(origin, line)| parse_line(line, origin))
        .collect()
}

/// What validating a file found.
#[derive(Debug, Default)]
pub struct Validation {
    pub rows: usize,
    /// Rows whose prompts are right but whose JSON is laid out differently from the paper's.
    pub layout_differs: usize,
}

/// Rebuilds every row of `path` from its (original_question, original_dataset, behavioral_property) and
/// fails at the first row whose prompts differ, naming the row, the field and the first differing byte.
pub fn validate_file(path: &Path) -> Result<Validation> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {} (not UTF-8?)", path.display()))?;
    let mut report = Validation::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let origin = format!("{}:{}", path.display(), i + 1);
        let got = parse_line(line, &origin)?;
        let want = DataRow::build(
            got.task,
            &got.row.original_question,
            got.property,
            got.row.target(),
        )?;
        for (field, a, b) in [
            (
                "object_level_prompt",
                &got.row.object_level_prompt,
                &want.object_level_prompt,
            ),
            (
                "hypothetical_prompt",
                &got.row.hypothetical_prompt,
                &want.hypothetical_prompt,
            ),
        ] {
            if a != b {
                bail!(
                    "{origin}: field `{field}` differs from the paper's template: {}",
                    first_difference(a, b)
                );
            }
        }
        if got.row.behavioral_property != want.behavioral_property {
            report.layout_differs += 1; // an alias such as is_either_a_or_c
        } else if line != want.to_line() {
            report.layout_differs += 1;
        }
        report.rows += 1;
    }
    if report.rows == 0 {
        bail!("{}: no rows", path.display());
    }
    Ok(report)
}

fn first_difference(got: &[Message], want: &[Message]) -> String {
    if got.len() != want.len() {
        return format!("{} messages, expected {}", got.len(), want.len());
    }
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        if g.role != w.role {
            return format!("messages[{k}].role is `{}`, expected `{}`", g.role, w.role);
        }
        if g.content != w.content {
            let at = g
                .content
                .char_indices()
                .zip(w.content.chars())
                .find(|((_, a), b)| a != b)
                .map(|((i, _), _)| i)
                .unwrap_or(g.content.len().min(w.content.len()));
            let show = |s: &str| {
                let tail: String = s[floor(s, at)..].chars().take(40).collect();
                format!("{tail:?}")
            };
            return format!(
                "messages[{k}].content differs at byte {at}: has {}, expected {}",
                show(&g.content),
                show(&w.content)
            );
        }
    }
    "messages differ".into()
}

fn floor(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Writes rows as the paper's JSONL, atomically.
pub fn write_datarows(path: &Path, rows: &[DataRow]) -> Result<()> {
    let mut text = String::new();
    for r in rows {
        text.push_str(&r.to_line());
        text.push('\n');
    }
    crate::fsutil::write_atomic(path, text.as_bytes())
}
