//! Object-level and hypothetical runs: DataRow files in, one append-only JSONL log of responses out
//! (keyed by a stable row id), resumable after a kill, requests served from a cache when repeated.

pub mod calibrate;
pub mod extract;
pub mod log;
pub mod training;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::backend::{Backend, ChatRequest, Usage};
use crate::model::Message;
use crate::tasks::{complies, read_datarows, Property, Task};
use log::AppendLog;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum RunKind {
    /// The task prompt itself.
    Object,
    /// The question about a property of the answer the model would have given.
    Hypothetical,
}

impl RunKind {
    pub fn log_name(self) -> &'static str {
        match self {
            RunKind::Object => "object.jsonl",
            RunKind::Hypothetical => "hypothetical.jsonl",
        }
    }
}

/// What a run asks of its backend; kept in `run.json`, and a restart must ask the same.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSettings {
    pub kind: RunKind,
    /// The model as given (registry id, path, ...).
    pub model: String,
    /// The adapter name, if any.
    pub adapter: Option<String>,
    /// The backend's fingerprint for (model, adapter): weights, adapter contents, precision.
    pub fingerprint: String,
    /// Samples per prompt; with n > 1 the modal answer is kept, as the paper did for API models.
    pub n: usize,
    pub temperature: f32,
    pub max_tokens: usize,
    pub seed: u64,
    /// The system message put before every prompt (the paper sends an empty one).
    pub system: Option<String>,
}

/// One answered row of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub task: String,
    /// Hypothetical runs: the property asked about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub property: Option<String>,
    pub string: String,
    pub target: Option<String>,
    /// The raw response (the modal one when n > 1); `None` when n samples had no mode.
    pub response: Option<String>,
    /// All n samples, when n > 1.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<String>,
    pub finish_reason: String,
    /// Object runs: the task's compliance groups; hypothetical runs: the property's group.
    pub compliant: bool,
    /// Object runs: the value of every property the paper asks about this task (`null` = undefined).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, Option<String>>,
}

impl Record {
    /// The value of `property` for this object-level answer: by the property's rule, or — for an
    /// LLM-extracted property — the extractor's answer that [`read_run`] merged in (`None` until then).
    pub fn value(&self, property: Property) -> Option<String> {
        if property.extraction_prompt().is_some() {
            return self.properties.get(property.name()).cloned().flatten();
        }
        property.value(self.response.as_deref()?, self.target.as_deref())
    }
}

/// Writes a run's settings beside its log, or — when the directory already holds a run — checks that
/// they are the same, naming the first field that differs.
pub fn pin_settings<T: Serialize + serde::de::DeserializeOwned + PartialEq>(
    path: &Path,
    settings: &T,
) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    if !path.exists() {
        return crate::fsutil::write_atomic(
            path,
            serde_json::to_string_pretty(settings)?.as_bytes(),
        );
    }
    let old: T = serde_json::from_str(&std::fs::read_to_string(path)?)
        .with_context(|| format!("{}: not this kind of run's settings", path.display()))?;
    if old != *settings {
        let a = serde_json::to_value(&old)?;
        let b = serde_json::to_value(settings)?;
        let field = a
            .as_object()
            .into_iter()
            .flatten()
            .find(|(k, v)| b.get(k.as_str()) != Some(v))
            .map_or("?".to_string(), |(k, v)| {
                format!("{k} (was {v}, now {})", b[k.as_str()])
            });
        bail!(
            "{} holds a run with other settings: {field}. Use another --out, or the same settings to resume",
            dir.display()
        );
    }
    Ok(())
}

/// A progress bar for `len` rows of which `done` are finished (hidden when `show` is false).
pub fn progress_bar(show: bool, len: usize, done: usize, label: &str) -> indicatif::ProgressBar {
    let bar = if show {
        indicatif::ProgressBar::new(len as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{label} {{wide_bar}} {{per_sec}} eta {{eta}}"
        ))
        .expect("a valid template"),
    );
    bar.set_position(done as u64);
    bar.reset_eta();
    bar
}

