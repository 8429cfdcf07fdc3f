//! `experiment report --compare A B`: what differs between two runs of the self-vs-cross experiment —
//! their manifests (config, build, seeds, model and adapter hashes, the machines they ran on), the
//! answers in each stored run, and the headline numbers — so that a figure that moved between two
//! machines can be traced to the answers that moved it.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;

use super::report::{compute, Metrics};
use super::stages::differences;
use super::Manifest;
use crate::eval::report::pct;
use crate::runs::{self, RunKind, RunSettings};

/// Every stored object-level or hypothetical run under `dir`, by its path relative to `dir`.
fn stored_runs(dir: &Path) -> BTreeMap<PathBuf, RunKind> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == "run.json") {
                let kind = std::fs::read_to_string(&p)
                    .ok()
                    .and_then(|t| serde_json::from_str::<RunSettings>(&t).ok())
                    .map(|s| s.kind);
                if let (Some(kind), Ok(rel)) = (kind, d.strip_prefix(dir)) {
                    out.insert(rel.to_path_buf(), kind);
                }
            }
        }
    }
    out
}

/// Answers that differ between the same stored run in A and in B: (compared, differing, first id).
fn answer_differences(a: &Path, b: &Path, kind: RunKind) -> Result<(usize, usize, Option<String>)> {
    let (_, ra) = runs::read_run(a, kind)?;
    let (_, rb) = runs::read_run(b, kind)?;
    let by_id: BTreeMap<&str, &runs::Record> = rb.iter().map(|r| (r.id.as_str(), r)).collect();
    let (mut compared, mut differing, mut first) = (0, 0, None);
    for r in &ra {
        let Some(o) = by_id.get(r.id.as_str()) else {
            continue;
        };
        compared += 1;
        if r.response != o.response {
            differing += 1;
            first.get_or_insert_with(|| r.id.clone());
        }
    }
    Ok((compared, differing, first))
}

fn headline(m: &Metrics) -> Vec<(String, f64)> {
    let mut v = vec![];
    for b in &m.self_vs_cross {
        v.push((format!("{} self", b.task), b.self_prediction.accuracy));
        v.push((format!("{} cross", b.task), b.cross_prediction.accuracy));
        if let Some(u) = &b.untrained {
            v.push((format!("{} untrained", b.task), u.accuracy));
        }
        v.push((format!("{} mode baseline", b.task), b.mode_baseline));
    }
    if let Some(s) = &m.behaviour_shift {
        v.push(("shift: predicts old".into(), s.overall.old.accuracy));
        v.push(("shift: predicts new".into(), s.overall.new.accuracy));
    }
    if let Some(c) = m.self_training_changed_behaviour {
        v.push(("behaviour changed by self-training".into(), c));
    }
    for (setup, c) in &m.calibration {
        // MAD is in percentage points already; kept as a fraction for the common formatting.
        v.push((format!("calibration MAD {setup}"), c.mad / 100.0));
    }
    v
}

/// The comparison as markdown.
pub fn compare(a: &Path, b: &Path) -> Result<String> {
    let ma: Manifest = super::read_manifest(a)?;
    let mb: Manifest = super::read_manifest(b)?;
    let mut md = format!("# {} vs {}\n\n", a.display(), b.display());

    md.push_str("## Manifests\n\n");
    let mut diffs = vec![];
    let (va, vb) = (serde_json::to_value(&ma)?, serde_json::to_value(&mb)?);
    for key in [
        "config",
        "introspect_version",
        "candle_version",
        "git_commit",
        "seeds",
        "hashes",
        "machines",
    ] {
        differences(&format!(".{key}"), &va[key], &vb[key], &mut diffs);
    }
    if diffs.is_empty() {
        md.push_str("The same config, build, seeds, model and adapter hashes and machines.\n\n");
    } else {
        for d in &diffs {
            let _ = writeln!(md, "- {d}");
        }
        md.push('\n');
    }

    md.push_str("## Stored answers\n\n| run | kind | compared | differ | first that differs |\n|---|---|---|---|---|\n");
    let (runs_a, runs_b) = (stored_runs(a), stored_runs(b));
    let mut any = false;
    for (rel, kind) in &runs_a {
        if runs_b.get(rel) != Some(kind) {
            let _ = writeln!(md, "| {} | {kind:?} | only in A | | |", rel.display());
            continue;
        }
        let (n, k, first) = answer_differences(&a.join(rel), &b.join(rel), *kind)?;
        any |= k > 0;
        let _ = writeln!(
            md,
            "| {} | {kind:?} | {n} | {k} | {} |",
            rel.display(),
            first.unwrap_or_default()
        );
    }
    for rel in runs_b.keys().filter(|r| !runs_a.contains_key(*r)) {
        let _ = writeln!(md, "| {} | | only in B | | |", rel.display());
    }
    md.push('\n');

    md.push_str("## Headline numbers\n\n| | A % | B % | B − A (pp) |\n|---|---|---|---|\n");
    let (ha, hb) = (headline(&compute(a, None)?), headline(&compute(b, None)?));
    let hb: BTreeMap<String, f64> = hb.into_iter().collect();
    let mut moved = 0;
    for (name, x) in &ha {
        let y = hb.get(name).copied().unwrap_or(f64::NAN);
        let same = x == &y || (x.is_nan() && y.is_nan());
        moved += usize::from(!same);
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} |",
            pct(*x),
            pct(y),
            if same {
                "=".into()
            } else {
                format!("{:+.2}", 100.0 * (y - x))
            }
        );
    }
    let bytes = |d: &Path| std::fs::read(d.join("metrics.json")).ok();
    let _ = writeln!(
        md,
        "\n{} of {} numbers differ; metrics.json {}.{}",
        moved,
        ha.len(),
        match (bytes(a), bytes(b)) {
            (Some(x), Some(y)) if x == y => "is byte-identical",
            (Some(_), Some(_)) => "differs",
            _ => "is missing in one of them",
        },
        if any && diffs.iter().any(|d| d.starts_with("machines")) {
            " The runs ran on different machines or kernel paths and some answers differ: float sums taken in another order can flip a near-tie between two tokens, and a flipped answer changes what is trained on and asked next."
        } else {
            ""
        }
    );
    Ok(md)
}
