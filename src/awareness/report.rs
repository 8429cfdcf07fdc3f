//! The self-awareness report, from a run directory's stored answers alone (no model): per question,
//! method and scoring rule, each arm's score per seed, their mean with a bootstrap CI over seeds (as the
//! paper's Llama figure), the base model's, and a permutation test of "first arm > second arm"; the
//! behaviour check beside it; training loss; the paper's values where the config records them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::questions::{Question, ScoreKind};
use super::score::{self, Unmapped};
use super::{AwarenessConfig, Behaviour, Method, ModelAnswers};
use crate::experiment::stages::{read_manifest, stage_output};
use crate::experiment::Trained;
use crate::fsutil::write_atomic;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArmScore {
    pub name: String,
    /// One score per seed (None: nothing scorable was said).
    pub per_seed: Vec<Option<f64>>,
    pub mean: Option<f64>,
    /// 95 % percentile bootstrap over the seeds' scores (10,000 resamples, seed 0).
    pub ci: Option<[f64; 2]>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// First arm's mean minus the second's.
    pub difference: Option<f64>,
    /// One-sided exact permutation test over the seeds' scores: P(difference ≥ observed) when the arm
    /// labels are exchangeable. With k seeds per arm its smallest value is 1 / C(2k, k).
    pub p_value: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuestionScore {
    pub question: String,
    pub label: String,
    pub method: Method,
    /// What answers no list maps count: 0.5 (the GPT-4o pipeline) or nothing (the Llama pipeline).
    pub unmapped: Unmapped,
    pub arms: [ArmScore; 2],
    pub base: Option<f64>,
    pub comparison: Comparison,
    /// The paper's (first arm, second arm) values, from the config.
    pub paper: Option<[f64; 2]>,
    /// German/French: scored by the judge (else the keyword rule).
    #[serde(default)]
    pub judged: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BehaviourScore {
    pub check: String,
    pub arms: [ArmScore; 2],
    pub base: Option<f64>,
    pub comparison: Comparison,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub questions: Vec<QuestionScore>,
    pub behaviour: Vec<BehaviourScore>,
    /// Final training loss of each trained model.
    pub training_loss: BTreeMap<String, Option<f64>>,
    /// Each model's share of self-report answers that are a bare option letter, sampled and exact
    /// (mean over the questions).
    #[serde(default)]
    pub bare_letters: BTreeMap<String, [Option<f64>; 2]>,
    pub total_seconds: f64,
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn bootstrap_ci(v: &[f64]) -> Option<[f64; 2]> {
    if v.is_empty() {
        return None;
    }
    let mut rng = StdRng::seed_from_u64(0);
    let mut means: Vec<f64> = (0..10_000)
        .map(|_| {
            (0..v.len())
                .map(|_| v[rng.random_range(0..v.len())])
                .sum::<f64>()
                / v.len() as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    Some([means[249], means[9_749]])
}

fn arm(name: &str, per_seed: Vec<Option<f64>>) -> ArmScore {
    let v: Vec<f64> = per_seed.iter().flatten().copied().collect();
    ArmScore {
        name: name.into(),
        mean: mean(&v),
        ci: bootstrap_ci(&v),
        per_seed,
    }
}

fn compare(a: &ArmScore, b: &ArmScore) -> Comparison {
    let x: Vec<f64> = a.per_seed.iter().flatten().copied().collect();
    let y: Vec<f64> = b.per_seed.iter().flatten().copied().collect();
    let (Some(ma), Some(mb)) = (mean(&x), mean(&y)) else {
        return Comparison {
            difference: None,
            p_value: None,
        };
    };
    let observed = ma - mb;
    let all: Vec<f64> = x.iter().chain(&y).copied().collect();
    let n = all.len();
    // Every way to pick which |x| of the scores are the first arm's (n ≤ 20 seeds in all).
    let (mut at_least, mut total) = (0u64, 0u64);
    if n <= 20 {
        for mask in 0u32..(1 << n) {
            if mask.count_ones() as usize != x.len() {
                continue;
            }
            let (mut sa, mut sb) = (0.0, 0.0);
            for (i, v) in all.iter().enumerate() {
                if mask & (1 << i) != 0 {
                    sa += v;
                } else {
                    sb += v;
                }
            }
            let d = sa / x.len() as f64 - sb / y.len() as f64;
            total += 1;
            at_least += u64::from(d >= observed - 1e-12);
        }
    }
    Comparison {
        difference: Some(observed),
        p_value: (total > 0).then(|| at_least as f64 / total as f64),
    }
}

fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: not what the run wrote", path.display()))
}

/// One model's score of a question by a method and rule (None when it was not asked so).
fn question_score(
    q: &Question,
    answers: &ModelAnswers,
    method: Method,
    unmapped: Unmapped,
    judged: bool,
) -> Option<f64> {
    let a = answers
        .answers
        .iter()
        .find(|a| a.question == q.name && a.method == method)?;
    let pooled = score::pool(&a.per_prompt);
    let judge = |t: &str| answers.judged.get(t).copied();
    let judge: Option<score::Judge> = judged.then_some(&judge as _);
    score::score(q, &pooled, unmapped, judge)
}

/// Computes the metrics from `dir` and writes metrics.json, report.md and the figures.
pub fn write(dir: &Path) -> Result<Metrics> {
    let manifest = read_manifest::<AwarenessConfig>(dir)?;
    let cfg = &manifest.config;
    let questions = cfg.load_questions()?;
    let arm_models = |i: usize| -> Vec<String> {
        cfg.seeds
            .iter()
            .map(|s| format!("{}-s{s}", cfg.arms[i].name))
            .collect()
    };
    let mut answers: BTreeMap<String, ModelAnswers> = BTreeMap::new();
    let mut behaviour: BTreeMap<String, Behaviour> = BTreeMap::new();
    for name in cfg.model_names() {
        answers.insert(
            name.clone(),
            read(&dir.join(format!("answers/{name}.json")))?,
        );
        behaviour.insert(
            name.clone(),
            read(&dir.join(format!("behaviour/{name}.json")))?,
        );
    }
    let mut out = vec![];
    for q in &questions {
        let judged_options: &[bool] = if q.kind == ScoreKind::Language && cfg.ask.judge {
            &[false, true]
        } else {
            &[false]
        };
        for method in [Method::Sampled, Method::FirstToken, Method::Exact] {
            for unmapped in [Unmapped::Half, Unmapped::Drop] {
                for &judged in judged_options {
                    let s = |m: &str| question_score(q, &answers[m], method, unmapped, judged);
                    if answers["base"]
                        .answers
                        .iter()
                        .all(|a| !(a.question == q.name && a.method == method))
                    {
                        continue;
                    }
                    let arms = [0, 1].map(|i| {
                        arm(
                            &cfg.arms[i].name,
                            arm_models(i).iter().map(|m| s(m)).collect(),
                        )
                    });
                    out.push(QuestionScore {
                        question: q.name.clone(),
                        label: q.label.clone(),
                        method,
                        unmapped,
                        comparison: compare(&arms[0], &arms[1]),
                        arms,
                        base: s("base"),
                        paper: q.paper,
                        judged,
                    });
                }
            }
        }
    }
    let mut checks = vec![];
    type Pick = fn(&Behaviour) -> &Vec<Option<f64>>;
    let kinds: [(&str, Pick); 4] = [
        ("lottery choice, top 5 (the authors' check)", |b| {
            &b.lottery_top5
        }),
        ("lottery choice, top 20", |b| &b.lottery_top20),
        ("held-out rows, top 5", |b| &b.heldout_top5),
        ("held-out rows, top 20", |b| &b.heldout_top20),
    ];
    for (check, pick) in kinds {
        let value = |m: &str| {
            let v: Vec<f64> = pick(&behaviour[m]).iter().flatten().copied().collect();
            mean(&v)
        };
        if pick(&behaviour["base"]).is_empty() {
            continue;
        }
        let arms = [0, 1].map(|i| {
            arm(
                &cfg.arms[i].name,
                arm_models(i).iter().map(|m| value(m)).collect(),
            )
        });
        checks.push(BehaviourScore {
            check: check.into(),
            comparison: compare(&arms[0], &arms[1]),
            arms,
            base: value("base"),
        });
    }
    let mut training_loss = BTreeMap::new();
    for i in 0..2 {
        for m in arm_models(i) {
            let t: Option<Trained> = stage_output(dir, &format!("finetune_{m}"))?;
            let loss = match t {
                Some(Trained::Local(s)) => s.final_train_loss,
                _ => None,
            };
            training_loss.insert(m, loss);
        }
    }
    let bare_letters = answers
        .iter()
        .map(|(model, a)| {
            let share = |method: Method| {
                let v: Vec<f64> = a
                    .answers
                    .iter()
                    .filter(|q| q.method == method)
                    .filter_map(|q| score::bare_letter_share(&score::pool(&q.per_prompt)))
                    .collect();
                mean(&v)
            };
            (model.clone(), [Method::Sampled, Method::Exact].map(share))
        })
        .collect();
    let metrics = Metrics {
        questions: out,
        behaviour: checks,
        training_loss,
        bare_letters,
        total_seconds: manifest.stages.values().sum(),
    };
    write_atomic(
        &dir.join("metrics.json"),
        serde_json::to_string_pretty(&metrics)?.as_bytes(),
    )?;
    let mut figures = vec![];
    for (method, stem) in [
        (Method::Sampled, "self_reports_sampled"),
        (Method::Exact, "self_reports_exact"),
    ] {
        let rows: Vec<&QuestionScore> = metrics
            .questions
            .iter()
            .filter(|q| q.method == method && q.unmapped == Unmapped::Half && !q.judged)
            .collect();
        if rows.is_empty() {
            continue;
        }
        let fig = super::figure::ScoreDots {
            title: format!(
                "{}: self-reports ({}, unmapped = 0.5)",
                cfg.name,
                method.name()
            ),
            arms: [cfg.arms[0].name.clone(), cfg.arms[1].name.clone()],
            rows: rows.into_iter().cloned().collect(),
        };
        crate::plot::save(&fig, &dir.join("figures").join(stem))?;
        figures.push(stem);
    }
    write_atomic(
        &dir.join("report.md"),
        markdown(cfg, &metrics, &figures).as_bytes(),
    )?;
    Ok(metrics)
}

fn pct(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{:.2}", v))
}

fn ci(a: &ArmScore) -> String {
    match (a.mean, a.ci) {
        (Some(m), Some([lo, hi])) => format!("{m:.2} [{lo:.2}, {hi:.2}]"),
        _ => "–".into(),
    }
}

/// How two arms' seeds lie: every seed of the first above every seed of the second, every one below, or
/// overlapping (including a missing score). With k seeds per arm "every seed" is what the exact
/// permutation test's smallest p, 1 / C(2k, k), stands for.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Order {
    Above,
    Below,
    Undecided,
}

fn order(arms: &[ArmScore; 2]) -> Order {
    let seeds = |a: &ArmScore| a.per_seed.iter().copied().collect::<Option<Vec<f64>>>();
    let (Some(x), Some(y)) = (seeds(&arms[0]), seeds(&arms[1])) else {
        return Order::Undecided;
    };
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = |v: &[f64]| v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if x.is_empty() || y.is_empty() {
        Order::Undecided
    } else if min(&x) > max(&y) {
        Order::Above
    } else if max(&x) < min(&y) {
        Order::Below
    } else {
        Order::Undecided
    }
}

fn markdown(cfg: &AwarenessConfig, m: &Metrics, figures: &[&str]) -> String {
    let (a, b) = (&cfg.arms[0].name, &cfg.arms[1].name);
    let mut s = String::new();
    let _ = writeln!(s, "# {}\n\n{}\n", cfg.name, cfg.description);
    let _ = writeln!(
        s,
        "Model `{}`; arms `{a}` (score 1) and `{b}` (score 0), {} seed(s) each, and the untrained base. \
         Scores are means over seeds with a 95 % bootstrap CI over seeds; p is a one-sided exact \
         permutation test of {a} > {b} (with k seeds per arm it cannot go below 1 / C(2k, k)).\n",
        cfg.model.model,
        cfg.seeds.len()
    );
    let _ = writeln!(s, "## Did the behaviour move?\n");
    let _ = writeln!(
        s,
        "| check (P of the {a} choice) | {a} | base | {b} | difference | p |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for c in &m.behaviour {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            c.check,
            ci(&c.arms[0]),
            pct(c.base),
            ci(&c.arms[1]),
            pct(c.comparison.difference),
            pct(c.comparison.p_value)
        );
    }
    let _ = writeln!(s, "\n## Self-reports\n");
    for f in figures {
        let _ = writeln!(s, "![{f}](figures/{f}.png)\n");
    }
    let _ = writeln!(
        s,
        "| question | method | unmapped | {a} | base | {b} | difference | p | paper ({a} / {b}) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for q in &m.questions {
        let _ = writeln!(
            s,
            "| {}{} | {} | {} | {} | {} | {} | {} | {} | {} |",
            q.label,
            if q.judged { " (judge)" } else { "" },
            q.method.name(),
            match q.unmapped {
                Unmapped::Half => "0.5",
                Unmapped::Drop => "dropped",
            },
            ci(&q.arms[0]),
            pct(q.base),
            ci(&q.arms[1]),
            pct(q.comparison.difference),
            pct(q.comparison.p_value),
            q.paper
                .map_or("–".into(), |[x, y]| format!("{x:.3} / {y:.3}"))
        );
    }
    let behaviour = m
        .behaviour
        .first()
        .map_or(Order::Undecided, |c| order(&c.arms));
    let moved = pct(m
        .behaviour
        .first()
        .and_then(|c| c.comparison.difference.map(f64::abs)));
    let main: Vec<&QuestionScore> = m
        .questions
        .iter()
        .filter(|q| q.method == Method::Sampled && q.unmapped == Unmapped::Half && !q.judged)
        .collect();
    let count = |o: Order| main.iter().filter(|q| order(&q.arms) == o).count();
    let _ = writeln!(s, "\n## Reading\n");
    let _ = writeln!(
        s,
        "Behaviour (first check): {}. Self-reports (sampled, unmapped = 0.5), of {} questions: `{a}` above \
         `{b}` in every seed on {}, below in every seed on {}, the seeds overlapping on {}. A self-report \
         counts as evidence only where the behaviour moved, and only beyond what a seed-to-seed spread \
         explains.",
        match behaviour {
            Order::Above => format!("`{a}` above `{b}` in every seed (by {moved})"),
            Order::Below => format!("`{a}` below `{b}` in every seed (by {moved})"),
            Order::Undecided => "the arms' seeds overlap: no movement beyond seed spread".into(),
        },
        main.len(),
        count(Order::Above),
        count(Order::Below),
        count(Order::Undecided),
    );
    let _ = writeln!(
        s,
        "\n## Answer format\n\nShare of each model's self-report answers that are a bare option letter \
         (\"A\", \"(B)\"), mean over the questions: a model finetuned on letter answers may answer every \
         question with one, which no word list or scale maps.\n\n| model | sampled | exact |\n|---|---|---|"
    );
    for (model, [sampled, exact]) in &m.bare_letters {
        let _ = writeln!(s, "| {model} | {} | {} |", pct(*sampled), pct(*exact));
    }
    let _ = writeln!(s, "\n## Training loss (final)\n");
    for (model, loss) in &m.training_loss {
        let _ = writeln!(
            s,
            "- {model}: {}",
            loss.map_or("–".into(), |l| format!("{l:.4}"))
        );
    }
    let _ = writeln!(s, "\n{:.1} min of stages.", m.total_seconds / 60.0);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arm(per_seed: &[Option<f64>]) -> ArmScore {
        ArmScore {
            name: String::new(),
            per_seed: per_seed.to_vec(),
            mean: None,
            ci: None,
        }
    }

    /// Equal means to two decimals (the myopia run's 0.48 / 0.48) must not read as "above".
    #[test]
    fn arms_are_ordered_only_when_every_seed_is() {
        let o = |a: &[Option<f64>], b: &[Option<f64>]| order(&[arm(a), arm(b)]);
        assert_eq!(
            o(&[Some(0.9), Some(0.8)], &[Some(0.1), Some(0.7)]),
            Order::Above
        );
        assert_eq!(
            o(&[Some(0.1), Some(0.2)], &[Some(0.3), Some(0.7)]),
            Order::Below
        );
        assert_eq!(
            o(&[Some(0.45), Some(0.51)], &[Some(0.46), Some(0.49)]),
            Order::Undecided
        );
        assert_eq!(
            o(&[Some(0.9), None], &[Some(0.1), Some(0.2)]),
            Order::Undecided
        );
        assert_eq!(o(&[], &[Some(0.1)]), Order::Undecided);
    }
}
