//! The loss curve of a run (train loss per step, validation loss where measured), SVG and PNG.

use std::path::Path;

use anyhow::Result;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::plot::{err, save, Figure};

struct LossCurve<'a> {
    train: &'a [(usize, f64)],
    val: &'a [(usize, f64)],
}

impl Figure for LossCurve<'_> {
    fn size(&self) -> (u32, u32) {
        (800, 480)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let points = || self.train.iter().chain(self.val);
        let max_step = points().map(|p| p.0).max().unwrap_or(1).max(1);
        let max_loss = points()
            .map(|p| p.1)
            .filter(|l| l.is_finite())
            .fold(0.0f64, f64::max)
            .max(1e-3);
        let mut chart = ChartBuilder::on(root)
            .caption("loss", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0usize..max_step, 0f64..max_loss * 1.05)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("cross-entropy")
            .draw()
            .map_err(err)?;
        chart
            .draw_series(LineSeries::new(self.train.iter().copied(), &BLUE))
            .map_err(err)?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
        if !self.val.is_empty() {
            chart
                .draw_series(LineSeries::new(self.val.iter().copied(), &RED))
                .map_err(err)?
                .label("validation")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(err)?;
        Ok(())
    }
}

/// Writes `loss.svg` and `loss.png` under `dir`.
pub fn loss_curve(dir: &Path, train: &[(usize, f64)], val: &[(usize, f64)]) -> Result<()> {
    save(&LossCurve { train, val }, &dir.join("loss"))?;
    Ok(())
}
