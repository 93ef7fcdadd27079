//! Per-tensor parameter resolution with mergekit's rules: scalar values, layer gradients and name filters, looked up
//! through scopes of decreasing precedence (a slice source or model entry, the slice, the top level).
//!
//! A setting is a scalar, a gradient (a list of scalars), or a list of conditionals `{filter, value}`. The first
//! conditional whose filter is absent, `*`, or a substring of the tensor name decides; when none matches, the setting
//! has no value and the next scope is asked. A numeric gradient `[v0, .., vn]` is interpolated piecewise-linearly at
//! the tensor's relative layer position `t` in [0, 1]: `s = t * n`, `i = floor(s)`, `v = (1 - (s - i)) * v_i +
//! (s - i) * v_min(i+1, n)`, in f64 as mergekit does in Python floats. A non-numeric list picks `v[floor(t * n)]`.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::error::{Error, Result};

/// A scalar parameter value as written in a config or on the command line.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Scalar {
    Bool(bool),
    Num(f64),
    Str(String),
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Bool(b) => write!(f, "{b}"),
            Scalar::Num(x) => write!(f, "{x}"),
            Scalar::Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// A scalar or a gradient over the layers.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Value {
    Scalar(Scalar),
    Gradient(Vec<Scalar>),
}

/// One entry of a filter list.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Conditional {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    pub value: Value,
}

/// A parameter setting: a plain value or a filter list.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Setting {
    Value(Value),
    Filtered(Vec<Conditional>),
}

impl Setting {
    pub fn num(x: f64) -> Setting {
        Setting::Value(Value::Scalar(Scalar::Num(x)))
    }
    pub fn bool(b: bool) -> Setting {
        Setting::Value(Value::Scalar(Scalar::Bool(b)))
    }
    pub fn gradient(v: Vec<f64>) -> Setting {
        if v.len() == 1 {
            Setting::num(v[0])
        } else {
            Setting::Value(Value::Gradient(v.into_iter().map(Scalar::Num).collect()))
        }
    }
}

/// Named settings of one scope (ordered, so plans print the same every time).
pub type Settings = BTreeMap<String, Setting>;

/// The type a parameter's values must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Float,
    Bool,
}

/// Which inputs a parameter is given for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// One value for the output tensor (slerp's `t`, `normalize`).
    Shared,
    /// One value per input model, the base included (linear's `weight`).
    Input,
    /// One value per input model other than the base (task arithmetic's `weight`, `density`).
    NonBase,
}

/// What happens when no scope sets a parameter.
#[derive(Clone, Debug, PartialEq)]
pub enum Default {
    Required,
    /// Absent unless given (passthrough's `scale`).
    Absent,
    Float(f64),
    Bool(bool),
}

/// A parameter a merge method accepts.
#[derive(Clone, Debug)]
pub struct ParamDef {
    pub name: &'static str,
    pub kind: Kind,
    pub scope: Scope,
    pub default: Default,
    pub help: &'static str,
}

impl ParamDef {
    pub const fn new(name: &'static str, kind: Kind, scope: Scope, default: Default, help: &'static str) -> Self {
        ParamDef { name, kind, scope, default, help }
    }

    /// Converts a written scalar to this parameter's type (numeric strings count as numbers, as pydantic reads them).
    pub fn validate(&self, s: &Scalar) -> Result<Scalar> {
        match (self.kind, s) {
            (Kind::Float, Scalar::Num(x)) => Ok(Scalar::Num(*x)),
            (Kind::Float, Scalar::Str(t)) => t
                .trim()
                .parse::<f64>()
                .map(Scalar::Num)
                .map_err(|_| Error::usage(format!("parameter '{}': '{t}' is not a number", self.name))),
            (Kind::Bool, Scalar::Bool(b)) => Ok(Scalar::Bool(*b)),
            (Kind::Bool, Scalar::Num(x)) if *x == 0.0 || *x == 1.0 => Ok(Scalar::Bool(*x == 1.0)),
            (Kind::Bool, Scalar::Str(t)) => match t.to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" | "1" => Ok(Scalar::Bool(true)),
                "false" | "no" | "off" | "0" => Ok(Scalar::Bool(false)),
                _ => Err(Error::usage(format!("parameter '{}': '{t}' is not true or false", self.name))),
            },
            (Kind::Float, Scalar::Bool(b)) => {
                Err(Error::usage(format!("parameter '{}': expected a number, found {b}", self.name)))
            }
            (Kind::Bool, Scalar::Num(x)) => {
                Err(Error::usage(format!("parameter '{}': expected true or false, found {x}", self.name)))
            }
        }
    }

    fn default_value(&self) -> Option<Scalar> {
        match self.default {
            Default::Float(x) => Some(Scalar::Num(x)),
            Default::Bool(b) => Some(Scalar::Bool(b)),
            Default::Required | Default::Absent => None,
        }
    }
}

