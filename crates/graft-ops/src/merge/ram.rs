//! Reinforced Agent Merging (mergekit's `ram` and `ramplus_tl`, arXiv 2601.13572): task vectors against a required
//! base; per element, only the models whose task vector exceeds `epsilon` in magnitude contribute. An element one
//! model alone changes takes that model's change whole; one several models change takes the mean of their changes
//! (not diluted by the models that left it alone).
//!
//! `ramplus_tl` (tensor-local RAM+) scales each model's unique changes by `lambda_i = 1 + r * clamp(rho_i, 0, alpha)`,
//! where `rho_i` is that model's count of shared changed elements over its count of unique ones (the latter floored
//! at `epsilon`) in this tensor; the counts come from an integer pre-pass, so they are exact for any chunking.
//!
//! In f32, in mergekit's order: `(tv * unique) * lambda + (tv * overlap) / count` per model, summed over models.

use std::ops::Range;

use super::method::{BaseRole, Contract, Ctx, Kernel, MergeMethod, TensorInputs};
use super::params::{Default, Kind, ParamDef, Scope, TensorParams};
use super::scratch::blocked;
use crate::error::{Error, Result};

/// Which of the two variants.
pub struct Ram {
    plus: bool,
}

pub const RAM: Ram = Ram { plus: false };
pub const RAMPLUS_TL: Ram = Ram { plus: true };

const EPSILON: ParamDef = ParamDef::new(
    "epsilon",
    Kind::Float,
    Scope::Shared,
    Default::Float(1e-5),
    "a task-vector entry counts as a change when its magnitude exceeds this",
);
const RAM_PARAMS: &[ParamDef] = &[EPSILON];
const RAMPLUS_PARAMS: &[ParamDef] = &[
    ParamDef::new("r", Kind::Float, Scope::Shared, Default::Float(0.1), "strength of the unique-change boost"),
    ParamDef::new("alpha", Kind::Float, Scope::Shared, Default::Float(0.2), "cap on the shared/unique ratio"),
    EPSILON,
];

struct RamKernel<'a> {
    inputs: TensorInputs<'a>,
    base: usize,
    models: Vec<usize>,
    epsilon: f32,
    /// Per model: the factor of its unique changes (1 for plain RAM).
    lambda: Vec<f32>,
}

impl RamKernel<'_> {
    /// The task vectors of `block`, one per model.
    fn task_vectors(&self, block: Range<usize>, base: &[f32]) -> Result<Vec<Vec<f32>>> {
        self.models
            .iter()
            .map(|&i| {
                let mut t = self.inputs.read(i, block.clone())?.into_vec();
                t.iter_mut().zip(base).for_each(|(v, b)| *v -= b);
                Ok(t)
            })
            .collect()
    }
}

impl Kernel for RamKernel<'_> {
    fn compute(&self, range: Range<usize>) -> Result<Vec<f32>> {
        blocked(range, |block, out| {
            self.inputs.read_into(self.base, block.clone(), out)?;
            let tvs = self.task_vectors(block, out)?;
            for (e, o) in out.iter_mut().enumerate() {
                let count = tvs.iter().filter(|t| t[e].abs() > self.epsilon).count();
                let mut merged = 0f32;
                for (t, &lambda) in tvs.iter().zip(&self.lambda) {
                    let v = t[e];
                    if v.abs() > self.epsilon {
                        merged += if count == 1 { v * lambda } else { v / count as f32 };
                    }
                }
                *o += merged;
            }
            Ok(())
        })
    }
}

