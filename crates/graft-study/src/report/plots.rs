//! Which charts a report has, as plain data, each with a title (the question it answers) and a caption (what it
//! shows): bars per metric with the baseline as a dashed line, the efficiency scatter (the main metric against
//! training time and peak memory, with its Pareto front), percentage change/saving against the baseline,
//! metric-vs-parameter line plots (numeric parameters), violins of the main metric per categorical parameter, the
//! merges' consistency with their experts (grouped bars per top-p), barrier curves of interpolations (before and after
//! alignment told apart, the barrier marked), and per-domain grouped bars of studies whose metrics are named
//! `<prefix>_<domain>` (the LLM study's perplexity and gain kept per domain). F1 gets no chart of its own where
//! accuracy has one (it tells the same story); the tables keep it. The freeze policy comes in words from the
//! summary. `render` draws the charts; keeping the planning separate lets tests check the numbers a chart shows
//! without reading pixels.
//!
//! Values are in the units the tables print (fractions, seconds, KB/MB/GB), so a chart and its table agree.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::rng::Rng;

use super::bootstrap::bootstrap_mean;
use super::format::Direction;
use super::results::Kind;
pub use super::summary::policy_word;
use super::summary::{Curve, KindTable, MetricSpec, Param, Row, Summary, Unit};
use super::table::ColumnFormat;

/// Where a chart goes on the page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Section {
    Bars,
    Domains,
    Efficiency,
    Consistency,
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
            Section::Consistency => "Consistency of the merges",
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
    /// What the chart shows, in a sentence or three: the page prints it under the chart.
    pub caption: String,
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
    /// The ticks' legend entry.
    pub tick_label: Option<String>,
    /// Series are merge methods (and variants of them): each takes its method's colour, a lighter shade for a
    /// second variant of the same method. Otherwise series take the palette in order.
    pub method_colours: bool,
    pub decimals: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct GroupedSeries {
    pub label: String,
    /// (mean, standard error) per category; None where the series has no value there.
    pub values: Vec<Option<(f64, f64)>>,
    /// A second number per category, drawn as a black tick across the bar (empty: none).
    pub ticks: Vec<Option<f64>>,
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
    /// Interpolation curves: whether the path's end was aligned to its start (solid) or not (dashed); None when the
    /// results do not say.
    pub aligned: Option<bool>,
    /// Colour key: series with the same key share a colour (one pair before and after alignment); "" = the label.
    pub colour_key: String,
    /// Interpolation curves: the barrier, drawn as a bar from the straight line to the curve.
    pub barrier: Option<BarrierMark>,
}

