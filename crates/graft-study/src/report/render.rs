//! Drawing the planned charts with plotters, to PNG (bitmap backend) and SVG, with the DejaVu Sans font embedded in
//! the binary (registered with plotters' ab_glyph font table): no system font is ever looked up, so charts render the
//! same on every machine. PNGs go through `Scaled`, which draws the same layout at a chosen multiple of the pixels
//! (`--dpi`: 1, 2 by default, or 3); the SVG is the layout itself. One mapping everywhere: colour = merge method,
//! marker = freeze policy; interpolation curves: colour = pair of models, solid after alignment, dashed before.

use std::error::Error as StdError;
use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::bootstrap::percentile;
use super::plots::{
    BarChart, BarrierMark, Body, Chart, GroupedBarChart, LineChart, ScatterChart, ScatterPanel, ViolinChart,
    VIOLIN_MIN_RUNS,
};
use crate::error::{Error, Result};

const FONT: &str = "sans-serif";
static FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

type DrawResult = std::result::Result<(), Box<dyn StdError>>;

/// Registers the embedded font under every family name plotters may ask for. Idempotent.
pub fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        ["sans-serif", "serif", "monospace"].iter().all(|family| {
            plotters::style::register_font(family, FontStyle::Normal, FONT_BYTES).is_ok()
                && plotters::style::register_font(family, FontStyle::Bold, FONT_BYTES).is_ok()
        })
    });
    if ok {
        Ok(())
    } else {
        Err(Error::invalid("the embedded chart font could not be loaded"))
    }
}

/// Okabe & Ito's colour-blind-safe palette (without black, which marks the baseline), then a neutral grey.
const PALETTE: [RGBColor; 8] = [
    RGBColor(0x00, 0x72, 0xB2), // blue
    RGBColor(0xE6, 0x9F, 0x00), // orange
    RGBColor(0x00, 0x9E, 0x73), // bluish green
    RGBColor(0xCC, 0x79, 0xA7), // reddish purple
    RGBColor(0x56, 0xB4, 0xE9), // sky blue
    RGBColor(0xD5, 0x5E, 0x00), // vermillion
    RGBColor(0xF0, 0xE4, 0x42), // yellow
    RGBColor(0x99, 0x99, 0x99), // grey
];
const BASELINE_COLOR: RGBColor = RGBColor(0x00, 0x00, 0x00);
const GRID_COLOR: RGBColor = RGBColor(0xDD, 0xDD, 0xDD);

/// Merge methods with a colour of their own, the same in every chart of every report (palette index).
const METHOD_COLOURS: &[(&str, usize)] = &[
    ("lerp", 0),
    ("linear", 0),
    ("ties", 1),
    ("slerp", 2),
    ("task_arithmetic", 3),
    ("dare_ties", 4),
    ("dare_linear", 5),
    ("model_stock", 6),
    ("breadcrumbs", 7),
];

/// The method a label starts with ("ties", "ties, freeze head", "ties top-10% / head"), if it is a known one.
fn method_colour(label: &str) -> Option<usize> {
    let first = label.split([',', ' ', '/']).next().unwrap_or("");
    METHOD_COLOURS.iter().find(|(m, _)| *m == first).map(|&(_, i)| i)
}

/// Colours for the labels of one chart: a known method keeps its own colour; other labels take the palette's
/// colours in order, skipping those taken, so labels in one chart differ while there are colours left.
pub fn assign_colours(labels: &[String]) -> Vec<RGBColor> {
    let fixed: Vec<Option<usize>> = labels.iter().map(|l| method_colour(l)).collect();
    let mut used: Vec<usize> = fixed.iter().flatten().copied().collect();
    let mut next = 0;
    fixed
        .iter()
        .map(|f| match f {
            Some(i) => PALETTE[*i],
            None => {
                let free = (0..PALETTE.len()).map(|k| (next + k) % PALETTE.len()).find(|k| !used.contains(k));
                let i = free.unwrap_or(next % PALETTE.len());
                used.push(i);
                next = i + 1;
                PALETTE[i]
            }
        })
        .collect()
}

fn text_style(size: u32) -> TextStyle<'static> {
    TextStyle::from((FONT, size).into_font()).color(&BLACK)
}

pub fn text_width(text: &str, size: u32) -> u32 {
    (FONT, size).into_font().box_size(text).map(|(w, _)| w).unwrap_or(text.len() as u32 * size / 2)
}

/// Shortens `text` with an ellipsis until it fits in `max` pixels.
fn fit(text: &str, size: u32, max: u32) -> String {
    if text_width(text, size) <= max {
        return text.to_string();
    }
    let mut chars: Vec<char> = text.chars().collect();
    while !chars.is_empty() {
        chars.pop();
        let s: String = chars.iter().collect::<String>() + "…";
        if text_width(&s, size) <= max {
            return s;
        }
    }
    "…".into()
}

/// A legend entry's mark.
#[derive(Clone)]
enum Mark {
    Swatch(RGBColor),
    Line(RGBColor),
    Dashed(RGBColor),
    /// A line series: colour, marker, dash pattern (0 solid, 1 dashed, 2 dotted).
    Series(RGBColor, Shape, usize),
    /// A scatter marker: policy shape in a colour.
    Marker(Shape, RGBColor),
    /// The Pareto front: a black line through a ringed point.
    Front,
    /// A numbered key entry: the number as drawn next to its point.
    Number(String),
    /// A black tick across a bar.
    Tick,
    /// An interpolation barrier: a vertical black bar with end caps.
    Barrier,
}

const LEGEND_SIZE: u32 = 13;
const LEGEND_ROW: u32 = 20;

/// Legend entries laid out left to right in rows below the chart: returns the rows of (x offset, entry index).
fn legend_layout(entries: &[(String, Mark)], width: u32) -> Vec<Vec<(u32, usize)>> {
    let mut rows: Vec<Vec<(u32, usize)>> = Vec::new();
    let mut x = 0u32;
    for (i, (label, _)) in entries.iter().enumerate() {
        let w = 28 + text_width(label, LEGEND_SIZE) + 18;
        if rows.is_empty() || (x + w > width && x > 0) {
            rows.push(Vec::new());
            x = 0;
        }
        rows.last_mut().unwrap().push((x, i));
        x += w;
    }
    rows
}

/// Legends start this far from the left edge and span the canvas width less twice this.
const LEGEND_INSET: u32 = 24;

/// Height of the legend strip of a canvas `canvas_width` pixels wide.
fn legend_height(entries: &[(String, Mark)], canvas_width: u32) -> u32 {
    let rows = legend_layout(entries, canvas_width - 2 * LEGEND_INSET).len() as u32;
    if rows == 0 {
        0
    } else {
        rows * LEGEND_ROW + 12
    }
}

fn draw_legend<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, entries: &[(String, Mark)]) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let (w, _) = area.dim_in_pixel();
    let left = LEGEND_INSET as i32;
    for (r, row) in legend_layout(entries, w - 2 * LEGEND_INSET).iter().enumerate() {
        let y = 6 + (r as u32 * LEGEND_ROW + LEGEND_ROW / 2) as i32;
        for &(x, i) in row {
            let x = left + x as i32;
            let (label, mark) = &entries[i];
            match mark.clone() {
                Mark::Swatch(c) => area.draw(&Rectangle::new([(x, y - 6), (x + 20, y + 6)], c.filled()))?,
                Mark::Line(c) => {
                    area.draw(&PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)))?;
                    area.draw(&Circle::new((x + 10, y), 3, c.filled()))?;
                }
                Mark::Dashed(c) => {
                    area.draw(&DashedPathElement::new(vec![(x, y), (x + 22, y)], 5, 3, c.stroke_width(2)))?
                }
                Mark::Series(c, shape, dash) => {
                    let (on, off) = dash_pattern(dash);
                    area.draw(&DashedPathElement::new(vec![(x, y), (x + 22, y)], on, off, c.stroke_width(2)))?;
                    draw_marker_sized(area, (x + 11, y), shape, c, 4)?;
                }
                Mark::Marker(shape, c) => draw_marker(area, (x + 10, y), shape, c)?,
                Mark::Front => {
                    area.draw(&PathElement::new(vec![(x, y), (x + 22, y)], BLACK.stroke_width(2)))?;
                    area.draw(&Circle::new((x + 11, y), 7, BLACK.stroke_width(2)))?;
                }
                Mark::Number(n) => {
                    let style = text_style(LEGEND_SIZE).pos(Pos::new(HPos::Right, VPos::Center));
                    area.draw(&Text::new(n.clone(), (x + 22, y), style))?;
                }
                Mark::Tick => {
                    area.draw(&Rectangle::new([(x, y - 6), (x + 20, y + 6)], RGBColor(0xBB, 0xBB, 0xBB).filled()))?;
                    area.draw(&PathElement::new(vec![(x - 2, y), (x + 22, y)], BLACK.stroke_width(3)))?;
                }
                Mark::Barrier => draw_barrier_bar(area, (x + 11, y - 7), (x + 11, y + 7), BLACK)?,
            }
            let style = text_style(LEGEND_SIZE).pos(Pos::new(HPos::Left, VPos::Center));
            area.draw(&Text::new(label.clone(), (x + 28, y), style))?;
        }
    }
    Ok(())
}

