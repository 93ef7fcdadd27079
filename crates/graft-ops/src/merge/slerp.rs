//! Spherical linear interpolation between the base (t = 0) and one other model (t = 1), mergekit's rule: each tensor
//! is flattened; copies normalised by their L2 norms (only where the norm exceeds 1e-8) give `dot`, clamped to
//! [-1, 1]; if `|dot| > 0.9995` the result is the lerp `(1 - t) a + t b` of the raw tensors, otherwise
//! `theta = acos(dot)`, `s0 = sin((1 - t) theta) / sin(theta)`, `s1 = sin(t theta) / sin(theta)` and the result is
//! `s0 a + s1 b`. The norms and the dot product are one chunked pre-pass with f64 accumulation (mergekit: f32).

use std::ops::Range;

use super::method::{AlphaTarget, BaseRole, Contract, Ctx, Kernel, MergeMethod, TensorInputs};
use super::params::{Default, Kind, ParamDef, Scope, TensorParams};
use super::scratch::{blocked, blocked_pieces};
use crate::error::Result;

pub struct Slerp;

const PARAMS: &[ParamDef] =
    &[ParamDef::new("t", Kind::Float, Scope::Shared, Default::Required, "interpolation position: 0 = base, 1 = other")];

pub const DOT_THRESHOLD: f64 = 0.9995;
pub const NORM_EPS: f64 = 1e-8;

/// The coefficients (s0, s1) of the base and the other model, from the sums of squares and the dot product.
pub fn coefficients(t: f64, aa: f64, bb: f64, ab: f64) -> (f64, f64) {
    let na = if aa.sqrt() > NORM_EPS { aa.sqrt() } else { 1.0 };
    let nb = if bb.sqrt() > NORM_EPS { bb.sqrt() } else { 1.0 };
    let dot = (ab / (na * nb)).clamp(-1.0, 1.0);
    if dot.abs() > DOT_THRESHOLD {
        return (1.0 - t, t);
    }
    let theta = dot.acos();
    let s = theta.sin();
    (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s)
}

struct SlerpKernel<'a> {
    inputs: TensorInputs<'a>,
    a: usize,
    b: usize,
    s0: f32,
    s1: f32,
}

impl SlerpKernel<'_> {
    /// One cache-sized block of the interpolated tensor into `x`.
    fn block(&self, r: Range<usize>, x: &mut [f32]) -> Result<()> {
        self.inputs.read_into(self.a, r.clone(), x)?;
        // t = 0 and t = 1 must return an input exactly, whatever the other holds.
        if self.s1 != 0.0 {
            let y = self.inputs.read(self.b, r)?;
            if self.s0 == 0.0 {
                x.iter_mut().zip(&y).for_each(|(u, v)| *u = v * self.s1);
            } else {
                x.iter_mut().zip(&y).for_each(|(u, v)| *u = self.s0 * *u + self.s1 * v);
            }
        } else if self.s0 != 1.0 {
            x.iter_mut().for_each(|u| *u *= self.s0);
        }
        self.inputs.arithmetic.round(x);
        Ok(())
    }
}

impl Kernel for SlerpKernel<'_> {
    fn compute(&self, range: Range<usize>) -> Result<Vec<f32>> {
        blocked(range, |r, x| self.block(r, x))
    }
    fn compute_pieces(&self, range: Range<usize>, sink: &mut dyn FnMut(&[f32])) -> Result<()> {
        blocked_pieces(range, |r, x| self.block(r, x), sink)
    }
}

impl MergeMethod for Slerp {
    fn name(&self) -> &'static str {
        "slerp"
    }
    fn about(&self) -> &'static str {
        "spherical interpolation between the base and one other model"
    }
    fn params(&self) -> &'static [ParamDef] {
        PARAMS
    }
    fn contract(&self) -> Contract {
        Contract { base: BaseRole::FirstEndpoint, min_inputs: 2, max_inputs: Some(2) }
    }
    fn snr_alpha(&self) -> Option<AlphaTarget> {
        Some(AlphaTarget::Shared("t"))
    }
    fn prepare<'a>(&self, inputs: TensorInputs<'a>, p: &TensorParams, ctx: &Ctx) -> Result<Box<dyn Kernel + 'a>> {
        let t = p.f64("t")?;
        let a = inputs.base_index()?;
        let b = 1 - a;
        let parts = ctx.chunked(inputs.numel(), |r| {
            let (mut aa, mut bb, mut ab) = (0f64, 0f64, 0f64);
            for r in super::scratch::blocks(r.clone()) {
                let x = inputs.read(a, r.clone())?;
                let y = inputs.read(b, r)?;
                for (&u, &v) in x.iter().zip(&y) {
                    let (u, v) = (u as f64, v as f64);
                    aa += u * u;
                    bb += v * v;
                    ab += u * v;
                }
            }
            inputs.release_pages(r);
            Ok([aa, bb, ab])
        })?;
        let [aa, bb, ab] = parts.iter().fold([0f64; 3], |s, p| [s[0] + p[0], s[1] + p[1], s[2] + p[2]]);
        let (s0, s1) = coefficients(t, aa, bb, ab);
        Ok(Box::new(SlerpKernel { inputs, a, b, s0: s0 as f32, s1: s1 as f32 }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::method::testing::*;
    use crate::merge::params::Scalar;

    fn slerp(a: &[f32], b: &[f32], t: f64) -> Vec<f32> {
        run(&Slerp, &[a.to_vec(), b.to_vec()], Some(0), &params(&[("t", Scalar::Num(t))], vec![vec![], vec![]]))
    }

    /// Plain f64 slerp of the flattened tensors.
    fn reference(a: &[f32], b: &[f32], t: f64) -> Vec<f64> {
        let na = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let nb = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 / na * y as f64 / nb).sum();
        let th = dot.clamp(-1.0, 1.0).acos();
        a.iter()
            .zip(b)
            .map(|(&x, &y)| ((1.0 - t) * th).sin() / th.sin() * x as f64 + (t * th).sin() / th.sin() * y as f64)
            .collect()
    }

    #[test]
    fn matches_an_f64_reference() {
        let a = randn(1, 3000, 1.0);
        let b = randn(2, 3000, 2.0);
        for t in [0.1, 0.5, 0.77] {
            let got = slerp(&a, &b, t);
            for (g, r) in got.iter().zip(reference(&a, &b, t)) {
                assert!((*g as f64 - r).abs() <= 1e-5 * (1.0 + r.abs()), "{g} vs {r}");
            }
        }
    }

    #[test]
    fn endpoints_return_the_inputs_and_parallel_inputs_lerp() {
        let a = randn(1, 3000, 1.0);
        let b = randn(2, 3000, 2.0);
        assert_eq!(slerp(&a, &b, 0.0), a);
        assert_eq!(slerp(&a, &b, 1.0), b);
        // b = 2a: dot = 1 > 0.9995, so the lerp of the raw tensors: (1 - t) a + t 2a = 1.5 a at t = 0.5.
        let b2: Vec<f32> = a.iter().map(|x| 2.0 * x).collect();
        for (g, x) in slerp(&a, &b2, 0.5).iter().zip(&a) {
            assert!((g - 1.5 * x).abs() <= 1e-6 * x.abs().max(1.0));
        }
        // Orthogonal unit vectors at t = 0.5: both coefficients sin(pi/4)/sin(pi/2) = 1/sqrt(2).
        let got = slerp(&[1.0, 0.0], &[0.0, 1.0], 0.5);
        assert!((got[0] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-7 && (got[1] - got[0]).abs() < 1e-7);
    }
}
