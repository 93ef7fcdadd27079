//! `graft similarity MODEL... --base BASE`: how the task vectors of several models relate. For each model: the L2
//! norm of its task vector and the fraction of exactly-zero entries; for each pair: the cosine similarity and the
//! sign agreement (among entries where both are non-zero, the fraction with the same sign). Over the whole model and,
//! on request, per layer index or per layer type (`names::layer_of`, `names::type_of`).
//!
//! Deltas are `fl32(model - base)`, the entries `graft diff` would write. Sums of squares and dot products accumulate
//! in f64: sequentially inside each fixed chunk of a tensor, then chunk partials in chunk order, tensors in the base's
//! storage order. Chunk boundaries never depend on the thread count, so every number is identical for any
//! `--threads`.
//!
//! Over a zoo, `similarity_pairs` computes chosen pairs only, each as the report of its two models: a pair's numbers
//! do not depend on which other pairs are computed alongside, so the pairs of a zoo can be split over processes.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use regex::Regex;
use serde::Serialize;

use super::delta;
use super::matching::{pair_all, Skipped};
use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::exec::{Executor, Read};
use crate::names::{layer_of, type_of};

/// How tensors are grouped in addition to the whole-model numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    /// Whole model only.
    #[default]
    Model,
    /// Per layer index (`names::layer_of`); tensors outside numbered layers form the group `none`.
    Layer,
    /// Per layer type (`names::type_of`).
    Type,
}

impl GroupBy {
    /// The group of tensor `name`: its label and, when grouping by layer, its layer index.
    pub fn key(self, name: &str) -> Option<(String, Option<usize>)> {
        match self {
            GroupBy::Model => None,
            GroupBy::Layer => Some(match layer_of(name) {
                Some(l) => (l.to_string(), Some(l)),
                None => ("none".to_string(), None),
            }),
            GroupBy::Type => Some((type_of(name).to_string(), None)),
        }
    }
}

/// Partial sums that can be combined; combining in a fixed order keeps results thread-count independent.
pub(crate) trait Partial: Send {
    fn merge(&mut self, other: &Self);
}

/// Reduces each of `numels.len()` tensors chunk by chunk (`chunk(tensor, range)`, chunks computed in parallel) and
/// returns one partial per tensor, chunk partials combined in chunk order.
pub(crate) fn reduce_tensors<A, E, F>(
    exec: &Executor,
    numels: &[usize],
    label: &str,
    empty: E,
    chunk: F,
) -> Result<Vec<A>>
where
    A: Partial,
    E: Fn() -> A + Sync,
    F: Fn(usize, Range<usize>) -> Result<A> + Sync,
{
    let costs: Vec<u64> = numels.iter().map(|&n| n as u64).collect();
    let mut out = Vec::with_capacity(numels.len());
    exec.map_ordered(
        &costs,
        crate::exec::WINDOW_BYTES / 4,
        label,
        |i| {
            let parts = exec.chunked(numels[i], |r| chunk(i, r))?;
            let mut acc = empty();
            for p in &parts {
                acc.merge(p);
            }
            Ok(acc)
        },
        |_, a| {
            out.push(a);
            Ok(())
        },
    )?;
    Ok(out)
}

/// The summed partials of one group of tensors.
#[derive(Clone, Debug)]
pub(crate) struct Group<A> {
    pub label: String,
    pub layer: Option<usize>,
    pub tensors: usize,
    pub sums: A,
}

/// Groups per-tensor partials: the whole-model total and, unless `by` is `Model`, one total per group (layers in
/// ascending order with `none` last, types in order of first appearance).
pub(crate) fn group<A: Partial + Clone>(
    names: &[String],
    parts: &[A],
    by: GroupBy,
    empty: impl Fn() -> A,
) -> (A, Vec<Group<A>>) {
    let mut total = empty();
    let mut groups: Vec<Group<A>> = Vec::new();
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    for (name, p) in names.iter().zip(parts) {
        total.merge(p);
        if let Some((label, layer)) = by.key(name) {
            let g = *index.entry(label.clone()).or_insert_with(|| {
                groups.push(Group { label, layer, tensors: 0, sums: empty() });
                groups.len() - 1
            });
            groups[g].tensors += 1;
            groups[g].sums.merge(p);
        }
    }
    if by == GroupBy::Layer {
        groups.sort_by_key(|g| (g.layer.is_none(), g.layer));
    }
    (total, groups)
}

