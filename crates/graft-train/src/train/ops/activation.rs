//! ReLU and softmax over the last axis, each with a backward pass that is one elementwise pass.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::{contiguous, fused_available, unsupported, CResult};

/// `max(x, 0)` whose backward is one masked copy of the gradient.
pub fn relu(x: &Tensor) -> candle_core::Result<Tensor> {
    if !fused_available(x) {
        return x.relu();
    }
    x.contiguous()?.apply_op1(Relu)
}

struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "graft-relu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        dispatch!(s, "graft-relu", |T| {
            let x = contiguous::<T>(s, l, "graft-relu")?;
            let zero = T::from_f64(0.0);
            let y: Vec<T> = x.iter().map(|&v| if v > zero { v } else { zero }).collect();
            Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
        })
    }
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op2_no_bwd(res, &ReluBackward)?))
    }
}

struct ReluBackward;

impl CustomOp2 for ReluBackward {
    fn name(&self) -> &'static str {
        "graft-relu-backward"
    }
    fn cpu_fwd(&self, g: &CpuStorage, gl: &Layout, y: &CpuStorage, yl: &Layout) -> CResult<(CpuStorage, Shape)> {
        dispatch!(g, "graft-relu-backward", |T| {
            let g = contiguous::<T>(g, gl, "graft-relu-backward")?;
            let y = contiguous::<T>(y, yl, "graft-relu-backward")?;
            let zero = T::from_f64(0.0);
            let dx: Vec<T> = g.iter().zip(y).map(|(&g, &y)| if y > zero { g } else { zero }).collect();
            Ok((T::to_cpu_storage_owned(dx), gl.shape().clone()))
        })
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Softmax over the last axis

/// Softmax over the last axis with a backward pass. (candle-nn 0.11's `softmax_last_dim` is applied without a
/// backward pass, so gradients silently stop at it: attention weights would never train.)
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if !fused_available(x) {
        return candle_nn::ops::softmax(x, candle_core::D::Minus1);
    }
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "graft-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let n = l.shape().dims().last().copied().unwrap_or(1).max(1);
        dispatch!(s, "graft-softmax", |T| {
            let x = contiguous::<T>(s, l, "graft-softmax")?;
            let mut y = vec![T::from_f64(0.0); x.len()];
            y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(o, i)| {
                let m = i.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b.to_f64()));
                let mut sum = 0f64;
                for (o, &v) in o.iter_mut().zip(i) {
                    let e = (v.to_f64() - m).exp();
                    sum += e;
                    *o = T::from_f64(e);
                }
                for o in o.iter_mut() {
                    *o = T::from_f64(o.to_f64() / sum);
                }
            });
            Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
        })
    }
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op2_no_bwd(res, &SoftmaxBackward)?))
    }
}

/// dx = y * (g - sum(g * y)) per row.
struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "graft-softmax-backward"
    }
    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, ys: &CpuStorage, yl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let n = gl.shape().dims().last().copied().unwrap_or(1).max(1);
        dispatch!(gs, "graft-softmax-backward", |T| {
            let g = contiguous::<T>(gs, gl, "graft-softmax-backward")?;
            let y = contiguous::<T>(ys, yl, "graft-softmax-backward")?;
            let mut dx = vec![T::from_f64(0.0); g.len()];
            dx.par_chunks_mut(n).zip(g.par_chunks(n).zip(y.par_chunks(n))).for_each(|(o, (g, y))| {
                let dot: f64 = g.iter().zip(y).map(|(a, b)| a.to_f64() * b.to_f64()).sum();
                for ((o, &g), &y) in o.iter_mut().zip(g).zip(y) {
                    *o = T::from_f64(y.to_f64() * (g.to_f64() - dot));
                }
            });
            Ok((T::to_cpu_storage_owned(dx), gl.shape().clone()))
        })
    }
}
