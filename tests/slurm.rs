//! On a real Slurm cluster (`tools/start-slurm`, which `.ci/run` calls): a 4-task job array scanning a zoo of small
//! checkpoints with `--shard auto` gathers to exactly the single-process result, and so does a 4-task array
//! comparing the zoo's pairs of task vectors (`graft similarity --shard auto`); `graft experiment --executor slurm`
//! gives the local run's results, resumes after a cancelled job without redoing finished steps, and reports a failed
//! step with its log (`--status` too). Skipped, saying so, where `sinfo` is absent or no node is up; the error for a
//! missing `sbatch` is checked everywhere.

use crate::support::graft;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use graft::checkpoint::{CheckpointWriter, Dtype, TensorDecl, WriterOptions};

fn slurm_up() -> bool {
    let Ok(out) = Command::new("sinfo").args(["-h", "-o", "%T"]).output() else {
        eprintln!("SKIPPED: no `sinfo` on this machine (tools/start-slurm installs and starts a one-node cluster)");
        return false;
    };
    let states = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !states.lines().any(|s| matches!(s.trim(), "idle" | "mixed" | "allocated")) {
        eprintln!("SKIPPED: Slurm is installed but no node is up (run tools/start-slurm as root)");
        return false;
    }
    true
}

fn write_zoo(zoo: &Path, n: usize) {
    std::fs::create_dir_all(zoo).unwrap();
    for m in 0..n {
        let decls = vec![TensorDecl::new("model.layers.0.mlp.up_proj.weight", Dtype::F32, vec![8, 6])];
        let path = zoo.join(format!("m{m:02}.safetensors"));
        let mut w = CheckpointWriter::create(&path, decls, WriterOptions::default()).unwrap();
        // A distinct, known spectrum per model: a diagonal plus a small model-dependent ripple.
        let mut v = vec![0f32; 48];
        for i in 0..6 {
            v[i * 6 + i] = (6 - i) as f32 + m as f32 * 0.25;
        }
        for (j, x) in v.iter_mut().enumerate() {
            *x += ((j * (m + 3)) % 7) as f32 * 0.01;
        }
        w.write_f32("model.layers.0.mlp.up_proj.weight", &v).unwrap();
        w.finish().unwrap();
    }
}

#[test]
fn job_array_gathers_to_the_single_process_result() {
    if !slurm_up() {
        return;
    }
    // slurmd runs the job on this machine as root, so the job's files live where the test can read them.
    let dir = tempfile::tempdir().unwrap();
    let zoo = dir.path().join("zoo");
    write_zoo(&zoo, 12);
    let graft = crate::support::BIN;
    let pattern = format!("{}/*", zoo.display());
    let single = dir.path().join("single.jsonl");
    let out = Command::new(graft).args(["snr", &pattern, "--resume"]).arg(&single).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let script = dir.path().join("array.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/bash\n#SBATCH --array=1-4\n#SBATCH --cpus-per-task=1\n#SBATCH --mem=200M\n\
             exec '{graft}' --threads 1 snr '{pattern}' --shard auto --resume \"{dir}/shard-$SLURM_ARRAY_TASK_ID.jsonl\"\n",
            dir = dir.path().display()
        ),
    )
    .unwrap();
    let logs = run_array(dir.path(), &script, "graft-shard-test");

    // The job wrote four shard files (array tasks 1..4 are shards 0..3), each with its manifest.
    let shards: Vec<String> = (1..=4).map(|t| format!("{}/shard-{t}.jsonl", dir.path().display())).collect();
    gathers_to_single(&shards, &[3, 3, 3, 3], &logs, &single);
}

/// The array's shard files (waited for: a finished job's files may show a moment later) have `sizes` lines and
/// gather to the single process's results file.
fn gathers_to_single(shards: &[String], sizes: &[usize], logs: &str, single: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !shards.iter().all(|s| Path::new(s).exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let got: Vec<usize> = shards.iter().map(|s| std::fs::read_to_string(s).unwrap().lines().count()).collect();
    assert_eq!(got, sizes, "{logs}");
    let gathered = single.with_file_name("gathered.jsonl");
    let out = crate::support::command(&[]).arg("gather").arg(&gathered).args(shards).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(&gathered).unwrap(), std::fs::read_to_string(single).unwrap());
}