/// Resolves one setting for a tensor at relative layer position `t`; `None` when a filter list has no match.
pub fn evaluate(def: &ParamDef, setting: &Setting, tensor: &str, t: f64) -> Result<Option<Scalar>> {
    match setting {
        Setting::Value(v) => evaluate_value(def, v, t).map(Some),
        Setting::Filtered(conds) => {
            for c in conds {
                let matches = match c.filter.as_deref() {
                    None | Some("*") => true,
                    Some(f) => tensor.contains(f),
                };
                if matches {
                    return evaluate_value(def, &c.value, t).map(Some);
                }
            }
            Ok(None)
        }
    }
}

fn evaluate_value(def: &ParamDef, v: &Value, t: f64) -> Result<Scalar> {
    match v {
        Value::Scalar(s) => def.validate(s),
        Value::Gradient(list) => {
            let values: Vec<Scalar> = list.iter().map(|s| def.validate(s)).collect::<Result<_>>()?;
            let n = values.len() - 1;
            let nums: Option<Vec<f64>> =
                values.iter().map(|s| if let Scalar::Num(x) = s { Some(*x) } else { None }).collect();
            match nums {
                Some(nums) => Ok(Scalar::Num(interpolate(&nums, t))),
                None => Ok(values[((t * n as f64) as usize).min(n)].clone()),
            }
        }
    }
}

/// mergekit's gradient rule (see the module comment).
pub fn interpolate(values: &[f64], t: f64) -> f64 {
    let n = values.len() - 1;
    let scaled = t * n as f64;
    let i0 = (scaled as usize).min(n);
    let i1 = (i0 + 1).min(n);
    let frac = scaled - i0 as f64;
    (1.0 - frac) * values[i0] + frac * values[i1]
}

/// Looks `def` up through `scopes` (highest precedence first), then its default.
pub fn resolve(def: &ParamDef, scopes: &[Option<&Settings>], tensor: &str, t: f64) -> Result<Option<Scalar>> {
    for scope in scopes.iter().flatten() {
        if let Some(setting) = scope.get(def.name) {
            if let Some(v) = evaluate(def, setting, tensor, t)? {
                return Ok(Some(v));
            }
        }
    }
    match def.default {
        Default::Required => {
            Err(Error::usage(format!("missing required parameter '{}' for tensor '{tensor}'", def.name)))
        }
        _ => Ok(def.default_value()),
    }
}

/// The resolved parameters of one output tensor.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TensorParams {
    /// Shared parameters by name.
    pub shared: BTreeMap<String, Scalar>,
    /// Per-input parameters, indexed like the tensor's inputs (empty maps for inputs that take none).
    pub inputs: Vec<BTreeMap<String, Scalar>>,
}

impl TensorParams {
    pub fn f64(&self, name: &str) -> Result<f64> {
        match self.shared.get(name) {
            Some(Scalar::Num(x)) => Ok(*x),
            _ => Err(Error::invalid(format!("parameter '{name}' has no numeric value"))),
        }
    }

    pub fn bool(&self, name: &str) -> Result<bool> {
        match self.shared.get(name) {
            Some(Scalar::Bool(b)) => Ok(*b),
            _ => Err(Error::invalid(format!("parameter '{name}' has no boolean value"))),
        }
    }

    pub fn input_f64(&self, input: usize, name: &str) -> Result<f64> {
        match self.inputs.get(input).and_then(|m| m.get(name)) {
            Some(Scalar::Num(x)) => Ok(*x),
            _ => Err(Error::invalid(format!("parameter '{name}' of input {input} has no numeric value"))),
        }
    }

