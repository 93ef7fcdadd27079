//! Linear merge (model soup): `sum_i w_i x_i`, divided by `sum_i w_i` when `normalize` (default true). mergekit
//! computes it in f32 whatever the working dtype, accumulating with torch's fused multiply-add (one rounding per
//! model); graft does the same, so results agree bit for bit before the final rounding.

use std::ops::Range;

use super::method::{Arithmetic, BaseRole, Contract, Ctx, Kernel, MergeMethod, TensorInputs};
use super::params::{Default, Kind, ParamDef, Scope, TensorParams};
use super::scratch::{blocked, blocked_pieces};
use crate::error::{Error, Result};

pub struct Linear;

const PARAMS: &[ParamDef] = &[
    ParamDef::new("weight", Kind::Float, Scope::Input, Default::Required, "weight of each model"),
    ParamDef::new("normalize", Kind::Bool, Scope::Shared, Default::Bool(true), "divide by the sum of the weights"),
];

/// `acc += x * w` with one rounding per element (a fused multiply-add), as torch's `addcmul` computes it. Uses the
/// CPU's FMA instructions where it has them; `f32::mul_add` is exact everywhere, so results never depend on it.
pub fn fused_accumulate(acc: &mut [f32], x: &[f32], w: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("avx2") {
        // SAFETY: the features this function is compiled for were just detected.
        unsafe { fused_accumulate_fma(acc, x, w) };
        return;
    }
    for (a, v) in acc.iter_mut().zip(x) {
        *a = v.mul_add(w, *a);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fused_accumulate_fma(acc: &mut [f32], x: &[f32], w: f32) {
    for (a, v) in acc.iter_mut().zip(x) {
        *a = v.mul_add(w, *a);
    }
}

/// `x = x * w + 0` with one rounding: the first term of the sum in place, as `fused_accumulate` onto zeros would
/// compute it (a product that is or rounds to -0 ends as +0 or -0 exactly as there), without the zeros.
fn fused_first(x: &mut [f32], w: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("avx2") {
        // SAFETY: the features this function is compiled for were just detected.
        unsafe { fused_first_fma(x, w) };
        return;
    }
    for v in x.iter_mut() {
        *v = v.mul_add(w, 0.0);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fused_first_fma(x: &mut [f32], w: f32) {
    for v in x.iter_mut() {
        *v = v.mul_add(w, 0.0);
    }
}

struct LinearKernel<'a> {
    inputs: TensorInputs<'a>,
    weights: Vec<f32>,
    divisor: Option<f32>,
    arithmetic: Arithmetic,
}

impl LinearKernel<'_> {
    /// One cache-sized block of the merged tensor into `acc`.
    fn block(&self, r: Range<usize>, acc: &mut [f32]) -> Result<()> {
        // The first model is read straight into the sum: no zeroed accumulator, one buffer fewer.
        self.inputs.read_into(0, r.clone(), acc)?;
        fused_first(acc, self.weights[0]);
        for (i, &w) in self.weights.iter().enumerate().skip(1) {
            let x = self.inputs.read(i, r.clone())?;
            fused_accumulate(acc, &x, w);
        }
        if let Some(d) = self.divisor {
            acc.iter_mut().for_each(|a| *a /= d);
        }
        self.arithmetic.round(acc);
        Ok(())
    }
}

impl Kernel for LinearKernel<'_> {
    fn compute(&self, range: Range<usize>) -> Result<Vec<f32>> {
        blocked(range, |r, acc| self.block(r, acc))
    }
    fn compute_pieces(&self, range: Range<usize>, sink: &mut dyn FnMut(&[f32])) -> Result<()> {
        blocked_pieces(range, |r, acc| self.block(r, acc), sink)
    }
}

impl MergeMethod for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }
    fn about(&self) -> &'static str {
        "weighted average of the models"
    }
    fn params(&self) -> &'static [ParamDef] {
        PARAMS
    }
    fn contract(&self) -> Contract {
        Contract { base: BaseRole::Ignored, min_inputs: 1, max_inputs: None }
    }
    fn prepare<'a>(&self, inputs: TensorInputs<'a>, p: &TensorParams, _ctx: &Ctx) -> Result<Box<dyn Kernel + 'a>> {
        let weights: Vec<f32> =
            (0..inputs.len()).map(|i| p.input_f64(i, "weight").map(|w| w as f32)).collect::<Result<_>>()?;
        let divisor = if p.bool("normalize")? {
            let s: f32 = weights.iter().sum();
            if s == 0.0 {
                return Err(Error::invalid(format!(
                    "tensor '{}': the weights sum to zero, so normalize would divide by zero (set normalize: false)",
                    inputs.name
                )));
            }
            Some(s)
        } else {
            None
        };
        let arithmetic = inputs.arithmetic;
        Ok(Box::new(LinearKernel { inputs, weights, divisor, arithmetic }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::method::testing::*;
    use crate::merge::params::Scalar;

    #[test]
    fn matches_an_f64_reference() {
        let xs: Vec<Vec<f32>> = (0..3).map(|s| randn(s, 1000, 1.0)).collect();
        let w = [0.2, 0.5, 0.9];
        for normalize in [true, false] {
            let p = params(&[("normalize", Scalar::Bool(normalize))], w.iter().map(|&w| vec![("weight", w)]).collect());
            let got = run(&Linear, &xs, None, &p);
            for e in 0..1000 {
                let mut r: f64 = (0..3).map(|i| w[i] * xs[i][e] as f64).sum();
                if normalize {
                    r /= w.iter().sum::<f64>();
                }
                assert!((got[e] as f64 - r).abs() <= 1e-6 * (1.0 + r.abs()), "{e}: {} vs {r}", got[e]);
            }
        }
    }

    #[test]
    fn one_model_with_weight_one_is_the_identity_bit_for_bit() {
        let x = randn(3, 5000, 3.0);
        let other = randn(4, 5000, 3.0);
        let p = params(&[("normalize", Scalar::Bool(false))], vec![vec![("weight", 1.0)], vec![("weight", 0.0)]]);
        let got = run(&Linear, &[x.clone(), other], None, &p);
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            x.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        let p = params(&[("normalize", Scalar::Bool(true))], vec![vec![("weight", 1.0)]]);
        assert_eq!(run(&Linear, std::slice::from_ref(&x), None, &p), x);
    }

    #[test]
    fn zero_weight_sum_is_an_error() {
        let p = params(&[("normalize", Scalar::Bool(true))], vec![vec![("weight", 1.0)], vec![("weight", -1.0)]]);
        let x = randn(1, 10, 1.0);
        let r = run_full(&Linear, &[x.clone(), x], &[10], None, &p, Arithmetic::F32, 0, 1);
        assert!(r.unwrap_err().to_string().contains("sum to zero"));
    }
}
