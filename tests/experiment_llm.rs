//! `graft experiment` with `kind: llm` end to end on the tiny llama fixture: two text domains, experts fine-tuned
//! from the base's SNR selection, merges at two top-p values, every model's perplexity on both domains, the report,
//! and a rerun that redoes nothing. Checked against independent computations: the experts' frozen tensors are the
//! base's bytes, a task-arithmetic merge equals base + (A - base) + (B - base) recomputed in f64 from the files, and
//! each results line's perplexities are the `graft eval` reports' own.

use crate::support::graft;
use crate::support::llama_vocab;

use std::path::{Path, PathBuf};
use std::process::Command;

use graft::checkpoint::Checkpoint;
use llama_vocab::vocabulary;

fn fixture(name: &str) -> PathBuf {
    crate::support::fixture("llama").join(name)
}

/// A learnable stream of `words` words: a cycle of `period` words starting at word `first` with step `stride`, one
/// word in eight replaced by a seeded pseudo-random one.
fn domain_text(words: usize, first: usize, period: usize, stride: usize, seed: u64) -> String {
    let vocab = vocabulary();
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..words)
        .map(|i| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let r = (state >> 33) as usize;
            let k = if r.is_multiple_of(8) { 3 + r % 100 } else { first + (i * stride) % period };
            vocab[k].as_str()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn plan_text(dir: &Path, keep_merged: bool) -> String {
    let d = |f: &str| format!("text:{}", dir.join(f).display());
    format!(
        "kind: llm\nname: fixture study\nbase: {}\n\
         domain_a: {{name: cycles, train: '{}', test: '{}'}}\n\
         domain_b: {{name: strides, train: '{}', test: '{}'}}\n\
         seeds: [0]\nunfrozen_percent: 50\n\
         experts: {{epochs: 2, lr: 0.003, batch: 4, max_len: 32}}\neval_max_len: 32\n\
         methods: [linear, task_arithmetic]\ntop_p: [0.5, 1.0]\nkeep_merged: {keep_merged}\nthreads: 2\n",
        fixture("base").display(),
        d("a-train.txt"),
        d("a-test.txt"),
        d("b-train.txt"),
        d("b-test.txt"),
    )
}

fn floats(ck: &Checkpoint, name: &str) -> Vec<f32> {
    ck.tensor(name).unwrap().to_f32().unwrap()
}

#[test]
fn llm_study_trains_selectively_merges_evaluates_both_domains_reports_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for (file, words, first, period, stride, seed) in [
        ("a-train.txt", 1200, 3, 13, 7, 1),
        ("a-test.txt", 300, 3, 13, 7, 2),
        ("b-train.txt", 1200, 40, 29, 3, 3),
        ("b-test.txt", 300, 40, 29, 3, 4),
    ] {
        std::fs::write(dir.join(file), domain_text(words, first, period, stride, seed)).unwrap();
    }
    let plan = dir.join("plan.yml");
    std::fs::write(&plan, plan_text(dir, true)).unwrap();
    let run = dir.join("run");
    let o = graft(&["experiment", plan.to_str().unwrap(), "-o", run.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let table = String::from_utf8_lossy(&o.stdout);
    for row in ["| base (baseline) |", "| expert A (cycles) |", "| linear top-50% |", "| task_arithmetic all layers |"]
    {
        assert!(table.contains(row), "missing row {row}:\n{table}");
    }
    assert!(run.join("report").join("index.html").is_file());
    // The study's own charts: perplexity per domain (a bar per model) and the gain each merge keeps.
    for chart in ["perplexity_per_domain", "gain_kept_per_merge"] {
        assert!(run.join("report/plots").join(format!("{chart}.png")).is_file(), "no chart {chart}");
    }
    // The page loads in headless Chromium (exit 3: none installed, as on machines without it).
    let page = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/check-report-page"))
        .arg(run.join("report"))
        .arg(tmp.path().join("screenshot.png"))
        .output()
        .unwrap();
    match page.status.code() {
        Some(3) => eprintln!("skipping the browser check of the report page: no Chromium installed"),
        code => assert_eq!(code, Some(0), "report page check failed: {}", String::from_utf8_lossy(&page.stderr)),
    }

    // Every model (base, 2 experts, 2 methods x 2 top-p) has both domains' perplexities, the eval reports' own.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(run.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 7);
    let seed0 = run.join("seed-0");
    let eval_nll = |file: PathBuf| -> f64 {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        v["nll"].as_f64().unwrap()
    };
    for line in &lines {
        let model = line["config"]["model"].as_str().unwrap();
        let eval_dir = if model == "base" { run.join("eval") } else { seed0.join("eval") };
        for (key, name) in [("a", "cycles"), ("b", "strides")] {
            let ppl = line["metrics"][format!("perplexity_{name}")].as_f64().unwrap();
            let nll = eval_nll(eval_dir.join(format!("{model}-{key}.json")));
            assert!((ppl - nll.exp()).abs() <= 1e-12 * ppl, "{model} on {name}: {ppl} vs exp({nll})");
        }
    }
    let metric = |model: &str, m: &str| -> f64 {
        lines.iter().find(|l| l["config"]["model"] == model).unwrap()["metrics"][m].as_f64().unwrap()
    };
    // Fine-tuning lowered each expert's perplexity on its own domain; by definition it keeps all of its own gain.
    assert!(metric("expert-a", "perplexity_cycles") < metric("base", "perplexity_cycles"));
    assert!(metric("expert-b", "perplexity_strides") < metric("base", "perplexity_strides"));
    assert_eq!(metric("expert-a", "gain_kept_cycles"), 1.0);
    let total_params: usize = Checkpoint::open(fixture("base")).unwrap().iter().map(|v| v.numel()).sum();
    let trainable = metric("expert-a", "trainable_params");
    assert!(trainable > 0.0 && trainable < total_params as f64, "{trainable} of {total_params}");

    // The experts trained only what the base's SNR scan unfroze: every other tensor is the base's bytes.
    let unfrozen: serde_json::Value =
        yaml_serde::from_str(&std::fs::read_to_string(run.join("snr-base-unfrozen.yaml")).unwrap()).unwrap();
    let patterns: Vec<regex::Regex> = unfrozen["unfrozen_parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| regex::Regex::new(p.as_str().unwrap()).unwrap())
        .collect();
    assert!(!patterns.is_empty());
    let base = Checkpoint::open(fixture("base")).unwrap();
    let experts =
        [Checkpoint::open(seed0.join("expert-a")).unwrap(), Checkpoint::open(seed0.join("expert-b")).unwrap()];
    for e in &experts {
        let mut changed = 0;
        for v in base.iter() {
            let w = e.tensor(v.name).unwrap();
            if patterns.iter().any(|p| p.is_match(v.name)) {
                changed += (w.data != v.data) as usize;
            } else {
                assert_eq!(w.data, v.data, "frozen tensor {} changed", v.name);
            }
        }
        assert!(changed > 0, "an expert trained nothing");
    }

    // Task arithmetic of all layers: base + (A - base) + (B - base), in f64 from the files, rounded to bf16 (an
    // ulp of slack for f32 against f64 arithmetic; cancellation gets an absolute allowance). At top-p 0.5 every
    // tensor is either that or the base's bytes.
    let close = |merged: f32, reference: f64, scale: f64| {
        (merged as f64 - reference).abs() <= reference.abs() / 128.0 + 1e-6 * scale
    };
    for (dir, whole) in [("merge-task_arithmetic-p1", true), ("merge-task_arithmetic-p0.5", false)] {
        let merged = Checkpoint::open(seed0.join(dir)).unwrap();
        let mut merged_differs = 0;
        for v in base.iter() {
            let m = merged.tensor(v.name).unwrap();
            let is_base = m.data == v.data;
            let (b, a, bb) = (floats(&base, v.name), floats(&experts[0], v.name), floats(&experts[1], v.name));
            let got = floats(&merged, v.name);
            let recomputed = (0..b.len()).all(|i| {
                let r = b[i] as f64 + (a[i] as f64 - b[i] as f64) + (bb[i] as f64 - b[i] as f64);
                let scale = (b[i].abs()).max(a[i].abs()).max(bb[i].abs()) as f64;
                close(got[i], r, scale)
            });
            assert!(recomputed || (!whole && is_base), "{dir}: {} is neither the recomputation nor the base", v.name);
            merged_differs += (!is_base) as usize;
        }
        assert!(merged_differs > 0, "{dir} is the base");
    }

    // A rerun redoes nothing; with keep_merged: false it deletes the merged checkpoints, whose results stay.
    let before = std::fs::read_to_string(run.join("results.jsonl")).unwrap();
    std::fs::write(&plan, plan_text(dir, false)).unwrap();
    let o = graft(&["experiment", plan.to_str().unwrap(), "-o", run.to_str().unwrap(), "--no-report"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(!stderr.lines().any(|l| l.starts_with("done ")), "a finished step ran again:\n{stderr}");
    assert!(stderr.contains("skipped seed0/eval-merge-linear-p0.5-b (already done)"), "{stderr}");
    assert!(!seed0.join("merge-linear-p0.5").exists() && seed0.join("expert-a").exists());
    assert_eq!(std::fs::read_to_string(run.join("results.jsonl")).unwrap(), before);
    // Deleted merges stay done; one whose evaluation was lost is merged and evaluated again, and nothing else.
    std::fs::remove_file(seed0.join("eval").join("merge-linear-p1-b.json")).unwrap();
    let o = graft(&["experiment", plan.to_str().unwrap(), "-o", run.to_str().unwrap(), "--no-report"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let mut redone: Vec<&str> = stderr.lines().filter_map(|l| l.strip_prefix("done    ")).collect();
    redone.iter_mut().for_each(|l| *l = l.split(' ').next().unwrap());
    let expected = ["seed0/merge-linear-p1", "seed0/eval-merge-linear-p1-a", "seed0/eval-merge-linear-p1-b"];
    assert_eq!(redone, expected, "{stderr}");
    assert!(!seed0.join("merge-linear-p1").exists());
    // The same numbers again, but for the redone merge's own time.
    let without_merge_time = |text: &str| -> Vec<serde_json::Value> {
        let mut lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        lines.iter_mut().for_each(|l| _ = l["metrics"].as_object_mut().unwrap().remove("merge_time_s"));
        lines
    };
    let after = std::fs::read_to_string(run.join("results.jsonl")).unwrap();
    assert_eq!(without_merge_time(&after), without_merge_time(&before));
}

#[test]
fn llm_plan_errors_are_one_line_and_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let plan = tmp.path().join("bad.yml");
    std::fs::write(&plan, format!("{}steps: 10\n", plan_text(tmp.path(), true))).unwrap();
    let o = graft(&["experiment", plan.to_str().unwrap(), "-o", tmp.path().join("run").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("bad.yml") && stderr.contains("unknown field `steps`"), "{stderr}");
}
