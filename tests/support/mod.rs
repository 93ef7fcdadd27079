//! What every integration test module shares: running the graft binary (hermetically: no model cache, Slurm array or
//! Kubernetes index from the caller's environment), reading its result, and finding fixtures. The submodules are
//! independent references: a plain safetensors codec (`st`), a PNG reader (`png`), f64 forward passes of the fixture
//! families (`forward`) and the llama fixtures' vocabulary (`llama_vocab`).

#![allow(dead_code)]

pub mod forward;
pub mod llama_vocab;
pub mod png;
pub mod st;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_graft");

/// Variables of the caller's environment that would change what graft does: where it finds Hugging Face models, and
/// which shard of a batch it is.
const AMBIENT: [&str; 5] =
    ["HF_HUB_CACHE", "HF_HOME", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "JOB_COMPLETION_INDEX"];

/// A graft command with `args`, the ambient variables removed.
pub fn command(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args);
    for k in AMBIENT {
        c.env_remove(k);
    }
    c
}

/// Runs graft with `args`.
pub fn graft(args: &[&str]) -> Output {
    command(args).output().expect("run graft")
}

/// Runs graft with `args` and the variables `env` set.
pub fn graft_env<V: AsRef<OsStr>>(args: &[&str], env: &[(&str, V)]) -> Output {
    let mut c = command(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run graft")
}

/// `out`'s stdout, after asserting that `what` succeeded (its stdout and stderr in the message otherwise).
pub fn succeeded(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("stdout is UTF-8")
}

/// Runs graft, asserting success; returns the whole output.
pub fn run_ok(args: &[&str]) -> Output {
    run_ok_env::<&str>(args, &[])
}

/// Runs graft with `env` set, asserting success; returns the whole output.
pub fn run_ok_env<V: AsRef<OsStr>>(args: &[&str], env: &[(&str, V)]) -> Output {
    let out = graft_env(args, env);
    succeeded(&out, &format!("graft {args:?}"));
    out
}

/// Runs graft, asserting success; returns its stdout.
pub fn ok(args: &[&str]) -> String {
    succeeded(&graft(args), &format!("graft {args:?}"))
}

/// Runs graft, asserting that it fails with a one-line error; returns the exit code and stderr.
pub fn fail(args: &[&str]) -> (i32, String) {
    fail_env::<&str>(args, &[])
}

/// `fail` with the variables `env` set.
pub fn fail_env<V: AsRef<OsStr>>(args: &[&str], env: &[(&str, V)]) -> (i32, String) {
    let out = graft_env(args, env);
    assert!(!out.status.success(), "graft {args:?} should have failed");
    let err = stderr(&out);
    assert_eq!(err.trim_end().lines().count(), 1, "graft {args:?}: one-line error expected: {err}");
    (out.status.code().expect("graft exited, not killed"), err)
}

/// Runs graft, asserting that it exits with `code` and a one-line, bounded error; returns stderr.
pub fn fails(args: &[&str], code: i32) -> String {
    let out = graft(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(code), "graft {args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "graft {args:?}: not one line: {err}");
    assert!(err.len() < 1200, "graft {args:?}: long error line: {err}");
    err
}

/// stderr of `out`, lossily decoded.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// The path of fixture `rel` (relative to `fixtures/`).
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(rel)
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Owned arguments as the `&[&str]` the runners take.
pub fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// A fresh, empty scratch directory for test `name` of suite `prefix`.
pub fn tmp(prefix: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("graft-{prefix}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
