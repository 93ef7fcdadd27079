//! `graft snr --plot DIR`: pictures of one model's SNR scan. A heatmap of every scored weight matrix by layer (rows)
//! and layer type (columns), coloured by log10 SNR on a colour-blind-safe sequential scale, the `--top-percent`
//! selection framed; and a ranking chart per type (bars in rank order, the selected ones coloured), drawn by the
//! report's bar renderer. PNG and SVG, with the report's embedded font.
//!
//! For several models (a zoo scan, or a study's scans in its report) one picture holds them all: a heatmap row per
//! model, one panel per layer type with the layers as columns (or, where every type is one matrix, as an MLP's
//! layers are, a single panel with the types as columns), on one colour scale so rows compare.

use std::error::Error as StdError;
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::plots::{slug, Bar, BarChart, Body, Chart, Section};
use super::render;
use crate::error::{Error, Result};
use crate::snr::Selection;

type DrawResult = std::result::Result<(), Box<dyn StdError>>;

/// One model's scores laid out as layers x types.
#[derive(Clone, Debug, PartialEq)]
pub struct Grid {
    pub model: String,
    pub types: Vec<String>,
    /// Row labels: the layer indices in order, then tensors without one (embeddings, head) as "no layer".
    pub rows: Vec<Option<usize>>,
    /// `cells[row][column]`: (SNR, selected); None where that layer has no scored matrix of that type.
    pub cells: Vec<Vec<Option<(f64, bool)>>>,
}

impl Grid {
    pub fn new(model: &str, selection: &Selection) -> Grid {
        let types: Vec<String> =
            selection.types.iter().filter(|t| !t.ranked.is_empty()).map(|t| t.layer_type.clone()).collect();
        let mut rows: Vec<Option<usize>> =
            selection.types.iter().flat_map(|t| t.ranked.iter().map(|r| r.layer)).collect();
        // Layers in order, "no layer" last.
        rows.sort_by_key(|l| (l.is_none(), *l));
        rows.dedup();
        let mut cells = vec![vec![None; types.len()]; rows.len()];
        for t in &selection.types {
            let Some(c) = types.iter().position(|x| *x == t.layer_type) else { continue };
            for r in &t.ranked {
                let row = rows.iter().position(|l| *l == r.layer).expect("every layer has a row");
                // Several matrices of one type without a layer index: the best-ranked one stands for them.
                cells[row][c].get_or_insert((r.snr, r.selected));
            }
        }
        Grid { model: model.to_string(), types, rows, cells }
    }

    /// A grid from a `graft snr --json` document (what studies keep as `snr-*.json`); None when nothing is scored.
    pub fn from_doc(model: &str, doc: &serde_json::Value) -> Option<Grid> {
        let tensors = doc.get("tensors")?.as_array()?;
        // (type, layer, snr, selected, rank) of every ranked tensor; an infinite SNR is written as null.
        let scored: Vec<(String, Option<usize>, f64, bool, u64)> = tensors
            .iter()
            .filter_map(|t| {
                let rank = t.get("rank")?.as_u64()?;
                let snr = t.get("snr").and_then(|v| v.as_f64()).unwrap_or(f64::INFINITY);
                let layer = t.get("layer").and_then(|v| v.as_u64()).map(|l| l as usize);
                let selected = t.get("selected").and_then(|v| v.as_bool()).unwrap_or(false);
                Some((t.get("type")?.as_str()?.to_string(), layer, snr, selected, rank))
            })
            .collect();
        let mut types: Vec<String> = Vec::new();
        for t in doc.get("types").and_then(|t| t.as_array()).into_iter().flatten().filter_map(|t| t.as_str()) {
            if scored.iter().any(|s| s.0 == t) && !types.iter().any(|x| x == t) {
                types.push(t.to_string());
            }
        }
        for s in &scored {
            if !types.contains(&s.0) {
                types.push(s.0.clone());
            }
        }
        if types.is_empty() {
            return None;
        }
        let mut rows: Vec<Option<usize>> = scored.iter().map(|s| s.1).collect();
        rows.sort_by_key(|l| (l.is_none(), *l));
        rows.dedup();
        let mut cells = vec![vec![None; types.len()]; rows.len()];
        let mut by_rank: Vec<&(String, Option<usize>, f64, bool, u64)> = scored.iter().collect();
        by_rank.sort_by_key(|s| s.4);
        for (t, layer, snr, selected, _) in by_rank {
            let c = types.iter().position(|x| x == t).expect("listed");
            let r = rows.iter().position(|l| l == layer).expect("listed");
            cells[r][c].get_or_insert((*snr, *selected));
        }
        Some(Grid { model: model.to_string(), types, rows, cells })
    }

