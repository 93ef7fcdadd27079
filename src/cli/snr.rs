//! `graft snr MODEL...`: Spectrum's per-matrix SNR, rankings per layer type, top-percent selection, and the files
//! Spectrum, axolotl and `graft merge`/`graft train` read. Several models (or a quoted glob) are scanned one after
//! another; `--resume` makes such a zoo scan restartable, and `--shard K/N` splits it over processes (`graft gather`
//! joins the shards' resume files). The scan itself, zoo and files included, is `snr::zoo::run`; this file maps the
//! flags to its request and prints (tables or JSON) and draws (`--plot`) what it reports.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::{emit, table, Global};
use crate::error::{Error, Result};
use crate::exec::Executor;
use crate::report::snr_plot::{self, Grid};
use crate::snr::zoo::{self, ModelScan, Outputs, Request};
use crate::snr::{Selection, TensorSnr};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Checkpoints (files, index files or directories); a quoted glob (`'zoo/*'`) is expanded by graft.
    #[arg(required = true)]
    models: Vec<String>,
    /// Only tensors whose name matches this regular expression.
    #[arg(long)]
    filter: Option<String>,
    /// Score 1-D tensors too (each scores exactly 1.0); by default they are listed as skipped.
    #[arg(long)]
    include_vectors: bool,
    /// Select floor(len * P / 100) tensors per layer type, highest SNR first (Spectrum's rule).
    #[arg(long, default_value_t = 50.0)]
    top_percent: f64,
    /// Only these layer types (comma-separated, e.g. `self_attn.q_proj,mlp.down_proj`).
    #[arg(long, value_delimiter = ',')]
    types: Option<Vec<String>>,
    /// Print one pretty JSON document per model instead of tables.
    #[arg(long, conflicts_with = "jsonl")]
    json: bool,
    /// Print one JSON document per model, one per line (for model zoos).
    #[arg(long)]
    jsonl: bool,
    /// Write Spectrum's `{module: {"snr": x, "type": t}}` JSON here (`{model}` in the path: one file per model).
    #[arg(long, value_name = "FILE")]
    spectrum_json: Option<String>,
    /// Write axolotl's `unfrozen_parameters:` YAML as Spectrum writes it (`{model}` as above).
    #[arg(long, value_name = "FILE")]
    unfrozen_yaml: Option<String>,
    /// Write the selected tensor names for `graft merge --snr-select` / `graft train --freeze` (`{model}` as above).
    #[arg(long, value_name = "FILE")]
    selection_json: Option<String>,
    /// Draw each model's SNR heatmap (layers x types, the selection framed) and per-type rankings into DIR, as PNG
    /// and SVG (`DIR/<model>/` when several models are scanned, and `DIR/zoo.png`: a heatmap row per model).
    #[arg(long, value_name = "DIR")]
    plot: Option<PathBuf>,
    /// With --plot: PNG resolution as a multiple of the layout size, 1, 2 (default) or 3; SVGs are unaffected.
    #[arg(long, value_name = "N", default_value_t = crate::report::render::PRINT_SCALE,
          value_parser = crate::report::render::parse_scale, requires = "plot")]
    dpi: u32,
    /// Append each model's JSON line to FILE and skip models already recorded there (restartable zoo scans).
    #[arg(long, value_name = "FILE")]
    resume: Option<PathBuf>,
    #[command(flatten)]
    shard: crate::shard::ShardArgs,
}

impl Args {
    fn request(&self) -> Request {
        Request {
            models: self.models.clone(),
            filter: self.filter.clone(),
            include_vectors: self.include_vectors,
            top_percent: self.top_percent,
            types: self.types.clone(),
            outputs: Outputs {
                spectrum_json: self.spectrum_json.clone(),
                unfrozen_yaml: self.unfrozen_yaml.clone(),
                selection_json: self.selection_json.clone(),
            },
            resume: self.resume.clone(),
            shard: self.shard.clone(),
        }
    }
}

