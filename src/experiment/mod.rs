//! `graft experiment`: the SNR-selective merging study as a plan of steps (train base and experts, align, SNR,
//! merge, consistency, zero-shot evaluation, selective fine-tuning), run resumably over seeds, with one results line
//! per fine-tuning run for `graft report`; or the study on a causal LM (`kind: llm`, `run_llm`), with one results
//! line per model.

pub mod collect;
pub mod plan;
pub mod runner;
pub mod steps;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

pub use plan::{Domain, Freeze, LlmPlan, LlmStage, Plan, Stage, Study};
use runner::{Outcome, Status};

use crate::error::{Error, Result};

/// What a whole experiment run did.
pub struct Summary {
    pub outcomes: Vec<Outcome>,
    pub results: PathBuf,
    pub lines: usize,
}

impl Summary {
    pub fn failed(&self) -> Vec<&Outcome> {
        self.outcomes.iter().filter(|o| matches!(o.status, Status::Failed { .. } | Status::Blocked { .. })).collect()
    }
}

/// Runs `plan` into `rundir` with `program` (the graft binary): phase one, then (knowing whether alignment changed
/// anything) phase two per seed, then collects the results lines. Finished steps of an earlier run are skipped.
pub fn run(plan: &Plan, rundir: &Path, program: &Path) -> Result<Summary> {
    std::fs::create_dir_all(rundir).map_err(|e| Error::io(rundir, e))?;
    let plan_copy = rundir.join("plan.yml");
    let yaml = yaml_serde::to_string(plan).map_err(|e| Error::invalid(format!("cannot serialise the plan: {e}")))?;
    std::fs::write(&plan_copy, yaml).map_err(|e| Error::io(&plan_copy, e))?;

    let one = steps::phase_one(plan, rundir);
    let mut two_by_seed = Vec::new();
    let mut total_two = 0;
    // Phase two's size is known only after phase one; the progress counter grows when it is planned.
    let mut outcomes = runner::run(program, rundir, &one, runner::progress(one.len()))?;
    for &seed in &plan.seeds {
        let dir = steps::seed_dir(rundir, seed);
        let results_dir = dir.join("results");
        std::fs::create_dir_all(&results_dir).map_err(|e| Error::io(&results_dir, e))?;
        let changed = plan.align
            && ["a", "b"].iter().any(|e| {
                collect::read_json(&dir.join(format!("align-{e}.json"))).is_ok_and(|v| collect::alignment_changed(&v))
            });
        let merges = steps::merges(plan, changed);
        let two = steps::phase_two(plan, rundir, seed, &merges);
        total_two += two.len();
        two_by_seed.push(two);
    }
    let two: Vec<runner::Step> = two_by_seed.into_iter().flatten().collect();
    // Phase two needs phase one's steps as dependencies: run them as already-finished predecessors.
    let mut all = one.clone();
    all.extend(two);
    let mut progress = runner::progress(total_two);
    let done_ids: Vec<String> = outcomes.iter().map(|o| o.id.clone()).collect();
    let second = runner::run(program, rundir, &all, |o| {
        if !done_ids.contains(&o.id) {
            progress(o)
        }
    })?;
    outcomes = second;

    let results = rundir.join("results.jsonl");
    let lines = collect::collect(rundir, &plan.seeds, &results, |_| Vec::new())?;
    Ok(Summary { outcomes, results, lines })
}

/// Runs an LLM study into `rundir` with `program` (the graft binary): the base's scan and perplexities, then per
/// seed the experts, the merges and every model's perplexities, then one results line per model. Finished steps of
/// an earlier run are skipped; with `keep_merged: false` a merged checkpoint is deleted once both its evaluations
/// have succeeded (and merged again by a later run only if one of them is missing).
pub fn run_llm(plan: &LlmPlan, rundir: &Path, program: &Path) -> Result<Summary> {
    std::fs::create_dir_all(rundir).map_err(|e| Error::io(rundir, e))?;
    let plan_copy = rundir.join("plan.yml");
    let yaml = yaml_serde::to_string(plan).map_err(|e| Error::invalid(format!("cannot serialise the plan: {e}")))?;
    std::fs::write(&plan_copy, yaml).map_err(|e| Error::io(&plan_copy, e))?;
    let mut eval_dirs = vec![rundir.join("eval")];
    eval_dirs.extend(plan.seeds.iter().map(|&s| steps::seed_dir(rundir, s).join("eval")));
    for d in &eval_dirs {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    let all = steps::llm_steps(plan, rundir);
    if !plan.keep_merged {
        // A deleted merge stays done while both its evaluations are; otherwise it is merged again.
        for &seed in &plan.seeds {
            for m in steps::llm_models(plan).into_iter().filter(|m| m.merge.is_some()) {
                let evaluated = ["a", "b"].iter().all(|d| steps::llm_eval_report(rundir, seed, &m.id, d).is_file());
                if !steps::seed_dir(rundir, seed).join(&m.id).exists() && !evaluated {
                    let _ = std::fs::remove_file(runner::marker_path(rundir, &format!("seed{seed}/{}", m.id)));
                }
            }
        }
    }
    // A merge's evaluations are its only readers: once both have succeeded it can go (B's is the later step).
    let mut merge_of_last_eval: BTreeMap<String, (String, PathBuf)> = BTreeMap::new();
    if !plan.keep_merged {
        for &seed in &plan.seeds {
            for m in steps::llm_models(plan).into_iter().filter(|m| m.merge.is_some()) {
                let eval_a = format!("seed{seed}/eval-{}-a", m.id);
                let dir = steps::seed_dir(rundir, seed).join(&m.id);
                merge_of_last_eval.insert(format!("seed{seed}/eval-{}-b", m.id), (eval_a, dir));
            }
        }
    }
    let mut progress = runner::progress(all.len());
    let mut succeeded: BTreeSet<String> = BTreeSet::new();
    let outcomes = runner::run(program, rundir, &all, |o| {
        progress(o);
        if matches!(o.status, Status::Failed { .. } | Status::Blocked { .. }) {
            return;
        }
        succeeded.insert(o.id.clone());
        if let Some((eval_a, dir)) = merge_of_last_eval.get(&o.id) {
            if succeeded.contains(eval_a) {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    })?;
    let results = rundir.join("results.jsonl");
    let lines = collect::collect_llm(plan, rundir, &results)?;
    Ok(Summary { outcomes, results, lines })
}
