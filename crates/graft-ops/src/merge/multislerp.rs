//! Multi-SLERP (mergekit's `multislerp`): barycentric interpolation of any number of models on a hypersphere, over
//! the whole flattened tensor. With the inputs `x_i` (minus the base model when one is given), weights `w_i`
//! (normalised to sum 1 unless `normalize_weights` is false), norms `n_i = |x_i|` and units `u_i = x_i / (n_i + eps)`:
//! the weighted mean `m = sum w_i u_i` is normalised (`|m| < eps`: with two models the plain weighted sum
//! `w_0 x_0 + w_1 x_1`, with more an error), the units are projected onto the tangent space at `m`
//! (`u_i - (u_i . m) m`) and averaged with the weights into `t`, mapped back with the exponential map
//! `m cos|t| + t sin|t| / |t|` (`|t|` taken plus eps) and scaled by `sum w_i n_i`. One model alone is returned as is.
//!
//! Every vector involved is a combination of the `x_i`, so a chunked pre-pass gathers their Gram matrix (f64), the
//! whole construction runs on that small matrix in f64, and the kernel is the elementwise sum `base + sum k_i x_i`.

use std::ops::Range;

use super::method::{BaseRole, Contract, Ctx, Kernel, MergeMethod, TensorInputs};
use super::params::{Default, Kind, ParamDef, Scope, TensorParams};
use super::scratch::blocked;
use crate::error::{Error, Result};

pub struct MultiSlerp;

const PARAMS: &[ParamDef] = &[
    ParamDef::new("weight", Kind::Float, Scope::NonBase, Default::Required, "the model's share of the interpolation"),
    ParamDef::new("normalize_weights", Kind::Bool, Scope::Shared, Default::Bool(true), "scale the weights to sum 1"),
    ParamDef::new("eps", Kind::Float, Scope::Shared, Default::Float(1e-8), "guard against division by zero norms"),
];

/// The coefficients `k_i` of the result `base + sum k_i x_i`, from the Gram matrix `g` of the `x_i` (see the module
/// comment); `None` when the weighted mean of the units vanishes for more than two models.
pub fn coefficients(g: &[Vec<f64>], w: &[f64], eps: f64) -> Option<Vec<f64>> {
    let m = w.len();
    let norms: Vec<f64> = (0..m).map(|i| g[i][i].max(0.0).sqrt()).collect();
    let quad = |c: &[f64]| -> f64 {
        let mut s = 0.0;
        for i in 0..m {
            for j in 0..m {
                s += c[i] * c[j] * g[i][j];
            }
        }
        s.max(0.0)
    };
    // Mean of the units: sum w_i / (n_i + eps) x_i.
    let unit: Vec<f64> = (0..m).map(|i| w[i] / (norms[i] + eps)).collect();
    let mean_norm = quad(&unit).sqrt();
    if mean_norm < eps {
        return (m == 2).then(|| w.to_vec());
    }
    let mean: Vec<f64> = unit.iter().map(|u| u / mean_norm).collect();
    // u_i . m for each model, then the tangent sum t = sum w_i u_i - (sum w_i (u_i . m)) m.
    let dots: Vec<f64> = (0..m).map(|i| (0..m).map(|j| mean[j] * g[i][j]).sum::<f64>() / (norms[i] + eps)).collect();
    let along: f64 = (0..m).map(|i| w[i] * dots[i]).sum();
    let tangent: Vec<f64> = (0..m).map(|i| unit[i] - along * mean[i]).collect();
    let tn = quad(&tangent).sqrt() + eps;
    let scale: f64 = (0..m).map(|i| w[i] * norms[i]).sum();
    Some((0..m).map(|i| scale * (mean[i] * tn.cos() + tangent[i] * tn.sin() / tn)).collect())
}

struct SumKernel<'a> {
    inputs: TensorInputs<'a>,
    base: Option<usize>,
    terms: Vec<(usize, f32)>,
}

impl Kernel for SumKernel<'_> {
    fn compute(&self, range: Range<usize>) -> Result<Vec<f32>> {
        blocked(range, |block, out| {
            let b = match self.base {
                Some(bi) => Some(self.inputs.read(bi, block.clone())?),
                None => None,
            };
            let mut acc = vec![0f32; block.len()];
            for &(i, k) in &self.terms {
                let x = self.inputs.read(i, block.clone())?;
                for (e, a) in acc.iter_mut().enumerate() {
                    let v = x[e] - b.as_ref().map_or(0.0, |b| b[e]);
                    *a += k * v;
                }
            }
            for (e, o) in out.iter_mut().enumerate() {
                *o = acc[e] + b.as_ref().map_or(0.0, |b| b[e]);
            }
            Ok(())
        })
    }
}

