//! Ranking within each layer type and Spectrum's top-percent selection.
//!
//! Within a type, scored tensors are sorted by score descending (an infinite score first); ties keep layer order
//! (layer index, then name), as Spectrum's stable sort over `named_modules()` does. `floor(len * P / 100)` of them
//! are selected, `len` counting the scored tensors of the type. Types are ordered as Spectrum's `sort_weight_types`
//! orders them: by their first dotted component, then by the whole name.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::TensorSnr;

/// One scored tensor in its type's ranking.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ranked {
    /// Index into the scan the selection was made from.
    pub index: usize,
    pub name: String,
    pub module: String,
    pub layer: Option<usize>,
    /// The score (infinite for an exactly low-rank matrix; serialised as null then).
    pub snr: f64,
    /// 1-based rank within the type.
    pub rank: usize,
    pub selected: bool,
}

/// The ranking of one layer type.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TypeRanking {
    #[serde(rename = "type")]
    pub layer_type: String,
    pub ranked: Vec<Ranked>,
    pub n_selected: usize,
    /// Tensors of this type without a score (skipped vectors, all-zero, non-finite, empty), in layer order.
    pub unscored: Vec<String>,
}

/// Rankings of every type considered and the tensors selected.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Selection {
    pub top_percent: f64,
    pub types: Vec<TypeRanking>,
}

impl Selection {
    /// The selected tensor names, type by type in rank order.
    pub fn selected_names(&self) -> Vec<String> {
        self.selected().map(|r| r.name.clone()).collect()
    }

    /// The selected tensors, type by type in rank order.
    pub fn selected(&self) -> impl Iterator<Item = &Ranked> {
        self.types.iter().flat_map(|t| t.ranked.iter().filter(|r| r.selected))
    }

    pub fn is_selected(&self, tensor: &str) -> bool {
        self.selected().any(|r| r.name == tensor)
    }
}

/// Spectrum's order of layer types: grouped by first dotted component (groups sorted), sorted within a group.
pub fn sort_types(types: &mut [String]) {
    types.sort_by(|a, b| {
        let ca = a.split('.').next().unwrap_or("");
        let cb = b.split('.').next().unwrap_or("");
        ca.cmp(cb).then_with(|| a.cmp(b))
    });
}

/// The layer types present in a scan, in Spectrum's order.
pub fn available_types(scans: &[TensorSnr]) -> Vec<String> {
    let mut types: Vec<String> = scans.iter().map(|t| t.layer_type.clone()).collect();
    types.sort();
    types.dedup();
    sort_types(&mut types);
    types
}

fn layer_order(a: &TensorSnr, b: &TensorSnr) -> Ordering {
    // Names without a layer index sort after indexed ones of the same type (they rarely share one).
    let key = |t: &TensorSnr| (t.layer.is_none(), t.layer.unwrap_or(0));
    key(a).cmp(&key(b)).then_with(|| a.name.cmp(&b.name))
}

/// Ranks every type of `scans` (or only `types`, in Spectrum's type order) and selects floor(len * P / 100) per type.
pub fn rank_and_select(scans: &[TensorSnr], top_percent: f64, types: Option<&[String]>) -> Selection {
    let mut by_type: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, t) in scans.iter().enumerate() {
        if types.is_none_or(|ts| ts.iter().any(|x| x == &t.layer_type)) {
            by_type.entry(&t.layer_type).or_default().push(i);
        }
    }
    let mut order: Vec<String> = by_type.keys().map(|s| s.to_string()).collect();
    sort_types(&mut order);
    let rankings = order
        .into_iter()
        .map(|ty| {
            let members = &by_type[ty.as_str()];
            let mut scored: Vec<usize> =
                members.iter().copied().filter(|&i| scans[i].result.score().is_some()).collect();
            let mut unscored: Vec<usize> =
                members.iter().copied().filter(|&i| scans[i].result.score().is_none()).collect();
            scored.sort_by(|&a, &b| {
                let (sa, sb) = (scans[a].result.snr, scans[b].result.snr);
                sb.total_cmp(&sa).then_with(|| layer_order(&scans[a], &scans[b]))
            });
            unscored.sort_by(|&a, &b| layer_order(&scans[a], &scans[b]));
            let n_selected = selected_count(scored.len(), top_percent);
            let ranked = scored
                .iter()
                .enumerate()
                .map(|(r, &i)| Ranked {
                    index: i,
                    name: scans[i].name.clone(),
                    module: scans[i].module.clone(),
                    layer: scans[i].layer,
                    snr: scans[i].result.snr,
                    rank: r + 1,
                    selected: r < n_selected,
                })
                .collect();
            TypeRanking {
                layer_type: ty,
                ranked,
                n_selected,
                unscored: unscored.iter().map(|&i| scans[i].name.clone()).collect(),
            }
        })
        .collect();
    Selection { top_percent, types: rankings }
}

