//! Fused CPU kernels of a llama-family decoder layer, each with its backward pass: RMSNorm, SwiGLU (`silu(gate) *
//! up`), the rotary embedding applied while moving a projection into attention-head order, and the scaled causal
//! softmax of the attention scores.
//!
//! candle runs each of these as a chain of elementwise ops (RMSNorm: square, mean, add, square root, divide, scale;
//! rotary: copy to head order, two halves, negation, concatenation, two products and a sum; attention: scale, mask,
//! softmax), every link a fresh tensor and, while training, one more kept for the backward pass. Here each is one
//! pass forward and one backward, in parallel over rows, with per-row reductions in f64 in a fixed order, so results
//! do not depend on the thread count. Weight gradients (RMSNorm's scale) are summed over fixed blocks of rows, then
//! over the blocks in order.
//!
//! A gradient is computed only for an operand that is tracked: a frozen RMSNorm scale gets none, nor does a
//! constant input (the residual stream below the first trained layer).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::{contiguous, dot_f64, unsupported, CResult, Exp};

fn last_dim(l: &Layout) -> usize {
    l.shape().dims().last().copied().unwrap_or(1).max(1)
}

fn is_tracked(t: &Tensor) -> bool {
    t.track_op()
}

// ---------------------------------------------------------------------------------------------------------------
// RMSNorm

/// `w * (x / sqrt(mean(x²) + eps))` over the last axis of `x` (any leading axes), `w` a vector of that length.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
}

struct RmsNorm {
    eps: f64,
}

/// `1 / sqrt(mean(x²) + eps)` of one row, the sum of squares in f64.
fn inv_rms<T: WithDType>(x: &[T], eps: f64) -> f64 {
    1.0 / (dot_f64(x, x) / x.len() as f64 + eps).sqrt()
}

fn check_norm_weight(l: &Layout, wl: &Layout, op: &str) -> CResult<usize> {
    let d = last_dim(l);
    if wl.shape().elem_count() != d {
        return Err(candle_core::Error::Msg(format!(
            "{op}: weight of {} values for rows of {d}",
            wl.shape().elem_count()
        )));
    }
    Ok(d)
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "graft-rms-norm"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout, ws: &CpuStorage, wl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let d = check_norm_weight(l, wl, self.name())?;
        dispatch!(s, "graft-rms-norm", |T| {
            let x = contiguous::<T>(s, l, self.name())?;
            let w = contiguous::<T>(ws, wl, self.name())?;
            let mut y = vec![T::from_f64(0.0); x.len()];
            y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(y, x)| {
                let r = inv_rms(x, self.eps);
                // The normalised value is rounded before the scale multiplies it, as transformers computes it.
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                    *y = w * T::from_f64(x.to_f64() * r);
                }
            });
            Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
        })
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, g: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let dx = match is_tracked(x) {
            true => Some(x.apply_op3_no_bwd(w, &g, &RmsNormGradInput { eps: self.eps })?),
            false => None,
        };
        let dw = match is_tracked(w) {
            true => Some(x.apply_op2_no_bwd(&g, &RmsNormGradWeight { eps: self.eps })?.reshape(w.shape())?),
            false => None,
        };
        Ok((dx, dw))
    }
}

/// dx_i = r w_i g_i - x_i r³ (Σ_j w_j g_j x_j) / d per row, r = 1 / rms(x).
struct RmsNormGradInput {
    eps: f64,
}

impl CustomOp3 for RmsNormGradInput {
    fn name(&self) -> &'static str {
        "graft-rms-norm-grad-input"
    }
    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let d = check_norm_weight(l, wl, self.name())?;
        dispatch!(s, "graft-rms-norm-grad-input", |T| {
            let x = contiguous::<T>(s, l, self.name())?;
            let w = contiguous::<T>(ws, wl, self.name())?;
            let g = contiguous::<T>(gs, gl, self.name())?;
            let mut dx = vec![T::from_f64(0.0); x.len()];
            dx.par_chunks_mut(d).zip(x.par_chunks(d).zip(g.par_chunks(d))).for_each(|(dx, (x, g))| {
                let r = inv_rms(x, self.eps);
                let wgx: f64 = w.iter().zip(g).zip(x).map(|((&w, &g), &x)| (w * g).to_f64() * x.to_f64()).sum();
                let c = r * r * r * wgx / d as f64;
                for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(w) {
                    *dx = T::from_f64(r * (w * g).to_f64() - x.to_f64() * c);
                }
            });
            Ok((T::to_cpu_storage_owned(dx), l.shape().clone()))
        })
    }
}

/// Rows per block of the scale's gradient: blocks are summed in parallel, then in order.
const ROWS_PER_BLOCK: usize = 32;

/// dw_i = Σ_rows g_i x_i r.
struct RmsNormGradWeight {
    eps: f64,
}

