//! Karcher mean (mergekit's `karcher`, arXiv 2603.04972): the weighted Riemannian mean of the models' directions on
//! the unit hypersphere, over the whole flattened tensor, scaled by the mean of their norms. Every input counts
//! alike (a configured base is one more model), each with weight `1 / N`.
//!
//! With norms `n_i` and units `u_i = x_i / n_i`: models of norm `<= tol` leave the mean (all of them: zeros); the
//! start is the normalised weighted sum of the remaining units (the first unit if that sum is shorter than `tol`);
//! then up to `max_iter` steps of the fixed-point iteration: the log map of every unit at the mean,
//! `theta_i / sin(theta_i) * (u_i - cos(theta_i) mean)` (units within `tol` radians skipped), averaged with the
//! weights into a tangent `v`, stop when `|v| < tol`, else move along the exp map `mean cos|v| + v sin|v| / |v|` and
//! renormalise. The result is `(sum_i n_i / N) * mean`.
//!
//! Every vector involved is a combination of the `x_i`, so a chunked pre-pass gathers their Gram matrix (f64), the
//! iteration runs on that small matrix in f64, and the kernel is the elementwise sum `sum k_i x_i`.

use std::ops::Range;

use super::method::{BaseRole, Contract, Ctx, Kernel, MergeMethod, TensorInputs};
use super::params::{Default, Kind, ParamDef, Scope, TensorParams};
use super::scratch::blocked;
use crate::error::{Error, Result};

pub struct Karcher;

const PARAMS: &[ParamDef] = &[
    ParamDef::new("max_iter", Kind::Float, Scope::Shared, Default::Float(10.0), "iterations of the mean (an integer)"),
    ParamDef::new("tol", Kind::Float, Scope::Shared, Default::Float(1e-5), "convergence and zero-norm tolerance"),
];

/// The Gram matrix (f64) of the vectors `x_k = input[members[k]] - input[base]` (no base: the inputs themselves),
/// gathered over fixed chunks so it is the same for any thread count.
pub fn gram(inputs: &TensorInputs, ctx: &Ctx, members: &[usize], base: Option<usize>) -> Result<Vec<Vec<f64>>> {
    let m = members.len();
    let parts = ctx.chunked(inputs.numel(), |r| {
        let b = match base {
            Some(bi) => Some(inputs.read(bi, r.clone())?),
            None => None,
        };
        let xs: Vec<Vec<f32>> = members
            .iter()
            .map(|&i| {
                let mut x = inputs.read(i, r.clone())?.into_vec();
                if let Some(b) = &b {
                    x.iter_mut().zip(b.iter()).for_each(|(v, bv)| *v -= bv);
                }
                Ok(x)
            })
            .collect::<Result<_>>()?;
        let mut g = vec![0f64; m * m];
        for i in 0..m {
            for j in i..m {
                g[i * m + j] = xs[i].iter().zip(&xs[j]).map(|(&a, &b)| a as f64 * b as f64).sum();
            }
        }
        Ok(g)
    })?;
    let mut g = vec![vec![0f64; m]; m];
    for part in &parts {
        for i in 0..m {
            for j in i..m {
                g[i][j] += part[i * m + j];
            }
        }
    }
    for i in 1..m {
        let (upper, lower) = g.split_at_mut(i);
        for (j, row) in upper.iter().enumerate() {
            lower[0][j] = row[i];
        }
    }
    Ok(g)
}

/// `c . G d` for coefficient vectors over the Gram matrix `g`.
fn dot(g: &[Vec<f64>], c: &[f64], d: &[f64]) -> f64 {
    let mut s = 0.0;
    for (i, row) in g.iter().enumerate() {
        for (j, gij) in row.iter().enumerate() {
            s += c[i] * d[j] * gij;
        }
    }
    s
}

fn norm(g: &[Vec<f64>], c: &[f64]) -> f64 {
    dot(g, c, c).max(0.0).sqrt()
}

