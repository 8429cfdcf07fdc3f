//! An experiment's TOML: the two models, the tasks and their sizes, generation and finetuning settings
//! of each stage. Unknown keys are refused (a typo must not silently fall back to a default).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::backend::OpenAiConfig;
use crate::eval::Rules;
use crate::model::{QuantType, WeightMode};
use crate::runs::calibrate::Method;
use crate::tasks::task::{Role, Source};
use crate::tasks::{Property, Task};
use crate::train::trainer::FinetuneConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// M1: the model that is self-trained and whose behaviour is predicted.
    pub m1: ModelSpec,
    /// M2: the cross-predictor, trained on M1ft's behaviour.
    pub m2: ModelSpec,
    pub data: DataConfig,
    #[serde(default)]
    pub generation: GenerationConfig,
    /// Self- and cross-prediction finetuning (the same recipe for both, as the paper).
    #[serde(default)]
    pub finetune: FinetuneConfig,
    #[serde(default)]
    pub shift: ShiftConfig,
    #[serde(default)]
    pub calibration: CalibrationConfig,
    /// The model that reads LLM-extracted properties (main character name, sympathetic advice) off
    /// object-level answers; default: M1's base model. Any backend, as `m1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extractor: Option<ModelSpec>,
    /// How the report scores the stored answers (changes no stage; `experiment report --rules` too).
    #[serde(default)]
    pub analysis: AnalysisConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnalysisConfig {
    /// Path B's rules for the self/cross figure: "notebook" (the authors' notebook: the paper's
    /// numbers) or "spec"; the report gives the other beside it where they differ.
    pub rules: Rules,
    /// The entropy-controlled comparisons (spec §6.7): how many of bar A's most common values per
    /// (task, property) are matched, and the seed of the shuffle that picks the rows.
    pub entropy_top_values: usize,
    pub entropy_seed: u64,
}

