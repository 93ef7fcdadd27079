//! A scan of one model or a zoo of them as a typed request (`Request`), and the library's single entry point that
//! carries it out (`run`): expand quoted globs, take this process's shard of the sorted list, skip the models the
//! results file already records, and for each model check its `types`, scan, rank and select, write the Spectrum
//! JSON / axolotl YAML / selection files atomically (one per model through `{model}` path templates) and append the
//! model's JSON document to the results file. One failing model does not stop the others (`shard::run_batch`).
//!
//! Everything that can be checked without reading a file is checked first (`Request::validate`). The library prints
//! nothing: progress, tables, JSON documents, failures and pictures (the report layer is above this crate) go to the
//! caller's `Sink`, at fixed points of each model's work.

use std::cell::RefCell;
use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use super::formats::{spectrum_json, unfrozen_yaml, SelectionFile, TensorRecord};
use super::{layer_type, rank_and_select, scan, scan_targets, sort_types, ScanOptions, Selection, TensorSnr};
use crate::checkpoint::Checkpoint;
use crate::error::{parse_regex, Arg, Error, Result};
use crate::exec::Executor;
use crate::files::write_atomic;
use crate::shard::{self, canonical, ShardArgs};

/// The placeholder a per-model output path carries when several models are scanned.
pub const MODEL_PLACEHOLDER: &str = "{model}";

/// Files written for each model; a path may hold `{model}`, replaced by the model's slug (`formats::model_slug`).
#[derive(Clone, Debug, Default)]
pub struct Outputs {
    /// Spectrum's `{module: {"snr": x, "type": t}}` JSON.
    pub spectrum_json: Option<String>,
    /// axolotl's `unfrozen_parameters:` YAML, as Spectrum writes it.
    pub unfrozen_yaml: Option<String>,
    /// graft's selection file (`merge --snr-select`, `train --freeze`).
    pub selection_json: Option<String>,
}

impl Outputs {
    fn templates(&self) -> [(Arg, Option<&str>); 3] {
        [
            (Arg::SpectrumJson, self.spectrum_json.as_deref()),
            (Arg::UnfrozenYaml, self.unfrozen_yaml.as_deref()),
            (Arg::SelectionJson, self.selection_json.as_deref()),
        ]
    }

    /// Several models need a path per model: each given output must hold `{model}`.
    fn check_per_model(&self, models: usize) -> Result<()> {
        for (arg, path) in self.templates() {
            if path.is_some_and(|p| !p.contains(MODEL_PLACEHOLDER)) {
                return Err(Error::usage(format!(
                    "{arg} with {models} models needs '{MODEL_PLACEHOLDER}' in its path (one file per model)"
                )));
            }
        }
        Ok(())
    }
}

/// One scan of a model or a zoo.
#[derive(Clone, Debug)]
pub struct Request {
    /// Checkpoints (files, index files or directories); quoted globs are expanded (`shard::expand_globs`).
    pub models: Vec<String>,
    /// Only tensors whose name matches this regular expression.
    pub filter: Option<String>,
    /// Score 1-D tensors too.
    pub include_vectors: bool,
    /// Select floor(len * P / 100) tensors per layer type (0..=100).
    pub top_percent: f64,
    /// Only these layer types; each must exist in every model scanned.
    pub types: Option<Vec<String>>,
    pub outputs: Outputs,
    /// The results file: each model's JSON line is appended, and models already there are skipped.
    pub resume: Option<PathBuf>,
    /// This process's shard of the sorted model list (none given: every model).
    pub shard: ShardArgs,
}

/// One scanned model, as the sink sees it.
pub struct ModelScan<'a> {
    pub request: &'a Request,
    /// The model as given (after glob expansion).
    pub model: &'a str,
    /// Its file-name slug (what `{model}` becomes).
    pub slug: String,
    pub scans: Vec<TensorSnr>,
    pub selection: Selection,
    /// Wall-clock seconds of the scan itself.
    pub seconds: f64,
}

/// The JSON document of one model (`--json`, `--jsonl` and the results file's line).
#[derive(Serialize)]
pub struct ModelDocument<'a> {
    pub model: &'a str,
    pub path: String,
    pub top_percent: f64,
    pub include_vectors: bool,
    pub filter: Option<&'a str>,
    pub types: Vec<String>,
    pub selected: Vec<String>,
    pub tensors: Vec<TensorRecord>,
}

impl ModelScan<'_> {
    /// How many tensors have a score.
    pub fn scored(&self) -> usize {
        self.scans.iter().filter(|t| t.result.score().is_some()).count()
    }

    pub fn document(&self) -> ModelDocument<'_> {
        let mut rank = vec![None; self.scans.len()];
        let mut selected = vec![false; self.scans.len()];
        for t in &self.selection.types {
            for r in &t.ranked {
                rank[r.index] = Some(r.rank);
                selected[r.index] = r.selected;
            }
        }
        ModelDocument {
            model: self.model,
            path: canonical(self.model),
            top_percent: self.request.top_percent,
            include_vectors: self.request.include_vectors,
            filter: self.request.filter.as_deref(),
            types: self.selection.types.iter().map(|t| t.layer_type.clone()).collect(),
            selected: self.selection.selected_names(),
            tensors: (self.scans.iter().enumerate())
                .map(|(i, t)| TensorRecord { tensor: t.clone(), rank: rank[i], selected: selected[i] })
                .collect(),
        }
    }

    /// The document as one JSON line (ending in a newline), as the results file records it.
    pub fn document_line(&self) -> String {
        serde_json::to_string(&self.document()).expect("plain structs") + "\n"
    }
}