impl CustomOp2 for RmsNormGradWeight {
    fn name(&self) -> &'static str {
        "graft-rms-norm-grad-weight"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout, gs: &CpuStorage, gl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let d = last_dim(l);
        dispatch!(s, "graft-rms-norm-grad-weight", |T| {
            let x = contiguous::<T>(s, l, self.name())?;
            let g = contiguous::<T>(gs, gl, self.name())?;
            let blocks: Vec<Vec<f64>> = x
                .par_chunks(d * ROWS_PER_BLOCK)
                .zip(g.par_chunks(d * ROWS_PER_BLOCK))
                .map(|(x, g)| {
                    let mut acc = vec![0f64; d];
                    for (x, g) in x.chunks(d).zip(g.chunks(d)) {
                        let r = inv_rms(x, self.eps);
                        for ((a, &x), &g) in acc.iter_mut().zip(x).zip(g) {
                            *a += g.to_f64() * T::from_f64(x.to_f64() * r).to_f64();
                        }
                    }
                    acc
                })
                .collect();
            let mut total = vec![0f64; d];
            for b in &blocks {
                for (t, v) in total.iter_mut().zip(b) {
                    *t += v;
                }
            }
            Ok((T::to_cpu_storage_owned(super::from_f64_vec::<T>(&total)), Shape::from(d)))
        })
    }
}

// ---------------------------------------------------------------------------------------------------------------
// SwiGLU

/// `silu(gate) * up`, elementwise, for two tensors of one shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    if gate.shape() != up.shape() {
        return Err(candle_core::Error::Msg(format!(
            "graft-swiglu: gate {:?} and up {:?} differ",
            gate.dims(),
            up.dims()
        )));
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

struct SwiGlu;

fn sigmoid<T: Exp>(v: T) -> T {
    let one = T::from_f64(1.0);
    one / (one + (T::from_f64(0.0) - v).exp_())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "graft-swiglu"
    }
    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, us: &CpuStorage, ul: &Layout) -> CResult<(CpuStorage, Shape)> {
        dispatch!(gs, "graft-swiglu", |T| {
            let g = contiguous::<T>(gs, gl, self.name())?;
            let u = contiguous::<T>(us, ul, self.name())?;
            let mut y = vec![T::from_f64(0.0); g.len()];
            y.par_chunks_mut(4096).zip(g.par_chunks(4096).zip(u.par_chunks(4096))).for_each(|(y, (g, u))| {
                for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                    // silu rounded to the working precision before the product, as candle's silu then mul did.
                    *y = (g * sigmoid(g)) * u;
                }
            });
            Ok((T::to_cpu_storage_owned(y), gl.shape().clone()))
        })
    }
    fn bwd(&self, gate: &Tensor, up: &Tensor, _res: &Tensor, g: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let d_gate = match is_tracked(gate) {
            true => Some(gate.apply_op3_no_bwd(up, &g, &SwiGluGrad { of_gate: true })?),
            false => None,
        };
        let d_up = match is_tracked(up) {
            true => Some(gate.apply_op3_no_bwd(up, &g, &SwiGluGrad { of_gate: false })?),
            false => None,
        };
        Ok((d_gate, d_up))
    }
}

/// d gate = g · up · s (1 + gate (1 - s)), d up = g · gate · s, with s = sigmoid(gate).
struct SwiGluGrad {
    of_gate: bool,
}

impl CustomOp3 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "graft-swiglu-grad"
    }
    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        dispatch!(gs, "graft-swiglu-grad", |T| {
            let gate = contiguous::<T>(gs, gl, self.name())?;
            let up = contiguous::<T>(us, ul, self.name())?;
            let dy = contiguous::<T>(ds, dl, self.name())?;
            let one = T::from_f64(1.0);
            let mut out = vec![T::from_f64(0.0); gate.len()];
            let chunks = gate.par_chunks(4096).zip(up.par_chunks(4096)).zip(dy.par_chunks(4096));
            out.par_chunks_mut(4096).zip(chunks).for_each(|(o, ((a, u), d))| {
                for (((o, &a), &u), &d) in o.iter_mut().zip(a).zip(u).zip(d) {
                    let s = sigmoid(a);
                    *o = match self.of_gate {
                        true => d * u * s * (one + a * (one - s)),
                        false => d * (a * s),
                    };
                }
            });
            Ok((T::to_cpu_storage_owned(out), gl.shape().clone()))
        })
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Rotary embedding into head order

/// cos and sin of the rotary angles, (positions, head_dim / 2) each: the `rotate_half` layout uses each angle for
/// element i and i + head_dim / 2.
#[derive(Debug)]
pub struct RopeTables {
    pub positions: usize,
    pub half: usize,
    pub cos: Vec<f64>,
    pub sin: Vec<f64>,
}

/// x (batch, time, heads, head_dim), a projection's output split into heads, rotated as
/// `x * cos + rotate_half(x) * sin` and returned in attention order (batch, heads, time, head_dim), contiguous.
pub fn rope_to_heads(x: &Tensor, tables: &Arc<RopeTables>) -> candle_core::Result<Tensor> {
    let (_, t, _, d) = x.dims4()?;
    if t > tables.positions || d != 2 * tables.half {
        return Err(candle_core::Error::Msg(format!(
            "graft-rope: {t} positions of head_dim {d} against tables for {} of {}",
            tables.positions,
            2 * tables.half
        )));
    }
    x.contiguous()?.apply_op1(Rope { tables: tables.clone(), backward: false })
}

