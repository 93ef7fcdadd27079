//! The Slurm executor of `graft experiment --executor slurm`: each step of the plan that is not done becomes one
//! `sbatch` job, with `--dependency=afterok:` on the jobs of its predecessors, and `graft experiment --status`'s view of
//! a run directory. Owns everything that talks to Slurm (`sbatch`, `squeue`, `scontrol`, `scancel`), the per-step
//! job files in `RUNDIR/.steps/` (`ID.slurm`: the job id and the command it runs; `ID.step` and `ID.sbatch`: what
//! the job runs) and the resources asked for per step kind.
//!
//! A job runs `graft experiment --run-step RUNDIR/.steps/ID.step`, which runs the step exactly as the local executor
//! does (`runner::execute`: same command, same success marker, a failure marker with the exit code and log path),
//! with the job's `--output` (`RUNDIR/logs/ID.log`) as its log. Finished jobs vanish from `squeue` (and, after
//! `MinJobAge`, from `scontrol`); there is no accounting database to ask, so the markers are the record of how a step
//! ended, and a job that ended without either marker (cancelled, timed out, killed) is reported as such.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::runner::{self, Step};
use crate::error::{Arg, Error, Result};

/// How jobs are submitted: the scheduler's knobs from the command line, and what the jobs run.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub partition: Option<String>,
    pub account: Option<String>,
    /// Each job's time limit, as `sbatch --time` takes it.
    pub time: Option<String>,
    /// CPUs per step (default: the step's `--threads`, else 1).
    pub cpus: Option<usize>,
    /// Memory per step, as `sbatch --mem` takes it (default: by step kind, see `resources`).
    pub mem: Option<String>,
    /// Further `sbatch` arguments for every job, after graft's own (so they override them).
    pub extra: Vec<String>,
    /// The graft binary the jobs run, by absolute path (jobs may run as another user, elsewhere).
    pub program: PathBuf,
    /// The jobs' working directory (absolute): relative paths in the plan and the step commands resolve from it.
    pub workdir: PathBuf,
    /// graft's arguments (after the program) that carry the run on once the submitted jobs have ended: they submit
    /// what could not be planned yet and collect the results (`graft experiment RUNDIR/plan.yml ... --continuation`).
    pub continuation: Vec<String>,
    /// How often `--wait` asks `squeue` whether the jobs are still there.
    pub poll: Duration,
}

/// Where a step stands in one submission round.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    /// Finished with its current command (success marker), outputs present.
    Done,
    /// Its job is in the queue: submitted now (`fresh`) or by an earlier invocation.
    Pending { job: String, fresh: bool },
    /// It failed (failure marker), or its job ended without finishing it.
    Failed { error: String },
    /// A step it needs failed.
    Blocked { by: String },
}

/// `RUNDIR/.steps/ID.slurm`: the job last submitted for a step and the command it runs.
#[derive(Serialize, Deserialize)]
struct JobRecord {
    job: String,
    args: Vec<String>,
}

/// What `graft experiment --run-step` reads: the step and the run directory its markers go to.
#[derive(Serialize, Deserialize)]
pub struct StepFile {
    pub rundir: PathBuf,
    pub step: Step,
}

/// Fails with a usage error naming `sbatch` when it cannot be run.
pub fn check_sbatch() -> Result<()> {
    match Command::new("sbatch").arg("--version").output() {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::usage(
            "--executor slurm needs Slurm's `sbatch`, which is not on PATH (run on a Slurm login node, or use \
             --executor local)",
        )),
        Err(e) => Err(Error::usage(format!("{} slurm: cannot run `sbatch`: {e}", Arg::Executor))),
    }
}

/// The jobs Slurm still knows as queued or running, by id, with their state (`PENDING`, `RUNNING`, ...).
pub struct Queue {
    jobs: BTreeMap<String, String>,
}

