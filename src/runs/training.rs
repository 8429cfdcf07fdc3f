//! Self- and cross-prediction training sets (spec §5): hypothetical question → the property value of a
//! model's own object-level answer. Self-prediction uses the trained model's own object run,
//! cross-prediction another model's; the builder is the same.

use std::collections::{BTreeMap, HashSet};

use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use super::Record;
use crate::model::Message;
use crate::tasks::{complies, Property, Task};

#[derive(Debug, Clone)]
pub struct TrainingSetConfig {
    /// At most this many examples per (task, property) (the paper: 1000).
    pub per_pair: usize,
    pub seed: u64,
    /// Only these properties (default: each task's own list, the paper's mixture).
    pub properties: Option<Vec<Property>>,
    /// The system message of every example (the paper: empty).
    pub system: Option<String>,
}

impl Default for TrainingSetConfig {
    fn default() -> Self {
        Self {
            per_pair: 1000,
            seed: 0,
            properties: None,
            system: Some(String::new()),
        }
    }
}

/// One example in OpenAI's fine-tuning format.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatExample {
    pub messages: Vec<Message>,
}

/// How many examples each (task, property) gave, and why others were left out.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PairCount {
    pub examples: usize,
    pub non_compliant: usize,
    pub undefined: usize,
}

/// Counts by (task, property).
pub type PairCounts = BTreeMap<(String, String), PairCount>;

/// Builds the examples from object-level records, shuffled with the seed.
pub fn build(
    records: &[Record],
    cfg: &TrainingSetConfig,
) -> Result<(Vec<ChatExample>, PairCounts)> {
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut per_pair: BTreeMap<(String, String), Vec<ChatExample>> = BTreeMap::new();
    let mut counts: BTreeMap<(String, String), PairCount> = BTreeMap::new();
    for r in records {
        if r.property.is_some() {
            bail!(
                "record {} is from a hypothetical run; training sets come from object-level runs",
                r.id
            );
        }
        let task = Task::get(&r.task)?;
        let properties: Vec<Property> = match &cfg.properties {
            Some(ps) => task
                .properties
                .iter()
                .copied()
                .filter(|p| ps.contains(p))
                .collect(),
            None => task.properties.to_vec(),
        };
        for p in properties {
            let key = (task.name.to_string(), p.name().to_string());
            let count = counts.entry(key.clone()).or_default();
            // Non-compliant answers are dropped by the task's groups (the paper's main pipeline).
            if !r
                .response
                .as_deref()
                .is_some_and(|t| complies(t, task.object_groups))
            {
                count.non_compliant += 1;
                continue;
            }
            let value = r.value(p);
            let Some(value) = value.filter(|v| !["none", "None", "nan"].contains(&v.as_str()))
            else {
                count.undefined += 1;
                continue;
            };
            let mut messages = vec![];
            if let Some(s) = &cfg.system {
                messages.push(Message::new("system", s));
            }
            messages.push(Message::new(
                "user",
                &task.hypothetical_prompt(&r.string, p)?,
            ));
            messages.push(Message::new("assistant", &value));
            per_pair
                .entry(key)
                .or_default()
                .push(ChatExample { messages });
        }
    }
    let mut all = vec![];
    let mut seen = HashSet::new();
    for (key, mut examples) in per_pair {
        examples.shuffle(&mut rng);
        examples.truncate(cfg.per_pair);
        let mut kept = 0;
        for e in examples {
            let k = (
                e.messages[e.messages.len() - 2].content.clone(),
                e.messages.last().unwrap().content.clone(),
            );
            if seen.insert(k) {
                all.push(e);
                kept += 1;
            }
        }
        counts.get_mut(&key).unwrap().examples = kept;
    }
    all.shuffle(&mut rng);
    Ok((all, counts))
}

/// The examples as JSONL text.
pub fn to_jsonl(examples: &[ChatExample]) -> String {
    let mut s = String::new();
    for e in examples {
        s.push_str(&serde_json::to_string(e).expect("examples serialise"));
        s.push('\n');
    }
    s
}
