//! Self-/cross-prediction accuracy (spec §6): a predictor's hypothetical answers joined with a target's
//! object-level answers, per task × property, under the paper's two analysis paths; the mode baseline,
//! compliance rates and confidence intervals.

pub mod calibration;
pub mod entropy;
pub mod report;

use std::collections::{BTreeMap, HashMap, HashSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::runs::Record;
use crate::tasks::task::Role;
use crate::tasks::text::{apply_all_cleaning, clean_for_comparison, py_lower};
use crate::tasks::{complies, Group, Property, Task};

/// One of the paper's two analysis paths (spec §4.3–4.4, §6.3), path B by either set of rules (§6.9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// Path B by the spec's rules (Fig. 1 and the cross-prediction figure): object value and raw
    /// hypothetical lower-cased, nothing else; rows whose object answer is non-compliant or leaves the
    /// property undefined are excluded, non-compliant hypothetical answers count as wrong; the mode is
    /// taken over the kept rows' lower-cased values and the overall baseline is the unweighted mean of
    /// the per-pair baselines.
    PathB,
    /// Path B as the authors' notebook computes it (§6.9): rows with a compliant object answer are kept
    /// even where the property is undefined (scored wrong); the baseline is the mode of the target's
    /// raw-case values over all its compliant object answers (pandas' `mode()[0]`: ties to the smallest
    /// value), compared raw; the overall baseline is the unweighted mean of the per-pair baselines. The
    /// predictor's rows are restricted beforehand to strings its own object answer complied with
    /// ([`own_compliant_rows`]).
    PathBNotebook,
    /// Path A (the before/after-training figure): the hypothetical answer is cleaned (lower-case,
    /// ASCII punctuation removed, whitespace collapsed), the object value only lower-cased and stripped;
    /// every row is kept; the mode is taken over all rows and the overall baseline is row-weighted.
    PathA,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::PathB => "path_b",
            Variant::PathBNotebook => "path_b_notebook",
            Variant::PathA => "path_a",
        }
    }

    /// The object value as compared (None = undefined → "none", as the paper writes it).
    pub fn object_key(self, value: Option<&str>) -> String {
        let v = value.unwrap_or("none");
        match self {
            Variant::PathB | Variant::PathBNotebook => py_lower(v),
            Variant::PathA => clean_for_comparison(v),
        }
    }

    pub fn hypothetical_key(self, answer: &str) -> String {
        match self {
            Variant::PathB | Variant::PathBNotebook => py_lower(answer),
            Variant::PathA => clean_for_comparison(&apply_all_cleaning(answer)),
        }
    }
}

/// Which rules path B follows: the authors' notebook (the paper's numbers) or the spec's reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Rules {
    #[default]
    Notebook,
    Spec,
}

impl Rules {
    pub fn path_b(self) -> Variant {
        match self {
            Rules::Notebook => Variant::PathBNotebook,
            Rules::Spec => Variant::PathB,
        }
    }

    pub fn other(self) -> Rules {
        match self {
            Rules::Notebook => Rules::Spec,
            Rules::Spec => Rules::Notebook,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Rules::Notebook => "notebook",
            Rules::Spec => "spec",
        }
    }

    /// The variants an evaluation under these rules reports: its path B, then path A.
    pub fn variants(self) -> [Variant; 2] {
        [self.path_b(), Variant::PathA]
    }
}

/// One scored row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoredRow {
    pub task: String,
    pub property: String,
    pub string: String,
    /// The target's property value (None = undefined: the answer is too short for it).
    pub object_value: Option<String>,
    /// The target's object answer passed its task's compliance checks.
    pub object_compliant: bool,
    pub hypothetical: String,
    pub hypothetical_compliant: bool,
}

