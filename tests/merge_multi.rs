//! Multi-document configs (mergekit-multi) through the binary on `fixtures/llama`: stages run in dependency order
//! with named intermediates, the result equals the same merges chained by hand and an f64 reference of the
//! arithmetic, current stages are skipped and stale ones (changed config, changed input) re-run, and malformed files
//! are one-line usage errors.

use crate::support::st;
use crate::support::{graft, run_ok, s};

use std::path::Path;
use std::time::SystemTime;

fn fx(p: &str) -> String {
    crate::support::fixture("llama").join(p).display().to_string()
}

fn mtime(p: &Path) -> SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

/// Stage `avg` averages the two fine-tunes; the unnamed output adds half of its task vector to the base. Written
/// with the output document first, so the order must come from the references.
fn two_stage(weight_b: f64) -> String {
    format!(
        "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: avg\n    parameters: {{weight: 0.5}}\n\
         dtype: float32\n---\nname: avg\nmerge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1.0}}\n\
         \x20 - model: {b}\n    parameters: {{weight: {weight_b}}}\ndtype: float32\n",
        base = fx("base"),
        a = fx("ft_a"),
        b = fx("ft_b"),
    )
}

const PROBE: &str = "model.layers.1.mlp.down_proj.weight";

#[test]
fn stages_chain_like_separate_merges_and_match_the_arithmetic() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = d.join("multi.yml");
    std::fs::write(&config, two_stage(1.0)).unwrap();
    let out = d.join("merged");
    run_ok(&["merge", &s(&config), "-o", &s(&out), "--threads", "2"]);
    let stages = d.join("merged.stages");
    assert!(stages.join("avg/model.safetensors").is_file(), "the named stage is an intermediate beside the output");
    assert!(stages.join("avg.stamp.json").is_file() && stages.join("output.stamp.json").is_file());

    // The same two merges run by hand, the second reading the first's output.
    let first = d.join("first.yml");
    let avg = d.join("avg-by-hand");
    std::fs::write(&first, two_stage(1.0).split("---\n").nth(1).unwrap().replace("name: avg\n", "")).unwrap();
    run_ok(&["merge", &s(&first), "-o", &s(&avg)]);
    let second = d.join("second.yml");
    std::fs::write(
        &second,
        two_stage(1.0).split("---\n").next().unwrap().replace("model: avg", &format!("model: {}", avg.display())),
    )
    .unwrap();
    let by_hand = d.join("by-hand");
    run_ok(&["merge", &s(&second), "-o", &s(&by_hand)]);
    let header = st::header(&by_hand.join("model.safetensors"));
    for name in header.as_object().unwrap().keys().filter(|k| *k != "__metadata__") {
        assert_eq!(
            st::read_f32(&out.join("model.safetensors"), name),
            st::read_f32(&by_hand.join("model.safetensors"), name),
            "{name}"
        );
    }

    // f64 reference: base + 0.5 * ((a + b) / 2 - base), from the bf16 fixtures read independently.
    let read = |m: &str| bf16_tensor(&Path::new(&fx(m)).join("model.safetensors"), PROBE);
    let (base, a, b) = (read("base"), read("ft_a"), read("ft_b"));
    let got = st::read_f32(&out.join("model.safetensors"), PROBE);
    for i in 0..got.len() {
        let avg = (a[i] + b[i]) / 2.0;
        let want = base[i] + 0.5 * (avg - base[i]);
        assert!((got[i] as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()), "{PROBE}[{i}]: {} vs {want}", got[i]);
    }
}

/// A BF16 tensor of a safetensors file as f64, with a plain parser.
fn bf16_tensor(path: &Path, name: &str) -> Vec<f64> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(h[name]["dtype"], "BF16");
    let [s, e] = [0, 1].map(|i| h[name]["data_offsets"][i].as_u64().unwrap() as usize);
    bytes[8 + n + s..8 + n + e]
        .chunks_exact(2)
        .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16) as f64)
        .collect()
}

