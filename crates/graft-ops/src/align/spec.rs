//! Permutation specs as data: which permutation group, if any, acts on each axis of each tensor.
//!
//! A spec declares groups (a name and a number of units) and lists every tensor of the checkpoint with one entry per
//! axis: `null` (the axis is not permuted), a group name (the axis is the group's units), or `{group, block}` (the
//! axis is `size` contiguous blocks of `block` elements, permuted as whole blocks: attention heads, or a conv output
//! flattened into a Linear). Axes follow PyTorch layouts: Linear weight (out, in), Conv weight (out, in, kh, kw).
//!
//! This module owns the file format (YAML or JSON in, YAML or JSON out, the order of the file kept) and the check of
//! a spec against a checkpoint (`Spec::resolve`), which turns names into indices once so that matching and
//! permuting never look a name up again. Built-in specs are inferred in `builtin`.

use std::collections::HashMap;
use std::fmt::Write;
use std::path::Path;

use serde_json::{Map, Value};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

/// A permutation spec as written in a file or inferred by a built-in.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    pub groups: Vec<GroupDecl>,
    pub tensors: Vec<TensorAxes>,
    /// Where the spec came from (a file path, or `built-in 'llama'`), for error messages.
    pub source: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct GroupDecl {
    pub name: String,
    /// Number of units the group permutes (hidden units, channels, heads).
    pub size: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TensorAxes {
    pub name: String,
    /// One entry per axis; `None` in place of the whole list means "no axis permuted" whatever the rank.
    pub axes: Option<Vec<Option<AxisRef>>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AxisRef {
    pub group: String,
    /// Elements per unit along this axis (1 for plain units, head_dim for heads).
    pub block: usize,
}

/// A group after resolution.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Group {
    pub name: String,
    pub size: usize,
}

/// One axis's permutation: the group's index and the elements per unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Axis {
    pub group: usize,
    pub block: usize,
}

/// A tensor with at least one permuted axis.
#[derive(Clone, Debug, PartialEq)]
pub struct Permuted {
    pub name: String,
    pub shape: Vec<usize>,
    pub axes: Vec<Option<Axis>>,
}

/// A spec checked against a checkpoint: every tensor covered, every axis length equal to its group's size times the
/// block. Only tensors with a permuted axis are kept; all others pass through unchanged.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub source: String,
    pub groups: Vec<Group>,
    /// Permuted tensors in the checkpoint's storage order.
    pub tensors: Vec<Permuted>,
    /// For each group, the (tensor index, axis) pairs it acts on, in storage order.
    pub members: Vec<Vec<(usize, usize)>>,
    index: HashMap<String, usize>,
}

impl Resolved {
    /// The permuted tensor called `name`, if the spec permutes it.
    pub fn get(&self, name: &str) -> Option<&Permuted> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// Indices of the tensors a group touches (each once, in storage order).
    pub fn tensors_of(&self, group: usize) -> Vec<usize> {
        let mut v: Vec<usize> = self.members[group].iter().map(|&(t, _)| t).collect();
        v.dedup();
        v
    }

    /// Checks that `other` (the reference, or another model) has every permuted tensor with the same shape, as a
    /// float tensor, so that its weights can be compared unit by unit.
    pub fn check_compatible(&self, other: &Checkpoint) -> Result<()> {
        for t in &self.tensors {
            let v = other.tensor(&t.name)?;
            if v.shape != t.shape.as_slice() {
                return Err(Error::tensor(
                    v.file,
                    &t.name,
                    format!("shape {:?} differs from the aligned model's {:?}", v.shape, t.shape),
                ));
            }
        }
        Ok(())
    }
}

impl Resolved {
    /// Names of permuted tensors whose shape in `other` differs from the model's: a head trained for another task
    /// (4 classes against 10) cannot be compared unit by unit, so it drops out of the matching objective while its
    /// permuted axes are still applied. A missing tensor is an error.
    pub fn incomparable(&self, other: &Checkpoint) -> Result<Vec<String>> {
        let mut v = Vec::new();
        for t in &self.tensors {
            if other.tensor(&t.name)?.shape != t.shape.as_slice() {
                v.push(t.name.clone());
            }
        }
        Ok(v)
    }
}