    /// The cell of a type at a layer.
    pub fn cell(&self, layer_type: &str, layer: Option<usize>) -> Option<(f64, bool)> {
        let c = self.types.iter().position(|t| t == layer_type)?;
        let r = self.rows.iter().position(|l| *l == layer)?;
        self.cells[r][c]
    }

    pub fn row_label(&self, row: usize) -> String {
        match self.rows[row] {
            Some(l) => format!("layer {l}"),
            None => "no layer".into(),
        }
    }
}

/// Viridis at five stops (colour-blind safe, monotone in lightness), interpolated linearly.
const VIRIDIS: [(u8, u8, u8); 5] = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)];

fn scale_colour(t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0) * (VIRIDIS.len() - 1) as f64;
    let i = (t.floor() as usize).min(VIRIDIS.len() - 2);
    let f = t - i as f64;
    let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    let (a, b) = (VIRIDIS[i], VIRIDIS[i + 1]);
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// The log10 SNR range of the finite, positive scores of a grid.
fn log_range(grid: &Grid) -> (f64, f64) {
    log_range_of(std::slice::from_ref(grid))
}

/// One log10 SNR range for several grids, so equal colours mean equal SNR across models.
fn log_range_of(grids: &[Grid]) -> (f64, f64) {
    let logs = grids
        .iter()
        .flat_map(|g| g.cells.iter().flatten().flatten())
        .map(|c| c.0)
        .filter(|v| v.is_finite() && *v > 0.0)
        .map(f64::log10);
    let (lo, hi) = logs.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        (0.0, 1.0)
    } else if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, hi + 0.5)
    }
}

const CELL_H: u32 = 22;
const TOP: u32 = 110;
const LEGEND_H: u32 = 90;

/// A type name on two lines, split at its last dot ("self_attn" / "q_proj"), so columns stay narrow.
fn type_lines(t: &str) -> (&str, &str) {
    match t.rsplit_once('.') {
        Some((a, b)) => (a, b),
        None => ("", t),
    }
}

/// The width of the widest line of any type's two-line column label (60 without types).
fn widest_type_label(types: &[String]) -> u32 {
    types
        .iter()
        .flat_map(|t| {
            let (a, b) = type_lines(t);
            [render::text_width(a, 12), render::text_width(b, 12)]
        })
        .max()
        .unwrap_or(60)
}

fn heatmap_size(grid: &Grid) -> (u32, u32, u32, u32) {
    let col_w = widest_type_label(&grid.types).max(60) + 16;
    let label_w = 90;
    let w = (label_w + col_w * grid.types.len() as u32 + 40).max(700);
    let h = TOP + CELL_H * grid.rows.len() as u32 + LEGEND_H;
    (w, h, col_w, label_w)
}

