//! Aggregation: results lines -> one table per line kind (rows = experiments, columns = metrics, cells = bootstrap
//! estimates over the experiment's runs), interpolation curves and their barriers.
//!
//! A row's *runs* are its distinct run_ids; each run contributes one value per metric (the mean of its lines, in the
//! rare case that one run has several). A row's *parameters* are the config entries that are the same on every one of
//! its lines (method, top_p, freeze...); entries that change from run to run (seed, output paths) are per-run noise
//! and are left out, so plots against parameters only use what defines the experiment. The freeze policy is the
//! exception: graft's studies name a selection file per seed (`selected:seed-0/merge-...`), so `freeze` is carried in
//! words (`full`, `head`, `selected`) whenever every line of the experiment says the same in words.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::bootstrap::{bootstrap_mean, Estimate};
use super::format::ColumnFormat;
pub use super::format::{Cell, Direction, MetricSpec, Unit};
use super::results::{Kind, ResultLine, ResultSet};
use crate::rng::Rng;

/// A config value as a plot axis sees it: numbers are numeric axes, everything else is a category.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Param {
    Number(f64),
    Text(String),
}

impl Param {
    fn from_json(v: &Value) -> Param {
        match v {
            Value::Number(n) => Param::Number(n.as_f64().unwrap_or(f64::NAN)),
            Value::String(s) => Param::Text(s.clone()),
            other => Param::Text(other.to_string()),
        }
    }

    pub fn as_number(&self) -> Option<f64> {
        match self {
            Param::Number(x) => Some(*x),
            Param::Text(_) => None,
        }
    }

    pub fn display(&self) -> String {
        match self {
            Param::Number(x) => format!("{x}"),
            Param::Text(s) => s.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    pub experiment: String,
    pub baseline: bool,
    /// The colour/separation group of plots: the experiment's `method` parameter, or "" without one.
    pub group: String,
    /// Run ids, in order of first appearance.
    pub runs: Vec<String>,
    pub params: BTreeMap<String, Param>,
    pub cells: BTreeMap<String, Cell>,
}

impl Row {
    pub fn cell(&self, metric: &str) -> Option<&Cell> {
        self.cells.get(metric)
    }
}

/// The rows of one kind of line (train or eval): a fine-tuned accuracy and an evaluated accuracy are different
/// quantities, so they never share a column or a best mark.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KindTable {
    pub kind: Kind,
    pub metrics: Vec<MetricSpec>,
    pub rows: Vec<Row>,
}

impl KindTable {
    /// The row efficiency charts and dashed lines compare against: the first baseline row.
    pub fn baseline(&self) -> Option<&Row> {
        self.rows.iter().find(|r| r.baseline)
    }

    pub fn format(&self, metric: &MetricSpec) -> ColumnFormat {
        ColumnFormat::for_column(metric, self.rows.iter().filter_map(|r| r.cell(&metric.key)).map(|c| c.estimate.mean))
    }
}

/// One point of an interpolation curve: a metric at one lambda over the seeds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CurvePoint {
    pub lambda: f64,
    /// One value per seed.
    pub values: Vec<f64>,
    #[serde(flatten)]
    pub estimate: Estimate,
}

/// A metric along the interpolation path of one interpolate experiment.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Curve {
    pub experiment: String,
    pub metric: String,
    /// The config entries shared by the experiment's lines but `lambda` (say, `aligned`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, Param>,
    pub points: Vec<CurvePoint>,
    /// The barrier over seeds: per seed, the largest excess over the straight line between the endpoints (loss above
    /// it; for accuracy-like metrics, the drop below it). `None` without points at lambda 0, 1 and in between.
    pub barrier: Option<Cell>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub seed: u64,
    pub resamples: usize,
    pub lines_read: usize,
    pub superseded: usize,
    pub tables: Vec<KindTable>,
    pub curves: Vec<Curve>,
}

/// Builds the tables and curves of a set of results lines, with bootstrap estimates drawn from streams labelled by
/// (kind, experiment, metric) under `seed`: a row's numbers do not depend on which other rows are in the report.
pub fn summarize(set: &ResultSet, seed: u64, resamples: usize) -> Summary {
    let mut tables = Vec::new();
    for kind in [Kind::Train, Kind::Eval] {
        let lines: Vec<&ResultLine> = set.lines.iter().filter(|l| l.kind == kind).collect();
        if !lines.is_empty() {
            tables.push(kind_table(kind, &lines, seed, resamples));
        }
    }
    let interpolate: Vec<&ResultLine> = set.lines.iter().filter(|l| l.kind == Kind::Interpolate).collect();
    let curves = curves(&interpolate, seed, resamples);
    Summary { seed, resamples, lines_read: set.lines_read, superseded: set.superseded.len(), tables, curves }
}

