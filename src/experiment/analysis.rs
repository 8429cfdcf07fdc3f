//! The experiments' statistics on stored records: paired self-vs-cross comparisons (McNemar's exact test
//! and a paired bootstrap of the difference) and the behaviour-shift split (spec §6.4–6.5).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::config::AnalysisConfig;
use crate::eval::entropy::{entropy_controlled, BarRow, EntropyControlled};
use crate::eval::{bootstrap_ci, bootstrap_mean_ci, join, outcome, std_err, ScoredRow, Variant};
use crate::runs::Record;
use crate::tasks::Property;

/// Two predictors scored on the same rows (same target, task, property and string).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Paired {
    pub rows: usize,
    pub a_accuracy: f64,
    pub b_accuracy: f64,
    /// a − b, with a paired bootstrap 95 % interval (1000 resamples, seeded).
    pub difference: f64,
    pub difference_ci95: [f64; 2],
    /// Rows only a got right, rows only b got right.
    pub only_a: usize,
    pub only_b: usize,
    /// McNemar's exact two-sided test on the discordant rows.
    pub p_value: f64,
}

type Key = (String, String, String);

fn key(r: &ScoredRow) -> Key {
    (r.task.clone(), r.property.clone(), r.string.clone())
}

/// Outcomes by row, identity excluded (as the paper's averages).
fn outcomes(rows: &[ScoredRow], variant: Variant) -> HashMap<Key, bool> {
    rows.iter()
        .filter(|r| r.property != Property::Identity.name())
        .filter_map(|r| outcome(variant, r).map(|o| (key(r), o.0)))
        .collect()
}

/// Compares predictor a with predictor b on the rows both were scored on, optionally one task only.
pub fn paired(a: &[ScoredRow], b: &[ScoredRow], variant: Variant, task: Option<&str>) -> Paired {
    let (oa, ob) = (outcomes(a, variant), outcomes(b, variant));
    let mut pairs: Vec<(&Key, bool, bool)> = oa
        .iter()
        .filter(|(k, _)| task.is_none_or(|t| k.0 == t))
        .filter_map(|(k, &x)| ob.get(k).map(|&y| (k, x, y)))
        .collect();
    pairs.sort_by(|x, y| x.0.cmp(y.0));
    let n = pairs.len();
    let mean = |f: &dyn Fn(&(&Key, bool, bool)) -> bool| {
        pairs.iter().filter(|p| f(p)).count() as f64 / n.max(1) as f64
    };
    let (acc_a, acc_b) = (mean(&|p| p.1), mean(&|p| p.2));
    let only_a = pairs.iter().filter(|p| p.1 && !p.2).count();
    let only_b = pairs.iter().filter(|p| !p.1 && p.2).count();
    let diffs: Vec<f64> = pairs
        .iter()
        .map(|p| p.1 as u8 as f64 - p.2 as u8 as f64)
        .collect();
    Paired {
        rows: n,
        a_accuracy: acc_a,
        b_accuracy: acc_b,
        difference: acc_a - acc_b,
        difference_ci95: bootstrap_mean_ci(&diffs, 1000, 42),
        only_a,
        only_b,
        p_value: mcnemar_exact(only_a, only_b),
    }
}

/// McNemar's exact test: under H0 the b + c discordant rows split Binomial(b + c, ½); two-sided p.
pub fn mcnemar_exact(b: usize, c: usize) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    // Sum of C(n, i)·2⁻ⁿ for i ≤ k, in log space (n can be thousands).
    let mut log_c = 0.0f64; // log C(n, 0)
    let mut tail = 0.0f64;
    let log_half_n = n as f64 * 0.5f64.ln();
    for i in 0..=k {
        if i > 0 {
            log_c += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        tail += (log_c + log_half_n).exp();
    }
    (2.0 * tail).min(1.0)
}

/// Accuracy with the paper's error bars and a bootstrap interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accuracy {
    pub n: usize,
    pub accuracy: f64,
    pub se: f64,
    pub ci95: [f64; 2],
}

impl Accuracy {
    pub fn of(flags: &[bool]) -> Self {
        let n = flags.len();
        Self {
            n,
            accuracy: if n == 0 {
                f64::NAN
            } else {
                flags.iter().filter(|&&b| b).count() as f64 / n as f64
            },
            se: std_err(flags),
            ci95: bootstrap_ci(flags, 1000, 42),
        }
    }
}

