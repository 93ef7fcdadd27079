//! TIES merging, two variants, registered as two methods.
//!
//! - `ties` (mergekit's rule): generalized task arithmetic with magnitude trimming per tensor (exactly
//!   `max(1, int(density * n))` largest-magnitude entries of each task vector), sign election from the weighted sum
//!   of the trimmed task vectors (zero counts as +), disjoint merge `sum w_i d_i mask_i / sum w_i mask_i` over the
//!   entries agreeing with the elected sign, `normalize` true by default, then `base + lambda * merged`.
//! - `ties_paper` (the TIES paper's reference code; `--ties-variant paper` selects it): each task vector (times its weight) is trimmed globally, over all
//!   merged tensors flattened together, keeping the entries whose magnitude is at least the
//!   `(n - int(density * n))`-th smallest (ties included); the sign of each entry is that of the sum of the trimmed
//!   vectors, where that sum is zero the sign of the sum of all elected signs ("majority"); the merge is the mean over
//!   the entries whose sign agrees (nonzero entries only); result `base + lambda * merged`. The global thresholds and
//!   the majority sign are gathered by `paper_stats` in chunked passes before streaming (the method's `GlobalPass`).
//!
//! Both record themselves as `ties` in the output's metadata, with `ties_variant` telling which.

use std::any::Any;
use std::ops::Range;
use std::sync::Arc;

use super::method::{Contract, Ctx, GlobalPass, Kernel, MergeMethod, Recorded, TensorInputs};
use super::params::{Default, Kind, ParamDef, Scope, TensorParams};
use super::rank::{self, key};
use super::scratch::Buf;
use super::sparsify;
use super::task_arithmetic::{gta_params, Consensus, Gta, Sparsification};
use crate::error::{Error, Result};
use crate::exec::Executor;

pub const TIES_GTA: Gta = Gta {
    name: "ties",
    about: "TIES: trim task vectors by magnitude, elect signs, disjoint merge",
    sparsification: Sparsification::Magnitude,
    consensus: Consensus::Sum,
    params: gta_params!(true, false),
};

/// TIES with mergekit's per-tensor trim.
pub struct Ties;

/// TIES as in the paper's reference code: one global trim over the whole model.
pub struct TiesPaper;

/// Global statistics of the paper variant.
#[derive(Clone, Debug)]
pub struct PaperStats {
    /// Per non-base input (in input order): the magnitude key from which entries are kept (None: keep all).
    pub thresholds: Vec<Option<u32>>,
    /// The sign given where the trimmed sum is exactly zero.
    pub majority: f32,
}

/// The per-tensor inputs of a paper-variant merge: inputs and resolved parameters of every merged tensor.
pub type PaperTensor<'a> = (TensorInputs<'a>, TensorParams);

/// Weighted, trimmed task vectors of one tensor over `range` (threshold None keeps all).
fn trimmed(
    inputs: &TensorInputs,
    weights: &[f32],
    thresholds: &[Option<u32>],
    range: Range<usize>,
) -> Result<Vec<Buf>> {
    let base_i = inputs.base_index()?;
    let b = inputs.read(base_i, range.clone())?;
    inputs
        .non_base()
        .iter()
        .enumerate()
        .map(|(j, &i)| {
            let mut x = inputs.read(i, range.clone())?;
            for (v, &bv) in x.iter_mut().zip(&b) {
                *v = (*v - bv) * weights[j];
                if thresholds[j].is_some_and(|t| key(*v) < t) {
                    *v = 0.0;
                }
            }
            Ok(x)
        })
        .collect()
}

fn weights_of(inputs: &TensorInputs, p: &TensorParams) -> Result<Vec<f32>> {
    inputs.non_base().iter().map(|&i| p.input_f64(i, "weight").map(|w| w as f32)).collect()
}

