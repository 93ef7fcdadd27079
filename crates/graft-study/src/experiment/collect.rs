//! Collecting an experiment's results: every fine-tuning step's results line, with the merge's consistency numbers
//! added to its metrics, into one `RUNDIR/results.jsonl` for `graft report`; and reading alignment reports. For an
//! LLM study, one results line per model and seed from its two perplexity measurements (`collect_llm`).

use std::path::Path;

use graft_core::results::{Kind, Line};
use serde_json::{json, Value};

use super::plan::LlmPlan;
use super::steps;
use crate::error::{Error, Result};

/// Whether an alignment report (`graft align --json`) says some permutation is not the identity.
pub fn alignment_changed(report: &Value) -> bool {
    match report {
        Value::Object(m) => m.iter().any(|(k, v)| match (k.as_str(), v) {
            ("identity", Value::Bool(b)) => !b,
            ("changed", Value::Bool(b)) => *b,
            _ => alignment_changed(v),
        }),
        Value::Array(a) => a.iter().any(alignment_changed),
        _ => false,
    }
}

/// Reads the JSON document a step left on its standard output.
pub fn read_json(path: &Path) -> Result<Value> {
    crate::files::read_json(path)
}

/// Concatenates the results lines of every `*.jsonl` under each seed's `results/` directory into `out` (written
/// whole under a temporary name, then renamed), adding `extra(line)` metrics to each. Returns the line count.
pub fn collect(rundir: &Path, seeds: &[u64], out: &Path, extra: impl Fn(&Line) -> Vec<(String, f64)>) -> Result<usize> {
    let mut text = String::new();
    let mut n = 0;
    for &seed in seeds {
        let dir = super::steps::seed_dir(rundir, seed).join("results");
        let Ok(rd) = std::fs::read_dir(&dir) else { continue };
        let mut files: Vec<_> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
            .collect();
        files.sort();
        for f in files {
            let body = std::fs::read_to_string(&f).map_err(|e| Error::io(&f, e))?;
            // A step that was rerun appended again: its last line is the current one.
            let Some(last) = body.lines().rev().find(|l| !l.trim().is_empty()) else { continue };
            let mut line = Line::parse(last).map_err(|e| Error::format(&f, format!("not a results line: {e}")))?;
            for (k, v) in extra(&line) {
                line.metrics.set(k, v);
            }
            text.push_str(&line.to_text());
            text.push('\n');
            n += 1;
        }
    }
    write_whole(out, &text)?;
    Ok(n)
}

/// The consistency numbers of the merge a fine-tuning line starts from (its `config.init` is the seed's
/// `merge-ID` directory), from the study's `consistency-ID.json` (`graft similarity --merged --json`):
/// `consistency_merged` over the merged tensors and `consistency_all` over every float tensor, each the mean of the
/// two cosines. None for lines that start from no merge, or whose consistency step left no report.
pub fn consistency_metrics(rundir: &Path, line: &Line) -> Vec<(String, f64)> {
    let (Ok(seed), Some(init)) = (u64::try_from(line.seed), line.config.get("init").and_then(Value::as_str)) else {
        return Vec::new();
    };
    let Some(id) = Path::new(init).file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("merge-")) else {
        return Vec::new();
    };
    let Ok(report) = read_json(&steps::seed_dir(rundir, seed).join(format!("consistency-{id}.json"))) else {
        return Vec::new();
    };
    [("consistency_merged", "selected"), ("consistency_all", "all")]
        .into_iter()
        .filter_map(|(key, scope)| report[scope]["mean"].as_f64().map(|v| (key.to_string(), v)))
        .collect()
}

/// Writes `text` to `out` whole: under a temporary name first, then renamed.
fn write_whole(out: &Path, text: &str) -> Result<()> {
    crate::files::write_atomic(out, text.as_bytes())
}

/// The share of an expert's gain on its own domain that `model` keeps: (NLL of the base - NLL of the model) /
/// (NLL of the base - NLL of the expert), in mean per-token NLL. None when the expert gained nothing to keep.
pub fn gain_kept(base_nll: f64, expert_nll: f64, model_nll: f64) -> Option<f64> {
    let gain = base_nll - expert_nll;
    (gain > 0.0 && gain.is_finite()).then(|| (base_nll - model_nll) / gain)
}

