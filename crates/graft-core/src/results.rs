//! The results line (docs/results-format.md): one JSON object per run, appended to a JSONL file by `graft train`,
//! `graft eval`, `graft interpolate --eval` and `graft experiment`, and read back by `graft report` and the
//! experiment's collection step. This module owns the schema on both sides: writers build a `Line` and `append` it,
//! readers `parse` text into the same type, and the rules (required fields, fractions in [0, 1], non-negative
//! counts, `config.lambda` on interpolate lines) live in one place.
//!
//! Numbers keep the form the writer gave them (a byte count stays an integer in the file), and maps keep the writer's
//! order, so a line read and written again is the same text.

use std::io::Write;
use std::path::Path;

use serde_json::{json, Map, Number, Value};

use crate::error::{Error, Result};

/// What produced a results line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Train,
    Eval,
    Interpolate,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Train => "train",
            Kind::Eval => "eval",
            Kind::Interpolate => "interpolate",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "train" => Some(Kind::Train),
            "eval" => Some(Kind::Eval),
            "interpolate" => Some(Kind::Interpolate),
            _ => None,
        }
    }
}

/// Metrics that are fractions of the test set: the schema requires them in [0, 1].
pub const FRACTION_METRICS: &[&str] = &["accuracy", "f1_weighted", "f1_macro", "zero_shot_accuracy"];
/// Metrics that count something and cannot be negative.
pub const NON_NEGATIVE_METRICS: &[&str] = &["time_s", "peak_memory_bytes", "loss"];

/// Named finite numbers in insertion order: a line's `metrics`, or one entry of its `epochs`. A value that is not
/// finite is "not measured" and is not stored (the schema writes that as an absent key).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Numbers(Map<String, Value>);

impl Numbers {
    pub fn new() -> Numbers {
        Numbers::default()
    }

    /// Sets `name` (replacing an earlier value in its place); a non-finite float removes it.
    pub fn set(&mut self, name: impl Into<String>, value: impl Into<Figure>) -> &mut Numbers {
        let name = name.into();
        match value.into().0 {
            Some(n) => {
                self.0.insert(name, Value::Number(n));
            }
            None => {
                self.0.shift_remove(&name);
            }
        }
        self
    }

    /// Sets `name` when `value` is Some.
    pub fn set_some(&mut self, name: impl Into<String>, value: Option<impl Into<Figure>>) -> &mut Numbers {
        if let Some(v) = value {
            self.set(name, v);
        }
        self
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.get(name).and_then(Value::as_f64)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, f64)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_f64().expect("only numbers are stored")))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn to_json(&self) -> Value {
        Value::Object(self.0.clone())
    }

    /// A JSON object of numbers; `null` entries are absent. `what` names the object in errors.
    fn from_json(what: &str, m: &Map<String, Value>) -> std::result::Result<Numbers, String> {
        let mut out = Numbers::new();
        for (k, v) in m {
            match v {
                Value::Null => {}
                Value::Number(n) if n.as_f64().is_some_and(f64::is_finite) => {
                    out.0.insert(k.clone(), v.clone());
                }
                Value::Number(n) => return Err(format!("{what}.{k} = {n} is not a finite number")),
                v => return Err(format!("{what}.{k} must be a number, found {}", type_name(v))),
            }
        }
        Ok(out)
    }
}

/// A number as a results line stores it: integers stay integers; a non-finite float is None (not measured).
pub struct Figure(Option<Number>);

impl From<f64> for Figure {
    fn from(x: f64) -> Figure {
        Figure(Number::from_f64(x).filter(|_| x.is_finite()))
    }
}

impl From<f32> for Figure {
    fn from(x: f32) -> Figure {
        Figure::from(x as f64)
    }
}

macro_rules! integer_figure {
    ($($t:ty),*) => {$(
        impl From<$t> for Figure {
            fn from(x: $t) -> Figure {
                Figure(Some(Number::from(x)))
            }
        }
    )*};
}
integer_figure!(u64, usize, u32, i64, i32);

