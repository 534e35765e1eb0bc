//! `--chart FILE.svg|FILE.png`: a line chart for trends, a bar chart for breakdowns (plotters).
//!
//! The first column gives the categories (periods or members); every following numeric column
//! up to four is drawn as a series. A result whose first column is a time level is a trend and
//! is drawn as lines, as is one whose first column is a percentage axis (`…_pct`, e.g. a Pareto
//! curve); anything else as grouped bars. Text uses the bundled DejaVu Sans font
//! (`assets/`), so charts look the same on every machine.

use std::path::Path;

use datafusion::arrow::array::{Array, Float64Array, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{Error, QueryError, Result};

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
const MAX_SERIES: usize = 4;
const COLORS: [RGBColor; MAX_SERIES] = [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40)];

/// The numbers of a chart, taken from a query result.
struct ChartData {
    categories: Vec<String>,
    series: Vec<(String, Vec<Option<f64>>)>,
    line: bool,
}

fn chart_data(batches: &[RecordBatch], only: Option<&[String]>) -> Result<ChartData> {
    let schema = batches.first().map(|b| b.schema()).ok_or_else(|| QueryError::new("nothing to chart: the result is empty"))?;
    let numeric: Vec<usize> = (1..schema.fields().len())
        .filter(|i| schema.field(*i).data_type().is_numeric())
        .filter(|i| only.is_none_or(|names| names.contains(schema.field(*i).name())))
        .take(MAX_SERIES)
        .collect();
    if numeric.is_empty() || batches.iter().all(|b| b.num_rows() == 0) {
        return Err(QueryError::new("nothing to chart: the result needs a label column and a numeric column").into());
    }
    let options = FormatOptions::default().with_null("(null)");
    let mut categories = Vec::new();
    let mut series: Vec<(String, Vec<Option<f64>>)> = numeric.iter().map(|i| (schema.field(*i).name().clone(), Vec::new())).collect();
    for b in batches {
        let labels = ArrayFormatter::try_new(b.column(0).as_ref(), &options)?;
        categories.extend((0..b.num_rows()).map(|i| labels.value(i).to_string()));
        for (s, i) in series.iter_mut().zip(&numeric) {
            let values = cast(b.column(*i), &DataType::Float64)?;
            let values = values.as_any().downcast_ref::<Float64Array>().expect("cast to Float64");
            s.1.extend((0..values.len()).map(|r| if values.is_null(r) { None } else { Some(values.value(r)) }));
        }
    }
    let first = schema.field(0).name();
    let line = first.starts_with("time_") || first.ends_with("_pct");
    Ok(ChartData { categories, series, line })
}

/// Draws the result into `path`; the extension (`.svg` or `.png`) chooses the format.
/// `only` names the columns to draw (default: the first numeric columns).
pub fn write_chart(path: &Path, batches: &[RecordBatch], title: &str, only: Option<&[String]>) -> Result<()> {
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let data = chart_data(batches, only)?;
    let size = (1000, 560);
    let failed = |e: String| Error::Internal(format!("drawing the chart {}: {e}", path.display()));
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("svg") => draw(SVGBackend::new(path, size).into_drawing_area(), &data, title).map_err(failed),
        Some("png") => draw(BitMapBackend::new(path, size).into_drawing_area(), &data, title).map_err(failed),
        _ => Err(QueryError::new(format!("cannot draw a chart into '{}'", path.display()))
            .with_hint(Some("name the chart file .svg or .png".into()))
            .into()),
    }
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, data: &ChartData, title: &str) -> std::result::Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let values = data.series.iter().flat_map(|s| s.1.iter().flatten().copied());
    let (lo, hi) = values.fold((0.0f64, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let hi = if hi <= lo { lo + 1.0 } else { hi + (hi - lo) * 0.05 };
    let n = data.categories.len();
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(96)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), lo..hi)
        .map_err(err)?;
    let categories = &data.categories;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n.min(12))
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 { categories.get(i as usize).cloned().unwrap_or_default() } else { String::new() }
        })
        .y_label_formatter(&|y| crate::cli::output::group_thousands(&format!("{y:.0}")))
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    let k = data.series.len() as f64;
    for (s, (name, values)) in data.series.iter().enumerate() {
        let color = COLORS[s % COLORS.len()];
        let drawn = if data.line {
            let points: Vec<(f64, f64)> = values.iter().enumerate().filter_map(|(i, v)| v.map(|v| (i as f64, v))).collect();
            chart.draw_series(LineSeries::new(points, color.stroke_width(2))).map_err(err)?
        } else {
            let width = 0.8 / k;
            chart
                .draw_series(values.iter().enumerate().filter_map(|(i, v)| {
                    v.map(|v| {
                        let x0 = i as f64 - 0.4 + s as f64 * width;
                        Rectangle::new([(x0, 0.0), (x0 + width * 0.9, v)], color.filled())
                    })
                }))
                .map_err(err)?
        };
        drawn.label(name.as_str()).legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
