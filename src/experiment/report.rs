//! The experiment's report from its stored outputs only: metrics.json, report.md and the figures.
//! `introspect experiment report DIR` re-renders it without a model.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::analysis::{behaviour_shift, paired, Paired, ShiftResult, ShiftScore};
use super::figures::{
    Bar, CalibrationCurves, Curve, Group, GroupedBars, BLUE_, GREEN_, GREY, ORANGE,
};
use super::{load_records, read_manifest};
use crate::eval::entropy::{self, BarRow, EntropyControlled};
use crate::eval::report::pct;
use crate::eval::{
    evaluate, join, outcome, own_compliant_rows, Evaluation, Rules, Score, ScoredRow, Variant,
};
use crate::runs::calibrate::CalibrationResult;
use crate::runs::{Record, RunKind};
use crate::tasks::Property;

/// Scores of one group of the self/cross figure (a held-out task, or all of them) under one set of
/// path-B rules.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bars {
    pub task: String,
    pub rules: Rules,
    /// M1ft predicting M1ft.
    pub self_prediction: Score,
    /// M2ft predicting M1ft.
    pub cross_prediction: Score,
    /// M1 (untrained) predicting M1.
    pub untrained: Option<Score>,
    /// Always answering M1ft's most common value.
    pub mode_baseline: f64,
    pub self_vs_cross: Paired,
    /// Where each side's rows came from.
    pub self_rows: RowCounts,
    pub cross_rows: RowCounts,
}