/// Pixel size of a chart.
pub fn size(chart: &Chart) -> (u32, u32) {
    match &chart.body {
        Body::Bars(b) => {
            let groups = distinct_groups(b).len() as u32;
            let plot = b.bars.len() as u32 * 26 + groups.saturating_sub(1) * 12 + 30;
            let legend = legend_height(&bar_legend(b), 1000);
            (1000, (plot + 130 + legend).max(320))
        }
        Body::Lines(l) => (900, 560 + legend_height(&line_legend(l), 900)),
        Body::Violins(v) => {
            let w = violin_width(v);
            (w, 560 + legend_height(&violin_legend(v), w))
        }
        Body::Scatter(s) => {
            let w = scatter_width(s);
            let key = scatter_key(s).unwrap_or_default();
            (w, SCATTER_H + legend_height(&scatter_legend(s), w) + legend_height(&key, w))
        }
        Body::Grouped(g) => {
            // Wide enough for every category's name under its group and 30 px per bar, within print width.
            let name_px = g.categories.iter().map(|c| text_width(c, 13) + 24).max().unwrap_or(0);
            let group_px = name_px.max((g.series.len() as u32 + 1) * 30);
            let w = (g.categories.len() as u32 * group_px + 120).clamp(900, 1800);
            (w, 560 + legend_height(&grouped_legend(g), w))
        }
    }
}

/// PNGs are drawn this many times larger than the layout (and the SVG) unless `--dpi` says otherwise: 1800 pixels
/// for a 900-pixel chart, print resolution at a page's width, with the same layout (text is rendered at the larger
/// size, not magnified).
pub const PRINT_SCALE: u32 = 2;
/// The PNG scales `--dpi` accepts: screen (1), print (2), large print or zooming (3).
pub const SCALES: [u32; 3] = [1, 2, 3];

/// Reads a `--dpi` value: the PNG's pixels per layout pixel, `1`, `2` or `3` (`1x`, `2x`, `3x` also read).
pub fn parse_scale(text: &str) -> std::result::Result<u32, String> {
    let digits = text.trim().trim_end_matches(['x', 'X']);
    match digits.parse::<u32>() {
        Ok(n) if SCALES.contains(&n) => Ok(n),
        _ => Err(format!(
            "'{text}' is not a PNG scale: 1 (screen), 2 (print, the default) or 3; the SVG is drawn at the layout size \
             whatever the scale"
        )),
    }
}

/// A backend that draws everything `factor` times larger on an inner one: charts lay out in logical pixels, and the
/// PNG gets `factor` device pixels for each (coordinates, line widths, radii and font sizes all scaled).
pub struct Scaled<B> {
    inner: B,
    factor: i32,
}

impl<B: DrawingBackend> Scaled<B> {
    /// `inner` must be `factor` times the logical size in each direction.
    pub fn new(inner: B, factor: u32) -> Scaled<B> {
        Scaled { inner, factor: factor as i32 }
    }

    fn at(&self, (x, y): (i32, i32)) -> (i32, i32) {
        (x * self.factor, y * self.factor)
    }

    /// The last device pixel of a logical pixel: filled areas cover whole logical pixels.
    fn end(&self, (x, y): (i32, i32)) -> (i32, i32) {
        (x * self.factor + self.factor - 1, y * self.factor + self.factor - 1)
    }

    fn style<S: plotters_backend::BackendStyle>(&self, s: &S) -> ScaledStyle {
        ScaledStyle { color: s.color(), width: s.stroke_width() * self.factor as u32 }
    }
}

pub struct ScaledStyle {
    color: plotters_backend::BackendColor,
    width: u32,
}

impl plotters_backend::BackendStyle for ScaledStyle {
    fn color(&self) -> plotters_backend::BackendColor {
        self.color
    }
    fn stroke_width(&self) -> u32 {
        self.width
    }
}

type BackendResult<E> = std::result::Result<(), plotters_backend::DrawingErrorKind<E>>;

impl<B: DrawingBackend> DrawingBackend for Scaled<B> {
    type ErrorType = B::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        let (w, h) = self.inner.get_size();
        (w / self.factor as u32, h / self.factor as u32)
    }

    fn ensure_prepared(&mut self) -> BackendResult<B::ErrorType> {
        self.inner.ensure_prepared()
    }

    fn present(&mut self) -> BackendResult<B::ErrorType> {
        self.inner.present()
    }

    fn draw_pixel(&mut self, p: (i32, i32), color: plotters_backend::BackendColor) -> BackendResult<B::ErrorType> {
        let (a, b) = (self.at(p), self.end(p));
        self.inner.draw_rect(a, b, &color, true)
    }

    fn draw_line<S: plotters_backend::BackendStyle>(
        &mut self,
        from: (i32, i32),
        to: (i32, i32),
        style: &S,
    ) -> BackendResult<B::ErrorType> {
        let st = self.style(style);
        self.inner.draw_line(self.at(from), self.at(to), &st)
    }

    fn draw_rect<S: plotters_backend::BackendStyle>(
        &mut self,
        upper_left: (i32, i32),
        bottom_right: (i32, i32),
        style: &S,
        fill: bool,
    ) -> BackendResult<B::ErrorType> {
        let st = self.style(style);
        let (a, b) = if fill {
            (self.at(upper_left), self.end(bottom_right))
        } else {
            (self.at(upper_left), self.at(bottom_right))
        };
        self.inner.draw_rect(a, b, &st, fill)
    }

    fn draw_path<S: plotters_backend::BackendStyle, I: IntoIterator<Item = (i32, i32)>>(
        &mut self,
        path: I,
        style: &S,
    ) -> BackendResult<B::ErrorType> {
        let st = self.style(style);
        let f = self.factor;
        self.inner.draw_path(path.into_iter().map(|(x, y)| (x * f, y * f)), &st)
    }

    fn draw_circle<S: plotters_backend::BackendStyle>(
        &mut self,
        center: (i32, i32),
        radius: u32,
        style: &S,
        fill: bool,
    ) -> BackendResult<B::ErrorType> {
        let st = self.style(style);
        self.inner.draw_circle(self.at(center), radius * self.factor as u32, &st, fill)
    }

    fn fill_polygon<S: plotters_backend::BackendStyle, I: IntoIterator<Item = (i32, i32)>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> BackendResult<B::ErrorType> {
        let st = self.style(style);
        let f = self.factor;
        self.inner.fill_polygon(vert.into_iter().map(|(x, y)| (x * f, y * f)), &st)
    }

    fn draw_text<T: plotters_backend::BackendTextStyle>(
        &mut self,
        text: &str,
        style: &T,
        pos: (i32, i32),
    ) -> BackendResult<B::ErrorType> {
        let c = style.color();
        let font = FontDesc::new(style.family(), style.size() * self.factor as f64, style.style())
            .transform(style.transform());
        let colour = RGBAColor(c.rgb.0, c.rgb.1, c.rgb.2, c.alpha);
        let scaled = TextStyle::from(font).color(&colour).pos(style.anchor());
        self.inner.draw_text(text, &scaled, self.at(pos))
    }
}

/// The area a PNG is drawn on: a bitmap in memory, `scale` device pixels per layout pixel.
pub type PngArea<'a> = DrawingArea<Scaled<BitMapBackend<'a>>, Shift>;

