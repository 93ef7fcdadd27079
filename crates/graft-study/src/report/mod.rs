//! `graft report`: results lines -> tables with bootstrap statistics, charts and a static HTML page.
//!
//! `results` reads and validates the JSONL files, `summary` groups lines into experiments and runs and computes the
//! estimates (`bootstrap`), `format` is the vocabulary of metrics and cells and how they print, `table` prints them
//! (markdown, CSV), `plots` decides the charts, `render` draws them (PNG + SVG), `html` makes the page. This module
//! writes the report directory, all at once: everything is built in a sibling staging directory first and moved into
//! place at the end, so a failure never leaves a half report. `snr_plot` draws `graft snr --plot`'s pictures with
//! the same renderer, and the SNR scans a study keeps next to its results file onto the page.

pub mod bootstrap;
pub(crate) mod format;
pub(crate) mod html;
pub(crate) mod plots;
pub mod render;
pub(crate) mod results;
pub mod snr_plot;
pub(crate) mod summary;
pub(crate) mod table;

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Arg, Error, Result};
use plots::{Chart, Section};
use summary::Summary;

/// The marker `summary.json` carries, by which a later run recognises a report directory it may replace.
pub const GENERATOR: &str = "graft report";

#[derive(Clone, Debug)]
pub struct Options {
    pub seed: u64,
    pub resamples: usize,
    /// PNG pixels per layout (SVG) pixel: 1, 2 or 3 (`--dpi`).
    pub png_scale: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options { seed: 0, resamples: bootstrap::DEFAULT_RESAMPLES, png_scale: render::PRINT_SCALE }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct PlotFiles {
    pub name: String,
    pub title: String,
    /// What the chart shows, as the page prints it under the chart.
    pub caption: String,
    pub section: Section,
    pub png: String,
    pub svg: String,
    /// Legend texts in order.
    pub legend: Vec<String>,
    /// Efficiency scatters: per panel (cost), the experiments on the Pareto front by increasing cost.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pareto_front: Vec<plots::Front>,
}

/// `summary.json`: the summary with everything needed to find the files (paths relative to the report directory).
#[derive(Serialize)]
pub struct Document<'a> {
    pub generator: &'static str,
    pub version: &'static str,
    pub inputs: &'a [String],
    #[serde(flatten)]
    pub summary: &'a Summary,
    pub plots: &'a [PlotFiles],
    pub files: &'a [String],
}

/// A written report.
pub struct Report {
    pub dir: PathBuf,
    pub summary: Summary,
    pub markdown: String,
    pub plots: Vec<PlotFiles>,
    /// Files written, relative to `dir`.
    pub files: Vec<String>,
    pub inputs: Vec<String>,
    /// (replaced line, replacing line) as `FILE:LINE`.
    pub superseded: Vec<(String, String)>,
}

impl Report {
    pub fn document(&self) -> Document<'_> {
        Document {
            generator: GENERATOR,
            version: env!("CARGO_PKG_VERSION"),
            inputs: &self.inputs,
            summary: &self.summary,
            plots: &self.plots,
            files: &self.files,
        }
    }
}

/// Reads `inputs`, computes the summary and writes the report directory `out`.
pub fn generate(inputs: &[PathBuf], out: &Path, options: &Options) -> Result<Report> {
    if options.resamples < 2 {
        return Err(Error::usage(format!("{} must be at least 2", Arg::Resamples)));
    }
    if !render::SCALES.contains(&options.png_scale) {
        return Err(Error::usage(format!("{} {} is not 1, 2 or 3", Arg::Dpi, options.png_scale)));
    }
    check_output(out)?;
    let set = results::read_files(inputs)?;
    let summary = summary::summarize(&set, options.seed, options.resamples);
    let charts = plots::plan(&summary);
    let scans = snr_plot::study_scans(inputs);
    let markdown = table::markdown(&summary);
    let inputs: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
    let superseded = set.superseded.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    let mut report =
        Report { dir: out.to_path_buf(), summary, markdown, plots: Vec::new(), files: Vec::new(), inputs, superseded };

    let staging = sibling(out, "graft-tmp")?;
    let written = write_all(&staging, &mut report, &charts, &scans, options.png_scale);
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    swap_into_place(&staging, out)?;
    Ok(report)
}

/// A figure of the page that is not a planned chart (the SNR pictures): file stem, title, caption.
pub struct Figure {
    pub name: String,
    pub title: String,
    pub caption: String,
}

/// The SNR pictures of a study with scans: one heatmap for one scan, the zoo heatmap (a row per scan) for several.
fn snr_figures(scans: &[(snr_plot::Grid, f64, PathBuf)], plots_dir: &Path, scale: u32) -> Result<Vec<Figure>> {
    let Some((first, top, _)) = scans.first() else { return Ok(Vec::new()) };
    let grids: Vec<snr_plot::Grid> = scans.iter().map(|s| s.0.clone()).collect();
    let files: Vec<String> = scans.iter().map(|s| s.2.display().to_string()).collect();
    let same_top = scans.iter().all(|s| s.1 == *top);
    let framed = if same_top { format!("top {top}% per type framed") } else { "each scan's selection framed".into() };
    let (title, caption) = if grids.len() == 1 {
        snr_plot::write_heatmap(
            first,
            &format!("{}: SNR by layer and type ({framed})", first.model),
            plots_dir,
            "snr_heatmap",
            scale,
        )?;
        (
            format!("SNR of every weight matrix of {}", first.model),
            format!("Signal-to-noise ratio of every weight matrix (rows: layers, columns: layer types; log colour scale, yellow = most signal), the matrices Spectrum's rule selects ({framed}). From {}.", files.join(", ")),
        )
    } else {
        snr_plot::write_zoo(
            &grids,
            plots_dir,
            "snr_heatmap",
            &format!("SNR of every weight matrix, a row per model ({framed})"),
            scale,
        )?;
        (
            format!("SNR of every weight matrix of the study's {} scanned models", grids.len()),
            format!("A row per scanned model, a cell per weight matrix (by layer type and layer), on one log colour scale so rows compare (yellow = most signal); framed: the matrices Spectrum's rule selects ({framed}). From {}.", files.join(", ")),
        )
    };
    Ok(vec![Figure { name: "snr_heatmap".into(), title, caption }])
}

