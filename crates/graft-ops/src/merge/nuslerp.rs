//! NuSLERP (mergekit's `nuslerp`): spherical interpolation of exactly two models, with an optional base. With a base
//! the two task vectors `v_k = x_k - base` are interpolated and the base added back; without one the models
//! themselves. The share of the second model is `t = w_1 / (w_0 + w_1)` (0.5 when the weights sum to about 0).
//!
//! Interpolated vectors: the whole flattened tensor (`nuslerp_flatten`, the default), else each row
//! (`nuslerp_row_wise: false`, vectors along the last dimension) or each column (`nuslerp_row_wise: true`, vectors
//! along the first dimension). For each: `cos = (v_0 . v_1) / (max(|v_0|, 1e-7) max(|v_1|, 1e-7))`, clamped to
//! [-1, 1]; when `1 - cos^2 <= 1e-16` (colinear) the plain lerp `(1 - t) v_0 + t v_1`, else
//! `(sin((1 - t) theta) v_0 + sin(t theta) v_1) / sin(theta)`.
//!
//! A chunked pre-pass gathers each vector's dot products in f64; the kernel applies the two coefficients of the
//! element's vector.

use std::ops::Range;

use super::karcher::{gram, SumKernel};
use super::method::{BaseRole, Contract, Ctx, Kernel, MergeMethod, TensorInputs};
use super::params::{Default, Kind, ParamDef, Scope, TensorParams};
use super::scratch::blocked;
use crate::error::{Error, Result};

pub struct NuSlerp;

const PARAMS: &[ParamDef] = &[
    ParamDef::new("weight", Kind::Float, Scope::NonBase, Default::Required, "the model's share of the interpolation"),
    ParamDef::new(
        "nuslerp_row_wise",
        Kind::Bool,
        Scope::Shared,
        Default::Bool(false),
        "without flattening: interpolate columns (vectors along the first dimension) instead of rows",
    ),
    ParamDef::new(
        "nuslerp_flatten",
        Kind::Bool,
        Scope::Shared,
        Default::Bool(true),
        "interpolate the whole flattened tensor as one vector",
    ),
];

/// The coefficients `(k_0, k_1)` of `k_0 v_0 + k_1 v_1` from the dot products `v_0.v_0`, `v_1.v_1`, `v_0.v_1`.
pub fn coefficients(g00: f64, g11: f64, g01: f64, t: f64) -> (f64, f64) {
    const NORM_FLOOR: f64 = 1e-7;
    const EPS: f64 = 1e-8;
    let cos = (g01 / (g00.max(0.0).sqrt().max(NORM_FLOOR) * g11.max(0.0).sqrt().max(NORM_FLOOR))).clamp(-1.0, 1.0);
    if 1.0 - cos * cos <= EPS * EPS {
        return (1.0 - t, t);
    }
    let theta = cos.acos();
    let s = theta.sin();
    (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s)
}

/// How elements map to the interpolated vectors when the tensor is not flattened.
#[derive(Clone, Copy)]
enum Vectors {
    /// Contiguous rows of this length.
    Rows(usize),
    /// Vectors along the first dimension: element `e` belongs to vector `e % count`.
    Columns(usize),
}

impl Vectors {
    fn count(self, numel: usize) -> usize {
        match self {
            Vectors::Rows(len) => numel / len.max(1),
            Vectors::Columns(count) => count,
        }
    }
    fn of(self, e: usize) -> usize {
        match self {
            Vectors::Rows(len) => e / len,
            Vectors::Columns(count) => e % count,
        }
    }
}

struct PerVectorKernel<'a> {
    inputs: TensorInputs<'a>,
    base: Option<usize>,
    models: [usize; 2],
    vectors: Vectors,
    coef: Vec<(f64, f64)>,
}

impl Kernel for PerVectorKernel<'_> {
    fn compute(&self, range: Range<usize>) -> Result<Vec<f32>> {
        blocked(range, |block, out| {
            let start = block.start;
            let b = match self.base {
                Some(bi) => Some(self.inputs.read(bi, block.clone())?),
                None => None,
            };
            let x0 = self.inputs.read(self.models[0], block.clone())?;
            let x1 = self.inputs.read(self.models[1], block)?;
            for (k, o) in out.iter_mut().enumerate() {
                let bv = b.as_ref().map_or(0.0, |b| b[k]);
                let (k0, k1) = self.coef[self.vectors.of(start + k)];
                *o = (k0 * (x0[k] - bv) as f64 + k1 * (x1[k] - bv) as f64) as f32 + bv;
            }
            Ok(())
        })
    }
}

