//! Results lines (JSONL, one object per run) in the schema `graft report` reads: kind, run_id, experiment, seed,
//! config, metrics (accuracy, f1_weighted, f1_macro, loss, time_s, peak_memory_bytes, zero_shot_accuracy), epochs,
//! baseline (the schema: `graft_core::results`). For a training run `time_s` is everything the policy needs (feature extraction + steps, + validation
//! with `--time-with-eval`) with its parts `feature_s`, `train_s`, `eval_s`; `peak_memory_bytes` (the report's
//! memory column) is what training held at its peak, measured from allocations, and `peak_rss_bytes` the process's
//! peak resident set; without an allocation count (GPU runs) `peak_memory_bytes` falls back to the latter. Appended with a single write so concurrent runs do not interleave within a line.

use serde_json::Value;

use super::metrics::Metrics;
use super::trainer::TrainReport;
pub use graft_core::results::{Kind, Line, Numbers};

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
) -> Line {
    let mut line = Line::new(Kind::Train, run_id, experiment, seed as i64, config);
    let m = &mut line.metrics;
    set_metrics(m, test);
    m.set("time_s", report.time_s).set("feature_s", report.feature_s);
    m.set("train_s", report.train_s).set("eval_s", report.eval_time_s);
    m.set_some("peak_memory_bytes", report.training_memory_bytes.or(peak));
    m.set_some("peak_rss_bytes", peak);
    m.set_some("zero_shot_accuracy", zero_shot);
    m.set("samples_per_s", report.samples_per_s);
    for e in &report.epochs {
        let mut o = Numbers::new();
        o.set("epoch", e.epoch).set("train_loss", e.train_loss);
        o.set_some("val_accuracy", e.val_accuracy).set_some("val_loss", e.val_loss);
        o.set("time_s", e.time_s);
        line.epochs.push(o);
    }
    line.baseline = baseline;
    line
}

/// One point of a path between two models (`graft interpolate --eval-data`): `config.lambda` is its position.
pub fn interpolate_line(experiment: &str, seed: u64, lambda: f64, config: &Value, m: &Metrics) -> Line {
    let run_id = format!("{experiment}@{lambda}#{seed}");
    let mut line = Line::new(Kind::Interpolate, run_id, experiment, seed as i64, config);
    line.config.insert("lambda".into(), serde_json::json!(lambda));
    set_metrics(&mut line.metrics, m);
    line
}

pub fn eval_line(run_id: &str, experiment: &str, seed: u64, config: &Value, m: &Metrics) -> Line {
    let mut line = Line::new(Kind::Eval, run_id, experiment, seed as i64, config);
    set_metrics(&mut line.metrics, m);
    line
}

fn set_metrics(o: &mut Numbers, m: &Metrics) {
    o.set("accuracy", m.accuracy).set("f1_weighted", m.f1_weighted).set("f1_macro", m.f1_macro);
    o.set_some("loss", m.loss);
}