/// The stable id of a row: the task, the property (hypothetical runs) and the string.
pub fn row_id(task: &str, property: Option<&str>, string: &str) -> String {
    let mut h = Sha256::new();
    h.update(task);
    h.update([0]);
    h.update(property.unwrap_or(""));
    h.update([0]);
    h.update(string);
    h.finalize()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One prompt to run.
#[derive(Debug, Clone)]
pub struct Item {
    pub id: String,
    pub task: &'static Task,
    pub property: Option<Property>,
    pub string: String,
    pub target: Option<String>,
    /// The user message (without the system message).
    pub user: String,
}

/// The prompts of a run from DataRow files, each once (object runs: one per (task, string), whatever
/// the property of the file; hypothetical runs: one per (task, property, string)). `limit`: at most
/// this many rows from each file.
pub fn items_from_files(
    kind: RunKind,
    files: &[PathBuf],
    limit: Option<usize>,
) -> Result<Vec<Item>> {
    let mut seen = HashSet::new();
    let mut items = vec![];
    for f in files {
        let rows = read_datarows(f)?;
        for r in rows.into_iter().take(limit.unwrap_or(usize::MAX)) {
            let (property, prompt) = match kind {
                RunKind::Object => (None, &r.row.object_level_prompt),
                RunKind::Hypothetical => (Some(r.property), &r.row.hypothetical_prompt),
            };
            let [m] = prompt.as_slice() else {
                bail!("{}: expected one user message in the prompt", r.origin);
            };
            if m.role != "user" {
                bail!(
                    "{}: the prompt's message is `{}`, expected `user`",
                    r.origin,
                    m.role
                );
            }
            let id = row_id(
                r.task.name,
                property.map(|p| p.name()),
                &r.row.original_question,
            );
            if seen.insert(id.clone()) {
                items.push(Item {
                    id,
                    task: r.task,
                    property,
                    string: r.row.original_question.clone(),
                    target: r.row.option_matching_ethical_stance.clone(),
                    user: m.content.clone(),
                });
            }
        }
    }
    if items.is_empty() {
        bail!("no rows in the data files");
    }
    Ok(items)
}

/// The paper's mode-of-n (spec §8 item 5): votes on the first 40 characters; ties go to the first in
/// order; the kept response is the first whose prefix is the mode; no mode (all distinct, n > 1) → None.
pub fn mode_of(samples: &[String]) -> Option<usize> {
    if samples.len() == 1 {
        return Some(0);
    }
    let prefix = |s: &String| s.chars().take(40).collect::<String>();
    let keys: Vec<String> = samples.iter().map(prefix).collect();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for k in &keys {
        *counts.entry(k).or_default() += 1;
    }
    let best = keys.iter().map(|k| counts[k.as_str()]).max()?;
    if best == 1 {
        return None;
    }
    keys.iter().position(|k| counts[k.as_str()] == best)
}

/// What a run did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSummary {
    pub rows: usize,
    pub new_rows: usize,
    pub seconds: f64,
    pub prompts_per_s: f64,
    pub compliant: usize,
    /// Tokens the backend processed for this run, over all its resumptions (`usage.json`).
    pub usage: Usage,
}

/// Adds `used` to the run's token tally (`usage.json`), kept across resumptions.
fn add_usage(dir: &Path, used: Usage) -> Result<Usage> {
    let path = dir.join("usage.json");
    let before: Usage = match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{}: not a token tally", path.display()))?,
        Err(_) => Usage::default(),
    };
    let total = before + used;
    if used != Usage::default() || !path.exists() {
        crate::fsutil::write_atomic(&path, serde_json::to_string_pretty(&total)?.as_bytes())?;
    }
    Ok(total)
}

pub struct Run<'a> {
    pub backend: &'a dyn Backend,
    pub settings: RunSettings,
    pub dir: PathBuf,
    /// Finished rows saved together (a kill loses at most this many, or 5 s of work).
    pub chunk: usize,
    pub progress: bool,
}

