//! `experiment run` and `experiment report`.

use std::path::PathBuf;

use anyhow::Result;
use introspect::awareness::{Awareness, AwarenessConfig};
use introspect::experiment::{report, Experiment, ExperimentConfig};
use introspect::runtime::{self, DeviceKind};

#[derive(clap::Subcommand)]
pub enum ExperimentCmd {
    /// Run every stage of an experiment config into one run directory (resumable): self- vs
    /// cross-prediction (experiments/*.toml) or behavioural self-awareness (experiments/self-awareness/).
    Run {
        /// The experiment's TOML (see experiments/).
        config: PathBuf,
        /// Run directory (default: runs/<config name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue a run directory that already exists (finished stages are kept).
        #[arg(long)]
        resume: bool,
        #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
        device: DeviceKind,
    },
    /// Re-render report.md, metrics.json and the figures from a run's stored outputs (no model needed).
    /// `--compare A B` instead lists what differs between two runs: manifests (config, build, seeds,
    /// hashes, machines), stored answers and headline numbers.
    Report {
        #[arg(required_unless_present = "compare")]
        dir: Option<PathBuf>,
        #[arg(long, num_args = 2, value_names = ["A", "B"], conflicts_with = "dir")]
        compare: Option<Vec<PathBuf>>,
        /// Path B's rules for the self/cross figure (default: the config's `analysis.rules`).
        #[arg(long, value_enum)]
        rules: Option<introspect::eval::Rules>,
    },
}

fn summary(dir: &std::path::Path, m: &report::Metrics) {
    if let Some(all) = m.self_vs_cross.last() {
        let d = &all.self_vs_cross;
        println!(
            "held-out accuracy ({} rules): self {:.1} %, cross {:.1} %, untrained {}, mode baseline {:.1} %; self − cross {:+.1} pp (p = {:.3}, {} rows)",
            m.rules.name(),
            100.0 * all.self_prediction.accuracy,
            100.0 * all.cross_prediction.accuracy,
            all.untrained
                .as_ref()
                .map_or("–".into(), |u| format!("{:.1} %", 100.0 * u.accuracy)),
            100.0 * all.mode_baseline,
            100.0 * d.difference,
            d.p_value,
            d.rows
        );
    }
    if let Some(s) = &m.behaviour_shift {
        println!(
            "behaviour shift: {} shifted rows scored; predicts new {:.1} %, old {:.1} % (p = {:.3})",
            s.overall.new.n,
            100.0 * s.overall.new.accuracy,
            100.0 * s.overall.old.accuracy,
            s.overall.p_value
        );
    }
    for (setup, c) in &m.calibration {
        println!("calibration {setup}: MAD {:.1} pp", c.mad);
    }
    println!(
        "{:.1} min of stages → {}",
        m.total_seconds / 60.0,
        dir.join("report.md").display()
    );
}

/// A self-awareness config has two `[[arms]]`; a self-vs-cross one has `m1` and `m2`.
fn is_self_awareness(toml_text: &str) -> bool {
    toml::from_str::<toml::Table>(toml_text).is_ok_and(|t| t.contains_key("arms"))
}

fn awareness_summary(dir: &std::path::Path, m: &introspect::awareness::report::Metrics) {
    if let Some(c) = m.behaviour.first() {
        println!(
            "behaviour ({}): {} {:.2}, base {:.2}, {} {:.2}",
            c.check,
            c.arms[0].name,
            c.arms[0].mean.unwrap_or(f64::NAN),
            c.base.unwrap_or(f64::NAN),
            c.arms[1].name,
            c.arms[1].mean.unwrap_or(f64::NAN)
        );
    }
    for q in m.questions.iter().filter(|q| {
        q.method == introspect::awareness::Method::Sampled
            && q.unmapped == introspect::awareness::score::Unmapped::Half
            && !q.judged
    }) {
        println!(
            "{}: {} {:.2}, base {:.2}, {} {:.2}",
            q.label.replace('\n', " "),
            q.arms[0].name,
            q.arms[0].mean.unwrap_or(f64::NAN),
            q.base.unwrap_or(f64::NAN),
            q.arms[1].name,
            q.arms[1].mean.unwrap_or(f64::NAN)
        );
    }
    println!(
        "{:.1} min of stages → {}",
        m.total_seconds / 60.0,
        dir.join("report.md").display()
    );
}

pub fn experiment(cmd: ExperimentCmd) -> Result<()> {
    match cmd {
        ExperimentCmd::Run {
            config,
            out,
            resume,
            device,
        } => {
            if is_self_awareness(&std::fs::read_to_string(&config).unwrap_or_default()) {
                let cfg = AwarenessConfig::load(&config)?;
                let dir = out.unwrap_or_else(|| PathBuf::from("runs").join(&cfg.name));
                let mut exp = Awareness::prepare(cfg, &dir, resume)?;
                exp.device = runtime::device(device)?;
                let m = exp.run()?;
                awareness_summary(&dir, &m);
                return Ok(());
            }
            let cfg = ExperimentConfig::load(&config)?;
            let dir = out.unwrap_or_else(|| PathBuf::from("runs").join(&cfg.name));
            let mut exp = Experiment::prepare(cfg, &dir, resume)?;
            exp.device = runtime::device(device)?;
            let m = exp.run()?;
            summary(&dir, &m);
            Ok(())
        }
        ExperimentCmd::Report {
            dir,
            compare,
            rules,
        } => {
            if let Some(pair) = compare {
                print!(
                    "{}",
                    introspect::experiment::compare::compare(&pair[0], &pair[1])?
                );
                return Ok(());
            }
            let Some(dir) = dir else {
                anyhow::bail!("name a run directory, or two with --compare A B");
            };
            let manifest = std::fs::read_to_string(dir.join("manifest.json")).unwrap_or_default();
            if serde_json::from_str::<serde_json::Value>(&manifest)
                .is_ok_and(|m| m["config"].get("arms").is_some())
            {
                let m = introspect::awareness::report::write(&dir)?;
                awareness_summary(&dir, &m);
                return Ok(());
            }
            let m = report::write(&dir, rules)?;
            summary(&dir, &m);
            Ok(())
        }
    }
}