/// Spectrum's count: `int(len(layers) * top_percent / 100)`, computed in the same order in f64.
pub fn selected_count(len: usize, top_percent: f64) -> usize {
    let v = (len as f64 * top_percent / 100.0).floor();
    if v.is_finite() && v > 0.0 {
        (v as usize).min(len)
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snr::{MatrixSnr, SnrStatus};

    fn t(name: &str, snr: f64, status: SnrStatus) -> TensorSnr {
        TensorSnr {
            name: name.to_string(),
            module: crate::snr::module_name(name).to_string(),
            layer_type: crate::snr::layer_type(name).to_string(),
            layer: crate::names::layer_of(name),
            dtype: "F32".into(),
            shape: vec![2, 2],
            matrix: [2, 2],
            result: MatrixSnr { snr, s_max: 1.0, sigma: 0.0, threshold: 0.0, n_signal: 1, ratio: snr, status },
        }
    }

    #[test]
    fn ranks_by_score_then_layer_order_and_selects_floor() {
        use SnrStatus::*;
        let scans = vec![
            t("m.layers.10.mlp.up.weight", 0.5, Ok),
            t("m.layers.2.mlp.up.weight", 0.5, Ok), // ties 10 and 9: layer order decides (2 < 9 < 10)
            t("m.layers.9.mlp.up.weight", 0.5, Ok),
            t("m.layers.3.mlp.up.weight", f64::INFINITY, NoiseZero),
            t("m.layers.4.mlp.up.weight", f64::NAN, AllZero),
            t("m.layers.0.mlp.up.weight", 0.7, Ok),
            t("m.layers.0.attn.q.weight", 0.1, Ok),
            t("m.layers.1.attn.q.weight", 0.2, Ok),
            t("lm_head.weight", 3.0, Ok),
        ];
        let sel = rank_and_select(&scans, 60.0, None);
        let types: Vec<&str> = sel.types.iter().map(|t| t.layer_type.as_str()).collect();
        assert_eq!(types, ["attn.q", "lm_head", "mlp.up"]);
        let mlp = &sel.types[2];
        let order: Vec<Option<usize>> = mlp.ranked.iter().map(|r| r.layer).collect();
        assert_eq!(order, [Some(3), Some(0), Some(2), Some(9), Some(10)]);
        assert_eq!(mlp.n_selected, 3); // floor(5 * 60 / 100)
        assert_eq!(mlp.unscored, ["m.layers.4.mlp.up.weight"]);
        assert_eq!(sel.types[0].n_selected, 1); // floor(2 * 0.6)
        assert_eq!(sel.types[1].n_selected, 0); // floor(1 * 0.6)
        assert_eq!(
            sel.selected_names(),
            [
                "m.layers.1.attn.q.weight",
                "m.layers.3.mlp.up.weight",
                "m.layers.0.mlp.up.weight",
                "m.layers.2.mlp.up.weight"
            ]
        );
        // Restricting to types keeps the others out entirely.
        let only = rank_and_select(&scans, 100.0, Some(&["lm_head".to_string()]));
        assert_eq!(only.selected_names(), ["lm_head.weight"]);
        // The order of the scan does not matter.
        let mut rev = scans.clone();
        rev.reverse();
        let a: Vec<String> = sel.selected_names();
        let b: Vec<String> = rank_and_select(&rev, 60.0, None).selected_names();
        assert_eq!(a, b);
    }

    #[test]
    fn spectrum_type_order_and_counts() {
        let mut types: Vec<String> = ["mlp.x", "mlp-a.b", "attn.q", "mlp.a"].iter().map(|s| s.to_string()).collect();
        sort_types(&mut types);
        // Grouped by first component ("attn" < "mlp" < "mlp-a"), then sorted: plain sorting would put mlp-a first.
        assert_eq!(types, ["attn.q", "mlp.a", "mlp.x", "mlp-a.b"]);
        assert_eq!(selected_count(28, 50.0), 14);
        assert_eq!(selected_count(28, 25.0), 7);
        assert_eq!(selected_count(3, 33.3), 0);
        assert_eq!(selected_count(10, 100.0), 10);
        assert_eq!(selected_count(7, 0.0), 0);
    }
}
