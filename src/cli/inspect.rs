//! `graft inspect PATH...`: tensors, per-type summary, totals and metadata of each checkpoint, as tables or JSON lines;
//! for a GGUF file, its tensors with their quantisation types, per-type totals and its metadata. A quoted glob
//! (`'zoo/*'`) is expanded by graft; `--resume FILE` records each checkpoint's JSON line and skips those already
//! there; `--shard K/N` does one part of the sorted path list (`graft gather` joins the shards' results files). The
//! loop over paths is `inspect::run`; this file maps the flags to its request and prints what it describes.

use std::fmt::Write;
use std::path::PathBuf;

use super::{emit, human_bytes, human_count, table, Global};
use crate::error::{Error, Result};
use crate::inspect::{self, Description, Report, Request};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Checkpoints: `.safetensors` files, index files, or checkpoint directories; a quoted glob (`'zoo/*'`) is
    /// expanded by graft.
    #[arg(required = true)]
    paths: Vec<String>,
    /// Print one JSON document per checkpoint, one per line (schema in the README).
    #[arg(long)]
    json: bool,
    /// Only tensors whose name matches this regular expression.
    #[arg(long)]
    filter: Option<String>,
    /// Leave out the per-tensor table (summary, totals and metadata only).
    #[arg(long)]
    summary: bool,
    /// Append each checkpoint's JSON line (as --json prints it) to FILE and skip checkpoints already recorded there
    /// (restartable zoo runs; with --shard, the file `graft gather` joins).
    #[arg(long, value_name = "FILE")]
    resume: Option<PathBuf>,
    #[command(flatten)]
    shard: crate::shard::ShardArgs,
}

pub fn run(args: Args, _global: &Global) -> Result<()> {
    let request = Request {
        paths: args.paths.clone(),
        filter: args.filter.clone(),
        resume: args.resume.clone(),
        shard: args.shard.clone(),
    };
    inspect::run(&request, &mut Printer { args: &args })
}

/// Each description as a table, or as its JSON line.
struct Printer<'a> {
    args: &'a Args,
}

impl inspect::Sink for Printer<'_> {
    fn skipped(&mut self, path: &str) {
        eprintln!("graft: inspect: {path}: already in the resume file, skipped");
    }

    fn described(&mut self, _path: &str, description: &Description, line: &str) -> Result<()> {
        if self.args.json {
            return emit(line);
        }
        emit(&match description {
            Description::Checkpoint(r) => render(r, self.args.summary),
            Description::Gguf(g) => render_gguf(g, self.args.summary),
        })
    }

    fn failed(&mut self, path: &str, e: &Error) -> Result<()> {
        if self.args.json {
            emit(&(serde_json::json!({ "path": path, "error": e.to_string() }).to_string() + "\n"))?;
        }
        eprintln!("graft: error: {}", crate::error::bounded(&e.to_string()));
        Ok(())
    }
}

fn render(r: &Report, summary_only: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{}  ({} file{})", r.path, r.files.len(), if r.files.len() == 1 { "" } else { "s" });
    if !summary_only {
        let mut t = table(&["tensor", "dtype", "shape", "params", "bytes"]);
        for row in &r.tensors {
            t.add_row(vec![
                row.name.clone(),
                row.dtype.clone(),
                format!("{:?}", row.shape),
                row.params.to_string(),
                row.bytes.to_string(),
            ]);
        }
        let _ = writeln!(s, "{t}");
    }
    let mut t = table(&["layer type", "tensors", "layers", "params", "bytes"]);
    for ty in &r.types {
        let layers = match (ty.layers.first(), ty.layers.last()) {
            (Some(a), Some(b)) if a != b => format!("{a}..{b} ({})", ty.layers.len()),
            (Some(a), _) => a.to_string(),
            _ => "-".into(),
        };
        t.add_row(vec![
            ty.layer_type.clone(),
            ty.tensors.to_string(),
            layers,
            human_count(ty.params),
            human_bytes(ty.bytes),
        ]);
    }
    let _ = writeln!(s, "{t}");
    let dt: Vec<String> =
        r.dtypes.iter().map(|(d, x)| format!("{d}: {} tensors, {}", x.tensors, human_count(x.params))).collect();
    let _ = writeln!(
        s,
        "total: {} tensors, {} parameters ({}), {}{}",
        r.totals.tensors,
        r.totals.params,
        human_count(r.totals.params),
        human_bytes(r.totals.bytes),
        r.filter.as_ref().map(|f| format!(" matching /{f}/")).unwrap_or_default()
    );
    let _ = writeln!(s, "dtypes: {}", dt.join("; "));
    if r.metadata.is_empty() {
        let _ = writeln!(s, "metadata: none");
    } else {
        let _ = writeln!(s, "metadata:");
        for (k, v) in &r.metadata {
            let _ = writeln!(s, "  {k}: {v}");
        }
    }
    s
}

fn render_gguf(g: &crate::gguf::GgufSummary, summary_only: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{}  (GGUF {}, architecture {})",
        g.path,
        g.version,
        g.architecture.as_deref().unwrap_or("unknown")
    );
    if !summary_only {
        let mut t = table(&["tensor", "type", "shape", "params", "bytes"]);
        for row in &g.tensors {
            t.add_row(vec![
                row.name.clone(),
                row.quant.clone(),
                format!("{:?}", row.shape),
                row.shape.iter().product::<usize>().to_string(),
                row.bytes.to_string(),
            ]);
        }
        let _ = writeln!(s, "{t}");
    }
    let mut t = table(&["type", "tensors", "params", "bytes"]);
    for (q, x) in &g.quants {
        t.add_row(vec![q.clone(), x.tensors.to_string(), human_count(x.params), human_bytes(x.bytes)]);
    }
    let _ = writeln!(s, "{t}");
    let _ = writeln!(
        s,
        "total: {} tensors, {} parameters ({}), {}",
        g.tensors_count,
        g.params,
        human_count(g.params),
        human_bytes(g.bytes)
    );
    let _ = writeln!(s, "metadata:");
    for (k, v) in &g.metadata {
        let _ = writeln!(s, "  {k}: {v}");
    }
    s
}