struct CopyKernel<'a> {
    inputs: TensorInputs<'a>,
    input: usize,
}

impl Kernel for CopyKernel<'_> {
    fn compute(&self, range: Range<usize>) -> Result<Vec<f32>> {
        Ok(self.inputs.read(self.input, range)?.into_vec())
    }
}

impl MergeMethod for MultiSlerp {
    fn name(&self) -> &'static str {
        "multislerp"
    }
    fn about(&self) -> &'static str {
        "Multi-SLERP: weighted spherical interpolation of any number of models (optionally around a base)"
    }
    fn params(&self) -> &'static [ParamDef] {
        PARAMS
    }
    fn contract(&self) -> Contract {
        Contract { base: BaseRole::OptionalBase, min_inputs: 1, max_inputs: None }
    }
    fn prepare<'a>(&self, inputs: TensorInputs<'a>, p: &TensorParams, ctx: &Ctx) -> Result<Box<dyn Kernel + 'a>> {
        let eps = p.f64("eps")?;
        if !(eps >= 0.0 && eps.is_finite()) {
            return Err(Error::usage(format!("tensor '{}': multislerp's eps must be >= 0, got {eps}", inputs.name)));
        }
        let base = inputs.base;
        let models = inputs.non_base();
        if models.len() == 1 {
            return Ok(Box::new(CopyKernel { input: models[0], inputs }));
        }
        let mut w: Vec<f64> = models.iter().map(|&i| p.input_f64(i, "weight")).collect::<Result<_>>()?;
        if p.bool("normalize_weights")? {
            let sum: f64 = w.iter().sum();
            if sum == 0.0 || !sum.is_finite() {
                return Err(Error::usage(format!(
                    "tensor '{}': multislerp's weight values sum to {sum}, so they cannot be normalised",
                    inputs.name
                )));
            }
            w.iter_mut().for_each(|x| *x /= sum);
        }
        let g = super::karcher::gram(&inputs, ctx, &models, base)?;
        let k = coefficients(&g, &w, eps).ok_or_else(|| {
            Error::invalid(format!(
                "tensor '{}': multislerp's weighted mean of the inputs is zero (antipodal inputs with balancing \
                 weights); try other weights",
                inputs.name
            ))
        })?;
        let terms = models.iter().zip(&k).map(|(&i, &k)| (i, k as f32)).collect();
        Ok(Box::new(SumKernel { inputs, base, terms }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::method::testing::*;
    use crate::merge::params::Scalar;

    fn norm(v: &[f64]) -> f64 {
        v.iter().map(|x| x * x).sum::<f64>().sqrt()
    }

    /// Plain f64 Multi-SLERP on the vectors themselves, step by step as mergekit writes it.
    fn reference(xs: &[Vec<f32>], base: Option<&[f32]>, w: &[f64], normalize: bool, eps: f64) -> Option<Vec<f64>> {
        let n = xs[0].len();
        let b: Vec<f64> = base.map_or(vec![0.0; n], |b| b.iter().map(|&x| x as f64).collect());
        if xs.len() == 1 {
            return Some(xs[0].iter().map(|&x| x as f64).collect());
        }
        let x: Vec<Vec<f64>> = xs.iter().map(|x| x.iter().zip(&b).map(|(&a, c)| a as f64 - c).collect()).collect();
        let s: f64 = w.iter().sum();
        let w: Vec<f64> = w.iter().map(|v| if normalize { v / s } else { *v }).collect();
        let norms: Vec<f64> = x.iter().map(|v| norm(v)).collect();
        let units: Vec<Vec<f64>> =
            x.iter().zip(&norms).map(|(v, nv)| v.iter().map(|a| a / (nv + eps)).collect()).collect();
        let mut mean = vec![0.0; n];
        for (u, wi) in units.iter().zip(&w) {
            for e in 0..n {
                mean[e] += wi * u[e];
            }
        }
        let mn = norm(&mean);
        if mn < eps {
            if xs.len() == 2 {
                return Some((0..n).map(|e| x[0][e] * w[0] + x[1][e] * w[1] + b[e]).collect());
            }
            return None;
        }
        mean.iter_mut().for_each(|v| *v /= mn);
        let mut t = vec![0.0; n];
        for (u, wi) in units.iter().zip(&w) {
            let d: f64 = u.iter().zip(&mean).map(|(a, c)| a * c).sum();
            for e in 0..n {
                t[e] += wi * (u[e] - d * mean[e]);
            }
        }
        let tn = norm(&t) + eps;
        let avg: f64 = norms.iter().zip(&w).map(|(a, c)| a * c).sum();
        Some((0..n).map(|e| (mean[e] * tn.cos() + t[e] * tn.sin() / tn) * avg + b[e]).collect())
    }

    fn p(w: &[f64], base: bool, normalize: bool) -> TensorParams {
        let mut inputs: Vec<Vec<(&str, f64)>> = w.iter().map(|&x| vec![("weight", x)]).collect();
        if base {
            inputs.insert(0, vec![]);
        }
        params(&[("normalize_weights", Scalar::Bool(normalize)), ("eps", Scalar::Num(1e-8))], inputs)
    }

    fn check(xs: &[Vec<f32>], base: Option<&[f32]>, w: &[f64], normalize: bool) {
        let mut inputs: Vec<Vec<f32>> = base.iter().map(|b| b.to_vec()).collect();
        inputs.extend(xs.iter().cloned());
        let n = xs[0].len();
        let got = run_full(
            &MultiSlerp,
            &inputs,
            &[n],
            base.map(|_| 0),
            &p(w, base.is_some(), normalize),
            crate::merge::Arithmetic::F32,
            0,
            2,
        )
        .unwrap();
        let want = reference(xs, base, w, normalize, 1e-8).unwrap();
        let scale = want.iter().map(|x| x.abs()).fold(0.0, f64::max);
        for (e, (g, r)) in got.iter().zip(&want).enumerate() {
            assert!((*g as f64 - r).abs() <= 2e-5 * (scale + r.abs()), "{e}: {g} vs {r}");
        }
    }

    #[test]
    fn matches_an_f64_reference() {
        let n = 2000;
        let xs: Vec<Vec<f32>> = (0..3).map(|j| randn(30 + j, n, 1.0 + j as f64)).collect();
        let b = randn(40, n, 0.5);
        check(&xs, None, &[0.2, 0.3, 0.5], true);
        check(&xs, None, &[1.0, 2.0, 1.0], true);
        check(&xs, Some(&b), &[0.5, 0.25, 0.25], true);
        check(&xs[..2], Some(&b), &[0.3, 0.4], false);
    }

    #[test]
    fn spans_executor_chunks() {
        let n = crate::exec::CHUNK_ELEMS + 777;
        let xs: Vec<Vec<f32>> = (0..2).map(|j| randn(50 + j, n, 0.1)).collect();
        let b = randn(52, n, 0.1);
        check(&xs, Some(&b), &[0.7, 0.3], true);
    }

    #[test]
    fn edge_cases() {
        let n = 100;
        let x = randn(60, n, 1.0);
        // One model comes back unchanged.
        assert_eq!(run(&MultiSlerp, std::slice::from_ref(&x), None, &p(&[0.4], false, true)), x);
        // Identical inputs: the interpolation is the input.
        let got = run(&MultiSlerp, &[x.clone(), x.clone(), x.clone()], None, &p(&[1.0, 2.0, 3.0], false, true));
        for (g, w) in got.iter().zip(&x) {
            assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
        }
        // Zero vectors (inputs equal to the base): two models fall back to the weighted sum, the base comes back.
        let b = randn(61, n, 1.0);
        let got = run(&MultiSlerp, &[b.clone(), b.clone(), b.clone()], Some(0), &p(&[0.5, 0.5], true, true));
        assert_eq!(got, b);
        // Antipodal inputs with balancing weights, three of them: an error naming the tensor.
        let neg: Vec<f32> = x.iter().map(|v| -v).collect();
        let e = run_full(
            &MultiSlerp,
            &[x.clone(), neg.clone(), vec![0.0; n]],
            &[n],
            None,
            &p(&[1.0, 1.0, 1.0], false, true),
            crate::merge::Arithmetic::F32,
            0,
            1,
        );
        assert!(e.unwrap_err().to_string().contains("weighted mean"));
        // Weights summing to zero cannot be normalised.
        let e = run_full(
            &MultiSlerp,
            &[x.clone(), neg],
            &[n],
            None,
            &p(&[1.0, -1.0], false, true),
            crate::merge::Arithmetic::F32,
            0,
            1,
        );
        assert!(e.unwrap_err().to_string().contains("weight"));
    }
}
