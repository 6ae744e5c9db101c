//! A search's trials' validation curves as a PNG: every trial in grey, those promoted past
//! their first rung in colour, the best one in black; rungs as dashed verticals.

use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;

use super::curves::ensure_font;

/// One trial's curve: `(epoch, figure)` points.
pub struct TrialCurve {
    pub trial: u32,
    pub points: Vec<(u32, f64)>,
    pub promoted: bool,
    pub best: bool,
}

/// Draws the curves; `y_label` names the figure (e.g. "validation accuracy %").
pub fn plot_search(
    title: &str,
    y_label: &str,
    curves: &[TrialCurve],
    rungs: &[u32],
    out: &Path,
) -> Result<()> {
    let points = curves.iter().flat_map(|c| c.points.iter());
    let x_max = points.clone().map(|p| p.0).max().unwrap_or(1).max(2) as f64;
    anyhow::ensure!(
        points.clone().next().is_some(),
        "no trial has recorded an epoch yet"
    );
    let (lo, hi) = points.fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.1), hi.max(p.1))
    });
    let pad = ((hi - lo) * 0.05).max(1e-3);
    ensure_font();
    let root = BitMapBackend::new(out, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(1.0..x_max, (lo - pad)..(hi + pad))?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(y_label)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style(("sans-serif", 14))
        .draw()?;
    for &r in rungs.iter().filter(|&&r| f64::from(r) < x_max) {
        let x = f64::from(r);
        chart.draw_series(DashedLineSeries::new(
            [(x, lo - pad), (x, hi + pad)],
            6,
            4,
            BLACK.mix(0.35).stroke_width(1),
        ))?;
    }
    let line = |c: &TrialCurve| {
        c.points
            .iter()
            .map(|p| (f64::from(p.0), p.1))
            .collect::<Vec<_>>()
    };
    for c in curves.iter().filter(|c| !c.promoted && !c.best) {
        chart.draw_series(LineSeries::new(
            line(c),
            RGBColor(170, 170, 170).stroke_width(1),
        ))?;
    }
    for (i, c) in curves.iter().filter(|c| c.promoted && !c.best).enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(line(c), color.stroke_width(2)))?
            .label(format!("trial {} (promoted)", c.trial))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    for c in curves.iter().filter(|c| c.best) {
        chart
            .draw_series(LineSeries::new(line(c), BLACK.stroke_width(3)))?
            .label(format!("trial {} (best)", c.trial))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()?;
    root.present()?;
    Ok(())
}