/// Behaviour shift on one property (or all of them): on rows where Mc's object-level property value
/// differs from M1ft's, does Mc's hypothetical answer match the old or the new value?
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShiftScore {
    pub property: String,
    /// Rows whose object-level value changed (both answers compliant), stayed the same, or could not be
    /// compared (an object answer non-compliant).
    pub shifted: usize,
    pub same: usize,
    pub not_compliant: usize,
    /// Shifted rows whose hypothetical answer complied (the rows scored).
    pub old: Accuracy,
    pub new: Accuracy,
    /// McNemar's exact test, new vs old, on the scored rows.
    pub p_value: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShiftResult {
    pub per_property: Vec<ShiftScore>,
    /// Micro-average over every property but identity.
    pub overall: ShiftScore,
    /// Old (bar A) vs new (bar B) on the scored shifted rows, both cut to the same distribution of
    /// object-level values (spec §6.7; identity excluded).
    #[serde(default)]
    pub entropy_controlled: Option<EntropyControlled>,
}

/// One compared row: its key, (old value key, new value key), hypothetical answer, hypothetical
/// compliant.
type ShiftRow = (Key, Option<(String, String)>, String, bool);

fn shift_score(property: &str, rows: &[&ShiftRow]) -> ShiftScore {
    let variant = Variant::PathB;
    let mut old = vec![];
    let mut new = vec![];
    let (mut shifted, mut same, mut not_compliant) = (0, 0, 0);
    for (_, values, hyp, hyp_ok) in rows {
        let Some((o, n)) = values else {
            not_compliant += 1;
            continue;
        };
        if o == n {
            same += 1;
            continue;
        }
        shifted += 1;
        if *hyp_ok {
            old.push(&variant.hypothetical_key(hyp) == o);
            new.push(&variant.hypothetical_key(hyp) == n);
        }
    }
    let only_new = new.iter().zip(&old).filter(|(n, o)| **n && !**o).count();
    let only_old = new.iter().zip(&old).filter(|(n, o)| !**n && **o).count();
    ShiftScore {
        property: property.into(),
        shifted,
        same,
        not_compliant,
        old: Accuracy::of(&old),
        new: Accuracy::of(&new),
        p_value: mcnemar_exact(only_new, only_old),
    }
}

/// Mc's hypothetical answers against M1ft's (old) and Mc's (new) object-level answers.
pub fn behaviour_shift(
    mc_hyp: &[Record],
    old_obj: &[Record],
    new_obj: &[Record],
    analysis: &AnalysisConfig,
) -> ShiftResult {
    let variant = Variant::PathB;
    let (old_rows, _) = join(mc_hyp, old_obj);
    let (new_rows, _) = join(mc_hyp, new_obj);
    let new_by_key: HashMap<Key, &ScoredRow> = new_rows.iter().map(|r| (key(r), r)).collect();
    let mut by_property: BTreeMap<Property, Vec<ShiftRow>> = BTreeMap::new();
    for o in &old_rows {
        let Some(n) = new_by_key.get(&key(o)) else {
            continue;
        };
        let defined = o.object_value.is_some() && n.object_value.is_some();
        let values = (o.object_compliant && n.object_compliant && defined).then(|| {
            (
                variant.object_key(o.object_value.as_deref()),
                variant.object_key(n.object_value.as_deref()),
            )
        });
        let p = Property::parse(&o.property).expect("joined rows carry known properties");
        by_property.entry(p).or_default().push((
            key(o),
            values,
            o.hypothetical.clone(),
            o.hypothetical_compliant,
        ));
    }
    let per_property = by_property
        .iter()
        .map(|(p, rows)| shift_score(p.name(), &rows.iter().collect::<Vec<_>>()))
        .collect();
    let all: Vec<&ShiftRow> = by_property
        .iter()
        .filter(|(p, _)| **p != Property::Identity)
        .flat_map(|(_, rows)| rows)
        .collect();
    // The scored rows (shifted, hypothetical compliant) as two bars: against the old values, the new.
    let bar = |new: bool| -> Vec<BarRow> {
        all.iter()
            .filter_map(|((task, property, string), values, hyp, hyp_ok)| {
                let (o, n) = values.as_ref()?;
                (o != n && *hyp_ok).then(|| {
                    let value = if new { n } else { o };
                    BarRow {
                        task: task.clone(),
                        property: property.clone(),
                        string: string.clone(),
                        correct: &variant.hypothetical_key(hyp) == value,
                        value: value.clone(),
                    }
                })
            })
            .collect()
    };
    let (old_bar, new_bar) = (bar(false), bar(true));
    ShiftResult {
        per_property,
        overall: shift_score("all", &all),
        entropy_controlled: (!old_bar.is_empty()).then(|| {
            entropy_controlled(
                &old_bar,
                &new_bar,
                analysis.entropy_top_values,
                analysis.entropy_seed,
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mcnemar_matches_the_binomial_tail() {
        // b = 1, c = 9: 2·(C(10,0) + C(10,1))/1024 = 22/1024.
        assert!((mcnemar_exact(1, 9) - 22.0 / 1024.0).abs() < 1e-12);
        assert_eq!(mcnemar_exact(5, 5), 1.0);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        // Large n stays finite and tiny.
        let p = mcnemar_exact(100, 300);
        assert!(p > 0.0 && p < 1e-20, "{p}");
    }
}