impl MergeMethod for Ram {
    fn name(&self) -> &'static str {
        if self.plus {
            "ramplus_tl"
        } else {
            "ram"
        }
    }
    fn about(&self) -> &'static str {
        if self.plus {
            "RAM+ (tensor-local): RAM with each model's unique changes boosted by its shared/unique ratio"
        } else {
            "Reinforced Agent Merging: unique changes kept whole, shared ones averaged over the models making them"
        }
    }
    fn params(&self) -> &'static [ParamDef] {
        if self.plus {
            RAMPLUS_PARAMS
        } else {
            RAM_PARAMS
        }
    }
    fn contract(&self) -> Contract {
        Contract { base: BaseRole::TaskVectorBase, min_inputs: 1, max_inputs: None }
    }
    fn prepare<'a>(&self, inputs: TensorInputs<'a>, p: &TensorParams, ctx: &Ctx) -> Result<Box<dyn Kernel + 'a>> {
        let name = self.name();
        let epsilon = p.f64("epsilon")?;
        if !(epsilon >= 0.0 && epsilon.is_finite()) {
            return Err(Error::usage(format!(
                "tensor '{}': {name}'s epsilon must be >= 0, got {epsilon}",
                inputs.name
            )));
        }
        let base = inputs.base_index()?;
        let models = inputs.non_base();
        let mut kernel = RamKernel { base, lambda: vec![1.0; models.len()], models, epsilon: epsilon as f32, inputs };
        if self.plus && !kernel.models.is_empty() {
            let (r, alpha) = (p.f64("r")? as f32, p.f64("alpha")? as f32);
            let m = kernel.models.len();
            // Per model: (changed elements shared with another model, changed elements no other model changes).
            let parts = ctx.chunked(kernel.inputs.numel(), |range| {
                let b = kernel.inputs.read(base, range.clone())?;
                let tvs = kernel.task_vectors(range, &b)?;
                let mut counts = vec![(0u64, 0u64); m];
                for e in 0..b.len() {
                    let changed: Vec<bool> = tvs.iter().map(|t| t[e].abs() > kernel.epsilon).collect();
                    let n = changed.iter().filter(|&&c| c).count();
                    for (c, &ch) in counts.iter_mut().zip(&changed) {
                        if ch && n > 1 {
                            c.0 += 1;
                        } else if ch {
                            c.1 += 1;
                        }
                    }
                }
                Ok(counts)
            })?;
            for (i, lambda) in kernel.lambda.iter_mut().enumerate() {
                let shared: u64 = parts.iter().map(|c| c[i].0).sum();
                let unique: u64 = parts.iter().map(|c| c[i].1).sum();
                // torch: an int64 count divided by a count clamped to a float gives f32.
                let rho = shared as f32 / (unique as f32).max(epsilon as f32);
                *lambda = 1.0 + r * rho.clamp(0.0, alpha);
            }
        }
        Ok(Box::new(kernel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::method::testing::*;
    use crate::merge::params::Scalar;

    /// Plain f64 RAM / RAM+ on whole vectors.
    fn reference(base: &[f32], models: &[Vec<f32>], eps: f64, plus: Option<(f64, f64)>) -> Vec<f64> {
        let n = base.len();
        let tv: Vec<Vec<f64>> = models.iter().map(|m| (0..n).map(|e| m[e] as f64 - base[e] as f64).collect()).collect();
        let count: Vec<usize> = (0..n).map(|e| tv.iter().filter(|t| t[e].abs() > eps).count()).collect();
        let lambda: Vec<f64> = tv
            .iter()
            .map(|t| match plus {
                None => 1.0,
                Some((r, alpha)) => {
                    let shared = (0..n).filter(|&e| t[e].abs() > eps && count[e] > 1).count() as f64;
                    let unique = (0..n).filter(|&e| t[e].abs() > eps && count[e] == 1).count() as f64;
                    1.0 + r * (shared / unique.max(eps)).clamp(0.0, alpha)
                }
            })
            .collect();
        (0..n)
            .map(|e| {
                let mut s = base[e] as f64;
                for (t, l) in tv.iter().zip(&lambda) {
                    if t[e].abs() > eps {
                        s += if count[e] == 1 { t[e] * l } else { t[e] / count[e] as f64 };
                    }
                }
                s
            })
            .collect()
    }

    #[test]
    fn matches_an_f64_reference() {
        let n = 3000;
        let base = randn(1, n, 1.0);
        // Each model leaves a different part of the base untouched, so unique, shared and unchanged elements occur.
        let models: Vec<Vec<f32>> = (0..3)
            .map(|k| {
                let d = randn(10 + k as u64, n, 0.01);
                base.iter()
                    .zip(d)
                    .enumerate()
                    .map(|(e, (b, d))| if (e + k) % (k + 2) == 0 { *b } else { b + d })
                    .collect()
            })
            .collect();
        let mut all = vec![base.clone()];
        all.extend(models.iter().cloned());
        for (method, plus) in [(&RAM, None), (&RAMPLUS_TL, Some((0.5, 0.9)))] {
            let shared: Vec<(&str, Scalar)> = match plus {
                None => vec![("epsilon", Scalar::Num(1e-5))],
                Some((r, a)) => vec![("epsilon", Scalar::Num(1e-5)), ("r", Scalar::Num(r)), ("alpha", Scalar::Num(a))],
            };
            let p = params(&shared, vec![vec![]; 4]);
            let got = run(method, &all, Some(0), &p);
            let want = reference(&base, &models, 1e-5, plus);
            for (e, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((*g as f64 - w).abs() <= 1e-6 * (1.0 + w.abs()), "{} {e}: {g} vs {w}", method.name());
            }
        }
    }
}
