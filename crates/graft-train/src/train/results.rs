//! Results lines (JSONL, one object per run) in the schema `graft report` reads: kind, run_id, experiment, seed,
//! config, metrics (accuracy, f1_weighted, f1_macro, loss, time_s, peak_memory_bytes, zero_shot_accuracy), epochs,
//! baseline. For a training run `time_s` is everything the policy needs (feature extraction + steps, + validation
//! with `--time-with-eval`) with its parts `feature_s`, `train_s`, `eval_s`; `peak_memory_bytes` (the report's
//! memory column) is what training held at its peak, measured from allocations, and `peak_rss_bytes` the process's
//! peak resident set; without an allocation count (GPU runs) `peak_memory_bytes` falls back to the latter. Appended with a single write so concurrent runs do not interleave within a line.

use std::io::Write;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::metrics::Metrics;
use super::trainer::TrainReport;
use crate::error::{Error, Result};

#[allow(clippy::too_many_arguments)]
pub fn train_line(
    run_id: &str,
    experiment: &str,
    seed: u64,
    config: &Value,
    test: &Metrics,
    report: &TrainReport,
    peak: Option<u64>,
    zero_shot: Option<f64>,
    baseline: bool,
) -> Value {
    let mut m = metric_map(test);
    m.insert("time_s".into(), json!(report.time_s));
    m.insert("feature_s".into(), json!(report.feature_s));
    m.insert("train_s".into(), json!(report.train_s));
    m.insert("eval_s".into(), json!(report.eval_time_s));
    if let Some(p) = report.training_memory_bytes.or(peak) {
        m.insert("peak_memory_bytes".into(), json!(p));
    }
    if let Some(p) = peak {
        m.insert("peak_rss_bytes".into(), json!(p));
    }
    if let Some(z) = zero_shot {
        m.insert("zero_shot_accuracy".into(), json!(z));
    }
    m.insert("samples_per_s".into(), json!(report.samples_per_s));
    let epochs: Vec<Value> = report
        .epochs
        .iter()
        .map(|e| {
            let mut o = Map::new();
            o.insert("epoch".into(), json!(e.epoch));
            o.insert("train_loss".into(), json!(e.train_loss));
            if let Some(a) = e.val_accuracy {
                o.insert("val_accuracy".into(), json!(a));
            }
            if let Some(l) = e.val_loss {
                o.insert("val_loss".into(), json!(l));
            }
            o.insert("time_s".into(), json!(e.time_s));
            Value::Object(o)
        })
        .collect();
    let mut line = json!({
        "kind": "train", "run_id": run_id, "experiment": experiment, "seed": seed, "config": flat_config(config),
        "metrics": Value::Object(m), "epochs": epochs,
    });
    if baseline {
        line["baseline"] = json!(true);
    }
    line
}

/// One point of a path between two models (`graft interpolate --eval-data`): `config.lambda` is its position.
pub fn interpolate_line(experiment: &str, seed: u64, lambda: f64, config: &Value, m: &Metrics) -> Value {
    let mut config = flat_config(config);
    config["lambda"] = json!(lambda);
    let run_id = format!("{experiment}@{lambda}#{seed}");
    json!({
        "kind": "interpolate", "run_id": run_id, "experiment": experiment, "seed": seed, "config": config,
        "metrics": Value::Object(metric_map(m)),
    })
}

pub fn eval_line(run_id: &str, experiment: &str, seed: u64, config: &Value, m: &Metrics) -> Value {
    json!({
        "kind": "eval", "run_id": run_id, "experiment": experiment, "seed": seed, "config": flat_config(config),
        "metrics": Value::Object(metric_map(m)),
    })
}

fn metric_map(m: &Metrics) -> Map<String, Value> {
    let mut o = Map::new();
    o.insert("accuracy".into(), json!(m.accuracy));
    o.insert("f1_weighted".into(), json!(m.f1_weighted));
    o.insert("f1_macro".into(), json!(m.f1_macro));
    if let Some(l) = m.loss {
        o.insert("loss".into(), json!(l));
    }
    o
}

/// The schema wants config values that are numbers or strings: nested values become compact JSON strings and
/// nulls are dropped.
fn flat_config(config: &Value) -> Value {
    let mut out = Map::new();
    if let Value::Object(o) = config {
        for (k, v) in o {
            match v {
                Value::Null => {}
                Value::Number(_) | Value::String(_) => {
                    out.insert(k.clone(), v.clone());
                }
                Value::Bool(b) => {
                    out.insert(k.clone(), json!(if *b { "true" } else { "false" }));
                }
                other => {
                    out.insert(k.clone(), json!(other.to_string()));
                }
            }
        }
    }
    Value::Object(out)
}

/// Appends `line` and a newline to `path` (created if missing).
pub fn append(path: &Path, line: &Value) -> Result<()> {
    let mut text = serde_json::to_string(line).expect("results line serialises");
    text.push('\n');
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::io(path, e))?;
    f.write_all(text.as_bytes()).map_err(|e| Error::io(path, e))
}