/// Groups items by a key, keeping keys in order of first appearance.
fn group_by<'a, T, K: PartialEq + Clone>(items: &[&'a T], key: impl Fn(&T) -> K) -> Vec<(K, Vec<&'a T>)> {
    let mut groups: Vec<(K, Vec<&'a T>)> = Vec::new();
    for &item in items {
        let k = key(item);
        match groups.iter_mut().find(|(g, _)| *g == k) {
            Some((_, v)) => v.push(item),
            None => groups.push((k, vec![item])),
        }
    }
    groups
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn kind_table(kind: Kind, lines: &[&ResultLine], seed: u64, resamples: usize) -> KindTable {
    let mut metric_keys: Vec<MetricSpec> = Vec::new();
    for l in lines {
        for k in l.metrics.keys() {
            if !metric_keys.iter().any(|m| m.key == k) {
                metric_keys.push(MetricSpec::for_key(k));
            }
        }
    }
    metric_keys.sort_by_key(MetricSpec::order);

    let mut rows: Vec<(usize, Row)> = Vec::new();
    for (experiment, exp_lines) in group_by(lines, |l| l.experiment.clone()) {
        let runs = group_by(&exp_lines, |l| l.run_id.clone());
        let mut cells = BTreeMap::new();
        for m in &metric_keys {
            let values: Vec<f64> = runs
                .iter()
                .filter_map(|(_, rl)| {
                    let v: Vec<f64> = rl.iter().filter_map(|l| l.metric(&m.key)).collect();
                    (!v.is_empty()).then(|| mean(&v))
                })
                .collect();
            let label = format!("{}\u{1f}{}\u{1f}{}", kind.as_str(), experiment, m.key);
            if let Some(estimate) = bootstrap_mean(&values, resamples, &mut Rng::for_label(seed, &label)) {
                cells.insert(m.key.clone(), Cell { values, estimate, best: false });
            }
        }
        let params = shared_params(&exp_lines);
        let group = match params.get("method") {
            Some(p) => p.display(),
            None => String::new(),
        };
        rows.push((
            rows.len(),
            Row {
                experiment,
                baseline: exp_lines.iter().any(|l| l.baseline),
                group,
                runs: runs.into_iter().map(|(id, _)| id).collect(),
                params,
                cells,
            },
        ));
    }

    // Baselines first, then groups in order of first appearance, then rows in order of first appearance.
    let mut group_order: Vec<String> = Vec::new();
    for (_, r) in &rows {
        if !r.baseline && !group_order.contains(&r.group) {
            group_order.push(r.group.clone());
        }
    }
    rows.sort_by_key(|(i, r)| {
        let g = if r.baseline { 0 } else { 1 + group_order.iter().position(|g| *g == r.group).unwrap_or(0) };
        (g, *i)
    });
    let mut table = KindTable { kind, metrics: metric_keys, rows: rows.into_iter().map(|(_, r)| r).collect() };
    mark_best(&mut table);
    table
}

/// A freeze setting in words: "full" (nothing frozen), "head" (all but the head frozen), "selected" (a selection
/// trains, whichever file names it), other values as written.
pub fn policy_word(freeze: &str) -> String {
    match freeze {
        "none" | "full" => "full".into(),
        "all-but-head" | "head" => "head".into(),
        f if f.starts_with("selected") => "selected".into(),
        other => other.into(),
    }
}

/// The config entries with one value on every line of an experiment (seed excluded: it is per run by definition),
/// and `freeze` in words where every line's policy reads the same in words (each seed's own selection file is one
/// policy, `selected`).
fn shared_params(lines: &[&ResultLine]) -> BTreeMap<String, Param> {
    let mut out = BTreeMap::new();
    let Some(first) = lines.first() else { return out };
    for (k, v) in &first.config {
        if k == "seed" {
            continue;
        }
        if k == "freeze" {
            let word = |v: Option<&Value>| v.map(|v| policy_word(&Param::from_json(v).display()));
            let first_word = word(Some(v));
            if lines.iter().all(|l| word(l.config.get(k)) == first_word) {
                out.insert(k.clone(), Param::Text(first_word.unwrap_or_default()));
            }
            continue;
        }
        if lines.iter().all(|l| l.config.get(k) == Some(v)) {
            out.insert(k.clone(), Param::from_json(v));
        }
    }
    out
}

/// Marks, per column, the cells whose mean is best at the precision the table prints (so that two cells that read
/// the same are both marked). Columns with fewer than two filled cells or no direction get no mark.
fn mark_best(table: &mut KindTable) {
    for m in &table.metrics {
        if m.direction == Direction::Neither {
            continue;
        }
        let fmt = table.format(m);
        let shown: Vec<Option<f64>> =
            table.rows.iter().map(|r| r.cell(&m.key).map(|c| fmt.rounded(c.estimate.mean))).collect();
        let filled: Vec<f64> = shown.iter().flatten().copied().collect();
        if filled.len() < 2 {
            continue;
        }
        let best = match m.direction {
            Direction::Higher => filled.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            _ => filled.iter().copied().fold(f64::INFINITY, f64::min),
        };
        for (row, value) in table.rows.iter_mut().zip(shown) {
            if value == Some(best) {
                row.cells.get_mut(&m.key).unwrap().best = true;
            }
        }
    }
}

fn is_close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

fn curves(lines: &[&ResultLine], seed: u64, resamples: usize) -> Vec<Curve> {
    let mut out = Vec::new();
    for (experiment, exp_lines) in group_by(lines, |l| l.experiment.clone()) {
        let mut metric_keys: Vec<MetricSpec> = Vec::new();
        for l in &exp_lines {
            for k in l.metrics.keys() {
                if !metric_keys.iter().any(|m| m.key == k) {
                    metric_keys.push(MetricSpec::for_key(k));
                }
            }
        }
        metric_keys.sort_by_key(MetricSpec::order);
        let seeds = group_by(&exp_lines, |l| l.seed);
        for m in metric_keys {
            // Per seed: lambda -> value (several lines at one lambda and seed are averaged).
            let per_seed: Vec<Vec<(f64, f64)>> = seeds
                .iter()
                .map(|(_, sl)| {
                    let with_metric: Vec<&ResultLine> =
                        sl.iter().copied().filter(|l| l.metric(&m.key).is_some()).collect();
                    let mut pts: Vec<(f64, f64)> = group_by(&with_metric, |l| l.lambda().to_bits())
                        .into_iter()
                        .map(|(bits, ls)| {
                            let v: Vec<f64> = ls.iter().filter_map(|l| l.metric(&m.key)).collect();
                            (f64::from_bits(bits), mean(&v))
                        })
                        .collect();
                    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                    pts
                })
                .filter(|p| !p.is_empty())
                .collect();
            if per_seed.is_empty() {
                continue;
            }
            let mut lambdas: Vec<f64> = per_seed.iter().flatten().map(|p| p.0).collect();
            lambdas.sort_by(f64::total_cmp);
            lambdas.dedup();
            let points = lambdas
                .iter()
                .filter_map(|&lambda| {
                    let values: Vec<f64> =
                        per_seed.iter().filter_map(|s| s.iter().find(|p| p.0 == lambda).map(|p| p.1)).collect();
                    let label = format!("interpolate\u{1f}{experiment}\u{1f}{}\u{1f}{lambda}", m.key);
                    let estimate = bootstrap_mean(&values, resamples, &mut Rng::for_label(seed, &label))?;
                    Some(CurvePoint { lambda, values, estimate })
                })
                .collect();
            let barriers: Vec<f64> = per_seed.iter().filter_map(|pts| barrier(pts, m.direction)).collect();
            let label = format!("barrier\u{1f}{experiment}\u{1f}{}", m.key);
            let barrier = bootstrap_mean(&barriers, resamples, &mut Rng::for_label(seed, &label))
                .map(|estimate| Cell { values: barriers, estimate, best: false });
            let mut params = shared_params(&exp_lines);
            params.remove("lambda");
            out.push(Curve { experiment: experiment.clone(), metric: m.key, params, points, barrier });
        }
    }
    mark_best_barriers(&mut out);
    out
}

/// The barrier of one curve (sorted by lambda): the largest excess of the metric over the straight line between its
/// values at lambda 0 and 1, taken over the points strictly between (for metrics where higher is better, the excess
/// of the line over the metric). Positive means the path crosses a barrier; zero or less means none.
pub fn barrier(points: &[(f64, f64)], direction: Direction) -> Option<f64> {
    let at = |x: f64| points.iter().find(|p| is_close(p.0, x)).map(|p| p.1);
    let (start, end) = (at(0.0)?, at(1.0)?);
    let sign = if direction == Direction::Higher { -1.0 } else { 1.0 };
    points
        .iter()
        .filter(|p| p.0 > 1e-9 && p.0 < 1.0 - 1e-9)
        .map(|&(l, v)| sign * (v - ((1.0 - l) * start + l * end)))
        .fold(None, |acc: Option<f64>, x| Some(acc.map_or(x, |a| a.max(x))))
}

/// Lower barriers are better; marked per metric among the curves that have one.
fn mark_best_barriers(curves: &mut [Curve]) {
    let metrics: Vec<String> = curves.iter().map(|c| c.metric.clone()).collect();
    for m in metrics {
        let spec = MetricSpec { direction: Direction::Lower, ..MetricSpec::for_key(&m) };
        let means: Vec<f64> = curves
            .iter()
            .filter(|c| c.metric == m)
            .filter_map(|c| c.barrier.as_ref())
            .map(|b| b.estimate.mean)
            .collect();
        if means.len() < 2 {
            continue;
        }
        let fmt = ColumnFormat::for_column(&spec, means.iter().copied());
        let best = means.iter().map(|&v| fmt.rounded(v)).fold(f64::INFINITY, f64::min);
        for c in curves.iter_mut().filter(|c| c.metric == m) {
            if let Some(b) = c.barrier.as_mut() {
                b.best = fmt.rounded(b.estimate.mean) == best;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::results::{parse_lines, supersede};
    use std::path::Path;

    fn line(kind: &str, exp: &str, run: &str, seed: i64, config: &str, metrics: &str, baseline: bool) -> String {
        format!(
            r#"{{"kind":"{kind}","run_id":"{run}","experiment":"{exp}","seed":{seed},"config":{config},"metrics":{metrics},"baseline":{baseline}}}"#
        )
    }

    fn summary_of(lines: &[String]) -> Summary {
        let set = supersede(parse_lines(Path::new("t.jsonl"), lines.join("\n").as_bytes()).unwrap());
        summarize(&set, 0, 2000)
    }

    #[test]
    fn rows_runs_params_and_order() {
        let s = summary_of(&[
            line(
                "train",
                "ties 10%",
                "t0",
                0,
                r#"{"method":"ties","top_p":0.1,"out":"a0"}"#,
                r#"{"accuracy":0.70}"#,
                false,
            ),
            line(
                "train",
                "lerp 10%",
                "l0",
                0,
                r#"{"method":"lerp","top_p":0.1,"out":"b0"}"#,
                r#"{"accuracy":0.80}"#,
                false,
            ),
            line("train", "base", "b0", 0, r#"{"freeze":"full"}"#, r#"{"accuracy":0.75,"time_s":10}"#, true),
            line("train", "ties 15%", "t1", 0, r#"{"method":"ties","top_p":0.15}"#, r#"{"accuracy":0.72}"#, false),
            line(
                "train",
                "lerp 10%",
                "l1",
                1,
                r#"{"method":"lerp","top_p":0.1,"out":"b1"}"#,
                r#"{"accuracy":0.90}"#,
                false,
            ),
            line("eval", "lerp 10%", "e0", 0, r#"{"method":"lerp"}"#, r#"{"accuracy":0.60}"#, false),
        ]);
        assert_eq!(s.tables.len(), 2);
        let t = &s.tables[0];
        assert_eq!(t.kind, Kind::Train);
        let names: Vec<&str> = t.rows.iter().map(|r| r.experiment.as_str()).collect();
        assert_eq!(names, ["base", "ties 10%", "ties 15%", "lerp 10%"]);
        let lerp = &t.rows[3];
        assert_eq!(lerp.runs, ["l0", "l1"]);
        assert_eq!(lerp.group, "lerp");
        // `out` differs between the two runs: not an experiment parameter.
        assert_eq!(lerp.params.keys().collect::<Vec<_>>(), ["method", "top_p"]);
        let acc = lerp.cell("accuracy").unwrap();
        assert_eq!(acc.values, [0.8, 0.9]);
        assert!((acc.estimate.mean - 0.85).abs() < 1e-12);
        assert_eq!(t.metrics.iter().map(|m| m.key.as_str()).collect::<Vec<_>>(), ["accuracy", "time_s"]);
        // Best accuracy is lerp's 0.850; a single time value gets no mark.
        let best: Vec<bool> = t.rows.iter().map(|r| r.cell("accuracy").unwrap().best).collect();
        assert_eq!(best, [false, false, false, true]);
        assert!(!t.rows[0].cell("time_s").unwrap().best);
        assert_eq!(t.baseline().unwrap().experiment, "base");
        assert_eq!(s.tables[1].kind, Kind::Eval);
        assert_eq!(s.tables[1].rows[0].cell("accuracy").unwrap().values, [0.6]);
    }

    #[test]
    fn best_is_per_direction_and_ties_at_printed_precision() {
        let s = summary_of(&[
            line("train", "a", "a", 0, "{}", r#"{"accuracy":0.8001,"time_s":5,"loss":0.5}"#, false),
            line("train", "b", "b", 0, "{}", r#"{"accuracy":0.7999,"time_s":4,"loss":0.4}"#, false),
            line("train", "c", "c", 0, "{}", r#"{"accuracy":0.7,"time_s":6,"loss":0.6}"#, false),
        ]);
        let t = &s.tables[0];
        let marks = |m: &str| t.rows.iter().map(|r| r.cell(m).unwrap().best).collect::<Vec<_>>();
        assert_eq!(marks("accuracy"), [true, true, false]); // both print as 0.800
        assert_eq!(marks("time_s"), [false, true, false]);
        assert_eq!(marks("loss"), [false, true, false]);
    }

    #[test]
    fn barrier_of_a_hand_computed_curve() {
        // Loss 1.0 at both ends, 1.5 at 0.5, 1.2 at 0.25: barrier 0.5. Accuracy 0.8 -> 0.6 with 0.5 in the middle:
        // the line gives 0.7 at 0.5, so the drop is 0.2.
        let loss = [(0.0, 1.0), (0.25, 1.2), (0.5, 1.5), (1.0, 1.0)];
        assert!((barrier(&loss, Direction::Lower).unwrap() - 0.5).abs() < 1e-12);
        let acc = [(0.0, 0.8), (0.5, 0.5), (1.0, 0.6)];
        assert!((barrier(&acc, Direction::Higher).unwrap() - 0.2).abs() < 1e-12);
        assert_eq!(barrier(&[(0.0, 1.0), (1.0, 2.0)], Direction::Lower), None);
        assert_eq!(barrier(&[(0.0, 1.0), (0.5, 2.0)], Direction::Lower), None);
    }

    #[test]
    fn curves_average_seeds_per_lambda() {
        let mut lines = Vec::new();
        for (seed, mid) in [(0, 1.4), (1, 1.6)] {
            for (lambda, loss) in [(0.0, 1.0), (0.5, mid), (1.0, 1.0)] {
                let cfg = format!(r#"{{"lambda":{lambda}}}"#);
                lines.push(line(
                    "interpolate",
                    "A-B",
                    &format!("r{seed}"),
                    seed,
                    &cfg,
                    &format!(r#"{{"loss":{loss}}}"#),
                    false,
                ));
            }
        }
        let s = summary_of(&lines);
        assert!(s.tables.is_empty());
        let c = &s.curves[0];
        assert_eq!((c.experiment.as_str(), c.metric.as_str()), ("A-B", "loss"));
        assert_eq!(c.points.iter().map(|p| p.lambda).collect::<Vec<_>>(), [0.0, 0.5, 1.0]);
        assert_eq!(c.points[1].values, [1.4, 1.6]);
        let b = c.barrier.as_ref().unwrap();
        assert_eq!(b.values.len(), 2);
        assert!((b.values[0] - 0.4).abs() < 1e-12 && (b.values[1] - 0.6).abs() < 1e-12);
        assert!((b.estimate.mean - 0.5).abs() < 1e-12);
    }

    #[test]
    fn unknown_metric_directions() {
        assert_eq!(MetricSpec::for_key("val_loss").direction, Direction::Lower);
        assert_eq!(MetricSpec::for_key("precision").direction, Direction::Higher);
        assert_eq!(MetricSpec::for_key("tokens").direction, Direction::Neither);
        assert_eq!(MetricSpec::for_key("gpu_bytes").unit, Unit::Bytes);
    }
}
