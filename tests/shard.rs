//! `--shard K/N` and `graft gather` end to end: a small zoo scanned by one process and by shards (flags and the
//! environment of Slurm arrays and Kubernetes indexed Jobs) gathers to the same file, and gathers over incomplete or
//! overlapping shards fail naming what is wrong.

use crate::support::{graft, graft_env, s, strs, succeeded};

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

/// Runs `args` with `--resume FILE` as one process, then (after `between`) as `count` shards, the last one taking
/// its K/N from a Slurm array's environment and the others from `--shard K/N`; gathers the shards. Returns the
/// single process's results, the gathered results and the shard files.
fn single_and_gathered(
    dir: &Path,
    args: &[&str],
    count: usize,
    between: impl FnOnce(),
) -> (String, String, Vec<PathBuf>) {
    let single = dir.join("single.jsonl");
    succeeded(&graft(&[args, &["--resume", &s(&single)]].concat()), "single process");
    between();
    let files: Vec<PathBuf> = (0..count)
        .map(|k| {
            let file = dir.join(format!("part-{k}.jsonl"));
            let spec = format!("{k}/{count}");
            let out = if k + 1 == count {
                // A Slurm array `--array=3-(3+count-1)`: the last task is the last shard.
                let (id, n) = ((3 + k).to_string(), count.to_string());
                let env = [
                    ("SLURM_ARRAY_TASK_ID", id.as_str()),
                    ("SLURM_ARRAY_TASK_COUNT", &n),
                    ("SLURM_ARRAY_TASK_MIN", "3"),
                ];
                graft_env(&[args, &["--shard", "auto", "--resume", &s(&file)]].concat(), &env)
            } else {
                graft(&[args, &["--shard", &spec, "--resume", &s(&file)]].concat())
            };
            succeeded(&out, &format!("shard {spec}"));
            file
        })
        .collect();
    let gathered = dir.join("gathered.jsonl");
    let mut gather = vec!["gather".to_string(), s(&gathered)];
    gather.extend(files.iter().rev().map(|f| s(f)));
    succeeded(&graft(&strs(&gather)), "gather");
    let text = |p: &Path| std::fs::read_to_string(p).unwrap();
    (text(&single), text(&gathered), files)
}

/// Gathers `files` less shard `left_out`, and then all of them with `dup_line` (a line of shard 0) appended to the
/// last shard: both fail, naming the missing items and the shard, then the duplicated item.
fn gather_fails_naming(dir: &Path, files: &[PathBuf], left_out: usize, missing: &[&str], dup_names: &str) {
    let out = dir.join("bad.jsonl");
    let mut args = vec!["gather".to_string(), s(&out)];
    args.extend(files.iter().enumerate().filter(|(k, _)| *k != left_out).map(|(_, f)| s(f)));
    let r = graft(&strs(&args));
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("shards not given: {left_out}/{}", files.len())), "{err}");
    for m in missing {
        assert!(err.contains(m), "{m} not named: {err}");
    }
    let first = std::fs::read_to_string(&files[0]).unwrap().lines().next().unwrap().to_string();
    let last = files.last().unwrap();
    let mut text = std::fs::read_to_string(last).unwrap();
    text.push_str(&(first + "\n"));
    std::fs::write(last, text).unwrap();
    let mut args = vec!["gather".to_string(), s(&out)];
    args.extend(files.iter().map(|f| s(f)));
    let r = graft(&strs(&args));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        r.status.code() == Some(1) && err.contains("1 items recorded more than once") && err.contains(dup_names),
        "{err}"
    );
    assert!(!out.exists(), "no output from a failed gather");
}

#[test]
fn inspect_shards_gather_to_the_single_process_lines() {
    let dir = tempfile::tempdir().unwrap();
    let pattern = format!("{}/*", s(&zoo(dir.path(), 7)));
    let (single, gathered, files) = single_and_gathered(dir.path(), &["inspect", &pattern, "--summary"], 3, || {});
    assert_eq!(gathered, single);
    // The results lines are what --json prints, in sorted path order.
    assert_eq!(single, succeeded(&graft(&["inspect", "--json", &pattern]), "inspect --json"));
    assert_eq!(single.lines().count(), 7);
    // Shard 1 of 3 has m01 and m04.
    gather_fails_naming(dir.path(), &files, 1, &["m01.safetensors", "m04.safetensors"], "m00.safetensors");
}

/// A zoo of `n` models and a base of the same shapes beside it (the zoo's first model moved out).
fn zoo_and_base(dir: &Path, n: usize) -> (String, PathBuf) {
    let zoo = zoo(dir, n + 1);
    let base = dir.join("base.safetensors");
    std::fs::rename(zoo.join("m00.safetensors"), &base).unwrap();
    (format!("{}/*", s(&zoo)), base)
}

