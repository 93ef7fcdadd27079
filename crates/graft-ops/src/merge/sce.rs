//! SCE (mergekit's `sce`, arXiv 2408.07990): select, calculate, erase. With base `b` and task vectors
//! `d_i = x_i - b` of the fine-tunes:
//! 1. Select (only when `select_topk < 1`): per element the population variance of the `d_i` across models; with
//!    `nz` the number of elements of nonzero variance, the `k = int(nz * select_topk)` largest variances are kept and
//!    every `d_i` is zeroed elsewhere (`k = 0` or `select_topk <= 0`: all zeroed). Variances tied with the k-th
//!    largest are all kept (torch's `topk` picks among ties arbitrarily).
//! 2. Calculate: per model the weight `m_i = mean(d_i^2)` over the whole (selected) tensor, normalised to sum 1, or
//!    `1 / N` each when the sum is below 1e-6.
//! 3. Erase: per element the elected sign is that of `sum_i d_i` (zero counts as +); a model takes part where the
//!    sign of its `d_i` equals it (a zero `d_i` never does).
//!
//! Result `b + sum_i m_i mask_i d_i / max(sum_i m_i mask_i, 1e-6)`. The variances' threshold (a radix select over
//! the f32 variances, `rank::locate`) and the mean squares are chunked pre-passes with f64 accumulation; the kernel
//! is elementwise. `int8_mask` is accepted for mergekit configs and changes nothing (the mask holds 0 and 1 either
//! way).

use std::ops::Range;

use super::method::{BaseRole, Contract, Ctx, Kernel, MergeMethod, TensorInputs};
use super::params::{Default, Kind, ParamDef, Scope, TensorParams};
use super::rank::{self, key};
use super::scratch::Buf;
use crate::error::{Error, Result};

pub struct Sce;

const PARAMS: &[ParamDef] = &[
    ParamDef::new(
        "select_topk",
        Kind::Float,
        Scope::Shared,
        Default::Float(1.0),
        "fraction (0..=1) of elements, by variance across the task vectors, that are kept",
    ),
    ParamDef::new(
        "int8_mask",
        Kind::Bool,
        Scope::Shared,
        Default::Bool(false),
        "mergekit's memory option for masks; no effect on the result",
    ),
];

/// Which elements survive the selection step.
#[derive(Clone, Copy, Debug)]
enum Selection {
    All,
    None,
    /// Elements whose variance key is at least this one.
    AtLeast(u32),
}

/// Population variance across models of one element's task-vector entries, accumulated in f64.
fn variance(tv: &[Buf], k: usize) -> f32 {
    let n = tv.len() as f64;
    let mean = tv.iter().map(|v| v[k] as f64).sum::<f64>() / n;
    (tv.iter().map(|v| (v[k] as f64 - mean).powi(2)).sum::<f64>() / n) as f32
}

/// The task vectors of the non-base inputs over `range`, zeroed where the selection drops the element.
fn task_vectors(
    inputs: &TensorInputs,
    base: usize,
    others: &[usize],
    sel: Selection,
    range: Range<usize>,
) -> Result<Vec<Buf>> {
    let b = inputs.read(base, range.clone())?;
    let mut tv: Vec<Buf> = others
        .iter()
        .map(|&i| {
            let mut x = inputs.read(i, range.clone())?;
            for (v, &bv) in x.iter_mut().zip(&b) {
                *v -= bv;
            }
            Ok(x)
        })
        .collect::<Result<_>>()?;
    match sel {
        Selection::All => {}
        Selection::None => tv.iter_mut().for_each(|v| v.fill(0.0)),
        Selection::AtLeast(t) => {
            for k in 0..range.len() {
                if key(variance(&tv, k)) < t {
                    tv.iter_mut().for_each(|v| v[k] = 0.0);
                }
            }
        }
    }
    Ok(tv)
}

struct SceKernel<'a> {
    inputs: TensorInputs<'a>,
    base: usize,
    others: Vec<usize>,
    selection: Selection,
    weights: Vec<f32>,
}

impl Kernel for SceKernel<'_> {
    fn compute(&self, range: Range<usize>) -> Result<Vec<f32>> {
        let tv = task_vectors(&self.inputs, self.base, &self.others, self.selection, range.clone())?;
        let mut out = self.inputs.read(self.base, range)?.into_vec();
        for (k, o) in out.iter_mut().enumerate() {
            let total: f32 = tv.iter().map(|v| v[k]).sum();
            let positive = total >= 0.0;
            let (mut num, mut den) = (0f32, 0f32);
            for (v, &w) in tv.iter().zip(&self.weights) {
                let x = v[k];
                if (positive && x > 0.0) || (!positive && x < 0.0) {
                    num += w * x;
                    den += w;
                }
            }
            *o += num / den.max(1e-6);
        }
        Ok(out)
    }
}