/// The (task, property, string) rows of one predictor against the target, identity excluded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowCounts {
    /// Hypothetical answers joined with a target answer.
    pub asked: usize,
    /// Of those, on strings the predictor's own object-level answer handled compliantly (§6.1); equal
    /// to `asked` under the spec's rules, or when the predictor's object-level run is missing.
    pub predictor: usize,
    /// Of `asked`, rows whose target object answer complied.
    pub target: usize,
    /// Rows in both sets, and rows scored after the rules' exclusions.
    pub both: usize,
    pub scored: usize,
    /// Whether the predictor's own object-level run was there to restrict the rows.
    pub predictor_filtered: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Calibrated {
    pub mad: f64,
    pub mad_top1: f64,
    pub strings: usize,
    pub points: usize,
    /// Bin means (object probability, hypothetical probability).
    pub bins: Vec<(f64, f64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Metrics {
    pub name: String,
    pub m1: String,
    pub m2: String,
    /// The rules of the self/cross figure, and its groups: per held-out task, then "all held-out
    /// tasks" last.
    pub rules: Rules,
    pub self_vs_cross: Vec<Bars>,
    /// The same under the other rules.
    pub self_vs_cross_other_rules: Vec<Bars>,
    /// Share of (task, property, string) values of M1's object-level answers that M1ft changed.
    pub self_training_changed_behaviour: Option<f64>,
    /// Before vs after self-prediction training (M1 → M1 vs M1ft → M1ft, all held-out tasks) with both
    /// bars cut to the same distribution of object-level values (§6.7).
    pub entropy_controlled: Option<EntropyControlled>,
    pub behaviour_shift: Option<ShiftResult>,
    pub calibration: BTreeMap<String, Calibrated>,
    /// How the run went, not what it found (timings.json, so that metrics.json is the same bytes when
    /// a config is run again on the same machine): seconds of each finished stage and their sum, and
    /// the stage outputs (example counts, training summaries with their timings) as recorded.
    #[serde(skip)]
    pub stage_seconds: BTreeMap<String, f64>,
    #[serde(skip)]
    pub total_seconds: f64,
    #[serde(skip)]
    pub stages: BTreeMap<String, serde_json::Value>,
}

/// A predictor's hypothetical answers joined with a target's object-level answers, with the
/// predictor's own object-level run when there is one.
struct Scored {
    rows: Vec<ScoredRow>,
    target: Vec<Record>,
    own: Option<Vec<Record>>,
}

impl Scored {
    fn load(dir: &Path, hyp: &str, target: &str, own: &str) -> Result<Option<Self>> {
        let (Some(h), Some(t)) = (
            load_records(dir, hyp, RunKind::Hypothetical)?,
            load_records(dir, target, RunKind::Object)?,
        ) else {
            return Ok(None);
        };
        let own = if own == target {
            Some(t.clone())
        } else {
            load_records(dir, own, RunKind::Object)?
        };
        Ok(Some(Self {
            rows: join(&h, &t).0,
            target: t,
            own,
        }))
    }

    /// The rows the rules score, of one task or all.
    fn rows(&self, rules: Rules, task: Option<&str>) -> Vec<ScoredRow> {
        let of_task: Vec<ScoredRow> = self
            .rows
            .iter()
            .filter(|r| task.is_none_or(|t| r.task == t))
            .cloned()
            .collect();
        match (rules, &self.own) {
            (Rules::Notebook, Some(own)) => own_compliant_rows(&of_task, own),
            _ => of_task,
        }
    }

    fn evaluate(&self, rules: Rules, task: Option<&str>) -> (Evaluation, RowCounts) {
        let rows = self.rows(rules, task);
        let e = evaluate(&rows, rules.path_b(), &self.target);
        let not_identity = |r: &&ScoredRow| r.property != Property::Identity.name();
        let asked = self
            .rows
            .iter()
            .filter(|r| task.is_none_or(|t| r.task == t))
            .filter(not_identity);
        let counts = RowCounts {
            asked: asked.clone().count(),
            predictor: rows.iter().filter(not_identity).count(),
            target: asked.filter(|r| r.object_compliant).count(),
            both: rows
                .iter()
                .filter(not_identity)
                .filter(|r| r.object_compliant)
                .count(),
            scored: e.overall.n,
            predictor_filtered: rules == Rules::Notebook && self.own.is_some(),
        };
        (e, counts)
    }
}

/// The scored rows of one bar, for the entropy-controlled comparison (identity excluded).
fn bar_rows(rows: &[ScoredRow], variant: Variant) -> Vec<BarRow> {
    rows.iter()
        .filter(|r| r.property != Property::Identity.name())
        .filter_map(|r| {
            outcome(variant, r).map(|(correct, value)| BarRow {
                task: r.task.clone(),
                property: r.property.clone(),
                string: r.string.clone(),
                correct,
                value,
            })
        })
        .collect()
}

fn self_vs_cross(
    own: &Scored,
    cross: &Scored,
    untrained: Option<&Scored>,
    rules: Rules,
    groups: &[Option<&str>],
) -> Vec<Bars> {
    groups
        .iter()
        .map(|&task| {
            let (s, self_rows) = own.evaluate(rules, task);
            let (c, cross_rows) = cross.evaluate(rules, task);
            let variant = rules.path_b();
            Bars {
                task: task.unwrap_or("all held-out").into(),
                rules,
                mode_baseline: s.overall.mode_baseline,
                self_prediction: s.overall,
                cross_prediction: c.overall,
                untrained: untrained.map(|u| u.evaluate(rules, task).0.overall),
                self_vs_cross: paired(
                    &own.rows(rules, None),
                    &cross.rows(rules, None),
                    variant,
                    task,
                ),
                self_rows,
                cross_rows,
            }
        })
        .collect()
}

fn stage_outputs(dir: &Path) -> Result<BTreeMap<String, serde_json::Value>> {
    let mut out = BTreeMap::new();
    let stages = dir.join("stages");
    if let Ok(entries) = std::fs::read_dir(&stages) {
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "json") {
                let v: serde_json::Value = serde_json::from_str(
                    &std::fs::read_to_string(&p)
                        .with_context(|| format!("cannot read {}", p.display()))?,
                )
                .with_context(|| format!("{}: not JSON", p.display()))?;
                let name = p
                    .file_stem()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .to_string();
                out.insert(name, v["output"].clone());
            }
        }
    }
    Ok(out)
}