/// Draws a `width x height` (layout pixels) picture with `paint` at `scale` and encodes it as PNG bytes, so that the
/// file can be written whole (`files::write_atomic`) rather than by plotters straight to its final path.
pub fn png_bytes(
    (width, height): (u32, u32),
    scale: u32,
    paint: impl FnOnce(&PngArea<'_>) -> std::result::Result<(), Box<dyn StdError>>,
) -> std::result::Result<Vec<u8>, Box<dyn StdError>> {
    let (w, h) = (width * scale, height * scale);
    let mut rgb = vec![0u8; w as usize * h as usize * 3];
    {
        let root = Scaled::new(BitMapBackend::with_buffer(&mut rgb, (w, h)), scale).into_drawing_area();
        paint(&root)?;
        root.present()?;
    }
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.write_header()?.write_image_data(&rgb)?;
    Ok(bytes)
}

/// Renders a chart as `<dir>/<name>.png` (at `scale` PNG pixels per layout pixel) and `<dir>/<name>.svg`.
pub fn render(chart: &Chart, dir: &Path, scale: u32) -> Result<()> {
    ensure_font()?;
    let dims = size(chart);
    let png = dir.join(format!("{}.png", chart.name));
    let bytes = png_bytes(dims, scale, |root| draw(root, chart)).map_err(|e| plot_error(chart, &png, e))?;
    crate::files::write_atomic(&png, &bytes)?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, dims).into_drawing_area();
        draw(&root, chart).and_then(|_| Ok(root.present()?)).map_err(|e| plot_error(chart, &png, e))?;
    }
    let svg_path = dir.join(format!("{}.svg", chart.name));
    crate::files::write_atomic(&svg_path, svg.as_bytes())
}

fn plot_error(chart: &Chart, path: &Path, e: Box<dyn StdError>) -> Error {
    Error::invalid(format!("{}: drawing chart '{}' failed: {e}", path.display(), chart.title))
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, chart: &Chart) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    match &chart.body {
        Body::Bars(b) => draw_bars(root, &chart.title, b),
        Body::Lines(l) => draw_lines(root, &chart.title, l),
        Body::Violins(v) => draw_violins(root, &chart.title, v),
        Body::Grouped(g) => draw_grouped(root, &chart.title, g),
        Body::Scatter(s) => draw_scatter(root, &chart.title, s),
    }
}

/// A value range covering `values` with a margin, always including `include` (0 for bars).
fn padded_range(values: impl Iterator<Item = f64>, include: Option<f64>) -> (f64, f64) {
    let (mut lo, mut hi) =
        values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if let Some(z) = include {
        lo = lo.min(z);
        hi = hi.max(z);
    }
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    let span = if hi > lo { hi - lo } else { hi.abs().max(1.0) };
    let lo = if include == Some(lo) { lo } else { lo - 0.08 * span };
    let hi = if include == Some(hi) && hi != lo { hi } else { hi + 0.08 * span };
    (lo, hi)
}

fn distinct_groups(b: &BarChart) -> Vec<String> {
    let mut groups: Vec<String> = Vec::new();
    for bar in &b.bars {
        if !groups.contains(&bar.group) {
            groups.push(bar.group.clone());
        }
    }
    groups
}

fn bar_legend(b: &BarChart) -> Vec<(String, Mark)> {
    let groups = distinct_groups(b);
    let mut entries: Vec<(String, Mark)> = Vec::new();
    if groups.len() > 1 || groups.iter().any(|g| !g.is_empty()) {
        for (g, c) in groups.iter().zip(assign_colours(&groups)) {
            let label = if g.is_empty() { "(no method)".to_string() } else { g.clone() };
            entries.push((label, Mark::Swatch(c)));
        }
    }
    if let Some(r) = &b.reference {
        entries.push((r.label.clone(), Mark::Dashed(BASELINE_COLOR)));
    }
    entries
}

fn draw_bars<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, title: &str, b: &BarChart) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let (w, h) = root.dim_in_pixel();
    let legend = bar_legend(b);
    let (upper, lower) = root.split_vertically(h - legend_height(&legend, w));
    let groups = distinct_groups(b);
    let group_colours = assign_colours(&groups);
    // Bars top to bottom, a gap between groups; plotters' y grows upwards, so positions are flipped.
    let mut pos = Vec::with_capacity(b.bars.len());
    let mut y = 0.0;
    for (i, bar) in b.bars.iter().enumerate() {
        if i > 0 && bar.group != b.bars[i - 1].group {
            y += 0.5;
        }
        pos.push(y);
        y += 1.0;
    }
    let top = y - 1.0;
    let ys: Vec<f64> = pos.iter().map(|p| top - p).collect();

    let label_size = 13;
    let label_width =
        b.bars.iter().map(|bar| text_width(&bar.label, label_size)).max().unwrap_or(0).min(w * 2 / 5) + 16;
    let ends = b.bars.iter().flat_map(|bar| [bar.value - bar.err, bar.value + bar.err]);
    let (lo, mut hi) = padded_range(ends.chain(b.reference.as_ref().map(|r| r.value)), Some(0.0));
    hi += 0.10 * (hi - lo); // room for the value labels
    let mut chart = ChartBuilder::on(&upper)
        .caption(title, text_style(20))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(label_width)
        .build_cartesian_2d(lo..hi, -0.7..top + 0.7)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .y_label_formatter(&|_| String::new())
        .light_line_style(TRANSPARENT)
        .bold_line_style(GRID_COLOR)
        .x_desc(b.value_label.as_str())
        .label_style(text_style(12))
        .axis_desc_style(text_style(14))
        .draw()?;

    for (i, bar) in b.bars.iter().enumerate() {
        let c = group_colours[groups.iter().position(|g| *g == bar.group).unwrap_or(0)];
        let y = ys[i];
        chart.draw_series(std::iter::once(Rectangle::new([(0.0, y - 0.38), (bar.value, y + 0.38)], c.filled())))?;
        if bar.err > 0.0 {
            let err_style = BLACK.stroke_width(1);
            chart.draw_series([
                PathElement::new(vec![(bar.value - bar.err, y), (bar.value + bar.err, y)], err_style),
                PathElement::new(vec![(bar.value - bar.err, y - 0.15), (bar.value - bar.err, y + 0.15)], err_style),
                PathElement::new(vec![(bar.value + bar.err, y - 0.15), (bar.value + bar.err, y + 0.15)], err_style),
            ])?;
        }
    }
    if b.signed {
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(0.0, -0.7), (0.0, top + 0.7)],
            BLACK.stroke_width(1),
        )))?;
    }
    if let Some(r) = &b.reference {
        chart.draw_series(DashedLineSeries::new(
            vec![(r.value, -0.7), (r.value, top + 0.7)],
            8,
            5,
            BASELINE_COLOR.stroke_width(2),
        ))?;
    }
    // Text last, value labels on a white ground, so lines never run through them.
    for (i, bar) in b.bars.iter().enumerate() {
        let y = ys[i];
        let value_text = if b.signed {
            format!("{:+.*}{}", b.decimals, bar.value, b.suffix)
        } else {
            format!("{:.*}{}", b.decimals, bar.value, b.suffix)
        };
        // Past the end of the bar and its error bar, on whichever side the bar points.
        let (end, anchor, dx) = if bar.value >= 0.0 {
            (bar.value + bar.err, HPos::Left, 5)
        } else {
            (bar.value - bar.err, HPos::Right, -5)
        };
        let (px, py) = chart.backend_coord(&(end, y));
        let tw = text_width(&value_text, 12) as i32;
        let x0 = if dx > 0 { px + dx - 2 } else { px + dx - tw - 2 };
        root.draw(&Rectangle::new([(x0, py - 8), (x0 + tw + 4, py + 8)], WHITE.mix(0.85).filled()))?;
        root.draw(&Text::new(value_text, (px + dx, py), text_style(12).pos(Pos::new(anchor, VPos::Center))))?;
        let (lx, ly) = chart.backend_coord(&(lo, y));
        let label = fit(&bar.label, label_size, label_width - 16);
        root.draw(&Text::new(label, (lx - 8, ly), text_style(label_size).pos(Pos::new(HPos::Right, VPos::Center))))?;
    }
    draw_legend(&lower, &legend)?;
    Ok(())
}

fn series_colours(l: &LineChart) -> Vec<RGBColor> {
    assign_colours(&l.series.iter().map(|s| s.label.clone()).collect::<Vec<_>>())
}

/// A chart's legend texts, in order (tests check they are distinct and free of placeholders).
pub fn legend_labels(chart: &Chart) -> Vec<String> {
    let entries = match &chart.body {
        Body::Bars(b) => bar_legend(b),
        Body::Lines(l) => line_legend(l),
        Body::Violins(v) => violin_legend(v),
        Body::Grouped(g) => grouped_legend(g),
        Body::Scatter(s) => scatter_legend(s),
    };
    entries.into_iter().map(|(label, _)| label).collect()
}

