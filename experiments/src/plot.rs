//! Plots with `plotters`, written as SVG and PNG.
//!
//! PNG text is rasterized with `ab_glyph` from the Noto Sans font compiled into the binary
//! (crate `ttf-noto-sans`), so no system font or fontconfig is needed; SVG text names the
//! `sans-serif` family and is drawn by the viewer. [`PngBackend`] wraps plotters' bitmap
//! backend only to place glyphs with their side bearings (plotters' own `ab_glyph` text
//! drawing ignores them, which spaces letters unevenly).

use crate::png::PngBackend;
use anyhow::{anyhow, Result};
use plotters::coord::ranged1d::{Ranged, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

/// The font family every plot uses.
const FONT: &str = "sans-serif";

/// Ten distinguishable colors (matplotlib's "tab10").
pub const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

static FONT_ONCE: Once = Once::new();

/// Registers the embedded font for the bitmap backend (idempotent).
fn register_font() {
    FONT_ONCE.call_once(|| {
        // A failure leaves PNGs without text, which the tests would notice; nothing to do here.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, ttf_noto_sans::REGULAR);
    });
}

/// How the points of a series are joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line {
    /// No line.
    None,
    /// A solid line.
    Solid,
    /// A dashed line.
    Dashed,
}

/// How each point of a series is marked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker {
    /// No marker.
    None,
    /// A filled circle.
    Filled,
    /// A hollow circle.
    Hollow,
    /// A filled triangle.
    Triangle,
}

/// One curve of a line chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// Points `(x, y)` in data units.
    pub points: Vec<(f64, f64)>,
    /// Color.
    pub color: RGBColor,
    /// Line style.
    pub line: Line,
    /// Marker style.
    pub marker: Marker,
    /// Line width in pixels.
    pub width: u32,
}

impl Series {
    /// A solid line with filled markers.
    pub fn new(label: impl Into<String>, points: Vec<(f64, f64)>, color: RGBColor) -> Self {
        Series {
            label: label.into(),
            points,
            color,
            line: Line::Solid,
            marker: Marker::Filled,
            width: 2,
        }
    }

    /// The same series with a wider line (to show a curve that others cover).
    pub fn wide(mut self, width: u32) -> Self {
        self.width = width;
        self
    }

    /// The same series with another line and marker.
    pub fn styled(mut self, line: Line, marker: Marker) -> Self {
        self.line = line;
        self.marker = marker;
        self
    }
}

/// Where a legend goes.
pub type LegendPos = SeriesLabelPosition;

/// A line chart.
#[derive(Debug, Clone)]
pub struct LineChart {
    /// Caption.
    pub title: String,
    /// X axis description.
    pub x_label: String,
    /// Y axis description.
    pub y_label: String,
    /// The curves.
    pub series: Vec<Series>,
    /// Logarithmic x axis (non-positive x are dropped).
    pub log_x: bool,
    /// Logarithmic y axis (non-positive y are dropped).
    pub log_y: bool,
    /// Fixed y range in data units, else fitted to the points.
    pub y_range: Option<(f64, f64)>,
    /// Legend position.
    pub legend: LegendPos,
    /// Label only integer x values (for bits, digits and the like).
    pub integer_x: bool,
}

impl LineChart {
    /// A linear chart with the legend at the lower right.
    pub fn new(title: &str, x_label: &str, y_label: &str, series: Vec<Series>) -> Self {
        LineChart {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            series,
            log_x: false,
            log_y: false,
            y_range: None,
            legend: SeriesLabelPosition::LowerRight,
            integer_x: false,
        }
    }
}

/// A stacked bar chart: one bar per category, one colored segment per component.
#[derive(Debug, Clone)]
pub struct StackedBars {
    /// Caption.
    pub title: String,
    /// Y axis description.
    pub y_label: String,
    /// Category names (x axis).
    pub categories: Vec<String>,
    /// Components: name and one value per category.
    pub components: Vec<(String, Vec<f64>)>,
}

/// One panel of a figure.
#[derive(Debug, Clone)]
pub enum Panel {
    /// A line chart.
    Lines(LineChart),
    /// A stacked bar chart.
    Bars(StackedBars),
}