/// Fraction of property values that differ between two object-level runs on the same strings.
fn changed_share(dir: &Path, a: &str, b: &str) -> Result<Option<f64>> {
    let (Some(x), Some(y)) = (
        load_records(dir, a, RunKind::Object)?,
        load_records(dir, b, RunKind::Object)?,
    ) else {
        return Ok(None);
    };
    let by_id: BTreeMap<&str, &crate::runs::Record> =
        y.iter().map(|r| (r.id.as_str(), r)).collect();
    let (mut changed, mut total) = (0usize, 0usize);
    for r in &x {
        let Some(o) = by_id.get(r.id.as_str()) else {
            continue;
        };
        for (p, v) in &r.properties {
            total += 1;
            changed += usize::from(o.properties.get(p) != Some(v));
        }
    }
    Ok((total > 0).then(|| changed as f64 / total as f64))
}

/// Computes the metrics of a run directory from its stored outputs, path B by `rules` (default: the
/// config's).
pub fn compute(dir: &Path, rules: Option<Rules>) -> Result<Metrics> {
    let manifest = read_manifest(dir)?;
    let cfg = &manifest.config;
    let rules = rules.unwrap_or(cfg.analysis.rules);
    let (m1, m2) = (cfg.m1.label("M1"), cfg.m2.label("M2"));
    let (mut headline, mut other, mut entropy_controlled) = (vec![], vec![], None);
    if let (Some(own), Some(cross)) = (
        Scored::load(dir, "m1ft/hyp-val", "m1ft/object-val", "m1ft/object-val")?,
        Scored::load(dir, "m2ft/hyp-val", "m1ft/object-val", "m2ft/object-val")?,
    ) {
        let untrained = Scored::load(dir, "m1/hyp-val", "m1/object-val", "m1/object-val")?;
        let groups: Vec<Option<&str>> = cfg
            .data
            .held_out_tasks
            .iter()
            .map(|t| Some(t.as_str()))
            .chain([None])
            .collect();
        headline = self_vs_cross(&own, &cross, untrained.as_ref(), rules, &groups);
        other = self_vs_cross(&own, &cross, untrained.as_ref(), rules.other(), &groups);
        if let Some(u) = &untrained {
            let variant = rules.path_b();
            entropy_controlled = Some(entropy::entropy_controlled(
                &bar_rows(&u.rows(rules, None), variant),
                &bar_rows(&own.rows(rules, None), variant),
                cfg.analysis.entropy_top_values,
                cfg.analysis.entropy_seed,
            ));
        }
    }
    let behaviour_shift = match (
        load_records(dir, "mc/hyp-val", RunKind::Hypothetical)?,
        load_records(dir, "m1ft/object-val", RunKind::Object)?,
        load_records(dir, "mc/object-val", RunKind::Object)?,
    ) {
        (Some(h), Some(old), Some(new)) => Some(behaviour_shift(&h, &old, &new, &cfg.analysis)),
        _ => None,
    };
    let mut calibration = BTreeMap::new();
    for setup in ["self", "cross", "untrained"] {
        let p = dir.join("calibration").join(setup).join("calibration.json");
        if let Ok(text) = std::fs::read_to_string(&p) {
            let r: CalibrationResult = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a calibration result", p.display()))?;
            calibration.insert(
                setup.to_string(),
                Calibrated {
                    mad: r.mad,
                    mad_top1: r.mad_top1,
                    strings: r.strings,
                    points: r.points.len(),
                    bins: r.bins.iter().map(|b| (b.object, b.hypothetical)).collect(),
                },
            );
        }
    }
    Ok(Metrics {
        name: cfg.name.clone(),
        m1,
        m2,
        rules,
        self_vs_cross: headline,
        self_vs_cross_other_rules: other,
        entropy_controlled,
        self_training_changed_behaviour: changed_share(dir, "m1/object-val", "m1ft/object-val")?,
        behaviour_shift,
        calibration,
        total_seconds: manifest.stages.values().sum(),
        stage_seconds: manifest.stages.clone(),
        stages: stage_outputs(dir)?,
    })
}

