//! What `graft inspect` reports about a checkpoint: per-tensor rows, a summary per layer type (Spectrum's rule, see
//! `names`), per-dtype totals and the metadata, as one serialisable record (`report`); and the whole command as a
//! typed request (`Request`, checked without opening a file by `validate`) with one entry point (`run`): quoted globs
//! expanded, this process's shard of the sorted path list, paths the results file records skipped, each checkpoint
//! (or GGUF file, with the `gguf` feature) described and its JSON line recorded, one failure not stopping the others.
//! It prints nothing: each description goes to the caller's `Sink`.

use std::collections::BTreeMap;

use regex::Regex;
use serde::Serialize;

use std::cell::RefCell;
use std::path::PathBuf;

use crate::checkpoint::Checkpoint;
use crate::error::{parse_regex, Arg, Error, Result};
use crate::names::{layer_of, type_of};
use crate::shard::{self, ShardArgs};

#[derive(Debug, Serialize)]
pub struct TensorRow {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub params: u64,
    pub bytes: u64,
    pub layer: Option<usize>,
    #[serde(rename = "type")]
    pub layer_type: String,
}

#[derive(Debug, Serialize)]
pub struct TypeSummary {
    #[serde(rename = "type")]
    pub layer_type: String,
    pub tensors: usize,
    pub params: u64,
    pub bytes: u64,
    /// Layer indices this type occurs in (empty for names without one).
    pub layers: Vec<usize>,
}

#[derive(Debug, Default, Serialize)]
pub struct Totals {
    pub tensors: usize,
    pub params: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub path: String,
    pub files: Vec<String>,
    pub shards: usize,
    /// The `--filter` applied, if any; totals and summaries then cover the matching tensors only.
    pub filter: Option<String>,
    pub totals: Totals,
    pub dtypes: BTreeMap<String, Totals>,
    pub types: Vec<TypeSummary>,
    pub metadata: BTreeMap<String, String>,
    pub tensors: Vec<TensorRow>,
}

/// Builds the report of `ck`, restricted to tensors whose name matches `filter`.
pub fn report(ck: &Checkpoint, filter: Option<&Regex>) -> Report {
    let mut rows = Vec::new();
    let mut totals = Totals::default();
    let mut dtypes: BTreeMap<String, Totals> = BTreeMap::new();
    // Types in order of first appearance, as a reader scanning the model meets them.
    let mut types: Vec<TypeSummary> = Vec::new();
    let mut type_pos: BTreeMap<String, usize> = BTreeMap::new();
    for t in ck.infos() {
        if filter.is_some_and(|f| !f.is_match(&t.name)) {
            continue;
        }
        let params = t.numel() as u64;
        let bytes = t.nbytes() as u64;
        let layer = layer_of(&t.name);
        let ty = type_of(&t.name).to_string();
        totals.tensors += 1;
        totals.params += params;
        totals.bytes += bytes;
        let d = dtypes.entry(t.dtype.name().to_string()).or_default();
        d.tensors += 1;
        d.params += params;
        d.bytes += bytes;
        let pos = *type_pos.entry(ty.clone()).or_insert_with(|| {
            types.push(TypeSummary { layer_type: ty.clone(), tensors: 0, params: 0, bytes: 0, layers: Vec::new() });
            types.len() - 1
        });
        let s = &mut types[pos];
        s.tensors += 1;
        s.params += params;
        s.bytes += bytes;
        if let Some(l) = layer {
            if !s.layers.contains(&l) {
                s.layers.push(l);
            }
        }
        rows.push(TensorRow {
            name: t.name.clone(),
            dtype: t.dtype.name().to_string(),
            shape: t.shape.clone(),
            params,
            bytes,
            layer,
            layer_type: ty,
        });
    }
    for s in &mut types {
        s.layers.sort_unstable();
    }
    Report {
        path: ck.path().display().to_string(),
        files: ck.files().iter().map(|p| p.display().to_string()).collect(),
        shards: ck.shard_count(),
        filter: filter.map(|f| f.as_str().to_string()),
        totals,
        dtypes,
        types,
        metadata: ck.metadata().clone(),
        tensors: rows,
    }
}

/// One `inspect` of checkpoints or a zoo of them.
#[derive(Clone, Debug, Default)]
pub struct Request {
    /// `.safetensors` files, index files, checkpoint directories (or GGUF files); quoted globs are expanded.
    pub paths: Vec<String>,
    /// Only tensors whose name matches this regular expression.
    pub filter: Option<String>,
    /// The results file: each description's JSON line is appended, and paths already there are skipped.
    pub resume: Option<PathBuf>,
    /// This process's shard of the sorted path list.
    pub shard: ShardArgs,
}

/// What one path holds.
pub enum Description {
    Checkpoint(Report),
    #[cfg(feature = "gguf")]
    Gguf(graft_core::gguf::GgufSummary),
}

