//! Which parameters train: `--freeze none | all-but-head | selected:FILE | regex:FILE` and `--train-last-layers N`.
//!
//! FILE may be: a JSON array of tensor or module names; a JSON object with a `selected` array (names, or objects
//! with a `name` field: `graft snr --selection-json`); a checkpoint (file or directory) whose `__metadata__` has
//! `graft.merged_tensors` (the tensors a merge changed); a Spectrum/axolotl YAML with `unfrozen_parameters` (regular
//! expressions); or, for `regex:`, a text file with one regular expression per line (`#` comments). A name selects
//! the tensor of that name and every tensor of the module of that name (`a.b` selects `a.b.weight`, `a.b.bias`).
//! Regular expressions are searched in the tensor name (Python's `re.search`, as Spectrum/axolotl use them).
//! The classification head always trains under `selected:` and `regex:` (a fresh or task-specific head must learn).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::models::Model;
use super::params::ParamStore;
use crate::checkpoint::Checkpoint;
use crate::error::{Arg, Error, Result};

/// The metadata key under which merges record the tensors they changed (JSON array of names).
pub const MERGED_TENSORS_KEY: &str = "graft.merged_tensors";

#[derive(Clone, Debug, PartialEq)]
pub enum FreezePolicy {
    None,
    AllButHead,
    Selected(PathBuf),
    Regex(PathBuf),
    /// Train the last N encoder layers and the head (transformers).
    LastLayers(usize),
}

impl FreezePolicy {
    pub fn parse(s: &str) -> Result<FreezePolicy> {
        match s {
            "none" => Ok(FreezePolicy::None),
            "all-but-head" | "head" | "head-only" => Ok(FreezePolicy::AllButHead),
            _ => {
                if let Some(f) = s.strip_prefix("selected:") {
                    Ok(FreezePolicy::Selected(f.into()))
                } else if let Some(f) = s.strip_prefix("regex:") {
                    Ok(FreezePolicy::Regex(f.into()))
                } else {
                    Err(Error::usage(format!(
                        "{} '{s}': expected none, all-but-head, selected:FILE or regex:FILE",
                        Arg::Freeze
                    )))
                }
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            FreezePolicy::None => "none".into(),
            FreezePolicy::AllButHead => "all-but-head".into(),
            FreezePolicy::Selected(p) => format!("selected:{}", p.display()),
            FreezePolicy::Regex(p) => format!("regex:{}", p.display()),
            FreezePolicy::LastLayers(n) => format!("last-layers:{n}"),
        }
    }
}

/// The outcome of applying a policy.
#[derive(Clone, Debug, Serialize)]
pub struct FreezeSummary {
    pub policy: String,
    pub trainable_tensors: usize,
    pub frozen_tensors: usize,
    pub trainable_params: usize,
    pub total_params: usize,
    /// Selection entries that matched no parameter of the model.
    pub unmatched: Vec<String>,
}

enum Selection {
    Names(Vec<String>),
    Regexes(Vec<regex::Regex>),
}

/// What a freezing policy needs to know of a network: its parameters, which of them form its task head, and the
/// layer index of each parameter of a layered (transformer) body.
pub trait FreezeTarget {
    fn store(&self) -> &ParamStore;
    /// The architecture's name, for messages.
    fn arch_name(&self) -> &'static str;
    fn is_head(&self, name: &str) -> bool;
    fn encoder_layer(&self, name: &str) -> Option<usize>;
    fn encoder_layers(&self) -> usize;
    /// Whether `selected:`/`regex:` train the head besides the selection (a classifier's fresh head must learn; a
    /// language model's head trains only when selected).
    fn head_trains_with_selection(&self) -> bool {
        true
    }
    /// Parameters outside the layers that `--train-last-layers` trains with them (a decoder's final norm).
    fn trains_with_last_layers(&self, name: &str) -> bool {
        self.is_head(name)
    }
}

impl<M: Model + ?Sized> FreezeTarget for M {
    fn store(&self) -> &ParamStore {
        Model::store(self)
    }
    fn arch_name(&self) -> &'static str {
        self.spec().name()
    }
    fn is_head(&self, name: &str) -> bool {
        Model::is_head(self, name)
    }
    fn encoder_layer(&self, name: &str) -> Option<usize> {
        Model::encoder_layer(self, name)
    }
    fn encoder_layers(&self) -> usize {
        Model::encoder_layers(self)
    }
}