impl Run<'_> {
    fn request(&self, item: &Item) -> ChatRequest {
        let mut messages = vec![];
        if let Some(s) = &self.settings.system {
            messages.push(Message::new("system", s));
        }
        messages.push(Message::new("user", &item.user));
        ChatRequest {
            messages,
            model: self.settings.adapter.clone(),
            n: self.settings.n,
            temperature: self.settings.temperature,
            top_p: 1.0,
            max_tokens: self.settings.max_tokens,
            seed: self.settings.seed,
            logprobs: false,
            top_logprobs: 0,
            stop: vec![],
            intervene: vec![],
            capture: None,
        }
    }

    fn record(&self, item: &Item, texts: Vec<String>, finish: Vec<String>) -> Record {
        let chosen = mode_of(&texts);
        let response = chosen.map(|i| texts[i].clone());
        let finish_reason = chosen.map_or("no_mode".into(), |i| finish[i].clone());
        let compliant = response.as_deref().is_some_and(|r| match item.property {
            None => complies(r, item.task.object_groups),
            Some(p) => complies(r, &[p.hypothetical_group()]),
        });
        let properties = match (item.property, &response) {
            (None, Some(r)) => item
                .task
                .properties
                .iter()
                .map(|p| (p.name().to_string(), p.value(r, item.target.as_deref())))
                .collect(),
            _ => BTreeMap::new(),
        };
        Record {
            id: item.id.clone(),
            task: item.task.name.into(),
            property: item.property.map(|p| p.name().to_string()),
            string: item.string.clone(),
            target: item.target.clone(),
            response,
            samples: if texts.len() > 1 { texts } else { vec![] },
            finish_reason,
            compliant,
            properties,
        }
    }

    /// Runs every item not yet in the log; returns what was done.
    pub fn run(&self, items: &[Item]) -> Result<RunSummary> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        pin_settings(&self.dir.join("run.json"), &self.settings)?;
        let (log, done) = AppendLog::open::<Record>(&self.dir.join(self.settings.kind.log_name()))?;
        let done_ids: HashSet<String> = done.iter().map(|r| r.id.clone()).collect();
        let pending: Vec<&Item> = items.iter().filter(|i| !done_ids.contains(&i.id)).collect();
        let start = Instant::now();
        let bar = progress_bar(
            self.progress,
            items.len(),
            items.len() - pending.len(),
            &format!("{:?} {{pos}}/{{len}} rows", self.settings.kind).to_lowercase(),
        );
        // One stream over everything pending keeps the decode batch full; finished rows are saved in
        // small groups (a kill loses at most one group) and at least every few seconds.
        let wanted: HashSet<&str> = items.iter().map(|i| i.id.as_str()).collect();
        let mut rows = done
            .iter()
            .filter(|r| wanted.contains(r.id.as_str()))
            .count();
        let mut compliant = done
            .iter()
            .filter(|r| r.compliant && wanted.contains(r.id.as_str()))
            .count();
        let mut new_rows = 0;
        let mut buffer: Vec<Record> = vec![];
        let mut last_write = Instant::now();
        let requests: Vec<ChatRequest> = pending.iter().map(|i| self.request(i)).collect();
        let usage_before = self.backend.usage();
        let answered = self.backend.chat_each(&requests, &mut |k, answer| {
            let (texts, finish) = answer
                .choices
                .into_iter()
                .map(|c| (c.text, c.finish_reason))
                .unzip();
            let record = self.record(pending[k], texts, finish);
            compliant += usize::from(record.compliant);
            buffer.push(record);
            if buffer.len() >= self.chunk.max(1) || last_write.elapsed().as_secs_f64() > 5.0 {
                log.append(&buffer)?;
                new_rows += buffer.len();
                bar.inc(buffer.len() as u64);
                buffer.clear();
                last_write = Instant::now();
            }
            Ok(())
        });
        // What finished before a failure (a server that gave up, say) is kept, and so is its tally.
        log.append(&buffer)?;
        new_rows += buffer.len();
        bar.finish_and_clear();
        let usage = add_usage(&self.dir, self.backend.usage() - usage_before)?;
        answered?;
        in_item_order(&self.dir.join(self.settings.kind.log_name()), items)?;
        let seconds = start.elapsed().as_secs_f64();
        rows += new_rows;
        Ok(RunSummary {
            rows,
            new_rows,
            seconds,
            prompts_per_s: if seconds > 0.0 {
                new_rows as f64 / seconds
            } else {
                0.0
            },
            compliant,
            usage,
        })
    }
}