impl Description {
    /// The JSON line of the description (ending in a newline), as `--json` prints it and the results file records it.
    pub fn line(&self) -> String {
        match self {
            Description::Checkpoint(r) => serde_json::to_string(r).expect("plain structs") + "\n",
            #[cfg(feature = "gguf")]
            Description::Gguf(g) => serde_json::to_string(g).expect("plain structs") + "\n",
        }
    }
}

/// Where `run` reports: `skipped` for a path the results file records, `described` once a path's line is recorded,
/// `failed` for a path that could not be read when several are inspected (a single path's error is `run`'s).
pub trait Sink {
    fn skipped(&mut self, _path: &str) {}
    fn described(&mut self, path: &str, description: &Description, line: &str) -> Result<()>;
    fn failed(&mut self, path: &str, error: &Error) -> Result<()>;
}

impl Request {
    /// The checks that need no file: the filter and the shard.
    pub fn validate(&self) -> Result<()> {
        self.filter.as_deref().map(|f| parse_regex(Arg::Filter, f)).transpose()?;
        self.shard.resolve()?;
        Ok(())
    }
}

/// Carries out one inspect (see the module header).
pub fn run(request: &Request, sink: &mut dyn Sink) -> Result<()> {
    request.validate()?;
    let filter = request.filter.as_deref().map(|f| parse_regex(Arg::Filter, f)).transpose()?;
    let paths = shard::expand_globs(&request.paths)?;
    // A line names its checkpoint by the path as given ("path"), which is what the shard's manifest lists.
    let item = |p: &String| serde_json::Value::String(p.clone());
    let resume = request.resume.as_deref();
    let paths = shard::select(&paths, request.shard.resolve()?, resume, "path", item, "inspect", "checkpoints")?;
    if paths.is_empty() {
        return Ok(());
    }
    let mut results = resume.map(|f| shard::Results::open(f, "path")).transpose()?;
    // The batch's work and its failure report both talk to the sink, never at the same time.
    let sink = RefCell::new(sink);
    shard::run_batch(
        &paths,
        "checkpoints could not be read",
        |path| {
            if results.as_ref().is_some_and(|r| r.contains(path)) {
                sink.borrow_mut().skipped(path);
                return Ok(());
            }
            let description = describe(path, filter.as_ref())?;
            let line = description.line();
            if let Some(r) = results.as_mut() {
                r.append(path, &line)?;
            }
            sink.borrow_mut().described(path, &description, &line)
        },
        |path, e| sink.borrow_mut().failed(path, e),
    )
}

fn describe(path: &str, filter: Option<&Regex>) -> Result<Description> {
    #[cfg(feature = "gguf")]
    if crate::checkpoint::is_gguf_path(std::path::Path::new(path)) {
        return Ok(Description::Gguf(graft_core::gguf::GgufFile::open(path)?.summary()));
    }
    Ok(Description::Checkpoint(report(&Checkpoint::open(path)?, filter)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Request {
        Request {
            paths: vec!["/nonexistent/graft-inspect/a".into(), "/nonexistent/graft-inspect/b".into()],
            resume: Some(PathBuf::from("/nonexistent/graft-inspect/results.jsonl")),
            ..Request::default()
        }
    }

    struct Never;
    impl Sink for Never {
        fn described(&mut self, path: &str, _: &Description, _: &str) -> Result<()> {
            panic!("{path} does not exist")
        }
        fn failed(&mut self, path: &str, error: &Error) -> Result<()> {
            panic!("{path}: {error}")
        }
    }

    #[test]
    fn a_bad_filter_or_shard_is_refused_before_any_file_is_read() {
        let mut r = request();
        r.filter = Some("(".into());
        for e in [r.validate().unwrap_err(), run(&r, &mut Never).unwrap_err()] {
            assert!(matches!(e, Error::Usage(_)) && e.to_string().starts_with("filter '(' is not a valid"), "{e}");
        }
        let mut r = request();
        r.shard.shard = Some("2/2".into());
        let e = run(&r, &mut Never).unwrap_err();
        assert!(matches!(e, Error::Usage(_)) && e.to_string().contains("shard 2 of 2 does not exist"), "{e}");
        let mut r = request();
        r.filter = Some("layers\\.0".into());
        r.validate().unwrap();
    }

    #[test]
    fn several_unreadable_paths_are_each_reported_and_counted() {
        struct Failures(Vec<String>);
        impl Sink for Failures {
            fn described(&mut self, path: &str, _: &Description, _: &str) -> Result<()> {
                panic!("{path} does not exist")
            }
            fn failed(&mut self, path: &str, error: &Error) -> Result<()> {
                assert!(error.to_string().contains(path), "{error}");
                self.0.push(path.to_string());
                Ok(())
            }
        }
        let mut r = request();
        r.resume = None;
        let mut sink = Failures(Vec::new());
        let e = run(&r, &mut sink).unwrap_err();
        assert_eq!(e.to_string(), "2 of 2 checkpoints could not be read");
        assert_eq!(sink.0, r.paths);
    }
}
