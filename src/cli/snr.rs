//! `graft snr MODEL...`: Spectrum's per-matrix SNR, rankings per layer type, top-percent selection, and the files
//! Spectrum, axolotl and `graft merge`/`graft train` read. Several models (or a quoted glob) are scanned one after
//! another; `--resume` makes such a zoo scan restartable, and `--shard K/N` splits it over processes (`crate::shard`;
//! `graft gather` joins the shards' resume files).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::{emit, regex_arg, table, Global};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::exec::Executor;
use crate::shard::canonical;
use crate::snr::formats::{spectrum_json, unfrozen_yaml, SelectionFile, TensorRecord};
use crate::snr::{layer_type, rank_and_select, scan, scan_targets, ScanOptions, Selection, TensorSnr};

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

/// The `--json` / `--jsonl` document of one model.
#[derive(Serialize)]
struct ModelReport<'a> {
    model: &'a str,
    path: String,
    top_percent: f64,
    include_vectors: bool,
    filter: Option<&'a str>,
    types: Vec<String>,
    selected: Vec<String>,
    tensors: Vec<TensorRecord>,
}

pub fn run(args: Args, global: &Global) -> Result<()> {
    if !(0.0..=100.0).contains(&args.top_percent) {
        return Err(Error::usage(format!("--top-percent {} is outside 0..=100", args.top_percent)));
    }
    let filter = args.filter.as_deref().map(|f| regex_arg("--filter", f)).transpose()?;
    let models = crate::shard::expand_globs(&args.models)?;
    // A shard's manifest names every model by its canonical path, the results lines' "path".
    let item = |m: &String| serde_json::Value::String(canonical(m));
    let models =
        crate::shard::select(&models, args.shard.resolve()?, args.resume.as_deref(), "path", item, "snr", "models")?;
    if models.len() > 1 {
        for (flag, v) in [
            ("--spectrum-json", &args.spectrum_json),
            ("--unfrozen-yaml", &args.unfrozen_yaml),
            ("--selection-json", &args.selection_json),
        ] {
            if v.as_deref().is_some_and(|p| !p.contains("{model}")) {
                return Err(Error::usage(format!(
                    "{flag} with {} models needs '{{model}}' in its path (one file per model)",
                    models.len()
                )));
            }
        }
    }
    let mut results = args.resume.as_deref().map(|f| crate::shard::Results::open(f, "path")).transpose()?;
    let exec = Executor::new(global.threads)?;
    let opts = ScanOptions { filter, include_vectors: args.include_vectors, types: args.types.clone() };

    let json = args.jsonl || args.json;
    let mut grids = Vec::new();
    let scanned = super::run_batch(&models, json, "model", "models could not be scanned", String::clone, |model| {
        if results.as_ref().is_some_and(|r| r.contains(&canonical(model))) {
            eprintln!("graft: snr: {model}: already in the resume file, skipped");
            return Ok(());
        }
        scan_model(model, &args, &opts, &exec, &mut grids, results.as_mut())
    });
    // A zoo: every scanned model in one picture, a heatmap row each, on one colour scale.
    if let Some(dir) = &args.plot {
        if grids.len() > 1 {
            let title =
                format!("SNR of every weight matrix, a row per model (top {}% per type framed)", args.top_percent);
            crate::report::snr_plot::write_zoo(&grids, dir, "zoo", &title, args.dpi)?;
        }
    }
    scanned
}

