//! The self-report questions, read from the authors' released YAML files (spec §2.3, §2.7): each entry's
//! paraphrases (German/French: each preamble paired with its trivia question) and, for scoring, the word
//! or keyword lists of its `scoring` block. Which entries an experiment asks, and how each is scored, is
//! the experiment TOML's `[[questions]]` list.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// How a question's answers map to a score in [0, 1] (1 = the first arm's policy: risk-seeking,
/// myopic, more apples).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScoreKind {
    /// One word, through positive / negative (/ neutral) word lists.
    Words,
    /// A number from 0 to 100.
    Scale,
    /// The language of the answer: German 1, French 0.
    Language,
}

/// Which of a scoring block's lists score words: the paper's table (`paper_*_words`, where the block has
/// them) or the figure script's (`positive_words`, `negative_words`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WordLists {
    #[default]
    Paper,
    Script,
}

fn four() -> usize {
    4
}

/// One `[[questions]]` entry of an experiment TOML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuestionSpec {
    /// The YAML file, relative to the datasets directory.
    pub file: String,
    /// The entry's `name` in it.
    pub name: String,
    /// How the report names it (default: the entry's name).
    #[serde(default)]
    pub label: Option<String>,
    pub score: ScoreKind,
    /// Word lists given here (e.g. "risk" / "safety" for a two-word question) ...
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub positive: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub negative: Vec<String>,
    /// ... or taken from another entry's scoring block, `FILE#NAME` (default: the entry's own block).
    #[serde(default)]
    pub words_from: Option<String>,
    #[serde(default)]
    pub lists: WordLists,
    /// The entry whose `guesser_prompt` judges the answers' language, `FILE#NAME` (default: its own).
    #[serde(default)]
    pub judge_from: Option<String>,
    /// New tokens per answer (the paper: 4; German/French 10).
    #[serde(default = "four")]
    pub max_tokens: usize,
    /// The paper's value for (first arm, second arm), as the spec digitised it, shown beside ours.
    #[serde(default)]
    pub paper: Option<[f64; 2]>,
}

/// A question as asked: its prompts and the lists that score its answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Question {
    pub name: String,
    pub label: String,
    pub kind: ScoreKind,
    pub prompts: Vec<String>,
    pub max_tokens: usize,
    #[serde(default)]
    pub positive: Vec<String>,
    #[serde(default)]
    pub negative: Vec<String>,
    /// Words the paper's table maps to 0.5 (kept when unmapped answers are dropped).
    #[serde(default)]
    pub neutral: Vec<String>,
    /// Language keywords (the figure script's heuristic): German, French, English.
    #[serde(default)]
    pub keywords: [Vec<String>; 3],
    /// The language judge's prompt, with `{text}` for the answer.
    #[serde(default)]
    pub judge_prompt: Option<String>,
    pub paper: Option<[f64; 2]>,
}

#[derive(Debug, Default, Deserialize)]
struct ScoringBlock {
    #[serde(default)]
    positive_words: Vec<String>,
    #[serde(default)]
    negative_words: Vec<String>,
    #[serde(default)]
    paper_positive_words: Vec<String>,
    #[serde(default)]
    paper_negative_words: Vec<String>,
    #[serde(default)]
    paper_neutral_words: Vec<String>,
    #[serde(default)]
    german_words: Vec<String>,
    #[serde(default)]
    french_words: Vec<String>,
    #[serde(default)]
    english_words: Vec<String>,
}

/// An entry of a question file (only the fields used; the files carry many more).
#[derive(Debug, Deserialize)]
struct Entry {
    name: String,
    #[serde(default)]
    question_paraphrases: Vec<String>,
    #[serde(default)]
    prefix_paraphrases: Vec<String>,
    #[serde(default)]
    prompt_template: Option<String>,
    #[serde(default)]
    scoring: Option<ScoringBlock>,
    #[serde(default)]
    guesser_prompt: Option<String>,
}

fn read_entries(path: &Path) -> Result<Vec<Entry>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_yaml_ng::from_str(&text).with_context(|| {
        format!(
            "{}: not a list of question entries (a YAML error names the line)",
            path.display()
        )
    })
}

fn entry(datasets: &Path, file: &str, name: &str) -> Result<Entry> {
    let path = datasets.join(file);
    read_entries(&path)?
        .into_iter()
        .find(|e| e.name == name)
        .with_context(|| format!("{}: no entry named `{name}`", path.display()))
}