impl Queue {
    /// Asks `squeue` for every job (a job id that left the queue is an error for `squeue -j`, so no filter).
    pub fn read() -> Result<Queue> {
        let out = Command::new("squeue")
            .args(["-h", "-o", "%i %T"])
            .output()
            .map_err(|e| Error::invalid(format!("cannot run `squeue`: {e}")))?;
        if !out.status.success() {
            return Err(Error::invalid(format!("`squeue` failed: {}", last_line(&out.stderr))));
        }
        let jobs = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once(' ').map(|(j, s)| (j.trim().to_string(), s.trim().to_string())))
            .collect();
        Ok(Queue { jobs })
    }

    /// No jobs at all (where `squeue` cannot be asked).
    pub fn empty() -> Queue {
        Queue { jobs: BTreeMap::new() }
    }

    /// The state of a job that has not ended yet, if it has not.
    pub fn alive(&self, job: &str) -> Option<&str> {
        let state = self.jobs.get(job)?;
        // Jobs just ending are listed for a moment as COMPLETED/FAILED/CANCELLED... with the terminal state.
        const ENDED: [&str; 8] =
            ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "OUT_OF_MEMORY"];
        (!ENDED.contains(&state.as_str())).then_some(state.as_str())
    }
}

/// A job's final state from `scontrol` (which forgets finished jobs after `MinJobAge`), for messages.
fn ended_state(job: &str) -> String {
    let out = Command::new("scontrol").args(["show", "job", "-o", job]).output();
    let text = out.ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    text.as_deref()
        .and_then(|t| t.split_whitespace().find_map(|kv| kv.strip_prefix("JobState=")))
        .map(str::to_string)
        .unwrap_or_else(|| "no longer known to Slurm".into())
}

fn record_path(rundir: &Path, id: &str) -> PathBuf {
    rundir.join(".steps").join(format!("{}.slurm", runner::file_safe(id)))
}

fn read_record(rundir: &Path, step: &Step) -> Option<JobRecord> {
    let text = std::fs::read_to_string(record_path(rundir, &step.id)).ok()?;
    serde_json::from_str::<JobRecord>(&text).ok().filter(|r| r.args == step.args)
}

fn ended_without_marker(rundir: &Path, step: &Step, job: &str) -> String {
    format!(
        "its Slurm job {job} ended ({}) without finishing the step; log {}",
        ended_state(job),
        runner::log_path(rundir, &step.id).display()
    )
}

/// CPUs, memory and GPUs for one step, by its subcommand: training and evaluation hold a model, its activations and
/// (training) its gradients and optimiser state; merging, alignment and conversion hold a few models; scans and
/// comparisons stream tensors. A step that trains or evaluates on `--device cuda...` gets one GPU.
pub fn resources(step: &Step, opts: &Options) -> (usize, String, usize) {
    let kind = step.args.first().map(String::as_str).unwrap_or("");
    let flag = |name: &str| step.args.iter().position(|a| a == name).and_then(|i| step.args.get(i + 1));
    let threads = flag("--threads").and_then(|t| t.parse::<usize>().ok());
    let cpus = opts.cpus.or(threads).unwrap_or(1);
    let mem = opts.mem.clone().unwrap_or_else(|| {
        match kind {
            "train" | "eval" => "8G",
            "merge" | "align" | "convert" => "4G",
            _ => "2G",
        }
        .to_string()
    });
    let gpu = matches!(kind, "train" | "eval") && flag("--device").is_some_and(|d| d.starts_with("cuda"));
    (cpus, mem, usize::from(gpu))
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn last_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message").trim().to_string()
}

/// `sbatch --parsable` with graft's options for one job; returns its id.
fn sbatch(opts: &Options, args: &[String], script: &Path) -> Result<String> {
    let mut cmd = Command::new("sbatch");
    cmd.arg("--parsable").args(args);
    for (flag, value) in [("--partition", &opts.partition), ("--account", &opts.account), ("--time", &opts.time)] {
        if let Some(v) = value {
            cmd.arg(format!("{flag}={v}"));
        }
    }
    cmd.args(&opts.extra).arg(script);
    let out = cmd.output().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            Error::usage(format!("{} slurm needs Slurm's `sbatch`, which is not on PATH", Arg::Executor))
        }
        _ => Error::invalid(format!("cannot run `sbatch`: {e}")),
    })?;
    if !out.status.success() {
        return Err(Error::invalid(format!("`sbatch {}` failed: {}", script.display(), last_line(&out.stderr))));
    }
    // `--parsable` prints `JOBID` or `JOBID;CLUSTER`.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let job = stdout.trim().split(';').next().unwrap_or("").to_string();
    if job.is_empty() || !job.chars().all(|c| c.is_ascii_digit() || c == '_') {
        return Err(Error::invalid(format!("`sbatch --parsable` printed no job id: {:?}", stdout.trim())));
    }
    Ok(job)
}