impl Spec {
    /// Reads a spec file: JSON when the name ends in `.json`, YAML otherwise.
    pub fn load(path: &Path) -> Result<Spec> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
        Spec::parse(&text, json, &path.display().to_string())
    }

    /// Parses spec text; `source` names it in errors.
    pub fn parse(text: &str, json: bool, source: &str) -> Result<Spec> {
        let value: Value = if json {
            serde_json::from_str(text).map_err(|e| Error::format(source, format!("spec is not valid JSON: {e}")))?
        } else {
            yaml_serde::from_str(text).map_err(|e| Error::format(source, format!("spec is not valid YAML: {e}")))?
        };
        Spec::from_value(&value, source)
    }

    fn from_value(v: &Value, source: &str) -> Result<Spec> {
        let bad = |msg: String| Error::format(source, msg);
        let top = v.as_object().ok_or_else(|| bad("a spec is a mapping with keys 'groups' and 'tensors'".into()))?;
        if let Some(k) = top.keys().find(|k| *k != "groups" && *k != "tensors") {
            return Err(bad(format!("unknown key '{k}' (a spec has only 'groups' and 'tensors')")));
        }
        let mut groups = Vec::new();
        match top.get("groups") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (name, size) in m {
                    let size = size.as_u64().filter(|&s| s >= 1).ok_or_else(|| {
                        bad(format!("group '{name}': the size must be a positive integer, not {size}"))
                    })?;
                    groups.push(GroupDecl { name: name.clone(), size: size as usize });
                }
            }
            Some(other) => return Err(bad(format!("'groups' must map group names to sizes, not {other}"))),
        }
        let tensors_v = top
            .get("tensors")
            .and_then(|t| t.as_object())
            .ok_or_else(|| bad("'tensors' must map every tensor name to its list of axes".into()))?;
        let mut tensors = Vec::new();
        for (name, axes) in tensors_v {
            let axes = match axes {
                Value::Null => None,
                Value::Array(list) => Some(
                    list.iter()
                        .enumerate()
                        .map(|(k, a)| parse_axis(a).map_err(|m| bad(format!("tensor '{name}', axis {k}: {m}"))))
                        .collect::<Result<Vec<_>>>()?,
                ),
                other => {
                    return Err(bad(format!(
                        "tensor '{name}': expected a list with one entry per axis (or null), not {other}"
                    )))
                }
            };
            tensors.push(TensorAxes { name: name.clone(), axes });
        }
        Ok(Spec { groups, tensors, source: source.to_string() })
    }

    /// The spec as a JSON value, in the file format (groups then tensors, in order).
    pub fn to_value(&self) -> Value {
        let mut groups = Map::new();
        for g in &self.groups {
            groups.insert(g.name.clone(), Value::from(g.size));
        }
        let mut tensors = Map::new();
        for t in &self.tensors {
            let v = match &t.axes {
                None => Value::Null,
                Some(axes) => Value::Array(axes.iter().map(axis_value).collect()),
            };
            tensors.insert(t.name.clone(), v);
        }
        let mut top = Map::new();
        top.insert("groups".into(), Value::Object(groups));
        top.insert("tensors".into(), Value::Object(tensors));
        Value::Object(top)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&self.to_value()).unwrap() + "\n"
    }

    /// The spec as YAML with one line per group and per tensor (flow lists), after `header` lines as comments.
    pub fn to_yaml(&self, header: &[String]) -> String {
        let mut s = String::new();
        for h in header {
            let _ = writeln!(s, "# {h}");
        }
        if self.groups.is_empty() {
            s.push_str("groups: {}\n");
        } else {
            s.push_str("groups:\n");
            for g in &self.groups {
                let _ = writeln!(s, "  {}: {}", yaml_scalar(&g.name), g.size);
            }
        }
        s.push_str("tensors:\n");
        for t in &self.tensors {
            let axes = match &t.axes {
                None => "null".to_string(),
                Some(axes) => {
                    let parts: Vec<String> = axes
                        .iter()
                        .map(|a| match a {
                            None => "null".to_string(),
                            Some(a) if a.block == 1 => yaml_scalar(&a.group),
                            Some(a) => format!("{{group: {}, block: {}}}", yaml_scalar(&a.group), a.block),
                        })
                        .collect();
                    format!("[{}]", parts.join(", "))
                }
            };
            let _ = writeln!(s, "  {}: {axes}", yaml_scalar(&t.name));
        }
        s
    }

    /// Checks the spec against `ck` and resolves names to indices. Errors name the spec's source and the tensor,
    /// axis and group at fault.
    pub fn resolve(&self, ck: &Checkpoint) -> Result<Resolved> {
        let src = &self.source;
        let usage = |msg: String| Error::usage(format!("{src}: {msg}"));
        let mut group_index: HashMap<&str, usize> = HashMap::new();
        for (i, g) in self.groups.iter().enumerate() {
            if group_index.insert(g.name.as_str(), i).is_some() {
                return Err(usage(format!("group '{}' is declared twice", g.name)));
            }
        }
        let mut by_name: HashMap<&str, &TensorAxes> = HashMap::new();
        for t in &self.tensors {
            if by_name.insert(t.name.as_str(), t).is_some() {
                return Err(usage(format!("tensor '{}' is listed twice", t.name)));
            }
            if !ck.contains(&t.name) {
                return Err(usage(format!(
                    "tensor '{}' is in the spec but not in the checkpoint {}",
                    t.name,
                    ck.path().display()
                )));
            }
        }
        let missing: Vec<&str> = ck.names().filter(|n| !by_name.contains_key(n)).collect();
        if let Some(first) = missing.first() {
            let more = if missing.len() > 1 { format!(" (and {} more)", missing.len() - 1) } else { String::new() };
            return Err(usage(format!(
                "the spec does not cover tensor '{first}'{more} of {}; list every tensor (null for one that is not \
                 permuted)",
                ck.path().display()
            )));
        }
        let groups: Vec<Group> = self.groups.iter().map(|g| Group { name: g.name.clone(), size: g.size }).collect();
        let mut used = vec![false; groups.len()];
        let mut tensors = Vec::new();
        let mut members = vec![Vec::new(); groups.len()];
        let mut index = HashMap::new();
        for info in ck.infos() {
            let spec = by_name[info.name.as_str()];
            let Some(axes) = &spec.axes else { continue };
            if axes.len() != info.shape.len() {
                return Err(usage(format!(
                    "tensor '{}' has {} axes (shape {:?}) but the spec lists {}",
                    info.name,
                    info.shape.len(),
                    info.shape,
                    axes.len()
                )));
            }
            let mut resolved = Vec::with_capacity(axes.len());
            for (k, a) in axes.iter().enumerate() {
                let Some(a) = a else {
                    resolved.push(None);
                    continue;
                };
                let &g = group_index.get(a.group.as_str()).ok_or_else(|| {
                    usage(format!(
                        "tensor '{}', axis {k}: group '{}' is not declared under 'groups'",
                        info.name, a.group
                    ))
                })?;
                let size = groups[g].size;
                if a.block == 0 || size.checked_mul(a.block) != Some(info.shape[k]) {
                    let hint = if a.block == 1 && info.shape[k] % size == 0 {
                        format!(
                            "; to permute {size} blocks of {} elements write {{group: {}, block: {}}}",
                            info.shape[k] / size,
                            a.group,
                            info.shape[k] / size
                        )
                    } else {
                        String::new()
                    };
                    return Err(usage(format!(
                        "tensor '{}', axis {k} has length {} but group '{}' has {size} units of {} element(s) \
                         ({} in all): a group's size must match every axis it permutes{hint}",
                        info.name,
                        info.shape[k],
                        a.group,
                        a.block,
                        size.saturating_mul(a.block)
                    )));
                }
                used[g] = true;
                resolved.push(Some(Axis { group: g, block: a.block }));
            }
            if resolved.iter().all(|a| a.is_none()) {
                continue;
            }
            let ti = tensors.len();
            for (k, a) in resolved.iter().enumerate() {
                if let Some(a) = a {
                    members[a.group].push((ti, k));
                }
            }
            index.insert(info.name.clone(), ti);
            tensors.push(Permuted { name: info.name.clone(), shape: info.shape.clone(), axes: resolved });
        }
        if let Some(g) = used.iter().position(|u| !u) {
            return Err(usage(format!("group '{}' is declared but permutes no axis", groups[g].name)));
        }
        Ok(Resolved { source: self.source.clone(), groups, tensors, members, index })
    }
}