fn write_all(
    dir: &Path,
    report: &mut Report,
    charts: &[Chart],
    scans: &[(snr_plot::Grid, f64, PathBuf)],
    scale: u32,
) -> Result<()> {
    let plots_dir = dir.join("plots");
    std::fs::create_dir_all(&plots_dir).map_err(|e| Error::io(&plots_dir, e))?;
    let figures = snr_figures(scans, &plots_dir, scale)?;
    for f in &figures {
        report.plots.push(PlotFiles {
            name: f.name.clone(),
            title: f.title.clone(),
            caption: f.caption.clone(),
            section: Section::Snr,
            png: format!("plots/{}.png", f.name),
            svg: format!("plots/{}.svg", f.name),
            legend: Vec::new(),
            pareto_front: Vec::new(),
        });
    }
    for chart in charts {
        render::render(chart, &plots_dir, scale)?;
        report.plots.push(PlotFiles {
            name: chart.name.clone(),
            title: chart.title.clone(),
            caption: chart.caption.clone(),
            section: chart.section,
            png: format!("plots/{}.png", chart.name),
            svg: format!("plots/{}.svg", chart.name),
            legend: render::legend_labels(chart),
            pareto_front: plots::fronts(chart),
        });
    }
    let mut files: Vec<(String, String)> = Vec::new();
    let mut md = format!("# graft report\n\nInputs: {}\n\n{}", report.inputs.join(", "), report.markdown);
    if !charts.is_empty() {
        md.push_str("\n## Charts\n\n");
        for c in charts {
            md.push_str(&format!("![{}](plots/{}.png)\n\n{}\n\n", c.title, c.name, c.caption));
        }
    }
    for f in &figures {
        md.push_str(&format!("![{}](plots/{}.png)\n\n{}\n\n", f.title, f.name, f.caption));
    }
    files.push(("report.md".into(), md));
    files.push(("summary.csv".into(), table::csv(&report.summary)));
    if report.summary.curves.iter().any(|c| c.barrier.is_some()) {
        files.push(("barriers.csv".into(), table::barriers_csv(&report.summary.curves)));
    }
    files.push(("index.html".into(), html::page(&report.summary, charts, &figures, &report.inputs)));
    let mut names: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
    names.push("summary.json".into());
    for p in &report.plots {
        names.push(p.png.clone());
        names.push(p.svg.clone());
    }
    report.files = names;
    let json = serde_json::to_string_pretty(&report.document()).map_err(|e| Error::invalid(e.to_string()))? + "\n";
    files.push(("summary.json".into(), json));
    for (name, text) in files {
        let path = dir.join(&name);
        crate::files::write_atomic(&path, text.as_bytes())?;
    }
    Ok(())
}

/// The output may be new, an empty directory, or an earlier graft report (replaced whole); anything else is refused
/// rather than mixed with or deleted.
fn check_output(out: &Path) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        return Err(Error::usage(format!(
            "{}: exists and is not a directory; -o takes a report directory",
            out.display()
        )));
    }
    let mut entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
    if entries.next().is_none() || is_report_dir(out) {
        return Ok(());
    }
    Err(Error::usage(format!(
        "{}: directory exists and is not a graft report (no summary.json from graft report); choose a new -o",
        out.display()
    )))
}

fn is_report_dir(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("summary.json")) else { return false };
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("generator").and_then(|g| g.as_str()).map(|g| g == GENERATOR))
        .unwrap_or(false)
}

/// A fresh path next to `out` (same filesystem, so renames are atomic).
fn sibling(out: &Path, tag: &str) -> Result<PathBuf> {
    let name = out
        .file_name()
        .ok_or_else(|| Error::usage(format!("{}: not a usable report directory name", out.display())))?
        .to_string_lossy()
        .to_string();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let mut i = 0u32;
    loop {
        let p = parent.join(format!(".{name}.{tag}-{}-{i}", std::process::id()));
        if !p.exists() {
            return Ok(p);
        }
        i += 1;
    }
}

fn swap_into_place(staging: &Path, out: &Path) -> Result<()> {
    let old = if out.exists() {
        let old = sibling(out, "graft-old")?;
        std::fs::rename(out, &old).map_err(|e| Error::io(out, e))?;
        Some(old)
    } else {
        None
    };
    if let Err(e) = std::fs::rename(staging, out) {
        if let Some(old) = &old {
            let _ = std::fs::rename(old, out);
        }
        let _ = std::fs::remove_dir_all(staging);
        return Err(Error::io(out, e));
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    Ok(())
}
