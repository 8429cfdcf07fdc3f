//! Markdown tables and metrics.json for an evaluation.

use std::fmt::Write;

use super::{Evaluation, Score, Variant};

pub fn pct(x: f64) -> String {
    if x.is_finite() {
        format!("{:.1}", 100.0 * x)
    } else {
        "–".into()
    }
}

fn row(label: &str, property: &str, mode: &str, s: &Score) -> String {
    format!(
        "| {label} | {property} | {} | {} | [{}, {}] | {} | {mode} | {} | {} |\n",
        s.n,
        pct(s.accuracy),
        pct(s.ci95[0]),
        pct(s.ci95[1]),
        pct(s.mode_baseline),
        pct(s.object_compliance),
        pct(s.hypothetical_compliance),
    )
}

/// One markdown section per variant: a row per (task, property), then the micro-averages.
pub fn markdown(title: &str, predictor: &str, target: &str, evals: &[Evaluation]) -> String {
    let mut md = format!("# {title}\n\nPredictor (hypothetical answers): `{predictor}`  \nTarget (object-level answers): `{target}`\n");
    for e in evals {
        let how = match e.variant {
            Variant::PathB => "path B by the spec's rules (Fig. 1 / cross-prediction): lower-case only; rows whose object answer is non-compliant or leaves the property undefined excluded, non-compliant predictions wrong; baseline = mode of the kept rows' lower-cased values, overall the mean of the per-pair baselines",
            Variant::PathBNotebook => "path B by the authors' notebook (the paper's Fig. 1 / cross-prediction numbers): lower-case only; rows whose object answer is non-compliant excluded, undefined properties and non-compliant predictions wrong; the predictor asked only about strings its own object answer complied with; baseline = raw-case mode over all the target's compliant object answers, overall the mean of the per-pair baselines",
            Variant::PathA => "path A (before/after training): predictions cleaned of punctuation; all rows kept; baseline row-weighted",
        };
        let _ = write!(
            md,
            "\n## {}\n\n{how}\n\n| task | property | n | accuracy % | 95% CI (bootstrap) | mode baseline % | mode | object compliant % | hypothetical compliant % |\n|---|---|---|---|---|---|---|---|---|\n",
            e.variant.name()
        );
        for p in &e.pairs {
            md.push_str(&row(
                &p.task,
                &p.property,
                &p.mode.as_deref().map_or("–".into(), |m| format!("`{m:?}`")),
                &p.score,
            ));
        }
        for (label, s) in [
            ("**all (micro, excl. identity)**", Some(&e.overall)),
            ("**held-out tasks**", e.held_out.as_ref()),
            ("**held-in tasks**", e.held_in.as_ref()),
        ] {
            if let Some(s) = s {
                md.push_str(&row(label, "", "", s));
            }
        }
    }
    md
}