fn scancel(job: &str) {
    let _ = Command::new("scancel").arg(job).output();
}

fn write(path: &Path, text: &str) -> Result<()> {
    crate::files::write_atomic(path, text.as_bytes())
}

/// One pass over the steps: each is found done, found queued or running, found failed, or submitted now.
pub struct Round<'a> {
    opts: &'a Options,
    rundir: &'a Path,
    /// Submit again the steps whose last attempt failed or whose job ended without finishing them (a run the user
    /// started); a continuation or a later round of `--wait` reports them instead, so that a failing step is not
    /// retried for ever.
    retry_failed: bool,
    queue: Queue,
    states: BTreeMap<String, State>,
    order: Vec<String>,
    steps: BTreeMap<String, Step>,
}

impl<'a> Round<'a> {
    pub fn new(opts: &'a Options, rundir: &'a Path, retry_failed: bool) -> Result<Round<'a>> {
        runner::create_dirs(rundir)?;
        Ok(Round {
            opts,
            rundir,
            retry_failed,
            queue: Queue::read()?,
            states: BTreeMap::new(),
            order: Vec::new(),
            steps: BTreeMap::new(),
        })
    }

    pub fn state(&self, id: &str) -> Option<&State> {
        self.states.get(id)
    }

    /// Every step decided so far, in order.
    pub fn states(&self) -> Vec<(String, State)> {
        self.order.iter().map(|id| (id.clone(), self.states[id].clone())).collect()
    }

    /// The jobs of the steps still queued or running, with their steps.
    pub fn pending(&self) -> Vec<(String, String)> {
        self.order
            .iter()
            .filter_map(|id| match &self.states[id] {
                State::Pending { job, .. } => Some((job.clone(), id.clone())),
                _ => None,
            })
            .collect()
    }

    /// A step decided in this round.
    pub fn step(&self, id: &str) -> Option<&Step> {
        self.steps.get(id)
    }

    /// How many jobs this round submitted.
    pub fn submitted(&self) -> usize {
        self.states.values().filter(|s| matches!(s, State::Pending { fresh: true, .. })).count()
    }

    /// Decides `steps` in order (steps decided by an earlier call are kept as they are).
    pub fn add(&mut self, steps: &[Step]) -> Result<()> {
        let earlier: BTreeSet<String> = self.states.keys().cloned().collect();
        runner::check_order(steps, &earlier)?;
        for step in steps.iter().filter(|s| !earlier.contains(&s.id)) {
            let state = self.decide(step)?;
            self.states.insert(step.id.clone(), state);
            self.order.push(step.id.clone());
            self.steps.insert(step.id.clone(), step.clone());
        }
        Ok(())
    }

    fn decide(&mut self, step: &Step) -> Result<State> {
        let deps: Vec<(&String, &State)> = step.after.iter().map(|d| (d, &self.states[d])).collect();
        if let Some((d, _)) = deps.iter().find(|(_, s)| matches!(s, State::Failed { .. } | State::Blocked { .. })) {
            return Ok(State::Blocked { by: (*d).clone() });
        }
        let dep_jobs: Vec<String> = deps
            .iter()
            .filter_map(|(_, s)| match s {
                State::Pending { job, .. } => Some(job.clone()),
                _ => None,
            })
            .collect();
        let deps_resubmitted = deps.iter().any(|(_, s)| matches!(s, State::Pending { fresh: true, .. }));
        // A step whose inputs are still being made is not done, whatever its marker says.
        if dep_jobs.is_empty() && runner::is_done(self.rundir, step) {
            return Ok(State::Done);
        }
        let record = read_record(self.rundir, step);
        if let Some(r) = &record {
            if self.queue.alive(&r.job).is_some() {
                if !deps_resubmitted {
                    return Ok(State::Pending { job: r.job.clone(), fresh: false });
                }
                // It waits on inputs that are being made again: its job would read the old ones.
                scancel(&r.job);
            } else if !self.retry_failed {
                if let Some(f) = runner::failure(self.rundir, step) {
                    return Ok(State::Failed { error: f.error });
                }
                return Ok(State::Failed { error: ended_without_marker(self.rundir, step, &r.job) });
            }
        }
        let job = self.submit(step, &dep_jobs)?;
        self.queue.jobs.insert(job.clone(), "PENDING".into());
        Ok(State::Pending { job, fresh: true })
    }

    fn submit(&self, step: &Step, after: &[String]) -> Result<String> {
        let (rundir, opts) = (self.rundir, self.opts);
        let name = runner::file_safe(&step.id);
        let steps_dir = rundir.join(".steps");
        let step_file = steps_dir.join(format!("{name}.step"));
        let script = steps_dir.join(format!("{name}.sbatch"));
        let body = StepFile { rundir: rundir.to_path_buf(), step: step.clone() };
        write(&step_file, &serde_json::to_string_pretty(&body).unwrap())?;
        let step_file_abs = absolute(&opts.workdir, &step_file);
        write(
            &script,
            &format!(
                "#!/bin/sh\n# graft experiment step {}: written by `graft experiment --executor slurm`.\nexec {} \
                 experiment --run-step {}\n",
                step.id,
                shell_quote(&opts.program.display().to_string()),
                shell_quote(&step_file_abs.display().to_string())
            ),
        )?;
        for stale in [runner::marker_path(rundir, &step.id), runner::failure_path(rundir, &step.id)] {
            let _ = std::fs::remove_file(stale);
        }
        let (cpus, mem, gpus) = resources(step, opts);
        let log = absolute(&opts.workdir, &runner::log_path(rundir, &step.id));
        let mut args = vec![
            format!("--job-name=graft:{}", step.id),
            format!("--output={}", log.display()),
            format!("--chdir={}", opts.workdir.display()),
            // A step whose predecessor failed is cancelled rather than left pending for ever.
            "--kill-on-invalid-dep=yes".into(),
            "--ntasks=1".into(),
            format!("--cpus-per-task={cpus}"),
            format!("--mem={mem}"),
        ];
        if gpus > 0 {
            args.push(format!("--gpus={gpus}"));
        }
        if !after.is_empty() {
            args.push(format!("--dependency=afterok:{}", after.join(":")));
        }
        let job = sbatch(opts, &args, &script)?;
        let record = JobRecord { job: job.clone(), args: step.args.clone() };
        let path = record_path(rundir, &step.id);
        write(&path, &serde_json::to_string(&record).unwrap())?;
        Ok(job)
    }
}

