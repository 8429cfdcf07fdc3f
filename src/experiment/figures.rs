//! The experiment's figures: grouped accuracy bars with error bars and baselines (the paper's Fig. 3 and
//! behaviour-shift charts), and the calibration curve.

use anyhow::Result;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::plot::{err, Figure};

/// One bar: height and half-width of its error bar (NaN heights are left out).
#[derive(Debug, Clone, Copy)]
pub struct Bar {
    pub value: f64,
    pub error: f64,
}

pub struct Group {
    pub name: String,
    pub bars: Vec<Bar>,
    /// Drawn as a dashed line across the group (the mode baseline).
    pub baseline: Option<f64>,
}

pub struct GroupedBars {
    pub title: String,
    pub y_label: String,
    /// Names of the bars within each group, in order, with their colours.
    pub series: Vec<(String, RGBColor)>,
    pub groups: Vec<Group>,
    pub baseline_label: Option<String>,
}

pub const GREY: RGBColor = RGBColor(150, 150, 150);
pub const ORANGE: RGBColor = RGBColor(230, 140, 40);
pub const BLUE_: RGBColor = RGBColor(40, 100, 200);
pub const GREEN_: RGBColor = RGBColor(40, 150, 80);

impl Figure for GroupedBars {
    fn size(&self) -> (u32, u32) {
        (260 + 150 * self.groups.len() as u32, 520)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let n = self.groups.len().max(1);
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..n as f64, 0f64..1.05f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_x_axis()
            .y_desc(self.y_label.as_str())
            .y_label_formatter(&|y| format!("{:.0}%", y * 100.0))
            .draw()
            .map_err(err)?;
        let k = self.series.len().max(1) as f64;
        let width = 0.8 / k;
        for (s, (name, colour)) in self.series.iter().enumerate() {
            let bars: Vec<(f64, Bar)> = self
                .groups
                .iter()
                .enumerate()
                .filter_map(|(g, group)| group.bars.get(s).map(|b| (g as f64, *b)))
                .filter(|(_, b)| b.value.is_finite())
                .collect();
            let left = |g: f64| g + 0.1 + s as f64 * width;
            chart
                .draw_series(bars.iter().map(|(g, b)| {
                    Rectangle::new(
                        [(left(*g), 0.0), (left(*g) + width * 0.92, b.value)],
                        colour.filled(),
                    )
                }))
                .map_err(err)?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled())
                });
            chart
                .draw_series(
                    bars.iter()
                        .filter(|(_, b)| b.error.is_finite())
                        .map(|(g, b)| {
                            let x = left(*g) + width * 0.46;
                            ErrorBar::new_vertical(
                                x,
                                (b.value - b.error).max(0.0),
                                b.value,
                                (b.value + b.error).min(1.0),
                                BLACK.stroke_width(1),
                                8,
                            )
                        }),
                )
                .map_err(err)?;
        }
        let baselines: Vec<(f64, f64)> = self
            .groups
            .iter()
            .enumerate()
            .filter_map(|(g, group)| {
                group
                    .baseline
                    .filter(|b| b.is_finite())
                    .map(|b| (g as f64, b))
            })
            .collect();
        if !baselines.is_empty() {
            let style = BLACK.stroke_width(2);
            let mut first = true;
            for (g, b) in &baselines {
                let s = chart
                    .draw_series(DashedLineSeries::new(
                        [(g + 0.05, *b), (g + 0.95, *b)],
                        6,
                        4,
                        style,
                    ))
                    .map_err(err)?;
                if first {
                    if let Some(label) = &self.baseline_label {
                        s.label(label.as_str()).legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 14, y)], style)
                        });
                    }
                    first = false;
                }
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        // Group names under the bars, centred.
        let style =
            TextStyle::from(("sans-serif", 15).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
        for (g, group) in self.groups.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(g as f64 + 0.5, 0.0));
            root.draw_text(&group.name, &style, (x, y + 8))
                .map_err(err)?;
        }
        Ok(())
    }
}

/// One calibration curve: its name, colour and bin means.
pub struct Curve {
    pub name: String,
    pub colour: RGBColor,
    pub points: Vec<(f64, f64)>,
}

/// Calibration curves: binned (object probability, hypothetical probability) per setup.
pub struct CalibrationCurves {
    pub curves: Vec<Curve>,
    pub title: String,
}

impl Figure for CalibrationCurves {
    fn size(&self) -> (u32, u32) {
        (620, 560)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<()>
    where
        DB::ErrorType: 'static,
    {
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 18))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("object-level probability of the behaviour")
            .y_desc("hypothetical probability")
            .draw()
            .map_err(err)?;
        chart
            .draw_series(DashedLineSeries::new(
                [(0.0, 0.0), (1.0, 1.0)],
                6,
                4,
                GREY.stroke_width(1),
            ))
            .map_err(err)?
            .label("perfect calibration")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 14, y)], GREY));
        for Curve {
            name,
            colour,
            points,
        } in &self.curves
        {
            let colour = *colour;
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    colour.stroke_width(2),
                ))
                .map_err(err)?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 14, y)], colour.stroke_width(2))
                });
            chart
                .draw_series(points.iter().map(|p| Circle::new(*p, 4, colour.filled())))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        Ok(())
    }
}
