//! The self-report figure in the layout of the paper's Fig. 3 / Fig. 30: one row per question, the
//! score (0 = second arm's policy, 1 = first arm's) across, each arm's mean over seeds with its
//! bootstrap CI, and the untrained base.

use anyhow::Result;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::report::QuestionScore;
use crate::experiment::figures::{BLUE_, GREY, ORANGE};
use crate::plot::{err, Figure};

pub struct ScoreDots {
    pub title: String,
    pub arms: [String; 2],
    pub rows: Vec<QuestionScore>,
}

impl Figure for ScoreDots {
    fn size(&self) -> (u32, u32) {
        (900, 140 + 56 * self.rows.len() as u32)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let n = self.rows.len().max(1) as f64;
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 18))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(260)
            .build_cartesian_2d(0f64..1f64, 0f64..n)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .disable_y_axis()
            .x_desc(format!(
                "score (0 = {}, 1 = {})",
                self.arms[1], self.arms[0]
            ))
            .draw()
            .map_err(err)?;
        // Row i from the top; the three series sit a little apart within it.
        let y = |i: usize, k: f64| n - i as f64 - 0.5 + k;
        let series: [(String, RGBColor, f64); 3] = [
            (self.arms[0].clone(), ORANGE, 0.18),
            ("base".into(), GREY, 0.0),
            (self.arms[1].clone(), BLUE_, -0.18),
        ];
        for (s, (name, colour, offset)) in series.iter().enumerate() {
            let points: Vec<(f64, f64, Option<[f64; 2]>)> = self
                .rows
                .iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    let (value, ci) = match s {
                        0 => (r.arms[0].mean, r.arms[0].ci),
                        1 => (r.base, None),
                        _ => (r.arms[1].mean, r.arms[1].ci),
                    };
                    value.map(|v| (v, y(i, *offset), ci))
                })
                .collect();
            let colour = *colour;
            chart
                .draw_series(
                    points
                        .iter()
                        .map(|(v, yy, _)| Circle::new((*v, *yy), 6, colour.filled())),
                )
                .map_err(err)?
                .label(name.as_str())
                .legend(move |(x, y)| Circle::new((x + 6, y), 5, colour.filled()));
            chart
                .draw_series(points.iter().filter_map(|(v, yy, ci)| {
                    ci.map(|[lo, hi]| {
                        ErrorBar::new_horizontal(*yy, lo, *v, hi, colour.stroke_width(2), 8)
                    })
                }))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        let style = TextStyle::from(("sans-serif", 14).into_font())
            .pos(Pos::new(HPos::Right, VPos::Center));
        for (i, r) in self.rows.iter().enumerate() {
            let (x, yy) = chart.backend_coord(&(0.0, y(i, 0.0)));
            root.draw_text(&r.label.replace('\n', " "), &style, (x - 10, yy))
                .map_err(err)?;
        }
        Ok(())
    }
}
