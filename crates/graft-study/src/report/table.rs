//! Rendering the summary as text: markdown tables (`0.656 +- 0.008 (n=3)`, best value per column in bold) and CSV.
//! How a column prints (scale, unit, decimals) is `format`'s, re-exported here for the other renderers.

use std::fmt::Write;

pub use super::format::{kind_title, row_label, ColumnFormat};
use super::summary::{Curve, KindTable, MetricSpec, Summary};

fn md_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('|', "\\|").replace(['\n', '\r'], " ")
}

/// One kind's table in markdown.
pub fn markdown_table(table: &KindTable) -> String {
    let formats: Vec<ColumnFormat> = table.metrics.iter().map(|m| table.format(m)).collect();
    let mut s = String::from("| experiment |");
    for (m, f) in table.metrics.iter().zip(&formats) {
        let _ = write!(s, " {} |", md_escape(&f.header(&m.label)));
    }
    s.push_str("\n| --- |");
    s.push_str(&" ---: |".repeat(table.metrics.len()));
    s.push('\n');
    for row in &table.rows {
        let _ = write!(s, "| {} |", md_escape(&row_label(&row.experiment, row.baseline)));
        for (m, f) in table.metrics.iter().zip(&formats) {
            match row.cell(&m.key) {
                Some(c) if c.best => {
                    let _ = write!(s, " **{}** |", f.cell(c));
                }
                Some(c) => {
                    let _ = write!(s, " {} |", f.cell(c));
                }
                None => s.push_str(" - |"),
            }
        }
        s.push('\n');
    }
    s
}

/// The metrics that have curves, in column order.
pub fn curve_metrics(curves: &[Curve]) -> Vec<MetricSpec> {
    let mut keys: Vec<MetricSpec> = Vec::new();
    for c in curves {
        if c.barrier.is_some() && !keys.iter().any(|k| k.key == c.metric) {
            keys.push(MetricSpec::for_key(&c.metric));
        }
    }
    let known = ["zero_shot_accuracy", "accuracy", "f1_weighted", "f1_macro", "loss"];
    keys.sort_by_key(|m| (known.iter().position(|k| *k == m.key).unwrap_or(known.len()), m.key.clone()));
    keys
}

fn barrier_format(curves: &[Curve], metric: &MetricSpec) -> ColumnFormat {
    let means = curves.iter().filter(|c| c.metric == metric.key).filter_map(|c| c.barrier.as_ref());
    ColumnFormat::for_column(metric, means.map(|b| b.estimate.mean))
}

/// Interpolation barriers: one row per interpolate experiment, one column per metric.
pub fn markdown_barriers(curves: &[Curve]) -> Option<String> {
    let metrics = curve_metrics(curves);
    if metrics.is_empty() {
        return None;
    }
    let formats: Vec<ColumnFormat> = metrics.iter().map(|m| barrier_format(curves, m)).collect();
    let mut s = String::from("| interpolation |");
    for (m, f) in metrics.iter().zip(&formats) {
        let _ = write!(s, " {} |", md_escape(&f.header(&format!("{} barrier", m.label))));
    }
    s.push_str("\n| --- |");
    s.push_str(&" ---: |".repeat(metrics.len()));
    s.push('\n');
    let mut experiments: Vec<&str> = Vec::new();
    for c in curves {
        if !experiments.contains(&c.experiment.as_str()) {
            experiments.push(&c.experiment);
        }
    }
    for e in experiments {
        let _ = write!(s, "| {} |", md_escape(e));
        for (m, f) in metrics.iter().zip(&formats) {
            match curves.iter().find(|c| c.experiment == e && c.metric == m.key).and_then(|c| c.barrier.as_ref()) {
                Some(b) if b.best => {
                    let _ = write!(s, " **{}** |", f.cell(b));
                }
                Some(b) => {
                    let _ = write!(s, " {} |", f.cell(b));
                }
                None => s.push_str(" - |"),
            }
        }
        s.push('\n');
    }
    Some(s)
}