impl Default for AnalysisConfig {
    fn default() -> Self {
        Self {
            rules: Rules::Notebook,
            entropy_top_values: 100,
            entropy_seed: 42,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Registry id, HF directory, .gguf file or hf-hub repo id.
    pub model: String,
    /// How it is named in the report.
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub weights: WeightMode,
    /// The block type `weights = "quantized"` quantizes a dense (HF) checkpoint to at load.
    #[serde(default)]
    pub quantize: QuantType,
    /// Make this model behave differently before it is used: finetune it on its own sampled answers to
    /// the object-level prompts of every task's train split and merge the adapter (the honest local M2
    /// when only one real model is installed; on M1, the reverse direction of such a pair).
    #[serde(default)]
    pub derive: Option<DeriveConfig>,
    /// Where the model answers: this process (default) or an OpenAI-compatible server, where `model`
    /// is the server's name for it and every finetuning stage is a hosted job.
    #[serde(default, skip_serializing_if = "BackendSpec::is_local")]
    pub backend: BackendSpec,
}

/// `backend = { kind = "openai", base_url = "...", api_key_env = "..." }` (and OpenAiConfig's other
/// fields), or `kind = "local"`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum BackendSpec {
    #[default]
    Local,
    Openai(OpenAiConfig),
}

impl BackendSpec {
    pub fn is_local(&self) -> bool {
        *self == BackendSpec::Local
    }
}

impl ModelSpec {
    pub fn label(&self, role: &str) -> String {
        self.label.clone().unwrap_or_else(|| role.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeriveConfig {
    /// Sampling temperature of the answers it is trained on.
    #[serde(default = "one")]
    pub temperature: f32,
    #[serde(default = "one_u64")]
    pub seed: u64,
    #[serde(default)]
    pub finetune: FinetuneConfig,
}

fn one() -> f32 {
    1.0
}
fn one_u64() -> u64 {
    1
}

/// Strings of a task that has no generator: JSONL files with `string` (and `target`) per line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalStrings {
    pub train: PathBuf,
    pub val: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Tasks whose train split makes the self-/cross-prediction training data.
    pub train_tasks: Vec<String>,
    /// Tasks never trained on: evaluated on their val split (their train split feeds the behaviour
    /// shift).
    pub held_out_tasks: Vec<String>,
    /// Properties asked about (default: each task's own list).
    #[serde(default)]
    pub properties: Option<Vec<String>>,
    /// Strings per task in the train and val splits (generated tasks).
    pub n_train: usize,
    pub n_val: usize,
    /// Training examples per (task, property) at most (the paper: 1000).
    #[serde(default = "thousand")]
    pub per_pair: usize,
    /// Seed of the string generators and of the training-set shuffles.
    #[serde(default)]
    pub seed: u64,
    /// Tasks without a generator: where their strings are (relative to the config file).
    #[serde(default)]
    pub strings: BTreeMap<String, ExternalStrings>,
}

fn thousand() -> usize {
    1000
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationConfig {
    /// The paper used the provider's default (no limit); the properties read the first words only.
    pub object_max_tokens: usize,
    pub hypothetical_max_tokens: usize,
    /// Sequences decoded together.
    pub batch_size: usize,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            object_max_tokens: 256,
            hypothetical_max_tokens: 32,
            batch_size: 32,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShiftConfig {
    pub enabled: bool,
    /// Object-level examples per held-out task (its train split) that teach M1ft M2's behaviour.
    pub n_train: usize,
    pub finetune: FinetuneConfig,
}

impl Default for ShiftConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            n_train: 1000,
            finetune: FinetuneConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CalibrationConfig {
    pub enabled: bool,
    pub task: String,
    pub property: String,
    /// The first this many val strings of the task (the paper: 500).
    pub strings: usize,
    pub method: Method,
    /// Samples per prompt (sampled method; the paper: 20).
    pub samples: usize,
    pub seed: u64,
}

impl Default for CalibrationConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            task: "animals_long".into(),
            property: "second_character".into(),
            strings: 500,
            method: Method::Sampled,
            samples: 20,
            seed: 0,
        }
    }
}

impl ExperimentConfig {
    /// Reads and checks a config; relative string paths are resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read experiment config {}", path.display()))?;
        let mut cfg: Self =
            toml::from_str(&text).with_context(|| format!("{}: invalid config", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for s in cfg.data.strings.values_mut() {
            for p in [&mut s.train, &mut s.val] {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        cfg.check()
            .with_context(|| format!("{}: invalid config", path.display()))?;
        Ok(cfg)
    }

    fn check(&self) -> Result<()> {
        if self.data.train_tasks.is_empty() || self.data.held_out_tasks.is_empty() {
            bail!("data.train_tasks and data.held_out_tasks need at least one task each");
        }
        for (field, names, role) in [
            ("data.train_tasks", &self.data.train_tasks, Role::Train),
            ("data.held_out_tasks", &self.data.held_out_tasks, Role::Test),
        ] {
            for name in names {
                let task = Task::get(name).with_context(|| format!("{field}: `{name}`"))?;
                if task.role != role {
                    bail!(
                        "{field}: `{name}` is a {:?} task in the paper; held-out tasks must never be trained on",
                        task.role
                    );
                }
                if let Source::External(stem) = task.source {
                    if !self.data.strings.contains_key(name) {
                        bail!("{field}: `{name}` has no generator; give its strings as [data.strings.{name}] train = \"...\", val = \"...\" (the paper's {stem})");
                    }
                }
            }
        }
        self.properties()?;
        if self.data.n_train == 0 || self.data.n_val == 0 {
            bail!("data.n_train and data.n_val must be at least 1");
        }
        let cal = &self.calibration;
        if cal.enabled {
            Task::get(&cal.task).context("calibration.task")?;
            Property::parse(&cal.property)
                .with_context(|| format!("calibration.property: unknown `{}`", cal.property))?;
            let remote = !(self.m1.backend.is_local() && self.m2.backend.is_local());
            if remote && cal.method != Method::Sampled {
                bail!("calibration.method: a model behind a server is calibrated by sampling; set method = \"sampled\" (the exact method expands the local engine's distribution)");
            }
        }
        Ok(())
    }

    /// The properties asked about, if restricted.
    pub fn properties(&self) -> Result<Option<Vec<Property>>> {
        self.data
            .properties
            .as_ref()
            .map(|ps| {
                ps.iter()
                    .map(|p| {
                        Property::parse(p).with_context(|| {
                            format!(
                                "data.properties: unknown `{p}`; known: {}",
                                Property::ALL.map(|p| p.name()).join(", ")
                            )
                        })
                    })
                    .collect()
            })
            .transpose()
    }

    /// Every seed of the run by where it is used.
    pub fn seeds(&self) -> BTreeMap<String, u64> {
        let mut s = BTreeMap::from([
            (
                "data (string generators, training-set shuffles)".to_string(),
                self.data.seed,
            ),
            (
                "finetune (self and cross: LoRA init, data order, dropout)".to_string(),
                self.finetune.seed,
            ),
            ("calibration sampling".to_string(), self.calibration.seed),
        ]);
        if self.shift.enabled {
            s.insert("shift finetune".into(), self.shift.finetune.seed);
        }
        for (role, spec) in [("m1", &self.m1), ("m2", &self.m2)] {
            if let Some(d) = &spec.derive {
                s.insert(format!("{role} derive sampling"), d.seed);
                s.insert(format!("{role} derive finetune"), d.finetune.seed);
            }
        }
        s
    }

    /// Every task of the experiment, train tasks first.
    pub fn tasks(&self) -> impl Iterator<Item = &str> {
        self.data
            .train_tasks
            .iter()
            .chain(&self.data.held_out_tasks)
            .map(String::as_str)
    }
}