/// Dash patterns (on, off pixels) of a line series: solid, dashed, dotted.
fn dash_pattern(dash: usize) -> (u32, u32) {
    match dash {
        0 => (1000, 0),
        1 => (8, 4),
        _ => (2, 3),
    }
}

/// Each series' colour (its method's), marker (its freeze policy's) and dash: series that would look the same by
/// colour and marker (the same method and policy, another setting) are told apart by dashes. Interpolation curves
/// with a known alignment: a colour per pair, solid with circles after alignment, dashed with diamonds before.
fn line_styles(l: &LineChart) -> Vec<(RGBColor, Shape, usize)> {
    if l.series.iter().any(|s| s.aligned.is_some()) {
        let mut keys: Vec<String> = Vec::new();
        for s in &l.series {
            let k = if s.colour_key.is_empty() { s.label.clone() } else { s.colour_key.clone() };
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        let colours = assign_colours(&keys);
        return l
            .series
            .iter()
            .map(|s| {
                let k = if s.colour_key.is_empty() { &s.label } else { &s.colour_key };
                let c = colours[keys.iter().position(|x| x == k).unwrap_or(0)];
                match s.aligned {
                    Some(false) => (c, Shape::Diamond, 1),
                    _ => (c, Shape::Circle, 0),
                }
            })
            .collect();
    }
    let colours = series_colours(l);
    let mut out: Vec<(RGBColor, Shape, usize)> = Vec::new();
    for (s, c) in l.series.iter().zip(colours) {
        let shape = if s.policy.is_empty() { Shape::Circle } else { policy_shape(&s.policy) };
        let dash = out.iter().filter(|(c2, s2, _)| *c2 == c && *s2 == shape).count();
        out.push((c, shape, dash));
    }
    out
}

/// A barrier's bar: 3 pixels wide in its curve's colour, with black end caps.
fn draw_barrier_bar<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    a: (i32, i32),
    b: (i32, i32),
    colour: RGBColor,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    area.draw(&PathElement::new(vec![a, b], colour.stroke_width(3)))?;
    for (x, y) in [a, b] {
        area.draw(&PathElement::new(vec![(x - 5, y), (x + 5, y)], BLACK.stroke_width(2)))?;
    }
    Ok(())
}

fn line_legend(l: &LineChart) -> Vec<(String, Mark)> {
    let mut entries: Vec<(String, Mark)> = l
        .series
        .iter()
        .zip(line_styles(l))
        .map(|(s, (c, shape, dash))| (s.label.clone(), Mark::Series(c, shape, dash)))
        .collect();
    if l.series.iter().any(|s| s.chord.is_some()) {
        entries.push(("straight line between the endpoints".into(), Mark::Dashed(RGBColor(0x55, 0x55, 0x55))));
    }
    if l.series.iter().any(|s| s.barrier.is_some()) {
        entries.push(("barrier: the furthest gap to that line, in the curve's colour".into(), Mark::Barrier));
    }
    entries
}

fn draw_lines<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, title: &str, l: &LineChart) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let (w, h) = root.dim_in_pixel();
    let legend = line_legend(l);
    let (upper, lower) = root.split_vertically(h - legend_height(&legend, w));
    let xs = l.series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (x_lo, x_hi) = padded_range(xs, None);
    let ys = l
        .series
        .iter()
        .flat_map(|s| s.points.iter().flat_map(|p| [p.1 - p.2, p.1 + p.2]).chain(s.runs.iter().map(|r| r.1)));
    let (y_lo, y_hi) = padded_range(ys, None);
    let mut chart = ChartBuilder::on(&upper)
        .caption(title, text_style(20))
        .margin(14)
        .x_label_area_size(48)
        .y_label_area_size(70)
        .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)?;
    chart
        .configure_mesh()
        .light_line_style(TRANSPARENT)
        .bold_line_style(GRID_COLOR)
        .x_desc(l.x_label.as_str())
        .y_desc(l.y_label.as_str())
        .label_style(text_style(12))
        .axis_desc_style(text_style(14))
        .draw()?;
    // Barriers at one lambda (curves peak alike) sit side by side, a few pixels apart, in their curve's colour.
    let marked = l.series.iter().filter(|s| s.barrier.is_some()).count() as i32;
    let mut nth_mark = 0;
    for (s, (c, shape, dash)) in l.series.iter().zip(line_styles(l)) {
        chart.draw_series(s.runs.iter().map(|&(x, y)| Circle::new((x, y), 3, c.mix(0.35).filled())))?;
        if let Some([a, b]) = s.chord {
            chart.draw_series(DashedLineSeries::new(vec![a, b], 6, 4, c.mix(0.8).stroke_width(1)))?;
        }
        if let Some(BarrierMark { lambda, from, to }) = s.barrier {
            let dx = 8 * nth_mark - 4 * (marked - 1);
            nth_mark += 1;
            let (a, b) = (chart.backend_coord(&(lambda, from)), chart.backend_coord(&(lambda, to)));
            draw_barrier_bar(&upper, (a.0 + dx, a.1), (b.0 + dx, b.1), c)?;
        }
        let (on, off) = dash_pattern(dash);
        chart.draw_series(DashedLineSeries::new(s.points.iter().map(|p| (p.0, p.1)), on, off, c.stroke_width(2)))?;
        for &(x, y, e) in &s.points {
            if e > 0.0 {
                chart
                    .draw_series(std::iter::once(PathElement::new(vec![(x, y - e), (x, y + e)], c.stroke_width(1))))?;
            }
        }
        for &(x, y, _) in &s.points {
            draw_marker_sized(&upper, chart.backend_coord(&(x, y)), shape, c, 4)?;
        }
    }
    draw_legend(&lower, &legend)?;
    Ok(())
}

/// Grouped bars colour each series by its place: series labels (models, domains) are compared within one chart,
/// and labels sharing a method would otherwise share its colour. Series that are merge methods keep their method's
/// colour, a lighter shade for each further variant of one method.
fn grouped_colours(g: &GroupedBarChart) -> Vec<RGBColor> {
    if !g.method_colours {
        return (0..g.series.len()).map(|i| PALETTE[i % PALETTE.len()]).collect();
    }
    let base = assign_colours(&g.series.iter().map(|s| s.label.clone()).collect::<Vec<_>>());
    base.iter()
        .enumerate()
        .map(|(i, &c)| {
            let earlier = base[..i].iter().filter(|&&b| b == c).count() as f64;
            let t = (0.45 * earlier).min(0.8);
            let mix = |v: u8| (v as f64 + (255.0 - v as f64) * t).round() as u8;
            RGBColor(mix(c.0), mix(c.1), mix(c.2))
        })
        .collect()
}

fn grouped_legend(g: &GroupedBarChart) -> Vec<(String, Mark)> {
    let mut entries: Vec<(String, Mark)> =
        g.series.iter().zip(grouped_colours(g)).map(|(s, c)| (s.label.clone(), Mark::Swatch(c))).collect();
    if let Some(label) = &g.tick_label {
        entries.push((label.clone(), Mark::Tick));
    }
    if let Some(label) = &g.reference_label {
        entries.push((label.clone(), Mark::Dashed(BASELINE_COLOR)));
    }
    entries
}