/// One results line.
#[derive(Clone, Debug, PartialEq)]
pub struct Line {
    pub kind: Kind,
    pub run_id: String,
    pub experiment: String,
    pub seed: i64,
    /// The run's parameters, numbers and strings, in the order the writer gave them.
    pub config: Map<String, Value>,
    /// Every metric, in base units: fractions, seconds, bytes.
    pub metrics: Numbers,
    /// Per-epoch history (`epoch`, `train_loss`, `val_accuracy`, `val_loss`, ...).
    pub epochs: Vec<Numbers>,
    /// The experiment is the reports' baseline.
    pub baseline: bool,
}

impl Line {
    /// A line with no metrics yet. `config` is flattened as the schema wants it: nested values become compact JSON
    /// strings, booleans the strings "true"/"false", nulls are dropped.
    pub fn new(
        kind: Kind,
        run_id: impl Into<String>,
        experiment: impl Into<String>,
        seed: i64,
        config: &Value,
    ) -> Line {
        Line {
            kind,
            run_id: run_id.into(),
            experiment: experiment.into(),
            seed,
            config: flat_config(config),
            metrics: Numbers::new(),
            epochs: Vec::new(),
            baseline: false,
        }
    }

    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics.get(name)
    }

    /// `config.lambda` of an interpolate line (checked present and numeric when the line was parsed).
    pub fn lambda(&self) -> f64 {
        self.config.get("lambda").and_then(Value::as_f64).unwrap_or(f64::NAN)
    }

    pub fn to_json(&self) -> Value {
        let mut o = Map::new();
        o.insert("kind".into(), json!(self.kind.as_str()));
        o.insert("run_id".into(), json!(self.run_id));
        o.insert("experiment".into(), json!(self.experiment));
        o.insert("seed".into(), json!(self.seed));
        o.insert("config".into(), Value::Object(self.config.clone()));
        o.insert("metrics".into(), self.metrics.to_json());
        if !self.epochs.is_empty() {
            o.insert("epochs".into(), Value::Array(self.epochs.iter().map(Numbers::to_json).collect()));
        }
        if self.baseline {
            o.insert("baseline".into(), json!(true));
        }
        Value::Object(o)
    }

    /// The line as one line of text, without the newline.
    pub fn to_text(&self) -> String {
        self.to_json().to_string()
    }

    /// Appends the line and a newline to `path` (created if missing), in a single write so that concurrent runs do
    /// not interleave within a line.
    pub fn append(&self, path: &Path) -> Result<()> {
        let mut text = self.to_text();
        text.push('\n');
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::io(path, e))?;
        f.write_all(text.as_bytes()).map_err(|e| Error::io(path, e))
    }

    /// Validates one line of text against the schema. The error is one line saying what is wrong (the caller adds
    /// where). Unknown fields are ignored, so older readers accept newer writers.
    pub fn parse(text: &str) -> std::result::Result<Line, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
        let Value::Object(obj) = value else {
            return Err(format!("expected a JSON object, found {}", type_name(&value)));
        };
        let field = |name: &str| obj.get(name).ok_or_else(|| format!("missing field '{name}'"));
        let string_field = |name: &str| -> std::result::Result<String, String> {
            match field(name)? {
                Value::String(s) if !s.trim().is_empty() => Ok(s.clone()),
                Value::String(_) => Err(format!("field '{name}' is empty")),
                v => Err(format!("field '{name}' must be a string, found {}", type_name(v))),
            }
        };
        let kind_text = string_field("kind")?;
        let kind = Kind::parse(&kind_text)
            .ok_or_else(|| format!("unknown kind '{kind_text}' (expected 'train', 'eval' or 'interpolate')"))?;
        let run_id = string_field("run_id")?;
        let experiment = string_field("experiment")?;
        let seed = match field("seed")? {
            Value::Number(n) if n.as_i64().is_some() => n.as_i64().unwrap(),
            v => return Err(format!("field 'seed' must be an integer, found {}", type_name(v))),
        };
        let config = match field("config")? {
            Value::Object(m) => m.clone(),
            v => return Err(format!("field 'config' must be an object, found {}", type_name(v))),
        };
        let metrics = match field("metrics")? {
            Value::Object(m) => Numbers::from_json("metrics", m)?,
            v => return Err(format!("field 'metrics' must be an object, found {}", type_name(v))),
        };
        for (name, v) in metrics.iter() {
            if FRACTION_METRICS.contains(&name) && !(0.0..=1.0).contains(&v) {
                return Err(format!(
                    "metrics.{name} = {v} is outside [0, 1] (accuracy and F1 are fractions, not percentages)"
                ));
            }
            if NON_NEGATIVE_METRICS.contains(&name) && v < 0.0 {
                return Err(format!("metrics.{name} = {v} is negative"));
            }
        }
        let epochs = match obj.get("epochs") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::Object(m) => Numbers::from_json(&format!("epochs[{i}]"), m),
                    v => Err(format!("epochs[{i}] must be an object, found {}", type_name(v))),
                })
                .collect::<std::result::Result<_, _>>()?,
            Some(v) => return Err(format!("field 'epochs' must be an array, found {}", type_name(v))),
        };
        let baseline = match obj.get("baseline") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => return Err(format!("field 'baseline' must be true or false, found {}", type_name(v))),
        };
        if kind == Kind::Interpolate {
            match config.get("lambda") {
                Some(Value::Number(n)) if n.as_f64().is_some_and(f64::is_finite) => {}
                Some(v) => return Err(format!("config.lambda must be a number, found {}", type_name(v))),
                None => return Err("an interpolate line needs config.lambda (the interpolation weight)".into()),
            }
        }
        Ok(Line { kind, run_id, experiment, seed, config, metrics, epochs, baseline })
    }
}

