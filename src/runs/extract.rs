//! LLM-extracted properties (spec §2.2: `writing_stories/main_character_name`,
//! `dear_abbie/sympathetic_advice`): no rule gives their value, an extractor model reads each
//! object-level answer through the authors' extraction prompt. The extraction is a run like any other —
//! `OBJECT_RUN/extracted/<property>/` holds its settings (the extractor's model and fingerprint), its
//! log (resumable, answered from the request cache) and `extraction.json` (the prompt) — and
//! [`super::read_run`] merges its answers into the object run's records, so evaluation and training sets
//! read them as any other property value.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::log::read_log;
use super::{pin_settings, row_id, Item, Record, Run, RunKind, RunSettings, RunSummary};
use crate::backend::Backend;
use crate::tasks::text::py_strip;
use crate::tasks::{complies, Property, Task};

/// Where an object run keeps its extractions.
pub const DIR: &str = "extracted";

/// What `extraction.json` records: the property and the prompt the extractor was given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Extraction {
    pub property: String,
    /// The extractor's user message, `$response` standing for the object-level answer.
    pub prompt: String,
}

/// The LLM-extracted properties the tasks of `records` ask about.
pub fn extracted_properties(records: &[Record]) -> Result<Vec<Property>> {
    let mut out = BTreeSet::new();
    let tasks: BTreeSet<&str> = records.iter().map(|r| r.task.as_str()).collect();
    for t in tasks {
        for &p in Task::get(t)?.properties {
            if p.extraction_prompt().is_some() {
                out.insert(p);
            }
        }
    }
    Ok(out.into_iter().collect())
}

/// One extraction prompt per answered record whose task asks about `property`.
pub fn items(records: &[Record], property: Property) -> Result<Vec<Item>> {
    let Some(template) = property.extraction_prompt() else {
        bail!("{property} has a rule; only LLM-extracted properties are extracted");
    };
    let mut items = vec![];
    for r in records {
        let task = Task::get(&r.task)?;
        let (true, Some(response)) = (task.properties.contains(&property), &r.response) else {
            continue;
        };
        items.push(Item {
            id: row_id(task.name, Some(property.name()), &r.string),
            task,
            property: Some(property),
            string: r.string.clone(),
            target: r.target.clone(),
            user: template.replace("$response", response),
        });
    }
    Ok(items)
}

pub fn dir_of(object_run: &Path, property: Property) -> PathBuf {
    object_run.join(DIR).join(property.name())
}

/// Runs the extractor over every answer of the object run in `object_run` (resumes a cut extraction);
/// `settings` names the extractor (its kind, system message and sampling are set here).
pub fn extract(
    object_run: &Path,
    backend: &dyn Backend,
    mut settings: RunSettings,
    chunk: usize,
    progress: bool,
) -> Result<Vec<(Property, RunSummary)>> {
    let records = read_log(&object_run.join(RunKind::Object.log_name()))?;
    settings.kind = RunKind::Hypothetical; // answers checked against the property's group
    settings.system = None;
    let mut done = vec![];
    for property in extracted_properties(&records)? {
        let dir = dir_of(object_run, property);
        std::fs::create_dir_all(&dir)?;
        pin_settings(
            &dir.join("extraction.json"),
            &Extraction {
                property: property.name().into(),
                prompt: property.extraction_prompt().unwrap_or_default().into(),
            },
        )?;
        let summary = Run {
            backend,
            settings: settings.clone(),
            dir,
            chunk,
            progress,
        }
        .run(&items(&records, property)?)?;
        done.push((property, summary));
    }
    Ok(done)
}

/// Puts the extractions stored under `object_run` into its records' property values: the extractor's
/// answer, stripped, where it passed the property's compliance group; undefined otherwise.
pub fn merge(object_run: &Path, records: &mut [Record]) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(object_run.join(DIR)) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let dir = e.path();
        let Some(property) = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(Property::parse)
        else {
            continue;
        };
        let log = dir.join(RunKind::Hypothetical.log_name());
        if !log.exists() {
            continue;
        }
        let answers: HashMap<(String, String), Record> = read_log::<Record>(&log)?
            .into_iter()
            .map(|a| ((a.task.clone(), a.string.clone()), a))
            .collect();
        for r in records.iter_mut() {
            if let Some(a) = answers.get(&(r.task.clone(), r.string.clone())) {
                let value = a
                    .response
                    .as_deref()
                    .filter(|x| complies(x, &[property.hypothetical_group()]))
                    .map(|x| py_strip(x).to_string());
                r.properties.insert(property.name().into(), value);
            }
        }
    }
    Ok(())
}