/// Forward: (b, t, h, d) -> rotated (b, h, t, d). Backward: (b, h, t, d) -> rotated back (b, t, h, d).
struct Rope {
    tables: Arc<RopeTables>,
    backward: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "graft-rope"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        // Forward reads (b, t, h, d); backward reads (b, h, t, d). Both write the other order.
        let (b, a1, a2, d) = l.shape().dims4()?;
        let half = d / 2;
        // The inverse rotation (the transpose of the forward one) differentiates it.
        let sign = if self.backward { -1.0 } else { 1.0 };
        let tab = &self.tables;
        dispatch!(s, "graft-rope", |T| {
            let x = contiguous::<T>(s, l, self.name())?;
            let mut y = vec![T::from_f64(0.0); x.len()];
            // Output rows run over (batch, a2, a1): the input's two middle axes swapped. Forward the input is
            // (b, t, h) so the position is the output's minor index; backward it is (b, h, t), the major one.
            y.par_chunks_mut(d).enumerate().for_each(|(row, out)| {
                let (bi, major, minor) = (row / (a1 * a2), (row / a1) % a2, row % a1);
                let pos = if self.backward { major } else { minor };
                let src = ((bi * a1 + minor) * a2 + major) * d;
                let x = &x[src..src + d];
                let (cos, sin) = (&tab.cos[pos * half..(pos + 1) * half], &tab.sin[pos * half..(pos + 1) * half]);
                let (o1, o2) = out.split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (x[i].to_f64(), x[i + half].to_f64());
                    let s = sign * sin[i];
                    o1[i] = T::from_f64(x1 * cos[i] - x2 * s);
                    o2[i] = T::from_f64(x2 * cos[i] + x1 * s);
                }
            });
            Ok((T::to_cpu_storage_owned(y), Shape::from((b, a2, a1, d))))
        })
    }
    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&Rope { tables: self.tables.clone(), backward: true })?))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Causal softmax

/// Softmax over the last axis of `scale * scores` with every column after the row's position masked out: rows of
/// `t` columns, row `r` at position `r % t` (so heads and query groups may be stacked along the rows).
pub fn causal_softmax(scores: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    scores.contiguous()?.apply_op1(CausalSoftmax { scale })
}

struct CausalSoftmax {
    scale: f64,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "graft-causal-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let t = last_dim(l);
        dispatch!(s, "graft-causal-softmax", |T| {
            let x = contiguous::<T>(s, l, self.name())?;
            let mut y = vec![T::from_f64(0.0); x.len()];
            let scale = T::from_f64(self.scale);
            y.par_chunks_mut(t).zip(x.par_chunks(t)).enumerate().for_each(|(row, (y, x))| {
                let seen = row % t + 1;
                let (x, y) = (&x[..seen], &mut y[..seen]);
                let m =
                    x.iter().fold(T::from_f64(f64::NEG_INFINITY), |a, &b| if b * scale > a { b * scale } else { a });
                let mut sum = 0f64;
                for (y, &v) in y.iter_mut().zip(x) {
                    let e = (v * scale - m).exp_();
                    sum += e.to_f64();
                    *y = e;
                }
                let inv = 1.0 / sum;
                for y in y.iter_mut() {
                    *y = T::from_f64(y.to_f64() * inv);
                }
            });
            Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
        })
    }
    fn bwd(&self, _x: &Tensor, res: &Tensor, g: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(g.contiguous()?.apply_op2_no_bwd(res, &CausalSoftmaxGrad { scale: self.scale })?))
    }
}

/// dx = scale · y (g - Σ g y) per row (zero where masked, as y is).
struct CausalSoftmaxGrad {
    scale: f64,
}

impl CustomOp2 for CausalSoftmaxGrad {
    fn name(&self) -> &'static str {
        "graft-causal-softmax-grad"
    }
    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, ys: &CpuStorage, yl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let t = last_dim(gl);
        dispatch!(gs, "graft-causal-softmax-grad", |T| {
            let g = contiguous::<T>(gs, gl, self.name())?;
            let y = contiguous::<T>(ys, yl, self.name())?;
            let mut dx = vec![T::from_f64(0.0); g.len()];
            dx.par_chunks_mut(t).zip(g.par_chunks(t).zip(y.par_chunks(t))).enumerate().for_each(
                |(row, (o, (g, y)))| {
                    let seen = row % t + 1;
                    let dot: f64 = g[..seen].iter().zip(&y[..seen]).map(|(a, b)| a.to_f64() * b.to_f64()).sum();
                    for ((o, &g), &y) in o[..seen].iter_mut().zip(g).zip(y) {
                        *o = T::from_f64(self.scale * y.to_f64() * (g.to_f64() - dot));
                    }
                },
            );
            Ok((T::to_cpu_storage_owned(dx), gl.shape().clone()))
        })
    }
}