/// One results line (`kind: eval`) per model of an LLM study and seed (the base once: it is every seed's), with the
/// model's perplexity on both domains' test texts, the share of each expert's gain kept on its own domain, the
/// experts' training time and trainable parameters, and the merges' time, into `out`. Models whose perplexities
/// are missing (a failed step) have no line. Returns the line count.
pub fn collect_llm(plan: &LlmPlan, rundir: &Path, out: &Path) -> Result<usize> {
    let domains = [("a", plan.domain_a.name.as_str()), ("b", plan.domain_b.name.as_str())];
    let nll = |seed: u64, model: &str, key: &str| -> Option<f64> {
        read_json(&steps::llm_eval_report(rundir, seed, model, key)).ok()?["nll"].as_f64()
    };
    let mut text = String::new();
    let mut n = 0;
    for (i, &seed) in plan.seeds.iter().enumerate() {
        for model in steps::llm_models(plan) {
            if model.id == "base" && i > 0 {
                continue;
            }
            let mut config = json!({"model": model.id, "unfrozen_percent": plan.unfrozen_percent,
                                    "eval_max_len": plan.eval_max_len});
            if let Some(m) = &model.merge {
                config["method"] = json!(m.method);
                config["top_p"] = json!(m.top_p);
            }
            let mut line =
                Line::new(Kind::Eval, format!("seed{seed}/{}", model.id), &*model.label, seed as i64, &config);
            line.baseline = model.id == "base";
            let metrics = &mut line.metrics;
            let mut complete = true;
            for (key, name) in domains {
                let (Some(m), Some(b), e) =
                    (nll(seed, &model.id, key), nll(seed, "base", key), nll(seed, &format!("expert-{key}"), key))
                else {
                    complete = false;
                    continue;
                };
                metrics.set(format!("perplexity_{name}"), m.exp());
                metrics.set_some(format!("gain_kept_{name}"), e.and_then(|e| gain_kept(b, e, m)));
            }
            if !complete {
                continue;
            }
            let report = read_json(&steps::llm_step_report(rundir, seed, &model.id)).ok();
            if model.merge.is_some() {
                if let Some(secs) = report.as_ref().and_then(|r| r["seconds"].as_f64()) {
                    metrics.set("merge_time_s", secs);
                }
            } else if let Some(r) = report.filter(|_| model.id.starts_with("expert-")) {
                for (from, to) in [("time_s", "train_time_s"), ("peak_memory_bytes", "train_peak_memory_bytes")] {
                    metrics.set_some(to, r[from].as_f64());
                }
                metrics.set_some("trainable_params", r["freeze"]["trainable_params"].as_f64());
            }
            text.push_str(&line.to_text());
            text.push('\n');
            n += 1;
        }
    }
    write_whole(out, &text)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_change_is_found_at_any_depth() {
        let same = serde_json::json!({"groups": [{"name": "g0", "identity": true}, {"name": "g1", "identity": true}]});
        let moved =
            serde_json::json!({"groups": [{"name": "g0", "identity": true}, {"name": "g1", "identity": false}]});
        assert!(!alignment_changed(&same));
        assert!(alignment_changed(&moved));
        assert!(alignment_changed(&serde_json::json!({"changed": true})));
    }

    #[test]
    fn fine_tuning_lines_get_their_merges_consistency() {
        let dir = tempfile::tempdir().unwrap();
        let seed_dir = steps::seed_dir(dir.path(), 1);
        std::fs::create_dir_all(&seed_dir).unwrap();
        let report = serde_json::json!({"all": {"mean": 0.8}, "selected": {"mean": 0.99, "recover_a": 1.0}});
        std::fs::write(seed_dir.join("consistency-ties-p0.1.json"), report.to_string()).unwrap();
        // The run directory as the step named it need not be this one: the seed and the merge's name are enough.
        let line = |seed: i64, init: &str| Line::new(Kind::Train, "r", "e", seed, &json!({"init": init}));
        let got = consistency_metrics(dir.path(), &line(1, "elsewhere/seed-1/merge-ties-p0.1"));
        assert_eq!(got, [("consistency_merged".to_string(), 0.99), ("consistency_all".to_string(), 0.8)]);
        // Another seed's merge, a line from the base, a merge without a report: nothing.
        assert!(consistency_metrics(dir.path(), &line(0, "x/seed-0/merge-ties-p0.1")).is_empty());
        assert!(consistency_metrics(dir.path(), &line(1, "x/seed-1/base")).is_empty());
        assert!(consistency_metrics(dir.path(), &line(1, "x/seed-1/merge-lerp-p1")).is_empty());
    }

    #[test]
    fn gain_kept_is_the_share_of_the_experts_nll_drop() {
        // Base 4.0, expert 3.0: a model at 3.25 keeps three quarters of the drop; one worse than the base, less than 0.
        assert_eq!(gain_kept(4.0, 3.0, 3.25), Some(0.75));
        assert_eq!(gain_kept(4.0, 3.0, 4.5), Some(-0.5));
        assert_eq!(gain_kept(4.0, 4.0, 3.0), None);
        assert_eq!(gain_kept(4.0, 4.5, 3.0), None);
    }
}