/// The schema wants config values that are numbers or strings.
fn flat_config(config: &Value) -> Map<String, Value> {
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
    out
}

fn type_name(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("{b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) if s.chars().count() > 40 => {
            format!("a string (\"{}...\")", s.chars().take(40).collect::<String>())
        }
        Value::String(s) => format!("a string (\"{s}\")"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_line_parses_back_to_itself_and_to_the_same_text() {
        let mut line = Line::new(
            Kind::Train,
            "r1",
            "lerp / selected",
            3,
            &json!({"method": "lerp", "top_p": 0.1, "tune": true, "skip": null, "layers": [1, 2]}),
        );
        line.metrics.set("accuracy", 0.75).set("peak_memory_bytes", 4_660_000_000u64).set("loss", f64::NAN);
        line.metrics.set_some("zero_shot_accuracy", None::<f64>);
        let mut epoch = Numbers::new();
        epoch.set("epoch", 1u32).set("train_loss", 0.5f32);
        line.epochs.push(epoch);
        line.baseline = true;
        let text = line.to_text();
        assert_eq!(
            text,
            r#"{"kind":"train","run_id":"r1","experiment":"lerp / selected","seed":3,"config":{"method":"lerp","top_p":0.1,"tune":"true","layers":"[1,2]"},"metrics":{"accuracy":0.75,"peak_memory_bytes":4660000000},"epochs":[{"epoch":1,"train_loss":0.5}],"baseline":true}"#
        );
        let back = Line::parse(&text).unwrap();
        assert_eq!(back, line);
        assert_eq!(back.to_text(), text);
        assert_eq!(back.metric("peak_memory_bytes"), Some(4.66e9));
        assert_eq!(back.metric("loss"), None, "a NaN is not measured");
    }

    #[test]
    fn setting_a_metric_again_keeps_its_place() {
        let mut m = Numbers::new();
        m.set("a", 1u32).set("b", 2u32).set("a", 3.5);
        assert_eq!(m.iter().collect::<Vec<_>>(), [("a", 3.5), ("b", 2.0)]);
        m.set("a", f64::INFINITY);
        assert_eq!(m.keys().collect::<Vec<_>>(), ["b"]);
    }

    #[test]
    fn append_writes_one_line_per_call() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.jsonl");
        let line = Line::new(Kind::Eval, "a", "e", 0, &json!({}));
        line.append(&p).unwrap();
        line.append(&p).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.lines().all(|l| Line::parse(l).as_ref() == Ok(&line)));
    }
}