/// Where `run` reports, in this order for each model: `skipped` (already recorded; nothing else follows), or
/// `scanned` (scored and ranked, before any file is written), `written` (its files written, before its line is
/// recorded: the place for the caller's own files), `finished` (its line recorded); `failed` for a model whose work
/// failed when several are scanned (a single model's error is `run`'s).
pub trait Sink {
    fn skipped(&mut self, _model: &str) {}
    fn scanned(&mut self, _scan: &ModelScan) {}
    fn written(&mut self, _scan: &ModelScan) -> Result<()> {
        Ok(())
    }
    fn finished(&mut self, _scan: &ModelScan) -> Result<()> {
        Ok(())
    }
    fn failed(&mut self, model: &str, error: &Error) -> Result<()>;
}

impl Request {
    /// The checks that need no file: the top percent, the filter, the shard and the output templates where the
    /// arguments alone show that several models are scanned.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=100.0).contains(&self.top_percent) {
            return Err(Error::usage(format!("{} {} is outside 0..=100", Arg::TopPercent, self.top_percent)));
        }
        self.filter.as_deref().map(|f| parse_regex(Arg::Filter, f)).transpose()?;
        let shard = self.shard.resolve()?;
        // Every argument names at least one model (a glob that matches nothing is an error), and the shard of a
        // list without globs is known here; a glob's count is checked once it is expanded.
        let at_least = match shard {
            None => self.models.len(),
            Some(_) if self.models.iter().any(|m| m.contains(['*', '?', '['])) => 1,
            Some(s) => shard::partition(&self.models, s).len(),
        };
        if at_least > 1 {
            self.outputs.check_per_model(at_least)?;
        }
        Ok(())
    }

    fn scan_options(&self) -> Result<ScanOptions> {
        Ok(ScanOptions {
            filter: self.filter.as_deref().map(|f| parse_regex(Arg::Filter, f)).transpose()?,
            include_vectors: self.include_vectors,
            types: self.types.clone(),
        })
    }
}

/// Carries out one scan (see the module header).
pub fn run(request: &Request, exec: &Executor, sink: &mut dyn Sink) -> Result<()> {
    request.validate()?;
    let opts = request.scan_options()?;
    let models = shard::expand_globs(&request.models)?;
    // A shard's manifest names every model by its canonical path, the results lines' "path".
    let item = |m: &String| serde_json::Value::String(canonical(m));
    let resume = request.resume.as_deref();
    let models = shard::select(&models, request.shard.resolve()?, resume, "path", item, "snr", "models")?;
    if models.len() > 1 {
        request.outputs.check_per_model(models.len())?;
    }
    let mut results = resume.map(|f| shard::Results::open(f, "path")).transpose()?;
    // The batch's work and its failure report both talk to the sink, never at the same time.
    let sink = RefCell::new(sink);
    shard::run_batch(
        &models,
        "models could not be scanned",
        |model| {
            if results.as_ref().is_some_and(|r| r.contains(&canonical(model))) {
                sink.borrow_mut().skipped(model);
                return Ok(());
            }
            scan_model(request, model, &opts, exec, &mut **sink.borrow_mut(), results.as_mut())
        },
        |model, e| sink.borrow_mut().failed(model, e),
    )
}

/// The layer types a scan with `opts` but any `types` would rank, in Spectrum's order.
fn present_types(ck: &Checkpoint, opts: &ScanOptions) -> Vec<String> {
    let all = ScanOptions { types: None, ..opts.clone() };
    let mut types: Vec<String> =
        scan_targets(ck, &all).iter().map(|&i| layer_type(&ck.infos()[i].name).to_string()).collect();
    types.sort();
    types.dedup();
    types
}