fn bar(s: &Score) -> Bar {
    Bar {
        value: s.accuracy,
        error: 1.96 * s.se,
    }
}

fn p_value(p: f64) -> String {
    if p < 1e-4 {
        format!("{p:.1e}")
    } else {
        format!("{p:.4}")
    }
}

/// Writes metrics.json, report.md and figures/ under `dir`.
pub fn write(dir: &Path, rules: Option<Rules>) -> Result<Metrics> {
    let m = compute(dir, rules)?;
    let manifest = read_manifest(dir)?;
    let cfg = &manifest.config;
    let figures = dir.join("figures");
    std::fs::create_dir_all(&figures)
        .with_context(|| format!("cannot create {}", figures.display()))?;
    let mut drawn = vec![];
    let mut figure_errors = vec![];
    let mut save = |fig: &dyn Fn() -> Result<[std::path::PathBuf; 2]>, name: &str| match fig() {
        Ok(_) => drawn.push(name.to_string()),
        Err(e) => figure_errors.push(format!("{name}: {e:#}")),
    };
    if !m.self_vs_cross.is_empty() {
        let f = GroupedBars {
            title: format!(
                "Self- vs cross-prediction on held-out tasks ({}, {} rules)",
                cfg.name,
                m.rules.name()
            ),
            y_label: "accuracy predicting M1ft's behaviour".into(),
            series: vec![
                (format!("untrained {} → {}", m.m1, m.m1), GREY),
                (format!("cross: {}ft → {}ft", m.m2, m.m1), ORANGE),
                (format!("self: {}ft → {}ft", m.m1, m.m1), BLUE_),
            ],
            groups: m
                .self_vs_cross
                .iter()
                .map(|b| Group {
                    name: b.task.clone(),
                    bars: vec![
                        b.untrained.as_ref().map_or(
                            Bar {
                                value: f64::NAN,
                                error: f64::NAN,
                            },
                            bar,
                        ),
                        bar(&b.cross_prediction),
                        bar(&b.self_prediction),
                    ],
                    baseline: Some(b.mode_baseline),
                })
                .collect(),
            baseline_label: Some("mode baseline".into()),
        };
        save(
            &|| crate::plot::save(&f, &figures.join("self_vs_cross")),
            "self_vs_cross",
        );
    }
    if let Some(s) = &m.behaviour_shift {
        let f = GroupedBars {
            title: "Behaviour shift: Mc's predictions on rows where its behaviour changed".into(),
            y_label: "accuracy on shifted rows".into(),
            series: vec![
                ("predicts old behaviour (M1ft)".into(), GREY),
                ("predicts new behaviour (Mc)".into(), GREEN_),
            ],
            groups: s
                .per_property
                .iter()
                .chain([&s.overall])
                .map(|p| Group {
                    name: p.property.clone(),
                    bars: vec![
                        Bar {
                            value: p.old.accuracy,
                            error: 1.96 * p.old.se,
                        },
                        Bar {
                            value: p.new.accuracy,
                            error: 1.96 * p.new.se,
                        },
                    ],
                    baseline: None,
                })
                .collect(),
            baseline_label: None,
        };
        save(
            &|| crate::plot::save(&f, &figures.join("behaviour_shift")),
            "behaviour_shift",
        );
    }
    if !m.calibration.is_empty() {
        let colour = |s: &str| match s {
            "self" => BLUE_,
            "cross" => ORANGE,
            _ => GREY,
        };
        let f = CalibrationCurves {
            title: format!("Calibration: {} of the answer", cfg.calibration.property),
            curves: m
                .calibration
                .iter()
                .map(|(s, c)| Curve {
                    name: format!("{s} (MAD {:.1})", c.mad),
                    colour: colour(s),
                    points: c.bins.clone(),
                })
                .collect(),
        };
        save(
            &|| crate::plot::save(&f, &figures.join("calibration")),
            "calibration",
        );
    }
    let md = markdown(&m, &manifest, &drawn, &figure_errors);
    crate::fsutil::write_atomic(&dir.join("report.md"), md.as_bytes())?;
    crate::fsutil::write_atomic(
        &dir.join("metrics.json"),
        serde_json::to_string_pretty(&m)?.as_bytes(),
    )?;
    let timings = serde_json::json!({
        "stage_seconds": m.stage_seconds,
        "total_seconds": m.total_seconds,
        "stages": m.stages,
    });
    crate::fsutil::write_atomic(
        &dir.join("timings.json"),
        serde_json::to_string_pretty(&timings)?.as_bytes(),
    )?;
    Ok(m)
}

