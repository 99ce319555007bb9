//! PNG plots of a run (plotters, bitmap backend, a TTF font loaded at run time so nothing of
//! the system is needed at build time).

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;

use crate::scenarios::soak::Sample;

/// The hub's RSS over time (top) and its live set, sockets and chats held (bottom).
pub fn rss_over_time(path: &Path, font: &Path, samples: &[Sample]) -> Result<()> {
    let bytes = std::fs::read(font).with_context(|| format!("font {}", font.display()))?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("font {} cannot be read", font.display()))?;
    let end = samples.last().map_or(1.0, |s| s.at_s).max(1.0);
    let max = |f: fn(&Sample) -> f64| {
        samples
            .iter()
            .map(f)
            .filter(|v| v.is_finite())
            .fold(1.0, f64::max)
    };
    let root = BitMapBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (top, bottom) = root.split_vertically(420);

    let mut chart = ChartBuilder::on(&top)
        .caption("presence-hub soak: resident memory", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..end, 0.0..max(|s| s.rss_mib) * 1.15)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("RSS, MiB")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .draw_series(LineSeries::new(
            samples.iter().map(|s| (s.at_s, s.rss_mib)),
            &RED,
        ))
        .map_err(|e| anyhow!("{e}"))?
        .label("hub RSS")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;

    let top_live = max(|s| s.sockets).max(max(|s| s.chats)) * 1.15;
    let mut live = ChartBuilder::on(&bottom)
        .caption("live set", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..end, 0.0..top_live)
        .map_err(|e| anyhow!("{e}"))?;
    live.configure_mesh()
        .x_desc("seconds")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    live.draw_series(LineSeries::new(
        samples.iter().map(|s| (s.at_s, s.sockets)),
        &BLUE,
    ))
    .map_err(|e| anyhow!("{e}"))?
    .label("sockets open")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    live.draw_series(LineSeries::new(
        samples
            .iter()
            .filter(|s| s.chats.is_finite())
            .map(|s| (s.at_s, s.chats)),
        &GREEN,
    ))
    .map_err(|e| anyhow!("{e}"))?
    .label("chats held (open and closed)")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
    live.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