fn draw_heatmap<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, grid: &Grid, title: &str) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let (w, h, col_w, label_w) = heatmap_size(grid);
    let style = |size: u32| TextStyle::from(("sans-serif", size).into_font()).color(&BLACK);
    root.draw(&Text::new(title.to_string(), (w as i32 / 2, 14), style(18).pos(Pos::new(HPos::Center, VPos::Top))))?;
    let (lo, hi) = log_range(grid);
    let x0 = label_w as i32;
    for (c, t) in grid.types.iter().enumerate() {
        let cx = x0 + (c as u32 * col_w + col_w / 2) as i32;
        let (first, last) = type_lines(t);
        let at = |dy: i32| (cx, TOP as i32 - dy);
        root.draw(&Text::new(first.to_string(), at(24), style(12).pos(Pos::new(HPos::Center, VPos::Bottom))))?;
        root.draw(&Text::new(last.to_string(), at(8), style(12).pos(Pos::new(HPos::Center, VPos::Bottom))))?;
    }
    for r in 0..grid.rows.len() {
        let y = (TOP + r as u32 * CELL_H) as i32;
        root.draw(&Text::new(
            grid.row_label(r),
            (x0 - 8, y + CELL_H as i32 / 2),
            style(12).pos(Pos::new(HPos::Right, VPos::Center)),
        ))?;
        for c in 0..grid.types.len() {
            let x = x0 + (c as u32 * col_w) as i32;
            let rect = [(x + 1, y + 1), (x + col_w as i32 - 1, y + CELL_H as i32 - 1)];
            match grid.cells[r][c] {
                None => root.draw(&Rectangle::new(rect, RGBColor(0xF2, 0xF2, 0xF2).filled()))?,
                Some((snr, selected)) => {
                    let t = if snr.is_infinite() { 1.0 } else { (snr.max(f64::MIN_POSITIVE).log10() - lo) / (hi - lo) };
                    root.draw(&Rectangle::new(rect, scale_colour(t).filled()))?;
                    if selected {
                        // A white frame inside a black one reads on dark and light cells alike.
                        root.draw(&Rectangle::new(rect, BLACK.stroke_width(3)))?;
                        let inner = [(rect[0].0 + 3, rect[0].1 + 3), (rect[1].0 - 3, rect[1].1 - 3)];
                        root.draw(&Rectangle::new(inner, WHITE.stroke_width(1)))?;
                    }
                }
            }
        }
    }
    // Colour scale and key.
    draw_scale(root, x0, (h - LEGEND_H + 24) as i32, lo, hi)
}

/// A zoo panel: its title and its columns, each a (type, layer) cell position.
type ZooPanel = (String, Vec<(String, Option<usize>)>);

/// What a zoo picture shows.
struct ZooLayout {
    panels: Vec<ZooPanel>,
    /// Every type one matrix: one panel whose columns are the types (labelled by type, not layer).
    by_type: bool,
    label_w: u32,
    col_w: u32,
    width: u32,
    height: u32,
}

const ZOO_TOP: u32 = 50;
const ZOO_PANEL_HEAD: u32 = 44;
const ZOO_GAP: u32 = 14;

fn zoo_layout(grids: &[Grid]) -> ZooLayout {
    let mut types: Vec<String> = Vec::new();
    for g in grids {
        for t in &g.types {
            if !types.contains(t) {
                types.push(t.clone());
            }
        }
    }
    let layers_of = |t: &str| -> Vec<Option<usize>> {
        let mut ls: Vec<Option<usize>> =
            grids.iter().flat_map(|g| g.rows.iter().copied().filter(|&l| g.cell(t, l).is_some())).collect();
        ls.sort_by_key(|l| (l.is_none(), *l));
        ls.dedup();
        ls
    };
    let by_type = types.iter().all(|t| layers_of(t).len() <= 1);
    let panels: Vec<ZooPanel> = if by_type {
        vec![(String::new(), types.iter().map(|t| (t.clone(), layers_of(t).first().copied().flatten())).collect())]
    } else {
        types.iter().map(|t| (t.clone(), layers_of(t).into_iter().map(|l| (t.clone(), l)).collect())).collect()
    };
    let label_w = grids.iter().map(|g| render::text_width(&g.model, 12)).max().unwrap_or(60) + 20;
    let most = panels.iter().map(|p| p.1.len()).max().unwrap_or(1).max(1) as u32;
    let col_w = if by_type { widest_type_label(&types).max(40) + 12 } else { (1000 / most).clamp(16, 40) };
    let width = (label_w + col_w * most + 40).max(700);
    let rows = grids.len() as u32;
    let height = ZOO_TOP + panels.len() as u32 * (ZOO_PANEL_HEAD + rows * CELL_H + ZOO_GAP) + LEGEND_H;
    ZooLayout { panels, by_type, label_w, col_w, width, height }
}

