//! `graft experiment PLAN.yml -o RUNDIR` and `graft demo`: run the SNR-selective merging study (on classifiers, or
//! with `kind: llm` on a causal LM), locally or as Slurm jobs (`--executor slurm`), then report it;
//! `graft experiment --status RUNDIR`: where each step stands; `--run-step` (hidden): one step inside a Slurm job.

use std::path::{Path, PathBuf};

use super::{emit, report::render_text, Global};
use crate::error::{Error, Result};
use crate::experiment::slurm::{Options as SlurmOptions, Queue as SlurmQueue, State, StepFile};
use crate::experiment::{self, runner, Plan, Study};
use crate::report::{bootstrap::DEFAULT_RESAMPLES, generate, Options};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The study plan (YAML; see docs/experiment.md).
    #[arg(required_unless_present_any = ["status", "run_step"])]
    plan: Option<PathBuf>,
    /// Run directory: checkpoints, logs, results.jsonl and the report. A rerun skips finished steps.
    #[arg(short = 'o', long = "output", required_unless_present_any = ["status", "run_step"])]
    output: Option<PathBuf>,
    /// Do not build the report at the end.
    #[arg(long)]
    no_report: bool,
    /// Where steps run: `local` (child processes, one after another) or `slurm` (one `sbatch` job per step; see
    /// docs/scale-out.md).
    #[arg(long, value_enum, default_value_t = Executor::Local)]
    executor: Executor,
    /// With --executor slurm: wait for every job, then collect the results and report (without it, graft returns
    /// once the jobs are submitted and a follow-up job finishes the run).
    #[arg(long)]
    wait: bool,
    /// With --executor slurm: the partition every job is submitted to.
    #[arg(long, value_name = "NAME")]
    partition: Option<String>,
    /// With --executor slurm: the account every job is charged to.
    #[arg(long, value_name = "NAME")]
    account: Option<String>,
    /// With --executor slurm: each job's time limit (as `sbatch --time` takes it, e.g. 2:00:00).
    #[arg(long, value_name = "LIMIT")]
    time: Option<String>,
    /// With --executor slurm: CPUs per step (default: the plan's threads, else 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    cpus: Option<u64>,
    /// With --executor slurm: memory per step, as `sbatch --mem` takes it (default: 8G for training and evaluation,
    /// 4G for merging, alignment and conversion, 2G for scans).
    #[arg(long, value_name = "SIZE")]
    mem: Option<String>,
    /// With --executor slurm: one more `sbatch` argument for every job (repeatable; given last, so it overrides).
    #[arg(long = "sbatch-arg", value_name = "ARG", allow_hyphen_values = true)]
    sbatch_args: Vec<String>,
    /// Show where each step of RUNDIR stands (done, queued, running, failed with its log, not submitted) and exit.
    #[arg(long, value_name = "RUNDIR", conflicts_with_all = ["plan", "output", "run_step"])]
    status: Option<PathBuf>,
    /// With --status: one JSON document instead of lines.
    #[arg(long, requires = "status")]
    json: bool,
    /// Runs one step inside a Slurm job (what the job scripts call).
    #[arg(long, hide = true, value_name = "STEP_FILE", conflicts_with_all = ["plan", "output"])]
    run_step: Option<PathBuf>,
    /// This invocation is the follow-up job of a Slurm run: report failed steps instead of resubmitting them.
    #[arg(long, hide = true)]
    continuation: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Executor {
    Local,
    Slurm,
}

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Run directory (a rerun resumes it).
    #[arg(short = 'o', long = "output", default_value = "graft-demo")]
    output: PathBuf,
}

/// The demo's data: 1,797 real 8x8 digits (UCI, CC BY 4.0; fixtures/data/digits/LICENSE.md), built into the binary
/// so the demo runs from any directory.
const DIGITS_IMAGES: &[u8] = include_bytes!("../../fixtures/data/digits/train-images-idx3-ubyte");
const DIGITS_LABELS: &[u8] = include_bytes!("../../fixtures/data/digits/train-labels-idx1-ubyte");