    pub fn input_opt_f64(&self, input: usize, name: &str) -> Option<f64> {
        match self.inputs.get(input).and_then(|m| m.get(name)) {
            Some(Scalar::Num(x)) => Some(*x),
            _ => None,
        }
    }

    /// Sets a numeric per-input value (used by SNR-derived interpolation weights).
    pub fn set_input(&mut self, input: usize, name: &str, v: f64) {
        if let Some(m) = self.inputs.get_mut(input) {
            m.insert(name.to_string(), Scalar::Num(v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: ParamDef = ParamDef::new("t", Kind::Float, Scope::Shared, Default::Required, "");
    const N: ParamDef = ParamDef::new("normalize", Kind::Bool, Scope::Shared, Default::Bool(true), "");

    fn grad(v: &[f64]) -> Setting {
        Setting::Value(Value::Gradient(v.iter().map(|&x| Scalar::Num(x)).collect()))
    }

    #[test]
    fn gradient_interpolates_piecewise_linearly() {
        // [0, 0.5, 0.3, 0.7, 1] over 5 points: t = 0.375 is 1.5 segments in, halfway between 0.5 and 0.3.
        let g = grad(&[0.0, 0.5, 0.3, 0.7, 1.0]);
        let at = |t: f64| evaluate(&T, &g, "x", t).unwrap().unwrap();
        assert_eq!(at(0.0), Scalar::Num(0.0));
        assert_eq!(at(1.0), Scalar::Num(1.0));
        assert_eq!(at(0.25), Scalar::Num(0.5));
        let Scalar::Num(v) = at(0.375) else { panic!() };
        assert!((v - 0.4).abs() < 1e-12, "{v}");
        // 28 layers over [0, 1]: layer 9 of 27 sits at t = 1/3.
        let Scalar::Num(v) = evaluate(&T, &grad(&[0.0, 1.0]), "x", 9.0 / 27.0).unwrap().unwrap() else { panic!() };
        assert!((v - 1.0 / 3.0).abs() < 1e-15);
    }

    #[test]
    fn first_matching_filter_wins_and_no_match_falls_through() {
        let s = Setting::Filtered(vec![
            Conditional { filter: Some("self_attn".into()), value: Value::Scalar(Scalar::Num(0.1)) },
            Conditional { filter: Some("attn".into()), value: Value::Scalar(Scalar::Num(0.2)) },
            Conditional {
                filter: Some("mlp".into()),
                value: Value::Gradient(vec![Scalar::Num(0.0), Scalar::Num(1.0)]),
            },
        ]);
        assert_eq!(evaluate(&T, &s, "model.layers.0.self_attn.q_proj.weight", 0.0).unwrap(), Some(Scalar::Num(0.1)));
        assert_eq!(evaluate(&T, &s, "model.layers.1.mlp.up_proj.weight", 0.5).unwrap(), Some(Scalar::Num(0.5)));
        assert_eq!(evaluate(&T, &s, "model.norm.weight", 0.0).unwrap(), None);
        let top: Settings = [("t".to_string(), Setting::num(0.9))].into();
        let low: Settings = [("t".to_string(), s)].into();
        // The first scope has no match for model.norm: the next scope decides.
        assert_eq!(resolve(&T, &[Some(&low), Some(&top)], "model.norm.weight", 0.0).unwrap(), Some(Scalar::Num(0.9)));
        assert!(resolve(&T, &[Some(&low)], "model.norm.weight", 0.0).is_err());
        assert_eq!(resolve(&N, &[None], "x", 0.0).unwrap(), Some(Scalar::Bool(true)));
    }

    #[test]
    fn validation_follows_the_parameter_type() {
        assert_eq!(T.validate(&Scalar::Str("1e-3".into())).unwrap(), Scalar::Num(1e-3));
        assert!(T.validate(&Scalar::Bool(true)).is_err());
        assert_eq!(N.validate(&Scalar::Str("false".into())).unwrap(), Scalar::Bool(false));
        // A boolean list is discrete: no interpolation.
        let g = Setting::Value(Value::Gradient(vec![Scalar::Bool(false), Scalar::Bool(true)]));
        assert_eq!(evaluate(&N, &g, "x", 0.99).unwrap(), Some(Scalar::Bool(false)));
        assert_eq!(evaluate(&N, &g, "x", 1.0).unwrap(), Some(Scalar::Bool(true)));
    }
}