impl MergeMethod for Sce {
    fn name(&self) -> &'static str {
        "sce"
    }
    fn about(&self) -> &'static str {
        "SCE: keep the task-vector entries of highest variance, weight models by mean square, erase minority signs"
    }
    fn params(&self) -> &'static [ParamDef] {
        PARAMS
    }
    fn contract(&self) -> Contract {
        Contract { base: BaseRole::TaskVectorBase, min_inputs: 1, max_inputs: None }
    }
    fn prepare<'a>(&self, inputs: TensorInputs<'a>, p: &TensorParams, ctx: &Ctx) -> Result<Box<dyn Kernel + 'a>> {
        let topk = p.f64("select_topk")?;
        if !(0.0..=1.0).contains(&topk) {
            return Err(Error::usage(format!(
                "tensor '{}': sce's select_topk must be between 0 and 1, got {topk}",
                inputs.name
            )));
        }
        let base = inputs.base_index()?;
        let others = inputs.non_base();
        let n = inputs.numel();
        let selection = if others.is_empty() || topk >= 1.0 {
            Selection::All
        } else if topk <= 0.0 {
            Selection::None
        } else {
            let variances = |r: Range<usize>| -> Result<Buf> {
                let tv = task_vectors(&inputs, base, &others, Selection::All, r.clone())?;
                let mut out = Buf::scratch(r.len());
                for (k, o) in out.iter_mut().enumerate() {
                    *o = variance(&tv, k);
                }
                Ok(out)
            };
            let nonzero: usize =
                ctx.chunked(n, |r| Ok(variances(r)?.iter().filter(|&&v| v != 0.0).count()))?.into_iter().sum();
            let k = (nonzero as f64 * topk) as usize;
            if k == 0 {
                Selection::None
            } else {
                let located = rank::locate(ctx.exec, &[n], &[vec![n - k]], false, &|_, r| Ok(vec![variances(r)?]))?;
                Selection::AtLeast(located[0][0].key)
            }
        };
        // Mean squares of the selected task vectors, summed per chunk in f64 and combined in chunk order.
        let parts = ctx.chunked(n, |r| {
            let tv = task_vectors(&inputs, base, &others, selection, r)?;
            Ok(tv.iter().map(|v| v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()).collect::<Vec<f64>>())
        })?;
        let mut squares = vec![0f64; others.len()];
        for part in &parts {
            for (s, x) in squares.iter_mut().zip(part) {
                *s += x;
            }
        }
        let means: Vec<f64> = squares.iter().map(|s| s / n.max(1) as f64).collect();
        let sum: f64 = means.iter().sum();
        let weights = if sum.abs() < 1e-6 {
            vec![1.0 / others.len().max(1) as f32; others.len()]
        } else {
            means.iter().map(|m| (m / sum) as f32).collect()
        };
        Ok(Box::new(SceKernel { inputs, base, others, selection, weights }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::method::testing::*;
    use crate::merge::params::Scalar;

    /// Plain f64 SCE, with the selection done by sorting the variances (as f32, the precision graft ranks in).
    fn reference(b: &[f32], xs: &[Vec<f32>], topk: f64) -> Vec<f64> {
        let n = b.len();
        let m = xs.len();
        let mut d: Vec<Vec<f64>> =
            xs.iter().map(|x| x.iter().zip(b).map(|(&a, &c)| a as f64 - c as f64).collect()).collect();
        if topk < 1.0 {
            let var: Vec<f32> = (0..n)
                .map(|e| {
                    let mean = d.iter().map(|v| v[e]).sum::<f64>() / m as f64;
                    (d.iter().map(|v| (v[e] - mean) * (v[e] - mean)).sum::<f64>() / m as f64) as f32
                })
                .collect();
            let nonzero = var.iter().filter(|&&v| v != 0.0).count();
            let k = (nonzero as f64 * topk) as usize;
            let mut sorted = var.clone();
            sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
            for e in 0..n {
                if k == 0 || var[e] < sorted[k - 1] {
                    for v in d.iter_mut() {
                        v[e] = 0.0;
                    }
                }
            }
        }
        let ms: Vec<f64> = d.iter().map(|v| v.iter().map(|x| x * x).sum::<f64>() / n as f64).collect();
        let total: f64 = ms.iter().sum();
        let w: Vec<f64> =
            if total.abs() < 1e-6 { vec![1.0 / m as f64; m] } else { ms.iter().map(|x| x / total).collect() };
        (0..n)
            .map(|e| {
                let s: f64 = d.iter().map(|v| v[e]).sum();
                let sign = if s >= 0.0 { 1.0 } else { -1.0 };
                let (mut num, mut den) = (0.0, 0.0);
                for (v, wi) in d.iter().zip(&w) {
                    if v[e] != 0.0 && v[e].signum() == sign {
                        num += wi * v[e];
                        den += wi;
                    }
                }
                b[e] as f64 + num / f64::max(den, 1e-6)
            })
            .collect()
    }

    fn p(topk: f64, models: usize) -> TensorParams {
        params(&[("select_topk", Scalar::Num(topk)), ("int8_mask", Scalar::Bool(false))], vec![vec![]; models])
    }

    fn check(b: &[f32], xs: &[Vec<f32>], topk: f64) {
        let mut inputs = vec![b.to_vec()];
        inputs.extend(xs.iter().cloned());
        let got = run(&Sce, &inputs, Some(0), &p(topk, inputs.len()));
        let want = reference(b, xs, topk);
        for (e, (g, r)) in got.iter().zip(&want).enumerate() {
            assert!((*g as f64 - r).abs() <= 1e-5 * (1.0 + r.abs()), "{e}: {g} vs {r} (topk {topk})");
        }
    }

    #[test]
    fn matches_an_f64_reference() {
        let n = 4099;
        let b = randn(1, n, 1.0);
        // Fine-tunes at different scales, with some entries equal to the base (zero task-vector entries).
        let xs: Vec<Vec<f32>> = (0..3)
            .map(|j| {
                b.iter()
                    .zip(randn(10 + j, n, 0.01 * (j + 1) as f64))
                    .enumerate()
                    .map(|(i, (x, d))| if i % (5 + j as usize) == 0 { *x } else { x + d })
                    .collect()
            })
            .collect();
        for topk in [1.0, 0.5, 0.1, 0.0001, 0.0] {
            check(&b, &xs, topk);
        }
    }

    #[test]
    fn selection_spans_executor_chunks() {
        let n = crate::exec::CHUNK_ELEMS + 3001;
        let b = randn(3, n, 0.5);
        let xs: Vec<Vec<f32>> =
            (0..2).map(|j| b.iter().zip(randn(20 + j, n, 0.02)).map(|(x, d)| x + d).collect()).collect();
        check(&b, &xs, 0.3);
        // Same result for any thread count.
        let mut inputs = vec![b.clone()];
        inputs.extend(xs);
        let one = run_full(&Sce, &inputs, &[n], Some(0), &p(0.3, 3), crate::merge::Arithmetic::F32, 0, 1).unwrap();
        let two = run_full(&Sce, &inputs, &[n], Some(0), &p(0.3, 3), crate::merge::Arithmetic::F32, 0, 2).unwrap();
        assert_eq!(one, two);
    }

    #[test]
    fn edge_cases() {
        let n = 300;
        let b = randn(5, n, 1.0);
        let x = randn(6, n, 1.0);
        // One fine-tune: its task vector is taken whole, so the result is the fine-tune.
        let got = run(&Sce, &[b.clone(), x.clone()], Some(0), &p(1.0, 2));
        for (g, want) in got.iter().zip(&x) {
            assert!((g - want).abs() <= 1e-6 * (1.0 + want.abs()), "{g} vs {want}");
        }
        // Identical inputs: zero task vectors, the base comes back exactly.
        assert_eq!(run(&Sce, &[b.clone(), b.clone(), b.clone()], Some(0), &p(0.5, 3)), b);
        // Base alone.
        assert_eq!(run(&Sce, std::slice::from_ref(&b), Some(0), &p(1.0, 1)), b);
        // Out of range.
        for bad in [-0.1, 1.5, f64::NAN] {
            let e =
                run_full(&Sce, &[b.clone(), x.clone()], &[n], Some(0), &p(bad, 2), crate::merge::Arithmetic::F32, 0, 1);
            assert!(e.unwrap_err().to_string().contains("select_topk"));
        }
    }
}