/// Draws `panels` side by side under `title` and writes `<base>.svg` and `<base>.png`.
/// Returns the two file names (without directory).
pub fn save(dir: &Path, base: &str, title: &str, panels: &[Panel]) -> Result<Vec<String>> {
    register_font();
    let n = panels.len().max(1) as u32;
    let size = (if n == 1 { 900 } else { 720 * n }, 540);
    let svg = format!("{base}.svg");
    let png = format!("{base}.png");
    let (svg_path, png_path) = (dir.join(&svg), dir.join(&png));
    {
        let root = SVGBackend::new(&svg_path, size).into_drawing_area();
        draw(&root, title, panels)?;
    }
    {
        let root = PngBackend::new(&png_path, size)?.into_drawing_area();
        draw(&root, title, panels)?;
    }
    Ok(vec![png, svg])
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing failed: {e:?}")
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    panels: &[Panel],
) -> Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let body = root.titled(title, (FONT, 24)).map_err(err)?;
    let areas = body.split_evenly((1, panels.len().max(1)));
    for (area, panel) in areas.iter().zip(panels) {
        match panel {
            Panel::Lines(c) => draw_lines(area, c)?,
            Panel::Bars(b) => draw_bars(area, b)?,
        }
    }
    root.present().map_err(err)?;
    Ok(())
}

/// A number for an axis label: short, no trailing zeros.
pub fn short_number(v: f64) -> String {
    let a = v.abs();
    // Below 1e-12 only as the rounding residue of a tick at zero (like -6e-17); no plotted
    // quantity is that small.
    if a < 1e-12 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.0e}")
    } else if a >= 100.0 || (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        trim(format!("{v:.2}"))
    } else {
        trim(format!("{v:.4}"))
    }
}

fn trim(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

fn keep(v: f64, log: bool) -> bool {
    v.is_finite() && (!log || v > 0.0)
}

/// `lo..hi` widened by `frac` of its span (multiplicatively on a log axis).
fn padded(lo: f64, hi: f64, frac: f64, log: bool) -> (f64, f64) {
    if !lo.is_finite() || !hi.is_finite() {
        return if log { (1.0, 10.0) } else { (0.0, 1.0) };
    }
    if log {
        let (a, b) = padded(lo.log2(), hi.log2(), frac, false);
        return (a.exp2(), b.exp2());
    }
    if (hi - lo).abs() < 1e-12 {
        let d = if lo.abs() > 1e-12 {
            lo.abs() * 0.1
        } else {
            1.0
        };
        return (lo - d, hi + d);
    }
    let d = (hi - lo) * frac;
    (lo - d, hi + d)
}

fn draw_lines<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, c: &LineChart) -> Result<()> {
    let pts = c
        .series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|&&(x, y)| keep(x, c.log_x) && keep(y, c.log_y));
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let (x0, x1) = padded(x0, x1, 0.03, c.log_x);
    let (y0, y1) = match c.y_range {
        Some(r) => r,
        None => padded(y0, y1.max(y0), 0.06, c.log_y),
    };
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(&c.title, (FONT, 18))
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(72);
    // Logarithmic axes use base 2: the experiments' sizes are powers of two.
    match (c.log_x, c.log_y) {
        (false, false) => lines_body(builder.build_cartesian_2d(x0..x1, y0..y1).map_err(err)?, c),
        (true, false) => lines_body(
            builder
                .build_cartesian_2d((x0..x1).log_scale().base(2.0), y0..y1)
                .map_err(err)?,
            c,
        ),
        (false, true) => lines_body(
            builder
                .build_cartesian_2d(x0..x1, (y0..y1).log_scale().base(2.0))
                .map_err(err)?,
            c,
        ),
        (true, true) => lines_body(
            builder
                .build_cartesian_2d(
                    (x0..x1).log_scale().base(2.0),
                    (y0..y1).log_scale().base(2.0),
                )
                .map_err(err)?,
            c,
        ),
    }
}

/// Styles of a series' legend sample: line, filled circle, hollow circle (fill and ring),
/// triangle; the parts the series does not use are transparent.
fn legend_styles(s: &Series) -> [ShapeStyle; 5] {
    let (color, line, marker) = (s.color, s.line, s.marker);
    let on = |yes: bool| if yes { 1.0 } else { 0.0 };
    [
        color.mix(on(line != Line::None)).stroke_width(s.width),
        color.mix(on(marker == Marker::Filled)).filled(),
        WHITE.mix(on(marker == Marker::Hollow)).filled(),
        color.mix(on(marker == Marker::Hollow)).stroke_width(2),
        color.mix(on(marker == Marker::Triangle)).filled(),
    ]
}