/// Gathers the global thresholds and majority sign of the paper variant over all `tensors`.
pub fn paper_stats(exec: &Executor, tensors: &[PaperTensor]) -> Result<PaperStats> {
    let Some((first, p0)) = tensors.first() else {
        return Ok(PaperStats { thresholds: Vec::new(), majority: 1.0 });
    };
    let series = first.non_base().len();
    let mut densities = Vec::with_capacity(series);
    for &i in &first.non_base() {
        densities.push(p0.input_f64(i, "density")?);
    }
    for (ti, p) in tensors {
        if ti.non_base().len() != series {
            return Err(Error::invalid(format!(
                "tensor '{}': the paper variant needs the same inputs for every tensor",
                ti.name
            )));
        }
        for (j, &i) in ti.non_base().iter().enumerate() {
            if p.input_f64(i, "density")? != densities[j] {
                return Err(Error::usage(format!(
                    "tensor '{}': the paper variant of TIES trims each task vector globally, so its density cannot \
                     vary by tensor",
                    ti.name
                )));
            }
        }
    }
    let total: usize = tensors.iter().map(|(t, _)| t.numel()).sum();
    let none = vec![None; series];
    // 0-based ascending rank of the kth smallest magnitude, kth = n - int(density * n) (1-based); None keeps all.
    let ranks: Vec<Option<usize>> = densities
        .iter()
        .map(|&d| {
            let kth = total - sparsify::count_of(d, total);
            (d < 1.0 && kth > 0).then(|| kth - 1)
        })
        .collect();
    let weights: Vec<Vec<f32>> = tensors.iter().map(|(ti, p)| weights_of(ti, p)).collect::<Result<_>>()?;
    let wanted: Vec<Vec<usize>> = ranks.iter().map(|r| r.iter().copied().collect()).collect();
    let lens: Vec<usize> = tensors.iter().map(|(t, _)| t.numel()).collect();
    let located = rank::locate(exec, &lens, &wanted, false, &|k, r| trimmed(&tensors[k].0, &weights[k], &none, r))?;
    let thresholds: Vec<Option<u32>> = located.iter().map(|l| l.first().map(|l| l.key)).collect();
    let mut sign_sum: i64 = 0;
    for ((ti, _), w) in tensors.iter().zip(&weights) {
        let parts = exec.chunked(ti.numel(), |r| {
            let tv = trimmed(ti, w, &thresholds, r.clone())?;
            let mut s = 0i64;
            for k in 0..r.len() {
                let total: f32 = tv.iter().map(|v| v[k]).sum();
                s += (total > 0.0) as i64 - (total < 0.0) as i64;
            }
            Ok(s)
        })?;
        sign_sum += parts.iter().sum::<i64>();
    }
    let majority = (sign_sum > 0) as i32 as f32 - (sign_sum < 0) as i32 as f32;
    Ok(PaperStats { thresholds, majority })
}

struct PaperKernel<'a> {
    inputs: TensorInputs<'a>,
    weights: Vec<f32>,
    lambda: f32,
    stats: Arc<PaperStats>,
}

impl Kernel for PaperKernel<'_> {
    fn compute(&self, range: Range<usize>) -> Result<Vec<f32>> {
        let tv = trimmed(&self.inputs, &self.weights, &self.stats.thresholds, range.clone())?;
        let mut out = self.inputs.read(self.inputs.base_index()?, range)?.into_vec();
        for (k, o) in out.iter_mut().enumerate() {
            let total: f32 = tv.iter().map(|v| v[k]).sum();
            let sign = if total > 0.0 {
                1.0
            } else if total < 0.0 {
                -1.0
            } else {
                self.stats.majority
            };
            let (mut sum, mut count) = (0f32, 0usize);
            for v in &tv {
                let x = v[k];
                if (sign > 0.0 && x > 0.0) || (sign <= 0.0 && x < 0.0) {
                    sum += x;
                    count += 1;
                }
            }
            *o += self.lambda * (sum / count.max(1) as f32);
        }
        Ok(out)
    }
}

impl MergeMethod for Ties {
    fn name(&self) -> &'static str {
        TIES_GTA.name
    }
    fn about(&self) -> &'static str {
        TIES_GTA.about
    }
    fn params(&self) -> &'static [ParamDef] {
        TIES_GTA.params
    }
    fn contract(&self) -> Contract {
        TIES_GTA.contract()
    }
    fn recorded_as(&self) -> Recorded {
        Recorded { method: TIES_GTA.name, variant: Some(("ties_variant", "mergekit")) }
    }
    fn prepare<'a>(&self, inputs: TensorInputs<'a>, p: &TensorParams, ctx: &Ctx) -> Result<Box<dyn Kernel + 'a>> {
        TIES_GTA.prepare(inputs, p, ctx)
    }
}

