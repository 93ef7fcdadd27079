//! `graft similarity` as a typed request (`Request`) and its one entry point (`run`): the task vectors of some models
//! against a base in one report, a zoo's pairs one line each (quoted globs expanded, models sorted, this process's
//! shard of the pairs, pairs the results file records skipped, each new pair's line appended), or the consistency of
//! a merge with its two experts. Everything that needs no file (the regular expressions, the shard, a zoo of fewer
//! than two models where the arguments show it) is checked first (`Request::validate`). The library prints nothing:
//! a zoo's pairs go to the caller's `PairSink` as each is recorded, the reports are returned.

use std::path::PathBuf;

use serde::Serialize;

use super::consistency::{consistency, ConsistencyOptions, ConsistencyReport, Selection};
use super::similarity::{similarity, similarity_pairs, GroupBy, SimilarityOptions, SimilarityReport};
use crate::checkpoint::Checkpoint;
use crate::error::{parse_regex, Arg, Error, Result};
use crate::exec::Executor;
use crate::shard::{self, canonical, key_text, ShardArgs};

/// One `similarity` run.
#[derive(Clone, Debug)]
pub struct Request {
    /// The common base checkpoint.
    pub base: PathBuf,
    /// Groups reported besides the whole model.
    pub by: GroupBy,
    /// Leave out tensors whose name matches this regular expression.
    pub exclude: Option<String>,
    /// Skip tensors that do not pair with the base instead of failing.
    pub allow_missing: bool,
    pub task: Task,
}

/// What is compared.
#[derive(Clone, Debug)]
pub enum Task {
    /// The task vectors of these models (quoted globs expanded), in one report.
    Report { models: Vec<String> },
    /// A zoo's pairs, one report each: the pairs of the sorted model list, this process's shard of them, less
    /// those the results file records; each new pair's line is appended to it.
    Pairs { models: Vec<String>, resume: Option<PathBuf>, shard: ShardArgs },
    /// The consistency of a merge with the two experts merged.
    Consistency { merged: PathBuf, experts: [PathBuf; 2], only: Option<String>, only_merged: bool },
}

/// What `run` returns.
pub enum Outcome {
    Report(SimilarityReport),
    Consistency(ConsistencyReport),
    /// A zoo's pairs: how many were compared here (the lines went to the sink).
    Pairs {
        compared: usize,
    },
}

/// One pair's line: the report of the two models, keyed by their canonical paths.
#[derive(Serialize)]
pub struct PairLine<'a> {
    pub pair: [String; 2],
    #[serde(flatten)]
    pub report: &'a SimilarityReport,
}

/// Where `run` reports a zoo's pairs: `compared` once every pair to do is computed (before any line is recorded),
/// then `pair` for each, after its line is recorded.
pub trait PairSink {
    fn compared(&mut self, reports: &[SimilarityReport], resumed: bool);
    /// `models` as given (after glob expansion), `line` the pair's JSON line as recorded.
    fn pair(&mut self, models: [&str; 2], report: &SimilarityReport, line: &str) -> Result<()>;
}

/// How many distinct models the arguments name, where that is known without expanding a glob.
fn distinct_models(models: &[String]) -> Option<usize> {
    if models.iter().any(|m| m.contains(['*', '?', '['])) {
        return None;
    }
    let mut distinct = models.to_vec();
    distinct.sort();
    distinct.dedup();
    Some(distinct.len())
}

fn too_few(models: usize) -> Error {
    Error::usage(format!("a zoo's pairs need at least two models; {models} given"))
}

impl Request {
    /// The checks that need no file.
    pub fn validate(&self) -> Result<()> {
        self.exclude.as_deref().map(|e| parse_regex(Arg::Exclude, e)).transpose()?;
        match &self.task {
            Task::Report { .. } => {}
            Task::Pairs { models, shard, .. } => {
                shard.resolve()?;
                if let Some(n) = distinct_models(models).filter(|&n| n < 2) {
                    return Err(too_few(n));
                }
            }
            Task::Consistency { only, .. } => {
                only.as_deref().map(|r| parse_regex(Arg::Only, r)).transpose()?;
            }
        }
        Ok(())
    }
}

/// Carries out one similarity run (see the module header); `sink` hears a zoo's pairs.
pub fn run(request: &Request, exec: &Executor, sink: &mut dyn PairSink) -> Result<Outcome> {
    request.validate()?;
    let exclude = request.exclude.as_deref().map(|e| parse_regex(Arg::Exclude, e)).transpose()?;
    let base = Checkpoint::open(&request.base)?;
    let (by, allow_missing) = (request.by, request.allow_missing);
    match &request.task {
        Task::Consistency { merged, experts: [a, b], only, only_merged } => {
            let selection = match (only, only_merged) {
                (Some(r), _) => Selection::Only(parse_regex(Arg::Only, r)?),
                (None, true) => Selection::OnlyMerged,
                (None, false) => Selection::None,
            };
            let (m, a, b) = (Checkpoint::open(merged)?, Checkpoint::open(a)?, Checkpoint::open(b)?);
            let opts = ConsistencyOptions { selection, exclude, by, allow_missing };
            consistency(&base, &m, &a, &b, &opts, exec).map(Outcome::Consistency)
        }
        Task::Report { models } => {
            let models =
                shard::expand_globs(models)?.iter().map(Checkpoint::open).collect::<Result<Vec<Checkpoint>>>()?;
            let refs: Vec<&Checkpoint> = models.iter().collect();
            let opts = SimilarityOptions { by, exclude, allow_missing };
            similarity(&base, &refs, &opts, exec).map(Outcome::Report)
        }
        Task::Pairs { models, resume, shard } => {
            let opts = SimilarityOptions { by, exclude, allow_missing };
            let names = shard::expand_globs(models)?;
            run_pairs(names, resume.as_deref(), shard, &base, &opts, exec, sink)
        }
    }
}