pub fn run(args: Args, global: &Global) -> Result<()> {
    let request = args.request();
    request.validate()?;
    let exec = Executor::new(global.threads)?;
    let mut printer = Printer { args: &args, grids: Vec::new() };
    let scanned = zoo::run(&request, &exec, &mut printer);
    // A zoo: every scanned model in one picture, a heatmap row each, on one colour scale.
    if let Some(dir) = &args.plot {
        if printer.grids.len() > 1 {
            let title =
                format!("SNR of every weight matrix, a row per model (top {}% per type framed)", args.top_percent);
            snr_plot::write_zoo(&printer.grids, dir, "zoo", &title, args.dpi)?;
        }
    }
    scanned
}

/// What the command line makes of each model: a progress line, its pictures, its table or JSON document.
struct Printer<'a> {
    args: &'a Args,
    grids: Vec<Grid>,
}

impl zoo::Sink for Printer<'_> {
    fn skipped(&mut self, model: &str) {
        eprintln!("graft: snr: {model}: already in the resume file, skipped");
    }

    fn scanned(&mut self, s: &ModelScan) {
        eprintln!("graft: snr: {}: {} of {} tensors scored in {:.2} s", s.model, s.scored(), s.scans.len(), s.seconds);
    }

    fn written(&mut self, s: &ModelScan) -> Result<()> {
        let Some(dir) = &self.args.plot else { return Ok(()) };
        let args = self.args;
        let dir = if args.models.len() > 1 || args.models.iter().any(|m| m.contains('*')) {
            dir.join(&s.slug)
        } else {
            dir.clone()
        };
        // Titles name the model by its file or directory name, not its whole path.
        let trimmed = s.model.trim_end_matches('/');
        let name = Path::new(trimmed).file_name().map(|n| n.to_string_lossy().to_string());
        let name = name.as_deref().unwrap_or(trimmed);
        snr_plot::write_model(name, &s.selection, &dir, args.dpi)?;
        self.grids.push(Grid::new(name, &s.selection));
        Ok(())
    }

    fn finished(&mut self, s: &ModelScan) -> Result<()> {
        if self.args.json {
            emit(&(serde_json::to_string_pretty(&s.document()).expect("plain structs") + "\n"))
        } else if self.args.jsonl {
            emit(&s.document_line())
        } else {
            emit(&render(s.model, &s.scans, &s.selection))
        }
    }

    fn failed(&mut self, model: &str, e: &Error) -> Result<()> {
        if self.args.json || self.args.jsonl {
            emit(&(serde_json::json!({ "model": model, "error": e.to_string() }).to_string() + "\n"))?;
        }
        eprintln!("graft: error: {}", crate::error::bounded(&e.to_string()));
        Ok(())
    }
}

fn fmt_num(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else if x.is_infinite() {
        "inf".into()
    } else {
        format!("{x:.6}")
    }
}

fn render(model: &str, scans: &[TensorSnr], selection: &Selection) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{model}: top {}% per layer type", selection.top_percent);
    for t in &selection.types {
        if t.ranked.is_empty() {
            continue;
        }
        let _ = writeln!(s, "\n{}: {} scored, {} selected", t.layer_type, t.ranked.len(), t.n_selected);
        let mut tab = table(&["rank", "module", "shape", "snr", "s_max", "sigma", "threshold", "n_signal", "sel"]);
        for r in &t.ranked {
            let x = &scans[r.index];
            tab.add_row(vec![
                r.rank.to_string(),
                r.module.clone(),
                format!("{:?}", x.shape),
                fmt_num(x.result.snr),
                fmt_num(x.result.s_max),
                fmt_num(x.result.sigma),
                fmt_num(x.result.threshold),
                x.result.n_signal.to_string(),
                if r.selected { "*".into() } else { String::new() },
            ]);
        }
        let _ = writeln!(s, "{tab}");
        if !t.unscored.is_empty() {
            let _ = writeln!(s, "not scored: {}", t.unscored.join(", "));
        }
    }
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for x in scans.iter().filter(|x| x.result.score().is_none()) {
        *counts.entry(x.result.status.as_str()).or_default() += 1;
    }
    if !counts.is_empty() {
        let by: Vec<String> = counts.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        let _ = writeln!(s, "\nnot scored: {} tensors ({})", counts.values().sum::<usize>(), by.join(", "));
    }
    let selected = selection.selected().count();
    let ranked = selection.types.iter().filter(|t| !t.ranked.is_empty()).count();
    let _ = writeln!(s, "\nselected: {selected} tensors from {ranked} ranked layer types");
    s
}