fn parse_axis(a: &Value) -> std::result::Result<Option<AxisRef>, String> {
    match a {
        Value::Null => Ok(None),
        Value::String(g) => Ok(Some(AxisRef { group: g.clone(), block: 1 })),
        Value::Object(m) => {
            if let Some(k) = m.keys().find(|k| *k != "group" && *k != "block") {
                return Err(format!("unknown key '{k}' (an axis is null, a group name, or {{group, block}})"));
            }
            let group = m.get("group").and_then(|g| g.as_str()).ok_or("'group' must be a group name")?;
            let block = match m.get("block") {
                None => 1,
                Some(b) => b.as_u64().filter(|&b| b >= 1).ok_or("'block' must be a positive integer")? as usize,
            };
            Ok(Some(AxisRef { group: group.to_string(), block }))
        }
        other => Err(format!("an axis is null, a group name, or {{group, block}}, not {other}")),
    }
}

fn axis_value(a: &Option<AxisRef>) -> Value {
    match a {
        None => Value::Null,
        Some(a) if a.block == 1 => Value::String(a.group.clone()),
        Some(a) => serde_json::json!({ "group": a.group, "block": a.block }),
    }
}

/// A YAML scalar for a name: plain when it cannot be mistaken for anything else, JSON-quoted otherwise (a JSON
/// string is a valid YAML double-quoted scalar).
fn yaml_scalar(s: &str) -> String {
    let plain = s.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/'))
        && !matches!(
            s.to_ascii_lowercase().as_str(),
            "null" | "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n"
        );
    if plain {
        s.to_string()
    } else {
        serde_json::to_string(s).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = "\
# an MLP 4-3-2
groups:
  hidden: 3
tensors:
  fc1.weight: [hidden, null]
  fc1.bias: [hidden]
  fc2.weight: [null, {group: hidden, block: 1}]
  fc2.bias: null
";

    #[test]
    fn yaml_and_json_round_trip() {
        let s = Spec::parse(YAML, false, "t.yaml").unwrap();
        assert_eq!(s.groups, vec![GroupDecl { name: "hidden".into(), size: 3 }]);
        assert_eq!(s.tensors.len(), 4);
        assert_eq!(s.tensors[2].axes.as_ref().unwrap()[1], Some(AxisRef { group: "hidden".into(), block: 1 }));
        assert_eq!(s.tensors[3].axes, None);
        let again = Spec::parse(&s.to_yaml(&["x".into()]), false, "t.yaml").unwrap();
        assert_eq!(again, s);
        let from_json = Spec::parse(&s.to_json(), true, "t.yaml").unwrap();
        assert_eq!(from_json, s);
    }

    #[test]
    fn names_that_need_quoting_survive() {
        let s = Spec {
            groups: vec![GroupDecl { name: "null".into(), size: 2 }, GroupDecl { name: "a: b, [c]".into(), size: 4 }],
            tensors: vec![TensorAxes {
                name: "weird name #1".into(),
                axes: Some(vec![
                    Some(AxisRef { group: "null".into(), block: 2 }),
                    Some(AxisRef { group: "a: b, [c]".into(), block: 1 }),
                ]),
            }],
            source: "t".into(),
        };
        assert_eq!(Spec::parse(&s.to_yaml(&[]), false, "t").unwrap(), s);
    }

    #[test]
    fn malformed_specs_are_format_errors() {
        for (text, needle) in [
            ("groups: {a: 0}\ntensors: {}", "positive integer"),
            ("tensors: {x: 3}", "one entry per axis"),
            ("groups: {}\n", "'tensors'"),
            ("tensors: {x: [{grp: a}]}", "unknown key 'grp'"),
            ("tensors: {x: [{group: a, block: 0}]}", "'block'"),
            ("grups: {}\ntensors: {}", "unknown key 'grups'"),
            ("tensors: [", "not valid YAML"),
        ] {
            let e = Spec::parse(text, false, "s.yaml").unwrap_err().to_string();
            assert!(e.starts_with("s.yaml: ") && e.contains(needle), "{text:?}: {e}");
        }
    }
}