pub fn run(args: Args, global: &Global) -> Result<()> {
    if let Some(rundir) = &args.status {
        return status(rundir, args.json);
    }
    if let Some(step_file) = &args.run_step {
        return run_step(step_file);
    }
    let (Some(plan_path), Some(output)) = (&args.plan, &args.output) else {
        return Err(Error::usage("graft experiment needs a plan and -o RUNDIR"));
    };
    let mut plan = Study::load(plan_path)?;
    let threads = match &mut plan {
        Study::Classifier(p) => &mut p.threads,
        Study::Llm(p) => &mut p.threads,
    };
    if threads.is_none() {
        *threads = global.threads;
    }
    match args.executor {
        Executor::Local => {
            let slurm_only = [
                ("--wait", args.wait),
                ("--partition", args.partition.is_some()),
                ("--account", args.account.is_some()),
                ("--time", args.time.is_some()),
                ("--cpus", args.cpus.is_some()),
                ("--mem", args.mem.is_some()),
                ("--sbatch-arg", !args.sbatch_args.is_empty()),
                ("--continuation", args.continuation),
            ];
            if let Some((flag, _)) = slurm_only.iter().find(|(_, given)| *given) {
                return Err(Error::usage(format!("{flag} needs --executor slurm")));
            }
            study(&plan, output, !args.no_report)
        }
        Executor::Slurm => slurm_study(&plan, output, &args),
    }
}

/// The Slurm executor: submit (and with --wait, wait, collect and report).
fn slurm_study(plan: &Study, rundir: &Path, args: &Args) -> Result<()> {
    let program = std::env::current_exe().map_err(|e| Error::io("<graft executable>", e))?;
    let workdir = std::env::current_dir().map_err(|e| Error::io(".", e))?;
    // The follow-up job runs the plan copy the run keeps, with the same scheduler options.
    let mut continuation: Vec<String> = vec!["experiment".into(), rundir.join("plan.yml").display().to_string()];
    continuation.extend(["-o".into(), rundir.display().to_string(), "--executor".into(), "slurm".into()]);
    for (flag, value) in [("--partition", &args.partition), ("--account", &args.account), ("--time", &args.time)] {
        if let Some(v) = value {
            continuation.push(format!("{flag}={v}"));
        }
    }
    if let Some(c) = args.cpus {
        continuation.push(format!("--cpus={c}"));
    }
    if let Some(m) = &args.mem {
        continuation.push(format!("--mem={m}"));
    }
    continuation.extend(args.sbatch_args.iter().map(|a| format!("--sbatch-arg={a}")));
    if args.no_report {
        continuation.push("--no-report".into());
    }
    continuation.push("--continuation".into());
    let opts = SlurmOptions {
        partition: args.partition.clone(),
        account: args.account.clone(),
        time: args.time.clone(),
        cpus: args.cpus.map(|c| c as usize),
        mem: args.mem.clone(),
        extra: args.sbatch_args.clone(),
        program,
        workdir,
        continuation,
        poll: std::time::Duration::from_secs(2),
    };
    let t = std::time::Instant::now();
    let summary = experiment::run_slurm(plan, rundir, &opts, args.wait, args.continuation)?;
    let failed = summary.failed();
    if let Some(job) = &summary.continuation {
        let pending = summary.states.iter().filter(|(_, s)| matches!(s, State::Pending { .. })).count();
        eprintln!(
            "graft: {} jobs submitted, {pending} steps queued or running; follow-up job {job} submits the rest and \
             collects the results and the report into {} (`graft experiment --status {}` shows progress)",
            summary.submitted,
            rundir.display(),
            rundir.display()
        );
        return Ok(());
    }
    match &summary.results {
        Some((results, lines)) => {
            eprintln!(
                "graft: {} steps done ({} jobs submitted) in {:.1} s; {lines} results lines in {}",
                summary.states.len(),
                summary.submitted,
                t.elapsed().as_secs_f64(),
                results.display()
            );
            if !args.no_report && *lines > 0 {
                report(results, rundir)?;
            }
            Ok(())
        }
        None => {
            for (id, s) in &failed {
                let why = match s {
                    State::Failed { error } => error.clone(),
                    State::Blocked { by } => format!("needs {by}, which did not finish"),
                    _ => String::new(),
                };
                eprintln!("graft: step {id} did not finish: {why}");
            }
            Err(Error::invalid(format!(
                "{} of {} steps did not finish (logs in {})",
                failed.len(),
                summary.states.len(),
                rundir.join("logs").display()
            )))
        }
    }
}