fn draw_zoo<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, grids: &[Grid], title: &str) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let z = zoo_layout(grids);
    let style = |size: u32| TextStyle::from(("sans-serif", size).into_font()).color(&BLACK);
    root.draw(&Text::new(
        title.to_string(),
        (z.width as i32 / 2, 14),
        style(18).pos(Pos::new(HPos::Center, VPos::Top)),
    ))?;
    let (lo, hi) = log_range_of(grids);
    let x0 = z.label_w as i32;
    let cw = z.col_w as i32;
    let mut y = ZOO_TOP as i32;
    for (panel_title, columns) in &z.panels {
        if z.by_type {
            for (c, (t, _)) in columns.iter().enumerate() {
                let (first, last) = type_lines(t);
                let cx = x0 + c as i32 * cw + cw / 2;
                root.draw(&Text::new(
                    first.to_string(),
                    (cx, y + ZOO_PANEL_HEAD as i32 - 22),
                    style(12).pos(Pos::new(HPos::Center, VPos::Bottom)),
                ))?;
                root.draw(&Text::new(
                    last.to_string(),
                    (cx, y + ZOO_PANEL_HEAD as i32 - 6),
                    style(12).pos(Pos::new(HPos::Center, VPos::Bottom)),
                ))?;
            }
        } else {
            root.draw(&Text::new(panel_title.clone(), (x0, y + 4), style(13).pos(Pos::new(HPos::Left, VPos::Top))))?;
            // Layer numbers over their columns; every one where they fit, else every fifth.
            let every = if render::text_width("88", 10) as i32 + 2 <= cw { 1 } else { 5 };
            for (c, (_, layer)) in columns.iter().enumerate() {
                let text = match layer {
                    Some(l) if l % every == 0 => l.to_string(),
                    Some(_) => continue,
                    None => "-".to_string(),
                };
                let cx = x0 + c as i32 * cw + cw / 2;
                root.draw(&Text::new(
                    text,
                    (cx, y + ZOO_PANEL_HEAD as i32 - 4),
                    style(10).pos(Pos::new(HPos::Center, VPos::Bottom)),
                ))?;
            }
        }
        let top = y + ZOO_PANEL_HEAD as i32;
        for (r, g) in grids.iter().enumerate() {
            let ry = top + (r as u32 * CELL_H) as i32;
            root.draw(&Text::new(
                g.model.clone(),
                (x0 - 8, ry + CELL_H as i32 / 2),
                style(12).pos(Pos::new(HPos::Right, VPos::Center)),
            ))?;
            for (c, (t, layer)) in columns.iter().enumerate() {
                let x = x0 + c as i32 * cw;
                let rect = [(x + 1, ry + 1), (x + cw - 1, ry + CELL_H as i32 - 1)];
                match g.cell(t, *layer) {
                    None => root.draw(&Rectangle::new(rect, RGBColor(0xF2, 0xF2, 0xF2).filled()))?,
                    Some((snr, selected)) => {
                        let v =
                            if snr.is_infinite() { 1.0 } else { (snr.max(f64::MIN_POSITIVE).log10() - lo) / (hi - lo) };
                        root.draw(&Rectangle::new(rect, scale_colour(v).filled()))?;
                        if selected {
                            root.draw(&Rectangle::new(rect, BLACK.stroke_width(2)))?;
                            if cw >= 12 {
                                let inner = [(rect[0].0 + 2, rect[0].1 + 2), (rect[1].0 - 2, rect[1].1 - 2)];
                                root.draw(&Rectangle::new(inner, WHITE.stroke_width(1)))?;
                            }
                        }
                    }
                }
            }
        }
        y = top + (grids.len() as u32 * CELL_H + ZOO_GAP) as i32;
    }
    draw_scale(root, x0, (z.height - LEGEND_H + 24) as i32, lo, hi)
}

