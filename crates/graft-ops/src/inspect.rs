//! What `graft inspect` reports about a checkpoint: per-tensor rows, a summary per layer type (Spectrum's rule, see
//! `names`), per-dtype totals and the metadata, as one serialisable record.

use std::collections::BTreeMap;

use regex::Regex;
use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::names::{layer_of, type_of};

#[derive(Debug, Serialize)]
pub struct TensorRow {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub params: u64,
    pub bytes: u64,
    pub layer: Option<usize>,
    #[serde(rename = "type")]
    pub layer_type: String,
}

#[derive(Debug, Serialize)]
pub struct TypeSummary {
    #[serde(rename = "type")]
    pub layer_type: String,
    pub tensors: usize,
    pub params: u64,
    pub bytes: u64,
    /// Layer indices this type occurs in (empty for names without one).
    pub layers: Vec<usize>,
}

#[derive(Debug, Default, Serialize)]
pub struct Totals {
    pub tensors: usize,
    pub params: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub path: String,
    pub files: Vec<String>,
    pub shards: usize,
    /// The `--filter` applied, if any; totals and summaries then cover the matching tensors only.
    pub filter: Option<String>,
    pub totals: Totals,
    pub dtypes: BTreeMap<String, Totals>,
    pub types: Vec<TypeSummary>,
    pub metadata: BTreeMap<String, String>,
    pub tensors: Vec<TensorRow>,
}

/// Builds the report of `ck`, restricted to tensors whose name matches `filter`.
pub fn report(ck: &Checkpoint, filter: Option<&Regex>) -> Report {
    let mut rows = Vec::new();
    let mut totals = Totals::default();
    let mut dtypes: BTreeMap<String, Totals> = BTreeMap::new();
    // Types in order of first appearance, as a reader scanning the model meets them.
    let mut types: Vec<TypeSummary> = Vec::new();
    let mut type_pos: BTreeMap<String, usize> = BTreeMap::new();
    for t in ck.infos() {
        if filter.is_some_and(|f| !f.is_match(&t.name)) {
            continue;
        }
        let params = t.numel() as u64;
        let bytes = t.nbytes() as u64;
        let layer = layer_of(&t.name);
        let ty = type_of(&t.name).to_string();
        totals.tensors += 1;
        totals.params += params;
        totals.bytes += bytes;
        let d = dtypes.entry(t.dtype.name().to_string()).or_default();
        d.tensors += 1;
        d.params += params;
        d.bytes += bytes;
        let pos = *type_pos.entry(ty.clone()).or_insert_with(|| {
            types.push(TypeSummary { layer_type: ty.clone(), tensors: 0, params: 0, bytes: 0, layers: Vec::new() });
            types.len() - 1
        });
        let s = &mut types[pos];
        s.tensors += 1;
        s.params += params;
        s.bytes += bytes;
        if let Some(l) = layer {
            if !s.layers.contains(&l) {
                s.layers.push(l);
            }
        }
        rows.push(TensorRow {
            name: t.name.clone(),
            dtype: t.dtype.name().to_string(),
            shape: t.shape.clone(),
            params,
            bytes,
            layer,
            layer_type: ty,
        });
    }
    for s in &mut types {
        s.layers.sort_unstable();
    }
    Report {
        path: ck.path().display().to_string(),
        files: ck.files().iter().map(|p| p.display().to_string()).collect(),
        shards: ck.shard_count(),
        filter: filter.map(|f| f.as_str().to_string()),
        totals,
        dtypes,
        types,
        metadata: ck.metadata().clone(),
        tensors: rows,
    }
}