impl MergeMethod for NuSlerp {
    fn name(&self) -> &'static str {
        "nuslerp"
    }
    fn about(&self) -> &'static str {
        "NuSLERP: spherical interpolation of two models (or their task vectors against an optional base), \
         whole-tensor, row- or column-wise"
    }
    fn params(&self) -> &'static [ParamDef] {
        PARAMS
    }
    fn contract(&self) -> Contract {
        Contract { base: BaseRole::OptionalBase, min_inputs: 2, max_inputs: Some(3) }
    }
    fn prepare<'a>(&self, inputs: TensorInputs<'a>, p: &TensorParams, ctx: &Ctx) -> Result<Box<dyn Kernel + 'a>> {
        let models = inputs.non_base();
        let [m0, m1] = models[..] else {
            return Err(Error::usage(format!(
                "tensor '{}': nuslerp merges exactly two models besides the base; got {}",
                inputs.name,
                models.len()
            )));
        };
        let (w0, w1) = (p.input_f64(m0, "weight")?, p.input_f64(m1, "weight")?);
        let total = w0 + w1;
        let t = if total.abs() < 1e-6 { 0.5 } else { w1 / total };
        let base = inputs.base;
        if p.bool("nuslerp_flatten")? || inputs.shape.len() < 2 {
            // A vector (or scalar) is one row and one column alike.
            let g = gram(&inputs, ctx, &[m0, m1], base)?;
            let (k0, k1) = coefficients(g[0][0], g[1][1], g[0][1], t);
            return Ok(Box::new(SumKernel { inputs, base, terms: vec![(m0, k0 as f32), (m1, k1 as f32)] }));
        }
        let n = inputs.numel();
        let vectors = if p.bool("nuslerp_row_wise")? {
            Vectors::Columns(n / inputs.shape[0].max(1))
        } else {
            Vectors::Rows(*inputs.shape.last().unwrap())
        };
        let count = vectors.count(n);
        // Each chunk returns the dot products of the vectors it touches, from the first of them on.
        let parts = ctx.chunked(n, |r| {
            if r.is_empty() {
                return Ok((0, Vec::new()));
            }
            let b = match base {
                Some(bi) => Some(inputs.read(bi, r.clone())?),
                None => None,
            };
            let x0 = inputs.read(m0, r.clone())?;
            let x1 = inputs.read(m1, r.clone())?;
            let (first, len) = match vectors {
                Vectors::Rows(_) => (vectors.of(r.start), vectors.of(r.end - 1) - vectors.of(r.start) + 1),
                Vectors::Columns(c) => (0, c),
            };
            let mut sums = vec![[0f64; 3]; len];
            for (k, (&y0, &y1)) in x0.iter().zip(x1.iter()).enumerate() {
                let bv = b.as_ref().map_or(0.0, |b| b[k]);
                let (a, c) = ((y0 - bv) as f64, (y1 - bv) as f64);
                let s = &mut sums[vectors.of(r.start + k) - first];
                s[0] += a * a;
                s[1] += c * c;
                s[2] += a * c;
            }
            Ok((first, sums))
        })?;
        let mut dots = vec![[0f64; 3]; count];
        for (first, sums) in parts {
            for (d, s) in dots[first..].iter_mut().zip(sums) {
                (0..3).for_each(|q| d[q] += s[q]);
            }
        }
        let coef = dots.iter().map(|d| coefficients(d[0], d[1], d[2], t)).collect();
        Ok(Box::new(PerVectorKernel { inputs, base, models: [m0, m1], vectors, coef }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::method::testing::*;
    use crate::merge::params::Scalar;

    /// Plain f64 slerp of two vectors, weights and all, straight from the module comment.
    fn slerp(v0: &[f64], v1: &[f64], t: f64) -> Vec<f64> {
        let d = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let cos = (d(v0, v1) / (d(v0, v0).sqrt().max(1e-7) * d(v1, v1).sqrt().max(1e-7))).clamp(-1.0, 1.0);
        if 1.0 - cos * cos <= 1e-16 {
            return v0.iter().zip(v1).map(|(a, b)| (1.0 - t) * a + t * b).collect();
        }
        let th = cos.acos();
        v0.iter().zip(v1).map(|(a, b)| (((1.0 - t) * th).sin() * a + (t * th).sin() * b) / th.sin()).collect()
    }

    /// The reference over a [rows, cols] tensor: whole, per row or per column.
    fn reference(b: Option<&[f32]>, x0: &[f32], x1: &[f32], rows: usize, t: f64, mode: &str) -> Vec<f64> {
        let n = x0.len();
        let cols = n / rows;
        let bv = |e: usize| b.map_or(0.0, |b| b[e] as f64);
        let v = |x: &[f32], e: usize| x[e] as f64 - bv(e);
        let groups: Vec<Vec<usize>> = match mode {
            "flat" => vec![(0..n).collect()],
            "rows" => (0..rows).map(|r| (r * cols..(r + 1) * cols).collect()).collect(),
            _ => (0..cols).map(|c| (0..rows).map(|r| r * cols + c).collect()).collect(),
        };
        let mut out = vec![0.0; n];
        for g in groups {
            let a: Vec<f64> = g.iter().map(|&e| v(x0, e)).collect();
            let c: Vec<f64> = g.iter().map(|&e| v(x1, e)).collect();
            for (&e, r) in g.iter().zip(slerp(&a, &c, t)) {
                out[e] = r + bv(e);
            }
        }
        out
    }

    #[test]
    fn matches_an_f64_reference_whole_rowwise_and_columnwise_with_and_without_base() {
        let (rows, cols) = (30, 70);
        let n = rows * cols;
        let base = randn(1, n, 1.0);
        let x0: Vec<f32> = base.iter().zip(randn(2, n, 0.1)).map(|(b, d)| b + d).collect();
        let x1: Vec<f32> = base.iter().zip(randn(3, n, 0.2)).map(|(b, d)| b + d).collect();
        for (flatten, row_wise, mode) in [(true, false, "flat"), (false, false, "rows"), (false, true, "cols")] {
            let shared = [("nuslerp_flatten", Scalar::Bool(flatten)), ("nuslerp_row_wise", Scalar::Bool(row_wise))];
            for with_base in [false, true] {
                let (inputs, b, ws) = if with_base {
                    (
                        vec![base.clone(), x0.clone(), x1.clone()],
                        Some(0),
                        vec![vec![], vec![("weight", 0.3)], vec![("weight", 0.9)]],
                    )
                } else {
                    (vec![x0.clone(), x1.clone()], None, vec![vec![("weight", 0.3)], vec![("weight", 0.9)]])
                };
                let p = params(&shared, ws);
                let got =
                    run_full(&NuSlerp, &inputs, &[rows, cols], b, &p, crate::merge::Arithmetic::F32, 0, 3).unwrap();
                let want = reference(with_base.then_some(&base[..]), &x0, &x1, rows, 0.75, mode);
                for (e, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!((*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()), "{mode} base {with_base} {e}: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn colinear_vectors_lerp_and_zero_weights_split_evenly() {
        assert_eq!(coefficients(4.0, 16.0, 8.0, 0.25), (0.75, 0.25));
        // Orthogonal unit vectors at t = 0.5: both coefficients sin(pi/4) / sin(pi/2).
        let (k0, k1) = coefficients(1.0, 1.0, 0.0, 0.5);
        assert!((k0 - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-12 && (k1 - k0).abs() < 1e-12);
        let x = randn(5, 10, 1.0);
        let y = randn(6, 10, 1.0);
        let shared = [("nuslerp_flatten", Scalar::Bool(true)), ("nuslerp_row_wise", Scalar::Bool(false))];
        let p0 = params(&shared, vec![vec![("weight", 0.0)], vec![("weight", 0.0)]]);
        let p1 = params(&shared, vec![vec![("weight", 1.0)], vec![("weight", 1.0)]]);
        assert_eq!(run(&NuSlerp, &[x.clone(), y.clone()], None, &p0), run(&NuSlerp, &[x, y], None, &p1));
    }
}
