//! `graft inspect PATH...`: tensors, per-type summary, totals and metadata of each checkpoint, as tables or JSON lines;
//! for a GGUF file, its tensors with their quantisation types, per-type totals and its metadata. `--shard K/N` does
//! one part of the sorted path list (`crate::shard`).

use std::fmt::Write;
use std::path::PathBuf;

use super::{emit, human_bytes, human_count, regex_arg, table, Global};
use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::inspect::{report, Report};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Checkpoints: `.safetensors` files, index files, or checkpoint directories.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Print one JSON document per checkpoint, one per line (schema in the README).
    #[arg(long)]
    json: bool,
    /// Only tensors whose name matches this regular expression.
    #[arg(long)]
    filter: Option<String>,
    /// Leave out the per-tensor table (summary, totals and metadata only).
    #[arg(long)]
    summary: bool,
    #[command(flatten)]
    shard: crate::shard::ShardArgs,
}

pub fn run(mut args: Args, _global: &Global) -> Result<()> {
    let filter = args.filter.as_deref().map(|f| regex_arg("--filter", f)).transpose()?;
    if let Some(shard) = args.shard.resolve()? {
        args.paths = crate::shard::partition(&args.paths, shard);
        if args.paths.is_empty() {
            eprintln!("graft: inspect: shard {shard} has no checkpoints");
            return Ok(());
        }
    }
    let name = |p: &PathBuf| p.display().to_string();
    super::run_batch(&args.paths, args.json, "path", "checkpoints could not be read", name, |path| {
        if crate::checkpoint::is_gguf_path(path) {
            let g = crate::gguf::GgufFile::open(path)?.summary();
            return if args.json {
                emit(&(serde_json::to_string(&g).unwrap() + "\n"))
            } else {
                emit(&render_gguf(&g, args.summary))
            };
        }
        let r = report(&Checkpoint::open(path)?, filter.as_ref());
        if args.json {
            emit(&(serde_json::to_string(&r).unwrap() + "\n"))
        } else {
            emit(&render(&r, args.summary))
        }
    })
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