impl MergeMethod for TiesPaper {
    fn name(&self) -> &'static str {
        "ties_paper"
    }
    fn about(&self) -> &'static str {
        "TIES per the paper's code: trim over the whole model, elect signs by mass, mean of agreeing entries"
    }
    fn params(&self) -> &'static [ParamDef] {
        TIES_GTA.params
    }
    fn contract(&self) -> Contract {
        TIES_GTA.contract()
    }
    fn global_pass(&self) -> Option<&dyn GlobalPass> {
        Some(self)
    }
    fn compat_conflict(&self) -> Option<&'static str> {
        Some("--compat mergekit reproduces mergekit's TIES; it does not combine with --ties-variant paper")
    }
    fn recorded_as(&self) -> Recorded {
        Recorded { method: TIES_GTA.name, variant: Some(("ties_variant", "paper")) }
    }
    fn prepare<'a>(&self, inputs: TensorInputs<'a>, p: &TensorParams, ctx: &Ctx) -> Result<Box<dyn Kernel + 'a>> {
        let stats = ctx.global::<PaperStats>()?;
        let weights = weights_of(&inputs, p)?;
        Ok(Box::new(PaperKernel { inputs, weights, lambda: p.f64("lambda")? as f32, stats }))
    }
}

impl GlobalPass for TiesPaper {
    fn gather(&self, tensors: &[PaperTensor], ctx: &Ctx) -> Result<Arc<dyn Any + Send + Sync>> {
        Ok(Arc::new(paper_stats(ctx.exec, tensors)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::method::testing::*;
    use crate::merge::method::{Arithmetic, Ctx};
    use crate::merge::task_arithmetic::tests::gta_params;
    use crate::merge::task_arithmetic::TASK_ARITHMETIC;

    /// Plain f64 TIES (mergekit's rule) with a stable sort for the trim.
    fn reference(b: &[f32], xs: &[Vec<f32>], w: &[f64], density: f64, normalize: bool, lambda: f64) -> Vec<f64> {
        let n = b.len();
        let k = ((density * n as f64) as usize).max(1);
        let trimmed: Vec<Vec<f64>> = xs
            .iter()
            .map(|x| {
                let d: Vec<f64> = x.iter().zip(b).map(|(&a, &c)| a as f64 - c as f64).collect();
                let mut idx: Vec<usize> = (0..n).collect();
                idx.sort_by(|&i, &j| d[i].abs().partial_cmp(&d[j].abs()).unwrap());
                let mut t = vec![0.0; n];
                for &i in &idx[n - k..] {
                    t[i] = d[i];
                }
                t
            })
            .collect();
        (0..n)
            .map(|e| {
                let s: f64 = (0..xs.len()).map(|j| w[j] * trimmed[j][e]).sum();
                let pos = s >= 0.0;
                let (mut m, mut dw) = (0.0, 0.0);
                for j in 0..xs.len() {
                    let v = w[j] * trimmed[j][e];
                    if (pos && v > 0.0) || (!pos && v < 0.0) {
                        m += v;
                        dw += w[j];
                    }
                }
                if normalize {
                    m /= if dw == 0.0 { 1.0 } else { dw };
                }
                b[e] as f64 + lambda * m
            })
            .collect()
    }

    #[test]
    fn matches_an_f64_reference() {
        let n = 3001;
        let b = randn(1, n, 1.0);
        let xs: Vec<Vec<f32>> = (2..5).map(|s| b.iter().zip(randn(s, n, 0.1)).map(|(x, d)| x + d).collect()).collect();
        let w = [1.0, 0.5, 0.8];
        for (density, normalize, lambda) in [(0.5, true, 1.0), (0.2, false, 0.7), (1.0, true, 1.0)] {
            let mut per = vec![vec![]];
            per.extend(w.iter().map(|&wi| vec![("weight", wi), ("density", density)]));
            let p = gta_params(normalize, lambda, per);
            let mut inputs = vec![b.clone()];
            inputs.extend(xs.iter().cloned());
            let got = run(&Ties, &inputs, Some(0), &p);
            for (e, (g, r)) in got.iter().zip(reference(&b, &xs, &w, density, normalize, lambda)).enumerate() {
                assert!((*g as f64 - r).abs() <= 1e-5 * (1.0 + r.abs()), "{e}: {g} vs {r} (density {density})");
            }
        }
    }

    #[test]
    fn matches_the_reference_across_chunks_and_blocks_with_tied_magnitudes() {
        // Deltas on a coarse grid (many equal magnitudes) over more than one executor chunk: the rank window's
        // tie bookkeeping must carry across cache blocks and chunks.
        let n = crate::exec::CHUNK_ELEMS + 40_000;
        let b = vec![0f32; n];
        let grid = |s: u64| -> Vec<f32> { randn(s, n, 4.0).iter().map(|x| x.round() / 64.0).collect() };
        let xs = [grid(2), grid(3)];
        // Weights in an irrational ratio: no weighted sum of grid values cancels exactly, so the elected sign does
        // not depend on f32 versus f64 rounding.
        let w = [0.618034, 0.381966];
        let mut per = vec![vec![]];
        per.extend(w.iter().map(|&wi| vec![("weight", wi), ("density", 0.3)]));
        let p = gta_params(true, 1.0, per);
        let got = run_full(&Ties, &[b.clone(), xs[0].clone(), xs[1].clone()], &[n], Some(0), &p, Arithmetic::F32, 0, 2)
            .unwrap();
        for (e, (g, r)) in got.iter().zip(reference(&b, &xs, &w, 0.3, true, 1.0)).enumerate() {
            assert!((*g as f64 - r).abs() <= 1e-6 * (1.0 + r.abs()), "{e}: {g} vs {r}");
        }
    }

    #[test]
    fn density_one_with_one_model_equals_task_arithmetic() {
        let b = randn(1, 500, 1.0);
        let x: Vec<f32> = b.iter().zip(randn(2, 500, 0.1)).map(|(a, d)| a + d).collect();
        // With one model every nonzero entry agrees with its own sign and the divisor is its weight: normalize off
        // gives base + lambda w d exactly as task arithmetic does.
        let p = gta_params(false, 0.6, vec![vec![], vec![("weight", 0.7), ("density", 1.0)]]);
        let ties = run(&Ties, &[b.clone(), x.clone()], Some(0), &p);
        let ta = run(&TASK_ARITHMETIC, &[b.clone(), x.clone()], Some(0), &p);
        assert_eq!(ties, ta);
    }

    #[test]
    fn paper_variant_trims_globally_and_means_agreeing_entries() {
        // Two tensors, one task vector each side: magnitudes {4, 1} in tensor 1 and {3, 2} in tensor 2 for model A;
        // density 0.5 over 4 entries keeps |x| >= the 2nd smallest (2): 4, 3, 2 survive (the paper keeps >=).
        let exec = Executor::new(Some(1)).unwrap().quiet();
        let b1 = vec![0f32, 0.0];
        let b2 = vec![0f32, 0.0];
        let a1 = vec![4f32, -1.0];
        let a2 = vec![-3f32, 2.0];
        let c1 = vec![-1f32, 1.0];
        let c2 = vec![1f32, -0.5];
        let data: Vec<Vec<Vec<u8>>> =
            vec![vec![bytes(&b1), bytes(&a1), bytes(&c1)], vec![bytes(&b2), bytes(&a2), bytes(&c2)]];
        let shape = [2usize];
        let mk = |k: usize| TensorInputs {
            name: format!("t{k}"),
            shape: shape.to_vec(),
            views: data[k]
                .iter()
                .map(|d| crate::checkpoint::TensorView {
                    name: "t",
                    dtype: crate::checkpoint::Dtype::F32,
                    shape: &shape,
                    data: d,
                    file: std::path::Path::new("t"),
                    update: None,
                })
                .collect(),
            base: Some(0),
            arithmetic: Arithmetic::F32,
            pages: Vec::new(),
        };
        let p = gta_params(
            true,
            1.0,
            vec![vec![], vec![("weight", 1.0), ("density", 0.5)], vec![("weight", 1.0), ("density", 0.5)]],
        );
        let tensors = vec![(mk(0), p.clone()), (mk(1), p.clone())];
        let stats = paper_stats(&exec, &tensors).unwrap();
        // Model A keys: 4,1,3,2 -> kth = 4 - 2 = 2nd smallest = 2. Model C: 1,1,1,0.5 -> 2nd smallest = 1.
        assert_eq!(stats.thresholds, vec![Some(2f32.to_bits()), Some(1f32.to_bits())]);
        let ctx = Ctx { exec: &exec, seed: 0, global: Some(Arc::new(stats)) };
        let out: Vec<Vec<f32>> =
            (0..2).map(|k| TiesPaper.prepare(mk(k), &p, &ctx).unwrap().compute(0..2).unwrap()).collect();
        // t1[0]: A 4, C -1 -> sum 3 > 0: mean of positive entries = 4. t1[1]: A trimmed (1 < 2), C 1 -> 1.
        // t2[0]: A -3, C 1 -> sum -2: mean of negatives = -3. t2[1]: A 2, C trimmed (0.5 < 1) -> 2.
        assert_eq!(out, vec![vec![4.0, 1.0], vec![-3.0, 2.0]]);
    }
}
