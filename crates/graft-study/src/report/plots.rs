//! Which charts a report has, as plain data: bars per metric with the baseline as a dashed line, the efficiency
//! scatter (the main metric against training time and peak memory, with its Pareto front), percentage change/saving
//! against the baseline, metric-vs-parameter line plots (numeric parameters), violins of the main metric per
//! categorical parameter, metric-vs-lambda curves of interpolations, and per-domain grouped bars of studies whose
//! metrics are named `<prefix>_<domain>` (the LLM study's perplexity and gain kept per domain). The freeze policy is
//! read in words here, for every chart alike. `render` draws them; keeping the planning separate lets tests check the
//! numbers a chart shows without reading pixels.
//!
//! Values are in the units the tables print (fractions, seconds, KB/MB/GB), so a chart and its table agree.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::rng::Rng;

use super::bootstrap::bootstrap_mean;
use super::format::Direction;
use super::results::Kind;
use super::summary::{Curve, KindTable, MetricSpec, Param, Row, Summary, Unit};
use super::table::ColumnFormat;

/// Where a chart goes on the page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Section {
    Bars,
    Domains,
    Efficiency,
    Numeric,
    Categorical,
    Interpolation,
    Snr,
}

impl Section {
    pub fn title(self) -> &'static str {
        match self {
            Section::Bars => "Metrics per experiment",
            Section::Domains => "Metrics per domain",
            Section::Efficiency => "Efficiency against the baseline",
            Section::Numeric => "Metrics against numeric parameters",
            Section::Categorical => "Metrics by category",
            Section::Interpolation => "Interpolation curves",
            Section::Snr => "SNR of the study's models",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Chart {
    /// File stem under plots/ (unique in a report).
    pub name: String,
    pub title: String,
    pub section: Section,
    pub body: Body,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Body {
    Bars(BarChart),
    Lines(LineChart),
    Violins(ViolinChart),
    Grouped(GroupedBarChart),
    Scatter(ScatterChart),
}

/// The main metric against costs, one panel per cost (training time, peak memory), every experiment a point:
/// colour by method, marker by freeze policy, the Pareto front (nothing else is both cheaper and better) joined by a
/// line and ringed.
#[derive(Clone, Debug, PartialEq)]
pub struct ScatterChart {
    pub y_label: String,
    pub panels: Vec<ScatterPanel>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ScatterPanel {
    pub x_label: String,
    pub points: Vec<ScatterPoint>,
    /// Indices into `points` of the Pareto front, by increasing cost.
    pub front: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ScatterPoint {
    /// The experiment, in words.
    pub label: String,
    /// Colour key: the merge method ("" for none; the baseline is drawn black).
    pub method: String,
    /// Marker key: the freeze policy in words ("full", "head", "selected"), "" when unknown.
    pub policy: String,
    pub baseline: bool,
    /// (mean, standard error) of the cost and of the metric.
    pub x: (f64, f64),
    pub y: (f64, f64),
}

/// Vertical bars in groups along x (one group per category), one bar per series in each group, a colour per series.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupedBarChart {
    pub y_label: String,
    pub categories: Vec<String>,
    pub series: Vec<GroupedSeries>,
    /// Dashed black lines: across one category's group (`Some(index)`) or across the whole chart (`None`).
    pub references: Vec<(Option<usize>, f64)>,
    /// The references' legend entry.
    pub reference_label: Option<String>,
    pub decimals: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct GroupedSeries {
    pub label: String,
    /// (mean, standard error) per category; None where the series has no value there.
    pub values: Vec<Option<(f64, f64)>>,
}

/// Horizontal bars, one per experiment, coloured and separated by group (method).
#[derive(Clone, Debug, PartialEq)]
pub struct BarChart {
    pub value_label: String,
    pub bars: Vec<Bar>,
    /// The baseline, drawn as a dashed line.
    pub reference: Option<Reference>,
    /// Efficiency charts: a solid line at 0 and signed value labels.
    pub signed: bool,
    pub decimals: usize,
    /// Appended to value labels ("%" on efficiency charts).
    pub suffix: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Bar {
    pub label: String,
    pub group: String,
    pub value: f64,
    /// Standard error, drawn as an error bar.
    pub err: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Reference {
    pub label: String,
    pub value: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct LineChart {
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub label: String,
    /// (x, mean, standard error), sorted by x.
    pub points: Vec<(f64, f64, f64)>,
    /// Individual runs, drawn faint behind the means.
    pub runs: Vec<(f64, f64)>,
    /// A dashed straight line (interpolation curves: between the endpoints, what "no barrier" would be).
    pub chord: Option<[(f64, f64); 2]>,
    /// The freeze policy in words, for the marker ("" without one).
    pub policy: String,
}

/// The main metric's runs per value of each categorical parameter, one panel per parameter (method, freeze policy,
/// top-p as a category...): a violin (density) with quartiles where a value has enough runs, else the runs as
/// points with their mean +- the bootstrap standard error (as the tables quote it). Points keep the method's colour
/// and the policy's marker.
#[derive(Clone, Debug, PartialEq)]
pub struct ViolinChart {
    pub y_label: String,
    pub panels: Vec<ViolinPanel>,
    /// The baseline, drawn as a dashed line across every panel.
    pub reference: Option<Reference>,
    pub decimals: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ViolinPanel {
    /// The parameter in words.
    pub param: String,
    pub categories: Vec<Category>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Category {
    pub label: String,
    /// One value per run.
    pub values: Vec<f64>,
    /// Per value: the run's method ("" without one) and freeze policy in words, for its colour and marker.
    pub methods: Vec<String>,
    pub policies: Vec<String>,
    /// Bootstrap standard error of the mean of `values` (the summary's seed and resamples, a stream of its own).
    pub se: f64,
}

/// Metrics that get a bar chart, in order.
const BAR_METRICS: &[&str] =
    &["accuracy", "f1_weighted", "f1_macro", "zero_shot_accuracy", "time_s", "peak_memory_bytes"];
/// Metrics compared with the baseline: quality as percentage change, cost as percentage saved.
const CHANGE_METRICS: &[&str] = &["accuracy", "f1_weighted", "f1_macro", "zero_shot_accuracy"];
const SAVING_METRICS: &[&str] = &["time_s", "peak_memory_bytes"];
/// Metrics plotted against numeric parameters. Costs are not: the efficiency scatter shows them against quality.
const PARAM_METRICS: &[&str] = &["accuracy", "f1_weighted", "zero_shot_accuracy"];
/// Config entries that are results of other parameters (the trainable parameter count follows from the freeze
/// policy), not factors of a study: no chart groups or plots by them.
const DERIVED_PARAMS: &[&str] = &["trainable_params"];
/// A numeric parameter with at most this many values is also shown as a category (top-p: 10%, 15%, all layers).
const MAX_NUMERIC_CATEGORIES: usize = 6;
/// Series in one line-chart panel: more get facets, since a reader cannot tell more colours apart.
pub const MAX_SERIES: usize = 8;

/// Every chart of a report, in page order.
pub fn plan(summary: &Summary) -> Vec<Chart> {
    let mut charts = Vec::new();
    let several_kinds = summary.tables.len() > 1;
    let tables: Vec<KindTable> = summary.tables.iter().map(with_policies).collect();
    for t in &tables {
        let prefix = if several_kinds { format!("{}_", t.kind.as_str()) } else { String::new() };
        charts.extend(bar_charts(t, &prefix));
        if t.kind == Kind::Train {
            charts.extend(efficiency_scatter(t, &prefix));
        }
        charts.extend(efficiency_charts(t, &prefix));
        charts.extend(numeric_charts(t, &prefix));
        charts.extend(violin_chart(t, &prefix, summary));
        charts.extend(domain_charts(t, &prefix));
    }
    charts.extend(interpolation_charts(&summary.curves));
    charts.sort_by_key(|c| c.section);
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for c in &mut charts {
        let n = seen.entry(c.name.clone()).or_insert(0);
        *n += 1;
        if *n > 1 {
            c.name = format!("{}_{}", c.name, n);
        }
    }
    charts
}

/// A file-name-safe form of a label.
pub fn slug(s: &str) -> String {
    let mut out = String::new();
    for ch in s.chars() {
        if ch.is_ascii_alphanumeric() {
            out.push(ch.to_ascii_lowercase());
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    let out = out.trim_matches('_').to_string();
    if out.is_empty() {
        "x".into()
    } else {
        out
    }
}

fn metric_title(kind: Kind, m: &MetricSpec) -> String {
    match (kind, m.key.as_str()) {
        (_, "zero_shot_accuracy") => "Zero-shot accuracy".into(),
        (Kind::Train, "time_s") => "Training time".into(),
        (Kind::Train, _) if m.unit == Unit::Fraction => format!("Fine-tuned {}", m.label),
        _ => capitalize(&m.label),
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

fn axis_label(m: &MetricSpec, fmt: &ColumnFormat) -> String {
    fmt.header(&m.label)
}

fn spec<'a>(t: &'a KindTable, key: &str) -> Option<&'a MetricSpec> {
    t.metrics.iter().find(|m| m.key == key)
}

fn bar_charts(t: &KindTable, prefix: &str) -> Vec<Chart> {
    let mut out = Vec::new();
    for key in BAR_METRICS {
        let Some(m) = spec(t, key) else { continue };
        let fmt = t.format(m);
        let bars: Vec<Bar> = t
            .rows
            .iter()
            .filter(|r| !r.baseline)
            .filter_map(|r| {
                let c = r.cell(key)?;
                Some(Bar {
                    label: r.experiment.clone(),
                    group: r.group.clone(),
                    value: c.estimate.mean / fmt.scale,
                    err: c.estimate.se / fmt.scale,
                })
            })
            .collect();
        if bars.is_empty() {
            continue;
        }
        let reference = t.baseline().and_then(|b| {
            let c = b.cell(key)?;
            let value = c.estimate.mean / fmt.scale;
            Some(Reference { label: format!("baseline ({}): {}", b.experiment, fmt.number(c.estimate.mean)), value })
        });
        out.push(Chart {
            name: format!("{prefix}bars_{key}"),
            title: metric_title(t.kind, m),
            section: Section::Bars,
            body: Body::Bars(BarChart {
                value_label: axis_label(m, &fmt),
                bars,
                reference,
                signed: false,
                decimals: fmt.decimals,
                suffix: String::new(),
            }),
        });
    }
    out
}

/// A table as the charts see it: `freeze` in words on every row where the policy is known (the runs of a
/// selected-layers experiment each name their own selection file, so the summary keeps no shared value), and
/// derived config entries dropped.
fn with_policies(t: &KindTable) -> KindTable {
    let mut t = t.clone();
    for r in &mut t.rows {
        let policy = freeze_policy(r);
        if !policy.is_empty() {
            r.params.insert("freeze".into(), Param::Text(policy));
        }
        for k in DERIVED_PARAMS {
            r.params.remove(*k);
        }
    }
    t
}

/// The metric a study is judged by, first of these present: the efficiency scatter and the violins show it.
const MAIN_METRICS: &[&str] = &["accuracy", "f1_weighted", "f1_macro", "zero_shot_accuracy"];

fn main_metric(t: &KindTable) -> Option<&MetricSpec> {
    MAIN_METRICS.iter().find_map(|k| spec(t, k))
}

/// A freeze setting in words: "full" (nothing frozen), "head" (all but the head frozen), "selected" (the SNR
/// selection trains), other values as written.
pub fn policy_word(freeze: &str) -> String {
    match freeze {
        "none" | "full" => "full".into(),
        "all-but-head" | "head" => "head".into(),
        f if f.starts_with("selected") => "selected".into(),
        other => other.into(),
    }
}

/// A row's freeze policy in words: from its `freeze` parameter, or, where the runs disagree on it (a selection file
/// per seed), from the `NAME / POLICY` experiment name graft's studies write; "" when neither says.
pub fn freeze_policy(r: &Row) -> String {
    if let Some(f) = r.params.get("freeze") {
        return policy_word(&f.display());
    }
    match r.experiment.rsplit_once(" / ") {
        Some((_, p)) if ["full", "head", "selected"].contains(&p.trim()) => p.trim().into(),
        _ => String::new(),
    }
}

/// The Pareto front of (cost, value) points, lower cost and higher value better: the points no other point beats on
/// both (cost <= and value >=, one strictly). Identical points are both on it. Indices by increasing cost.
/// A sweep: by cost, then value descending; a point is on the front when its value beats every cheaper point's.
pub fn pareto_front(points: &[(f64, f64)]) -> Vec<usize> {
    let mut order: Vec<usize> =
        (0..points.len()).filter(|&i| points[i].0.is_finite() && points[i].1.is_finite()).collect();
    order.sort_by(|&a, &b| points[a].0.total_cmp(&points[b].0).then(points[b].1.total_cmp(&points[a].1)));
    let mut front = Vec::new();
    let mut best: Option<(f64, f64)> = None;
    for i in order {
        let (x, y) = points[i];
        match best {
            Some((bx, by)) if y < by || (y == by && x != bx) => continue,
            Some((_, by)) if y == by => {}
            _ => best = Some((x, y)),
        }
        front.push(i);
    }
    front
}

/// One panel's Pareto front by name, as `summary.json` lists it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Front {
    pub cost: String,
    pub experiments: Vec<String>,
}

/// The Pareto fronts of a scatter chart's panels; none for other charts.
pub fn fronts(chart: &Chart) -> Vec<Front> {
    let Body::Scatter(s) = &chart.body else { return Vec::new() };
    s.panels
        .iter()
        .map(|p| Front {
            cost: p.x_label.clone(),
            experiments: p.front.iter().map(|&i| p.points[i].label.clone()).collect(),
        })
        .collect()
}

/// The main metric against training time and against peak memory, every experiment (the baseline too) a point.
fn efficiency_scatter(t: &KindTable, prefix: &str) -> Option<Chart> {
    let m = main_metric(t)?;
    if m.direction != Direction::Higher {
        return None;
    }
    let fy = t.format(m);
    let mut panels = Vec::new();
    for key in ["time_s", "peak_memory_bytes"] {
        let Some(cost) = spec(t, key) else { continue };
        let fx = t.format(cost);
        let points: Vec<ScatterPoint> = t
            .rows
            .iter()
            .filter_map(|r| {
                let (c, v) = (r.cell(key)?, r.cell(&m.key)?);
                Some(ScatterPoint {
                    label: r.experiment.clone(),
                    method: if r.baseline { String::new() } else { r.group.clone() },
                    policy: freeze_policy(r),
                    baseline: r.baseline,
                    x: (c.estimate.mean / fx.scale, c.estimate.se / fx.scale),
                    y: (v.estimate.mean / fy.scale, v.estimate.se / fy.scale),
                })
            })
            .collect();
        if points.len() < 2 {
            continue;
        }
        let front = pareto_front(&points.iter().map(|p| (p.x.0, p.y.0)).collect::<Vec<_>>());
        let what = if key == "time_s" { "training time" } else { "peak memory" };
        panels.push(ScatterPanel { x_label: fx.header(what), points, front });
    }
    if panels.is_empty() {
        return None;
    }
    let costs: Vec<&str> = panels
        .iter()
        .map(|p| if p.x_label.starts_with("training") { "training time" } else { "peak memory" })
        .collect();
    Some(Chart {
        name: format!("{prefix}efficiency_{}", m.key),
        title: format!(
            "{} for its cost: against {} (the Pareto front joined)",
            metric_title(t.kind, m),
            costs.join(" and ")
        ),
        section: Section::Efficiency,
        body: Body::Scatter(ScatterChart { y_label: axis_label(m, &fy), panels }),
    })
}

/// Percentage change of quality metrics, (x - b) / b, and percentage saved of cost metrics, (b - x) / b, against the
/// baseline row b. Error bars are the row's standard error relative to the baseline mean (the baseline's own
/// uncertainty is left out: it is the same for every bar and shows in the table).
fn efficiency_charts(t: &KindTable, prefix: &str) -> Vec<Chart> {
    let Some(base) = t.baseline() else { return Vec::new() };
    let mut out = Vec::new();
    for key in CHANGE_METRICS.iter().chain(SAVING_METRICS) {
        let Some(m) = spec(t, key) else { continue };
        let Some(b) = base.cell(key).map(|c| c.estimate.mean).filter(|&b| b != 0.0) else { continue };
        let saving = SAVING_METRICS.contains(key);
        let bars: Vec<Bar> = t
            .rows
            .iter()
            .filter(|r| !r.baseline)
            .filter_map(|r| {
                let c = r.cell(key)?;
                let x = c.estimate.mean;
                let value = if saving { (b - x) / b * 100.0 } else { (x - b) / b * 100.0 };
                Some(Bar {
                    label: r.experiment.clone(),
                    group: r.group.clone(),
                    value,
                    err: c.estimate.se / b.abs() * 100.0,
                })
            })
            .collect();
        if bars.is_empty() {
            continue;
        }
        let (name, title, axis) = if saving {
            let what = if *key == "time_s" { "training time" } else { "peak memory" };
            (format!("{prefix}saving_{key}"), format!("Saving of {what} vs baseline"), format!("{what} saved (%)"))
        } else {
            (
                format!("{prefix}change_{key}"),
                format!("Change of {} vs baseline", m.label),
                format!("{} change (%)", m.label),
            )
        };
        out.push(Chart {
            name,
            title: format!("{title} ({})", base.experiment),
            section: Section::Efficiency,
            body: Body::Bars(BarChart {
                value_label: axis,
                bars,
                reference: None,
                signed: true,
                decimals: 1,
                suffix: "%".into(),
            }),
        });
    }
    out
}

/// Parameters with at least two values among `rows`; numeric when every value is a number.
fn varying_params(rows: &[&Row]) -> Vec<(String, bool)> {
    let mut keys: Vec<String> = Vec::new();
    for r in rows {
        for k in r.params.keys() {
            if !keys.contains(k) {
                keys.push(k.clone());
            }
        }
    }
    keys.sort();
    keys.into_iter()
        .filter_map(|k| {
            let values: Vec<&Param> = rows.iter().filter_map(|r| r.params.get(&k)).collect();
            let mut distinct: Vec<&Param> = Vec::new();
            for v in &values {
                if !distinct.contains(v) {
                    distinct.push(v);
                }
            }
            let numeric = values.iter().all(|v| v.as_number().is_some());
            (distinct.len() >= 2).then_some((k, numeric))
        })
        .collect()
}

fn param_text(r: &Row, key: &str) -> String {
    r.params.get(key).map(Param::display).unwrap_or_else(|| "-".into())
}

/// A parameter's value in words: the method by its name, others as "freeze head"; an absent value says so
/// ("no freeze") instead of a `-` placeholder.
fn param_words(key: &str, value: Option<&Param>) -> String {
    match value {
        Some(v) if key == "method" => v.display(),
        Some(v) => format!("{key} {}", v.display()),
        None => format!("no {key}"),
    }
}

/// A line series' legend text: the values of the series keys in words, absent ones left out.
fn series_label(r: &Row, keys: &[String]) -> String {
    let words: Vec<String> = keys.iter().filter_map(|k| r.params.get(k).map(|v| param_words(k, Some(v)))).collect();
    if keys.is_empty() {
        "all runs".into()
    } else if words.is_empty() {
        format!("no {}", keys.join(" or "))
    } else {
        words.join(", ")
    }
}

/// Lines of a metric against a numeric parameter, one series per combination of the other parameters that vary
/// among the plotted rows (method, freeze...). Parameters that differ on every row identify rows rather than
/// group them, and are left out of the series key.
fn numeric_charts(t: &KindTable, prefix: &str) -> Vec<Chart> {
    let all: Vec<&Row> = t.rows.iter().collect();
    let mut out = Vec::new();
    for (param, numeric) in varying_params(&all) {
        if !numeric {
            continue;
        }
        for key in PARAM_METRICS {
            let Some(m) = spec(t, key) else { continue };
            let fmt = t.format(m);
            // The baseline is a reference, not a setting of the study's factors: a parameter only it changes (its own
            // learning rate) is no axis.
            let rows: Vec<&Row> = t
                .rows
                .iter()
                .filter(|r| !r.baseline && r.params.contains_key(&param) && r.cell(key).is_some())
                .collect();
            let mut xs: Vec<f64> = rows.iter().filter_map(|r| r.params[&param].as_number()).collect();
            xs.sort_by(f64::total_cmp);
            xs.dedup();
            if xs.len() < 2 {
                continue;
            }
            let mut series_keys: Vec<String> = varying_params(&rows)
                .into_iter()
                .map(|(k, _)| k)
                .filter(|k| *k != param)
                .filter(|k| {
                    let mut d: Vec<String> = rows.iter().map(|r| param_text(r, k)).collect();
                    d.sort();
                    d.dedup();
                    d.len() < rows.len()
                })
                .collect();
            // The method first: it names the series and the facets.
            series_keys.sort_by_key(|k| k != "method");
            // Facets: one panel per value of the first series key (the method, when it varies), so colours
            // within a panel stay few; a facet still too full is cut into parts.
            let mut facets: Vec<(String, Vec<Series>)> = Vec::new();
            for r in &rows {
                let label = series_label(r, &series_keys);
                let facet = match series_keys.first() {
                    Some(k) if series_keys.len() > 1 => param_words(k, r.params.get(k)),
                    _ => String::new(),
                };
                let x = r.params[&param].as_number().unwrap();
                let c = r.cell(key).unwrap();
                let f = match facets.iter().position(|(name, _)| *name == facet) {
                    Some(i) => i,
                    None => {
                        facets.push((facet, Vec::new()));
                        facets.len() - 1
                    }
                };
                let series = &mut facets[f].1;
                let idx = match series.iter().position(|s| s.label == label) {
                    Some(i) => i,
                    None => {
                        series.push(Series {
                            label,
                            points: vec![],
                            runs: vec![],
                            chord: None,
                            policy: r.params.get("freeze").map(Param::display).unwrap_or_default(),
                        });
                        series.len() - 1
                    }
                };
                let s = &mut series[idx];
                s.points.push((x, c.estimate.mean / fmt.scale, c.estimate.se / fmt.scale));
                s.runs.extend(c.values.iter().map(|v| (x, v / fmt.scale)));
            }
            // One panel when everything fits in it.
            if facets.iter().map(|(_, s)| s.len()).sum::<usize>() <= MAX_SERIES {
                let all = facets.drain(..).flat_map(|(_, s)| s).collect();
                facets.push((String::new(), all));
            }
            let title = format!("{} vs {param}", metric_title(t.kind, m));
            let name = format!("{prefix}{key}_vs_{}", slug(&param));
            for (facet, mut series) in facets {
                for s in &mut series {
                    s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
                }
                let parts = series.len().div_ceil(MAX_SERIES);
                for (i, chunk) in series.chunks(MAX_SERIES).enumerate() {
                    let mut suffix = String::new();
                    let mut stem = name.clone();
                    if !facet.is_empty() {
                        suffix = format!(" ({facet})");
                        stem = format!("{stem}_{}", slug(&facet));
                    }
                    if parts > 1 {
                        suffix = format!("{suffix} (part {} of {parts})", i + 1);
                        stem = format!("{stem}_{}", i + 1);
                    }
                    out.push(Chart {
                        name: stem,
                        title: format!("{title}{suffix}"),
                        section: Section::Numeric,
                        body: Body::Lines(LineChart {
                            x_label: param_title(&param),
                            y_label: axis_label(m, &fmt),
                            series: chunk.to_vec(),
                        }),
                    });
                }
            }
        }
    }
    out
}

/// A parameter's name in words, as a panel title.
fn param_title(key: &str) -> String {
    match key {
        "freeze" => "freeze policy".into(),
        "top_p" => "top-p (share of layers merged)".into(),
        k => k.replace('_', " "),
    }
}

/// Violins (or points where few) of the main metric's runs per value of every categorical parameter, and of numeric
/// ones with few values, one panel each; the baseline as a line. A parameter qualifies with 2 to `MAX_SERIES` values
/// among the non-baseline rows, one of them shared by two experiments or more (else it names experiments).
fn violin_chart(t: &KindTable, prefix: &str, summary: &Summary) -> Option<Chart> {
    let m = main_metric(t)?;
    let fmt = t.format(m);
    let rows: Vec<&Row> = t.rows.iter().filter(|r| !r.baseline && r.cell(&m.key).is_some()).collect();
    let mut panels = Vec::new();
    for (param, numeric) in varying_params(&rows) {
        let mut cats: Vec<(Param, Vec<&Row>)> = Vec::new();
        for r in &rows {
            let Some(v) = r.params.get(&param) else { continue };
            match cats.iter_mut().find(|(p, _)| p == v) {
                Some((_, rs)) => rs.push(r),
                None => cats.push((v.clone(), vec![r])),
            }
        }
        if numeric {
            if cats.len() > MAX_NUMERIC_CATEGORIES {
                continue;
            }
            cats.sort_by(|a, b| a.0.as_number().unwrap_or(0.0).total_cmp(&b.0.as_number().unwrap_or(0.0)));
        }
        if cats.len() < 2 || cats.len() > MAX_SERIES || cats.iter().all(|(_, rs)| rs.len() < 2) {
            continue;
        }
        let categories = cats
            .into_iter()
            .map(|(p, rs)| {
                let label = p.display();
                let mut c = Category { label, values: vec![], methods: vec![], policies: vec![], se: 0.0 };
                for r in rs {
                    let cell = r.cell(&m.key).expect("filtered");
                    for v in &cell.values {
                        c.values.push(v / fmt.scale);
                        c.methods.push(r.group.clone());
                        c.policies.push(r.params.get("freeze").map(Param::display).unwrap_or_default());
                    }
                }
                let stream = format!("violin/{}/{}/{param}/{}", t.kind.as_str(), m.key, c.label);
                let mut rng = Rng::for_label(summary.seed, &stream);
                c.se = bootstrap_mean(&c.values, summary.resamples, &mut rng).map_or(0.0, |e| e.se);
                c
            })
            .collect();
        panels.push(ViolinPanel { param: param_title(&param), categories });
    }
    if panels.is_empty() {
        return None;
    }
    let reference = t.baseline().and_then(|b| {
        let c = b.cell(&m.key)?;
        Some(Reference {
            label: format!("baseline ({}): {}", b.experiment, fmt.number(c.estimate.mean)),
            value: c.estimate.mean / fmt.scale,
        })
    });
    Some(Chart {
        name: format!("{prefix}{}_by_parameter", m.key),
        title: format!("{} by parameter: its spread over each value (every run a point)", metric_title(t.kind, m)),
        section: Section::Categorical,
        body: Body::Violins(ViolinChart { y_label: axis_label(m, &fmt), panels, reference, decimals: fmt.decimals }),
    })
}

/// A metric against lambda, one series per interpolate experiment, with the straight line between the endpoints.
fn interpolation_charts(curves: &[Curve]) -> Vec<Chart> {
    let mut metrics: Vec<String> = Vec::new();
    for c in curves {
        if !metrics.contains(&c.metric) {
            metrics.push(c.metric.clone());
        }
    }
    let mut out = Vec::new();
    for key in metrics {
        let m = MetricSpec::for_key(&key);
        let of_metric: Vec<&Curve> = curves.iter().filter(|c| c.metric == key).collect();
        let fmt = ColumnFormat::for_column(&m, of_metric.iter().flat_map(|c| c.points.iter().map(|p| p.estimate.mean)));
        let series = of_metric
            .iter()
            .map(|c| {
                let points: Vec<(f64, f64, f64)> = c
                    .points
                    .iter()
                    .map(|p| (p.lambda, p.estimate.mean / fmt.scale, p.estimate.se / fmt.scale))
                    .collect();
                let at = |l: f64| points.iter().find(|p| (p.0 - l).abs() < 1e-9).map(|p| (p.0, p.1));
                let chord = at(0.0).zip(at(1.0)).map(|(a, b)| [a, b]);
                let runs =
                    c.points.iter().flat_map(|p| p.values.iter().map(move |v| (p.lambda, v / fmt.scale))).collect();
                Series { label: c.experiment.clone(), points, runs, chord, policy: String::new() }
            })
            .collect();
        out.push(Chart {
            name: format!("interpolate_{}", slug(&key)),
            title: format!("{} along the interpolation path", capitalize(&m.label)),
            section: Section::Interpolation,
            body: Body::Lines(LineChart { x_label: "lambda".into(), y_label: axis_label(&m, &fmt), series }),
        });
    }
    out
}

/// Metric-name prefixes that carry a domain after them, with the question their chart answers.
const DOMAIN_METRICS: &[&str] = &["perplexity", "gain_kept"];
/// Categories (groups of bars) in one panel of a grouped bar chart before it is cut into parts.
const MAX_CATEGORIES_PER_PANEL: usize = 12;

/// The domains of the metrics `<prefix>_<domain>` of a table, in column order.
fn domains_of(t: &KindTable, prefix: &str) -> Vec<String> {
    let head = format!("{prefix}_");
    t.metrics.iter().filter_map(|m| m.key.strip_prefix(&head)).filter(|d| !d.is_empty()).map(String::from).collect()
}

/// Studies over several text domains: perplexity per model on each domain (groups = domains, a bar per model, the
/// baseline's perplexity as a dashed line across its domain's group), and the share of each expert's gain a merge
/// keeps (groups = merges, a bar per domain, a dashed line at 1, the expert's own gain). Domain names come from the
/// metric names, so any study that writes `perplexity_<domain>` / `gain_kept_<domain>` gets them.
fn domain_charts(t: &KindTable, prefix: &str) -> Vec<Chart> {
    let mut out = Vec::new();
    for metric in DOMAIN_METRICS {
        let domains = domains_of(t, metric);
        if domains.is_empty() {
            continue;
        }
        let keys: Vec<String> = domains.iter().map(|d| format!("{metric}_{d}")).collect();
        let has_any = |r: &Row| keys.iter().any(|k| r.cell(k).is_some());
        let fmt = ColumnFormat::for_column(
            &MetricSpec::for_key(&keys[0]),
            t.rows.iter().flat_map(|r| keys.iter().filter_map(|k| r.cell(k)).map(|c| c.estimate.mean)),
        );
        let value = |r: &Row, k: &str| r.cell(k).map(|c| (c.estimate.mean / fmt.scale, c.estimate.se / fmt.scale));
        if *metric == "perplexity" {
            let models: Vec<&Row> = t.rows.iter().filter(|r| !r.baseline && has_any(r)).collect();
            if models.is_empty() {
                continue;
            }
            let base = t.baseline().filter(|b| has_any(b));
            let references: Vec<(Option<usize>, f64)> = base
                .map(|b| keys.iter().enumerate().filter_map(|(i, k)| value(b, k).map(|v| (Some(i), v.0))).collect())
                .unwrap_or_default();
            let parts = models.len().div_ceil(MAX_SERIES);
            for (i, chunk) in models.chunks(MAX_SERIES).enumerate() {
                let series = chunk
                    .iter()
                    .map(|r| GroupedSeries {
                        label: r.experiment.clone(),
                        values: keys.iter().map(|k| value(r, k)).collect(),
                    })
                    .collect();
                let (name, part) = part_names(format!("{prefix}perplexity_per_domain"), i, parts);
                out.push(Chart {
                    name,
                    title: format!("Which model predicts each domain best? Perplexity, lower is better{part}"),
                    section: Section::Domains,
                    body: Body::Grouped(GroupedBarChart {
                        y_label: "perplexity (lower is better)".into(),
                        categories: domains.clone(),
                        series,
                        references: references.clone(),
                        reference_label: base.map(|b| format!("{} (the model before fine-tuning)", b.experiment)),
                        decimals: fmt.decimals,
                    }),
                });
            }
        } else {
            // Merges when the rows say which are (a method parameter); otherwise every model but the baseline.
            let candidates: Vec<&Row> = t.rows.iter().filter(|r| !r.baseline && has_any(r)).collect();
            let merges: Vec<&Row> = if candidates.iter().any(|r| r.params.contains_key("method")) {
                candidates.into_iter().filter(|r| r.params.contains_key("method")).collect()
            } else {
                candidates
            };
            if merges.is_empty() || domains.len() > MAX_SERIES {
                continue;
            }
            let parts = merges.len().div_ceil(MAX_CATEGORIES_PER_PANEL);
            for (i, chunk) in merges.chunks(MAX_CATEGORIES_PER_PANEL).enumerate() {
                let series = domains
                    .iter()
                    .zip(&keys)
                    .map(|(d, k)| GroupedSeries {
                        label: format!("on {d}"),
                        values: chunk.iter().map(|r| value(r, k)).collect(),
                    })
                    .collect();
                let (name, part) = part_names(format!("{prefix}gain_kept_per_merge"), i, parts);
                out.push(Chart {
                    name,
                    title: format!("How much of each expert's gain does a merge keep? (1 = the expert's){part}"),
                    section: Section::Domains,
                    body: Body::Grouped(GroupedBarChart {
                        y_label: "share of the expert's gain kept".into(),
                        categories: chunk.iter().map(|r| r.experiment.clone()).collect(),
                        series,
                        references: vec![(None, 1.0)],
                        reference_label: Some("1: the expert's own gain on its domain".into()),
                        decimals: fmt.decimals.max(2),
                    }),
                });
            }
        }
    }
    out
}

/// A chart's file stem and title suffix when it is part `i` of `parts`.
fn part_names(stem: String, i: usize, parts: usize) -> (String, String) {
    if parts > 1 {
        (format!("{stem}_{}", i + 1), format!(" (part {} of {parts})", i + 1))
    } else {
        (stem, String::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::results::{parse_lines, supersede};
    use crate::report::summary::summarize;
    use std::path::Path;

    fn summary(lines: &[(&str, &str, &str, &str, bool)]) -> Summary {
        let text: Vec<String> = lines
            .iter()
            .enumerate()
            .map(|(i, (exp, run, config, metrics, baseline))| {
                format!(
                    r#"{{"kind":"train","run_id":"{run}","experiment":"{exp}","seed":{i},"config":{config},"metrics":{metrics},"baseline":{baseline}}}"#
                )
            })
            .collect();
        summarize(&supersede(parse_lines(Path::new("t"), text.join("\n").as_bytes()).unwrap()), 0, 500)
    }

    fn find<'a>(charts: &'a [Chart], name: &str) -> &'a Chart {
        charts
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no chart {name} in {:?}", charts.iter().map(|c| &c.name).collect::<Vec<_>>()))
    }

    #[test]
    fn bars_efficiency_and_parameter_charts() {
        let s = summary(&[
            ("base", "b", r#"{"freeze":"full"}"#, r#"{"accuracy":0.80,"time_s":100,"peak_memory_bytes":2e9}"#, true),
            (
                "lerp 10% head",
                "l1",
                r#"{"method":"lerp","top_p":0.1,"freeze":"head"}"#,
                r#"{"accuracy":0.76,"time_s":40,"peak_memory_bytes":5e8}"#,
                false,
            ),
            (
                "lerp 20% head",
                "l2",
                r#"{"method":"lerp","top_p":0.2,"freeze":"head"}"#,
                r#"{"accuracy":0.78,"time_s":45,"peak_memory_bytes":5e8}"#,
                false,
            ),
            (
                "ties 10% full",
                "t1",
                r#"{"method":"ties","top_p":0.1,"freeze":"full"}"#,
                r#"{"accuracy":0.84,"time_s":100,"peak_memory_bytes":2e9}"#,
                false,
            ),
            (
                "ties 20% full",
                "t2",
                r#"{"method":"ties","top_p":0.2,"freeze":"full"}"#,
                r#"{"accuracy":0.82,"time_s":110,"peak_memory_bytes":2e9}"#,
                false,
            ),
        ]);
        let charts = plan(&s);
        let Body::Bars(acc) = &find(&charts, "bars_accuracy").body else { panic!() };
        assert_eq!(
            acc.bars.iter().map(|b| b.label.as_str()).collect::<Vec<_>>(),
            ["lerp 10% head", "lerp 20% head", "ties 10% full", "ties 20% full"]
        );
        assert_eq!(acc.bars[2].group, "ties");
        let r = acc.reference.as_ref().unwrap();
        assert!((r.value - 0.80).abs() < 1e-12);
        assert_eq!(r.label, "baseline (base): 0.800");
        let Body::Bars(mem) = &find(&charts, "bars_peak_memory_bytes").body else { panic!() };
        assert_eq!(mem.value_label, "peak memory (GB)");
        assert!((mem.bars[0].value - 0.5).abs() < 1e-12);
        // Efficiency: (0.76 - 0.80) / 0.80 = -5%; time saved (100 - 40) / 100 = 60%; memory saved 75%.
        let Body::Bars(change) = &find(&charts, "change_accuracy").body else { panic!() };
        assert!((change.bars[0].value - -5.0).abs() < 1e-9 && (change.bars[2].value - 5.0).abs() < 1e-9);
        let Body::Bars(time) = &find(&charts, "saving_time_s").body else { panic!() };
        assert!((time.bars[0].value - 60.0).abs() < 1e-9 && (time.bars[3].value - -10.0).abs() < 1e-9);
        let Body::Bars(memsave) = &find(&charts, "saving_peak_memory_bytes").body else { panic!() };
        assert!((memsave.bars[1].value - 75.0).abs() < 1e-9);
        // Accuracy vs top_p: series by method (freeze is tied to method here, so it is part of the key too).
        let Body::Lines(vs) = &find(&charts, "accuracy_vs_top_p").body else { panic!() };
        let labels: Vec<&str> = vs.series.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(labels, ["lerp, freeze head", "ties, freeze full"]);
        let pts: Vec<(f64, f64)> = vs.series[0].points.iter().map(|p| (p.0, p.1)).collect();
        assert_eq!(pts.len(), 2);
        assert!(
            pts[0].0 == 0.1 && (pts[0].1 - 0.76).abs() < 1e-12 && pts[1].0 == 0.2 && (pts[1].1 - 0.78).abs() < 1e-12
        );
        // Violins: one panel per parameter over the non-baseline rows, top-p as a category; runs keep their
        // method and policy for colour and marker.
        let Body::Violins(v) = &find(&charts, "accuracy_by_parameter").body else { panic!() };
        let panels: Vec<&str> = v.panels.iter().map(|p| p.param.as_str()).collect();
        assert_eq!(panels, ["freeze policy", "method", "top-p (share of layers merged)"]);
        let freeze = &v.panels[0].categories;
        assert_eq!(freeze.iter().map(|c| c.label.as_str()).collect::<Vec<_>>(), ["head", "full"]);
        assert_eq!(freeze[1].values, [0.84, 0.82]);
        assert_eq!(freeze[1].methods, ["ties", "ties"]);
        assert_eq!(freeze[0].policies, ["head", "head"]);
        // The error bar is the bootstrap SE, as the tables quote: for two runs 0.84 and 0.82 the resample mean is
        // 0.84, 0.83 or 0.82 with chances 1/4, 1/2, 1/4, so its standard deviation is 0.01 / sqrt(2).
        let by_hand = 0.01 / 2f64.sqrt();
        assert!((freeze[1].se - by_hand).abs() < 0.15 * by_hand, "{} vs {by_hand}", freeze[1].se);
        let top_p = &v.panels[2].categories;
        assert_eq!(top_p.iter().map(|c| c.label.as_str()).collect::<Vec<_>>(), ["0.1", "0.2"]);
        assert_eq!(top_p[0].values, [0.76, 0.84]);
        assert!((v.reference.as_ref().unwrap().value - 0.80).abs() < 1e-12);
        // Costs are in the scatter, not against parameters.
        assert!(charts.iter().all(|c| !c.name.starts_with("time_s_vs") && !c.name.starts_with("peak_memory")));
        let Body::Scatter(sc) = &find(&charts, "efficiency_accuracy").body else { panic!() };
        // Time: base (100 s, 0.80), lerp 10% (40, 0.76), lerp 20% (45, 0.78), ties 10% (100, 0.84), ties 20% (110,
        // 0.82): the front is lerp 10%, lerp 20%, ties 10%.
        let names: Vec<&str> = sc.panels[0].front.iter().map(|&i| sc.panels[0].points[i].label.as_str()).collect();
        assert_eq!(names, ["lerp 10% head", "lerp 20% head", "ties 10% full"]);
        // Sections in page order.
        let sections: Vec<Section> = charts.iter().map(|c| c.section).collect();
        assert!(sections.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn no_baseline_no_efficiency_and_identifiers_are_not_categories() {
        let s = summary(&[
            ("a", "a", r#"{"tag":"x1"}"#, r#"{"accuracy":0.5}"#, false),
            ("b", "b", r#"{"tag":"x2"}"#, r#"{"accuracy":0.6}"#, false),
        ]);
        let charts = plan(&s);
        assert!(charts.iter().all(|c| c.section != Section::Efficiency));
        let Body::Bars(b) = &find(&charts, "bars_accuracy").body else { panic!() };
        assert!(b.reference.is_none());
        // A parameter with a value per experiment names experiments: no violin panel, so no chart.
        assert!(charts.iter().all(|c| !c.name.ends_with("_by_parameter")));
    }

    #[test]
    fn perplexity_per_domain_and_gain_kept_per_merge() {
        let s = summary(&[
            ("base", "b", r#"{"model":"base"}"#, r#"{"perplexity_mail":20.0,"perplexity_film":40.0}"#, true),
            (
                "expert mail",
                "ea",
                r#"{"model":"expert-a"}"#,
                r#"{"perplexity_mail":10.0,"perplexity_film":44.0,"gain_kept_mail":1.0,"gain_kept_film":-0.2}"#,
                false,
            ),
            (
                "ties top-25%",
                "t",
                r#"{"model":"m1","method":"ties","top_p":0.25}"#,
                r#"{"perplexity_mail":12.0,"perplexity_film":30.0,"gain_kept_mail":0.75,"gain_kept_film":0.5}"#,
                false,
            ),
        ]);
        let charts = plan(&s);
        let Body::Grouped(ppl) = &find(&charts, "perplexity_per_domain").body else { panic!() };
        // Domains from the metric names (columns sort by name), a bar per model but the baseline.
        assert_eq!(ppl.categories, ["film", "mail"]);
        assert_eq!(ppl.series.iter().map(|s| s.label.as_str()).collect::<Vec<_>>(), ["expert mail", "ties top-25%"]);
        assert_eq!(ppl.series[1].values, [Some((30.0, 0.0)), Some((12.0, 0.0))]);
        // The base's perplexity on each domain, across that domain's group.
        assert_eq!(ppl.references, [(Some(0), 40.0), (Some(1), 20.0)]);
        assert!(ppl.reference_label.as_deref().unwrap().starts_with("base"));
        // Gain kept: merges only (the expert has no method), one bar per domain, the line at 1.
        let Body::Grouped(gain) = &find(&charts, "gain_kept_per_merge").body else { panic!() };
        assert_eq!(gain.categories, ["ties top-25%"]);
        assert_eq!(gain.series.iter().map(|s| s.label.as_str()).collect::<Vec<_>>(), ["on film", "on mail"]);
        assert_eq!(gain.series[1].values, [Some((0.75, 0.0))]);
        assert_eq!(gain.references, [(None, 1.0)]);
        assert!(charts.iter().filter(|c| c.section == Section::Domains).count() == 2);
    }

    #[test]
    fn pareto_front_by_hand() {
        // (cost, value): 0 and 3 coincide at the cheapest best; 1 is costlier and no better; 2 costs more and is
        // better; 4 is beaten by 2 on both; 5 has the same value as 2 at a higher cost.
        let pts = [(1.0, 0.8), (2.0, 0.8), (3.0, 0.9), (1.0, 0.8), (4.0, 0.85), (5.0, 0.9), (f64::NAN, 1.0)];
        assert_eq!(pareto_front(&pts), [0, 3, 2]);
        assert_eq!(pareto_front(&[]), Vec::<usize>::new());
        // Strictly better and cheaper in turn: all on the front, by cost.
        assert_eq!(pareto_front(&[(3.0, 3.0), (1.0, 1.0), (2.0, 2.0)]), [1, 2, 0]);
        assert_eq!(policy_word("selected:/runs/x"), "selected");
        assert_eq!(policy_word("all-but-head"), "head");
        assert_eq!(policy_word("none"), "full");
    }

    #[test]
    fn slugs() {
        assert_eq!(slug("Top-P (%)"), "top_p");
        assert_eq!(slug("λ"), "x");
    }
}