fn count(stages: &BTreeMap<String, serde_json::Value>, name: &str) -> String {
    stages.get(name).map_or("–".into(), |v| v.to_string())
}

fn rules_words(rules: Rules) -> &'static str {
    match rules {
        Rules::Notebook => "the authors' notebook's rules (the paper's numbers: rows with a non-compliant object answer excluded, undefined properties and non-compliant predictions scored wrong, each predictor scored only on strings its own object-level answer complied with, baseline = raw-case mode over all of the target's compliant answers)",
        Rules::Spec => "the spec's rules (rows with a non-compliant object answer or an undefined property excluded, non-compliant predictions scored wrong, every predictor scored on every string, baseline = mode of the kept rows' lower-cased values)",
    }
}

fn bars_table(bars: &[Bars], m1: &str, m2: &str) -> String {
    let mut md = format!("| task | self {m1}ft→{m1}ft | cross {m2}ft→{m1}ft | untrained {m1}→{m1} | mode baseline | self − cross [95 % CI] | p | rows | hyp. compliance self / cross |\n|---|---|---|---|---|---|---|---|---|\n");
    let cell = |s: &Score| format!("{} ± {}", pct(s.accuracy), pct(1.96 * s.se));
    for b in bars {
        let d = &b.self_vs_cross;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} [{}, {}] | {} | {} | {} / {} |",
            b.task,
            cell(&b.self_prediction),
            cell(&b.cross_prediction),
            b.untrained.as_ref().map_or("–".into(), cell),
            pct(b.mode_baseline),
            pct(d.difference),
            pct(d.difference_ci95[0]),
            pct(d.difference_ci95[1]),
            p_value(d.p_value),
            d.rows,
            pct(b.self_prediction.hypothetical_compliance),
            pct(b.cross_prediction.hypothetical_compliance),
        );
    }
    md
}

/// The figure's groups under the other rules, where any number differs.
fn other_rules(m: &Metrics) -> String {
    let same = |a: &Bars, b: &Bars| {
        let s = |x: &Score| (x.n, x.correct);
        s(&a.self_prediction) == s(&b.self_prediction)
            && s(&a.cross_prediction) == s(&b.cross_prediction)
            && a.untrained.as_ref().map(s) == b.untrained.as_ref().map(s)
            && a.mode_baseline == b.mode_baseline
    };
    let differ = m.self_vs_cross.len() != m.self_vs_cross_other_rules.len()
        || m.self_vs_cross
            .iter()
            .zip(&m.self_vs_cross_other_rules)
            .any(|(a, b)| !same(a, b));
    let Some(o) = m.self_vs_cross_other_rules.first() else {
        return String::new();
    };
    if !differ {
        return format!(
            "By {} every number above is the same.\n\n",
            rules_words(o.rules)
        );
    }
    format!(
        "### The same by the {} rules\n\nPath B by {}. The table above is the one to compare with the paper{}.\n\n{}\n",
        o.rules.name(),
        rules_words(o.rules),
        if m.rules == Rules::Notebook {
            ""
        } else {
            " only if it was made by the notebook's rules (`experiment report DIR --rules notebook`)"
        },
        bars_table(&m.self_vs_cross_other_rules, &m.m1, &m.m2)
    )
}