/// The colour bar with its end values and the key of the selection frame.
fn draw_scale<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, x0: i32, ly: i32, lo: f64, hi: f64) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let style = |size: u32| TextStyle::from(("sans-serif", size).into_font()).color(&BLACK);
    let bar_w = 300;
    for i in 0..bar_w {
        let c = scale_colour(i as f64 / (bar_w - 1) as f64);
        root.draw(&Rectangle::new([(x0 + i, ly), (x0 + i + 1, ly + 14)], c.filled()))?;
    }
    let fmt = |v: f64| format!("{:.3}", 10f64.powf(v));
    root.draw(&Text::new(fmt(lo), (x0, ly + 18), style(11).pos(Pos::new(HPos::Left, VPos::Top))))?;
    root.draw(&Text::new(fmt(hi), (x0 + bar_w, ly + 18), style(11).pos(Pos::new(HPos::Right, VPos::Top))))?;
    root.draw(&Text::new(
        "SNR (log scale)".to_string(),
        (x0 + bar_w / 2, ly - 4),
        style(12).pos(Pos::new(HPos::Center, VPos::Bottom)),
    ))?;
    let kx = x0 + bar_w + 40;
    root.draw(&Rectangle::new([(kx, ly), (kx + 22, ly + 14)], BLACK.stroke_width(3)))?;
    root.draw(&Text::new(
        "selected (top-percent per type)".to_string(),
        (kx + 30, ly + 7),
        style(12).pos(Pos::new(HPos::Left, VPos::Center)),
    ))?;
    Ok(())
}

/// A study's SNR scans: `snr*.json` documents (`graft snr --json`) next to a results file or one directory below it
/// (graft's studies keep `seed-N/snr-MODEL.json`), in path order, each named by its model's path relative to that
/// directory. Files that are not SNR documents are passed over.
pub fn study_scans(results: &[std::path::PathBuf]) -> Vec<(Grid, f64, std::path::PathBuf)> {
    let mut dirs: Vec<std::path::PathBuf> = Vec::new();
    for r in results {
        let d = match r.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    let mut out = Vec::new();
    for d in dirs {
        let mut files: Vec<std::path::PathBuf> = Vec::new();
        let is_scan = |p: &Path| {
            let name = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            name.starts_with("snr") && name.ends_with(".json") && p.is_file()
        };
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if is_scan(&p) {
                files.push(p);
            } else if p.is_dir() {
                if let Ok(inner) = std::fs::read_dir(&p) {
                    files.extend(inner.flatten().map(|e| e.path()).filter(|p| is_scan(p)));
                }
            }
        }
        files.sort();
        for f in files {
            let Ok(text) = std::fs::read_to_string(&f) else { continue };
            let Ok(doc) = serde_json::from_str::<serde_json::Value>(&text) else { continue };
            let Some(top) = doc.get("top_percent").and_then(|v| v.as_f64()) else { continue };
            let model = doc.get("model").and_then(|m| m.as_str()).map(Path::new);
            let name = model
                .and_then(|m| m.strip_prefix(&d).ok().map(|r| r.display().to_string()))
                .filter(|n| !n.is_empty())
                .or_else(|| model.and_then(|m| m.file_name()).map(|n| n.to_string_lossy().to_string()))
                .unwrap_or_else(|| f.file_stem().unwrap_or_default().to_string_lossy().to_string());
            if let Some(g) = Grid::from_doc(&name, &doc) {
                out.push((g, top, f));
            }
        }
    }
    out
}

/// Writes `<dir>/<stem>.{png,svg}`: the SNR of several models, a heatmap row each, on one colour scale; the PNG at
/// `scale` pixels per layout pixel.
pub fn write_zoo(grids: &[Grid], dir: &Path, stem: &str, title: &str, scale: u32) -> Result<()> {
    render::ensure_font()?;
    if grids.is_empty() {
        return Err(Error::invalid(format!("{}: no SNR scan to plot", dir.display())));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let z = zoo_layout(grids);
    let png = dir.join(format!("{stem}.png"));
    let failed = |p: &Path, e: Box<dyn StdError>| {
        Error::invalid(format!("{}: drawing the SNR zoo heatmap failed: {e}", p.display()))
    };
    let bytes = render::png_bytes((z.width, z.height), scale, |root| draw_zoo(root, grids, title))
        .map_err(|e| failed(&png, e))?;
    crate::files::write_atomic(&png, &bytes)?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (z.width, z.height)).into_drawing_area();
        draw_zoo(&root, grids, title).and_then(|_| Ok(root.present()?)).map_err(|e| failed(&png, e))?;
    }
    let svg_path = dir.join(format!("{stem}.svg"));
    crate::files::write_atomic(&svg_path, svg.as_bytes())
}

