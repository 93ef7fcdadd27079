//! The files `graft snr` writes for other tools: Spectrum's SNR JSON, axolotl's `unfrozen_parameters` YAML (as
//! Spectrum writes it) and graft's selection file (read by `graft merge --snr-select` and `graft train --freeze`).
//!
//! JSON has no infinity: an infinite score (an exactly low-rank matrix, `NoiseZero`) is written as the largest f64,
//! which every reader sorts exactly where infinity would go. Tensors without a score are left out of Spectrum's
//! JSON and of the scores map (Spectrum would write NaN, which breaks its own sorting).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Selection, TensorSnr};
use crate::error::{Error, Result};

/// Regexes Spectrum always unfreezes, written only when the checkpoint has the tensor.
pub const ALWAYS_UNFROZEN: [&str; 2] = ["lm_head.weight", "model.embed_tokens.weight"];

/// The identifier of the selection file layout.
pub const SELECTION_FORMAT: &str = "graft-snr-selection/1";

/// A score as a JSON-representable number (infinity becomes f64::MAX).
pub fn json_score(x: f64) -> f64 {
    if x == f64::INFINITY {
        f64::MAX
    } else {
        x
    }
}

/// One entry of Spectrum's JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpectrumEntry {
    pub snr: f64,
    #[serde(rename = "type")]
    pub layer_type: String,
}

/// Spectrum's `snr_results_*.json`: `{module_name: {"snr": x, "type": t}}`, types in Spectrum's order, modules in
/// rank order within each type, 4-space indentation as `json.dump(..., indent=4)`.
pub fn spectrum_json(selection: &Selection) -> String {
    let mut map = serde_json::Map::new();
    for t in &selection.types {
        for r in &t.ranked {
            let e = SpectrumEntry { snr: json_score(r.snr), layer_type: t.layer_type.clone() };
            map.insert(r.module.clone(), serde_json::to_value(e).expect("plain struct"));
        }
    }
    pretty4(&serde_json::Value::Object(map))
}

fn pretty4(v: &serde_json::Value) -> String {
    let mut out = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut ser = serde_json::Serializer::with_formatter(&mut out, fmt);
    v.serialize(&mut ser).expect("in-memory JSON");
    let mut s = String::from_utf8(out).expect("JSON is UTF-8");
    s.push('\n');
    s
}

/// Spectrum's axolotl file: `unfrozen_parameters:`, the always-unfrozen regexes present in `tensor_names`, then per
/// type a `# <type> layers` comment and the selected module names (rank order).
pub fn unfrozen_yaml<'a>(selection: &Selection, tensor_names: impl IntoIterator<Item = &'a str>) -> String {
    let present: Vec<&str> = tensor_names.into_iter().collect();
    let mut s = String::from("unfrozen_parameters:\n");
    for always in ALWAYS_UNFROZEN {
        if present.contains(&always) {
            s.push_str(&format!("- {}\n", yaml_scalar(&format!("^{always}$"))));
        }
    }
    for t in &selection.types {
        s.push_str(&format!("# {} layers\n", t.layer_type.replace(['\n', '\r'], " ")));
        for r in t.ranked.iter().filter(|r| r.selected) {
            s.push_str(&format!("- {}\n", yaml_scalar(&r.module)));
        }
    }
    s
}

/// A list item as Spectrum writes it (bare), single-quoted only where a bare scalar would not read back verbatim.
fn yaml_scalar(s: &str) -> String {
    let plain_safe = !s.is_empty()
        && !s.starts_with(|c: char| "-?:,[]{}#&*!|>'\"%@` ".contains(c))
        && !s.ends_with([' ', ':'])
        && !s.contains(": ")
        && !s.contains(" #")
        && !s.chars().any(|c| c.is_control())
        && !matches!(s, "null" | "Null" | "NULL" | "~" | "true" | "false" | "True" | "False" | "TRUE" | "FALSE")
        && s.parse::<f64>().is_err();
    if plain_safe {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "''"))
    }
}

/// Spectrum's file-name slug of a model (what `{model}` in an output path becomes): `/` and `_` become `-`.
pub fn model_slug(model: &str) -> String {
    let trimmed = model.trim_end_matches('/');
    let s = trimmed.replace(['/', '_', '\\'], "-");
    s.trim_start_matches(['.', '-']).to_string()
}

/// graft's selection file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SelectionFile {
    /// Always `graft-snr-selection/1`.
    pub format: String,
    /// The checkpoint scanned, as given.
    pub model: String,
    pub top_percent: f64,
    /// The layer types ranked, in Spectrum's order.
    pub types: Vec<String>,
    /// The selected tensor names (type by type, rank order).
    pub selected: Vec<String>,
    /// The selected Spectrum module names, in the same order.
    pub modules: Vec<String>,
    /// Every scored tensor of the ranked types and its score (infinite written as the largest f64).
    pub scores: BTreeMap<String, f64>,
}

impl SelectionFile {
    pub fn new(model: &str, selection: &Selection) -> Self {
        let chosen: Vec<_> = selection.selected().collect();
        SelectionFile {
            format: SELECTION_FORMAT.to_string(),
            model: model.to_string(),
            top_percent: selection.top_percent,
            types: selection.types.iter().map(|t| t.layer_type.clone()).collect(),
            selected: chosen.iter().map(|r| r.name.clone()).collect(),
            modules: chosen.iter().map(|r| r.module.clone()).collect(),
            scores: selection
                .types
                .iter()
                .flat_map(|t| t.ranked.iter().map(|r| (r.name.clone(), json_score(r.snr))))
                .collect(),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plain struct") + "\n"
    }

    /// Reads and checks a selection file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let f: SelectionFile = serde_json::from_str(&text)
            .map_err(|e| Error::format(path, format!("not a graft SNR selection file: {e}")))?;
        if f.format != SELECTION_FORMAT {
            return Err(Error::format(path, format!("selection format '{}', expected '{SELECTION_FORMAT}'", f.format)));
        }
        Ok(f)
    }
}

/// The per-tensor record of `--json`: the scan result plus whether it was selected and its rank.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TensorRecord {
    #[serde(flatten)]
    pub tensor: TensorSnr,
    /// 1-based rank within its type (scored tensors only).
    pub rank: Option<usize>,
    pub selected: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_items_read_back_verbatim() {
        #[derive(Deserialize)]
        struct Doc {
            items: Vec<String>,
        }
        let items = ["model.layers.0.mlp.down_proj", "^lm_head.weight$", "a: b", "#x", "true", "1.5", "it's", "-x"];
        let mut text = String::from("items:\n");
        for i in items {
            text.push_str(&format!("- {}\n", yaml_scalar(i)));
        }
        let doc: Doc = yaml_serde::from_str(&text).unwrap();
        assert_eq!(doc.items, items);
        // What Spectrum writes bare stays bare.
        assert_eq!(yaml_scalar("model.layers.0.mlp.down_proj"), "model.layers.0.mlp.down_proj");
        assert_eq!(yaml_scalar("^lm_head.weight$"), "^lm_head.weight$");
    }

    #[test]
    fn infinity_becomes_the_largest_number() {
        assert_eq!(json_score(f64::INFINITY), f64::MAX);
        assert_eq!(json_score(0.25), 0.25);
        let v: f64 = serde_json::from_str(&serde_json::to_string(&json_score(f64::INFINITY)).unwrap()).unwrap();
        assert_eq!(v, f64::MAX);
    }
}