/// Marks every parameter of `model` trainable or frozen by `policy`.
pub fn apply<M: FreezeTarget + ?Sized>(model: &M, policy: &FreezePolicy) -> Result<FreezeSummary> {
    let store = model.store();
    let names: Vec<String> = store.params().map(|(n, _)| n.to_string()).collect();
    let mut unmatched = Vec::new();
    let trainable: BTreeSet<String> = match policy {
        FreezePolicy::None => names.iter().cloned().collect(),
        FreezePolicy::AllButHead => names.iter().filter(|n| model.is_head(n)).cloned().collect(),
        FreezePolicy::LastLayers(k) => {
            let layers = model.encoder_layers();
            if layers == 0 {
                return Err(Error::usage(format!(
                    "{} applies to transformer encoders; the {} model has none",
                    Arg::TrainLastLayers,
                    model.arch_name()
                )));
            }
            let first = layers.saturating_sub(*k);
            names
                .iter()
                .filter(|n| model.trains_with_last_layers(n) || model.encoder_layer(n).is_some_and(|l| l >= first))
                .cloned()
                .collect()
        }
        FreezePolicy::Selected(path) | FreezePolicy::Regex(path) => {
            let sel = read_selection(path, matches!(policy, FreezePolicy::Regex(_)))?;
            let mut chosen: BTreeSet<String> = if model.head_trains_with_selection() {
                names.iter().filter(|n| model.is_head(n)).cloned().collect()
            } else {
                BTreeSet::new()
            };
            match sel {
                Selection::Names(list) => {
                    for s in list {
                        let hits: Vec<&String> = names
                            .iter()
                            .filter(|n| *n == &s || n.starts_with(&format!("{s}.")) || crate::names::module_of(n) == s)
                            .collect();
                        if hits.is_empty() {
                            unmatched.push(s);
                        }
                        chosen.extend(hits.into_iter().cloned());
                    }
                }
                Selection::Regexes(list) => {
                    for r in list {
                        let hits: Vec<&String> = names.iter().filter(|n| r.is_match(n)).collect();
                        if hits.is_empty() {
                            unmatched.push(r.as_str().to_string());
                        }
                        chosen.extend(hits.into_iter().cloned());
                    }
                }
            }
            let body = chosen.iter().filter(|n| !model.is_head(n)).count();
            if body == 0 {
                return Err(Error::usage(format!(
                    "{}: the selection matches no parameter of the {} model outside its head ({} entries unmatched, \
                     e.g. '{}')",
                    path.display(),
                    model.arch_name(),
                    unmatched.len(),
                    unmatched.first().map(|s| s.as_str()).unwrap_or("")
                )));
            }
            chosen
        }
    };
    for (n, p) in store.params() {
        p.set_trainable(trainable.contains(n));
    }
    Ok(FreezeSummary {
        policy: policy.describe(),
        trainable_tensors: trainable.len(),
        frozen_tensors: names.len() - trainable.len(),
        trainable_params: store.trainable_count(),
        total_params: store.param_count(),
        unmatched,
    })
}

fn read_selection(path: &Path, as_regex: bool) -> Result<Selection> {
    let is_checkpoint = path.is_dir() || path.extension().is_some_and(|e| e == "safetensors");
    if is_checkpoint {
        let ck = Checkpoint::open(path)?;
        let Some(list) = ck.metadata().get(MERGED_TENSORS_KEY) else {
            return Err(Error::format(
                path,
                format!("checkpoint has no '{MERGED_TENSORS_KEY}' metadata (it is written by graft merge)"),
            ));
        };
        let v: serde_json::Value = serde_json::from_str(list)
            .map_err(|e| Error::format(path, format!("metadata '{MERGED_TENSORS_KEY}' is not JSON: {e}")))?;
        return names_from_json(&v, path).map(Selection::Names);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') || trimmed.starts_with('{') {
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        let names = names_from_json(&v, path)?;
        return if as_regex { compile(&names, path).map(Selection::Regexes) } else { Ok(Selection::Names(names)) };
    }
    if text.lines().any(|l| l.trim_start().starts_with("unfrozen_parameters")) {
        let v: serde_json::Value =
            yaml_serde::from_str(&text).map_err(|e| Error::format(path, format!("not valid YAML: {e}")))?;
        let list = v
            .get("unfrozen_parameters")
            .and_then(|l| l.as_array())
            .ok_or_else(|| Error::format(path, "'unfrozen_parameters' is not a list of regular expressions"))?;
        let pats: Vec<String> = list
            .iter()
            .map(|x| x.as_str().map(str::to_string).ok_or_else(|| Error::format(path, "non-string pattern")))
            .collect::<Result<_>>()?;
        return compile(&pats, path).map(Selection::Regexes);
    }
    let lines: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_start_matches("- ").to_string())
        .collect();
    if as_regex {
        compile(&lines, path).map(Selection::Regexes)
    } else {
        Ok(Selection::Names(lines))
    }
}

fn names_from_json(v: &serde_json::Value, path: &Path) -> Result<Vec<String>> {
    let list = match v {
        serde_json::Value::Array(a) => a,
        serde_json::Value::Object(o) => {
            let key = ["selected", "tensors", "names", "merged_tensors"].into_iter().find(|k| o.contains_key(*k));
            match key.and_then(|k| o[k].as_array()) {
                Some(a) => a,
                None => {
                    return Err(Error::format(
                        path,
                        "expected a JSON array of names or an object with a \"selected\" array",
                    ))
                }
            }
        }
        _ => return Err(Error::format(path, "expected a JSON array of names or an object with a \"selected\" array")),
    };
    list.iter()
        .map(|x| match x {
            serde_json::Value::String(s) => Ok(s.clone()),
            serde_json::Value::Object(o) => o
                .get("name")
                .or_else(|| o.get("tensor"))
                .and_then(|n| n.as_str())
                .map(str::to_string)
                .ok_or_else(|| Error::format(path, "a selection entry has no \"name\"")),
            _ => Err(Error::format(path, "selection entries must be names")),
        })
        .collect()
}

fn compile(pats: &[String], path: &Path) -> Result<Vec<regex::Regex>> {
    pats.iter()
        .map(|p| {
            regex::Regex::new(p)
                .map_err(|e| Error::format(path, format!("'{p}' is not a valid regular expression: {e}")))
        })
        .collect()
}