/// The coefficients `k_i` of the Karcher mean `sum k_i x_i` from the Gram matrix `g` (see the module comment).
pub fn coefficients(g: &[Vec<f64>], max_iter: usize, tol: f64) -> Vec<f64> {
    let n = g.len();
    let norms: Vec<f64> = (0..n).map(|i| g[i][i].max(0.0).sqrt()).collect();
    let unit = |i: usize| -> Vec<f64> {
        let mut c = vec![0.0; n];
        if norms[i] > 0.0 {
            c[i] = 1.0 / norms[i];
        }
        c
    };
    let valid: Vec<usize> = (0..n).filter(|&i| norms[i] > tol).collect();
    if valid.is_empty() {
        return vec![0.0; n];
    }
    let alpha = 1.0 / valid.len() as f64;
    let units: Vec<Vec<f64>> = valid.iter().map(|&i| unit(i)).collect();
    let mut mean = vec![0.0; n];
    for u in &units {
        mean.iter_mut().zip(u).for_each(|(m, x)| *m += alpha * x);
    }
    let mn = norm(g, &mean);
    if mn < tol {
        mean = units[0].clone();
    } else {
        mean.iter_mut().for_each(|m| *m /= mn);
    }
    for _ in 0..max_iter {
        let mut tangent = vec![0.0; n];
        for u in &units {
            let cos = dot(g, &mean, u).clamp(-1.0, 1.0);
            let theta = cos.acos();
            if theta < tol {
                continue;
            }
            let f = alpha * theta / theta.sin();
            for ((t, u), m) in tangent.iter_mut().zip(u).zip(&mean) {
                *t += f * (u - cos * m);
            }
        }
        let tn = norm(g, &tangent);
        if tn < tol {
            break;
        }
        for (m, t) in mean.iter_mut().zip(&tangent) {
            *m = tn.cos() * *m + tn.sin() * t / tn;
        }
        let un = norm(g, &mean);
        if un > tol {
            mean.iter_mut().for_each(|m| *m /= un);
        }
    }
    // The scale weighs every model, also those too short to have a direction.
    let scale: f64 = norms.iter().map(|x| x / n as f64).sum();
    mean.iter().map(|m| m * scale).collect()
}

/// `sum k_i x_i` elementwise (the base, if any, added back).
pub struct SumKernel<'a> {
    pub inputs: TensorInputs<'a>,
    pub base: Option<usize>,
    pub terms: Vec<(usize, f32)>,
}

impl Kernel for SumKernel<'_> {
    fn compute(&self, range: Range<usize>) -> Result<Vec<f32>> {
        blocked(range, |block, out| {
            let b = match self.base {
                Some(bi) => Some(self.inputs.read(bi, block.clone())?),
                None => None,
            };
            let mut acc = vec![0f64; out.len()];
            for &(i, k) in &self.terms {
                let x = self.inputs.read(i, block.clone())?;
                match &b {
                    Some(b) => acc
                        .iter_mut()
                        .zip(x.iter().zip(b.iter()))
                        .for_each(|(a, (x, b))| *a += k as f64 * (x - b) as f64),
                    None => acc.iter_mut().zip(x.iter()).for_each(|(a, x)| *a += k as f64 * *x as f64),
                }
            }
            for (e, o) in out.iter_mut().enumerate() {
                *o = acc[e] as f32 + b.as_ref().map_or(0.0, |b| b[e]);
            }
            Ok(())
        })
    }
}