/// The cosine of two vectors from their dot product and squared norms; None when either vector is zero.
///
/// `dot / sqrt(nx * ny)` rather than `dot / (sqrt(nx) * sqrt(ny))`: with correctly rounded arithmetic
/// `sqrt(fl(n * n)) == n`, so a vector's cosine with itself (or with a positive multiple by a power of two) comes out
/// exactly 1.
pub fn cosine(dot: f64, nx: f64, ny: f64) -> Option<f64> {
    if nx == 0.0 || ny == 0.0 || nx.is_nan() || ny.is_nan() {
        return None;
    }
    let p = nx * ny;
    let c = if p.is_finite() && p >= f64::MIN_POSITIVE { dot / p.sqrt() } else { dot / (nx.sqrt() * ny.sqrt()) };
    Some(c.clamp(-1.0, 1.0))
}

/// Sums over a set of elements of `n` task vectors.
#[derive(Clone, Debug, PartialEq)]
pub struct Sums {
    pub count: u64,
    /// Per model: sum of squares.
    pub sumsq: Vec<f64>,
    /// Per model: entries exactly zero.
    pub zeros: Vec<u64>,
    /// The pairs of models compared (every i < j, row by row, unless chosen); shared by a tensor's partials.
    pub pairs: Arc<[(usize, usize)]>,
    /// Per pair: dot product.
    pub dot: Vec<f64>,
    /// Per pair: entries where both are non-zero with the same sign.
    pub same_sign: Vec<u64>,
    /// Per pair: entries where both are non-zero.
    pub both_nonzero: Vec<u64>,
}

impl Sums {
    /// Sums of `models` task vectors and every pair of them.
    pub fn new(models: usize) -> Self {
        Self::with_pairs(models, (0..models).flat_map(|i| (i + 1..models).map(move |j| (i, j))).collect())
    }

    /// Sums of `models` task vectors and the pairs `pairs` of them only.
    pub fn with_pairs(models: usize, pairs: Arc<[(usize, usize)]>) -> Self {
        let n = pairs.len();
        Sums {
            count: 0,
            sumsq: vec![0.0; models],
            zeros: vec![0; models],
            pairs,
            dot: vec![0.0; n],
            same_sign: vec![0; n],
            both_nonzero: vec![0; n],
        }
    }

    /// The sums of pair `p` alone, as those of a comparison of its two models.
    pub fn of_pair(&self, p: usize) -> Sums {
        let (i, j) = self.pairs[p];
        Sums {
            count: self.count,
            sumsq: vec![self.sumsq[i], self.sumsq[j]],
            zeros: vec![self.zeros[i], self.zeros[j]],
            pairs: Arc::from([(0, 1)]),
            dot: vec![self.dot[p]],
            same_sign: vec![self.same_sign[p]],
            both_nonzero: vec![self.both_nonzero[p]],
        }
    }

    pub fn models(&self) -> usize {
        self.sumsq.len()
    }

    /// Adds one chunk: `deltas[m]` holds model m's entries (all the same length).
    pub fn add(&mut self, deltas: &[&[f32]]) {
        let n = deltas.len();
        debug_assert_eq!(n, self.models());
        if let Some(first) = deltas.first() {
            self.count += first.len() as u64;
        }
        for (m, d) in deltas.iter().enumerate() {
            let mut s = 0f64;
            let mut z = 0u64;
            for &x in d.iter() {
                s += x as f64 * x as f64;
                z += (x == 0.0) as u64;
            }
            self.sumsq[m] += s;
            self.zeros[m] += z;
        }
        for (p, &(i, j)) in self.pairs.iter().enumerate() {
            let (mut dot, mut same, mut both) = (0f64, 0u64, 0u64);
            for (&x, &y) in deltas[i].iter().zip(deltas[j].iter()) {
                dot += x as f64 * y as f64;
                let nz = x != 0.0 && y != 0.0;
                both += nz as u64;
                same += (nz && (x > 0.0) == (y > 0.0)) as u64;
            }
            self.dot[p] += dot;
            self.same_sign[p] += same;
            self.both_nonzero[p] += both;
        }
    }
}

