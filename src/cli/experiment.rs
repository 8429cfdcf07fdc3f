//! `experiment run` and `experiment report`.

use std::path::PathBuf;

use anyhow::Result;
use introspect::experiment::{report, Experiment, ExperimentConfig};
use introspect::runtime::{self, DeviceKind};

#[derive(clap::Subcommand)]
pub enum ExperimentCmd {
    /// Run every stage of an experiment config into one run directory (resumable).
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
    Report { dir: PathBuf },
}

fn summary(dir: &std::path::Path, m: &report::Metrics) {
    if let Some(all) = m.self_vs_cross.last() {
        let d = &all.self_vs_cross;
        println!(
            "held-out accuracy: self {:.1} %, cross {:.1} %, untrained {}, mode baseline {:.1} %; self − cross {:+.1} pp (p = {:.3}, {} rows)",
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

pub fn experiment(cmd: ExperimentCmd) -> Result<()> {
    match cmd {
        ExperimentCmd::Run {
            config,
            out,
            resume,
            device,
        } => {
            let cfg = ExperimentConfig::load(&config)?;
            let dir = out.unwrap_or_else(|| PathBuf::from("runs").join(&cfg.name));
            let mut exp = Experiment::prepare(cfg, &dir, resume)?;
            exp.device = runtime::device(device)?;
            let m = exp.run()?;
            summary(&dir, &m);
            Ok(())
        }
        ExperimentCmd::Report { dir } => {
            let m = report::write(&dir)?;
            summary(&dir, &m);
            Ok(())
        }
    }
}
