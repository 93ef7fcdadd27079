//! Arcee Fusion (mergekit's `arcee_fusion`): take the other model's value only where it matters most, keep the
//! base's elsewhere. Exactly a base and one other model. Importance of an element: `|x - base|` times the KL
//! divergence `sum p log(p / q)` between the softmaxes (each plus 1e-8) of its row of `x` and of the base (rows along
//! the last dimension; a vector is one row). The threshold is `median + 1.5 (q3 - q1)` of all importances, with
//! quantile `q` read at sorted position `floor(q (n - 1))`; elements with importance at or above it take
//! `base + (x - base)`, the others the base.
//!
//! Deviation: for tensors over 10^6 elements mergekit estimates the quantiles from 10^6 elements drawn at random
//! with torch's global generator; graft uses the exact quantiles (deterministic, and what the sample estimates).
//!
//! Pre-passes: per-row KL (f64, stored as f32), then every importance (f32, as the kernel recomputes it) for the
//! three order statistics. That holds one f32 per element of the tensor while the threshold is found.

use std::ops::Range;

use super::method::{BaseRole, Contract, Ctx, Kernel, MergeMethod, TensorInputs};
use super::params::{ParamDef, TensorParams};
use super::scratch::blocked;
use crate::error::Result;

pub struct ArceeFusion;

/// The softmax of `row` (f64), each probability plus 1e-8.
fn softmax_plus_eps(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let exps: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| e / sum + 1e-8).collect()
}

/// KL divergence of row `x` from row `base` as the module comment defines it.
fn row_kl(x: &[f32], base: &[f32]) -> f32 {
    let (p, q) = (softmax_plus_eps(x), softmax_plus_eps(base));
    p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum::<f64>() as f32
}

/// The element at sorted position `k` of `v` (reorders `v`).
fn order_statistic(v: &mut [f32], k: usize) -> f32 {
    *v.select_nth_unstable_by(k, |a, b| a.total_cmp(b)).1
}

struct FusionKernel<'a> {
    inputs: TensorInputs<'a>,
    base: usize,
    other: usize,
    row_len: usize,
    kl: Vec<f32>,
    threshold: f32,
}

impl FusionKernel<'_> {
    /// Importances of `range` (with the base's and the other model's values).
    fn importance(&self, range: Range<usize>) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let b = self.inputs.read(self.base, range.clone())?.into_vec();
        let x = self.inputs.read(self.other, range.clone())?.into_vec();
        let imp = (0..b.len()).map(|k| (x[k] - b[k]).abs() * self.kl[(range.start + k) / self.row_len]).collect();
        Ok((imp, b, x))
    }
}

impl Kernel for FusionKernel<'_> {
    fn compute(&self, range: Range<usize>) -> Result<Vec<f32>> {
        blocked(range, |block, out| {
            let (imp, b, x) = self.importance(block)?;
            for (k, o) in out.iter_mut().enumerate() {
                *o = if imp[k] >= self.threshold { b[k] + (x[k] - b[k]) } else { b[k] };
            }
            Ok(())
        })
    }
}

impl MergeMethod for ArceeFusion {
    fn name(&self) -> &'static str {
        "arcee_fusion"
    }
    fn about(&self) -> &'static str {
        "Arcee Fusion: take the other model's values where |diff| x row KL divergence is an upper outlier"
    }
    fn params(&self) -> &'static [ParamDef] {
        &[]
    }
    fn contract(&self) -> Contract {
        Contract { base: BaseRole::TaskVectorBase, min_inputs: 2, max_inputs: Some(2) }
    }
    fn prepare<'a>(&self, inputs: TensorInputs<'a>, _p: &TensorParams, ctx: &Ctx) -> Result<Box<dyn Kernel + 'a>> {
        let base = inputs.base_index()?;
        let other = inputs.non_base()[0];
        let n = inputs.numel();
        let row_len = inputs.shape.last().copied().unwrap_or(1).max(1);
        let kl = ctx
            .chunked(n / row_len, |rows| {
                let elems = rows.start * row_len..rows.end * row_len;
                let b = inputs.read(base, elems.clone())?;
                let x = inputs.read(other, elems)?;
                Ok(x.chunks(row_len).zip(b.chunks(row_len)).map(|(x, b)| row_kl(x, b)).collect::<Vec<f32>>())
            })?
            .concat();
        let mut kernel = FusionKernel { inputs, base, other, row_len, kl, threshold: 0.0 };
        if n == 0 {
            return Ok(Box::new(kernel));
        }
        let mut imp = ctx.chunked(n, |r| Ok(kernel.importance(r)?.0))?.concat();
        // torch: float32 quantiles times (n - 1) in float32, truncated to an index.
        let pos = |q: f32| (q * (n - 1) as f32) as usize;
        let q3 = order_statistic(&mut imp, pos(0.75));
        let median = order_statistic(&mut imp[..=pos(0.75)], pos(0.5));
        let q1 = order_statistic(&mut imp[..=pos(0.5)], pos(0.25));
        kernel.threshold = median + 1.5 * (q3 - q1);
        Ok(Box::new(kernel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::method::testing::*;

    #[test]
    fn takes_the_other_model_exactly_at_the_importance_outliers() {
        let (rows, cols) = (20, 50);
        let n = rows * cols;
        let base = randn(1, n, 1.0);
        // Small changes everywhere, large ones at every 37th element: those are the outliers.
        let x: Vec<f32> = base
            .iter()
            .zip(randn(2, n, 0.01))
            .enumerate()
            .map(|(e, (b, d))| if e % 37 == 0 { b + 50.0 * d.abs() + 0.3 } else { b + d })
            .collect();
        let p = params(&[], vec![vec![], vec![]]);
        let got = run_full(
            &ArceeFusion,
            &[base.clone(), x.clone()],
            &[rows, cols],
            Some(0),
            &p,
            crate::merge::Arithmetic::F32,
            0,
            3,
        )
        .unwrap();
        // Reference: f64 KL per row, importances, quantiles by a full sort.
        let kl: Vec<f64> = (0..rows)
            .map(|r| {
                let sm = |v: &[f32]| {
                    let m = v.iter().fold(f64::MIN, |a, &b| a.max(b as f64));
                    let e: Vec<f64> = v.iter().map(|&y| (y as f64 - m).exp()).collect();
                    let s: f64 = e.iter().sum();
                    e.into_iter().map(|y| y / s + 1e-8).collect::<Vec<f64>>()
                };
                let (p, q) = (sm(&x[r * cols..(r + 1) * cols]), sm(&base[r * cols..(r + 1) * cols]));
                p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum()
            })
            .collect();
        let imp: Vec<f64> = (0..n).map(|e| (x[e] as f64 - base[e] as f64).abs() * kl[e / cols]).collect();
        let mut sorted = imp.clone();
        sorted.sort_by(f64::total_cmp);
        let at = |q: f64| sorted[(q * (n - 1) as f64) as usize];
        let threshold = at(0.5) + 1.5 * (at(0.75) - at(0.25));
        let mut taken = 0;
        for (e, &i) in imp.iter().enumerate() {
            // Importances within float rounding of the threshold may go either way.
            if (i - threshold).abs() <= 1e-5 * threshold.abs() {
                continue;
            }
            if i >= threshold {
                taken += 1;
                assert_eq!(got[e], base[e] + (x[e] - base[e]), "{e}");
            } else {
                assert_eq!(got[e], base[e], "{e}");
            }
        }
        assert!(taken >= n / 37, "{taken} elements taken");
    }
}
