//! Loss and accuracy curves from a run's metrics JSONL, as a PNG.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::engine::train::{read_epochs_text, EpochMetrics};

pub(super) fn ensure_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Embedded DejaVu: plots render the same on machines without system fonts.
        let _ = register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

/// Reads the per-epoch lines of a metrics JSONL file, one per epoch (other lines, and an
/// epoch's lines superseded by a later attempt's, are skipped).
pub fn read_epochs(path: &Path) -> Result<Vec<EpochMetrics>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(read_epochs_text(&text))
}

/// Draws loss (left) and accuracy (right) per epoch, train and validation.
pub fn plot_curves(epochs: &[EpochMetrics], out: &Path) -> Result<()> {
    anyhow::ensure!(!epochs.is_empty(), "no epoch metrics to plot");
    ensure_font();
    let root = BitMapBackend::new(out, (1200, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(600);
    let x_max = epochs.last().map(|e| e.epoch).unwrap_or(1).max(2) as f64;
    let series = |e: &EpochMetrics, which: usize| match which {
        0 => e.train_loss,
        1 => e.val_loss,
        2 => e.train_accuracy * 100.0,
        _ => e.val_accuracy * 100.0,
    };
    for (area, title, ids, y_label) in [
        (&left, "Loss", [0, 1], "cross-entropy"),
        (&right, "Accuracy", [2, 3], "%"),
    ] {
        let y_max = epochs
            .iter()
            .flat_map(|e| ids.map(|i| series(e, i)))
            .fold(0.0f64, f64::max)
            * 1.05;
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 24))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(52)
            .build_cartesian_2d(1.0..x_max, 0.0..y_max.max(1e-3))?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc(y_label)
            .label_style(("sans-serif", 14))
            .draw()?;
        for (i, name, color) in [(ids[0], "train", BLUE), (ids[1], "validation", RED)] {
            chart
                .draw_series(LineSeries::new(
                    epochs.iter().map(|e| (e.epoch as f64, series(e, i))),
                    color.stroke_width(2),
                ))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
    }
    root.present()?;
    Ok(())
}