/// The pairwise lines of a zoo: the pairs of the sorted model list (this shard's, less those the results file has),
/// computed in one pass over the models they need.
fn run_pairs(
    mut names: Vec<String>,
    resume: Option<&std::path::Path>,
    shard: &ShardArgs,
    base: &Checkpoint,
    opts: &SimilarityOptions,
    exec: &Executor,
    sink: &mut dyn PairSink,
) -> Result<Outcome> {
    names.sort();
    names.dedup();
    if names.len() < 2 {
        return Err(too_few(names.len()));
    }
    let canonical: Vec<String> = names.iter().map(|m| canonical(m)).collect();
    let key = |&(a, b): &(usize, usize)| serde_json::json!([canonical[a], canonical[b]]);
    let all: Vec<(usize, usize)> = (0..names.len()).flat_map(|a| (a + 1..names.len()).map(move |b| (a, b))).collect();
    let mine = shard::select(&all, shard.resolve()?, resume, "pair", key, "similarity", "pairs")?;
    let mut results = resume.map(|f| shard::Results::open(f, "pair")).transpose()?;
    let todo: Vec<(usize, usize)> =
        mine.into_iter().filter(|p| !results.as_ref().is_some_and(|r| r.contains(&key_text(&key(p))))).collect();
    // Every model is opened (the zoo's tensors that pair with the base decide what every pair compares); only the
    // models of `todo` are read.
    let models = names.iter().map(Checkpoint::open).collect::<Result<Vec<Checkpoint>>>()?;
    let refs: Vec<&Checkpoint> = models.iter().collect();
    let reports = if todo.is_empty() { Vec::new() } else { similarity_pairs(base, &refs, &todo, opts, exec)? };
    sink.compared(&reports, results.is_some());
    for (&(a, b), report) in todo.iter().zip(&reports) {
        let pair = [canonical[a].clone(), canonical[b].clone()];
        let line = serde_json::to_string(&PairLine { pair, report }).expect("plain structs") + "\n";
        if let Some(r) = results.as_mut() {
            r.append(&key_text(&key(&(a, b))), &line)?;
        }
        sink.pair([&names[a], &names[b]], report, &line)?;
    }
    Ok(Outcome::Pairs { compared: reports.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(task: Task) -> Request {
        Request {
            base: "/nonexistent/graft-sim/base".into(),
            by: GroupBy::Model,
            exclude: None,
            allow_missing: false,
            task,
        }
    }

    fn models(names: &[&str]) -> Vec<String> {
        names.iter().map(|m| format!("/nonexistent/graft-sim/{m}")).collect()
    }

    fn pairs(names: &[&str]) -> Task {
        Task::Pairs {
            models: models(names),
            resume: Some("/nonexistent/graft-sim/r.jsonl".into()),
            shard: ShardArgs::default(),
        }
    }

    struct Never;
    impl PairSink for Never {
        fn compared(&mut self, _: &[SimilarityReport], _: bool) {
            panic!("nothing is compared")
        }
        fn pair(&mut self, _: [&str; 2], _: &SimilarityReport, _: &str) -> Result<()> {
            panic!("nothing is compared")
        }
    }

    /// The error of a request that must be refused before any file is opened (every path is missing).
    fn refusal(r: &Request) -> String {
        let exec = Executor::new(Some(1)).unwrap();
        let e = r.validate().unwrap_err();
        let from_run = run(r, &exec, &mut Never).err().expect("refused");
        assert_eq!(e.to_string(), from_run.to_string());
        assert!(matches!(e, Error::Usage(_)), "a usage error, not an I/O one: {e}");
        e.to_string()
    }

    #[test]
    fn bad_regular_expressions_are_refused_first() {
        let mut r = request(Task::Report { models: models(&["a"]) });
        r.exclude = Some("head(".into());
        assert!(refusal(&r).starts_with("exclude 'head(' is not a valid regular expression"));
        let only = Task::Consistency {
            merged: "/nonexistent/m".into(),
            experts: ["/nonexistent/a".into(), "/nonexistent/b".into()],
            only: Some("[".into()),
            only_merged: false,
        };
        assert!(refusal(&request(only)).starts_with("only '[' is not a valid regular expression"));
    }

    #[test]
    fn a_zoo_of_fewer_than_two_distinct_models_or_a_bad_shard_is_refused() {
        assert_eq!(refusal(&request(pairs(&["a", "a"]))), "a zoo's pairs need at least two models; 1 given");
        let mut bad = request(pairs(&["a", "b"]));
        if let Task::Pairs { shard, .. } = &mut bad.task {
            shard.shard = Some("1/0".into());
        }
        assert!(refusal(&bad).contains("the number of shards must be at least 1"));
        // A glob may name many models: only expanding it tells.
        request(pairs(&["zoo*"])).validate().unwrap();
        request(pairs(&["a", "b"])).validate().unwrap();
    }

    #[test]
    fn a_valid_request_fails_first_on_the_base() {
        let exec = Executor::new(Some(1)).unwrap();
        for task in [pairs(&["a", "b"]), Task::Report { models: models(&["a"]) }] {
            let e = run(&request(task), &exec, &mut Never).err().expect("no base");
            assert!(e.to_string().contains("/nonexistent/graft-sim/base"), "{e}");
        }
    }
}
