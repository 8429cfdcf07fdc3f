//! Learning-rate schedules: constant, or linear / cosine decay to zero, each with linear warm-up.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    #[default]
    Constant,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Schedule {
    /// The learning rate of update `step` (0-based). Warm-up ramps to `lr` over `warmup_steps` updates,
    /// the first already at lr/warmup (transformers' schedulers spend their first update at lr 0).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / decay_steps).min(1.0);
        match self.kind {
            ScheduleKind::Constant => self.lr,
            ScheduleKind::Linear => self.lr * (1.0 - progress),
            ScheduleKind::Cosine => self.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        let s = |kind| Schedule {
            kind,
            lr: 1.0,
            warmup_steps: 4,
            total_steps: 12,
        };
        let lin = s(ScheduleKind::Linear);
        assert_eq!(lin.lr(0), 0.25);
        assert_eq!(lin.lr(3), 1.0);
        assert_eq!(lin.lr(4), 1.0);
        assert_eq!(lin.lr(8), 0.5);
        assert_eq!(lin.lr(12), 0.0);
        let cos = s(ScheduleKind::Cosine);
        assert!((cos.lr(8) - 0.5).abs() < 1e-12);
        assert!(cos.lr(11) < cos.lr(10));
        assert_eq!(s(ScheduleKind::Constant).lr(11), 1.0);
    }
}
