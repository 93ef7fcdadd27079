//! `graft experiment`: the SNR-selective merging study as a plan of steps (train base and experts, align, SNR,
//! merge, consistency, zero-shot evaluation, selective fine-tuning), run resumably over seeds, with one results line
//! per fine-tuning run for `graft report`.

pub mod collect;
pub mod plan;
pub mod runner;
pub mod steps;

use std::path::{Path, PathBuf};

pub use plan::{Freeze, Plan, Stage};
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