#[test]
fn current_stages_are_skipped_and_stale_ones_rerun() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = d.join("multi.yml");
    std::fs::write(&config, two_stage(1.0)).unwrap();
    let out = d.join("merged");
    let stages = d.join("work");
    let args = |force: bool| {
        let mut v =
            vec!["merge".to_string(), s(&config), "-o".into(), s(&out), "--intermediate-dir".into(), s(&stages)];
        if force {
            v.push("--force".into());
        }
        v
    };
    let run = |force: bool| {
        let a = args(force);
        let o = run_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
        String::from_utf8(o.stderr).unwrap()
    };
    run(false);
    let (avg_file, out_file) = (stages.join("avg/model.safetensors"), out.join("model.safetensors"));
    let (t_avg, t_out) = (mtime(&avg_file), mtime(&out_file));

    // Nothing changed: both stages are skipped (no --force needed, nothing is rewritten).
    let e = run(false);
    assert!(
        e.contains("stage 'avg' (document 2) is up to date") && e.contains("unnamed stage (document 1) is up to date"),
        "{e}"
    );
    assert_eq!((mtime(&avg_file), mtime(&out_file)), (t_avg, t_out));

    // The intermediate's config changed: it re-runs, and so does the output that reads it (its input changed).
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&config, two_stage(3.0)).unwrap();
    let o = graft(&args(false).iter().map(String::as_str).collect::<Vec<_>>());
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "a stale output is replaced only with --force: {e}");
    assert!(e.contains("exists and stage 'avg' (document 2) is out of date; pass --force"), "{e}");
    assert_eq!(mtime(&avg_file), t_avg, "refused before any stage ran");
    let e = run(true);
    assert!(!e.contains("up to date"), "{e}");
    assert!(mtime(&avg_file) > t_avg && mtime(&out_file) > t_out);
    let (t_avg, t_out) = (mtime(&avg_file), mtime(&out_file));

    // Only the output document changed: the intermediate is current and skipped.
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&config, two_stage(3.0).replace("weight: 0.5", "weight: 0.25")).unwrap();
    let e = run(true);
    assert!(
        e.contains("stage 'avg' (document 2) is up to date") && !e.contains("unnamed stage (document 1) is up"),
        "{e}"
    );
    assert_eq!(mtime(&avg_file), t_avg);
    assert!(mtime(&out_file) > t_out);

    // An input model changed on disk (a rewritten copy): every stage reading it re-runs.
    let copy = d.join("ft_b");
    std::fs::create_dir(&copy).unwrap();
    for f in std::fs::read_dir(fx("ft_b")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, copy.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::write(&config, two_stage(3.0).replace(&fx("ft_b"), &s(&copy))).unwrap();
    run(true);
    let t_avg = mtime(&avg_file);
    assert!(run(true).contains("is up to date"));
    std::thread::sleep(std::time::Duration::from_millis(20));
    let weights = copy.join("model.safetensors");
    std::fs::write(&weights, std::fs::read(&weights).unwrap()).unwrap();
    let e = run(true);
    assert!(!e.contains("stage 'avg' (document 2) is up to date"), "{e}");
    assert!(mtime(&avg_file) > t_avg);
}

#[test]
fn all_named_stages_write_the_last_document_and_dry_run_lists_the_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let text = format!(
        "name: avg\nmerge_method: linear\nmodels:\n  - model: {a}\n  - model: {b}\nparameters: {{weight: 1}}\n---\n\
         name: final\nmerge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: avg\nparameters: {{t: 0.3}}\n",
        a = fx("ft_a"),
        b = fx("ft_b"),
        base = fx("base")
    );
    let config = d.join("named.yaml");
    std::fs::write(&config, text).unwrap();
    let out = d.join("out");
    let plan = String::from_utf8(run_ok(&["merge", &s(&config), "-o", &s(&out), "--dry-run"]).stdout).unwrap();
    let lines: Vec<&str> = plan.lines().collect();
    assert!(lines[0].starts_with("1/2 stage 'avg' (document 1) -> ") && lines[0].ends_with("out.stages/avg"), "{plan}");
    assert!(lines[1].starts_with("2/2 stage 'final' (document 2) -> ") && lines[1].ends_with(", reads avg"), "{plan}");
    assert!(!out.exists() && !d.join("out.stages").exists(), "--dry-run writes nothing");
    run_ok(&["merge", &s(&config), "-o", &s(&out)]);
    assert!(out.join("model.safetensors").is_file() && out.join("tokenizer.json").is_file());
    assert!(!d.join("out.stages/final").exists(), "the output stage is written to the output path only");
}

#[test]
fn malformed_multi_document_configs_are_one_line_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let linear = |name: &str, reads: &str| {
        format!("name: {name}\nmerge_method: linear\nmodels:\n  - model: {reads}\n  - model: {}\nparameters: {{weight: 1}}\n", fx("ft_a"))
    };
    let cases = [
        (
            format!("{}---\n{}---\n{}", linear("x", "y"), linear("y", "x"), linear("z", "x").replace("name: z\n", "")),
            "cycle: x -> y -> x",
        ),
        (format!("{}---\n{}", linear("x", &fx("ft_b")), linear("x", &fx("ft_b"))), "duplicate stage name 'x'"),
        (
            format!("{}---\nname: y\nmerge_method: nope\nmodels: [{{model: x}}]\n", linear("x", &fx("ft_b"))),
            "stage 'y' (document 2)",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let config = d.join(format!("bad{i}.yml"));
        std::fs::write(&config, text).unwrap();
        let o = graft(&["merge", &s(&config), "-o", &s(&d.join(format!("out{i}")))]);
        let e = String::from_utf8(o.stderr).unwrap();
        assert_eq!(o.status.code(), Some(2), "{e}");
        assert!(e.contains(want) && e.contains(&format!("bad{i}.yml")) && e.trim_end().lines().count() == 1, "{e}");
    }
    let single = d.join("single.yml");
    std::fs::write(&single, linear("x", &fx("ft_b")).replace("name: x\n", "")).unwrap();
    let o = graft(&["merge", &s(&single), "-o", &s(&d.join("o")), "--intermediate-dir", &s(d)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--intermediate-dir applies to multi-document configs only"));
}