/// The ranking of one type as a report bar chart: layers in rank order, the selected ones first in their colour.
pub fn ranking_chart(grid_model: &str, selection: &Selection, layer_type: &str) -> Option<Chart> {
    let t = selection.types.iter().find(|t| t.layer_type == layer_type && !t.ranked.is_empty())?;
    let bars = t
        .ranked
        .iter()
        .map(|r| Bar {
            label: match r.layer {
                Some(l) => format!("{}. layer {l}", r.rank),
                None => format!("{}. {}", r.rank, r.module),
            },
            group: if r.selected { "selected".into() } else { "not selected".into() },
            value: if r.snr.is_finite() { r.snr } else { 0.0 },
            err: 0.0,
        })
        .collect();
    Some(Chart {
        name: format!("ranking_{}", slug(layer_type)),
        title: format!("{grid_model}: which {layer_type} matrices carry the most signal? (SNR, ranked)"),
        caption: format!(
            "The signal-to-noise ratio of every {layer_type} matrix of {grid_model}, highest first; coloured apart: \
             the ones Spectrum's rule selects."
        ),
        section: Section::Bars,
        body: Body::Bars(BarChart {
            value_label: "SNR".into(),
            bars,
            reference: None,
            signed: false,
            decimals: 3,
            suffix: String::new(),
        }),
    })
}

/// Writes `<dir>/heatmap.{png,svg}` and `<dir>/ranking_<type>.{png,svg}` for one model (PNGs at `scale` pixels per
/// layout pixel); returns the file stems.
pub fn write_model(model: &str, selection: &Selection, dir: &Path, scale: u32) -> Result<Vec<String>> {
    render::ensure_font()?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let grid = Grid::new(model, selection);
    if grid.types.is_empty() {
        return Err(Error::invalid(format!("{model}: no scored weight matrix to plot")));
    }
    let title =
        format!("{model}: SNR of every weight matrix by layer and type (top {}% framed)", selection.top_percent);
    write_heatmap(&grid, &title, dir, "heatmap", scale)?;
    let mut stems = vec!["heatmap".to_string()];
    for t in &grid.types {
        if let Some(chart) = ranking_chart(model, selection, t) {
            render::render(&chart, dir, scale)?;
            stems.push(chart.name);
        }
    }
    Ok(stems)
}

/// Writes `<dir>/<stem>.{png,svg}`: one model's heatmap, the PNG at `scale` pixels per layout pixel.
pub fn write_heatmap(grid: &Grid, title: &str, dir: &Path, stem: &str, scale: u32) -> Result<()> {
    render::ensure_font()?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let (grid, title) = (grid.clone(), title.to_string());
    let (w, h, _, _) = heatmap_size(&grid);
    let png = dir.join(format!("{stem}.png"));
    let failed = |p: &Path, e: Box<dyn StdError>| {
        Error::invalid(format!("{}: drawing the SNR heatmap failed: {e}", p.display()))
    };
    let bytes =
        render::png_bytes((w, h), scale, |root| draw_heatmap(root, &grid, &title)).map_err(|e| failed(&png, e))?;
    crate::files::write_atomic(&png, &bytes)?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        draw_heatmap(&root, &grid, &title).and_then(|_| Ok(root.present()?)).map_err(|e| failed(&png, e))?;
    }
    let svg_path = dir.join(format!("{stem}.svg"));
    crate::files::write_atomic(&svg_path, svg.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_ends_are_viridis_ends() {
        assert_eq!(scale_colour(0.0), RGBColor(68, 1, 84));
        assert_eq!(scale_colour(1.0), RGBColor(253, 231, 37));
        assert_eq!(scale_colour(0.5), RGBColor(33, 145, 140));
    }
}