fn draw_grouped<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, title: &str, g: &GroupedBarChart) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let (w, h) = root.dim_in_pixel();
    let legend = grouped_legend(g);
    let (upper, lower) = root.split_vertically(h - legend_height(&legend, w));
    let colours = grouped_colours(g);
    let n = g.categories.len().max(1) as f64;
    let ends = g.series.iter().flat_map(|s| {
        s.values.iter().flatten().flat_map(|&(v, e)| [v - e, v + e]).chain(s.ticks.iter().flatten().copied())
    });
    let (y_lo, mut y_hi) = padded_range(ends.chain(g.references.iter().map(|r| r.1)), Some(0.0));
    y_hi += 0.06 * (y_hi - y_lo); // room for the value labels
    let mut chart = ChartBuilder::on(&upper)
        .caption(title, text_style(20))
        .margin(14)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..n, y_lo..y_hi)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .x_label_formatter(&|_| String::new())
        .light_line_style(TRANSPARENT)
        .bold_line_style(GRID_COLOR)
        .y_desc(g.y_label.as_str())
        .label_style(text_style(12))
        .axis_desc_style(text_style(14))
        .draw()?;
    // Each category spans [i, i + 1): bars fill the middle 80%, side by side in series order.
    let width = 0.8 / g.series.len().max(1) as f64;
    let left = |cat: usize, s: usize| cat as f64 + 0.1 + s as f64 * width;
    for (si, (s, c)) in g.series.iter().zip(&colours).enumerate() {
        for (ci, v) in s.values.iter().enumerate() {
            let Some((v, e)) = *v else { continue };
            let x0 = left(ci, si);
            chart
                .draw_series(std::iter::once(Rectangle::new([(x0 + 0.01, 0.0), (x0 + width - 0.01, v)], c.filled())))?;
            if e > 0.0 {
                let mid = x0 + width / 2.0;
                chart.draw_series(std::iter::once(PathElement::new(
                    vec![(mid, v - e), (mid, v + e)],
                    BLACK.stroke_width(1),
                )))?;
            }
        }
        for (ci, t) in s.ticks.iter().enumerate() {
            let Some(t) = *t else { continue };
            let x0 = left(ci, si);
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(x0 + 0.15 * width, t), (x0 + 0.85 * width, t)],
                BLACK.stroke_width(3),
            )))?;
        }
    }
    chart.draw_series(std::iter::once(PathElement::new(vec![(0.0, 0.0), (n, 0.0)], BLACK.stroke_width(1))))?;
    for &(cat, value) in &g.references {
        let (a, b) = match cat {
            Some(i) => (i as f64 + 0.04, i as f64 + 0.96),
            None => (0.0, n),
        };
        chart.draw_series(DashedLineSeries::new(vec![(a, value), (b, value)], 8, 5, BASELINE_COLOR.stroke_width(2)))?;
    }
    // Text last: value labels above (or below) each bar when they fit its width, category names under the axis.
    let bar_px = chart.backend_coord(&(width, 0.0)).0 - chart.backend_coord(&(0.0, 0.0)).0;
    for (si, s) in g.series.iter().enumerate() {
        for (ci, v) in s.values.iter().enumerate() {
            let Some((v, e)) = *v else { continue };
            let text = format!("{:.*}", g.decimals, v);
            if text_width(&text, 11) as i32 > bar_px + 6 {
                continue;
            }
            let mid = left(ci, si) + width / 2.0;
            let (px, py) = chart.backend_coord(&(mid, if v >= 0.0 { v + e } else { v - e }));
            let (dy, anchor) = if v >= 0.0 { (-3, VPos::Bottom) } else { (3, VPos::Top) };
            root.draw(&Text::new(text, (px, py + dy), text_style(11).pos(Pos::new(HPos::Center, anchor))))?;
        }
    }
    let cat_px = (chart.backend_coord(&(1.0, 0.0)).0 - chart.backend_coord(&(0.0, 0.0)).0).max(20) as u32;
    for (ci, name) in g.categories.iter().enumerate() {
        let (px, _) = chart.backend_coord(&(ci as f64 + 0.5, y_lo));
        let (_, py) = chart.backend_coord(&(0.0, y_lo));
        let label = fit(name, 13, cat_px - 8);
        root.draw(&Text::new(label, (px, py + 8), text_style(13).pos(Pos::new(HPos::Center, VPos::Top))))?;
    }
    draw_legend(&lower, &legend)?;
    Ok(())
}

/// Scatter marker shapes, one per freeze policy, the same in every chart.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Shape {
    Circle,
    Triangle,
    Square,
    Diamond,
    Cross,
}

/// Full fine-tuning a circle, head only a triangle, the SNR selection a square; no policy a diamond, others a cross.
pub fn policy_shape(policy: &str) -> Shape {
    match policy {
        "full" => Shape::Circle,
        "head" => Shape::Triangle,
        "selected" => Shape::Square,
        "" => Shape::Diamond,
        _ => Shape::Cross,
    }
}

const MARKER_R: i32 = 5;

fn draw_marker<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    at: (i32, i32),
    shape: Shape,
    c: RGBColor,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    draw_marker_sized(area, at, shape, c, MARKER_R)
}

fn draw_marker_sized<DB: DrawingBackend, C: Color + Copy>(
    area: &DrawingArea<DB, Shift>,
    (x, y): (i32, i32),
    shape: Shape,
    c: C,
    r: i32,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    match shape {
        Shape::Circle => area.draw(&Circle::new((x, y), r, c.filled()))?,
        Shape::Triangle => {
            area.draw(&Polygon::new(vec![(x, y - r - 1), (x - r - 1, y + r), (x + r + 1, y + r)], c.filled()))?
        }
        Shape::Square => area.draw(&Rectangle::new([(x - r + 1, y - r + 1), (x + r - 1, y + r - 1)], c.filled()))?,
        Shape::Diamond => {
            area.draw(&Polygon::new(vec![(x, y - r - 1), (x + r + 1, y), (x, y + r + 1), (x - r - 1, y)], c.filled()))?
        }
        Shape::Cross => {
            area.draw(&PathElement::new(vec![(x - r, y - r), (x + r, y + r)], c.stroke_width(3)))?;
            area.draw(&PathElement::new(vec![(x - r, y + r), (x + r, y - r)], c.stroke_width(3)))?;
        }
    }
    Ok(())
}

/// Height of the title and panels of a scatter chart; legend and key go below.
const SCATTER_H: u32 = 600;
const SCATTER_LABEL_SIZE: u32 = 11;
const SCATTER_LINE: i32 = 13;

fn scatter_width(s: &ScatterChart) -> u32 {
    (s.panels.len() as u32 * 720).max(900)
}

/// Methods in order of appearance (the baseline is not a method) with their colours: a known method keeps its own.
fn scatter_methods(s: &ScatterChart) -> Vec<(String, RGBColor)> {
    let mut methods: Vec<String> = Vec::new();
    for p in s.panels.iter().flat_map(|p| &p.points) {
        if !p.baseline && !methods.contains(&p.method) {
            methods.push(p.method.clone());
        }
    }
    let colours = assign_colours(&methods);
    methods.into_iter().zip(colours).collect()
}

fn scatter_colour(methods: &[(String, RGBColor)], method: &str, baseline: bool) -> RGBColor {
    if baseline {
        return BASELINE_COLOR;
    }
    methods.iter().find(|(m, _)| m == method).map(|x| x.1).unwrap_or(PALETTE[7])
}

fn scatter_legend(s: &ScatterChart) -> Vec<(String, Mark)> {
    let grey = RGBColor(0x55, 0x55, 0x55);
    let mut entries: Vec<(String, Mark)> = scatter_methods(s)
        .into_iter()
        .map(|(m, c)| (if m.is_empty() { "(no method)".to_string() } else { m }, Mark::Swatch(c)))
        .collect();
    let mut policies: Vec<String> = Vec::new();
    for p in s.panels.iter().flat_map(|p| &p.points) {
        if !policies.contains(&p.policy) {
            policies.push(p.policy.clone());
        }
    }
    for policy in policies {
        entries.push((policy_text(&policy), Mark::Marker(policy_shape(&policy), grey)));
    }
    if let Some(b) = s.panels.iter().flat_map(|p| &p.points).find(|p| p.baseline) {
        entries.push((format!("baseline ({})", b.label), Mark::Marker(policy_shape(&b.policy), BASELINE_COLOR)));
    }
    entries.push(("Pareto front: nothing else is both cheaper and better".into(), Mark::Front));
    entries
}

/// The numbered key of points whose names did not fit beside them, from a dry run of the layout (it depends only on
/// the panels, which have the same size in the dry run).
fn scatter_key(s: &ScatterChart) -> Option<Vec<(String, Mark)>> {
    ensure_font().ok()?;
    let mut svg = String::new();
    let w = scatter_width(s);
    let root = SVGBackend::with_string(&mut svg, (w, SCATTER_H)).into_drawing_area();
    let key = draw_scatter_panels(&root, "", s).ok()?;
    Some(key_entries(&key))
}

fn key_entries(key: &[String]) -> Vec<(String, Mark)> {
    key.iter().enumerate().map(|(i, label)| (label.clone(), Mark::Number(format!("{}", i + 1)))).collect()
}

fn draw_scatter<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, title: &str, s: &ScatterChart) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let (w, _) = root.dim_in_pixel();
    let (upper, rest) = root.split_vertically(SCATTER_H);
    let key = draw_scatter_panels(&upper, title, s)?;
    let legend = scatter_legend(s);
    let (legend_area, key_area) = rest.split_vertically(legend_height(&legend, w));
    draw_legend(&legend_area, &legend)?;
    draw_legend(&key_area, &key_entries(&key))?;
    Ok(())
}

