//! `graft similarity MODEL... --base BASE` (task vector similarity, see `taskvec::similarity`) and
//! `graft similarity --merged M --experts A B --base BASE` (the consistency analysis, see `taskvec::consistency`).
//!
//! Over a zoo (`'zoo/*'`, expanded by graft), `--jsonl` or `--resume FILE` give one JSON line per pair of models
//! instead of one report: the work item of a zoo is a pair, since a pair's numbers need its two models and nothing
//! else, while a model's own numbers (its norm) come with every pair it is in. Pairs split over processes with
//! `--shard K/N` (`graft gather` joins the shards' results files). The flags become a `taskvec::compare::Request`,
//! carried out by `compare::run`; this file prints its reports and a zoo's pairs.

use std::fmt::Write;
use std::path::PathBuf;

use super::diff::warn_skipped;
use super::{emit, human_count, table, Global};
use crate::error::{Error, Result};
use crate::exec::Executor;
use crate::taskvec::compare::{self, Outcome, Request, Task};
use crate::taskvec::consistency::{ConsistencyReport, ConsistencyStats};
use crate::taskvec::name_list;
use crate::taskvec::similarity::{GroupBy, GroupStats, SimilarityReport};

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum By {
    /// Whole model only.
    Model,
    /// Per layer index (the first all-digit component of a tensor name).
    Layer,
    /// Per layer type (the name after the layer index).
    Type,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub values: super::ValueArgs,
    /// Models whose task vectors against --base are compared (not with --merged); a quoted glob (`'zoo/*'`) is
    /// expanded by graft.
    #[arg(required_unless_present = "merged", conflicts_with = "merged")]
    models: Vec<String>,
    /// The common base checkpoint.
    #[arg(long)]
    base: PathBuf,
    /// Also report per layer index or per layer type.
    #[arg(long, value_enum, default_value = "model")]
    by: By,
    /// Leave out tensors whose name matches this regular expression (e.g. a classifier head).
    #[arg(long, value_name = "REGEX")]
    exclude: Option<String>,
    /// Skip tensors present in only some models or with different shapes (with a warning) instead of failing.
    #[arg(long)]
    allow_missing: bool,
    /// Print the report as one JSON object (schema in docs/similarity.md).
    #[arg(long, conflicts_with_all = ["jsonl", "resume"])]
    json: bool,
    /// A zoo's pairs: print one JSON line per pair of models (the --json report of the two, with a "pair" key of
    /// their canonical paths), models sorted, pairs row by row.
    #[arg(long, conflicts_with = "merged")]
    jsonl: bool,
    /// A zoo's pairs: append each pair's JSON line to FILE and skip pairs already recorded there (restartable; with
    /// --shard, the file `graft gather` joins).
    #[arg(long, value_name = "FILE", conflicts_with = "merged")]
    resume: Option<PathBuf>,
    #[command(flatten)]
    shard: crate::shard::ShardArgs,
    /// Consistency analysis: the merge of the two --experts.
    #[arg(long, value_name = "M", requires = "experts")]
    merged: Option<PathBuf>,
    /// Consistency analysis: the two experts that were merged.
    #[arg(long, num_args = 2, value_names = ["A", "B"], requires = "merged")]
    experts: Vec<PathBuf>,
    /// Consistency analysis: also report the tensors whose name matches this regular expression.
    #[arg(long, value_name = "REGEX", requires = "merged", conflicts_with = "only_merged")]
    only: Option<String>,
    /// Consistency analysis: also report the tensors the merge lists as merged (its `graft.merged_tensors` metadata).
    #[arg(long, requires = "merged")]
    only_merged: bool,
}