impl MergeMethod for Karcher {
    fn name(&self) -> &'static str {
        "karcher"
    }
    fn about(&self) -> &'static str {
        "Karcher mean: the Riemannian mean of the models' directions on the hypersphere, scaled by their mean norm"
    }
    fn params(&self) -> &'static [ParamDef] {
        PARAMS
    }
    fn contract(&self) -> Contract {
        Contract { base: BaseRole::Ignored, min_inputs: 1, max_inputs: None }
    }
    fn prepare<'a>(&self, inputs: TensorInputs<'a>, p: &TensorParams, ctx: &Ctx) -> Result<Box<dyn Kernel + 'a>> {
        let max_iter = p.f64("max_iter")?;
        if !(max_iter >= 0.0 && max_iter.fract() == 0.0 && max_iter <= 1e6) {
            return Err(Error::usage(format!(
                "tensor '{}': karcher's max_iter must be a whole number from 0 to 1000000, got {max_iter}",
                inputs.name
            )));
        }
        let tol = p.f64("tol")?;
        if !(tol >= 0.0 && tol.is_finite()) {
            return Err(Error::usage(format!("tensor '{}': karcher's tol must be >= 0, got {tol}", inputs.name)));
        }
        let members: Vec<usize> = (0..inputs.len()).collect();
        if members.len() == 1 {
            return Ok(Box::new(SumKernel { inputs, base: None, terms: vec![(0, 1.0)] }));
        }
        let g = gram(&inputs, ctx, &members, None)?;
        let k = coefficients(&g, max_iter as usize, tol);
        let terms = members.into_iter().zip(k).map(|(i, k)| (i, k as f32)).collect();
        Ok(Box::new(SumKernel { inputs, base: None, terms }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::method::testing::*;
    use crate::merge::params::Scalar;

    /// Plain f64 Karcher mean on whole vectors, as the module comment states it.
    fn reference(xs: &[Vec<f32>], max_iter: usize, tol: f64) -> Vec<f64> {
        let d = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let xs: Vec<Vec<f64>> = xs.iter().map(|x| x.iter().map(|&v| v as f64).collect()).collect();
        let norms: Vec<f64> = xs.iter().map(|x| d(x, x).sqrt()).collect();
        let units: Vec<Vec<f64>> =
            xs.iter().zip(&norms).filter(|&(_, &n)| n > tol).map(|(x, n)| x.iter().map(|v| v / n).collect()).collect();
        let a = 1.0 / units.len() as f64;
        let len = xs[0].len();
        let mut mean: Vec<f64> = (0..len).map(|e| units.iter().map(|u| a * u[e]).sum()).collect();
        let mn = d(&mean, &mean).sqrt();
        mean.iter_mut().for_each(|m| *m /= mn);
        for _ in 0..max_iter {
            let mut t = vec![0.0; len];
            for u in &units {
                let c = d(&mean, u).clamp(-1.0, 1.0);
                let th = c.acos();
                if th < tol {
                    continue;
                }
                for ((t, u), m) in t.iter_mut().zip(u).zip(&mean) {
                    *t += a * th / th.sin() * (u - c * m);
                }
            }
            let tn = d(&t, &t).sqrt();
            if tn < tol {
                break;
            }
            for (m, t) in mean.iter_mut().zip(&t) {
                *m = tn.cos() * *m + tn.sin() * t / tn;
            }
            let un = d(&mean, &mean).sqrt();
            mean.iter_mut().for_each(|m| *m /= un);
        }
        let scale: f64 = norms.iter().sum::<f64>() / xs.len() as f64;
        mean.iter().map(|m| m * scale).collect()
    }

    #[test]
    fn matches_an_f64_reference() {
        let n = 4000;
        let xs: Vec<Vec<f32>> = (0..3).map(|k| randn(k, n, 0.5 + k as f64)).collect();
        for max_iter in [0.0, 1.0, 10.0] {
            let p = params(&[("max_iter", Scalar::Num(max_iter)), ("tol", Scalar::Num(1e-5))], vec![vec![]; 3]);
            let got = run(&Karcher, &xs, None, &p);
            let want = reference(&xs, max_iter as usize, 1e-5);
            for (e, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()), "iter {max_iter}, {e}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn the_mean_of_one_direction_keeps_it() {
        // Two models pointing the same way: the mean is that direction with the mean norm, 2x for x and 4x.
        let x = randn(3, 100, 1.0);
        let y: Vec<f32> = x.iter().map(|v| v * 4.0).collect();
        let p = params(&[("max_iter", Scalar::Num(10.0)), ("tol", Scalar::Num(1e-5))], vec![vec![]; 2]);
        let got = run(&Karcher, &[x.clone(), y], None, &p);
        for (g, v) in got.iter().zip(&x) {
            assert!((g - 2.5 * v).abs() <= 1e-5 * (1.0 + v.abs()), "{g} vs {}", 2.5 * v);
        }
    }
}
