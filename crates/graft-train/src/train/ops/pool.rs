//! Max pooling with kernel = stride, and its backward pass.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::{contiguous, fused_available, unsupported, CResult};

/// Max pooling of (N, C, H, W) with a k x k window and stride k (H, W rounded down as PyTorch does).
pub fn max_pool(x: &Tensor, k: usize) -> candle_core::Result<Tensor> {
    if !fused_available(x) {
        return x.max_pool2d(k);
    }
    x.contiguous()?.apply_op1(MaxPool { k, argmax: Arc::new(Mutex::new(Vec::new())) })
}

struct MaxPool {
    k: usize,
    argmax: Arc<Mutex<Vec<u32>>>,
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "graft-max-pool"
    }
    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (n, c, h, w) = xl.shape().dims4()?;
        let k = self.k;
        let (oh, ow) = (h / k, w / k);
        dispatch!(xs, "graft-max-pool", |T| {
            let x = contiguous::<T>(xs, xl, "graft-max-pool")?;
            let mut y = vec![T::from_f64(0.0); n * c * oh * ow];
            let mut arg = vec![0u32; y.len()];
            y.par_chunks_mut(oh * ow).zip(arg.par_chunks_mut(oh * ow)).enumerate().for_each(|(p, (yo, ao))| {
                let inp = &x[p * h * w..(p + 1) * h * w];
                for i in 0..oh {
                    for j in 0..ow {
                        let mut best = i * k * w + j * k;
                        for di in 0..k {
                            for dj in 0..k {
                                let at = (i * k + di) * w + j * k + dj;
                                // First maximum wins, as PyTorch's CPU kernel picks it; NaN propagates.
                                if inp[at] > inp[best] || (inp[at].to_f64().is_nan() && !inp[best].to_f64().is_nan()) {
                                    best = at;
                                }
                            }
                        }
                        yo[i * ow + j] = inp[best];
                        ao[i * ow + j] = best as u32;
                    }
                }
            });
            *self.argmax.lock().unwrap() = arg;
            Ok((T::to_cpu_storage_owned(y), Shape::from((n, c, oh, ow))))
        })
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let op = MaxPoolBackward { argmax: self.argmax.clone(), in_shape: x.shape().clone() };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

struct MaxPoolBackward {
    argmax: Arc<Mutex<Vec<u32>>>,
    in_shape: Shape,
}

impl CustomOp1 for MaxPoolBackward {
    fn name(&self) -> &'static str {
        "graft-max-pool-backward"
    }
    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (_, _, oh, ow) = gl.shape().dims4()?;
        let (_, _, h, w) = self.in_shape.dims4()?;
        let arg = self.argmax.lock().unwrap();
        dispatch!(gs, "graft-max-pool-backward", |T| {
            let g = contiguous::<T>(gs, gl, "graft-max-pool-backward")?;
            let mut dx = vec![T::from_f64(0.0); self.in_shape.elem_count()];
            dx.par_chunks_mut(h * w).zip(g.par_chunks(oh * ow).zip(arg.par_chunks(oh * ow))).for_each(|(d, (g, a))| {
                for (&g, &a) in g.iter().zip(a) {
                    d[a as usize] += g;
                }
            });
            Ok((T::to_cpu_storage_owned(dx), self.in_shape.clone()))
        })
    }
}