fn lines_body<'a, DB, X, Y>(
    mut chart: ChartContext<'a, DB, Cartesian2d<X, Y>>,
    c: &LineChart,
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let fmt = |v: &f64| short_number(*v);
    let integer_x = c.integer_x;
    let fmt_x = move |v: &f64| {
        if integer_x && (v - v.round()).abs() > 1e-9 {
            String::new()
        } else {
            short_number(*v)
        }
    };
    chart
        .configure_mesh()
        .x_desc(c.x_label.as_str())
        .y_desc(c.y_label.as_str())
        .x_label_formatter(&fmt_x)
        .y_label_formatter(&fmt)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.08))
        .draw()
        .map_err(err)?;
    for s in &c.series {
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|&(x, y)| keep(x, c.log_x) && keep(y, c.log_y))
            .collect();
        let color = s.color;
        if s.line != Line::None && pts.len() > 1 {
            match s.line {
                Line::Dashed => chart
                    .draw_series(DashedLineSeries::new(
                        pts.clone(),
                        8,
                        5,
                        color.stroke_width(s.width),
                    ))
                    .map_err(err)?,
                _ => chart
                    .draw_series(LineSeries::new(pts.clone(), color.stroke_width(s.width)))
                    .map_err(err)?,
            };
        }
        let anno = match s.marker {
            Marker::None => chart
                .draw_series(std::iter::empty::<Circle<(f64, f64), i32>>())
                .map_err(err)?,
            Marker::Filled => chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(err)?,
            Marker::Hollow => chart
                .draw_series(
                    pts.iter()
                        .map(|&p| Circle::new(p, 4, WHITE.filled()))
                        .chain(
                            pts.iter()
                                .map(|&p| Circle::new(p, 4, color.stroke_width(2))),
                        ),
                )
                .map_err(err)?,
            Marker::Triangle => chart
                .draw_series(
                    pts.iter()
                        .map(|&p| TriangleMarker::new(p, 6, color.filled())),
                )
                .map_err(err)?,
        };
        if !s.label.is_empty() {
            let [line, fill, hollow_fill, hollow_ring, triangle] = legend_styles(s);
            anno.label(s.label.as_str()).legend(move |(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(0, 0), (20, 0)], line)
                    + Circle::new((10, 0), 4, fill)
                    + Circle::new((10, 0), 4, hollow_fill)
                    + Circle::new((10, 0), 4, hollow_ring)
                    + TriangleMarker::new((10, 0), 6, triangle)
            });
        }
    }
    if c.series.iter().any(|s| !s.label.is_empty()) {
        chart
            .configure_series_labels()
            .position(c.legend.clone())
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

fn draw_bars<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, b: &StackedBars) -> Result<()> {
    let n = b.categories.len();
    let totals: Vec<f64> = (0..n)
        .map(|i| {
            b.components
                .iter()
                .map(|(_, v)| v.get(i).copied().unwrap_or(0.0))
                .sum()
        })
        .collect();
    let top = totals.iter().cloned().fold(0.0, f64::max).max(1e-12) * 1.35;
    let mut chart = ChartBuilder::on(area)
        .caption(&b.title, (FONT, 18))
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..top)
        .map_err(err)?;
    let cats = b.categories.clone();
    let fx = move |v: &f64| {
        let r = v.round();
        if (v - r).abs() < 1e-6 && r >= 0.0 {
            cats.get(r as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n + 1)
        .x_label_formatter(&fx)
        .y_label_formatter(&|v: &f64| short_number(*v))
        .y_desc(b.y_label.as_str())
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.08))
        .draw()
        .map_err(err)?;
    let mut base = vec![0.0; n];
    for (k, (name, values)) in b.components.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let rects: Vec<_> = (0..n)
            .map(|i| {
                let v = values.get(i).copied().unwrap_or(0.0).max(0.0);
                let r = Rectangle::new(
                    [(i as f64 - 0.3, base[i]), (i as f64 + 0.3, base[i] + v)],
                    color.filled(),
                );
                base[i] += v;
                r
            })
            .collect();
        chart
            .draw_series(rects)
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_short() {
        assert_eq!(short_number(0.0), "0");
        assert_eq!(short_number(-6e-17), "0");
        assert_eq!(short_number(2.0), "2");
        assert_eq!(short_number(0.25), "0.25");
        assert_eq!(short_number(1.5), "1.5");
        assert_eq!(short_number(250.0), "250");
        assert_eq!(short_number(1e6), "1e6");
    }
}
