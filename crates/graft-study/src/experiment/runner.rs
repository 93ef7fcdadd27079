//! Running an experiment's steps as child processes of the graft binary, resumably.
//!
//! Each step is one graft subcommand in its own process: a training run's peak memory is then that run's own (a
//! process's peak RSS only grows, so in-process runs would report the largest so far), and a step that fails or
//! crashes cannot take the others down. A step that succeeds leaves a marker in `RUNDIR/.steps/` recording its
//! command; a rerun skips a step whose marker matches its command, whose outputs exist and none of whose
//! dependencies ran again. A failed step is reported (and leaves a failure marker with its error and log path) and
//! only the steps that need it are skipped. Running one step and recording its markers (`execute`) is shared with the
//! Slurm executor (`super::slurm`), whose job script runs the same step through `graft experiment --run-step`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Step {
    /// Unique, path-safe identifier (`seed0/merge-lerp-p0.15`).
    pub id: String,
    /// Arguments after the program.
    pub args: Vec<String>,
    /// Files or directories the step must leave behind to count as done.
    pub outputs: Vec<PathBuf>,
    /// Ids of the steps whose outputs this one reads.
    pub after: Vec<String>,
    /// Where the step's standard output is kept (its JSON report), if anywhere.
    pub stdout_to: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Status {
    Ran { secs: f64 },
    AlreadyDone,
    Failed { error: String },
    Blocked { by: String },
}

#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub id: String,
    #[serde(flatten)]
    pub status: Status,
}

#[derive(Serialize, Deserialize, PartialEq)]
struct Marker {
    args: Vec<String>,
}

/// What a failed step leaves in `RUNDIR/.steps/ID.failed`: its command, the error (last log line, exit code and log
/// path) and the log. Removed when the step is started again.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Failure {
    pub args: Vec<String>,
    pub error: String,
    pub log: PathBuf,
}

/// Where a step's standard error goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Log {
    /// Into `RUNDIR/logs/ID.log`, created afresh (the local executor).
    Create,
    /// Into this process's own standard error, which already is the step's log (a Slurm job's `--output`).
    Inherit,
}

