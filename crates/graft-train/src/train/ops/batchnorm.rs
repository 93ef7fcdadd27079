//! Training-mode BatchNorm (batch statistics, two passes in f64) and its backward pass; the per-channel affine map
//! for BatchNorm with fixed statistics.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::{contiguous, dot_f64, from_f64_vec, fused_available, sum_f64, unsupported, CResult};

/// Batch statistics of one training-mode BatchNorm call: per-channel mean and biased variance, and the count.
#[derive(Clone, Debug, Default)]
pub struct BatchStats {
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
    pub count: usize,
}

/// Training-mode BatchNorm of `x` (N, C) or (N, C, H, W) over every axis but the channel: normalise with the batch
/// mean and biased variance, scale by `gamma`, shift by `beta`. The batch statistics (for the running averages) are
/// returned alongside.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> candle_core::Result<(Tensor, Arc<Mutex<BatchStats>>)> {
    let stats = Arc::new(Mutex::new(BatchStats::default()));
    if !fused_available(x) {
        return batch_norm_train_generic(x, gamma, beta, eps);
    }
    let y = x.contiguous()?.apply_op3(gamma, beta, BatchNormTrain { eps, stats: stats.clone() })?;
    Ok((y, stats))
}

fn channel_view(shape: &Shape) -> CResult<(usize, usize, usize)> {
    let d = shape.dims();
    if d.len() < 2 {
        candle_core::bail!("batch norm: input {:?} has no channel axis", d);
    }
    Ok((d[0], d[1], d[2..].iter().product()))
}

pub(super) fn batch_norm_train_generic(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> candle_core::Result<(Tensor, Arc<Mutex<BatchStats>>)> {
    let (n, c, s) = channel_view(x.shape())?;
    let x3 = x.reshape((n, c, s))?;
    let mean = x3.mean_keepdim(2)?.mean_keepdim(0)?;
    let centred = x3.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(2)?.mean_keepdim(0)?;
    let y = centred
        .broadcast_div(&(var.clone() + eps)?.sqrt()?)?
        .broadcast_mul(&gamma.reshape((1, c, 1))?)?
        .broadcast_add(&beta.reshape((1, c, 1))?)?
        .reshape(x.shape())?;
    let to_vec = |t: &Tensor| -> CResult<Vec<f64>> { t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>() };
    let stats = BatchStats { mean: to_vec(&mean)?, var: to_vec(&var)?, count: n * s };
    Ok((y, Arc::new(Mutex::new(stats))))
}

pub(super) struct BatchNormTrain {
    pub(super) eps: f64,
    pub(super) stats: Arc<Mutex<BatchStats>>,
}

/// Per-channel (mean, biased variance) of `x` viewed as (N, C, S), two passes in f64, channels in parallel.
fn channel_moments<T: WithDType>(x: &[T], n: usize, c: usize, s: usize) -> (Vec<f64>, Vec<f64>) {
    let count = (n * s) as f64;
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let mut sum = 0f64;
            for b in 0..n {
                let base = (b * c + ch) * s;
                sum += sum_f64(&x[base..base + s]);
            }
            let mean = sum / count;
            // Second pass around the mean (no cancellation), the deviations formed in T then squared in lanes.
            let m = T::from_f64(mean);
            let mut sq = 0f64;
            let mut dev = Vec::with_capacity(s);
            for b in 0..n {
                let base = (b * c + ch) * s;
                dev.clear();
                dev.extend(x[base..base + s].iter().map(|&v| v - m));
                sq += dot_f64(&dev, &dev);
            }
            (mean, sq / count)
        })
        .unzip()
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "graft-batch-norm-train"
    }
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (n, c, s) = channel_view(xl.shape())?;
        dispatch!(xs, "graft-batch-norm-train", |T| {
            let x = contiguous::<T>(xs, xl, "graft-batch-norm-train")?;
            let g = contiguous::<T>(gs, gl, "graft-batch-norm-train")?;
            let b = contiguous::<T>(bs, bl, "graft-batch-norm-train")?;
            let (mean, var) = channel_moments(x, n, c, s);
            let scale: Vec<T> = (0..c).map(|ch| T::from_f64(g[ch].to_f64() / (var[ch] + self.eps).sqrt())).collect();
            let shift: Vec<T> = (0..c).map(|ch| T::from_f64(b[ch].to_f64() - mean[ch] * scale[ch].to_f64())).collect();
            let y = channel_affine(x, c, s, &scale, &shift);
            *self.stats.lock().unwrap() = BatchStats { mean, var, count: n * s };
            Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
        })
    }
    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stats = self.stats.lock().unwrap().clone();
        let op = BatchNormBackward { eps: self.eps, stats, param_grads: Mutex::new(None) };
        let dx = x.apply_op3_no_bwd(&grad.contiguous()?, gamma, &op)?;
        let (dg, db) = op.param_grads.lock().unwrap().take().expect("batch norm backward ran");
        let dg = Tensor::from_vec(dg, gamma.dims1()?, gamma.device())?.to_dtype(gamma.dtype())?;
        let db = Tensor::from_vec(db, gamma.dims1()?, gamma.device())?.to_dtype(gamma.dtype())?;
        Ok((Some(dx), Some(dg), Some(db)))
    }
}