/// Where the rows of the figure's "all held-out" group came from, per predictor and rules.
fn row_counts(m: &Metrics) -> String {
    let mut md = String::from("### Rows (all held-out tasks; identity excluded)\n\n| rules | predictor | asked | on strings its own object answer complied with | target answer compliant | both | scored |\n|---|---|---|---|---|---|---|\n");
    for bars in [&m.self_vs_cross, &m.self_vs_cross_other_rules] {
        let Some(all) = bars.last() else {
            continue;
        };
        for (who, r) in [
            (format!("self {}ft", m.m1), &all.self_rows),
            (format!("cross {}ft", m.m2), &all.cross_rows),
        ] {
            let own = if r.predictor_filtered {
                r.predictor.to_string()
            } else if all.rules == Rules::Notebook {
                "– (no object-level run of its own)".into()
            } else {
                "– (not applied)".into()
            };
            let _ = writeln!(
                md,
                "| {} | {who} | {} | {own} | {} | {} | {} |",
                all.rules.name(),
                r.asked,
                r.target,
                r.both,
                r.scored
            );
        }
    }
    md.push('\n');
    md
}

fn entropy_table(e: &EntropyControlled, a: &str, b: &str) -> String {
    let mut md = String::from("| bar | rows | accuracy % | mode baseline % | entropy before (bits) | entropy after (bits) |\n|---|---|---|---|---|---|\n");
    for (name, bar) in [(a, &e.a), (b, &e.b)] {
        let _ = writeln!(
            md,
            "| {name} | {} | {} ± {} | {} | {:.2} | {:.2} |",
            bar.n,
            pct(bar.accuracy),
            pct(1.96 * bar.se),
            pct(bar.mode_baseline),
            bar.entropy_before,
            e.entropy_after
        );
    }
    md.push('\n');
    md
}