/// A pixel box (x0, y0, x1, y1), for keeping labels apart.
type PixelBox = (i32, i32, i32, i32);

fn overlaps(a: PixelBox, b: PixelBox) -> bool {
    a.0 < b.2 && b.0 < a.2 && a.1 < b.3 && b.1 < a.3
}

/// Where a label of size (w, h) may go around a point, nearest first: right, left, above, below, the diagonals, then
/// the same further out (drawn with a leader line).
fn label_candidates((x, y): (i32, i32), (w, h): (i32, i32)) -> Vec<PixelBox> {
    let mut out = Vec::new();
    for d in [9, 22, 38] {
        let places = [
            (x + d, y - h / 2),
            (x - d - w, y - h / 2),
            (x - w / 2, y - d - h),
            (x - w / 2, y + d),
            (x + d - 3, y - d - h + 3),
            (x + d - 3, y + d - 3),
            (x - d - w + 3, y - d - h + 3),
            (x - d - w + 3, y + d - 3),
        ];
        out.extend(places.iter().map(|&(x0, y0)| (x0, y0, x0 + w, y0 + h)));
    }
    out
}

/// Further places for a (short) numbered label when none of `label_candidates` is free: rings of 16 directions out
/// to 200 pixels, nearest first, each drawn with a leader line to its point.
fn far_label_candidates((x, y): (i32, i32), (w, h): (i32, i32)) -> Vec<PixelBox> {
    let mut out = Vec::new();
    for d in (50..=200).step_by(12) {
        for k in 0..16 {
            let angle = k as f64 * std::f64::consts::PI / 8.0;
            let (cx, cy) = (x + (d as f64 * angle.cos()).round() as i32, y - (d as f64 * angle.sin()).round() as i32);
            out.push((cx - w / 2, cy - h / 2, cx - w / 2 + w, cy - h / 2 + h));
        }
    }
    out
}

/// Draws the title and the panels; returns the key: names drawn as numbers (number = index + 1).
fn draw_scatter_panels<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    title: &str,
    s: &ScatterChart,
) -> std::result::Result<Vec<String>, Box<dyn StdError>>
where
    DB::ErrorType: 'static,
{
    let (w, _) = area.dim_in_pixel();
    area.draw(&Text::new(
        fit(title, 20, w - 20),
        (w as i32 / 2, 12),
        text_style(20).pos(Pos::new(HPos::Center, VPos::Top)),
    ))?;
    let (_, body) = area.split_vertically(44);
    let methods = scatter_methods(s);
    let panel_areas = body.split_evenly((1, s.panels.len().max(1)));
    let mut key: Vec<String> = Vec::new();
    for (panel_area, panel) in panel_areas.iter().zip(&s.panels) {
        draw_scatter_panel(area, panel_area, panel, &s.y_label, &methods, &mut key)?;
    }
    Ok(key)
}

fn draw_scatter_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel_area: &DrawingArea<DB, Shift>,
    panel: &ScatterPanel,
    y_label: &str,
    methods: &[(String, RGBColor)],
    key: &mut Vec<String>,
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let xs = panel.points.iter().flat_map(|p| [p.x.0 - p.x.1, p.x.0 + p.x.1]);
    let (x_lo, mut x_hi) = padded_range(xs, None);
    x_hi += 0.12 * (x_hi - x_lo); // room for the names right of the costliest points
    let ys = panel.points.iter().flat_map(|p| [p.y.0 - p.y.1, p.y.0 + p.y.1]);
    let (y_lo, y_hi) = padded_range(ys, None);
    let mut chart = ChartBuilder::on(panel_area)
        .margin(14)
        .x_label_area_size(48)
        .y_label_area_size(70)
        .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)?;
    chart
        .configure_mesh()
        .light_line_style(TRANSPARENT)
        .bold_line_style(GRID_COLOR)
        .x_desc(panel.x_label.as_str())
        .y_desc(y_label)
        .label_style(text_style(12))
        .axis_desc_style(text_style(14))
        .draw()?;
    let colour = |i: usize| {
        let p = &panel.points[i];
        scatter_colour(methods, &p.method, p.baseline)
    };
    for (i, p) in panel.points.iter().enumerate() {
        let c = colour(i).mix(0.6);
        if p.x.1 > 0.0 {
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(p.x.0 - p.x.1, p.y.0), (p.x.0 + p.x.1, p.y.0)],
                c.stroke_width(1),
            )))?;
        }
        if p.y.1 > 0.0 {
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(p.x.0, p.y.0 - p.y.1), (p.x.0, p.y.0 + p.y.1)],
                c.stroke_width(1),
            )))?;
        }
    }
    let front: Vec<(f64, f64)> = panel.front.iter().map(|&i| (panel.points[i].x.0, panel.points[i].y.0)).collect();
    chart.draw_series(LineSeries::new(front, BLACK.stroke_width(2)))?;
    let at: Vec<(i32, i32)> = panel.points.iter().map(|p| chart.backend_coord(&(p.x.0, p.y.0))).collect();
    // Pareto points ringed; markers over the front line.
    for &i in &panel.front {
        area.draw(&Circle::new(at[i], MARKER_R + 4, BLACK.stroke_width(2)))?;
    }
    for (i, p) in panel.points.iter().enumerate() {
        draw_marker(area, at[i], policy_shape(&p.policy), colour(i))?;
    }

    // Names: points on one pixel share a label (one name per line); the front first, then the rest in order. A name
    // goes beside its point where it overlaps no marker, ring or other name and stays in the plot; else a number
    // does, and the name goes in the key under the chart.
    let (px0, py0) = chart.backend_coord(&(x_lo, y_hi));
    let (px1, py1) = chart.backend_coord(&(x_hi, y_lo));
    let plot: PixelBox = (px0, py0, px1, py1);
    let mut taken: Vec<PixelBox> =
        at.iter().map(|&(x, y)| (x - MARKER_R - 5, y - MARKER_R - 5, x + MARKER_R + 5, y + MARKER_R + 5)).collect();
    let mut order: Vec<usize> = panel.front.clone();
    order.extend((0..panel.points.len()).filter(|i| !panel.front.contains(i)));
    let mut done = vec![false; panel.points.len()];
    for i in order {
        if done[i] {
            continue;
        }
        let group: Vec<usize> = (0..panel.points.len())
            .filter(|&j| !done[j] && (at[j].0 - at[i].0).abs() <= 2 && (at[j].1 - at[i].1).abs() <= 2)
            .collect();
        for &j in &group {
            done[j] = true;
        }
        let names: Vec<String> = group.iter().map(|&j| panel.points[j].label.clone()).collect();
        let fits = |lines: &[String], taken: &[PixelBox], far: bool| -> Option<PixelBox> {
            let w = lines.iter().map(|l| text_width(l, SCATTER_LABEL_SIZE) as i32).max().unwrap_or(0) + 4;
            let h = SCATTER_LINE * lines.len() as i32 + 2;
            let candidates = if far { far_label_candidates(at[i], (w, h)) } else { label_candidates(at[i], (w, h)) };
            candidates.into_iter().find(|b| {
                b.0 >= plot.0
                    && b.1 >= plot.1
                    && b.2 <= plot.2
                    && b.3 <= plot.3
                    && taken.iter().all(|t| !overlaps(*b, *t))
            })
        };
        let (lines, placed) = match fits(&names, &taken, false) {
            Some(b) => (names, Some(b)),
            None => {
                let numbers: Vec<String> = names
                    .iter()
                    .map(|n| {
                        let k = key.iter().position(|x| x == n).unwrap_or_else(|| {
                            key.push(n.clone());
                            key.len() - 1
                        });
                        format!("{}", k + 1)
                    })
                    .collect();
                // A number is short: near the point if it can, else further out on a leader line.
                let line = vec![numbers.join(", ")];
                let b = fits(&line, &taken, false).or_else(|| fits(&line, &taken, true));
                (line, b)
            }
        };
        // Nowhere free even for a number: it goes right of the point regardless.
        let b = placed.unwrap_or_else(|| {
            label_candidates(at[i], (text_width(&lines[0], SCATTER_LABEL_SIZE) as i32 + 4, SCATTER_LINE + 2))[0]
        });
        taken.push(b);
        let near =
            (at[i].0 - b.0.max(at[i].0.min(b.2))).abs() <= 12 && (at[i].1 - b.1.max(at[i].1.min(b.3))).abs() <= 12;
        if !near {
            let to = (at[i].0.clamp(b.0, b.2), at[i].1.clamp(b.1, b.3));
            area.draw(&PathElement::new(vec![at[i], to], RGBColor(0x88, 0x88, 0x88).stroke_width(1)))?;
        }
        for (k, line) in lines.iter().enumerate() {
            let style = text_style(SCATTER_LABEL_SIZE).pos(Pos::new(HPos::Left, VPos::Top));
            area.draw(&Text::new(line.clone(), (b.0 + 2, b.1 + 1 + k as i32 * SCATTER_LINE), style))?;
        }
    }
    Ok(())
}