pub fn run(args: Args, global: &Global) -> Result<()> {
    let by = match args.by {
        By::Model => GroupBy::Model,
        By::Layer => GroupBy::Layer,
        By::Type => GroupBy::Type,
    };
    let shard = &args.shard;
    let task = if let Some(merged) = &args.merged {
        let experts = <[PathBuf; 2]>::try_from(args.experts.clone())
            .map_err(|_| Error::usage("--experts takes exactly two checkpoints"))?;
        Task::Consistency { merged: merged.clone(), experts, only: args.only.clone(), only_merged: args.only_merged }
    } else if args.jsonl || args.resume.is_some() || shard.shard.is_some() || shard.shard_count.is_some() {
        if args.json {
            return Err(Error::usage("--shard splits a zoo's pairs (--jsonl or --resume FILE), not one --json report"));
        }
        Task::Pairs { models: args.models.clone(), resume: args.resume.clone(), shard: shard.clone() }
    } else {
        Task::Report { models: args.models.clone() }
    };
    let request =
        Request { base: args.base.clone(), by, exclude: args.exclude.clone(), allow_missing: args.allow_missing, task };
    request.validate()?;
    let exec = Executor::new(global.threads)?;
    let mut pairs = Pairs { jsonl: args.jsonl, table: table(&["model a", "model b", "cosine", "sign agreement"]) };
    match compare::run(&request, &exec, &mut pairs)? {
        Outcome::Consistency(r) => {
            warn_skipped(&r.skipped_mismatched);
            if args.json {
                emit(&(serde_json::to_string(&r).unwrap() + "\n"))
            } else {
                emit(&render_consistency(&r))
            }
        }
        Outcome::Report(r) => {
            warn_skipped(&r.skipped_mismatched);
            if args.json {
                emit(&(serde_json::to_string(&r).unwrap() + "\n"))
            } else {
                emit(&render_similarity(&r))
            }
        }
        Outcome::Pairs { compared } => {
            if !args.jsonl && compared > 0 {
                emit(&format!("{}\n", pairs.table))?;
            }
            Ok(())
        }
    }
}

/// A zoo's pairs: each pair's JSON line as it is recorded (`--jsonl`), or a table row printed at the end.
struct Pairs {
    jsonl: bool,
    table: comfy_table::Table,
}

impl compare::PairSink for Pairs {
    fn compared(&mut self, reports: &[SimilarityReport], resumed: bool) {
        if let Some(r) = reports.first() {
            warn_skipped(&r.skipped_mismatched);
        }
        let skipped = if resumed { " (the rest are in the results file)" } else { "" };
        eprintln!("graft: similarity: {} pairs compared{skipped}", reports.len());
    }

    fn pair(&mut self, [a, b]: [&str; 2], report: &SimilarityReport, line: &str) -> Result<()> {
        if self.jsonl {
            return emit(line);
        }
        let t = &report.total.pairs[0];
        self.table.add_row(vec![a.to_string(), b.to_string(), num(t.cosine), num(t.sign_agreement)]);
        Ok(())
    }
}

fn num(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |x| format!("{x:.6}"))
}

fn left_out(s: &mut String, nonfloat: &[String], excluded: &[String], mismatched: usize) {
    if !nonfloat.is_empty() {
        let _ = writeln!(s, "left out {} non-float tensor(s): {}", nonfloat.len(), name_list(nonfloat));
    }
    if !excluded.is_empty() {
        let _ = writeln!(s, "left out {} excluded tensor(s): {}", excluded.len(), name_list(excluded));
    }
    if mismatched > 0 {
        let _ = writeln!(s, "left out {mismatched} tensor(s) that do not pair with the base");
    }
}

