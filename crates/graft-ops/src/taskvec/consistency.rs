//! The consistency analysis of a merge: with deltas dA, dB, dM of experts A, B and merge M against the base,
//! `recover_a = cos(dM - dB, dA - dB)` and `recover_b = cos(dM - dA, dB - dA)` (how well taking one expert out of
//! the merge points back at the other), and their mean. Over every float tensor and over a selected subset (a name
//! pattern, or the merged tensors `graft merge` records in its output's metadata under `MERGED_TENSORS`).
//!
//! The base cancels: dM - dB = M - B and dA - dB = A - B. The differences are therefore taken directly between the
//! models' values, in f64, where the difference of two f32 values is exact (short of exponents 29 binades apart);
//! going through f32 deltas would only add roundings. The base is still required: every tensor is checked against
//! it, and it decides which tensors are float.
//!
//! Non-float tensors never take part: integer buffers such as `num_batches_tracked` are counters, not weights, and
//! in the reference study they dominated this number.
//!
//! For a LERP merge with weights 1/2, M = (A + B)/2, so M - B = (A - B)/2 and M - A = (B - A)/2: both cosines are
//! exactly 1. Numerically too, when the merge is stored exactly (an F32 merge of BF16 experts, say): the sums of
//! `x*y` and `x*x` are then the sum of `y*y` scaled by 1/2 and 1/4 (powers of two scale through every rounding), and
//! `cosine` divides by `sqrt(nx * ny)`, which returns the norm exactly.

use std::collections::HashSet;

use regex::Regex;
use serde::Serialize;

use super::matching::{pair_all, Skipped};
use super::similarity::{cosine, group, reduce_tensors, select, GroupBy, Partial};
use super::{name_list, MERGED_TENSORS};
use crate::checkpoint::Checkpoint;
use crate::error::{Arg, Error, Result};
use crate::exec::{Executor, Read};

/// The sums behind both cosines over a set of elements, with `xa = M - B`, `ya = A - B`, `xb = M - A` and
/// `yb = B - A = -ya` (so `|yb|^2 = |ya|^2`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConsistencySums {
    pub count: u64,
    pub xa_ya: f64,
    pub xa_xa: f64,
    pub ya_ya: f64,
    pub xb_yb: f64,
    pub xb_xb: f64,
}

impl ConsistencySums {
    /// Adds one chunk of the values of A, B and M (or of their deltas: a common offset cancels).
    pub fn add(&mut self, a: &[f32], b: &[f32], m: &[f32]) {
        let (mut xa_ya, mut xa_xa, mut ya_ya, mut xb_yb, mut xb_xb) = (0f64, 0f64, 0f64, 0f64, 0f64);
        for ((&a, &b), &m) in a.iter().zip(b).zip(m) {
            let (a, b, m) = (a as f64, b as f64, m as f64);
            let (xa, ya) = (m - b, a - b);
            let (xb, yb) = (m - a, b - a);
            xa_ya += xa * ya;
            xa_xa += xa * xa;
            ya_ya += ya * ya;
            xb_yb += xb * yb;
            xb_xb += xb * xb;
        }
        self.count += a.len() as u64;
        self.xa_ya += xa_ya;
        self.xa_xa += xa_xa;
        self.ya_ya += ya_ya;
        self.xb_yb += xb_yb;
        self.xb_xb += xb_xb;
    }

    pub fn recover_a(&self) -> Option<f64> {
        cosine(self.xa_ya, self.xa_xa, self.ya_ya)
    }

    pub fn recover_b(&self) -> Option<f64> {
        cosine(self.xb_yb, self.xb_xb, self.ya_ya)
    }
}