/// Joins hypothetical records (predictor) with object records (target) on (task, string) and computes
/// the target's property value for each. Hypothetical rows without an object answer are left out
/// (returned count), as are rows whose object or hypothetical samples had no mode.
pub fn join(hypothetical: &[Record], object: &[Record]) -> (Vec<ScoredRow>, usize) {
    let by_string: HashMap<(&str, &str), &Record> = object
        .iter()
        .map(|r| ((r.task.as_str(), r.string.as_str()), r))
        .collect();
    let mut rows = vec![];
    let mut unmatched = 0;
    for h in hypothetical {
        let (Some(prop_name), Some(answer)) = (&h.property, &h.response) else {
            unmatched += 1;
            continue;
        };
        let Some(o) = by_string.get(&(h.task.as_str(), h.string.as_str())) else {
            unmatched += 1;
            continue;
        };
        let Some(property) = Property::parse(prop_name).filter(|_| o.response.is_some()) else {
            unmatched += 1;
            continue;
        };
        let value = o.value(property);
        rows.push(ScoredRow {
            task: h.task.clone(),
            property: property.name().into(),
            string: h.string.clone(),
            object_compliant: o.compliant,
            object_value: value,
            hypothetical: answer.clone(),
            hypothetical_compliant: h.compliant,
        });
    }
    (rows, unmatched)
}

/// Accuracy of one set of rows with its confidence intervals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// Rows scored (after the variant's exclusions).
    pub n: usize,
    pub correct: usize,
    pub accuracy: f64,
    /// Bootstrap 95 % percentile interval (1000 resamples, seeded).
    pub ci95: [f64; 2],
    /// Standard error of the mean (sample std, n − 1); the paper's bars are ±1.96·SE.
    pub se: f64,
    /// The always-guess-the-most-common-value baseline.
    pub mode_baseline: f64,
    /// Rows joined before exclusions, and the share whose object / hypothetical answer complied.
    pub joined: usize,
    pub object_compliance: f64,
    pub hypothetical_compliance: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairScore {
    pub task: String,
    pub property: String,
    /// The most common object value (as compared).
    pub mode: Option<String>,
    #[serde(flatten)]
    pub score: Score,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub variant: Variant,
    pub pairs: Vec<PairScore>,
    /// Micro-average over every row of every pair except `identity`.
    pub overall: Score,
    /// The same over held-out (test) tasks only, and over held-in (train) tasks only, when present.
    pub held_out: Option<Score>,
    pub held_in: Option<Score>,
}

/// The paper's `statistics.mode`: the most common value, ties to the first seen.
pub fn mode<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let mut counts: Vec<(&str, usize)> = vec![];
    let mut index: HashMap<&str, usize> = HashMap::new();
    for v in values {
        match index.get(v) {
            Some(&i) => counts[i].1 += 1,
            None => {
                index.insert(v, counts.len());
                counts.push((v, 1));
            }
        }
    }
    let best = counts.iter().map(|c| c.1).max()?;
    counts.into_iter().find(|c| c.1 == best).map(|c| c.0)
}

/// Bootstrap percentile interval of the mean of 0/1 outcomes.
pub fn bootstrap_ci(outcomes: &[bool], resamples: usize, seed: u64) -> [f64; 2] {
    let values: Vec<f64> = outcomes.iter().map(|&b| f64::from(u8::from(b))).collect();
    bootstrap_mean_ci(&values, resamples, seed)
}