/// Quartiles (numpy's linear interpolation) and Tukey whiskers (the furthest runs within 1.5 IQR of the box).
pub fn box_stats(values: &[f64]) -> Option<[f64; 5]> {
    if values.is_empty() {
        return None;
    }
    let mut s = values.to_vec();
    s.sort_by(f64::total_cmp);
    let (q1, median, q3) = (percentile(&s, 0.25), percentile(&s, 0.5), percentile(&s, 0.75));
    let iqr = q3 - q1;
    let low = s.iter().copied().find(|&v| v >= q1 - 1.5 * iqr).unwrap_or(q1);
    let high = s.iter().rev().copied().find(|&v| v <= q3 + 1.5 * iqr).unwrap_or(q3);
    Some([low, q1, median, q3, high])
}

fn violin_width(v: &ViolinChart) -> u32 {
    let cats: usize = v.panels.iter().map(|p| p.categories.len()).sum();
    (cats as u32 * 120 + v.panels.len() as u32 * 80 + 40).clamp(900, 1800)
}

fn violin_methods(v: &ViolinChart) -> Vec<(String, RGBColor)> {
    let mut methods: Vec<String> = Vec::new();
    for m in v.panels.iter().flat_map(|p| p.categories.iter().flat_map(|c| &c.methods)) {
        if !methods.contains(m) {
            methods.push(m.clone());
        }
    }
    let colours = assign_colours(&methods);
    methods.into_iter().zip(colours).collect()
}

fn violin_legend(v: &ViolinChart) -> Vec<(String, Mark)> {
    let grey = RGBColor(0x55, 0x55, 0x55);
    let mut entries: Vec<(String, Mark)> = violin_methods(v)
        .into_iter()
        .map(|(m, c)| (if m.is_empty() { "(no method)".to_string() } else { m }, Mark::Swatch(c)))
        .collect();
    let mut policies: Vec<String> = Vec::new();
    for p in v.panels.iter().flat_map(|p| p.categories.iter().flat_map(|c| &c.policies)) {
        if !policies.contains(p) {
            policies.push(p.clone());
        }
    }
    if policies.len() > 1 || policies.iter().any(|p| !p.is_empty()) {
        for p in policies {
            entries.push((policy_text(&p), Mark::Marker(policy_shape(&p), grey)));
        }
    }
    let cats = || v.panels.iter().flat_map(|p| &p.categories);
    if cats().any(|c| c.values.len() >= VIOLIN_MIN_RUNS) {
        entries.push(("density of the runs, quartiles, median".into(), Mark::Swatch(VIOLIN_FILL)));
    }
    if cats().any(|c| c.values.len() < VIOLIN_MIN_RUNS) {
        entries.push(("mean +- standard error (few runs)".into(), Mark::Line(BLACK)));
    }
    if let Some(r) = &v.reference {
        entries.push((r.label.clone(), Mark::Dashed(BASELINE_COLOR)));
    }
    entries
}

const VIOLIN_FILL: RGBColor = RGBColor(0xC8, 0xC8, 0xC8);

/// A freeze policy's legend text.
fn policy_text(policy: &str) -> String {
    match policy {
        "" => "policy not recorded".to_string(),
        "full" => "full fine-tuning".to_string(),
        "head" => "head only".to_string(),
        "selected" => "SNR-selected layers".to_string(),
        other => format!("freeze {other}"),
    }
}

/// A violin's half outline: the bandwidth and (value, density) points.
type Outline = (f64, Vec<(f64, f64)>);

/// Gaussian kernel density of `values` at `y`, bandwidth by Silverman's rule (0.9 min(sd, IQR / 1.34) n^-1/5).
pub fn silverman_bandwidth(values: &[f64]) -> f64 {
    let n = values.len() as f64;
    if values.len() < 2 {
        return 0.0;
    }
    let mean = values.iter().sum::<f64>() / n;
    let sd = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    let mut s = values.to_vec();
    s.sort_by(f64::total_cmp);
    let iqr = percentile(&s, 0.75) - percentile(&s, 0.25);
    let spread = if iqr > 0.0 { sd.min(iqr / 1.34) } else { sd };
    0.9 * spread * n.powf(-0.2)
}

fn density(values: &[f64], h: f64, y: f64) -> f64 {
    let norm = 1.0 / (values.len() as f64 * h * (2.0 * std::f64::consts::PI).sqrt());
    values.iter().map(|v| (-0.5 * ((y - v) / h).powi(2)).exp()).sum::<f64>() * norm
}