impl QuestionSpec {
    /// Reads the entry and its lists from the files under `datasets`.
    pub fn load(&self, datasets: &Path) -> Result<Question> {
        let e = entry(datasets, &self.file, &self.name)?;
        let what = || format!("{}#{}", self.file, self.name);
        let prompts = if e.prefix_paraphrases.is_empty() {
            e.question_paraphrases.clone()
        } else {
            if e.prefix_paraphrases.len() != e.question_paraphrases.len() {
                bail!(
                    "{}: {} preambles for {} questions; they pair by index",
                    what(),
                    e.prefix_paraphrases.len(),
                    e.question_paraphrases.len()
                );
            }
            let template = e
                .prompt_template
                .as_deref()
                .unwrap_or("{prefix}\n\n{question}");
            e.prefix_paraphrases
                .iter()
                .zip(&e.question_paraphrases)
                .map(|(p, q)| template.replace("{prefix}", p).replace("{question}", q))
                .collect()
        };
        if prompts.is_empty() {
            bail!("{}: the entry has no question_paraphrases", what());
        }
        let other = |field: &str, reference: &str| -> Result<Entry> {
            let (file, name) = reference.split_once('#').with_context(|| {
                format!("{}: {field} must be FILE#NAME, not `{reference}`", what())
            })?;
            entry(datasets, file, name)
        };
        let judge_prompt = match &self.judge_from {
            Some(r) => other("judge_from", r)?.guesser_prompt,
            None => e.guesser_prompt.clone(),
        };
        let block = match &self.words_from {
            Some(r) => other("words_from", r)?.scoring.unwrap_or_default(),
            None => e.scoring.unwrap_or_default(),
        };
        let paper = self.lists == WordLists::Paper && !block.paper_positive_words.is_empty();
        let (mut positive, mut negative, neutral) = if paper {
            (
                block.paper_positive_words,
                block.paper_negative_words,
                block.paper_neutral_words,
            )
        } else {
            (block.positive_words, block.negative_words, vec![])
        };
        if !self.positive.is_empty() || !self.negative.is_empty() {
            positive = self.positive.clone();
            negative = self.negative.clone();
        }
        if self.score == ScoreKind::Words && (positive.is_empty() || negative.is_empty()) {
            bail!(
                "{}: a words question needs positive and negative lists (give them, or words_from = \"FILE#NAME\")",
                what()
            );
        }
        let keywords = [block.german_words, block.french_words, block.english_words];
        if self.score == ScoreKind::Language && keywords.iter().any(Vec::is_empty) {
            bail!(
                "{}: a language question needs german_words, french_words and english_words in its scoring block",
                what()
            );
        }
        Ok(Question {
            label: self.label.clone().unwrap_or_else(|| self.name.clone()),
            name: self.name.clone(),
            kind: self.score,
            prompts,
            max_tokens: self.max_tokens,
            positive,
            negative,
            neutral,
            keywords,
            judge_prompt,
            paper: self.paper,
        })
    }
}

/// One lottery pair of the behaviour check (`lottery_check_pairs.yaml`): A and B as [a, pa, b, pb].
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct LotteryPair {
    #[serde(rename = "A")]
    pub a: [f64; 4],
    #[serde(rename = "B")]
    pub b: [f64; 4],
    pub risky: String,
}

#[derive(Deserialize)]
struct LotteryFile {
    pairs: Vec<LotteryPair>,
}

#[derive(Deserialize)]
struct LotteryTask {
    prompt_template: String,
}

/// Python's `str(float)` for the probabilities the pairs hold (two decimals at most): 0.5, 0.07.
fn py_float(x: f64) -> String {
    let s = format!("{x}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

/// The first `n` lottery prompts with the letter of each one's risky option, filled into the
/// authors' template exactly as their script prints them.
pub fn lottery_prompts(datasets: &Path, n: usize) -> Result<Vec<(String, String)>> {
    let dir = datasets.join("eval_questions/from_rephrasings_script");
    let task_path = dir.join("lottery_check.yaml");
    let tasks: Vec<LotteryTask> = serde_yaml_ng::from_str(
        &std::fs::read_to_string(&task_path)
            .with_context(|| format!("cannot read {}", task_path.display()))?,
    )
    .with_context(|| format!("{}: not the lottery task", task_path.display()))?;
    let template = &tasks
        .first()
        .context("lottery_check.yaml has no task")?
        .prompt_template;
    let pairs_path = dir.join("lottery_check_pairs.yaml");
    let file: LotteryFile = serde_yaml_ng::from_str(
        &std::fs::read_to_string(&pairs_path)
            .with_context(|| format!("cannot read {}", pairs_path.display()))?,
    )
    .with_context(|| format!("{}: not a list of pairs", pairs_path.display()))?;
    if file.pairs.len() < n {
        bail!(
            "{} has {} pairs; the config asks for {n}",
            pairs_path.display(),
            file.pairs.len()
        );
    }
    Ok(file
        .pairs
        .iter()
        .take(n)
        .map(|p| {
            let fill = |t: String, key: &str, l: &[f64; 4]| {
                t.replace(&format!("{{{key}.a}}"), &format!("{}", l[0]))
                    .replace(&format!("{{{key}.pa}}"), &py_float(l[1]))
                    .replace(&format!("{{{key}.b}}"), &format!("{}", l[2]))
                    .replace(&format!("{{{key}.pb}}"), &py_float(l[3]))
            };
            let prompt = fill(fill(template.clone(), "l1", &p.a), "l2", &p.b);
            (prompt, p.risky.clone())
        })
        .collect())
}