impl Partial for ConsistencySums {
    fn merge(&mut self, o: &Self) {
        self.count += o.count;
        self.xa_ya += o.xa_ya;
        self.xa_xa += o.xa_xa;
        self.ya_ya += o.ya_ya;
        self.xb_yb += o.xb_yb;
        self.xb_xb += o.xb_xb;
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ConsistencyStats {
    /// `all`, `selected`, or the layer index / layer type of a group.
    pub group: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<usize>,
    pub tensors: usize,
    pub params: u64,
    /// cos(dM - dB, dA - dB); null when either side is zero.
    pub recover_a: Option<f64>,
    /// cos(dM - dA, dB - dA); null when either side is zero.
    pub recover_b: Option<f64>,
    /// The mean of the two; null when either is.
    pub mean: Option<f64>,
}

impl ConsistencyStats {
    pub fn from_sums(group: String, layer: Option<usize>, tensors: usize, s: &ConsistencySums) -> Self {
        let (a, b) = (s.recover_a(), s.recover_b());
        let mean = a.zip(b).map(|(a, b)| (a + b) / 2.0);
        ConsistencyStats { group, layer, tensors, params: s.count, recover_a: a, recover_b: b, mean }
    }
}

/// Which tensors form the selected subset.
#[derive(Clone, Debug, Default)]
pub enum Selection {
    /// No subset: only the all-tensors numbers.
    #[default]
    None,
    /// Tensors whose name matches.
    Only(Regex),
    /// The tensors the merged checkpoint lists under `MERGED_TENSORS`.
    OnlyMerged,
}

#[derive(Clone, Debug, Default)]
pub struct ConsistencyOptions {
    pub selection: Selection,
    /// Tensors whose name matches are left out of everything.
    pub exclude: Option<Regex>,
    /// Groups reported over the selected subset (over all tensors when there is no selection).
    pub by: GroupBy,
    pub allow_missing: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct ConsistencyReport {
    pub base: String,
    pub merged: String,
    pub experts: [String; 2],
    /// `all`, `only`, or `only_merged`.
    pub selection: String,
    /// The `--only` pattern.
    pub pattern: Option<String>,
    pub exclude: Option<String>,
    pub by: GroupBy,
    pub skipped_nonfloat: Vec<String>,
    pub excluded: Vec<String>,
    pub skipped_mismatched: Vec<Skipped>,
    /// Every float tensor not excluded.
    pub all: ConsistencyStats,
    /// The selected subset (absent without `--only` / `--only-merged`).
    pub selected: Option<ConsistencyStats>,
    pub groups: Vec<ConsistencyStats>,
}

/// The tensor names a merge output lists under `MERGED_TENSORS`.
pub fn merged_tensors(merged: &Checkpoint) -> Result<Vec<String>> {
    let raw = merged.metadata().get(MERGED_TENSORS).ok_or_else(|| {
        Error::format(
            merged.path(),
            format!(
                "no '{MERGED_TENSORS}' entry in the metadata (graft merge records the merged tensors there); \
                 select tensors with {} REGEX instead",
                Arg::Only
            ),
        )
    })?;
    let names: Vec<String> = serde_json::from_str(raw).map_err(|e| {
        Error::format(merged.path(), format!("metadata '{MERGED_TENSORS}' is not a JSON array of tensor names: {e}"))
    })?;
    let unknown: Vec<&String> = names.iter().filter(|n| !merged.contains(n)).collect();
    if !unknown.is_empty() {
        return Err(Error::format(
            merged.path(),
            format!(
                "metadata '{MERGED_TENSORS}' lists {} tensor(s) the checkpoint does not hold ({})",
                unknown.len(),
                name_list(&unknown.iter().map(|s| s.as_str()).collect::<Vec<_>>())
            ),
        ));
    }
    Ok(names)
}

/// Runs the consistency analysis of `merged` against experts `a`, `b` and their common `base`.
pub fn consistency(
    base: &Checkpoint,
    merged: &Checkpoint,
    a: &Checkpoint,
    b: &Checkpoint,
    opts: &ConsistencyOptions,
    exec: &Executor,
) -> Result<ConsistencyReport> {
    let wanted: Option<HashSet<String>> = match &opts.selection {
        Selection::None => None,
        Selection::Only(r) => Some(base.names().filter(|n| r.is_match(n)).map(str::to_string).collect()),
        Selection::OnlyMerged => Some(merged_tensors(merged)?.into_iter().collect()),
    };
    let pairing = pair_all(base, &[a, b, merged], opts.allow_missing)?;
    let (used, skipped_nonfloat, excluded) = select(base, pairing.common, opts.exclude.as_ref());
    let numels: Vec<usize> = used.iter().map(|name| base.info(name).map_or(0, |t| t.numel())).collect();
    let parts = reduce_tensors(exec, &numels, "consistency", ConsistencySums::default, |i, r| {
        let mut d = Vec::with_capacity(3);
        for ck in [a, b, merged] {
            d.push(Read::new(ck, &used[i])?.take_f32(r.clone())?);
        }
        let mut s = ConsistencySums::default();
        s.add(&d[0], &d[1], &d[2]);
        Ok(s)
    })?;

    let (all, all_groups) = group(&used, &parts, opts.by, ConsistencySums::default);
    let (selected, groups) = match &wanted {
        None => (None, all_groups),
        Some(w) => {
            let (names, sel): (Vec<String>, Vec<ConsistencySums>) =
                used.iter().zip(&parts).filter(|(n, _)| w.contains(*n)).map(|(n, p)| (n.clone(), p.clone())).unzip();
            let (total, groups) = group(&names, &sel, opts.by, ConsistencySums::default);
            (Some(ConsistencyStats::from_sums("selected".into(), None, names.len(), &total)), groups)
        }
    };
    let (selection, pattern) = match &opts.selection {
        Selection::None => ("all", None),
        Selection::Only(r) => ("only", Some(r.as_str().to_string())),
        Selection::OnlyMerged => ("only_merged", None),
    };
    Ok(ConsistencyReport {
        base: base.path().display().to_string(),
        merged: merged.path().display().to_string(),
        experts: [a.path().display().to_string(), b.path().display().to_string()],
        selection: selection.to_string(),
        pattern,
        exclude: opts.exclude.as_ref().map(|r| r.as_str().to_string()),
        by: opts.by,
        skipped_nonfloat,
        excluded,
        skipped_mismatched: pairing.skipped,
        all: ConsistencyStats::from_sums("all".into(), None, used.len(), &all),
        selected,
        groups: groups.into_iter().map(|g| ConsistencyStats::from_sums(g.label, g.layer, g.tensors, &g.sums)).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn half_half_lerp_is_exactly_consistent() {
        let mut r = Rng::new(3);
        let da: Vec<f32> = (0..5000).map(|_| (r.normal() * 0.01) as f32).collect();
        let db: Vec<f32> = (0..5000).map(|_| (r.normal() * 0.01) as f32).collect();
        // (a + b) / 2 in f64 then f32: exact here because a and b share a scale and f32 keeps 24 bits, the sum 25;
        // verify rather than assume.
        let dm: Vec<f32> = da.iter().zip(&db).map(|(a, b)| ((*a as f64 + *b as f64) / 2.0) as f32).collect();
        let exact = da.iter().zip(&db).zip(&dm).all(|((a, b), m)| (*a as f64 + *b as f64) / 2.0 == *m as f64);
        let mut s = ConsistencySums::default();
        s.add(&da, &db, &dm);
        if exact {
            assert_eq!(s.recover_a(), Some(1.0));
            assert_eq!(s.recover_b(), Some(1.0));
        }
        assert!((s.recover_a().unwrap() - 1.0).abs() < 1e-12);
        assert!((s.recover_b().unwrap() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn exactly_representable_lerp_gives_exactly_one() {
        // Multiples of 2^-10 with small numerators: every sum and half is exact.
        let da: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32 - 50.0) / 1024.0).collect();
        let db: Vec<f32> = (0..1000).map(|i| ((i * 53 % 97) as f32 - 48.0) / 1024.0).collect();
        let dm: Vec<f32> = da.iter().zip(&db).map(|(a, b)| (a + b) / 2.0).collect();
        let mut s = ConsistencySums::default();
        s.add(&da, &db, &dm);
        let st = ConsistencyStats::from_sums("all".into(), None, 1, &s);
        assert_eq!((st.recover_a, st.recover_b, st.mean), (Some(1.0), Some(1.0), Some(1.0)));
    }

    #[test]
    fn hand_computed_values() {
        // dA = (1, 0), dB = (0, 1), dM = (0.5, 1):
        // xa = M - B = (0.5, 0), ya = A - B = (1, -1): cos = 0.5 / (0.5 * sqrt 2) = 1/sqrt 2.
        // xb = M - A = (-0.5, 1), yb = B - A = (-1, 1): cos = 1.5 / (sqrt(1.25) * sqrt 2).
        let mut s = ConsistencySums::default();
        s.add(&[1.0, 0.0], &[0.0, 1.0], &[0.5, 1.0]);
        let st = ConsistencyStats::from_sums("all".into(), None, 1, &s);
        assert!((st.recover_a.unwrap() - 1.0 / 2f64.sqrt()).abs() < 1e-15);
        let want_b = 1.5 / (1.25f64.sqrt() * 2f64.sqrt());
        assert!((st.recover_b.unwrap() - want_b).abs() < 1e-15);
        assert!((st.mean.unwrap() - (1.0 / 2f64.sqrt() + want_b) / 2.0).abs() < 1e-15);
        // M equal to the base: dM = 0, xa = -dB.
        let mut z = ConsistencySums::default();
        z.add(&[1.0, 0.0], &[0.0, 1.0], &[0.0, 0.0]);
        assert!((z.recover_a().unwrap() - 1.0 / 2f64.sqrt()).abs() < 1e-15);
    }
}