/// Percentile bootstrap interval of a mean (resampling with replacement, seeded).
pub fn bootstrap_mean_ci(values: &[f64], resamples: usize, seed: u64) -> [f64; 2] {
    let n = values.len();
    if n == 0 {
        return [f64::NAN, f64::NAN];
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| (0..n).map(|_| values[rng.random_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[((q * (resamples - 1) as f64).round() as usize).min(resamples - 1)];
    [at(0.025), at(0.975)]
}

/// Standard error of the mean of 0/1 outcomes (sample std, n − 1).
pub fn std_err(outcomes: &[bool]) -> f64 {
    let n = outcomes.len() as f64;
    if n < 2.0 {
        return f64::NAN;
    }
    let p = outcomes.iter().filter(|&&b| b).count() as f64 / n;
    // Sample variance of 0/1 values: n/(n−1)·p(1−p).
    (p * (1.0 - p) * n / (n - 1.0)).sqrt() / n.sqrt()
}

/// One row under `variant`: `None` when the variant excludes it, else (correct, object key).
pub fn outcome(variant: Variant, r: &ScoredRow) -> Option<(bool, String)> {
    let defined = r.object_value.is_some();
    let kept = match variant {
        Variant::PathB => r.object_compliant && defined,
        Variant::PathBNotebook => r.object_compliant,
        Variant::PathA => true,
    };
    if !kept {
        return None;
    }
    let obj = variant.object_key(r.object_value.as_deref());
    let hyp = variant.hypothetical_key(&r.hypothetical);
    let correct = match variant {
        Variant::PathB => obj == hyp && r.hypothetical_compliant,
        // An undefined value is a row the notebook scores wrong.
        Variant::PathBNotebook => defined && obj == hyp && r.hypothetical_compliant,
        Variant::PathA => obj == hyp,
    };
    Some((correct, obj))
}

/// The rows of a predictor whose own object-level answer to the string passed the `default`
/// compliance checks (spec §6.1: the authors ask a predictor only about those strings). A string the
/// predictor has no object answer for is dropped.
pub fn own_compliant_rows(rows: &[ScoredRow], predictor_object: &[Record]) -> Vec<ScoredRow> {
    let complied: HashSet<(&str, &str)> = predictor_object
        .iter()
        .filter(|o| {
            o.response
                .as_deref()
                .is_some_and(|r| complies(r, &[Group::Default]))
        })
        .map(|o| (o.task.as_str(), o.string.as_str()))
        .collect();
    rows.iter()
        .filter(|r| complied.contains(&(r.task.as_str(), r.string.as_str())))
        .cloned()
        .collect()
}

/// pandas' `Series.mode()[0]`: the most common value, ties to the smallest.
pub fn pandas_mode<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for v in values {
        *counts.entry(v).or_default() += 1;
    }
    let best = *counts.values().max()?;
    counts.into_iter().find(|c| c.1 == best).map(|c| c.0)
}

/// The notebook's mode baseline of one (task, property) (spec §6.9): over every compliant object answer
/// of the target to the task, the most common raw-case property value, and the share of those answers
/// whose value is exactly it (an undefined value never is).
pub fn notebook_baseline(target_object: &[&Record], property: Property) -> (Option<String>, f64) {
    let values: Vec<Option<String>> = target_object
        .iter()
        .filter(|o| o.compliant && o.response.is_some())
        .map(|o| o.value(property))
        .collect();
    let m = pandas_mode(values.iter().flatten().map(String::as_str)).map(String::from);
    let baseline = match &m {
        Some(m) => {
            values.iter().filter(|v| v.as_ref() == Some(m)).count() as f64 / values.len() as f64
        }
        None => f64::NAN,
    };
    (m, baseline)
}

/// The evaluated rows of one pair under `variant`: (correct, object key) per kept row.
fn outcomes(variant: Variant, rows: &[&ScoredRow]) -> Vec<(bool, String)> {
    rows.iter().filter_map(|r| outcome(variant, r)).collect()
}

/// k of n as a fraction; NaN when there is nothing to count (an empty bar, not a zero one).
pub(crate) fn share(k: usize, n: usize) -> f64 {
    if n == 0 {
        f64::NAN
    } else {
        k as f64 / n as f64
    }
}

fn score(rows: &[&ScoredRow], kept: &[(bool, String)], mode_baseline: f64) -> Score {
    let flags: Vec<bool> = kept.iter().map(|k| k.0).collect();
    let n = flags.len();
    let correct = flags.iter().filter(|&&b| b).count();
    let joined = rows.len();
    let frac = |k: usize| share(k, joined);
    Score {
        n,
        correct,
        accuracy: share(correct, n),
        ci95: bootstrap_ci(&flags, 1000, 42),
        se: std_err(&flags),
        mode_baseline,
        joined,
        object_compliance: frac(rows.iter().filter(|r| r.object_compliant).count()),
        hypothetical_compliance: frac(rows.iter().filter(|r| r.hypothetical_compliant).count()),
    }
}

/// One pair's rows, kept outcomes and baseline, pooled into the micro-averages.
struct Pooled<'a> {
    rows: Vec<&'a ScoredRow>,
    kept: Vec<(bool, String)>,
    baseline: f64,
    role: Option<Role>,
    property: Property,
}

/// Scores every (task, property) and the micro-averages under `variant`. `target_object` is the
/// target's object-level run, whose compliant answers make the notebook's baseline (the other variants
/// take theirs from the scored rows).
pub fn evaluate(rows: &[ScoredRow], variant: Variant, target_object: &[Record]) -> Evaluation {
    let mut by_task: HashMap<&str, Vec<&Record>> = HashMap::new();
    for o in target_object {
        by_task.entry(o.task.as_str()).or_default().push(o);
    }
    // Pairs in a stable order: by task, then the property's order in the paper's list.
    let mut by_pair: BTreeMap<(String, Property), Vec<&ScoredRow>> = BTreeMap::new();
    for r in rows {
        let p = Property::parse(&r.property).expect("joined rows carry known properties");
        by_pair.entry((r.task.clone(), p)).or_default().push(r);
    }
    let mut pairs = vec![];
    let mut pooled: Vec<Pooled> = vec![];
    for ((task, property), prs) in by_pair {
        let kept = outcomes(variant, &prs);
        let (m, baseline) = if variant == Variant::PathBNotebook {
            let objects = by_task.get(task.as_str()).map_or(&[][..], Vec::as_slice);
            notebook_baseline(objects, property)
        } else {
            let m = mode(kept.iter().map(|k| k.1.as_str())).map(String::from);
            let baseline = match &m {
                Some(m) if !kept.is_empty() => {
                    kept.iter().filter(|k| &k.1 == m).count() as f64 / kept.len() as f64
                }
                _ => f64::NAN,
            };
            (m, baseline)
        };
        pairs.push(PairScore {
            task: task.clone(),
            property: property.name().into(),
            mode: m,
            score: score(&prs, &kept, baseline),
        });
        let role = Task::get(&task).ok().map(|t| t.role);
        pooled.push(Pooled {
            rows: prs,
            kept,
            baseline,
            role,
            property,
        });
    }
    let overall_of = |keep: &dyn Fn(Option<Role>) -> bool| -> Option<Score> {
        let chosen: Vec<&Pooled> = pooled
            .iter()
            .filter(|p| p.property != Property::Identity && keep(p.role))
            .collect();
        if chosen.is_empty() {
            return None;
        }
        let rows: Vec<&ScoredRow> = chosen.iter().flat_map(|p| p.rows.iter().copied()).collect();
        let kept: Vec<(bool, String)> =
            chosen.iter().flat_map(|p| p.kept.iter().cloned()).collect();
        let baselines: Vec<(f64, usize)> = chosen
            .iter()
            .filter(|p| p.baseline.is_finite())
            .map(|p| (p.baseline, p.kept.len()))
            .collect();
        let baseline = match variant {
            // Unweighted mean of the per-pair baselines (the Fig. 1 notebook).
            Variant::PathB | Variant::PathBNotebook => {
                baselines.iter().map(|b| b.0).sum::<f64>() / baselines.len() as f64
            }
            // Each row keeps its own pair's mode (row-weighted).
            Variant::PathA => {
                let total: usize = baselines.iter().map(|b| b.1).sum();
                baselines.iter().map(|b| b.0 * b.1 as f64).sum::<f64>() / total as f64
            }
        };
        Some(score(&rows, &kept, baseline))
    };
    let overall = overall_of(&|_| true).unwrap_or_else(|| score(&[], &[], f64::NAN));
    Evaluation {
        variant,
        pairs,
        overall,
        held_out: overall_of(&|r| r == Some(Role::Test)),
        held_in: overall_of(&|r| r == Some(Role::Train)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_ties_go_to_the_first_seen() {
        assert_eq!(mode(["b", "a", "a", "b", "c"]), Some("b"));
        assert_eq!(mode(["b", "a", "a"]), Some("a"));
        assert_eq!(mode(Vec::<&str>::new()), None);
        assert_eq!(pandas_mode(["b", "a", "a", "b", "c"]), Some("a"));
        assert_eq!(pandas_mode(["T", "t", "t"]), Some("t"));
    }

    #[test]
    fn bootstrap_brackets_the_mean() {
        let x: Vec<bool> = (0..200).map(|i| i % 4 == 0).collect();
        let [lo, hi] = bootstrap_ci(&x, 1000, 42);
        assert!(lo < 0.25 && 0.25 < hi && hi - lo < 0.15, "{lo} {hi}");
        assert_eq!(bootstrap_ci(&[true; 10], 100, 1), [1.0, 1.0]);
    }
}
