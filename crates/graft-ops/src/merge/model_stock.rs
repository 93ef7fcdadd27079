//! Model stock: with base `w0` and fine-tunes `w_1..w_N` (N >= 2), the offsets `o_i = w_i - w0`, their mean pairwise
//! cosine `c` (each cosine `o_i . o_j / max(|o_i| |o_j|, 1e-6)` clamped to [-1, 1]), `t = N c / (1 + (N - 1) c)`
//! (0 where the denominator is below 1e-6 in magnitude), and the result `t * mean(w_i) + (1 - t) * w0`. With
//! `filter_wise`, cosines and `t` are per line of the last axis (per row of a matrix), as mergekit does; otherwise per
//! flattened tensor. The dot products and norms are a chunked pre-pass with f64 accumulation.

use std::ops::Range;

use super::method::{BaseRole, Contract, Ctx, Kernel, MergeMethod, TensorInputs};
use super::params::{Default, Kind, ParamDef, Scope, TensorParams};
use super::scratch::Buf;
use crate::error::Result;

pub struct ModelStock;

const PARAMS: &[ParamDef] = &[ParamDef::new(
    "filter_wise",
    Kind::Bool,
    Scope::Shared,
    Default::Bool(false),
    "one interpolation factor per row instead of per tensor",
)];

/// The interpolation factor from the mean cosine and the number of fine-tunes.
pub fn factor(cos: f64, n: usize) -> f64 {
    let den = 1.0 + (n as f64 - 1.0) * cos;
    if den.abs() < 1e-6 {
        0.0
    } else {
        n as f64 * cos / den
    }
}

struct StockKernel<'a> {
    inputs: TensorInputs<'a>,
    base: usize,
    others: Vec<usize>,
    /// One factor per line (a single one when not filter-wise).
    t: Vec<f32>,
    line: usize,
}

impl Kernel for StockKernel<'_> {
    fn compute(&self, range: Range<usize>) -> Result<Vec<f32>> {
        let w0 = self.inputs.read(self.base, range.clone())?;
        let mut sum = Buf::zeroed(range.len());
        for &i in &self.others {
            let x = self.inputs.read(i, range.clone())?;
            for (s, v) in sum.iter_mut().zip(&x) {
                *s += v;
            }
        }
        let count = self.others.len() as f32;
        let mut out = w0;
        for (k, (o, s)) in out.iter_mut().zip(&sum).enumerate() {
            let t = self.t[((range.start + k) / self.line).min(self.t.len() - 1)];
            *o = t * (s / count) + (1.0 - t) * *o;
        }
        self.inputs.arithmetic.round(&mut out);
        Ok(out.into_vec())
    }
}