/// Rewrites a finished run's log (atomically) in the order of the items asked, its other records after
/// them as they were. Rows are logged as they finish, in an order that depends on batching, on a
/// server's timing and on where a run was killed; what is built from a run (training sets shuffled with
/// a seed, reports) must not.
fn in_item_order(path: &Path, items: &[Item]) -> Result<()> {
    let records: Vec<Record> = log::read_log(path)?;
    let rank: HashMap<&str, usize> = items
        .iter()
        .enumerate()
        .map(|(k, i)| (i.id.as_str(), k))
        .collect();
    let key = |r: &Record| rank.get(r.id.as_str()).copied().unwrap_or(usize::MAX);
    if records.windows(2).all(|w| key(&w[0]) <= key(&w[1])) {
        return Ok(());
    }
    let mut ordered: Vec<&Record> = records.iter().collect();
    ordered.sort_by_key(|r| key(r)); // stable: records of no item keep their order
    let mut text = String::new();
    for r in ordered {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    crate::fsutil::write_atomic(path, text.as_bytes())
}

/// Keeps the items whose string the given object-level run answered compliantly (spec §4.3: the paper
/// asks hypotheticals only about strings its predictor answered without a `default` failure).
pub fn filter_by_object(items: Vec<Item>, object: &[Record]) -> Vec<Item> {
    let ok: HashSet<(&str, &str)> = object
        .iter()
        .filter(|r| {
            r.response
                .as_deref()
                .is_some_and(|t| complies(t, &[crate::tasks::Group::Default]))
        })
        .map(|r| (r.task.as_str(), r.string.as_str()))
        .collect();
    items
        .into_iter()
        .filter(|i| ok.contains(&(i.task.name, i.string.as_str())))
        .collect()
}

/// The records of a run directory's log of `kind`.
pub fn read_run(dir: &Path, kind: RunKind) -> Result<(RunSettings, Vec<Record>)> {
    let settings_path = dir.join("run.json");
    let text = std::fs::read_to_string(&settings_path).with_context(|| {
        format!(
            "cannot read {} — is {} a run directory?",
            settings_path.display(),
            dir.display()
        )
    })?;
    let settings: RunSettings = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a run's settings", settings_path.display()))?;
    if settings.kind != kind {
        bail!(
            "{} is a {:?} run; expected a {:?} run",
            dir.display(),
            settings.kind,
            kind
        );
    }
    let mut records = log::read_log(&dir.join(kind.log_name()))?;
    if kind == RunKind::Object {
        extract::merge(dir, &mut records)?;
    }
    Ok((settings, records))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn a_finished_log_is_put_in_the_order_of_its_items() {
        let task = Task::get("animals_long").unwrap();
        let item = |id: &str| Item {
            id: id.into(),
            task,
            property: None,
            string: id.into(),
            target: None,
            user: id.into(),
        };
        let record = |id: &str| Record {
            id: id.into(),
            task: task.name.into(),
            property: None,
            string: id.into(),
            target: None,
            response: Some(format!("answer {id}")),
            samples: vec![],
            finish_reason: "stop".into(),
            compliant: true,
            properties: BTreeMap::new(),
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("object.jsonl");
        let (log, _) = AppendLog::open::<Record>(&path).unwrap();
        // Finished out of order, and a record from an earlier run of other items.
        log.append(&["c", "old", "a", "b"].map(record)).unwrap();
        in_item_order(&path, &["a", "b", "c"].map(item)).unwrap();
        let ids: Vec<String> = log::read_log::<Record>(&path)
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, ["a", "b", "c", "old"]);
        assert_eq!(
            log::read_log::<Record>(&path).unwrap()[0]
                .response
                .as_deref(),
            Some("answer a")
        );
    }

    #[test]
    fn mode_of_n_as_the_paper() {
        assert_eq!(mode_of(&s(&["a"])), Some(0));
        assert_eq!(mode_of(&s(&["a", "b", "b", "a", "c"])), Some(0)); // tie → first in order
        assert_eq!(mode_of(&s(&["x", "b", "b", "a", "c"])), Some(1));
        assert_eq!(mode_of(&s(&["a", "b", "c"])), None);
        let long = "x".repeat(40);
        // Same first 40 characters vote together; the first full response is kept.
        assert_eq!(
            mode_of(&[format!("{long}1"), "y".into(), format!("{long}2")]),
            Some(0)
        );
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        assert_eq!(row_id("t", None, "s"), row_id("t", None, "s"));
        assert_ne!(row_id("t", None, "s"), row_id("t", Some("first_word"), "s"));
        assert_ne!(row_id("ta", None, "s"), row_id("t", None, "as"));
        assert_eq!(row_id("t", None, "s").len(), 24);
    }
}
