//! `graft snr --plot DIR`: pictures of one model's SNR scan. A heatmap of every scored weight matrix by layer (rows)
//! and layer type (columns), coloured by log10 SNR on a colour-blind-safe sequential scale, the `--top-percent`
//! selection framed; and a ranking chart per type (bars in rank order, the selected ones coloured), drawn by the
//! report's bar renderer. PNG and SVG, with the report's embedded font.

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
    let logs = grid.cells.iter().flatten().flatten().map(|c| c.0).filter(|v| v.is_finite() && *v > 0.0).map(f64::log10);
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

fn heatmap_size(grid: &Grid) -> (u32, u32, u32, u32) {
    let col_w = grid
        .types
        .iter()
        .flat_map(|t| {
            let (a, b) = type_lines(t);
            [render::text_width(a, 12), render::text_width(b, 12)]
        })
        .max()
        .unwrap_or(60)
        .max(60)
        + 16;
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
    let ly = (h - LEGEND_H + 24) as i32;
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
    let _ = w;
    Ok(())
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

/// Writes `<dir>/heatmap.{png,svg}` and `<dir>/ranking_<type>.{png,svg}` for one model; returns the file stems.
pub fn write_model(model: &str, selection: &Selection, dir: &Path) -> Result<Vec<String>> {
    render::ensure_font()?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let grid = Grid::new(model, selection);
    if grid.types.is_empty() {
        return Err(Error::invalid(format!("{model}: no scored weight matrix to plot")));
    }
    let title =
        format!("{model}: SNR of every weight matrix by layer and type (top {}% framed)", selection.top_percent);
    let (w, h, _, _) = heatmap_size(&grid);
    let png = dir.join("heatmap.png");
    let failed = |p: &Path, e: Box<dyn StdError>| {
        Error::invalid(format!("{}: drawing the SNR heatmap failed: {e}", p.display()))
    };
    {
        let root = BitMapBackend::new(&png, (w, h)).into_drawing_area();
        draw_heatmap(&root, &grid, &title).and_then(|_| Ok(root.present()?)).map_err(|e| failed(&png, e))?;
    }
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        draw_heatmap(&root, &grid, &title).and_then(|_| Ok(root.present()?)).map_err(|e| failed(&png, e))?;
    }
    let svg_path = dir.join("heatmap.svg");
    std::fs::write(&svg_path, svg).map_err(|e| Error::io(&svg_path, e))?;
    let mut stems = vec!["heatmap".to_string()];
    for t in &grid.types {
        if let Some(chart) = ranking_chart(model, selection, t) {
            render::render(&chart, dir)?;
            stems.push(chart.name);
        }
    }
    Ok(stems)
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