#[test]
fn similarity_pairs_gather_to_the_single_process_lines() {
    let dir = tempfile::tempdir().unwrap();
    let (pattern, base) = zoo_and_base(dir.path(), 5);
    let args = ["similarity", &pattern, "--base", &s(&base), "--by", "layer"];
    let (single, gathered, files) = single_and_gathered(dir.path(), &args, 3, || {});
    assert_eq!(gathered, single);
    let lines: Vec<serde_json::Value> = single.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 10, "5 models, 10 pairs");
    // Each pair's line is the two-model report of `graft similarity A B --json`, bit for bit, with its key.
    let mut models: Vec<String> =
        std::fs::read_dir(dir.path().join("zoo")).unwrap().map(|e| e.unwrap().path().display().to_string()).collect();
    models.sort();
    let mut k = 0;
    for a in 0..models.len() {
        for b in a + 1..models.len() {
            let two = succeeded(
                &graft(&["similarity", &models[a], &models[b], "--base", &s(&base), "--by", "layer", "--json"]),
                "pair",
            );
            let mut want: serde_json::Value = serde_json::from_str(&two).unwrap();
            let canon = |m: &str| std::fs::canonicalize(m).unwrap().display().to_string();
            want["pair"] = serde_json::json!([canon(&models[a]), canon(&models[b])]);
            assert_eq!(lines[k], want, "pair {a} {b}");
            k += 1;
        }
    }
    // Shard 1 of 3 has pairs 1, 4 and 7: (m01, m03), (m02, m03), (m03, m04) of m01..m05.
    let missing = ["m01.safetensors\",\"", "m02.safetensors\",\""];
    gather_fails_naming(dir.path(), &files, 1, &missing, "m01.safetensors");
    // A shard restarted resumes: nothing new is computed or appended.
    let again = graft(&[
        "similarity",
        &pattern,
        "--base",
        &s(&base),
        "--by",
        "layer",
        "--shard",
        "0/3",
        "--resume",
        &s(&files[0]),
    ]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("0 pairs compared"));
}

#[test]
fn similarity_over_a_zoo_needs_pairs_and_refuses_one_report() {
    let dir = tempfile::tempdir().unwrap();
    let (pattern, base) = zoo_and_base(dir.path(), 2);
    let one = format!("{}/zoo/m01.safetensors", s(dir.path()));
    let r = graft(&["similarity", &one, "--base", &s(&base), "--shard", "0/2"]);
    assert_eq!(r.status.code(), Some(2), "{}", String::from_utf8_lossy(&r.stderr));
    let r = graft(&["similarity", &pattern, "--base", &s(&base), "--json", "--shard", "0/2"]);
    assert_eq!(r.status.code(), Some(2), "{}", String::from_utf8_lossy(&r.stderr));
    for bad in ["2/2", "0/0", "x/2", "auto"] {
        let r = graft(&["similarity", &pattern, "--base", &s(&base), "--shard", bad]);
        assert_eq!(r.status.code(), Some(2), "--shard {bad}");
    }
}

#[test]
fn merge_config_batches_gather_to_the_single_process_lines_and_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let llama = crate::support::fixture("llama");
    let (a, b, base) = (llama.join("ft_a"), llama.join("ft_b"), llama.join("base"));
    let configs = dir.path().join("configs");
    std::fs::create_dir(&configs).unwrap();
    for (name, method, w) in [("lin-1", "linear", 0.2), ("lin-2", "linear", 0.7), ("ta", "task_arithmetic", 0.5)] {
        let base_line = if method == "linear" { String::new() } else { format!("base_model: {}\n", base.display()) };
        std::fs::write(
            configs.join(format!("{name}.yml")),
            format!(
                "merge_method: {method}\n{base_line}models:\n  - model: {}\n    parameters: {{weight: {w}}}\n  - model: {}\n    \
                 parameters: {{weight: 0.5}}\ndtype: float32\n",
                a.display(),
                b.display()
            ),
        )
        .unwrap();
    }
    // A multi-document config is one item: its second stage reads the first's output.
    std::fs::write(
        configs.join("staged.yaml"),
        format!(
            "name: first\nmerge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1.0}}\n  - model: {b}\n    \
             parameters: {{weight: 1.0}}\ndtype: float32\n---\nmerge_method: linear\nmodels:\n  - model: first\n    \
             parameters: {{weight: 0.5}}\n  - model: {base}\n    parameters: {{weight: 0.5}}\ndtype: float32\n",
            a = a.display(),
            b = b.display(),
            base = base.display()
        ),
    )
    .unwrap();
    let out = dir.path().join("merged");
    let pattern = format!("{}/*", s(&configs));
    let names = ["lin-1", "lin-2", "staged", "ta"];
    let read_outputs = || -> Vec<Vec<u8>> {
        names.iter().map(|n| std::fs::read(out.join(n).join("model.safetensors")).unwrap()).collect()
    };
    let mut single_bytes = Vec::new();
    let (single, gathered, files) = single_and_gathered(dir.path(), &["merge", &pattern, "-o", &s(&out)], 3, || {
        single_bytes = read_outputs();
        std::fs::remove_dir_all(&out).unwrap();
    });
    assert_eq!(gathered, single);
    assert_eq!(single.lines().count(), 4);
    assert!(read_outputs() == single_bytes, "the shards' merges are the single process's, byte for byte");
    assert!(out.join("staged.stages/first").exists());
    // Each line describes its output as written.
    let line: serde_json::Value = serde_json::from_str(single.lines().nth(3).unwrap()).unwrap();
    assert_eq!(line["method"], "task_arithmetic");
    assert_eq!(line["files"]["model.safetensors"], single_bytes[3].len() as u64);
    // Shard 1 of 3 has lin-2.yml only.
    gather_fails_naming(dir.path(), &files, 1, &["lin-2.yml"], "lin-1.yml");
    // A config batch takes configs only; two configs of one name would share an output.
    let r = graft(&["merge", &pattern, &s(&a), "-o", &s(&out)]);
    assert_eq!(r.status.code(), Some(2), "{}", String::from_utf8_lossy(&r.stderr));
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::copy(configs.join("ta.yml"), other.join("ta.yml")).unwrap();
    let r = graft(&["merge", &pattern, &s(&other.join("ta.yml")), "-o", &s(&out), "--shard", "0/2"]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.code() == Some(2) && err.contains("would both be merged into"), "{err}");
}