/// Runs `steps` in order with `program` (normally the graft binary itself), keeping markers and logs under `rundir`.
pub fn run(program: &Path, rundir: &Path, steps: &[Step], mut on_done: impl FnMut(&Outcome)) -> Result<Vec<Outcome>> {
    check_order(steps, &BTreeSet::new())?;
    create_dirs(rundir)?;
    let mut index_of: BTreeMap<String, usize> = BTreeMap::new();
    let mut outcomes: Vec<Outcome> = Vec::new();
    for step in steps {
        let status_of = |d: &String| &outcomes[index_of[d]].status;
        let blocked =
            step.after.iter().find(|d| matches!(status_of(d), Status::Failed { .. } | Status::Blocked { .. }));
        let deps_reran = step.after.iter().any(|d| matches!(status_of(d), Status::Ran { .. }));
        let status = if let Some(b) = blocked {
            Status::Blocked { by: b.clone() }
        } else if !deps_reran && is_done(rundir, step) {
            Status::AlreadyDone
        } else {
            execute(program, rundir, step, Log::Create)?
        };
        let outcome = Outcome { id: step.id.clone(), status };
        on_done(&outcome);
        index_of.insert(step.id.clone(), outcomes.len());
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// Checks that every step's dependencies exist and come before it (or are among `earlier`, steps decided before).
pub fn check_order(steps: &[Step], earlier: &BTreeSet<String>) -> Result<()> {
    let ids: BTreeSet<&str> = steps.iter().map(|s| s.id.as_str()).collect();
    for (i, s) in steps.iter().enumerate() {
        let known = |d: &String| earlier.contains(d) || steps[..i].iter().any(|p| &p.id == d);
        if let Some(d) = s.after.iter().find(|d| !known(d)) {
            let why = if ids.contains(d.as_str()) { "comes later" } else { "does not exist" };
            return Err(Error::invalid(format!("step '{}' needs step '{d}', which {why}", s.id)));
        }
    }
    Ok(())
}

/// Creates `RUNDIR/.steps` (markers) and `RUNDIR/logs`.
pub fn create_dirs(rundir: &Path) -> Result<()> {
    for d in [rundir.join(".steps"), rundir.join("logs")] {
        std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
    }
    Ok(())
}

/// Runs one step (its standard error into its log, its standard output into `stdout_to`) and records the outcome:
/// the success marker, or the failure marker. Either marker of an earlier attempt is removed first, so an attempt
/// cut short (killed, cancelled) leaves neither.
pub fn execute(program: &Path, rundir: &Path, step: &Step, log: Log) -> Result<Status> {
    let marker = marker_path(rundir, &step.id);
    let failure = failure_path(rundir, &step.id);
    let _ = std::fs::remove_file(&marker);
    let _ = std::fs::remove_file(&failure);
    let log_path = log_path(rundir, &step.id);
    let t = Instant::now();
    match run_one(program, step, &log_path, log) {
        Ok(()) => {
            let m = serde_json::to_string(&Marker { args: step.args.clone() }).unwrap();
            crate::files::write_atomic(&marker, m.as_bytes())?;
            Ok(Status::Ran { secs: t.elapsed().as_secs_f64() })
        }
        Err(error) => {
            let f = Failure { args: step.args.clone(), error: error.clone(), log: log_path };
            crate::files::write_atomic(&failure, serde_json::to_string(&f).unwrap().as_bytes())?;
            Ok(Status::Failed { error })
        }
    }
}

/// Where a finished step's marker is kept; removing it makes the next run redo the step and everything after it.
pub fn marker_path(rundir: &Path, id: &str) -> PathBuf {
    rundir.join(".steps").join(format!("{}.json", file_safe(id)))
}

/// Where a failed step's failure marker is kept.
pub fn failure_path(rundir: &Path, id: &str) -> PathBuf {
    rundir.join(".steps").join(format!("{}.failed", file_safe(id)))
}

/// Where a step's log is kept.
pub fn log_path(rundir: &Path, id: &str) -> PathBuf {
    rundir.join("logs").join(format!("{}.log", file_safe(id)))
}

/// Whether `step` finished with its current command and its outputs are all there.
pub fn is_done(rundir: &Path, step: &Step) -> bool {
    let Ok(text) = std::fs::read_to_string(marker_path(rundir, &step.id)) else { return false };
    let Ok(m) = serde_json::from_str::<Marker>(&text) else { return false };
    m.args == step.args && step.outputs.iter().all(|p| p.exists()) && step.stdout_to.as_ref().is_none_or(|p| p.exists())
}

/// The failure marker of `step`'s last attempt with its current command, if that attempt failed.
pub fn failure(rundir: &Path, step: &Step) -> Option<Failure> {
    let text = std::fs::read_to_string(failure_path(rundir, &step.id)).ok()?;
    serde_json::from_str::<Failure>(&text).ok().filter(|f| f.args == step.args)
}

fn run_one(program: &Path, step: &Step, log: &Path, to: Log) -> std::result::Result<(), String> {
    let stderr = match to {
        Log::Create => Stdio::from(std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?),
        Log::Inherit => Stdio::inherit(),
    };
    let mut cmd = Command::new(program);
    cmd.args(&step.args).stdin(Stdio::null()).stderr(stderr);
    cmd.stdout(if step.stdout_to.is_some() { Stdio::piped() } else { Stdio::null() });
    let out = cmd.output().map_err(|e| format!("cannot start {}: {e}", program.display()))?;
    if !out.status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message").to_string();
        return Err(format!("{} (exit {}; log {})", last, out.status.code().unwrap_or(-1), log.display()));
    }
    if let Some(to) = &step.stdout_to {
        let tmp = to.with_extension("partial");
        std::fs::write(&tmp, &out.stdout).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, to).map_err(|e| format!("{}: {e}", to.display()))?;
    }
    if let Some(missing) = step.outputs.iter().find(|p| !p.exists()) {
        return Err(format!("finished but left no {}", missing.display()));
    }
    Ok(())
}

