//! Building DataRow files: strings (generated, or the user's JSONL) × a task's properties.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::datarow::{write_datarows, DataRow};
use super::property::Property;
use super::task::Task;

/// A dataset string and its target (answer key / behaviour-matching option), if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceString {
    pub string: String,
    pub target: Option<String>,
}

/// Reads `{"string": ..., "target": ...}` per line (the paper's `evals/datasets/*.jsonl` layout).
pub fn read_strings(path: &Path) -> Result<Vec<SourceString>> {
    let mut out = vec![];
    for (origin, line) in crate::fsutil::jsonl_lines(path)? {
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("{origin}: not valid JSON"))?;
        let Some(string) = v.get("string").and_then(|s| s.as_str()) else {
            bail!("{origin}: field `string` is missing or not a string");
        };
        let target = match v.get("target") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(_) => bail!("{origin}: field `target` must be a string or null"),
        };
        out.push(SourceString {
            string: string.into(),
            target,
        });
    }
    if out.is_empty() {
        bail!("{}: no strings", path.display());
    }
    Ok(out)
}

/// One DataRow per (string, property).
pub fn rows_for(
    task: &Task,
    strings: &[SourceString],
    properties: &[Property],
) -> Result<Vec<Vec<DataRow>>> {
    properties
        .iter()
        .map(|&p| {
            strings
                .iter()
                .map(|s| DataRow::build(task, &s.string, p, s.target.as_deref()))
                .collect()
        })
        .collect()
}

/// Writes `dir/<task>_<property>.jsonl` for every property; returns the files.
pub fn write_task_files(
    dir: &Path,
    task: &Task,
    strings: &[SourceString],
    properties: &[Property],
) -> Result<Vec<PathBuf>> {
    let mut files = vec![];
    for (p, rows) in properties.iter().zip(rows_for(task, strings, properties)?) {
        let path = dir.join(format!("{}_{}.jsonl", task.name, p.name()));
        write_datarows(&path, &rows)?;
        files.push(path);
    }
    Ok(files)
}
