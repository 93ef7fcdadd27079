//! `--shard K/N` and `graft gather` end to end: a small zoo scanned by one process and by shards (flags and the
//! environment of Slurm arrays and Kubernetes indexed Jobs) gathers to the same file, and gathers over incomplete or
//! overlapping shards fail naming what is wrong.

use crate::support::{graft, graft_env, s, succeeded};

use std::path::{Path, PathBuf};

use graft::checkpoint::{CheckpointWriter, Dtype, TensorDecl, WriterOptions};

/// `n` small checkpoints with distinct pseudo-random weights (a fixed LCG, so every run sees the same zoo).
fn zoo(dir: &Path, n: usize) -> PathBuf {
    let zoo = dir.join("zoo");
    std::fs::create_dir(&zoo).unwrap();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    for m in 0..n {
        let names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"];
        let decls = names.iter().map(|n| TensorDecl::new(*n, Dtype::F32, vec![6, 5])).collect();
        let path = zoo.join(format!("m{m:02}.safetensors"));
        let mut w = CheckpointWriter::create(&path, decls, WriterOptions::default()).unwrap();
        for name in names {
            let v: Vec<f32> = (0..30).map(|_| next()).collect();
            w.write_f32(name, &v).unwrap();
        }
        w.finish().unwrap();
    }
    zoo
}

/// Scans the zoo as `count` shards with `--shard k/count`; returns the shard files.
fn scan_shards(dir: &Path, pattern: &str, count: usize) -> Vec<PathBuf> {
    (0..count)
        .map(|k| {
            let file = dir.join(format!("shard-{k}.jsonl"));
            let spec = format!("{k}/{count}");
            succeeded(&graft(&["snr", pattern, "--shard", &spec, "--resume", &s(&file)]), "shard scan");
            file
        })
        .collect()
}