fn absolute(workdir: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        workdir.join(p)
    }
}

fn continuation_record(rundir: &Path) -> PathBuf {
    rundir.join(".steps").join("continue.slurm")
}

/// Submits the job that carries the run on once `after` have all ended (successfully or not): it plans and submits
/// what could not be planned yet, and collects the results and writes the report when every step is done. An earlier
/// continuation still queued is cancelled (this one replaces it). Returns the job id.
pub fn submit_continuation(opts: &Options, rundir: &Path, after: &[String]) -> Result<String> {
    cancel_continuation(rundir)?;
    let record = continuation_record(rundir);
    let script = rundir.join(".steps").join("continue.sbatch");
    let mut line = vec![shell_quote(&opts.program.display().to_string())];
    line.extend(opts.continuation.iter().map(|a| shell_quote(a)));
    write(
        &script,
        &format!(
            "#!/bin/sh\n# Carries a graft experiment on: written by `graft experiment --executor slurm`.\nexec {}\n",
            line.join(" ")
        ),
    )?;
    let log = absolute(&opts.workdir, &rundir.join("logs").join("continue.log"));
    let args = vec![
        "--job-name=graft:continue".to_string(),
        format!("--output={}", log.display()),
        "--open-mode=append".into(),
        format!("--chdir={}", opts.workdir.display()),
        "--ntasks=1".into(),
        "--cpus-per-task=1".into(),
        "--mem=2G".into(),
        format!("--dependency=afterany:{}", after.join(":")),
    ];
    let job = sbatch(opts, &args, &script)?;
    write(&record, &job)?;
    Ok(job)
}

/// Cancels the run's follow-up job if it is queued or running, unless it is this very job.
pub fn cancel_continuation(rundir: &Path) -> Result<()> {
    let Ok(old) = std::fs::read_to_string(continuation_record(rundir)) else { return Ok(()) };
    let old = old.trim();
    let me = std::env::var("SLURM_JOB_ID").unwrap_or_default();
    if !old.is_empty() && old != me && Queue::read()?.alive(old).is_some() {
        scancel(old);
    }
    Ok(())
}