/// Where a curve is furthest from the straight line between its endpoints (on its means): at `lambda`, from the
/// line's value `from` to the curve's `to`.
#[derive(Clone, Debug, PartialEq)]
pub struct BarrierMark {
    pub lambda: f64,
    pub from: f64,
    pub to: f64,
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

/// Metrics that tell the same story as accuracy: charted only where accuracy is not.
const SECONDARY_METRICS: &[&str] = &["f1_weighted", "f1_macro"];

/// The spec of a metric that gets charts of its own: present, and not an F1 score beside accuracy.
fn charted<'a>(t: &'a KindTable, key: &str) -> Option<&'a MetricSpec> {
    if SECONDARY_METRICS.contains(&key) && spec(t, "accuracy").is_some() {
        return None;
    }
    spec(t, key)
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
    let tables: Vec<KindTable> = summary.tables.iter().map(without_derived).collect();
    for t in &tables {
        let prefix = if several_kinds { format!("{}_", t.kind.as_str()) } else { String::new() };
        charts.extend(bar_charts(t, &prefix));
        if t.kind == Kind::Train {
            charts.extend(efficiency_scatter(t, &prefix));
        }
        charts.extend(efficiency_charts(t, &prefix));
        charts.extend(consistency_charts(t, &prefix));
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
        let Some(m) = charted(t, key) else { continue };
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
        let baseline = match t.baseline() {
            Some(b) if b.cell(key).is_some() => format!("; the dashed line is the baseline ({})", b.experiment),
            _ => String::new(),
        };
        out.push(Chart {
            name: format!("{prefix}bars_{key}"),
            title: metric_title(t.kind, m),
            caption: format!(
                "Mean {} of each experiment over its runs, with the bootstrap standard error as whiskers, coloured \
                 and grouped by merge method{baseline}.",
                m.label
            ),
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

/// A table as the charts see it: derived config entries dropped.
fn without_derived(t: &KindTable) -> KindTable {
    let mut t = t.clone();
    for r in &mut t.rows {
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

/// A row's freeze policy in words, as the summary carries it; "" when its lines do not say (or disagree).
pub fn freeze_policy(r: &Row) -> String {
    r.params.get("freeze").map(|f| policy_word(&f.display())).unwrap_or_default()
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
        caption: format!(
            "Each experiment's mean {} against its mean {} (a panel each), with standard errors both ways. Colour: \
             merge method (black: the baseline); marker: freeze policy (circle full fine-tuning, triangle head only, \
             square SNR-selected layers). Ringed and joined: the Pareto front, the experiments no other one beats on \
             both cost and {}. Names that do not fit beside their point are numbered; the key under the chart lists \
             them.",
            m.label,
            costs.join(" and its "),
            m.label
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
        let Some(m) = charted(t, key) else { continue };
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
        let (name, title, axis, caption) = if saving {
            let what = if *key == "time_s" { "training time" } else { "peak memory" };
            (
                format!("{prefix}saving_{key}"),
                format!("Saving of {what} vs baseline"),
                format!("{what} saved (%)"),
                format!(
                    "How much less {what} each experiment needs than the baseline ({}): (b - x) / b in percent, right \
                     of 0 is cheaper; whiskers: the experiment's standard error relative to the baseline's mean.",
                    base.experiment
                ),
            )
        } else {
            (
                format!("{prefix}change_{key}"),
                format!("Change of {} vs baseline", m.label),
                format!("{} change (%)", m.label),
                format!(
                    "Each experiment's {} relative to the baseline's ({}): (x - b) / b in percent, right of 0 is \
                     better; whiskers: the experiment's standard error relative to the baseline's mean.",
                    m.label, base.experiment
                ),
            )
        };
        out.push(Chart {
            name,
            title: format!("{title} ({})", base.experiment),
            caption,
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

/// A top-p in words, as the study names its merges: "top-15%", or "all layers" at 1.
fn top_p_words(p: f64) -> String {
    if p >= 1.0 {
        "all layers".into()
    } else {
        format!("top-{}%", (p * 1000.0).round() / 10.0)
    }
}

/// The merges' consistency with their experts (`consistency_merged`, over the tensors each merge merged, as bars;
/// `consistency_all`, over every float tensor, as a tick across each bar): a group per top-p, a bar per merge method
/// (and variant: another SNR source, the naive merge), mean over seeds with its bootstrap standard error. A merge
/// fine-tuned under several freeze policies is one merge: its rows carry the same numbers, and the first one stands.
fn consistency_charts(t: &KindTable, prefix: &str) -> Vec<Chart> {
    let Some(main) = ["consistency_merged", "consistency_all"].into_iter().find(|k| spec(t, k).is_some()) else {
        return Vec::new();
    };
    let tick = (main == "consistency_merged" && spec(t, "consistency_all").is_some()).then_some("consistency_all");
    let merge_of = |r: &Row| -> Vec<(String, Param)> {
        r.params.iter().filter(|(k, _)| k.as_str() != "freeze").map(|(k, v)| (k.clone(), v.clone())).collect()
    };
    let mut merges: Vec<&Row> = Vec::new();
    for r in t.rows.iter().filter(|r| !r.baseline && r.cell(main).is_some()) {
        if !merges.iter().any(|m| merge_of(m) == merge_of(r)) {
            merges.push(r);
        }
    }
    if merges.is_empty() {
        return Vec::new();
    }
    let top_p = |r: &Row| r.params.get("top_p").and_then(Param::as_number);
    let mut top_ps: Vec<f64> = merges.iter().filter_map(|r| top_p(r)).collect();
    top_ps.sort_by(f64::total_cmp);
    top_ps.dedup();
    let by_top_p = !top_ps.is_empty() && merges.iter().all(|r| top_p(r).is_some());
    // Series: the method, and what else tells merges apart beyond top-p, each named only where it departs from its
    // most common value ("lerp", "lerp, SNR avg", "lerp, naive (unaligned)").
    let variants: Vec<String> = varying_params(&merges)
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| !["top_p", "freeze", "method"].contains(&k.as_str()))
        .collect();
    let usual: Vec<Option<String>> = variants
        .iter()
        .map(|k| {
            let mut counts: Vec<(String, usize)> = Vec::new();
            for r in &merges {
                let v = param_text(r, k);
                match counts.iter_mut().find(|(x, _)| *x == v) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((v, 1)),
                }
            }
            counts.into_iter().max_by_key(|(_, n)| *n).map(|(v, _)| v)
        })
        .collect();
    let label = |r: &Row| -> String {
        if !by_top_p {
            return r.experiment.rsplit_once(" / ").map_or(r.experiment.as_str(), |(e, _)| e).to_string();
        }
        let mut words = vec![if r.group.is_empty() { "merge".to_string() } else { r.group.clone() }];
        for (k, u) in variants.iter().zip(&usual) {
            if Some(param_text(r, k)) != *u {
                words.push(param_words(k, r.params.get(k)));
            }
        }
        words.join(", ")
    };
    let categories: Vec<String> =
        if by_top_p { top_ps.iter().map(|&p| top_p_words(p)).collect() } else { vec!["merges".to_string()] };
    let mut series: Vec<GroupedSeries> = Vec::new();
    for r in &merges {
        let name = label(r);
        let i = match series.iter().position(|s| s.label == name) {
            Some(i) => i,
            None => {
                series.push(GroupedSeries {
                    label: name,
                    values: vec![None; categories.len()],
                    ticks: if tick.is_some() { vec![None; categories.len()] } else { Vec::new() },
                });
                series.len() - 1
            }
        };
        let ci = if by_top_p { top_ps.iter().position(|&p| Some(p) == top_p(r)).unwrap_or(0) } else { 0 };
        let c = r.cell(main).expect("filtered");
        series[i].values[ci] = Some((c.estimate.mean, c.estimate.se));
        if let Some(k) = tick {
            series[i].ticks[ci] = r.cell(k).map(|c| c.estimate.mean);
        }
    }
    let scope = if main == "consistency_merged" { "the layers it merged" } else { "all its tensors" };
    let tick_words = if tick.is_some() { " The black tick across a bar: the same over all tensors." } else { "" };
    let parts = series.len().div_ceil(MAX_SERIES);
    series
        .chunks(MAX_SERIES)
        .enumerate()
        .map(|(i, chunk)| {
            let (name, part) = part_names(format!("{prefix}consistency"), i, parts);
            Chart {
                name,
                title: format!("How consistent is each merge with its experts? (1 = fully){part}"),
                caption: format!(
                    "The consistency of each merge M of experts A and B (graft similarity): the mean of cos(M - B, A \
                     - B) and cos(M - A, B - A), 1 when taking either expert out of the merge points straight back at \
                     the other. Bars: over {scope}, mean over seeds with its bootstrap standard error, a group per \
                     top-p, colour = merge method.{tick_words}"
                ),
                section: Section::Consistency,
                body: Body::Grouped(GroupedBarChart {
                    y_label: "consistency (mean cosine)".into(),
                    categories: categories.clone(),
                    series: chunk.to_vec(),
                    references: vec![(None, 1.0)],
                    reference_label: Some("1: fully consistent".into()),
                    tick_label: tick.map(|_| "over all tensors".to_string()),
                    method_colours: true,
                    decimals: 3,
                }),
            }
        })
        .collect()
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

/// A parameter's value in words: the method by its name, the study's alignment and SNR source as the experiment
/// names say them ("naive (unaligned)", "SNR avg"), others as "freeze head"; an absent value says so ("no freeze")
/// instead of a `-` placeholder.
fn param_words(key: &str, value: Option<&Param>) -> String {
    match value {
        Some(v) if key == "method" => v.display(),
        Some(v) if key == "aligned" && v.display() == "true" => "aligned".into(),
        Some(v) if key == "aligned" && v.display() == "false" => "naive (unaligned)".into(),
        Some(v) if key == "snr_from" => format!("SNR {}", v.display()),
        Some(v) => format!("{} {}", key.replace('_', " "), v.display()),
        None => format!("no {}", key.replace('_', " ")),
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
            let Some(m) = charted(t, key) else { continue };
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
                            policy: freeze_policy(r),
                            aligned: None,
                            colour_key: String::new(),
                            barrier: None,
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
                        caption: format!(
                            "Mean {} at each {} (a line per setting of the other factors), with the bootstrap \
                             standard error as whiskers and every run a faint dot. Colour: merge method; marker: \
                             freeze policy; dashes tell apart settings that share both.",
                            m.label,
                            param_title(&param)
                        ),
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
                        c.policies.push(freeze_policy(r));
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
        caption: format!(
            "The {} of every run but the baseline's, grouped by the values of each parameter (a panel each): a violin \
             (density) with the quartile box and median where a value has {} runs or more, else the mean +- the \
             bootstrap standard error beside the runs. Points: colour = merge method, marker = freeze policy; \
             dashed: the baseline.",
            m.label, VIOLIN_MIN_RUNS
        ),
        section: Section::Categorical,
        body: Body::Violins(ViolinChart { y_label: axis_label(m, &fmt), panels, reference, decimals: fmt.decimals }),
    })
}

/// Runs a category needs for a density (violin); fewer are drawn as points with mean +- standard error.
pub const VIOLIN_MIN_RUNS: usize = 8;

/// Whether an interpolation ends at a model aligned to its start: the curve's `aligned` config entry when it has
/// one, else its name ("naive", "unaligned", "before alignment" say no; "align" otherwise says yes, as in "A-B
/// aligned" or a path to `graft align`'s output); None when neither says.
pub fn alignment_of(c: &Curve) -> Option<bool> {
    match c.params.get("aligned").map(Param::display).as_deref() {
        Some("true") => return Some(true),
        Some("false") => return Some(false),
        _ => {}
    }
    let name = c.experiment.to_lowercase();
    if ["naive", "unaligned", "not aligned", "before align", "without align"].iter().any(|w| name.contains(w)) {
        Some(false)
    } else if name.contains("align") {
        Some(true)
    } else {
        None
    }
}

/// The pair a curve interpolates, without its alignment: "A-B aligned" and "A-B naive" are the pair "a-b".
fn pair_key(experiment: &str) -> String {
    let lower = experiment.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')' || c == ',')
        .filter(|w| !w.is_empty() && !["aligned", "unaligned", "naive", "alignment", "before", "after"].contains(w))
        .collect();
    words.join(" ")
}

/// Where the mean curve is furthest beyond the straight line between its endpoints (above it for loss, below it
/// for accuracy-like metrics); None without both endpoints or without a point that crosses the line.
fn barrier_mark(points: &[(f64, f64, f64)], direction: Direction) -> Option<BarrierMark> {
    let at = |l: f64| points.iter().find(|p| (p.0 - l).abs() < 1e-9).map(|p| p.1);
    let (start, end) = (at(0.0)?, at(1.0)?);
    let sign = if direction == Direction::Higher { -1.0 } else { 1.0 };
    points
        .iter()
        .filter(|p| p.0 > 1e-9 && p.0 < 1.0 - 1e-9)
        .map(|&(l, v, _)| {
            let line = (1.0 - l) * start + l * end;
            (sign * (v - line), BarrierMark { lambda: l, from: line, to: v })
        })
        .filter(|(excess, _)| *excess > 0.0)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, m)| m)
}

/// Barrier curves: a metric along the interpolation path, one line per interpolate experiment (a pair of models),
/// the straight line between the endpoints dashed thin, the barrier marked, each seed as dots. Pairs keep one colour
/// before and after alignment; the line is solid after alignment and dashed before. More than `MAX_SERIES` curves
/// are cut into parts.
fn interpolation_charts(curves: &[Curve]) -> Vec<Chart> {
    let mut metrics: Vec<String> = Vec::new();
    for c in curves {
        if !metrics.contains(&c.metric) {
            metrics.push(c.metric.clone());
        }
    }
    let has_accuracy = metrics.iter().any(|m| m == "accuracy");
    metrics.retain(|m| !(has_accuracy && SECONDARY_METRICS.contains(&m.as_str())));
    // `graft interpolate` names a path by its end models: a path from the same start as an aligned one, not itself
    // said to be aligned, is the path before alignment.
    let start = |c: &Curve| c.params.get("a").map(Param::display);
    let aligned_starts: Vec<String> =
        curves.iter().filter(|c| alignment_of(c) == Some(true)).filter_map(&start).collect();
    let alignment = |c: &Curve| match alignment_of(c) {
        None if start(c).is_some_and(|a| aligned_starts.contains(&a)) => Some(false),
        known => known,
    };
    let mut out = Vec::new();
    for key in metrics {
        let m = MetricSpec::for_key(&key);
        let of_metric: Vec<&Curve> = curves.iter().filter(|c| c.metric == key).collect();
        let fmt = ColumnFormat::for_column(&m, of_metric.iter().flat_map(|c| c.points.iter().map(|p| p.estimate.mean)));
        let barrier_fmt = ColumnFormat::for_column(
            &m,
            of_metric.iter().filter_map(|c| c.barrier.as_ref()).map(|b| b.estimate.mean.abs()),
        );
        let series: Vec<Series> = of_metric
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
                let aligned = alignment(c);
                let mut label = c.experiment.clone();
                let named = ["align", "naive"].iter().any(|w| label.to_lowercase().contains(w));
                match aligned {
                    Some(true) if !named => label.push_str(" (after alignment)"),
                    Some(false) if !named => label.push_str(" (before alignment)"),
                    _ => {}
                }
                if let Some(b) = &c.barrier {
                    let se = if b.estimate.n > 1 {
                        format!(" +- {}", barrier_fmt.number(b.estimate.se))
                    } else {
                        String::new()
                    };
                    label.push_str(&format!(": barrier {}{se}", barrier_fmt.number(b.estimate.mean)));
                }
                Series {
                    label,
                    barrier: barrier_mark(&points, m.direction),
                    points,
                    runs,
                    chord,
                    policy: String::new(),
                    aligned,
                    colour_key: start(c).map_or_else(|| pair_key(&c.experiment), |a| format!("from {a}")),
                }
            })
            .collect();
        let parts = series.len().div_ceil(MAX_SERIES);
        let against = if m.direction == Direction::Higher { "below" } else { "above" };
        for (i, chunk) in series.chunks(MAX_SERIES).enumerate() {
            let (name, part) = part_names(format!("interpolate_{}", slug(&key)), i, parts);
            out.push(Chart {
                name,
                title: format!(
                    "Is there {} {} barrier between the models? {} along the path{part}",
                    if m.label.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" },
                    m.label,
                    capitalize(&m.label)
                ),
                caption: format!(
                    "The {} of the models (1 - lambda) A + lambda B on the straight path between two models, a line \
                     per pair (mean over seeds with its standard error, each seed a faint dot); the thin dashed line \
                     joins the endpoints. A bar in the curve's colour marks its barrier, where the path is furthest {against} that \
                     line; the legend gives its height as the table does (mean +- standard error of each seed's \
                     barrier). A pair keeps its colour: solid after aligning B to A, dashed before.",
                    m.label
                ),
                section: Section::Interpolation,
                body: Body::Lines(LineChart { x_label: "lambda".into(), y_label: axis_label(&m, &fmt), series: chunk.to_vec() }),
            });
        }
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
                        ticks: Vec::new(),
                    })
                    .collect();
                let (name, part) = part_names(format!("{prefix}perplexity_per_domain"), i, parts);
                out.push(Chart {
                    name,
                    title: format!("Which model predicts each domain best? Perplexity, lower is better{part}"),
                    caption: "Each model's perplexity on each domain's test texts (a group per domain, a bar per \
                              model, mean over seeds with its bootstrap standard error); dashed across a group: the \
                              model before fine-tuning on that domain."
                        .into(),
                    section: Section::Domains,
                    body: Body::Grouped(GroupedBarChart {
                        y_label: "perplexity (lower is better)".into(),
                        categories: domains.clone(),
                        series,
                        references: references.clone(),
                        reference_label: base.map(|b| format!("{} (the model before fine-tuning)", b.experiment)),
                        tick_label: None,
                        method_colours: false,
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
                        ticks: Vec::new(),
                    })
                    .collect();
                let (name, part) = part_names(format!("{prefix}gain_kept_per_merge"), i, parts);
                out.push(Chart {
                    name,
                    title: format!("How much of each expert's gain does a merge keep? (1 = the expert's){part}"),
                    caption: "For each merge and domain, the share of the domain expert's gain over the base that \
                              the merge keeps, in mean per-token loss: 1 keeps all of it (dashed), 0 none, below 0 the \
                              merge is worse than the base there. Mean over seeds with its bootstrap standard error."
                        .into(),
                    section: Section::Domains,
                    body: Body::Grouped(GroupedBarChart {
                        y_label: "share of the expert's gain kept".into(),
                        categories: chunk.iter().map(|r| r.experiment.clone()).collect(),
                        series,
                        references: vec![(None, 1.0)],
                        reference_label: Some("1: the expert's own gain on its domain".into()),
                        tick_label: None,
                        method_colours: false,
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
    fn consistency_bars_by_merge_and_top_p() {
        let mut lines = Vec::new();
        for seed in 0..2 {
            for (method, snr, top_p, merged) in [
                ("lerp", "base", 0.1, 1.0),
                ("lerp", "avg", 0.1, 0.99),
                ("ties", "base", 0.1, 0.7),
                ("ties", "base", 1.0, 0.6),
            ] {
                for freeze in ["head", "none"] {
                    let m = merged - 0.02 * seed as f64;
                    lines.push((
                        format!("{method} {snr} {top_p} / {freeze}"),
                        format!("{method}-{snr}-{top_p}-{freeze}-{seed}"),
                        format!(r#"{{"method":"{method}","top_p":{top_p},"snr_from":"{snr}","freeze":"{freeze}"}}"#),
                        format!(r#"{{"accuracy":0.8,"consistency_merged":{m},"consistency_all":{}}}"#, m / 2.0),
                    ));
                }
            }
        }
        // The summary helper gives each line its own seed: two runs per experiment all the same.
        let owned: Vec<(&str, &str, &str, &str, bool)> =
            lines.iter().map(|(e, r, c, m)| (e.as_str(), r.as_str(), c.as_str(), m.as_str(), false)).collect();
        let charts = plan(&summary(&owned));
        let c = find(&charts, "consistency");
        assert_eq!(c.section, Section::Consistency);
        let Body::Grouped(g) = &c.body else { panic!() };
        assert_eq!(g.categories, ["top-10%", "all layers"]);
        let labels: Vec<&str> = g.series.iter().map(|s| s.label.as_str()).collect();
        // snr_from "base" is the usual value: named only where it differs.
        assert_eq!(labels, ["lerp", "lerp, SNR avg", "ties"]);
        // ties at top-10%: runs 0.7 and 0.68, mean 0.69; the tick is half of it.
        let (mean, se) = g.series[2].values[0].unwrap();
        assert!((mean - 0.69).abs() < 1e-12 && se > 0.0);
        assert!((g.series[2].ticks[0].unwrap() - 0.345).abs() < 1e-12);
        assert!((g.series[2].values[1].unwrap().0 - 0.59).abs() < 1e-12);
        assert_eq!(g.series[0].values[1], None);
        assert!(g.method_colours && g.tick_label.is_some());
        assert!(!c.caption.is_empty());
    }

    #[test]
    fn barrier_mark_and_alignment_by_hand() {
        // Loss 0.5 at both ends, 0.9 at 0.5 and 0.6 at 0.25: the furthest point above the line is lambda 0.5.
        let pts = [(0.0, 0.5, 0.0), (0.25, 0.6, 0.0), (0.5, 0.9, 0.0), (1.0, 0.5, 0.0)];
        assert_eq!(barrier_mark(&pts, Direction::Lower), Some(BarrierMark { lambda: 0.5, from: 0.5, to: 0.9 }));
        // For accuracy the same curve never drops below the line: no barrier to mark.
        assert_eq!(barrier_mark(&pts, Direction::Higher), None);
        let curve = |name: &str, aligned: Option<&str>| Curve {
            experiment: name.into(),
            metric: "loss".into(),
            params: aligned.map(|a| ("aligned".to_string(), Param::Text(a.into()))).into_iter().collect(),
            points: vec![],
            barrier: None,
        };
        assert_eq!(alignment_of(&curve("A-B aligned", None)), Some(true));
        assert_eq!(alignment_of(&curve("A-B naive", None)), Some(false));
        assert_eq!(alignment_of(&curve("interpolate x -> y", Some("false"))), Some(false));
        assert_eq!(alignment_of(&curve("interpolate x -> y", None)), None);
        assert_eq!(pair_key("A-B aligned"), pair_key("A-B (naive)"));
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