/// `id` as a file name: `/` and anything else not portable become `_`.
pub fn file_safe(id: &str) -> String {
    id.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' }).collect()
}

/// A one-line progress printer for steps on stderr (a bar when attached to a terminal).
pub fn progress(total: usize) -> impl FnMut(&Outcome) {
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(total as u64);
        b.set_style(indicatif::ProgressStyle::with_template("{pos}/{len} [{bar:30}] {elapsed} {msg}").unwrap());
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    move |o: &Outcome| {
        let line = match &o.status {
            Status::Ran { secs } => format!("done    {} ({secs:.1} s)", o.id),
            Status::AlreadyDone => format!("skipped {} (already done)", o.id),
            Status::Failed { error } => format!("FAILED  {}: {error}", o.id),
            Status::Blocked { by } => format!("blocked {} (needs {by})", o.id),
        };
        bar.suspend(|| eprintln!("{line}"));
        bar.inc(1);
        bar.set_message(o.id.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(id: &str, script: &str, outputs: &[&Path], after: &[&str]) -> Step {
        Step {
            id: id.into(),
            args: vec!["-c".into(), script.into()],
            outputs: outputs.iter().map(|p| p.to_path_buf()).collect(),
            after: after.iter().map(|s| s.to_string()).collect(),
            stdout_to: None,
        }
    }

    #[test]
    fn reruns_skip_finished_steps_and_failures_block_only_dependents() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let (a, b, c) = (d.join("a"), d.join("b"), d.join("c"));
        let count = d.join("count");
        let steps = vec![
            sh("a", &format!("echo x >> {0}; touch {1}", count.display(), a.display()), &[&a], &[]),
            sh("b", &format!("test -e {0} && touch {1}", d.join("go").display(), b.display()), &[&b], &["a"]),
            sh("c", &format!("touch {}", c.display()), &[&c], &["b"]),
            sh("d", "true", &[], &["a"]),
        ];
        let sh_path = Path::new("/bin/sh");
        let first = run(sh_path, d, &steps, |_| {}).unwrap();
        assert!(matches!(first[0].status, Status::Ran { .. }));
        assert!(matches!(first[1].status, Status::Failed { .. }));
        assert_eq!(first[2].status, Status::Blocked { by: "b".into() });
        assert!(matches!(first[3].status, Status::Ran { .. }));
        // The failure is recorded with its exit code and log; the success marker is not.
        let failed = failure(d, &steps[1]).unwrap();
        assert!(failed.error.contains("exit 1") && failed.log == log_path(d, "b"), "{failed:?}");
        assert!(!marker_path(d, "b").exists() && is_done(d, &steps[0]));

        // "Interrupt", fix the cause, rerun: a is not redone; b and then c run.
        std::fs::write(d.join("go"), "").unwrap();
        let second = run(sh_path, d, &steps, |_| {}).unwrap();
        assert_eq!(second[0].status, Status::AlreadyDone);
        assert!(matches!(second[1].status, Status::Ran { .. }));
        assert!(matches!(second[2].status, Status::Ran { .. }));
        assert_eq!(second[3].status, Status::AlreadyDone);
        assert!(failure(d, &steps[1]).is_none() && is_done(d, &steps[1]));
        assert_eq!(std::fs::read_to_string(&count).unwrap(), "x\n");

        // A lost output reruns its step and everything downstream of it.
        std::fs::remove_file(&a).unwrap();
        let third = run(sh_path, d, &steps, |_| {}).unwrap();
        assert!(third.iter().all(|o| matches!(o.status, Status::Ran { .. })), "{third:?}");
        assert_eq!(std::fs::read_to_string(&count).unwrap(), "x\nx\n");
    }

    #[test]
    fn a_dependency_on_an_unknown_step_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let steps = vec![sh("a", "true", &[], &["zzz"])];
        let e = run(Path::new("/bin/sh"), tmp.path(), &steps, |_| {}).unwrap_err().to_string();
        assert_eq!(e, "step 'a' needs step 'zzz', which does not exist");
    }
}