/// `--status RUNDIR`: one line per step.
fn status(rundir: &Path, json: bool) -> Result<()> {
    let queue = match SlurmQueue::read() {
        Ok(q) => q,
        Err(e) => {
            eprintln!("graft: cannot ask Slurm about jobs ({e}); showing the step markers only");
            SlurmQueue::empty()
        }
    };
    // Step commands hold the run directory as the run named it, relative paths from where it started.
    let rundir = match experiment::Origin::read(rundir) {
        Some(o) if std::env::set_current_dir(&o.workdir).is_ok() => o.rundir,
        _ => rundir.to_path_buf(),
    };
    let rundir = rundir.as_path();
    let (mut steps, unplanned) = experiment::status(rundir, &queue)?;
    if let Ok(cwd) = std::env::current_dir() {
        for s in &mut steps {
            s.log = cwd.join(&s.log);
        }
    }
    let follow_up = experiment::slurm::continuation(rundir, &queue);
    if json {
        let doc = serde_json::json!({
            "rundir": rundir,
            "steps": steps,
            "phase_two_planned": !unplanned,
            "follow_up_job": follow_up.as_ref().map(|(j, s)| serde_json::json!({"job": j, "state": s})),
        });
        return emit(&format!("{}\n", serde_json::to_string_pretty(&doc).unwrap()));
    }
    let mut text = String::new();
    let mut counts: std::collections::BTreeMap<&str, usize> = Default::default();
    for s in &steps {
        *counts.entry(s.state.as_str()).or_default() += 1;
        let mut line = format!("{:<13} {}", s.state, s.id);
        if let Some(j) = &s.job {
            line.push_str(&format!(" (job {j})"));
        }
        match (s.state.as_str(), &s.detail) {
            ("failed", Some(d)) => line.push_str(&format!(": {d}")),
            ("failed", None) => line.push_str(&format!(": log {}", s.log.display())),
            (_, Some(d)) => line.push_str(&format!(" ({d})")),
            _ => {}
        }
        text.push_str(&line);
        text.push('\n');
    }
    if unplanned {
        text.push_str("(merging and fine-tuning steps are planned once every step above has ended)\n");
    }
    if let Some((job, state)) = follow_up {
        text.push_str(&format!("follow-up job {job} ({state}) submits what is left and collects the results\n"));
    }
    let summary: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
    text.push_str(&format!("{} steps: {}\n", steps.len(), summary.join(", ")));
    emit(&text)
}

/// `--run-step FILE` inside a Slurm job: the step, its markers and its log exactly as the local executor has them
/// (the job's output file is the log).
fn run_step(step_file: &Path) -> Result<()> {
    let text = std::fs::read_to_string(step_file).map_err(|e| Error::io(step_file, e))?;
    let f: StepFile =
        serde_json::from_str(&text).map_err(|e| Error::format(step_file, format!("not a step file: {e}")))?;
    let program = std::env::current_exe().map_err(|e| Error::io("<graft executable>", e))?;
    match runner::execute(&program, &f.rundir, &f.step, runner::Log::Inherit)? {
        runner::Status::Failed { error } => Err(Error::invalid(format!("step {} failed: {error}", f.step.id))),
        _ => Ok(()),
    }
}

fn report(results: &Path, rundir: &Path) -> Result<()> {
    let r = generate(
        std::slice::from_ref(&results.to_path_buf()),
        &rundir.join("report"),
        &Options { seed: 0, resamples: DEFAULT_RESAMPLES, ..Options::default() },
    )?;
    emit(&render_text(&r))
}

pub fn demo(args: DemoArgs, global: &Global) -> Result<()> {
    let data = args.output.join("data").join("digits");
    std::fs::create_dir_all(&data).map_err(|e| Error::io(&data, e))?;
    for (name, bytes) in [("train-images-idx3-ubyte", DIGITS_IMAGES), ("train-labels-idx1-ubyte", DIGITS_LABELS)] {
        let p = data.join(name);
        if std::fs::read(&p).ok().as_deref() != Some(bytes) {
            crate::files::write_atomic(&p, bytes)?;
        }
    }
    let mut plan = Plan::demo(&data);
    plan.threads = global.threads;
    study(&Study::Classifier(plan), &args.output, true)
}

fn study(plan: &Study, rundir: &Path, report: bool) -> Result<()> {
    let program = std::env::current_exe().map_err(|e| Error::io("<graft executable>", e))?;
    let t = std::time::Instant::now();
    let summary = match plan {
        Study::Classifier(p) => experiment::run(p, rundir, &program)?,
        Study::Llm(p) => experiment::run_llm(p, rundir, &program)?,
    };
    let failed = summary.failed();
    eprintln!(
        "graft: {} steps ({} failed or blocked) in {:.1} s; {} results lines in {}",
        summary.outcomes.len(),
        failed.len(),
        t.elapsed().as_secs_f64(),
        summary.lines,
        summary.results.display()
    );
    if report && summary.lines > 0 {
        self::report(&summary.results, rundir)?;
    }
    if failed.is_empty() {
        Ok(())
    } else {
        for o in &failed {
            eprintln!("graft: step {} did not finish: {}", o.id, serde_json::to_string(&o.status).unwrap_or_default());
        }
        Err(Error::invalid(format!(
            "{} of {} steps did not finish (logs in {})",
            failed.len(),
            summary.outcomes.len(),
            rundir.join("logs").display()
        )))
    }
}
