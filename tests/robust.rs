//! Hostile and edge-case inputs driven through the binary: NaN/Inf in inputs and overflowing outputs (refused,
//! then let through by `--allow-nonfinite` with a warning per tensor), zero-element tensors, special files as inputs,
//! out-of-range numeric flags, integer-vs-float dtype mismatches, and byte-identical outputs for any `--threads`.
//!
//! Test checkpoints are written here by a plain safetensors encoder (header JSON + little-endian data), independent
//! of graft's writer, so a writer bug cannot hide a reader bug.

use crate::support::st::{f32t, i32t, read_f32, write_st};
use crate::support::{fails, graft, run_ok, s, stderr};
use std::path::{Path, PathBuf};
use std::process::Command;

fn tmp(name: &str) -> PathBuf {
    crate::support::tmp("robust", name)
}

/// A base, a fine-tuned model with one NaN and one -Inf in `w`, and a clean second fine-tuned model.
fn nonfinite_models(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let base = dir.join("base.safetensors");
    let bad = dir.join("bad.safetensors");
    let good = dir.join("good.safetensors");
    write_st(&base, &[f32t("w", &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]), f32t("b", &[3], &[0.5, 0.5, 0.5])]);
    write_st(
        &bad,
        &[f32t("w", &[2, 3], &[1.5, f32::NAN, 3.5, f32::NEG_INFINITY, 5.5, 6.5]), f32t("b", &[3], &[0.25, 0.25, 0.25])],
    );
    write_st(&good, &[f32t("w", &[2, 3], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]), f32t("b", &[3], &[1.0, 1.0, 1.0])]);
    (base, bad, good)
}