fn scan_model(
    request: &Request,
    model: &str,
    opts: &ScanOptions,
    exec: &Executor,
    sink: &mut dyn Sink,
    results: Option<&mut shard::Results>,
) -> Result<()> {
    let ck = Checkpoint::open(model)?;
    if let Some(types) = &opts.types {
        let present = present_types(&ck, opts);
        let missing: Vec<&String> = types.iter().filter(|t| !present.contains(t)).collect();
        if !missing.is_empty() {
            let mut known = present.clone();
            sort_types(&mut known);
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
    let selection = rank_and_select(&scans, request.top_percent, opts.types.as_deref());
    let slug = super::formats::model_slug(model);
    let done = ModelScan { request, model, slug, scans, selection, seconds };
    sink.scanned(&done);

    let path_for = |p: &str| PathBuf::from(p.replace(MODEL_PLACEHOLDER, &done.slug));
    let outputs = &request.outputs;
    if let Some(p) = &outputs.spectrum_json {
        write_file(&path_for(p), &spectrum_json(&done.selection))?;
    }
    if let Some(p) = &outputs.unfrozen_yaml {
        write_file(&path_for(p), &unfrozen_yaml(&done.selection, ck.names()))?;
    }
    if let Some(p) = &outputs.selection_json {
        write_file(&path_for(p), &SelectionFile::new(model, &done.selection).to_json())?;
    }
    sink.written(&done)?;
    if let Some(r) = results {
        r.append(&canonical(model), &done.document_line())?;
    }
    sink.finished(&done)
}

fn write_file(path: &std::path::Path, text: &str) -> Result<()> {
    if path.file_name().is_none() {
        return Err(Error::usage(format!("{} is not a file path", path.display())));
    }
    write_atomic(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request over paths that do not exist: a validation error proves it was refused before any file was read.
    fn request(models: &[&str]) -> Request {
        Request {
            models: models.iter().map(|m| format!("/nonexistent/graft-zoo/{m}")).collect(),
            filter: None,
            include_vectors: false,
            top_percent: 50.0,
            types: None,
            outputs: Outputs::default(),
            resume: Some(PathBuf::from("/nonexistent/graft-zoo/results.jsonl")),
            shard: ShardArgs::default(),
        }
    }

    fn refusal(r: &Request) -> String {
        let e = r.validate().unwrap_err();
        assert!(matches!(e, Error::Usage(_)), "a usage error, not an I/O one: {e}");
        e.to_string()
    }

    #[test]
    fn validation_opens_no_file_and_passes_a_plain_request() {
        request(&["a", "b"]).validate().unwrap();
        let mut one = request(&["a"]);
        one.outputs.spectrum_json = Some("/nonexistent/out.json".into());
        one.validate().unwrap();
        // The first check that needs a file is the model itself: run gets that far and no further.
        struct Never;
        impl Sink for Never {
            fn failed(&mut self, model: &str, error: &Error) -> Result<()> {
                panic!("{model}: {error}")
            }
        }
        let exec = Executor::new(Some(1)).unwrap();
        let e = run(&one, &exec, &mut Never).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/graft-zoo/a"), "{e}");
    }

    #[test]
    fn top_percent_outside_0_to_100_is_refused() {
        for bad in [-0.5, 100.5, f64::NAN] {
            let mut r = request(&["a"]);
            r.top_percent = bad;
            assert!(refusal(&r).contains(&format!("top_percent {bad} is outside 0..=100")));
        }
        for good in [0.0, 100.0] {
            let mut r = request(&["a"]);
            r.top_percent = good;
            r.validate().unwrap();
        }
    }

    #[test]
    fn a_filter_that_is_not_a_regular_expression_is_refused() {
        let mut r = request(&["a"]);
        r.filter = Some("layers.(".into());
        assert!(refusal(&r).contains("filter 'layers.(' is not a valid regular expression"));
        r.filter = Some("layers\\.0\\.".into());
        r.validate().unwrap();
    }

    #[test]
    fn a_bad_shard_spec_is_refused() {
        for spec in ["3/3", "a/2", "1", "0/0"] {
            let mut r = request(&["a", "b"]);
            r.shard.shard = Some(spec.into());
            let e = refusal(&r);
            assert!(e.starts_with("shard"), "{spec}: {e}");
        }
        let mut r = request(&["a", "b"]);
        (r.shard.shard, r.shard.shard_count) = (Some("0/2".into()), Some("2".into()));
        assert!(refusal(&r).contains("shard_count goes with shard auto"));
    }

    #[test]
    fn several_models_need_model_in_every_output_path() {
        for arg in 0..3 {
            let mut r = request(&["a", "b"]);
            let slot = [&mut r.outputs.spectrum_json, &mut r.outputs.unfrozen_yaml, &mut r.outputs.selection_json];
            *slot.into_iter().nth(arg).unwrap() = Some("/nonexistent/out".into());
            let name = ["spectrum_json", "unfrozen_yaml", "selection_json"][arg];
            assert_eq!(refusal(&r), format!("{name} with 2 models needs '{{model}}' in its path (one file per model)"));
        }
        let mut r = request(&["a", "b"]);
        r.outputs.selection_json = Some("/nonexistent/{model}.json".into());
        r.validate().unwrap();
    }

    #[test]
    fn a_shard_of_one_model_or_an_unexpanded_glob_defers_the_template_check() {
        let mut r = request(&["a", "b", "c"]);
        r.outputs.spectrum_json = Some("/nonexistent/out.json".into());
        r.shard.shard = Some("1/2".into());
        r.validate().unwrap(); // shard 1 of the sorted [a, b, c] is [b]
        r.shard.shard = Some("0/2".into());
        assert!(refusal(&r).contains("with 2 models"), "shard 0 is [a, c]");
        let mut g = request(&["zoo*", "b"]);
        g.outputs.spectrum_json = Some("/nonexistent/out.json".into());
        assert!(refusal(&g).contains("with 2 models"), "without a shard every argument is a model at least");
        g.shard.shard = Some("0/2".into());
        g.validate().unwrap();
    }
}