fn draw_violins<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, title: &str, v: &ViolinChart) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let (w, h) = root.dim_in_pixel();
    let legend = violin_legend(v);
    let (upper, lower) = root.split_vertically(h - legend_height(&legend, w));
    upper.draw(&Text::new(
        fit(title, 20, w - 20),
        (w as i32 / 2, 12),
        text_style(20).pos(Pos::new(HPos::Center, VPos::Top)),
    ))?;
    let (_, body) = upper.split_vertically(44);
    let values = v.panels.iter().flat_map(|p| p.categories.iter().flat_map(|c| c.values.iter().copied()));
    let (y_lo, y_hi) = padded_range(values.chain(v.reference.as_ref().map(|r| r.value)), None);
    // Panels as wide as their categories, the first wider by its axis labels.
    let weights: Vec<u32> = v
        .panels
        .iter()
        .enumerate()
        .map(|(i, p)| p.categories.len() as u32 * 120 + if i == 0 { 110 } else { 40 })
        .collect();
    let total: u32 = weights.iter().sum();
    let mut breaks = Vec::new();
    let mut acc = 0;
    for wt in &weights[..weights.len() - 1] {
        acc += wt;
        breaks.push((acc as u64 * w as u64 / total as u64) as i32);
    }
    let areas = body.split_by_breakpoints(breaks, Vec::<i32>::new());
    let methods = violin_methods(v);
    for (pi, (area, panel)) in areas.iter().zip(&v.panels).enumerate() {
        let k = panel.categories.len();
        let mut chart = ChartBuilder::on(area)
            .caption(panel.param.as_str(), text_style(15))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(if pi == 0 { 80 } else { 10 })
            .build_cartesian_2d(-0.6..k as f64 - 0.4, y_lo..y_hi)?;
        let mut mesh = chart.configure_mesh();
        mesh.disable_x_mesh()
            .x_labels(0)
            .x_label_formatter(&|_| String::new())
            .light_line_style(TRANSPARENT)
            .bold_line_style(GRID_COLOR)
            .label_style(text_style(12))
            .axis_desc_style(text_style(14));
        if pi == 0 {
            mesh.y_desc(v.y_label.as_str());
        } else {
            mesh.y_labels(0).y_label_formatter(&|_| String::new());
        }
        mesh.draw()?;
        if let Some(r) = &v.reference {
            chart.draw_series(DashedLineSeries::new(
                vec![(-0.6, r.value), (k as f64 - 0.4, r.value)],
                8,
                5,
                BASELINE_COLOR.stroke_width(2),
            ))?;
        }
        // Densities share one scale within a panel, the widest reaching 0.4 on either side.
        let shapes: Vec<Option<Outline>> = panel
            .categories
            .iter()
            .map(|c| {
                let bw = silverman_bandwidth(&c.values);
                (c.values.len() >= VIOLIN_MIN_RUNS && bw > 0.0).then(|| {
                    let (lo, hi) =
                        c.values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
                    // The density is cut at the extreme runs, as seaborn's cut=0: no tails past the data.
                    let pts: Vec<(f64, f64)> = (0..=80)
                        .map(|i| {
                            let y = lo + (hi - lo) * i as f64 / 80.0;
                            (y, density(&c.values, bw, y))
                        })
                        .collect();
                    (bw, pts)
                })
            })
            .collect();
        let peak = shapes.iter().flatten().flat_map(|(_, pts)| pts.iter().map(|p| p.1)).fold(0.0, f64::max);
        let (_, py_bottom) = chart.backend_coord(&(0.0, y_lo));
        let slot = (area.dim_in_pixel().0 as i32 - if pi == 0 { 100 } else { 30 }) / k.max(1) as i32;
        for (ci, c) in panel.categories.iter().enumerate() {
            let x = ci as f64;
            if let Some((_, pts)) = &shapes[ci] {
                let half = |d: f64| 0.4 * d / peak;
                let mut outline: Vec<(f64, f64)> = pts.iter().map(|&(y, d)| (x - half(d), y)).collect();
                outline.extend(pts.iter().rev().map(|&(y, d)| (x + half(d), y)));
                chart.draw_series(std::iter::once(Polygon::new(outline.clone(), VIOLIN_FILL.mix(0.7).filled())))?;
                outline.push(outline[0]);
                chart.draw_series(std::iter::once(PathElement::new(
                    outline,
                    RGBColor(0x77, 0x77, 0x77).stroke_width(1),
                )))?;
                if let Some([_, q1, median, q3, _]) = box_stats(&c.values) {
                    chart.draw_series(std::iter::once(Rectangle::new(
                        [(x - 0.04, q1), (x + 0.04, q3)],
                        BLACK.filled(),
                    )))?;
                    let (mx, my) = chart.backend_coord(&(x, median));
                    upper.draw(&Circle::new((mx, my), 3, WHITE.filled()))?;
                }
            }
            // Every run a point, spread sideways by a fixed low-discrepancy sequence (deterministic jitter).
            for (j, &val) in c.values.iter().enumerate() {
                let jitter = ((j as f64 * 0.618_033_988_75).fract() - 0.5) * 0.5;
                let colour = methods.iter().find(|(m, _)| *m == c.methods[j]).map(|x| x.1).unwrap_or(PALETTE[7]);
                let at = chart.backend_coord(&(x + jitter, val));
                draw_marker_sized(&upper, at, policy_shape(&c.policies[j]), colour.mix(0.85), 3)?;
            }
            if shapes[ci].is_none() && !c.values.is_empty() {
                let n = c.values.len() as f64;
                let mean = c.values.iter().sum::<f64>() / n;
                let se = c.se;
                let line = BLACK.stroke_width(2);
                chart.draw_series([
                    PathElement::new(vec![(x + 0.32, mean - se), (x + 0.32, mean + se)], line),
                    PathElement::new(vec![(x + 0.26, mean), (x + 0.38, mean)], BLACK.stroke_width(3)),
                ])?;
            }
            let (px, _) = chart.backend_coord(&(x, y_lo));
            let label = fit(&format!("{} (n={})", c.label, c.values.len()), 12, slot.max(40) as u32 - 8);
            upper.draw(&Text::new(
                label,
                (px, py_bottom + 8),
                text_style(12).pos(Pos::new(HPos::Center, VPos::Top)),
            ))?;
        }
    }
    draw_legend(&lower, &legend)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_keep_their_colour_and_other_labels_take_free_ones() {
        let labels: Vec<String> = ["freeze head", "ties, freeze full", "lerp", "freeze full", "ties top-10% / head"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let c = assign_colours(&labels);
        // lerp is palette 0 and ties palette 1 wherever they appear; the others skip both, in order.
        assert_eq!(c[1], PALETTE[1]);
        assert_eq!(c[4], PALETTE[1]);
        assert_eq!(c[2], PALETTE[0]);
        assert_eq!(c[0], PALETTE[2]);
        assert_eq!(c[3], PALETTE[3]);
        // Eight unknown labels: eight different colours.
        let many: Vec<String> = (0..8).map(|i| format!("series {i}")).collect();
        let colours = assign_colours(&many);
        for i in 0..8 {
            for j in 0..i {
                assert_ne!(colours[i], colours[j], "series {i} and {j} share a colour");
            }
        }
    }

    fn series(label: &str, key: &str, aligned: Option<bool>) -> super::super::plots::Series {
        super::super::plots::Series {
            label: label.into(),
            points: vec![(0.0, 1.0, 0.0), (1.0, 1.0, 0.0)],
            runs: vec![],
            chord: None,
            policy: String::new(),
            aligned,
            colour_key: key.into(),
            barrier: None,
        }
    }

    #[test]
    fn interpolation_pairs_share_a_colour_and_alignment_sets_the_dashes() {
        let l = LineChart {
            x_label: "lambda".into(),
            y_label: "loss".into(),
            series: vec![
                series("A-B naive", "a-b", Some(false)),
                series("A-B aligned", "a-b", Some(true)),
                series("C-D aligned", "c-d", Some(true)),
            ],
        };
        let styles = line_styles(&l);
        assert_eq!(styles[0].0, styles[1].0);
        assert_ne!(styles[1].0, styles[2].0);
        assert_eq!((styles[0].1, styles[0].2), (Shape::Diamond, 1));
        assert_eq!((styles[1].1, styles[1].2), (Shape::Circle, 0));
    }

    #[test]
    fn variants_of_a_method_are_lighter_shades_of_its_colour() {
        let g = GroupedBarChart {
            y_label: String::new(),
            categories: vec!["top-10%".into()],
            series: ["lerp", "lerp, SNR avg", "ties"]
                .iter()
                .map(|l| super::super::plots::GroupedSeries {
                    label: l.to_string(),
                    values: vec![Some((1.0, 0.0))],
                    ticks: vec![],
                })
                .collect(),
            references: vec![],
            reference_label: None,
            tick_label: None,
            method_colours: true,
            decimals: 3,
        };
        let c = grouped_colours(&g);
        assert_eq!(c[0], PALETTE[0]);
        assert_eq!(c[2], PALETTE[1]);
        // 45% of the way to white: 0 + 255 * 0.45 = 114.75, 114 + 141 * 0.45 = 177.45, 178 + 77 * 0.45 = 212.65.
        assert_eq!(c[1], RGBColor(115, 177, 213));
    }

    #[test]
    fn dpi_values() {
        assert_eq!(parse_scale("1"), Ok(1));
        assert_eq!(parse_scale("3x"), Ok(3));
        assert!(parse_scale("4").is_err() && parse_scale("300").is_err() && parse_scale("two").is_err());
    }

    #[test]
    fn far_label_places_ring_the_point() {
        let near = label_candidates((100, 100), (10, 10));
        let far = far_label_candidates((100, 100), (10, 10));
        assert!(far.len() > near.len());
        // Nearest first, and none within the near places' reach.
        let dist = |b: &PixelBox| (((b.0 + b.2) / 2 - 100).pow(2) + ((b.1 + b.3) / 2 - 100).pow(2)) as f64;
        assert!(far.windows(2).all(|w| dist(&w[0]).sqrt() <= dist(&w[1]).sqrt() + 2.0));
        assert!(far.iter().all(|b| dist(b).sqrt() >= 49.0));
    }

    #[test]
    fn box_stats_by_hand() {
        // Sorted: 1 2 3 4 100. q1 = 2, median 3, q3 = 4, IQR 2: whiskers stop at 1 and 4 (100 is an outlier).
        assert_eq!(box_stats(&[4.0, 1.0, 100.0, 3.0, 2.0]).unwrap(), [1.0, 2.0, 3.0, 4.0, 4.0]);
        assert_eq!(box_stats(&[0.5]).unwrap(), [0.5; 5]);
        assert!(box_stats(&[]).is_none());
    }

    #[test]
    fn long_labels_are_shortened_to_fit() {
        ensure_font().unwrap();
        let long = "a very long experiment name that will not fit in the space a bar chart leaves for labels";
        let short = fit(long, 13, 150);
        assert!(short.ends_with('…') && short.len() < long.len());
        assert!(text_width(&short, 13) <= 150);
        assert_eq!(fit("lerp", 13, 150), "lerp");
    }

    #[test]
    fn padded_ranges() {
        assert_eq!(padded_range([1.0, 2.0].into_iter(), Some(0.0)), (0.0, 2.16));
        let (lo, hi) = padded_range([-1.0, 1.0].into_iter(), Some(0.0));
        assert!((lo + 1.16).abs() < 1e-12 && (hi - 1.16).abs() < 1e-12);
        assert_eq!(padded_range(std::iter::empty(), None), (0.0, 1.0));
        let (lo, hi) = padded_range([5.0].into_iter(), None);
        assert!(lo < 5.0 && hi > 5.0);
    }
}