#[test]
fn nonfinite_inputs_are_refused_naming_file_tensor_and_count_then_allowed_with_one_warning() {
    let dir = tmp("nonfinite");
    let (base, bad, good) = nonfinite_models(&dir);
    let (base, bad, good) = (s(&base), s(&bad), s(&good));
    let out = |n: &str| s(&dir.join(n));
    let tv = out("tv.safetensors");
    let commands: Vec<Vec<String>> = vec![
        vec![
            "merge".into(),
            bad.clone(),
            good.clone(),
            "--method".into(),
            "linear".into(),
            "-o".into(),
            out("m.safetensors"),
        ],
        vec!["diff".into(), bad.clone(), "--base".into(), base.clone(), "-o".into(), tv.clone()],
        vec!["convert".into(), bad.clone(), "-o".into(), out("c.safetensors")],
        vec!["interpolate".into(), bad.clone(), good.clone(), "--steps".into(), "3".into(), "-o".into(), out("interp")],
    ];
    for c in &commands {
        let args: Vec<&str> = c.iter().map(|x| x.as_str()).collect();
        let e = fails(&args, 1);
        assert!(e.contains(&bad) && e.contains("tensor 'w'") && e.contains("2 of 6"), "{args:?}: {e}");
        assert!(e.contains("--allow-nonfinite"), "{e}");
        let mut allowed = args.clone();
        allowed.extend(["--allow-nonfinite", "--force"]);
        let o = run_ok(&allowed);
        let err = stderr(&o);
        let warnings: Vec<&str> = err.lines().filter(|l| l.contains("warning") && l.contains(&bad)).collect();
        assert_eq!(warnings.len(), 1, "{args:?}: one warning for the bad input tensor: {err}");
        assert!(warnings[0].contains("tensor 'w'") && warnings[0].contains("2 of 6"), "{err}");
    }
    // The task vector written under the flag carries the NaN and -Inf: apply refuses it, naming the task vector.
    let e = fails(&["apply", &base, "--vector", &tv, "-o", &out("a.safetensors")], 1);
    assert!(e.contains(&tv) && e.contains("tensor 'w'") && e.contains("2 of 6"), "{e}");
    let o = run_ok(&["apply", &base, "--vector", &tv, "-o", &out("a.safetensors"), "--allow-nonfinite"]);
    assert!(stderr(&o).contains("warning"), "{}", stderr(&o));
    let applied = read_f32(&dir.join("a.safetensors"), "w");
    // base + (bad - base) = bad where finite; the NaN stays NaN and -Inf stays -Inf.
    assert_eq!(applied[0], 1.5);
    assert!(applied[1].is_nan() && applied[3] == f32::NEG_INFINITY);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn output_overflow_to_f16_is_refused_then_warned() {
    let dir = tmp("overflow");
    let input = dir.join("big.safetensors");
    // 65504 is f16's largest finite value; 65520 and above round to infinity (65519.99 rounds down to 65504).
    write_st(&input, &[f32t("w", &[4], &[65504.0, 65519.0, 65520.0, -1.0e6]), f32t("ok", &[1], &[1.0])]);
    let out = s(&dir.join("out.safetensors"));
    let e = fails(&["convert", &s(&input), "--dtype", "f16", "-o", &out], 1);
    assert!(e.contains("output tensor 'w'") && e.contains("2 of 4") && e.contains("F16"), "{e}");
    assert!(!Path::new(&out).exists(), "no output left behind after a refused overflow");
    let o = run_ok(&["convert", &s(&input), "--dtype", "f16", "-o", &out, "--allow-nonfinite"]);
    let err = stderr(&o);
    assert_eq!(err.lines().filter(|l| l.contains("warning") && l.contains("'w'")).count(), 1, "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn f32_sum_overflow_in_a_merge_is_reported() {
    let dir = tmp("sumoverflow");
    let [a, b] = ["a", "b"].map(|n| dir.join(format!("{n}.safetensors")));
    write_st(&a, &[f32t("w", &[2], &[f32::MAX, 1.0])]);
    write_st(&b, &[f32t("w", &[2], &[f32::MAX, 2.0])]);
    let out = s(&dir.join("m.safetensors"));
    // task_arithmetic-free linear merge with weights 1 and 1, not normalised: MAX + MAX overflows f32.
    let e =
        fails(&["merge", &s(&a), &s(&b), "--method", "linear", "--weight", "1", "--normalize", "false", "-o", &out], 1);
    assert!(e.contains("output tensor 'w'") && e.contains("1 of 2"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(unix)]
#[test]
fn a_fifo_as_input_is_refused_before_any_read() {
    let dir = tmp("fifo");
    let fifo = dir.join("model.safetensors");
    let st = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo runs");
    assert!(st.success());
    // Were the FIFO opened for reading, graft would block forever waiting for a writer; the test would hang.
    for args in [
        vec!["inspect".to_string(), s(&fifo)],
        vec!["convert".to_string(), s(&fifo), "-o".into(), s(&dir.join("o.safetensors"))],
    ] {
        let args: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
        let e = fails(&args, 2);
        assert!(e.contains(&s(&fifo)) && e.contains("FIFO"), "{e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn outputs_are_byte_identical_for_one_and_two_threads() {
    let dir = tmp("threads");
    let (base, _, good) = nonfinite_models(&dir);
    let other = dir.join("other.safetensors");
    write_st(&other, &[f32t("w", &[2, 3], &[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]), f32t("b", &[3], &[2.0, 2.0, 2.0])]);
    // Same output paths for both runs (the recorded command line names them), moved aside after each run.
    let (merged, converted) = (dir.join("m"), dir.join("c.safetensors"));
    for threads in ["1", "2"] {
        run_ok(&[
            "--threads",
            threads,
            "merge",
            &s(&good),
            &s(&other),
            "--base",
            &s(&base),
            "--method",
            "ties",
            "-o",
            &s(&merged),
        ]);
        std::fs::rename(&merged, dir.join(format!("m{threads}"))).unwrap();
        run_ok(&["convert", &s(&good), "--dtype", "bf16", "-o", &s(&converted), &format!("--threads={threads}")]);
        std::fs::rename(&converted, dir.join(format!("c{threads}.safetensors"))).unwrap();
    }
    for (a, b) in [("m1/model.safetensors", "m2/model.safetensors"), ("c1.safetensors", "c2.safetensors")] {
        let st = Command::new("cmp").arg(dir.join(a)).arg(dir.join(b)).status().expect("cmp runs");
        assert!(st.success(), "{a} and {b} differ");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_integer_tensor_against_a_float_one_is_an_error_naming_both_files() {
    let dir = tmp("dtypes");
    let [a, b] = ["a", "b"].map(|n| dir.join(format!("{n}.safetensors")));
    write_st(&a, &[f32t("w", &[2], &[1.0, 2.0]), i32t("ids", &[2], &[1, 2])]);
    write_st(&b, &[f32t("w", &[2], &[3.0, 4.0]), f32t("ids", &[2], &[1.0, 2.0])]);
    let e = fails(&["merge", &s(&a), &s(&b), "--method", "linear", "-o", &s(&dir.join("m.safetensors"))], 1);
    assert!(e.contains(&s(&a)) && e.contains(&s(&b)) && e.contains("'ids'"), "{e}");
    let e = fails(&["diff", &s(&a), "--base", &s(&b), "-o", &s(&dir.join("d.safetensors"))], 1);
    assert!(e.contains(&s(&a)) && e.contains(&s(&b)) && e.contains("ids I32 vs F32"), "{e}");
    let e = fails(&["interpolate", &s(&a), &s(&b), "--steps", "3", "-o", &s(&dir.join("i"))], 1);
    assert!(e.contains(&s(&a)) && e.contains(&s(&b)) && e.contains("'ids'"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn out_of_range_count_flags_are_usage_errors_not_panics() {
    let dir = tmp("flags");
    let (base, _, good) = nonfinite_models(&dir);
    let (base, good, out) = (s(&base), s(&good), s(&dir.join("o")));
    for (args, flag) in [
        (vec!["interpolate", &base, &good, "-o", &out, "--steps", "18446744073709551615"], "--steps"),
        (vec!["interpolate", &base, &good, "-o", &out, "--steps", "1e12"], "--steps"),
        (vec!["interpolate", &base, &good, "-o", &out, "--steps", "1"], "--steps"),
        (vec!["--threads", "100000000", "convert", &base, "-o", &out], "--threads"),
        (vec!["--threads", "0", "convert", &base, "-o", &out], "--threads"),
        (vec!["report", &base, "--resamples", "0"], "--resamples"),
        (vec!["align", &base, &good, "-o", &out, "--max-iter", "0"], "--max-iter"),
    ] {
        let o = graft(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(flag), "{args:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_model_that_differs_from_all_the_others_is_the_one_named() {
    let dir = tmp("odd-one-out");
    let [base, a, b] = ["base", "a", "b"].map(|n| dir.join(format!("{n}.safetensors")));
    // The base lacks 'bias', which both other models have: the base is at fault, not its partners.
    write_st(&base, &[f32t("w", &[2], &[1.0, 2.0])]);
    write_st(&a, &[f32t("w", &[2], &[1.5, 2.5]), f32t("bias", &[1], &[0.5])]);
    write_st(&b, &[f32t("w", &[2], &[2.0, 3.0]), f32t("bias", &[1], &[1.0])]);
    let out = s(&dir.join("m.safetensors"));
    let e = fails(&["merge", &s(&a), &s(&b), "--base", &s(&base), "--method", "ties", "-o", &out], 1);
    assert!(e.contains("base.safetensors lacks 'bias' (every other model has it)"), "{e}");
    assert!(!e.contains("has extra"), "the partners were blamed: {e}");
    // With a single partner nobody can tell which side is at fault: both are named, as before.
    let e = fails(&["merge", &s(&a), "--base", &s(&base), "--method", "task_arithmetic", "-o", &out], 1);
    assert!(e.contains("a.safetensors has extra 'bias'"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