impl MergeMethod for ModelStock {
    fn name(&self) -> &'static str {
        "model_stock"
    }
    fn about(&self) -> &'static str {
        "interpolate from the base toward the fine-tunes' mean by their offsets' mean cosine"
    }
    fn params(&self) -> &'static [ParamDef] {
        PARAMS
    }
    fn contract(&self) -> Contract {
        Contract { base: BaseRole::TaskVectorBase, min_inputs: 3, max_inputs: None }
    }
    fn prepare<'a>(&self, inputs: TensorInputs<'a>, p: &TensorParams, ctx: &Ctx) -> Result<Box<dyn Kernel + 'a>> {
        let base = inputs.base_index()?;
        let others = inputs.non_base();
        let n = inputs.numel();
        let line = if p.bool("filter_wise")? { inputs.shape.last().copied().unwrap_or(1).max(1) } else { n.max(1) };
        let lines = n.div_ceil(line).max(1);
        let m = others.len();
        let pairs: Vec<(usize, usize)> = (0..m).flat_map(|a| (a + 1..m).map(move |b| (a, b))).collect();
        // Per chunk: the first line it touches and, per touched line, squared norms then pairwise dots.
        let parts = ctx.chunked(n, |r| {
            let w0 = inputs.read(base, r.clone())?;
            let offs: Vec<Vec<f64>> = others
                .iter()
                .map(|&i| Ok(inputs.read(i, r.clone())?.iter().zip(&w0).map(|(x, b)| (x - b) as f64).collect()))
                .collect::<Result<_>>()?;
            let first = r.start / line;
            let last = (r.end - 1) / line;
            let mut acc = vec![vec![0f64; m + pairs.len()]; last - first + 1];
            for k in 0..r.len() {
                let a = &mut acc[(r.start + k) / line - first];
                for (j, o) in offs.iter().enumerate() {
                    a[j] += o[k] * o[k];
                }
                for (q, &(i, j)) in pairs.iter().enumerate() {
                    a[m + q] += offs[i][k] * offs[j][k];
                }
            }
            Ok((first, acc))
        })?;
        let mut total = vec![vec![0f64; m + pairs.len()]; lines];
        for (first, acc) in parts {
            for (l, a) in acc.into_iter().enumerate() {
                for (t, v) in total[first + l].iter_mut().zip(a) {
                    *t += v;
                }
            }
        }
        let t: Vec<f32> = total
            .iter()
            .map(|s| {
                let cos: f64 = pairs
                    .iter()
                    .enumerate()
                    .map(|(q, &(i, j))| (s[m + q] / (s[i].sqrt() * s[j].sqrt()).max(1e-6)).clamp(-1.0, 1.0))
                    .sum::<f64>()
                    / pairs.len().max(1) as f64;
                factor(cos, m) as f32
            })
            .collect();
        Ok(Box::new(StockKernel { inputs, base, others, t, line }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::method::testing::*;
    use crate::merge::params::Scalar;

    fn stock(inputs: &[Vec<f32>], shape: &[usize], filter_wise: bool) -> Vec<f32> {
        let p = params(&[("filter_wise", Scalar::Bool(filter_wise))], vec![vec![]; inputs.len()]);
        run_full(&ModelStock, inputs, shape, Some(0), &p, crate::merge::method::Arithmetic::F32, 0, 2).unwrap()
    }

    #[test]
    fn orthogonal_offsets_give_t_zero_and_equal_offsets_give_the_mean() {
        let w0 = vec![1f32, 2.0, 3.0, 4.0];
        let a = vec![2f32, 2.0, 3.0, 4.0]; // offset e0
        let b = vec![1f32, 3.0, 3.0, 4.0]; // offset e1, orthogonal: cos 0, t 0 -> the base
        assert_eq!(stock(&[w0.clone(), a.clone(), b], &[4], false), w0);
        // Identical offsets: cos 1, t = 2 / 2 = 1 -> mean of the fine-tunes = a.
        assert_eq!(stock(&[w0.clone(), a.clone(), a.clone()], &[4], false), a);
    }

    #[test]
    fn matches_an_f64_reference_per_tensor_and_per_row() {
        let (rows, cols) = (7, 300);
        let n = rows * cols;
        let w0 = randn(1, n, 1.0);
        let ws: Vec<Vec<f32>> = (2..5)
            .map(|s| w0.iter().zip(randn(s, n, 0.1)).zip(randn(9, n, 0.1)).map(|((x, d), c)| x + d + c).collect())
            .collect();
        let mut inputs = vec![w0.clone()];
        inputs.extend(ws.iter().cloned());
        for filter_wise in [false, true] {
            let got = stock(&inputs, &[rows, cols], filter_wise);
            let len = if filter_wise { cols } else { n };
            for start in (0..n).step_by(len) {
                let off: Vec<Vec<f64>> =
                    ws.iter().map(|w| (start..start + len).map(|k| (w[k] - w0[k]) as f64).collect()).collect();
                let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
                let mut cs = Vec::new();
                for i in 0..3 {
                    for j in i + 1..3 {
                        let dot: f64 = off[i].iter().zip(&off[j]).map(|(a, b)| a * b).sum();
                        cs.push(dot / (norm(&off[i]) * norm(&off[j])));
                    }
                }
                let c = cs.iter().sum::<f64>() / 3.0;
                let t = 3.0 * c / (1.0 + 2.0 * c);
                assert!(c > 0.3 && c < 0.7, "shared noise makes cos ~0.5: {c}");
                for k in start..start + len {
                    let mean = ws.iter().map(|w| w[k] as f64).sum::<f64>() / 3.0;
                    let r = t * mean + (1.0 - t) * w0[k] as f64;
                    assert!((got[k] as f64 - r).abs() < 1e-5, "{k}: {} vs {r}", got[k]);
                }
            }
        }
    }
}