/// Runs `script` (an `#SBATCH --array` job) to its end; returns the jobs' logs (`slurm-*` files in `dir`).
fn run_array(dir: &Path, script: &Path, name: &str) -> String {
    let out = Command::new("sbatch")
        .args(["--parsable", "--wait", &format!("--job-name={name}")])
        .arg(format!("--output={}/slurm-%A_%a.out", dir.display()))
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    let logs: String = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("slurm-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(out.status.success(), "sbatch: {}\n{logs}", String::from_utf8_lossy(&out.stderr));
    logs
}

#[test]
fn similarity_job_array_gathers_to_the_single_process_pairs() {
    if !slurm_up() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let zoo = dir.path().join("zoo");
    write_zoo(&zoo, 7);
    let base = dir.path().join("base.safetensors");
    std::fs::rename(zoo.join("m00.safetensors"), &base).unwrap();
    let graft = crate::support::BIN;
    let pattern = format!("{}/*", zoo.display());
    let single = dir.path().join("single.jsonl");
    let out = Command::new(graft)
        .args(["similarity", &pattern, "--base", &base.display().to_string(), "--resume"])
        .arg(&single)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let script = dir.path().join("pairs.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/bash\n#SBATCH --array=0-3\n#SBATCH --cpus-per-task=1\n#SBATCH --mem=200M\n\
             exec '{graft}' --threads 1 similarity '{pattern}' --base '{base}' --shard auto \
             --resume \"{dir}/pairs-$SLURM_ARRAY_TASK_ID.jsonl\"\n",
            base = base.display(),
            dir = dir.path().display()
        ),
    )
    .unwrap();
    let logs = run_array(dir.path(), &script, "graft-pairs-test");
    let shards: Vec<String> = (0..4).map(|t| format!("{}/pairs-{t}.jsonl", dir.path().display())).collect();
    // 6 models, 15 pairs over 4 tasks.
    gathers_to_single(&shards, &[4, 4, 4, 3], &logs, &single);
}

// graft experiment --executor slurm

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A small classifier study on the bundled digits: 15 steps (8 in phase one, 7 in phase two), seconds of work.
/// `hidden` and `expert_epochs` make the experts' training as slow as a test needs; `expert_a` may inject bad input.
fn write_plan(dir: &Path, hidden: &str, expert_epochs: usize, expert_a: &str) -> PathBuf {
    let digits = crate::support::fixture("data/digits");
    let plan = dir.join("plan.yml");
    std::fs::write(
        &plan,
        format!(
            "name: slurm executor test\ndata: idx:{}\narch: mlp\narch_options: {{hidden: \"{hidden}\"}}\nseeds: [0]\n\
             expert_a: [{expert_a}]\nbase: {{epochs: 2, lr: 0.005, batch: 64}}\n\
             experts: {{epochs: {expert_epochs}, lr: 0.001, batch: 64}}\nfinetune: {{epochs: 1, lr: 0.001, batch: 64}}\n\
             methods: [lerp]\ntop_p: [0.5, 1.0]\nsnr_average_variant: false\nfreeze: [head]\nthreads: 1\n",
            digits.display()
        ),
    )
    .unwrap();
    plan
}

/// A results line with what differs between runs of the same plan taken out: the run directory in paths, timings,
/// memory measurements and the run id (a hash of the configuration, paths included).
fn comparable(line: &str, rundir: &Path) -> serde_json::Value {
    let line = line.replace(&format!("{}/", rundir.display()), "RUNDIR/");
    let mut v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let o = v.as_object_mut().unwrap();
    o.remove("run_id");
    let metrics = o.get_mut("metrics").unwrap().as_object_mut().unwrap();
    metrics.retain(|k, _| !(k.ends_with("_s") || k.starts_with("peak_") || k == "samples_per_s"));
    for e in o.get_mut("epochs").and_then(|e| e.as_array_mut()).into_iter().flatten() {
        e.as_object_mut().unwrap().remove("time_s");
    }
    v
}

fn comparable_results(rundir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(rundir.join("results.jsonl")).unwrap();
    text.lines().map(|l| comparable(l, rundir)).collect()
}