/// Waits until none of `jobs` (job id, step id) is queued or running, calling `on_end(step id)` as each ends.
pub fn wait(jobs: &[(String, String)], poll: Duration, mut on_end: impl FnMut(&str)) -> Result<()> {
    let mut left: Vec<&(String, String)> = jobs.iter().collect();
    while !left.is_empty() {
        std::thread::sleep(poll);
        let queue = Queue::read()?;
        left.retain(|(job, id)| {
            let alive = queue.alive(job).is_some();
            if !alive {
                on_end(id);
            }
            alive
        });
    }
    Ok(())
}

/// One step as `graft experiment --status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct StepStatus {
    pub id: String,
    /// done, queued, running, failed, blocked or not submitted.
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    pub log: PathBuf,
}

/// Where each of `steps` stands, from the markers, the job files and `queue`.
pub fn status(rundir: &Path, steps: &[Step], queue: &Queue) -> Vec<StepStatus> {
    let mut out: Vec<StepStatus> = Vec::new();
    let mut unfinished: BTreeMap<&str, bool> = BTreeMap::new(); // step -> failed or blocked
    for step in steps {
        let log = runner::log_path(rundir, &step.id);
        let record = read_record(rundir, step);
        let job = record.as_ref().map(|r| r.job.clone());
        let live = job.as_deref().and_then(|j| queue.alive(j));
        let broken = step.after.iter().find(|d| unfinished.get(d.as_str()).copied().unwrap_or(false));
        let (state, detail) = if let Some(s) = live {
            let state = match s {
                "PENDING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED" | "RESV_DEL_HOLD" => "queued",
                "RUNNING" | "COMPLETING" | "CONFIGURING" | "STAGE_OUT" | "SIGNALING" => "running",
                other => other,
            };
            (state.to_string(), (!matches!(state, "queued" | "running")).then(|| s.to_lowercase()))
        } else if runner::is_done(rundir, step) {
            ("done".into(), None)
        } else if let Some(d) = broken {
            // Its job, if it had one, was cancelled for want of its input (`--kill-on-invalid-dep`).
            ("blocked".into(), Some(format!("needs {d}")))
        } else if let Some(f) = runner::failure(rundir, step) {
            ("failed".into(), Some(f.error))
        } else if let Some(j) = &job {
            ("failed".into(), Some(ended_without_marker(rundir, step, j)))
        } else {
            ("not submitted".into(), None)
        };
        unfinished.insert(&step.id, matches!(state.as_str(), "failed" | "blocked"));
        out.push(StepStatus { id: step.id.clone(), state, job: live.and(job), detail, log });
    }
    out
}

/// The continuation job of a run directory, if one is queued or running: (job id, its state).
pub fn continuation(rundir: &Path, queue: &Queue) -> Option<(String, String)> {
    let job = std::fs::read_to_string(continuation_record(rundir)).ok()?.trim().to_string();
    let state = queue.alive(&job)?.to_lowercase();
    Some((job, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(args: &[&str]) -> Step {
        Step {
            id: "seed0/x".into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            outputs: vec![],
            after: vec![],
            stdout_to: None,
        }
    }

    #[test]
    fn resources_follow_the_step_kind_threads_and_device() {
        let opts = Options::default();
        assert_eq!(resources(&step(&["train", "--threads", "3"]), &opts), (3, "8G".into(), 0));
        assert_eq!(resources(&step(&["train", "--device", "cuda:0"]), &opts), (1, "8G".into(), 1));
        assert_eq!(resources(&step(&["merge", "a", "b"]), &opts), (1, "4G".into(), 0));
        assert_eq!(resources(&step(&["snr", "--device", "cuda"]), &opts), (1, "2G".into(), 0));
        let opts = Options { cpus: Some(4), mem: Some("1G".into()), ..Options::default() };
        assert_eq!(resources(&step(&["train", "--threads", "3"]), &opts), (4, "1G".into(), 0));
    }

    #[test]
    fn shell_quoting_survives_quotes_and_spaces() {
        let q = shell_quote("a b'c");
        let out = Command::new("sh").arg("-c").arg(format!("printf %s {q}")).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a b'c");
    }
}