fn render_similarity(r: &SimilarityReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "task vectors against base {}", r.base);
    let _ = writeln!(s, "{} float tensors, {} parameters", r.tensors, human_count(r.params));
    left_out(&mut s, &r.skipped_nonfloat, &r.excluded, r.skipped_mismatched.len());
    let mut t = table(&["#", "model", "L2 norm", "zero fraction"]);
    for (m, st) in r.models.iter().zip(&r.total.models) {
        t.add_row(vec![format!("[{}]", st.model), m.clone(), format!("{:.6}", st.l2_norm), num(st.zero_fraction)]);
    }
    let _ = writeln!(s, "{t}");
    if r.models.len() > 1 {
        let mut header = vec!["cosine".to_string()];
        header.extend((0..r.models.len()).map(|i| format!("[{i}]")));
        let mut t = table(&header.iter().map(String::as_str).collect::<Vec<_>>());
        for (i, row) in r.total.cosine.iter().enumerate() {
            let mut cells = vec![format!("[{i}]")];
            cells.extend(row.iter().map(|c| num(*c)));
            t.add_row(cells);
        }
        let _ = writeln!(s, "{t}");
        let mut t = table(&["pair", "cosine", "sign agreement", "both non-zero"]);
        for p in &r.total.pairs {
            t.add_row(vec![
                format!("[{}] [{}]", p.a, p.b),
                num(p.cosine),
                num(p.sign_agreement),
                p.both_nonzero.to_string(),
            ]);
        }
        let _ = writeln!(s, "{t}");
    }
    if !r.groups.is_empty() {
        let _ = writeln!(s, "{}", group_table(r));
    }
    s
}

fn group_table(r: &SimilarityReport) -> comfy_table::Table {
    let by = if r.by == GroupBy::Layer { "layer" } else { "type" };
    let mut header = vec![by.to_string(), "tensors".into(), "params".into()];
    header.extend((0..r.models.len()).map(|i| format!("norm [{i}]")));
    for p in &r.total.pairs {
        header.push(format!("cos [{}] [{}]", p.a, p.b));
        header.push(format!("sign [{}] [{}]", p.a, p.b));
    }
    let mut t = table(&header.iter().map(String::as_str).collect::<Vec<_>>());
    let row = |g: &GroupStats| {
        let mut cells = vec![g.group.clone(), g.tensors.to_string(), human_count(g.params)];
        cells.extend(g.models.iter().map(|m| format!("{:.6}", m.l2_norm)));
        for p in &g.pairs {
            cells.push(num(p.cosine));
            cells.push(num(p.sign_agreement));
        }
        cells
    };
    for g in &r.groups {
        t.add_row(row(g));
    }
    t
}

fn render_consistency(r: &ConsistencyReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "consistency of merge {} of A = {} and B = {}", r.merged, r.experts[0], r.experts[1]);
    let _ = writeln!(s, "base {}", r.base);
    let _ = writeln!(s, "recover A = cos(dM - dB, dA - dB), recover B = cos(dM - dA, dB - dA)");
    match (r.selection.as_str(), &r.pattern) {
        ("only", Some(p)) => {
            let _ = writeln!(s, "selected: tensors matching /{p}/");
        }
        ("only_merged", _) => {
            let _ = writeln!(s, "selected: the tensors the merge lists as merged");
        }
        _ => {}
    }
    left_out(&mut s, &r.skipped_nonfloat, &r.excluded, r.skipped_mismatched.len());
    let mut t = table(&["set", "tensors", "params", "recover A", "recover B", "mean"]);
    let row = |st: &ConsistencyStats| {
        vec![
            st.group.clone(),
            st.tensors.to_string(),
            human_count(st.params),
            num(st.recover_a),
            num(st.recover_b),
            num(st.mean),
        ]
    };
    t.add_row(row(&r.all));
    if let Some(sel) = &r.selected {
        t.add_row(row(sel));
    }
    let _ = writeln!(s, "{t}");
    if !r.groups.is_empty() {
        let by = if r.by == GroupBy::Layer { "layer" } else { "type" };
        let over = if r.selected.is_some() { " (selected tensors)" } else { "" };
        let _ = writeln!(s, "per {by}{over}");
        let mut t = table(&[by, "tensors", "params", "recover A", "recover B", "mean"]);
        for g in &r.groups {
            t.add_row(row(g));
        }
        let _ = writeln!(s, "{t}");
    }
    s
}