#[test]
fn shards_gather_to_the_single_process_result() {
    let dir = tempfile::tempdir().unwrap();
    let pattern = format!("{}/*", s(&zoo(dir.path(), 9)));
    let single = dir.path().join("single.jsonl");
    succeeded(&graft(&["snr", &pattern, "--resume", &s(&single)]), "single scan");
    let single_text = std::fs::read_to_string(&single).unwrap();
    assert_eq!(single_text.lines().count(), 9);

    let files = scan_shards(dir.path(), &pattern, 4);
    let sizes: Vec<usize> = files.iter().map(|f| std::fs::read_to_string(f).unwrap().lines().count()).collect();
    assert_eq!(sizes, [3, 2, 2, 2], "round robin over 9 models");
    let gathered = dir.path().join("gathered.jsonl");
    let (gathered_arg, file_args) = (s(&gathered), files.iter().rev().map(|f| s(f)).collect::<Vec<_>>());
    let mut args = vec!["gather", gathered_arg.as_str()];
    args.extend(file_args.iter().map(String::as_str)); // any order of shard files
    succeeded(&graft(&args), "gather");
    assert_eq!(std::fs::read_to_string(&gathered).unwrap(), single_text);

    // A resumed shard does nothing new, and its file still gathers to the same result.
    let again = graft(&["snr", &pattern, "--shard", "0/4", "--resume", &s(&files[0])]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already in the resume file"));
    assert_eq!(std::fs::read_to_string(&files[0]).unwrap().lines().count(), 3);
}

#[test]
fn shard_from_slurm_array_and_indexed_job_environment() {
    let dir = tempfile::tempdir().unwrap();
    let pattern = format!("{}/*", s(&zoo(dir.path(), 5)));
    let by_flag = scan_shards(dir.path(), &pattern, 2);
    // A Slurm array --array=1-2: task 2 is shard 1 of 2.
    let slurm = dir.path().join("slurm.jsonl");
    let env = [("SLURM_ARRAY_TASK_ID", "2"), ("SLURM_ARRAY_TASK_COUNT", "2"), ("SLURM_ARRAY_TASK_MIN", "1")];
    succeeded(&graft_env(&["snr", &pattern, "--shard", "auto", "--resume", &s(&slurm)], &env), "slurm shard");
    assert_eq!(std::fs::read_to_string(&slurm).unwrap(), std::fs::read_to_string(&by_flag[1]).unwrap());
    // A Kubernetes indexed Job with completions 2: index 0 is shard 0 of 2.
    let k8s = dir.path().join("k8s.jsonl");
    let env = [("JOB_COMPLETION_INDEX", "0")];
    succeeded(&graft_env(&["snr", &pattern, "--shard-count", "2", "--resume", &s(&k8s)], &env), "k8s shard");
    assert_eq!(std::fs::read_to_string(&k8s).unwrap(), std::fs::read_to_string(&by_flag[0]).unwrap());
    let gathered = dir.path().join("all.jsonl");
    succeeded(&graft(&["gather", &s(&gathered), &s(&k8s), &s(&slurm)]), "gather");
    assert_eq!(std::fs::read_to_string(&gathered).unwrap().lines().count(), 5);
}

#[test]
fn gather_names_missing_and_duplicated_items() {
    let dir = tempfile::tempdir().unwrap();
    let pattern = format!("{}/*", s(&zoo(dir.path(), 6)));
    let files = scan_shards(dir.path(), &pattern, 3);
    let out_path = dir.path().join("out.jsonl");
    let out = s(&out_path);

    // Shard 1 of 3 (m01, m04) not given.
    let r = graft(&["gather", &out, &s(&files[0]), &s(&files[2])]);
    assert_eq!(r.status.code(), Some(1));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("2 of 6 items missing") && err.contains("m01") && err.contains("m04"), "{err}");
    assert!(err.contains("shards not given: 1/3") && err.trim().lines().count() == 1, "{err}");
    assert!(!out_path.exists(), "no output from a failed gather");

    // A shard cut short mid-line: its last item is missing, not a parse error.
    let cut = dir.path().join("cut.jsonl");
    let text = std::fs::read_to_string(&files[1]).unwrap();
    std::fs::write(&cut, &text[..text.len() - 10]).unwrap();
    std::fs::copy(format!("{}.shard.json", s(&files[1])), format!("{}.shard.json", s(&cut))).unwrap();
    let r = graft(&["gather", &out, &s(&files[0]), &s(&cut), &s(&files[2])]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.code() == Some(1) && err.contains("1 of 6 items missing") && err.contains("m04"), "{err}");

    // An item recorded by two shards.
    let first_line = std::fs::read_to_string(&files[0]).unwrap().lines().next().unwrap().to_string();
    let mut text = std::fs::read_to_string(&files[2]).unwrap();
    text.push_str(&first_line);
    text.push('\n');
    std::fs::write(&files[2], text).unwrap();
    let r = graft(&["gather", &out, &s(&files[0]), &s(&files[1]), &s(&files[2])]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.code() == Some(1) && err.contains("recorded more than once") && err.contains("m00"), "{err}");

    // The same shard twice is a usage error; a file without a manifest is named.
    let r = graft(&["gather", &out, &s(&files[0]), &s(&files[0])]);
    assert_eq!(r.status.code(), Some(2), "{}", String::from_utf8_lossy(&r.stderr));
    let bare = dir.path().join("bare.jsonl");
    std::fs::write(&bare, "").unwrap();
    let r = graft(&["gather", &out, &s(&bare)]);
    assert_eq!(r.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&r.stderr).contains("bare.jsonl"));
}

#[test]
fn invalid_shards_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let pattern = format!("{}/*", s(&zoo(dir.path(), 2)));
    for bad in ["2/2", "0/0", "x/2", "1", "auto"] {
        let r = graft(&["snr", &pattern, "--shard", bad]);
        assert_eq!(r.status.code(), Some(2), "--shard {bad}: {}", String::from_utf8_lossy(&r.stderr));
        let err = String::from_utf8_lossy(&r.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        let r = graft(&["inspect", &pattern, "--shard", bad]);
        assert_eq!(r.status.code(), Some(2));
    }
    // A shard restarted over another work list does not mix into its old results file.
    let file = dir.path().join("s.jsonl");
    succeeded(&graft(&["snr", &pattern, "--shard", "0/2", "--resume", &s(&file)]), "shard");
    let r = graft(&["snr", &pattern, "--shard", "0/3", "--resume", &s(&file)]);
    assert_eq!(r.status.code(), Some(2));
}

#[test]
fn inspect_shards_cover_the_paths_once() {
    let dir = tempfile::tempdir().unwrap();
    let zoo = zoo(dir.path(), 5);
    let mut paths: Vec<String> =
        std::fs::read_dir(&zoo).unwrap().map(|e| e.unwrap().path().display().to_string()).collect();
    paths.reverse(); // the partition sorts, so the order given does not matter
    let mut seen = Vec::new();
    for k in 0..3 {
        let spec = format!("{k}/3");
        let mut args = vec!["inspect", "--json", "--shard", &spec];
        args.extend(paths.iter().map(String::as_str));
        for line in succeeded(&graft(&args), "inspect shard").lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            seen.push(v["path"].as_str().unwrap().to_string());
        }
    }
    seen.sort();
    paths.sort();
    assert_eq!(seen, paths);
}
