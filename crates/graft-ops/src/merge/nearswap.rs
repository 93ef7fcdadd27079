//! NearSwap (mergekit's `nearswap`): take the other model's value where it is near the base's, keep the base's where
//! they differ a lot. Per element, with base `a`, other model `b` and threshold `t > 0`:
//! `w = clamp(t / |a - b|, 0, 1)` (1 where `a == b`, or where the quotient is not finite), result `w b + (1 - w) a`.
//! So entries closer than `t` are swapped outright, and farther ones move toward `b` by `t / |a - b|`.
//!
//! Elementwise, in f32: `t / d` is computed as `(1 / d) * t`, as torch evaluates a scalar divided by a tensor; in
//! mergekit mode every step is rounded to the working dtype.

use std::ops::Range;

use super::method::{BaseRole, Contract, Ctx, Kernel, MergeMethod, TensorInputs};
use super::params::{Default, Kind, ParamDef, Scope, TensorParams};
use super::scratch::blocked;
use crate::error::{Error, Result};

pub struct NearSwap;

const PARAMS: &[ParamDef] = &[ParamDef::new(
    "t",
    Kind::Float,
    Scope::Shared,
    Default::Required,
    "sameness threshold (> 0): entries closer than t take the other model's value",
)];

struct NearSwapKernel<'a> {
    inputs: TensorInputs<'a>,
    base: usize,
    other: usize,
    t: f32,
}

impl Kernel for NearSwapKernel<'_> {
    fn compute(&self, range: Range<usize>) -> Result<Vec<f32>> {
        let r = |x: f32| self.inputs.arithmetic.r(x);
        blocked(range, |block, x| {
            self.inputs.read_into(self.base, block.clone(), x)?;
            let y = self.inputs.read(self.other, block)?;
            for (a, &b) in x.iter_mut().zip(&y) {
                let d = r((*a - b).abs());
                let w = r(r(1.0 / d) * self.t);
                let w = if w.is_finite() { w.clamp(0.0, 1.0) } else { 1.0 };
                *a = r(r(w * b) + r(r(1.0 - w) * *a));
            }
            Ok(())
        })
    }
}

impl MergeMethod for NearSwap {
    fn name(&self) -> &'static str {
        "nearswap"
    }
    fn about(&self) -> &'static str {
        "take the other model's entries where they are within t of the base's, interpolate by t/|diff| elsewhere"
    }
    fn params(&self) -> &'static [ParamDef] {
        PARAMS
    }
    fn contract(&self) -> Contract {
        Contract { base: BaseRole::TaskVectorBase, min_inputs: 2, max_inputs: Some(2) }
    }
    fn prepare<'a>(&self, inputs: TensorInputs<'a>, p: &TensorParams, _ctx: &Ctx) -> Result<Box<dyn Kernel + 'a>> {
        let t = p.f64("t")?;
        if !(t > 0.0 && t.is_finite()) {
            return Err(Error::usage(format!("tensor '{}': nearswap's t must be a number > 0, got {t}", inputs.name)));
        }
        let base = inputs.base_index()?;
        let other = inputs.non_base()[0];
        Ok(Box::new(NearSwapKernel { inputs, base, other, t: t as f32 }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::method::testing::*;
    use crate::merge::params::Scalar;

    /// Plain f64 NearSwap.
    fn reference(a: &[f32], b: &[f32], t: f64) -> Vec<f64> {
        a.iter()
            .zip(b)
            .map(|(&a, &b)| {
                let (a, b) = (a as f64, b as f64);
                let q = t / (a - b).abs();
                let w = if q.is_finite() { q.clamp(0.0, 1.0) } else { 1.0 };
                w * b + (1.0 - w) * a
            })
            .collect()
    }

    #[test]
    fn matches_an_f64_reference() {
        let n = 5000;
        let a = randn(1, n, 1.0);
        // Differences spread over several scales around t, so both the swapped and the interpolated regime occur;
        // every 7th entry equal to the base (0 / 0 would be NaN: the weight is 1 there).
        let b: Vec<f32> = a
            .iter()
            .zip(randn(2, n, 1.0))
            .enumerate()
            .map(|(i, (x, d))| if i % 7 == 0 { *x } else { x + d * 0.01 * (1 + i % 50) as f32 })
            .collect();
        for t in [0.001, 0.05, 0.3] {
            let p = params(&[("t", Scalar::Num(t))], vec![vec![], vec![]]);
            let got = run(&NearSwap, &[a.clone(), b.clone()], Some(0), &p);
            let want = reference(&a, &b, t);
            let (mut swapped, mut between) = (0, 0);
            for (e, (g, r)) in got.iter().zip(&want).enumerate() {
                assert!((*g as f64 - r).abs() <= 1e-6 * (1.0 + r.abs()), "{e}: {g} vs {r} (t {t})");
                if (a[e] as f64 - b[e] as f64).abs() <= t {
                    swapped += 1;
                    assert_eq!(*g, b[e], "{e}: within t the other model's value is taken exactly");
                } else {
                    between += 1;
                }
            }
            assert!(swapped > 0 && between > 0, "t {t}: {swapped} swapped, {between} interpolated");
        }
        // The base may come second among the inputs.
        let p = params(&[("t", Scalar::Num(0.05))], vec![vec![], vec![]]);
        assert_eq!(
            run(&NearSwap, &[b.clone(), a.clone()], Some(1), &p),
            run(&NearSwap, &[a.clone(), b.clone()], Some(0), &p)
        );
    }

    #[test]
    fn refuses_a_threshold_that_is_not_positive() {
        for t in [0.0, -1.0] {
            let p = params(&[("t", Scalar::Num(t))], vec![vec![], vec![]]);
            let x = randn(1, 10, 1.0);
            let e = run_full(&NearSwap, &[x.clone(), x], &[10], Some(0), &p, crate::merge::Arithmetic::F32, 0, 1);
            assert!(e.unwrap_err().to_string().contains("t must be a number > 0"));
        }
    }
}
