//! `graft experiment`: the SNR-selective merging study as a plan of steps (train base and experts, align, SNR,
//! merge, consistency, zero-shot evaluation, selective fine-tuning), run resumably over seeds, with one results line
//! per fine-tuning run for `graft report`; or the study on a causal LM (`kind: llm`, `run_llm`), with one results
//! line per model. Steps run locally (`run`, `run_llm`: child processes, one after another) or as Slurm jobs
//! (`run_slurm`, with `slurm`); `status` shows where a run directory's steps stand.

pub(crate) mod collect;
pub(crate) mod plan;
pub mod runner;
pub mod slurm;
pub(crate) mod steps;

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
    write_plan_copy(rundir, plan)?;
    let one = steps::phase_one(plan, rundir);
    // Phase two's size is known only after phase one; the progress counter grows when it is planned.
    let mut outcomes = runner::run(program, rundir, &one, runner::progress(one.len()))?;
    create_results_dirs(plan, rundir)?;
    let two = phase_two(plan, rundir);
    // Phase two needs phase one's steps as dependencies: run them as already-finished predecessors.
    let mut all = one.clone();
    let mut progress = runner::progress(two.len());
    all.extend(two);
    let done_ids: Vec<String> = outcomes.iter().map(|o| o.id.clone()).collect();
    let second = runner::run(program, rundir, &all, |o| {
        if !done_ids.contains(&o.id) {
            progress(o)
        }
    })?;
    outcomes = second;

    let results = rundir.join("results.jsonl");
    let lines = collect::collect(rundir, &plan.seeds, &results, |l| collect::consistency_metrics(rundir, l))?;
    Ok(Summary { outcomes, results, lines })
}

/// Runs an LLM study into `rundir` with `program` (the graft binary): the base's scan and perplexities, then per
/// seed the experts, the merges and every model's perplexities, then one results line per model. Finished steps of
/// an earlier run are skipped; with `keep_merged: false` a merged checkpoint is deleted once both its evaluations
/// have succeeded (and merged again by a later run only if one of them is missing).
pub fn run_llm(plan: &LlmPlan, rundir: &Path, program: &Path) -> Result<Summary> {
    prepare_llm(plan, rundir)?;
    let all = steps::llm_steps(plan, rundir);
    let merge_of_last_eval = merges_by_last_eval(plan, rundir);
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

/// Keeps the plan being run in `RUNDIR/plan.yml` (what a Slurm continuation and `--status` read), and where the run
/// was started from in `RUNDIR/.steps/origin.json` (see `Origin`).
fn write_plan_copy(rundir: &Path, plan: &impl serde::Serialize) -> Result<()> {
    std::fs::create_dir_all(rundir).map_err(|e| Error::io(rundir, e))?;
    let plan_copy = rundir.join("plan.yml");
    let yaml = yaml_serde::to_string(plan).map_err(|e| Error::invalid(format!("cannot serialise the plan: {e}")))?;
    crate::files::write_atomic(&plan_copy, yaml.as_bytes())?;
    runner::create_dirs(rundir)?;
    let workdir = std::env::current_dir().map_err(|e| Error::io(".", e))?;
    let origin = Origin { rundir: rundir.to_path_buf(), workdir };
    let path = rundir.join(".steps").join("origin.json");
    crate::files::write_atomic(&path, serde_json::to_string(&origin).unwrap().as_bytes())
}

/// The run directory as the run named it and the directory it was started from: step commands and markers hold
/// paths in that form (relative ones resolve from `workdir`), so `--status` must plan the steps the same way.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Origin {
    pub rundir: PathBuf,
    pub workdir: PathBuf,
}

impl Origin {
    pub fn read(rundir: &Path) -> Option<Origin> {
        let text = std::fs::read_to_string(rundir.join(".steps").join("origin.json")).ok()?;
        serde_json::from_str(&text).ok()
    }
}

