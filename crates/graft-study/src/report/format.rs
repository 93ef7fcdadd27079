//! The report's presentation vocabulary, shared by the summary and every renderer: what a metric is (`MetricSpec`:
//! label, `Unit`, better `Direction`), one table cell (`Cell`), and how a metric column prints (`ColumnFormat`:
//! scale, unit, decimals). The best-value mark uses the same format, so that "best" always means "best as printed".
//!
//! This file depends on no other report module but `bootstrap` and `results`, so `summary` (which marks the best
//! cells) and `table`/`html`/`plots` (which print them) can all use it without importing one another.

use serde::Serialize;

use super::bootstrap::Estimate;
use super::results::Kind;

/// Which way is better for a metric; decides the best-value mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Higher,
    Lower,
    /// Unknown metric: no mark.
    Neither,
}

/// The unit of a metric's values in results lines; tables scale bytes to KB/MB/GB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    Fraction,
    Seconds,
    Bytes,
    Plain,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MetricSpec {
    pub key: String,
    pub label: String,
    pub unit: Unit,
    pub direction: Direction,
}

/// The metrics of the schema, in table column order.
const KNOWN_METRICS: &[(&str, &str, Unit, Direction)] = &[
    ("zero_shot_accuracy", "zero-shot accuracy", Unit::Fraction, Direction::Higher),
    ("accuracy", "accuracy", Unit::Fraction, Direction::Higher),
    ("f1_weighted", "F1 (weighted)", Unit::Fraction, Direction::Higher),
    ("f1_macro", "F1 (macro)", Unit::Fraction, Direction::Higher),
    ("loss", "loss", Unit::Plain, Direction::Lower),
    ("time_s", "time", Unit::Seconds, Direction::Lower),
    ("peak_memory_bytes", "peak memory", Unit::Bytes, Direction::Lower),
    // A merge's consistency with its experts (`graft similarity --merged`): the mean of the two cosines, over the
    // tensors the merge merged and over every float tensor; 1 = taking either expert out points back at the other.
    ("consistency_merged", "consistency (merged layers)", Unit::Plain, Direction::Higher),
    ("consistency_all", "consistency (all tensors)", Unit::Plain, Direction::Higher),
];

impl MetricSpec {
    /// The spec of a metric name: the schema's metrics by table, others by what their name says.
    pub fn for_key(key: &str) -> MetricSpec {
        if let Some(&(k, label, unit, direction)) = KNOWN_METRICS.iter().find(|m| m.0 == key) {
            return MetricSpec { key: k.into(), label: label.into(), unit, direction };
        }
        let lower = key.to_ascii_lowercase();
        let direction = if ["loss", "error", "time", "memory", "bytes", "latency", "perplexity"]
            .iter()
            .any(|w| lower.contains(w))
        {
            Direction::Lower
        } else if ["accuracy", "acc", "f1", "precision", "recall", "auc", "score"].iter().any(|w| lower.contains(w)) {
            Direction::Higher
        } else {
            Direction::Neither
        };
        let unit = if lower.ends_with("_bytes") { Unit::Bytes } else { Unit::Plain };
        MetricSpec { key: key.into(), label: key.into(), unit, direction }
    }

    pub fn order(&self) -> (usize, String) {
        let known = KNOWN_METRICS.iter().position(|m| m.0 == self.key).unwrap_or(KNOWN_METRICS.len());
        (known, self.key.clone())
    }
}

/// One metric of one row.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Cell {
    /// One value per run, in run order (base units).
    pub values: Vec<f64>,
    #[serde(flatten)]
    pub estimate: Estimate,
    /// Best of its column (ties all marked), compared at the precision the table prints.
    pub best: bool,
}

/// How one column prints: values are divided by `scale` and shown with `decimals` decimals; `unit` goes in the header.
#[derive(Clone, Debug, PartialEq)]
pub struct ColumnFormat {
    pub scale: f64,
    pub unit: &'static str,
    pub decimals: usize,
}

impl ColumnFormat {
    /// Fractions (accuracy, F1) print with 3 decimals, as the reference studies do. Other columns get enough decimals
    /// for 3 significant digits of their largest mean (at least 2, at most 6); bytes are scaled to B/KB/MB/GB/TB
    /// (decimal, as `graft inspect` and Hugging Face write sizes) by the column's largest mean.
    pub fn for_column(metric: &MetricSpec, means: impl Iterator<Item = f64>) -> ColumnFormat {
        let max = means.map(f64::abs).filter(|v| v.is_finite()).fold(0.0, f64::max);
        match metric.unit {
            Unit::Fraction => ColumnFormat { scale: 1.0, unit: "", decimals: 3 },
            Unit::Seconds => ColumnFormat { scale: 1.0, unit: "s", decimals: decimals_for(max) },
            Unit::Plain => ColumnFormat { scale: 1.0, unit: "", decimals: decimals_for(max) },
            Unit::Bytes => {
                let (scale, unit) = [(1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "KB")]
                    .into_iter()
                    .find(|&(s, _)| max >= s)
                    .unwrap_or((1.0, "B"));
                ColumnFormat { scale, unit, decimals: decimals_for(max / scale) }
            }
        }
    }

    /// The value as the table shows it (scaled and rounded), for comparisons.
    pub fn rounded(&self, v: f64) -> f64 {
        let p = 10f64.powi(self.decimals as i32);
        (v / self.scale * p).round() / p
    }

    pub fn number(&self, v: f64) -> String {
        format!("{:.*}", self.decimals, v / self.scale)
    }

    pub fn header(&self, label: &str) -> String {
        if self.unit.is_empty() {
            label.to_string()
        } else {
            format!("{label} ({})", self.unit)
        }
    }

    /// `mean +- se (n=N)`.
    pub fn cell(&self, cell: &Cell) -> String {
        let e = &cell.estimate;
        format!("{} +- {} (n={})", self.number(e.mean), self.number(e.se), e.n)
    }
}

fn decimals_for(max: f64) -> usize {
    if max <= 0.0 || !max.is_finite() {
        return 2;
    }
    let integer_digits = max.log10().floor() as i64 + 1;
    (3 - integer_digits).clamp(2, 6) as usize
}

/// A table's heading in the markdown document.
pub fn kind_title(kind: Kind) -> &'static str {
    match kind {
        Kind::Train => "Fine-tuning runs (train)",
        Kind::Eval => "Evaluations (eval)",
        Kind::Interpolate => "Interpolations",
    }
}

/// The row label: the experiment name, with "(baseline)" on baseline rows.
pub fn row_label(experiment: &str, baseline: bool) -> String {
    if baseline {
        format!("{experiment} (baseline)")
    } else {
        experiment.to_string()
    }
}
