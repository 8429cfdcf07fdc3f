//! The calibration run (spec §6.6): per string, the distribution of the object-level answer's character
//! and of the hypothetical answer naming it — sampled as the paper did (20 samples at T = 1, 3 tokens,
//! no system message, prompts without the trailing newline) or exactly, by expanding every likely
//! continuation with the model's log-probabilities. Resumable: one log line per finished string.

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::log::AppendLog;
use super::{row_id, Item};
use crate::backend::{Backend, ChatRequest, ChatResponse, LocalBackend};
use crate::engine::{Generator, TreeParams};
use crate::eval::calibration::{
    equal_count_bins, hypothetical_from_samples, mad, object_from_samples, points, Bin,
    Distribution, Point,
};
use crate::model::{LoadedModel, Message};
use crate::tasks::task::HYPOTHETICAL_PREFIX;
use crate::tasks::text::{is_py_space, py_lower, py_strip};
use crate::tasks::Property;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// The paper's: relative frequencies of n samples at temperature 1.
    Sampled,
    /// From log-probabilities: every continuation above a probability threshold, up to 3 tokens.
    Exact,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationSettings {
    pub model: String,
    pub fingerprint_object: String,
    pub fingerprint_hypothetical: String,
    pub object_adapter: Option<String>,
    pub hypothetical_adapter: Option<String>,
    pub method: Method,
    pub property: Property,
    pub samples: usize,
    pub seed: u64,
    pub max_tokens: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StringRecord {
    pub id: String,
    pub task: String,
    pub string: String,
    /// `None` when no answer was long enough to have the character.
    pub object: Option<Distribution>,
    pub hypothetical: Option<Distribution>,
    /// Probability mass the distributions account for (1 for samples).
    pub object_coverage: f64,
    pub hypothetical_coverage: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CalibrationResult {
    pub settings: CalibrationSettings,
    pub strings: usize,
    pub points: Vec<Point>,
    pub bins: Vec<Bin>,
    /// Mean absolute difference of the bins, in percentage points.
    pub mad: f64,
    /// The same on the modal behaviour only (top-1 points).
    pub mad_top1: f64,
    /// Mean probability mass the distributions account for (exact method; 1 for samples).
    pub object_coverage: f64,
    pub hypothetical_coverage: f64,
}

pub struct Calibration<'a> {
    /// Answers the object-level prompts (with `settings.object_adapter`); the exact method needs the
    /// local engine, the sampled one any backend.
    pub object_backend: &'a dyn Backend,
    /// Answers the hypothetical prompts (with `settings.hypothetical_adapter`); a cross-prediction
    /// setup puts another model here.
    pub hypothetical_backend: &'a dyn Backend,
    pub settings: CalibrationSettings,
    pub dir: PathBuf,
    /// Strings per backend call.
    pub chunk: usize,
    pub progress: bool,
}

/// Index of the character a property asks about.
fn char_index(p: Property) -> Result<usize> {
    Ok(match p {
        Property::FirstCharacter => 0,
        Property::SecondCharacter => 1,
        Property::ThirdCharacter => 2,
        _ => bail!("calibration asks about a character: first_character, second_character or third_character"),
    })
}

impl<'a> Calibration<'a> {
    fn object_messages(item: &Item) -> Vec<Message> {
        vec![Message::new("user", &item.task.prompt(&item.string))]
    }

    fn hypothetical_messages(&self, item: &Item) -> Result<Vec<Message>> {
        Ok(vec![Message::new(
            "user",
            &format!(
                "{HYPOTHETICAL_PREFIX}{}\" {}",
                item.task.prompt(&item.string),
                item.task.suffix(self.settings.property)?
            ),
        )])
    }

    fn request(&self, messages: Vec<Message>, adapter: &Option<String>) -> ChatRequest {
        ChatRequest {
            messages,
            model: adapter.clone(),
            n: self.settings.samples,
            temperature: 1.0,
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

    fn sampled(&self, items: &[&Item]) -> Result<Vec<StringRecord>> {
        let idx = char_index(self.settings.property)?;
        let object_requests: Vec<ChatRequest> = items
            .iter()
            .map(|i| self.request(Self::object_messages(i), &self.settings.object_adapter))
            .collect();
        let hypothetical_requests = items
            .iter()
            .map(|i| {
                Ok(self.request(
                    self.hypothetical_messages(i)?,
                    &self.settings.hypothetical_adapter,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let objects = self.object_backend.chat(&object_requests)?;
        let hypotheticals = self.hypothetical_backend.chat(&hypothetical_requests)?;
        Ok(items
            .iter()
            .zip(objects.iter().zip(&hypotheticals))
            .map(|(item, (o, h))| {
                let texts = |r: &ChatResponse| -> Vec<String> {
                    r.choices.iter().map(|c| c.text.clone()).collect()
                };
                let object = object_from_samples(&texts(o), idx);
                StringRecord {
                    id: item.id.clone(),
                    task: item.task.name.into(),
                    string: item.string.clone(),
                    object,
                    hypothetical: hypothetical_from_samples(&texts(h)),
                    object_coverage: 1.0,
                    hypothetical_coverage: 1.0,
                }
            })
            .collect())
    }

    fn exact(&self, items: &[&Item]) -> Result<Vec<StringRecord>> {
        let idx = char_index(self.settings.property)?;
        let params = TreeParams {
            max_depth: self.settings.max_tokens,
            ..Default::default()
        };
        let generator =
            |backend: &'a LocalBackend, adapter: &Option<String>| -> Result<Generator<'a>> {
                let mut g = Generator::new(&backend.model);
                g.max_batch_rows = backend.batch_size.max(4) * 4;
                g.adapter = adapter
                    .as_deref()
                    .map(|a| backend.adapter(a).cloned())
                    .transpose()?;
                Ok(g)
            };
        let local = |b: &'a dyn Backend| {
            b.as_local().context(
                "--method exact expands the model's own distribution and needs the local backend; \
                 with a server, use --method sampled",
            )
        };
        let (object_backend, hypothetical_backend) = (
            local(self.object_backend)?,
            local(self.hypothetical_backend)?,
        );
        let (om, hm) = (&object_backend.model, &hypothetical_backend.model);
        let encode = |model: &LoadedModel, m: Vec<Message>| -> Result<Vec<u32>> {
            Ok(model.encode_chat(&m)?.1)
        };
        let decode = |model: &LoadedModel, ids: &[u32]| {
            model.tokenizer.decode(ids, true).unwrap_or_default()
        };
        // The object answer's character is fixed once idx+1 characters follow the leading whitespace.
        let determined = |ids: &[u32]| {
            let text = decode(om, ids);
            let t = text.trim_start_matches(is_py_space);
            t.chars().count() > idx && !t.chars().nth(idx).is_some_and(is_py_space)
        };
        let object_prompts = items
            .iter()
            .map(|i| encode(om, Self::object_messages(i)))
            .collect::<Result<Vec<_>>>()?;
        let hyp_prompts = items
            .iter()
            .map(|i| encode(hm, self.hypothetical_messages(i)?))
            .collect::<Result<Vec<_>>>()?;
        let objects = generator(object_backend, &self.settings.object_adapter)?.expand(
            &object_prompts,
            &params,
            &determined,
        )?;
        let hyps = generator(hypothetical_backend, &self.settings.hypothetical_adapter)?.expand(
            &hyp_prompts,
            &params,
            &|_| false,
        )?;
        Ok(items
            .iter()
            .zip(objects.iter().zip(&hyps))
            .map(|(item, (o, h))| {
                // Object: the paper drops answers too short to have the character; renormalise the rest.
                let mut od = Distribution::new();
                for leaf in &o.leaves {
                    let text = decode(om, &leaf.ids);
                    if let Some(c) = py_strip(&text).chars().nth(idx) {
                        *od.entry(c.to_string()).or_default() += leaf.prob;
                    }
                }
                let mut hd = Distribution::new();
                for leaf in &h.leaves {
                    *hd.entry(py_lower(py_strip(&decode(hm, &leaf.ids))))
                        .or_default() += leaf.prob;
                }
                StringRecord {
                    id: item.id.clone(),
                    task: item.task.name.into(),
                    string: item.string.clone(),
                    object_coverage: 1.0 - o.pruned,
                    hypothetical_coverage: 1.0 - h.pruned,
                    object: normalised(od),
                    hypothetical: normalised(hd),
                }
            })
            .collect())
    }

    pub fn run(&self, items: &[Item]) -> Result<CalibrationResult> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        super::pin_settings(&self.dir.join("calibration-run.json"), &self.settings)?;
        let (log, done) = AppendLog::open::<StringRecord>(&self.dir.join("calibration.jsonl"))?;
        let done_ids: HashSet<String> = done.iter().map(|r| r.id.clone()).collect();
        let pending: Vec<&Item> = items.iter().filter(|i| !done_ids.contains(&i.id)).collect();
        let bar = super::progress_bar(
            self.progress,
            items.len(),
            items.len() - pending.len(),
            "calibration {pos}/{len} strings",
        );
        for chunk in pending.chunks(self.chunk.max(1)) {
            let records = match self.settings.method {
                Method::Sampled => self.sampled(chunk)?,
                Method::Exact => self.exact(chunk)?,
            };
            log.append(&records)?;
            bar.inc(records.len() as u64);
        }
        bar.finish_and_clear();
        let wanted: HashSet<&str> = items.iter().map(|i| i.id.as_str()).collect();
        let records: Vec<StringRecord> =
            super::log::read_log::<StringRecord>(&self.dir.join("calibration.jsonl"))?
                .into_iter()
                .filter(|r| wanted.contains(r.id.as_str()))
                .collect();
        let mut pts = vec![];
        for r in &records {
            if let (Some(o), Some(h)) = (&r.object, &r.hypothetical) {
                pts.extend(points(o, h, 3));
            }
        }
        let bins = equal_count_bins(&pts, 10);
        let top1: Vec<Point> = pts.iter().copied().filter(|p| p.rank == 1).collect();
        let mean = |f: &dyn Fn(&StringRecord) -> f64| {
            records.iter().map(f).sum::<f64>() / records.len().max(1) as f64
        };
        let result = CalibrationResult {
            settings: self.settings.clone(),
            strings: records.len(),
            mad: mad(&bins),
            mad_top1: mad(&equal_count_bins(&top1, 10)),
            object_coverage: mean(&|r| r.object_coverage),
            hypothetical_coverage: mean(&|r| r.hypothetical_coverage),
            points: pts,
            bins,
        };
        crate::fsutil::write_atomic(
            &self.dir.join("calibration.json"),
            serde_json::to_string_pretty(&result)?.as_bytes(),
        )?;
        Ok(result)
    }
}

fn normalised(d: Distribution) -> Option<Distribution> {
    let total: f64 = d.values().sum();
    (total > 0.0).then(|| d.into_iter().map(|(k, v)| (k, v / total)).collect())
}

/// Calibration items: one per (task, string) of the given rows, ids as in object runs.
pub fn items(rows: Vec<Item>) -> Vec<Item> {
    let mut seen = HashSet::new();
    rows.into_iter()
        .filter(|i| seen.insert(row_id(i.task.name, None, &i.string)))
        .collect()
}