/// The whole markdown document: a section per table, the barriers, and a line saying how the numbers were made.
pub fn markdown(summary: &Summary) -> String {
    let mut s = String::new();
    for t in &summary.tables {
        let _ = writeln!(s, "## {}\n\n{}", kind_title(t.kind), markdown_table(t));
    }
    if let Some(b) = markdown_barriers(&summary.curves) {
        let _ = writeln!(
            s,
            "## Interpolation barriers\n\nLargest excess over the straight line between the endpoints (loss above it, \
             accuracy/F1 below it); 0 or less: no barrier.\n\n{b}"
        );
    }
    let _ = writeln!(
        s,
        "mean +- bootstrap standard error over runs (n = runs), {} balanced resamples, seed {}; best per column in bold.",
        summary.resamples, summary.seed
    );
    s
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// All tables in one CSV, values in base units (fractions, seconds, bytes) at full precision: a row per experiment
/// and kind, and per metric its mean, standard error, number of runs and best mark (empty where not measured).
pub fn csv(summary: &Summary) -> String {
    let mut metrics: Vec<MetricSpec> = Vec::new();
    for t in &summary.tables {
        for m in &t.metrics {
            if !metrics.iter().any(|k| k.key == m.key) {
                metrics.push(m.clone());
            }
        }
    }
    let mut s = String::from("kind,experiment,baseline,group,runs");
    for m in &metrics {
        let k = csv_field(&m.key);
        let _ = write!(s, ",{k}_mean,{k}_se,{k}_n,{k}_best");
    }
    s.push('\n');
    for t in &summary.tables {
        for r in &t.rows {
            let _ = write!(
                s,
                "{},{},{},{},{}",
                t.kind.as_str(),
                csv_field(&r.experiment),
                r.baseline,
                csv_field(&r.group),
                r.runs.len()
            );
            for m in &metrics {
                match r.cell(&m.key) {
                    Some(c) => {
                        let _ = write!(s, ",{},{},{},{}", c.estimate.mean, c.estimate.se, c.estimate.n, c.best);
                    }
                    None => s.push_str(",,,,"),
                }
            }
            s.push('\n');
        }
    }
    s
}

/// Interpolation barriers as CSV (base units): experiment, metric, mean, se, n, best.
pub fn barriers_csv(curves: &[Curve]) -> String {
    let mut s = String::from("experiment,metric,barrier_mean,barrier_se,barrier_n,best\n");
    for c in curves {
        if let Some(b) = &c.barrier {
            let e = &b.estimate;
            let _ = writeln!(
                s,
                "{},{},{},{},{},{}",
                csv_field(&c.experiment),
                csv_field(&c.metric),
                e.mean,
                e.se,
                e.n,
                b.best
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::bootstrap::Estimate;
    use crate::report::results::Kind;
    use crate::report::summary::{Cell, Direction, Row};
    use std::collections::BTreeMap;

    fn cell(mean: f64, se: f64, n: usize, best: bool) -> Cell {
        let estimate = Estimate { n, mean, sample_mean: mean, se, sd: 0.0, ci95: [mean, mean] };
        Cell { values: vec![mean; n], estimate, best }
    }

    fn row(name: &str, baseline: bool, cells: &[(&str, Cell)]) -> Row {
        Row {
            experiment: name.into(),
            baseline,
            group: String::new(),
            runs: vec!["r".into()],
            params: BTreeMap::new(),
            cells: cells.iter().map(|(k, c)| (k.to_string(), c.clone())).collect(),
        }
    }

    #[test]
    fn markdown_golden() {
        let table = KindTable {
            kind: Kind::Train,
            metrics: ["accuracy", "time_s", "peak_memory_bytes"].iter().map(|k| MetricSpec::for_key(k)).collect(),
            rows: vec![
                row(
                    "base + full FT",
                    true,
                    &[
                        ("accuracy", cell(0.81961, 0.0041, 3, false)),
                        ("time_s", cell(104.3, 2.25, 3, false)),
                        ("peak_memory_bytes", cell(13.18e9, 0.011e9, 3, false)),
                    ],
                ),
                row(
                    "lerp 15% | head",
                    false,
                    &[
                        ("accuracy", cell(0.7894, 0.0082, 3, false)),
                        ("time_s", cell(45.25, 1.0, 3, true)),
                        ("peak_memory_bytes", cell(1.38e9, 0.004e9, 2, true)),
                    ],
                ),
                row("lerp 15% / full", false, &[("accuracy", cell(0.8166, 0.0051, 3, false))]),
            ],
        };
        let want = "\
| experiment | accuracy | time (s) | peak memory (GB) |
| --- | ---: | ---: | ---: |
| base + full FT (baseline) | 0.820 +- 0.004 (n=3) | 104.30 +- 2.25 (n=3) | 13.18 +- 0.01 (n=3) |
| lerp 15% \\| head | 0.789 +- 0.008 (n=3) | **45.25 +- 1.00 (n=3)** | **1.38 +- 0.00 (n=2)** |
| lerp 15% / full | 0.817 +- 0.005 (n=3) | - | - |
";
        assert_eq!(markdown_table(&table), want);
    }

    #[test]
    fn barrier_markdown_golden() {
        let curve = |e: &str, m: &str, b: Option<Cell>| Curve {
            experiment: e.into(),
            metric: m.into(),
            params: BTreeMap::new(),
            points: vec![],
            barrier: b,
        };
        let curves = vec![
            curve("A-B aligned", "loss", Some(cell(0.0543, 0.0041, 3, true))),
            curve("A-B aligned", "accuracy", Some(cell(0.0242, 0.003, 3, true))),
            curve("A-B naive", "loss", Some(cell(0.3081, 0.0022, 3, false))),
            curve("A-B naive", "accuracy", None),
        ];
        let want = "\
| interpolation | accuracy barrier | loss barrier |
| --- | ---: | ---: |
| A-B aligned | **0.024 +- 0.003 (n=3)** | **0.054 +- 0.004 (n=3)** |
| A-B naive | - | 0.308 +- 0.002 (n=3) |
";
        assert_eq!(markdown_barriers(&curves).unwrap(), want);
        assert_eq!(markdown_barriers(&curves[3..]), None);
    }

    #[test]
    fn column_formats() {
        let f = |key: &str, means: &[f64]| ColumnFormat::for_column(&MetricSpec::for_key(key), means.iter().copied());
        assert_eq!(f("accuracy", &[0.5]).number(0.65649), "0.656");
        assert_eq!(f("time_s", &[0.0512]).number(0.0512), "0.0512");
        assert_eq!(f("time_s", &[12.34, 3.0]).number(3.0), "3.00");
        assert_eq!(f("loss", &[0.5234]).number(0.5234), "0.523");
        let mem = f("peak_memory_bytes", &[2.5e6, 9.9e5]);
        assert_eq!((mem.unit, mem.number(9.9e5)), ("MB", "0.99".to_string()));
        assert_eq!(f("peak_memory_bytes", &[512.0]).header("peak memory"), "peak memory (B)");
        assert_eq!(f("accuracy", &[0.5]).rounded(0.8004), 0.8);
        assert_eq!(MetricSpec::for_key("time_s").direction, Direction::Lower);
    }

    #[test]
    fn csv_quotes_and_leaves_missing_cells_empty() {
        let summary = Summary {
            seed: 0,
            resamples: 10,
            lines_read: 2,
            superseded: 0,
            tables: vec![KindTable {
                kind: Kind::Eval,
                metrics: vec![MetricSpec::for_key("accuracy"), MetricSpec::for_key("loss")],
                rows: vec![
                    row("a, \"quoted\"", false, &[("accuracy", cell(0.5, 0.25, 2, true))]),
                    row("b", true, &[("loss", cell(1.5, 0.0, 1, false))]),
                ],
            }],
            curves: vec![],
        };
        let want = "kind,experiment,baseline,group,runs,accuracy_mean,accuracy_se,accuracy_n,accuracy_best,loss_mean,loss_se,loss_n,loss_best
eval,\"a, \"\"quoted\"\"\",false,,1,0.5,0.25,2,true,,,,
eval,b,true,,1,,,,,1.5,0,1,false
";
        assert_eq!(csv(&summary), want);
    }
}