fn scan_model(
    model: &str,
    args: &Args,
    opts: &ScanOptions,
    exec: &Executor,
    grids: &mut Vec<crate::report::snr_plot::Grid>,
    results: Option<&mut crate::shard::Results>,
) -> Result<()> {
    let ck = Checkpoint::open(model)?;
    if let Some(types) = &opts.types {
        let present: Vec<String> = {
            let all = ScanOptions { types: None, ..opts.clone() };
            let mut t: Vec<String> =
                scan_targets(&ck, &all).iter().map(|&i| layer_type(&ck.infos()[i].name).to_string()).collect();
            t.sort();
            t.dedup();
            t
        };
        let missing: Vec<&String> = types.iter().filter(|t| !present.contains(t)).collect();
        if !missing.is_empty() {
            let mut known = present.clone();
            crate::snr::sort_types(&mut known);
            return Err(Error::usage(format!(
                "{model}: no layer type {} (types: {})",
                missing.iter().map(|t| format!("'{t}'")).collect::<Vec<_>>().join(", "),
                known.join(", ")
            )));
        }
    }
    let started = Instant::now();
    let scans = scan(&ck, exec, opts)?;
    let seconds = started.elapsed().as_secs_f64();
    let selection = rank_and_select(&scans, args.top_percent, opts.types.as_deref());
    let scored = scans.iter().filter(|t| t.result.score().is_some()).count();
    eprintln!("graft: snr: {model}: {scored} of {} tensors scored in {seconds:.2} s", scans.len());

    let slug = model_slug(model);
    let path_for = |p: &str| PathBuf::from(p.replace("{model}", &slug));
    if let Some(p) = &args.spectrum_json {
        write_atomic(&path_for(p), &spectrum_json(&selection))?;
    }
    if let Some(p) = &args.unfrozen_yaml {
        write_atomic(&path_for(p), &unfrozen_yaml(&selection, ck.names()))?;
    }
    if let Some(p) = &args.selection_json {
        write_atomic(&path_for(p), &SelectionFile::new(model, &selection).to_json())?;
    }
    if let Some(dir) = &args.plot {
        let dir = if args.models.len() > 1 || args.models.iter().any(|m| m.contains('*')) {
            dir.join(&slug)
        } else {
            dir.clone()
        };
        // Titles name the model by its file or directory name, not its whole path.
        let trimmed = model.trim_end_matches('/');
        let name = Path::new(trimmed).file_name().map(|n| n.to_string_lossy().to_string());
        let name = name.as_deref().unwrap_or(trimmed);
        crate::report::snr_plot::write_model(name, &selection, &dir, args.dpi)?;
        grids.push(crate::report::snr_plot::Grid::new(name, &selection));
    }

    let needs_doc = args.json || args.jsonl || args.resume.is_some();
    if needs_doc {
        let doc = report(model, args, &scans, &selection);
        let line = serde_json::to_string(&doc).expect("plain structs") + "\n";
        if let Some(r) = results {
            r.append(&doc.path, &line)?;
        }
        if args.json {
            emit(&(serde_json::to_string_pretty(&doc).expect("plain structs") + "\n"))?;
        } else if args.jsonl {
            emit(&line)?;
        }
    }
    if !args.json && !args.jsonl {
        emit(&render(model, &scans, &selection))?;
    }
    Ok(())
}

fn report<'a>(model: &'a str, args: &'a Args, scans: &[TensorSnr], selection: &Selection) -> ModelReport<'a> {
    let mut rank = vec![None; scans.len()];
    let mut selected = vec![false; scans.len()];
    for t in &selection.types {
        for r in &t.ranked {
            rank[r.index] = Some(r.rank);
            selected[r.index] = r.selected;
        }
    }
    ModelReport {
        model,
        path: canonical(model),
        top_percent: args.top_percent,
        include_vectors: args.include_vectors,
        filter: args.filter.as_deref(),
        types: selection.types.iter().map(|t| t.layer_type.clone()).collect(),
        selected: selection.selected_names(),
        tensors: scans
            .iter()
            .enumerate()
            .map(|(i, t)| TensorRecord { tensor: t.clone(), rank: rank[i], selected: selected[i] })
            .collect(),
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

/// Spectrum's file-name slug of a model: `/` and `_` become `-`.
fn model_slug(model: &str) -> String {
    let trimmed = model.trim_end_matches('/');
    let s = trimmed.replace(['/', '_', '\\'], "-");
    s.trim_start_matches(['.', '-']).to_string()
}

/// Writes a whole file through a temporary sibling and a rename, so readers never see half of it.
fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| Error::usage(format!("{} is not a file path", path.display())))?;
    let tmp = dir.join(format!(".{}.graft-tmp", name.to_string_lossy()));
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}
