//! `graft similarity MODEL... --base BASE` (task vector similarity, see `taskvec::similarity`) and
//! `graft similarity --merged M --experts A B --base BASE` (the consistency analysis, see `taskvec::consistency`).
//!
//! Over a zoo (`'zoo/*'`, expanded by graft), `--jsonl` or `--resume FILE` give one JSON line per pair of models
//! instead of one report: the work item of a zoo is a pair, since a pair's numbers need its two models and nothing
//! else, while a model's own numbers (its norm) come with every pair it is in. Pairs split over processes with
//! `--shard K/N` (`crate::shard`; `graft gather` joins the shards' results files).

use std::fmt::Write;
use std::path::PathBuf;

use serde::Serialize;

use super::diff::warn_skipped;
use super::{emit, human_count, regex_arg, table, Global};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::exec::Executor;
use crate::taskvec::consistency::{consistency, ConsistencyOptions, ConsistencyReport, ConsistencyStats, Selection};
use crate::taskvec::name_list;
use crate::taskvec::similarity::{
    similarity, similarity_pairs, GroupBy, GroupStats, SimilarityOptions, SimilarityReport,
};

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
    let exclude = args.exclude.as_deref().map(|e| regex_arg("--exclude", e)).transpose()?;
    let base = Checkpoint::open(&args.base)?;
    let exec = Executor::new(global.threads)?;
    if let Some(merged) = &args.merged {
        let [a, b] = <[PathBuf; 2]>::try_from(args.experts.clone())
            .map_err(|_| Error::usage("--experts takes exactly two checkpoints"))?;
        let selection = match (&args.only, args.only_merged) {
            (Some(r), _) => Selection::Only(regex_arg("--only", r)?),
            (None, true) => Selection::OnlyMerged,
            (None, false) => Selection::None,
        };
        let (m, a, b) = (Checkpoint::open(merged)?, Checkpoint::open(&a)?, Checkpoint::open(&b)?);
        let opts = ConsistencyOptions { selection, exclude, by, allow_missing: args.allow_missing };
        let r = consistency(&base, &m, &a, &b, &opts, &exec)?;
        warn_skipped(&r.skipped_mismatched);
        return if args.json {
            emit(&(serde_json::to_string(&r).unwrap() + "\n"))
        } else {
            emit(&render_consistency(&r))
        };
    }
    let shard = args.shard.resolve()?;
    let names = crate::shard::expand_globs(&args.models)?;
    if args.jsonl || args.resume.is_some() || shard.is_some() {
        let opts = SimilarityOptions { by, exclude, allow_missing: args.allow_missing };
        return run_pairs(&args, names, shard, &base, &opts, &exec);
    }
    let mut models = Vec::new();
    for p in &names {
        models.push(Checkpoint::open(p)?);
    }
    let refs: Vec<&Checkpoint> = models.iter().collect();
    let opts = SimilarityOptions { by, exclude, allow_missing: args.allow_missing };
    let r = similarity(&base, &refs, &opts, &exec)?;
    warn_skipped(&r.skipped_mismatched);
    if args.json {
        emit(&(serde_json::to_string(&r).unwrap() + "\n"))
    } else {
        emit(&render_similarity(&r))
    }
}

/// One pair's line: the report of the two models, keyed by their canonical paths.
#[derive(Serialize)]
struct PairLine<'a> {
    pair: [String; 2],
    #[serde(flatten)]
    report: &'a SimilarityReport,
}

/// The pairwise lines of a zoo: the pairs of the sorted model list (this shard's, less those the results file has),
/// computed in one pass over the models they need.
fn run_pairs(
    args: &Args,
    mut names: Vec<String>,
    shard: Option<crate::shard::Shard>,
    base: &Checkpoint,
    opts: &SimilarityOptions,
    exec: &Executor,
) -> Result<()> {
    if args.json || args.merged.is_some() {
        return Err(Error::usage("--shard splits a zoo's pairs (--jsonl or --resume FILE), not one --json report"));
    }
    names.sort();
    names.dedup();
    if names.len() < 2 {
        return Err(Error::usage(format!("a zoo's pairs need at least two models; {} given", names.len())));
    }
    let canonical: Vec<String> = names.iter().map(|m| crate::shard::canonical(m)).collect();
    let key = |&(a, b): &(usize, usize)| serde_json::json!([canonical[a], canonical[b]]);
    let all: Vec<(usize, usize)> = (0..names.len()).flat_map(|a| (a + 1..names.len()).map(move |b| (a, b))).collect();
    let mine = crate::shard::select(&all, shard, args.resume.as_deref(), "pair", key, "similarity", "pairs")?;
    let mut results = args.resume.as_deref().map(|f| crate::shard::Results::open(f, "pair")).transpose()?;
    let todo: Vec<(usize, usize)> = mine
        .into_iter()
        .filter(|p| !results.as_ref().is_some_and(|r| r.contains(&crate::shard::key_text(&key(p)))))
        .collect();
    // Every model is opened (the zoo's tensors that pair with the base decide what every pair compares); only the
    // models of `todo` are read.
    let mut models = Vec::new();
    for p in &names {
        models.push(Checkpoint::open(p)?);
    }
    let refs: Vec<&Checkpoint> = models.iter().collect();
    let reports = if todo.is_empty() { Vec::new() } else { similarity_pairs(base, &refs, &todo, opts, exec)? };
    if let Some(r) = reports.first() {
        warn_skipped(&r.skipped_mismatched);
    }
    let skipped = if results.is_some() { " (the rest are in the results file)" } else { "" };
    eprintln!("graft: similarity: {} pairs compared{skipped}", reports.len());
    let mut table_rows = table(&["model a", "model b", "cosine", "sign agreement"]);
    for (&(a, b), report) in todo.iter().zip(&reports) {
        let pair = [canonical[a].clone(), canonical[b].clone()];
        let line = serde_json::to_string(&PairLine { pair, report }).expect("plain structs") + "\n";
        if let Some(r) = results.as_mut() {
            r.append(&crate::shard::key_text(&key(&(a, b))), &line)?;
        }
        if args.jsonl {
            emit(&line)?;
        } else {
            let t = &report.total.pairs[0];
            table_rows.add_row(vec![names[a].clone(), names[b].clone(), num(t.cosine), num(t.sign_agreement)]);
        }
    }
    if !args.jsonl && !reports.is_empty() {
        emit(&format!("{table_rows}\n"))?;
    }
    Ok(())
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