fn status_json(rundir: &Path) -> serde_json::Value {
    let o = graft(&["experiment", "--status", rundir.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn states(status: &serde_json::Value) -> Vec<(String, String)> {
    let steps = status["steps"].as_array().unwrap();
    steps.iter().map(|s| (s["id"].as_str().unwrap().to_string(), s["state"].as_str().unwrap().to_string())).collect()
}

/// Waits (at most 5 minutes) until no step of `rundir` is queued or running and no follow-up job is left.
fn wait_until_idle(rundir: &Path) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let s = status_json(rundir);
        let busy = states(&s).iter().any(|(_, st)| st == "queued" || st == "running") || !s["follow_up_job"].is_null();
        if !busy {
            return s;
        }
        assert!(Instant::now() < deadline, "jobs still queued or running after 5 minutes: {s}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn experiment_under_slurm_gives_the_local_results() {
    if !slurm_up() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let plan = write_plan(dir.path(), "16", 1, "0, 1, 8, 9");
    let (local, slurm) = (dir.path().join("local"), dir.path().join("slurm"));
    let o = graft(&["experiment", plan.to_str().unwrap(), "-o", local.to_str().unwrap(), "--no-report"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = graft(&[
        "experiment",
        plan.to_str().unwrap(),
        "-o",
        slurm.to_str().unwrap(),
        "--executor",
        "slurm",
        "--wait",
        "--mem=500M",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("15 steps done (15 jobs submitted)"), "{}", text(&o));
    // The report was built from the collected results.
    assert!(slurm.join("report").join("index.html").is_file());
    let (l, s) = (comparable_results(&local), comparable_results(&slurm));
    assert_eq!(l.len(), 3);
    assert_eq!(l, s);
    // Each step ran in its own job with its log where the local executor keeps it.
    let log = std::fs::read_to_string(slurm.join("logs").join("seed0_align-a.log")).unwrap();
    assert!(!log.contains("error"), "{log}");
    let status = status_json(&slurm);
    assert_eq!(states(&status).len(), 15);
    assert!(states(&status).iter().all(|(_, s)| s == "done"), "{status}");
    // The run directory named another way (relative, from elsewhere) is the same run.
    let o = crate::support::command(&[])
        .args(["experiment", "--status", "slurm"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).ends_with("15 steps: 15 done\n"), "{}", text(&o));
}

#[test]
fn a_cancelled_job_is_resumed_without_redoing_finished_steps() {
    if !slurm_up() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Experts slow enough (seconds) to be cancelled while running.
    let plan = write_plan(dir.path(), "256,256", 150, "0, 1, 8, 9");
    let run = dir.path().join("run");
    let (plan_arg, run_arg) = (plan.to_str().unwrap(), run.to_str().unwrap());
    // Without --wait, graft returns once the jobs are submitted.
    let o = graft(&["experiment", plan_arg, "-o", run_arg, "--executor", "slurm", "--mem=500M"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("follow-up job"), "{}", text(&o));

    // Cancel expert A's job once it runs (the base has finished by then).
    let deadline = Instant::now() + Duration::from_secs(120);
    let job = loop {
        let s = status_json(&run);
        let expert_a = s["steps"].as_array().unwrap().iter().find(|x| x["id"] == "seed0/expert-a").unwrap().clone();
        if expert_a["state"] == "running" {
            break expert_a["job"].as_str().unwrap().to_string();
        }
        assert!(expert_a["state"] != "done", "expert A finished before it could be cancelled: {s}");
        assert!(Instant::now() < deadline, "expert A never ran: {s}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let o = Command::new("scancel").arg(&job).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let after_cancel = wait_until_idle(&run);
    let st: std::collections::BTreeMap<String, String> = states(&after_cancel).into_iter().collect();
    assert_eq!(st["seed0/base"], "done", "{after_cancel}");
    assert_eq!(st["seed0/expert-b"], "done", "{after_cancel}");
    assert_eq!(st["seed0/expert-a"], "failed", "{after_cancel}");
    let expert_a = after_cancel["steps"].as_array().unwrap().iter().find(|x| x["id"] == "seed0/expert-a").unwrap();
    assert!(expert_a["detail"].as_str().unwrap().contains(&format!("job {job} ended")), "{after_cancel}");
    // Its dependents were cancelled with it (not left pending for ever); the follow-up job then planned phase two
    // around the failure: the baseline ran, the merges (which need expert A) did not.
    assert!(["seed0/align-a", "seed0/snr-expert-a"].iter().all(|id| st[*id] == "blocked"), "{after_cancel}");
    assert_eq!(st["seed0/ft-base-full"], "done", "{after_cancel}");
    assert_eq!(st["seed0/merge-lerp-p0.5"], "blocked", "{after_cancel}");

    // What finished, and how: markers and job records, compared after the rerun.
    let finished: Vec<String> = st.iter().filter(|(_, s)| *s == "done").map(|(id, _)| id.replace('/', "_")).collect();
    assert!(finished.len() >= 4, "{finished:?}");
    let snapshot = |names: &[String]| -> Vec<(String, String, std::time::SystemTime)> {
        names
            .iter()
            .map(|n| {
                let marker = run.join(".steps").join(format!("{n}.json"));
                let job = std::fs::read_to_string(run.join(".steps").join(format!("{n}.slurm"))).unwrap();
                (n.clone(), job, std::fs::metadata(&marker).unwrap().modified().unwrap())
            })
            .collect()
    };
    let before = snapshot(&finished);

    // Rerun without --wait: the follow-up jobs submit phase two and collect the results and the report.
    let o = graft(&["experiment", plan_arg, "-o", run_arg, "--executor", "slurm", "--mem=500M"]);
    assert!(o.status.success(), "{}", text(&o));
    let end = wait_until_idle(&run);
    assert!(states(&end).iter().all(|(_, s)| s == "done"), "{end}");
    assert_eq!(states(&end).len(), 15, "{end}");
    assert_eq!(snapshot(&finished), before, "a finished step was submitted again");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !run.join("report").join("index.html").is_file() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(std::fs::read_to_string(run.join("results.jsonl")).unwrap().lines().count(), 3);
    assert!(run.join("report").join("index.html").is_file());
}

#[test]
fn a_failed_step_is_reported_with_its_log() {
    if !slurm_up() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Bad input: expert A asks for a class the digits do not have; `graft train` refuses it.
    let plan = write_plan(dir.path(), "16", 1, "0, 1, 42");
    let run = dir.path().join("run");
    let o = graft(&[
        "experiment",
        plan.to_str().unwrap(),
        "-o",
        run.to_str().unwrap(),
        "--executor",
        "slurm",
        "--wait",
        "--mem=500M",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let log = run.join("logs").join("seed0_expert-a.log");
    let out = text(&o);
    assert!(out.contains("step seed0/expert-a did not finish"), "{out}");
    assert!(out.contains("class 42 does not exist"), "{out}");
    assert!(out.contains(&log.display().to_string()), "{out}");
    assert!(std::fs::read_to_string(&log).unwrap().contains("class 42 does not exist"));

    let o = graft(&["experiment", "--status", run.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let lines = String::from_utf8_lossy(&o.stdout).into_owned();
    // `STATE (13 columns) ID[: why| (detail)]`
    let id_of = |l: &str| l.get(14..).and_then(|rest| rest.split([' ', ':']).next()).map(str::to_string);
    let line = |id: &str| lines.lines().find(|l| id_of(l).as_deref() == Some(id)).unwrap_or("").to_string();
    assert!(line("seed0/expert-a").starts_with("failed "), "{lines}");
    assert!(line("seed0/expert-a").contains(&log.display().to_string()), "{lines}");
    assert!(line("seed0/align-a").starts_with("blocked "), "{lines}");
    assert!(line("seed0/base").starts_with("done "), "{lines}");
    assert!(line("seed0/expert-b").starts_with("done "), "{lines}");
    // Phase two was planned around the failure: the baseline ran, the merges need expert A.
    assert!(line("seed0/ft-base-full").starts_with("done "), "{lines}");
    assert!(line("seed0/merge-lerp-p0.5").starts_with("blocked "), "{lines}");
}

#[test]
fn the_slurm_executor_without_sbatch_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let plan = write_plan(dir.path(), "16", 1, "0, 1, 8, 9");
    let empty = dir.path().join("no-slurm-here");
    std::fs::create_dir(&empty).unwrap();
    let o = crate::support::command(&[])
        .args(["experiment", plan.to_str().unwrap(), "-o", dir.path().join("run").to_str().unwrap()])
        .args(["--executor", "slurm"])
        .env("PATH", &empty)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("`sbatch`") && err.contains("not on PATH"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    // Slurm's options without the Slurm executor are usage errors too.
    let o = graft(&["experiment", plan.to_str().unwrap(), "-o", "unused", "--wait"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--wait needs --executor slurm"));
}
