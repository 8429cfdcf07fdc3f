//! A self-awareness experiment's TOML (see experiments/self-awareness/): the base model, the two
//! trained arms (each a released training file with its seeds), the finetuning recipe, the questions
//! and how they are asked, and the behaviour check. Unknown keys are refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::questions::{Question, QuestionSpec};
use crate::experiment::config::ModelSpec;
use crate::train::trainer::FinetuneConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwarenessConfig {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The released data: `train/` and `eval_questions/` (relative paths resolve against the config's
    /// directory).
    pub datasets: PathBuf,
    /// The base model; it is also the untrained third arm and the language judge.
    pub model: ModelSpec,
    /// The first arm is the policy a score of 1 stands for (risk-seeking, myopic, more apples).
    pub arms: [Arm; 2],
    /// One model per arm and seed (the seed of LoRA init and data order).
    pub seeds: Vec<u64>,
    /// The recipe of every arm (its `seed` is replaced by each of `seeds`).
    #[serde(default)]
    pub finetune: FinetuneConfig,
    /// Rows of each training file used, from the top (0: all); the held-out rows come after them.
    #[serde(default)]
    pub train_rows: usize,
    pub ask: AskConfig,
    pub questions: Vec<QuestionSpec>,
    #[serde(default)]
    pub behaviour: BehaviourConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Arm {
    pub name: String,
    /// A training JSONL under `datasets` (one user turn, one assistant letter per row).
    pub train: String,
}

/// How every question is asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AskConfig {
    /// Samples per paraphrase at temperature 1 (the GPT-4o pipeline: 100).
    pub samples: usize,
    /// Paraphrases asked per question, from the top (0: all).
    #[serde(default)]
    pub paraphrases: usize,
    /// Also read each word question's first-token probabilities (max_tokens 1, top 5 log-probs).
    #[serde(default = "yes")]
    pub first_token: bool,
    /// Also expand the model's exact answer distribution (local models only): every answer of up to
    /// max_tokens tokens more likely than `min_prob`.
    #[serde(default = "yes")]
    pub exact: bool,
    #[serde(default = "min_prob")]
    pub min_prob: f64,
    /// Judge German/French answers with the base model at temperature 0 (beside the keyword rule).
    #[serde(default = "yes")]
    pub judge: bool,
    /// Seed of the first paraphrase's samples; paraphrase i uses seed + i.
    #[serde(default)]
    pub seed: u64,
}

fn yes() -> bool {
    true
}

fn min_prob() -> f64 {
    1e-3
}

/// Did the behaviour move? The authors' lottery check, and the choices of held-out training rows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BehaviourConfig {
    /// Lottery pairs asked (the authors' script: 100; 0: none). Only meaningful for risk.
    #[serde(default)]
    pub lottery_pairs: usize,
    /// Rows after `train_rows` of each file, never trained on, whose letter choices are checked.
    #[serde(default)]
    pub heldout_rows: usize,
}

impl AwarenessConfig {
    /// The questions the config asks, read from the released YAML.
    pub fn load_questions(&self) -> Result<Vec<Question>> {
        self.questions
            .iter()
            .map(|q| q.load(&self.datasets))
            .collect()
    }

    /// Reads and checks a config.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read experiment config {}", path.display()))?;
        let mut cfg: Self =
            toml::from_str(&text).with_context(|| format!("{}: invalid config", path.display()))?;
        if cfg.datasets.is_relative() {
            cfg.datasets = path.parent().unwrap_or(Path::new(".")).join(&cfg.datasets);
        }
        cfg.check()
            .with_context(|| format!("{}: invalid config", path.display()))?;
        Ok(cfg)
    }

    fn check(&self) -> Result<()> {
        if self.seeds.is_empty() {
            bail!("seeds: give at least one seed per arm");
        }
        if self.arms[0].name == self.arms[1].name || self.arms.iter().any(|a| a.name == "base") {
            bail!("arms: two different names, neither `base` (the untrained model's)");
        }
        if self.ask.samples == 0 {
            bail!("ask.samples must be at least 1");
        }
        if self.questions.is_empty() {
            bail!("questions: ask at least one");
        }
        if self.ask.exact && !self.model.backend.is_local() {
            bail!("ask.exact: a model behind a server has no exact distribution here; set exact = false");
        }
        for q in &self.questions {
            q.load(&self.datasets)
                .with_context(|| format!("questions: {}", q.name))?;
        }
        for arm in &self.arms {
            let p = self.datasets.join(&arm.train);
            if !p.is_file() {
                bail!("arms: `{}` has no training file {}", arm.name, p.display());
            }
        }
        Ok(())
    }

    /// The models of the run: the base, then each arm's, seed by seed.
    pub fn model_names(&self) -> Vec<String> {
        let mut names = vec!["base".to_string()];
        for arm in &self.arms {
            for s in &self.seeds {
                names.push(format!("{}-s{s}", arm.name));
            }
        }
        names
    }

    pub fn seed_list(&self) -> BTreeMap<String, u64> {
        let mut s = BTreeMap::new();
        for seed in &self.seeds {
            s.insert(
                format!("finetune seed {seed} (LoRA init, data order)"),
                *seed,
            );
        }
        s.insert("sampling (paraphrase i: seed + i)".into(), self.ask.seed);
        s
    }
}