/// `y = x * scale[c] + shift[c]` for x viewed as (N, C, S), in parallel over (n, c) planes.
fn channel_affine<T: WithDType>(x: &[T], c: usize, s: usize, scale: &[T], shift: &[T]) -> Vec<T> {
    let mut y = vec![T::from_f64(0.0); x.len()];
    if s == 1 {
        // (N, C) rows: one row per sample.
        y.par_chunks_mut(c.max(1)).zip(x.par_chunks(c.max(1))).for_each(|(o, i)| {
            for ch in 0..c {
                o[ch] = i[ch] * scale[ch] + shift[ch];
            }
        });
        return y;
    }
    y.par_chunks_mut(s).zip(x.par_chunks(s)).enumerate().for_each(|(p, (o, i))| {
        let ch = p % c;
        let (a, b) = (scale[ch], shift[ch]);
        for (o, &v) in o.iter_mut().zip(i) {
            *o = v * a + b;
        }
    });
    y
}

pub(super) struct BatchNormBackward {
    pub(super) eps: f64,
    pub(super) stats: BatchStats,
    pub(super) param_grads: Mutex<Option<(Vec<f64>, Vec<f64>)>>,
}

impl CustomOp3 for BatchNormBackward {
    fn name(&self) -> &'static str {
        "graft-batch-norm-backward"
    }
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        gms: &CpuStorage,
        gml: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (n, c, s) = channel_view(xl.shape())?;
        dispatch!(xs, "graft-batch-norm-backward", |T| {
            let x = contiguous::<T>(xs, xl, "graft-batch-norm-backward")?;
            let dy = contiguous::<T>(gs, gl, "graft-batch-norm-backward")?;
            let gamma = contiguous::<T>(gms, gml, "graft-batch-norm-backward")?;
            let count = (n * s) as f64;
            let mean = &self.stats.mean;
            let inv: Vec<f64> = self.stats.var.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
            // Per channel: sum(dy) and sum(dy * xhat).
            let (sum_dy, sum_dy_xhat): (Vec<f64>, Vec<f64>) = (0..c)
                .into_par_iter()
                .map(|ch| {
                    let (mut a, mut b) = (0f64, 0f64);
                    // sum(dy * (x - mean)) = sum(dy * x) - mean * sum(dy)
                    for bi in 0..n {
                        let base = (bi * c + ch) * s;
                        a += sum_f64(&dy[base..base + s]);
                        b += dot_f64(&dy[base..base + s], &x[base..base + s]);
                    }
                    (a, (b - mean[ch] * a) * inv[ch])
                })
                .unzip();
            // dx = gamma * inv / M * (M dy - sum(dy) - xhat * sum(dy xhat)), written as dy * k1 + x * k2 + k3.
            let mut k1 = vec![T::from_f64(0.0); c];
            let mut k2 = vec![T::from_f64(0.0); c];
            let mut k3 = vec![T::from_f64(0.0); c];
            for ch in 0..c {
                let gi = gamma[ch].to_f64() * inv[ch];
                k1[ch] = T::from_f64(gi);
                let a = -gi * inv[ch] * sum_dy_xhat[ch] / count;
                k2[ch] = T::from_f64(a);
                k3[ch] = T::from_f64(-gi * sum_dy[ch] / count - a * mean[ch]);
            }
            let mut dx = vec![T::from_f64(0.0); x.len()];
            let plane = s.max(1);
            if s == 1 {
                dx.par_chunks_mut(c).zip(dy.par_chunks(c).zip(x.par_chunks(c))).for_each(|(o, (g, v))| {
                    for ch in 0..c {
                        o[ch] = g[ch] * k1[ch] + v[ch] * k2[ch] + k3[ch];
                    }
                });
            } else {
                dx.par_chunks_mut(plane).zip(dy.par_chunks(plane).zip(x.par_chunks(plane))).enumerate().for_each(
                    |(p, (o, (g, v)))| {
                        let ch = p % c;
                        let (a, b, d) = (k1[ch], k2[ch], k3[ch]);
                        for ((o, &g), &v) in o.iter_mut().zip(g).zip(v) {
                            *o = g * a + v * b + d;
                        }
                    },
                );
            }
            *self.param_grads.lock().unwrap() = Some((sum_dy_xhat, sum_dy));
            Ok((T::to_cpu_storage_owned(dx), xl.shape().clone()))
        })
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Per-channel affine map (BatchNorm with fixed statistics)

/// `x * scale[c] + shift[c]` over the channel axis 1 of `x`, with `scale`/`shift` as constants (the gradient flows
/// to `x` only): evaluation-mode BatchNorm and BatchNorm whose statistics and parameters are frozen.
pub fn channel_affine_const(x: &Tensor, scale: &[f64], shift: &[f64]) -> candle_core::Result<Tensor> {
    let (_, c, s) = channel_view(x.shape())?;
    if !fused_available(x) {
        let mut shape = vec![1usize; x.rank()];
        shape[1] = c;
        let sc = Tensor::from_slice(scale, c, x.device())?.to_dtype(x.dtype())?.reshape(shape.clone())?;
        let sh = Tensor::from_slice(shift, c, x.device())?.to_dtype(x.dtype())?.reshape(shape)?;
        return x.broadcast_mul(&sc)?.broadcast_add(&sh);
    }
    let _ = s;
    x.contiguous()?.apply_op1(ChannelAffine { scale: scale.to_vec(), shift: shift.to_vec() })
}

struct ChannelAffine {
    scale: Vec<f64>,
    shift: Vec<f64>,
}

impl CustomOp1 for ChannelAffine {
    fn name(&self) -> &'static str {
        "graft-channel-affine"
    }
    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (_, c, s) = channel_view(xl.shape())?;
        dispatch!(xs, "graft-channel-affine", |T| {
            let x = contiguous::<T>(xs, xl, "graft-channel-affine")?;
            let y = channel_affine(x, c, s, &from_f64_vec::<T>(&self.scale), &from_f64_vec::<T>(&self.shift));
            Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
        })
    }
    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let op = ChannelAffine { scale: self.scale.clone(), shift: vec![0.0; self.shift.len()] };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}