/// Phase two of every seed, planned from phase one's alignment reports (read once phase one has run).
/// Its fine-tuning steps' results directories are created by `create_results_dirs`.
fn phase_two(plan: &Plan, rundir: &Path) -> Vec<runner::Step> {
    let mut two = Vec::new();
    for &seed in &plan.seeds {
        let dir = steps::seed_dir(rundir, seed);
        let changed = plan.align
            && ["a", "b"].iter().any(|e| {
                collect::read_json(&dir.join(format!("align-{e}.json"))).is_ok_and(|v| collect::alignment_changed(&v))
            });
        let merges = steps::merges(plan, changed);
        two.extend(steps::phase_two(plan, rundir, seed, &merges));
    }
    two
}

fn create_results_dirs(plan: &Plan, rundir: &Path) -> Result<()> {
    for &seed in &plan.seeds {
        let dir = steps::seed_dir(rundir, seed).join("results");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    Ok(())
}

/// Before an LLM study's steps are decided: the plan copy, the evaluation directories, and (with `keep_merged:
/// false`) the markers of deleted merges that must be merged again because an evaluation of them is missing.
fn prepare_llm(plan: &LlmPlan, rundir: &Path) -> Result<()> {
    write_plan_copy(rundir, plan)?;
    let mut eval_dirs = vec![rundir.join("eval")];
    eval_dirs.extend(plan.seeds.iter().map(|&s| steps::seed_dir(rundir, s).join("eval")));
    for d in &eval_dirs {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
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
    Ok(())
}

/// With `keep_merged: false`: for the step id of each merge's last evaluation (B's), the id of its other evaluation
/// and the merged checkpoint, which can go once both have succeeded (they are its only readers).
fn merges_by_last_eval(plan: &LlmPlan, rundir: &Path) -> BTreeMap<String, (String, PathBuf)> {
    let mut map = BTreeMap::new();
    if !plan.keep_merged {
        for &seed in &plan.seeds {
            for m in steps::llm_models(plan).into_iter().filter(|m| m.merge.is_some()) {
                let eval_a = format!("seed{seed}/eval-{}-a", m.id);
                let dir = steps::seed_dir(rundir, seed).join(&m.id);
                map.insert(format!("seed{seed}/eval-{}-b", m.id), (eval_a, dir));
            }
        }
    }
    map
}

/// What `run_slurm` did.
pub struct SlurmSummary {
    /// Every step planned so far and where it stands.
    pub states: Vec<(String, slurm::State)>,
    /// Jobs submitted by this invocation (every round of `--wait`).
    pub submitted: usize,
    /// When jobs are still queued or running (without `--wait`): the continuation job that carries the run on.
    pub continuation: Option<String>,
    /// When every step has ended: the results file and its line count.
    pub results: Option<(PathBuf, usize)>,
}

impl SlurmSummary {
    /// Steps that failed, or cannot run because a step they need failed.
    pub fn failed(&self) -> Vec<&(String, slurm::State)> {
        self.states
            .iter()
            .filter(|(_, s)| matches!(s, slurm::State::Failed { .. } | slurm::State::Blocked { .. }))
            .collect()
    }
}

/// Runs a study as Slurm jobs. Each round decides every step that can be planned (done, already queued or running,
/// failed, or submitted now with `afterok` dependencies); a classifier study's phase two is planned once phase one
/// has ended. With `wait`, rounds repeat until no job is left, then the results are collected. Without it, a
/// continuation job (`opts.continuation`, after every pending job) does the next round, so the caller can leave;
/// `continuation` says this invocation is such a job, which reports failed steps rather than resubmitting them.
pub fn run_slurm(
    study: &Study,
    rundir: &Path,
    opts: &slurm::Options,
    wait: bool,
    continuation: bool,
) -> Result<SlurmSummary> {
    slurm::check_sbatch()?;
    if !continuation {
        // This invocation does what a queued follow-up job would (which could otherwise submit the same steps).
        slurm::cancel_continuation(rundir)?;
    }
    let mut retry_failed = !continuation;
    let mut submitted = 0;
    loop {
        let mut round = slurm::Round::new(opts, rundir, retry_failed)?;
        retry_failed = false;
        match study {
            Study::Classifier(plan) => {
                write_plan_copy(rundir, plan)?;
                let one = steps::phase_one(plan, rundir);
                round.add(&one)?;
                if !one.iter().any(|s| matches!(round.state(&s.id), Some(slurm::State::Pending { .. }))) {
                    create_results_dirs(plan, rundir)?;
                    round.add(&phase_two(plan, rundir))?;
                }
            }
            Study::Llm(plan) => {
                prepare_llm(plan, rundir)?;
                round.add(&steps::llm_steps(plan, rundir))?;
                for (eval_b, (eval_a, dir)) in merges_by_last_eval(plan, rundir) {
                    let done = |id: &str| round.state(id) == Some(&slurm::State::Done);
                    if done(&eval_a) && done(&eval_b) {
                        let _ = std::fs::remove_dir_all(dir);
                    }
                }
            }
        }
        submitted += round.submitted();
        let pending = round.pending();
        if pending.is_empty() {
            let states = round.states();
            let failed = states.iter().any(|(_, s)| !matches!(s, slurm::State::Done));
            let results = if failed { None } else { Some(collect_results(study, rundir)?) };
            return Ok(SlurmSummary { states, submitted, continuation: None, results });
        }
        if !wait {
            let jobs: Vec<String> = pending.iter().map(|(j, _)| j.clone()).collect();
            let job = slurm::submit_continuation(opts, rundir, &jobs)?;
            return Ok(SlurmSummary { states: round.states(), submitted, continuation: Some(job), results: None });
        }
        slurm::wait(&pending, opts.poll, |id| {
            let line = match round.step(id) {
                Some(s) if runner::is_done(rundir, s) => format!("done    {id}"),
                Some(s) => match runner::failure(rundir, s) {
                    Some(f) => format!("FAILED  {id}: {}", f.error),
                    None => format!("ended   {id} without finishing (log {})", runner::log_path(rundir, id).display()),
                },
                None => format!("ended   {id}"),
            };
            eprintln!("{line}");
        })?;
    }
}

fn collect_results(study: &Study, rundir: &Path) -> Result<(PathBuf, usize)> {
    let results = rundir.join("results.jsonl");
    let lines = match study {
        Study::Classifier(plan) => {
            collect::collect(rundir, &plan.seeds, &results, |l| collect::consistency_metrics(rundir, l))?
        }
        Study::Llm(plan) => collect::collect_llm(plan, rundir, &results)?,
    };
    Ok((results, lines))
}

/// Where every step of the run in `rundir` stands (`graft experiment --status`), from `RUNDIR/plan.yml`, the step
/// markers, the Slurm job files and `queue`. A classifier study's phase two is listed once every step of phase one has
/// ended (done, failed or blocked), as the executors plan it; the second value says whether it was left out.
pub fn status(rundir: &Path, queue: &slurm::Queue) -> Result<(Vec<slurm::StepStatus>, bool)> {
    let plan_copy = rundir.join("plan.yml");
    if !plan_copy.is_file() {
        return Err(Error::usage(format!("{}: not a graft experiment run directory (no plan.yml)", rundir.display())));
    }
    match Study::load(&plan_copy)? {
        Study::Classifier(plan) => {
            let mut all = steps::phase_one(&plan, rundir);
            let one = slurm::status(rundir, &all, queue);
            let ended = one.iter().all(|s| matches!(s.state.as_str(), "done" | "failed" | "blocked"));
            if !ended {
                return Ok((one, true));
            }
            all.extend(phase_two(&plan, rundir));
            Ok((slurm::status(rundir, &all, queue), false))
        }
        Study::Llm(plan) => Ok((slurm::status(rundir, &steps::llm_steps(&plan, rundir), queue), false)),
    }
}