impl Partial for Sums {
    fn merge(&mut self, o: &Self) {
        self.count += o.count;
        for (a, b) in self.sumsq.iter_mut().zip(&o.sumsq) {
            *a += b;
        }
        for (a, b) in self.zeros.iter_mut().zip(&o.zeros) {
            *a += b;
        }
        for (a, b) in self.dot.iter_mut().zip(&o.dot) {
            *a += b;
        }
        for (a, b) in self.same_sign.iter_mut().zip(&o.same_sign) {
            *a += b;
        }
        for (a, b) in self.both_nonzero.iter_mut().zip(&o.both_nonzero) {
            *a += b;
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ModelStats {
    /// Index into the report's `models`.
    pub model: usize,
    pub l2_norm: f64,
    pub zeros: u64,
    /// `zeros / params`; null for an empty group.
    pub zero_fraction: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PairStats {
    pub a: usize,
    pub b: usize,
    pub dot: f64,
    /// Null when either task vector is zero on this group.
    pub cosine: Option<f64>,
    /// Entries where both are non-zero.
    pub both_nonzero: u64,
    /// Among `both_nonzero` entries, the fraction with the same sign; null when there are none.
    pub sign_agreement: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct GroupStats {
    /// `all` for the whole model, else the layer index (`none` outside numbered layers) or the layer type.
    pub group: String,
    /// The layer index, for groups of `--by layer` that have one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer: Option<usize>,
    pub tensors: usize,
    pub params: u64,
    pub models: Vec<ModelStats>,
    /// The full cosine matrix (`cosine[i][j]`), null where a task vector is zero.
    pub cosine: Vec<Vec<Option<f64>>>,
    pub pairs: Vec<PairStats>,
}

impl GroupStats {
    pub fn from_sums(group: String, layer: Option<usize>, tensors: usize, s: &Sums) -> Self {
        let n = s.models();
        let frac = |k: u64, of: u64| if of == 0 { None } else { Some(k as f64 / of as f64) };
        let models = (0..n)
            .map(|m| ModelStats {
                model: m,
                l2_norm: s.sumsq[m].sqrt(),
                zeros: s.zeros[m],
                zero_fraction: frac(s.zeros[m], s.count),
            })
            .collect();
        let pairs: Vec<PairStats> = s
            .pairs
            .iter()
            .copied()
            .enumerate()
            .map(|(p, (i, j))| PairStats {
                a: i,
                b: j,
                dot: s.dot[p],
                cosine: cosine(s.dot[p], s.sumsq[i], s.sumsq[j]),
                both_nonzero: s.both_nonzero[p],
                sign_agreement: frac(s.same_sign[p], s.both_nonzero[p]),
            })
            .collect();
        let mut cos = vec![vec![None; n]; n];
        for (i, row) in cos.iter_mut().enumerate() {
            row[i] = cosine(s.sumsq[i], s.sumsq[i], s.sumsq[i]);
        }
        for p in &pairs {
            cos[p.a][p.b] = p.cosine;
            cos[p.b][p.a] = p.cosine;
        }
        GroupStats { group, layer, tensors, params: s.count, models, cosine: cos, pairs }
    }
}

#[derive(Clone, Debug, Default)]
pub struct SimilarityOptions {
    pub by: GroupBy,
    /// Tensors whose name matches are left out.
    pub exclude: Option<Regex>,
    /// Skip tensors that do not pair with the base instead of failing.
    pub allow_missing: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct SimilarityReport {
    pub base: String,
    pub models: Vec<String>,
    pub by: GroupBy,
    pub exclude: Option<String>,
    /// Float tensors compared.
    pub tensors: usize,
    pub params: u64,
    /// Non-float tensors, left out.
    pub skipped_nonfloat: Vec<String>,
    /// Tensors matching `exclude`, left out.
    pub excluded: Vec<String>,
    /// Tensors that do not pair with the base, left out under `allow_missing`.
    pub skipped_mismatched: Vec<Skipped>,
    pub total: GroupStats,
    /// Per layer or per layer type; empty when `by` is `model`.
    pub groups: Vec<GroupStats>,
}

/// Float tensors of `names` (paired with `base`) split into used, non-float and excluded.
pub(crate) fn select(
    base: &Checkpoint,
    names: Vec<String>,
    exclude: Option<&Regex>,
) -> (Vec<String>, Vec<String>, Vec<String>) {
    let (mut used, mut nonfloat, mut excluded) = (Vec::new(), Vec::new(), Vec::new());
    for n in names {
        if !base.info(&n).is_some_and(|t| t.dtype.is_float()) {
            nonfloat.push(n);
        } else if exclude.is_some_and(|r| r.is_match(&n)) {
            excluded.push(n);
        } else {
            used.push(n);
        }
    }
    (used, nonfloat, excluded)
}

/// Compares the task vectors of `models` against `base`.
pub fn similarity(
    base: &Checkpoint,
    models: &[&Checkpoint],
    opts: &SimilarityOptions,
    exec: &Executor,
) -> Result<SimilarityReport> {
    let pairing = pair_all(base, models, opts.allow_missing)?;
    let (used, skipped_nonfloat, excluded) = select(base, pairing.common, opts.exclude.as_ref());
    let n = models.len();
    let numels: Vec<usize> = used.iter().map(|name| base.info(name).map_or(0, |t| t.numel())).collect();
    let parts = reduce_tensors(
        exec,
        &numels,
        "similarity",
        || Sums::new(n),
        |i, r| {
            let b = Read::new(base, &used[i])?.take_f32(r.clone())?;
            let mut deltas = Vec::with_capacity(n);
            for m in models {
                deltas.push(delta(&Read::new(m, &used[i])?.take_f32(r.clone())?, &b));
            }
            let mut s = Sums::new(n);
            s.add(&deltas.iter().map(Vec::as_slice).collect::<Vec<_>>());
            Ok(s)
        },
    )?;
    let (total, groups) = group(&used, &parts, opts.by, || Sums::new(n));
    Ok(SimilarityReport {
        base: base.path().display().to_string(),
        models: models.iter().map(|m| m.path().display().to_string()).collect(),
        by: opts.by,
        exclude: opts.exclude.as_ref().map(|r| r.as_str().to_string()),
        tensors: used.len(),
        params: total.count,
        skipped_nonfloat,
        excluded,
        skipped_mismatched: pairing.skipped,
        total: GroupStats::from_sums("all".into(), None, used.len(), &total),
        groups: groups.into_iter().map(|g| GroupStats::from_sums(g.label, g.layer, g.tensors, &g.sums)).collect(),
    })
}

/// Compares the task vectors of the pairs `pairs` (indices into `models`, `a < b`) of a zoo, each pair as its own
/// report of two models. Every pair compares the tensors that all of `models` pair with the base (so the pairs of a
/// zoo are comparable, and with `allow_missing` every report lists the zoo's mismatches); only models in some pair
/// are read. A pair's report is bit-identical to that of `similarity` over its two models when those pair with the
/// base over the same tensors, and never depends on the other pairs computed alongside.
pub fn similarity_pairs(
    base: &Checkpoint,
    models: &[&Checkpoint],
    pairs: &[(usize, usize)],
    opts: &SimilarityOptions,
    exec: &Executor,
) -> Result<Vec<SimilarityReport>> {
    let pairing = pair_all(base, models, opts.allow_missing)?;
    let (used, skipped_nonfloat, excluded) = select(base, pairing.common, opts.exclude.as_ref());
    let mut read: Vec<usize> = pairs.iter().flat_map(|&(a, b)| [a, b]).collect();
    read.sort_unstable();
    read.dedup();
    let local = |m: usize| read.binary_search(&m).expect("read lists every model of a pair");
    let local_pairs: Arc<[(usize, usize)]> = pairs.iter().map(|&(a, b)| (local(a), local(b))).collect();
    let empty = || Sums::with_pairs(read.len(), local_pairs.clone());
    let numels: Vec<usize> = used.iter().map(|name| base.info(name).map_or(0, |t| t.numel())).collect();
    let parts = reduce_tensors(exec, &numels, "similarity", empty, |i, r| {
        let b = Read::new(base, &used[i])?.take_f32(r.clone())?;
        let mut deltas = Vec::with_capacity(read.len());
        for &m in &read {
            deltas.push(delta(&Read::new(models[m], &used[i])?.take_f32(r.clone())?, &b));
        }
        let mut s = empty();
        s.add(&deltas.iter().map(Vec::as_slice).collect::<Vec<_>>());
        Ok(s)
    })?;
    let (total, groups) = group(&used, &parts, opts.by, empty);
    let name = |m: usize| models[m].path().display().to_string();
    Ok(pairs
        .iter()
        .enumerate()
        .map(|(p, &(a, b))| SimilarityReport {
            base: base.path().display().to_string(),
            models: vec![name(a), name(b)],
            by: opts.by,
            exclude: opts.exclude.as_ref().map(|r| r.as_str().to_string()),
            tensors: used.len(),
            params: total.count,
            skipped_nonfloat: skipped_nonfloat.clone(),
            excluded: excluded.clone(),
            skipped_mismatched: pairing.skipped.clone(),
            total: GroupStats::from_sums("all".into(), None, used.len(), &total.of_pair(p)),
            groups: groups
                .iter()
                .map(|g| GroupStats::from_sums(g.label.clone(), g.layer, g.tensors, &g.sums.of_pair(p)))
                .collect(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn sums(vs: &[&[f32]]) -> Sums {
        let mut s = Sums::new(vs.len());
        s.add(vs);
        s
    }

    fn randn(seed: u64, n: usize) -> Vec<f32> {
        let mut r = Rng::new(seed);
        (0..n).map(|_| r.normal() as f32 * 0.01).collect()
    }

    #[test]
    fn cosine_with_itself_negation_and_orthogonal_construction() {
        let v = randn(1, 10_001);
        let neg: Vec<f32> = v.iter().map(|x| -x).collect();
        // Rotate each pair (x, y) to (-y, x): every pair contributes -xy + yx = 0 to the dot product.
        let mut orth = v.clone();
        for k in (0..v.len() - 1).step_by(2) {
            orth[k] = -v[k + 1];
            orth[k + 1] = v[k];
        }
        *orth.last_mut().unwrap() = 0.0;
        let s = sums(&[&v, &neg, &orth]);
        let g = GroupStats::from_sums("all".into(), None, 1, &s);
        assert!((g.cosine[0][0].unwrap() - 1.0).abs() <= 1e-12);
        assert!((g.cosine[0][1].unwrap() + 1.0).abs() <= 1e-12);
        assert!(g.cosine[0][2].unwrap().abs() <= 1e-12);
        // The construction makes these exact, not merely close.
        assert_eq!(g.cosine[0][0], Some(1.0));
        assert_eq!(g.cosine[0][1], Some(-1.0));
        assert_eq!(g.pairs[0].sign_agreement, Some(0.0));
    }

    #[test]
    fn sums_match_a_plain_f64_reference() {
        let a = randn(2, 3000);
        let mut b = randn(3, 3000);
        b[..100].iter_mut().for_each(|x| *x = 0.0);
        let s = sums(&[&a, &b]);
        let (mut dot, mut na, mut nb, mut same, mut both) = (0f64, 0f64, 0f64, 0u64, 0u64);
        for i in 0..a.len() {
            let (x, y) = (a[i] as f64, b[i] as f64);
            dot += x * y;
            na += x * x;
            nb += y * y;
            if x != 0.0 && y != 0.0 {
                both += 1;
                if x.signum() == y.signum() {
                    same += 1;
                }
            }
        }
        let g = GroupStats::from_sums("all".into(), None, 1, &s);
        let want = dot / (na.sqrt() * nb.sqrt());
        assert!((g.pairs[0].cosine.unwrap() - want).abs() < 1e-12);
        assert!((g.models[0].l2_norm - na.sqrt()).abs() < 1e-12 * na.sqrt());
        assert_eq!(g.models[1].zeros, 100);
        assert_eq!(g.models[1].zero_fraction, Some(100.0 / 3000.0));
        assert_eq!((g.pairs[0].both_nonzero, s.same_sign[0]), (both, same));
    }

    #[test]
    fn chosen_pairs_equal_the_same_pairs_of_all_and_of_two() {
        let vs: Vec<Vec<f32>> = (0..4).map(|k| randn(10 + k, 777)).collect();
        let all = sums(&vs.iter().map(Vec::as_slice).collect::<Vec<_>>());
        let chosen = Arc::from([(2, 3), (0, 2)]);
        let mut some = Sums::with_pairs(4, chosen);
        some.add(&vs.iter().map(Vec::as_slice).collect::<Vec<_>>());
        // Pair (0, 2) is pair 1 of all's row-by-row order, (2, 3) pair 5.
        for (p, q, (i, j)) in [(0, 5, (2, 3)), (1, 1, (0, 2))] {
            let alone = sums(&[&vs[i], &vs[j]]);
            assert_eq!(some.of_pair(p), alone, "chosen pair {p}");
            assert_eq!(all.of_pair(q), alone, "pair {q} of all");
        }
    }

    #[test]
    fn zero_vectors_have_no_cosine() {
        let z = vec![0f32; 10];
        let v = randn(4, 10);
        let g = GroupStats::from_sums("all".into(), None, 1, &sums(&[&z, &v]));
        assert_eq!(g.pairs[0].cosine, None);
        assert_eq!(g.pairs[0].sign_agreement, None);
        assert_eq!(g.models[0].zero_fraction, Some(1.0));
    }

    #[test]
    fn merging_partials_equals_one_pass_up_to_rounding() {
        let a = randn(5, 5000);
        let b = randn(6, 5000);
        let whole = sums(&[&a, &b]);
        let mut parts = sums(&[&a[..1234], &b[..1234]]);
        parts.merge(&sums(&[&a[1234..], &b[1234..]]));
        assert_eq!(parts.count, whole.count);
        assert_eq!(parts.zeros, whole.zeros);
        assert!((parts.dot[0] - whole.dot[0]).abs() < 1e-15);
    }

    #[test]
    fn grouping_orders_layers_and_types() {
        let names: Vec<String> = ["lm_head.weight", "model.layers.10.mlp.weight", "model.layers.2.mlp.weight"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let parts: Vec<Sums> = (0..3).map(|k| sums(&[&[k as f32 + 1.0]])).collect();
        let (total, groups) = group(&names, &parts, GroupBy::Layer, || Sums::new(1));
        assert_eq!(total.sumsq[0], 1.0 + 4.0 + 9.0);
        let labels: Vec<&str> = groups.iter().map(|g| g.label.as_str()).collect();
        assert_eq!(labels, ["2", "10", "none"]);
        let (_, groups) = group(&names, &parts, GroupBy::Type, || Sums::new(1));
        let labels: Vec<(&str, usize)> = groups.iter().map(|g| (g.label.as_str(), g.tensors)).collect();
        assert_eq!(labels, [("lm_head.weight", 1), ("mlp.weight", 2)]);
        assert!(group(&names, &parts, GroupBy::Model, || Sums::new(1)).1.is_empty());
    }
}