fn markdown(
    m: &Metrics,
    manifest: &super::Manifest,
    drawn: &[String],
    figure_errors: &[String],
) -> String {
    let cfg = &manifest.config;
    let mut md = format!("# Experiment `{}`\n\n", m.name);
    if !cfg.description.is_empty() {
        let _ = writeln!(md, "{}\n", cfg.description.trim());
    }
    let derived = |spec: &super::config::ModelSpec| {
        spec.derive.as_ref().map_or(String::new(), |d| {
            format!(
                " — derived: `{}` finetuned on its own answers sampled at temperature {} (seed {}) to every task's train-split prompts, adapter merged",
                spec.model, d.temperature, d.seed
            )
        })
    };
    let _ = writeln!(
        md,
        "- **M1** = {} (`{}`){}; **M2** = {} (`{}`){}.\n- Training tasks: {}; held-out tasks: {}; properties: {}.\n- Strings per task: {} train, {} val; at most {} examples per (task, property). Object answers ≤ {} tokens, hypothetical ≤ {}.\n- Finetuning (self and cross): rank {}, alpha {}, lr {}, batch {}, {} epoch(s).\n- introspect {} (Candle {}) at commit `{}`; manifest.json has the model and adapter hashes and the seeds.\n",
        m.m1,
        cfg.m1.model,
        derived(&cfg.m1),
        m.m2,
        cfg.m2.model,
        derived(&cfg.m2),
        cfg.data.train_tasks.join(", "),
        cfg.data.held_out_tasks.join(", "),
        cfg.data.properties.as_ref().map_or("each task's own".into(), |p| p.join(", ")),
        cfg.data.n_train,
        cfg.data.n_val,
        cfg.data.per_pair,
        cfg.generation.object_max_tokens,
        cfg.generation.hypothetical_max_tokens,
        cfg.finetune.rank,
        cfg.finetune.alpha,
        cfg.finetune.lr,
        cfg.finetune.batch_size,
        cfg.finetune.epochs,
        manifest.introspect_version,
        manifest.candle_version,
        manifest.git_commit,
    );
    for machine in &manifest.machines {
        let _ = writeln!(
            md,
            "- Ran on {} ({} threads, {}): {}.",
            machine.cpu, machine.threads, machine.device, machine.kernels
        );
    }
    md.push('\n');
    if cfg.m1.model == cfg.m2.model {
        md.push_str("**Confound.** M1 and M2 are the same network, one of them with an extra adapter merged in: they share every base weight, so whatever M1 knows about its own computation M2 largely knows too. Cross-prediction is therefore easier here than between the paper's different model families, and a self-prediction advantage is harder to show.\n\n");
    }

    let examples = |stage: &str| m.stages.get(stage).and_then(|v| v.as_u64());
    if let (Some(own), Some(cross)) = (examples("m1ft_training_set"), examples("m2ft_training_set"))
    {
        if cross < own {
            let _ = writeln!(
                md,
                "**Unequal training.** M2ft was trained on {cross} examples against M1ft's {own}: the cross set is built from M1ft's object-level answers, and those that are non-compliant or leave a property undefined are dropped (as the paper). Fewer examples favour self-prediction.\n"
            );
        }
    }
    md.push_str("## Self- vs cross-prediction (held-out tasks, val split)\n\n");
    if m.self_vs_cross.is_empty() {
        md.push_str("Not run yet.\n\n");
    } else {
        let _ = writeln!(
            md,
            "Accuracy of predicting M1ft's object-level behaviour, path B (answers lower-cased) by {}, 95 % CI = ±1.96·SE as the paper's bars. Untrained = M1 predicting its own (untrained) behaviour. The paired difference uses rows both predictors were scored on; p from McNemar's exact test.\n",
            rules_words(m.rules)
        );
        md.push_str(&bars_table(&m.self_vs_cross, &m.m1, &m.m2));
        if let Some(all) = m.self_vs_cross.last() {
            let d = &all.self_vs_cross;
            let verdict = if d.p_value < 0.05 && d.difference > 0.0 {
                "self-prediction beats cross-prediction (p < 0.05)"
            } else if d.p_value < 0.05 {
                "cross-prediction beats self-prediction (p < 0.05) — the opposite of the paper's finding"
            } else {
                "no significant difference between self- and cross-prediction at this size"
            };
            let _ = writeln!(
                md,
                "\n**Result:** {verdict}: {} % vs {} % on {} paired rows ({} right only by self, {} only by cross).\n",
                pct(d.a_accuracy),
                pct(d.b_accuracy),
                d.rows,
                d.only_a,
                d.only_b
            );
        }
        if let Some(c) = m.self_training_changed_behaviour {
            let _ = writeln!(
                md,
                "Self-prediction training changed {} % of M1's object-level property values on these strings (the paper: finetuning shifts behaviour, which is why M2 is trained on M1ft, not M1).\n",
                pct(c)
            );
        }
        if drawn.iter().any(|d| d == "self_vs_cross") {
            md.push_str("![self vs cross](figures/self_vs_cross.png)\n\n");
        }
        md.push_str(&other_rules(m));
        md.push_str(&row_counts(m));
        if let Some(e) = &m.entropy_controlled {
            let _ = writeln!(
                md,
                "### Entropy-controlled: before vs after self-prediction training\n\nM1 → M1 (before) and M1ft → M1ft (after) on all held-out tasks, scored by the {} rules; per (task, property) both cut to the strings both have and then to the same distribution of object-level values (§6.7: for each of the before-bar's {} most common values, as many rows from each bar as the scarcer has, drawn after a shuffle seeded {}), so both have equal entropy and equal mode baseline.\n",
                m.rules.name(),
                e.top_values,
                e.seed
            );
            md.push_str(&entropy_table(e, "before (M1 → M1)", "after (M1ft → M1ft)"));
        }
    }

    md.push_str("## Behaviour shift\n\n");
    match &m.behaviour_shift {
        None => md.push_str("Not run.\n\n"),
        Some(s) => {
            md.push_str("Mc = M1ft finetuned on M2's object-level answers (held-out tasks' train split; no hypothetical questions). On val rows where Mc's object-level property value differs from M1ft's (both compliant), does Mc's hypothetical answer match its new behaviour or the old one? Non-compliant hypothetical answers dropped.\n\n| property | shifted | same | not compliant | scored | predicts old % | predicts new % | p (new vs old) |\n|---|---|---|---|---|---|---|---|\n");
            let row = |md: &mut String, p: &ShiftScore| {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} ± {} | {} ± {} | {} |",
                    p.property,
                    p.shifted,
                    p.same,
                    p.not_compliant,
                    p.new.n,
                    pct(p.old.accuracy),
                    pct(1.96 * p.old.se),
                    pct(p.new.accuracy),
                    pct(1.96 * p.new.se),
                    p_value(p.p_value)
                );
            };
            for p in &s.per_property {
                row(&mut md, p);
            }
            row(&mut md, &s.overall);
            md.push('\n');
            if let Some(e) = &s.entropy_controlled {
                md.push_str("Entropy-controlled (§6.7): the scored shifted rows as two bars, against the old values and against the new, cut per (task, property) to the same distribution of values.\n\n");
                md.push_str(&entropy_table(
                    e,
                    "predicts old (M1ft)",
                    "predicts new (Mc)",
                ));
            }
            if drawn.iter().any(|d| d == "behaviour_shift") {
                md.push_str("![behaviour shift](figures/behaviour_shift.png)\n\n");
            }
        }
    }

    md.push_str("## Calibration\n\n");
    if m.calibration.is_empty() {
        md.push_str("Not run.\n\n");
    } else {
        let _ = writeln!(
            md,
            "{} of the answer, {} method, first {} val strings of {}; MAD = mean absolute difference of 10 equal-count bins from the diagonal, in percentage points (lower = better calibrated).\n\n| setup | MAD | MAD (top-1 only) | strings | points |\n|---|---|---|---|---|",
            cfg.calibration.property,
            serde_json::to_value(cfg.calibration.method).map_or("?".into(), |v| v.as_str().unwrap_or("?").to_string()),
            cfg.calibration.strings,
            cfg.calibration.task
        );
        for (s, c) in &m.calibration {
            let _ = writeln!(
                md,
                "| {s} | {:.1} | {:.1} | {} | {} |",
                c.mad, c.mad_top1, c.strings, c.points
            );
        }
        md.push('\n');
        if drawn.iter().any(|d| d == "calibration") {
            md.push_str("![calibration](figures/calibration.png)\n\n");
        }
    }

    md.push_str("## Training sets and finetuning\n\n| model | examples | steps | final train loss | seconds |\n|---|---|---|---|---|\n");
    for (label, set, ft) in [
        ("M1 derived", "m1_derive_training_set", "m1_derive_finetune"),
        ("M1ft (self)", "m1ft_training_set", "m1ft_finetune"),
        ("M2 derived", "m2_derive_training_set", "m2_derive_finetune"),
        ("M2ft (cross)", "m2ft_training_set", "m2ft_finetune"),
        ("Mc (shift)", "shift_training_set", "shift_finetune"),
    ] {
        let Some(t) = m.stages.get(ft) else {
            continue;
        };
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {} | {:.0} |",
            count(&m.stages, set),
            t["steps"],
            t["final_train_loss"]
                .as_f64()
                .map_or("–".into(), |l| format!("{l:.3}")),
            t["seconds"].as_f64().unwrap_or(f64::NAN)
        );
    }

    let _ = writeln!(
        md,
        "\n## Time\n\n{} stages, {:.1} min in all on this machine.\n\n| stage | seconds |\n|---|---|",
        m.stage_seconds.len(),
        m.total_seconds / 60.0
    );
    let mut by_time: Vec<(&String, &f64)> = m.stage_seconds.iter().collect();
    by_time.sort_by(|a, b| b.1.total_cmp(a.1));
    for (s, t) in by_time {
        let _ = writeln!(md, "| {s} | {t:.0} |");
    }
    if !figure_errors.is_empty() {
        let _ = writeln!(md, "\nFigures not drawn: {}", figure_errors.join("; "));
    }
    md
}
