//! The building blocks every model shares: Linear, Conv2d, BatchNorm (with graft's freezing rules), separable
//! convolution and deterministic dropout. Names follow PyTorch's `state_dict` so checkpoints interchange.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use candle_core::{DType, Tensor, Var};

use super::super::ops;
use super::super::params::{Init, Param, ParamStore};
use crate::error::Result;
use crate::rng::Rng;

type CResult<T> = candle_core::Result<T>;

/// Per-step settings of a forward pass.
#[derive(Clone, Debug)]
pub struct Ctx {
    /// Training mode: batch statistics in BatchNorm, dropout on.
    pub train: bool,
    /// Seed and step for dropout masks (deterministic per step and layer).
    pub seed: u64,
    pub step: u64,
}

impl Ctx {
    pub fn eval() -> Self {
        Ctx { train: false, seed: 0, step: 0 }
    }
}

#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Param,
    pub bias: Option<Param>,
}

impl Linear {
    /// PyTorch's `nn.Linear` initialisation: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias.
    pub fn new(store: &mut ParamStore, name: &str, inp: usize, out: usize, bias: bool) -> Result<Self> {
        let bound = 1.0 / (inp.max(1) as f64).sqrt();
        let weight = store.param(&format!("{name}.weight"), &[out, inp], Init::Uniform(bound))?;
        let bias = if bias { Some(store.param(&format!("{name}.bias"), &[out], Init::Uniform(bound))?) } else { None };
        Ok(Linear { weight, bias })
    }

    /// `x @ W^T + b` over the last axis of `x` (any leading axes).
    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let w = self.weight.t();
        let dims = x.dims().to_vec();
        let inp = *dims.last().unwrap();
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x = x.reshape((rows, inp))?;
        // A frozen layer differentiates its input only (candle would compute the weight's gradient as well).
        if !self.weight.trainable() && self.bias.as_ref().is_none_or(|b| !b.trainable()) {
            let y = ops::frozen_linear(&x, &w, self.bias.as_ref().map(|b| b.t()).as_ref())?;
            let mut out = dims;
            *out.last_mut().unwrap() = y.dim(1)?;
            return y.reshape(out);
        }
        let y = match x.track_op() {
            true => x.matmul(&w.t()?)?,
            false => ops::linear_of_constant_input(&x, &w)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.t())?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().unwrap() = y.dim(1)?;
        y.reshape(out)
    }
}

/// A 2-D convolution (groups = 1) with square kernel, PyTorch's initialisation.
#[derive(Clone, Debug)]
pub struct Conv2d {
    pub weight: Param,
    pub bias: Option<Param>,
    pub stride: usize,
    pub padding: usize,
}

impl Conv2d {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: &mut ParamStore,
        name: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
        bias: bool,
    ) -> Result<Self> {
        let bound = 1.0 / ((cin * k * k).max(1) as f64).sqrt();
        let weight = store.param(&format!("{name}.weight"), &[cout, cin, k, k], Init::Uniform(bound))?;
        let bias = if bias { Some(store.param(&format!("{name}.bias"), &[cout], Init::Uniform(bound))?) } else { None };
        Ok(Conv2d { weight, bias, stride, padding })
    }

    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let y = x.conv2d(&self.weight.t(), self.padding, self.stride, 1, 1)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.t().reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }
}

/// What a BatchNorm layer does with its running statistics while training.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BnStats {
    /// Normalise with batch statistics and update the running averages (PyTorch's train mode).
    Update,
    /// For frozen layers: normalise with the running statistics and leave them unchanged (eval-mode layer).
    Freeze,
}

#[derive(Clone, Debug)]
pub struct BatchNorm {
    pub name: String,
    pub weight: Param,
    pub bias: Param,
    pub running_mean: Var,
    pub running_var: Var,
    pub tracked: Arc<std::sync::atomic::AtomicI64>,
    pub eps: f64,
    pub momentum: f64,
    /// Policy for the running statistics when this layer's parameters are frozen (trainable layers always update).
    pub frozen_stats: Arc<std::sync::Mutex<BnStats>>,
}

impl BatchNorm {
    pub fn new(store: &mut ParamStore, name: &str, n: usize) -> Result<Self> {
        Ok(BatchNorm {
            name: name.to_string(),
            weight: store.param(&format!("{name}.weight"), &[n], Init::Const(1.0))?,
            bias: store.param(&format!("{name}.bias"), &[n], Init::Const(0.0))?,
            running_mean: store.buffer(&format!("{name}.running_mean"), &[n], 0.0)?,
            running_var: store.buffer(&format!("{name}.running_var"), &[n], 1.0)?,
            tracked: store.counter(&format!("{name}.num_batches_tracked")),
            eps: 1e-5,
            momentum: 0.1,
            frozen_stats: Arc::new(std::sync::Mutex::new(BnStats::Freeze)),
        })
    }

    fn frozen(&self) -> bool {
        !self.weight.trainable() && !self.bias.trainable()
    }

    /// Whether this forward pass normalises with batch statistics (training, unless frozen with frozen statistics).
    pub fn uses_batch_stats(&self, ctx: &Ctx) -> bool {
        ctx.train && !(self.frozen() && *self.frozen_stats.lock().unwrap() == BnStats::Freeze)
    }

    /// Normalises over every axis but axis 1 (channels / features).
    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> CResult<Tensor> {
        if !self.uses_batch_stats(ctx) {
            return self.forward_running(x, ctx.train);
        }
        let (y, stats) = ops::batch_norm_train(x, &self.weight.t(), &self.bias.t(), self.eps)?;
        let stats = stats.lock().unwrap().clone();
        self.record_batch(&stats)?;
        Ok(y)
    }

    /// Folds one training batch's statistics into the running averages.
    pub fn record_batch(&self, stats: &ops::BatchStats) -> CResult<()> {
        // PyTorch: running = (1 - m) running + m batch, with the unbiased batch variance.
        let m = self.momentum;
        let unbias = if stats.count > 1 { stats.count as f64 / (stats.count as f64 - 1.0) } else { 1.0 };
        let rm = to_f64(self.running_mean.as_tensor())?;
        let rv = to_f64(self.running_var.as_tensor())?;
        let nm: Vec<f64> = rm.iter().zip(&stats.mean).map(|(r, b)| (1.0 - m) * r + m * b).collect();
        let nv: Vec<f64> = rv.iter().zip(&stats.var).map(|(r, b)| (1.0 - m) * r + m * b * unbias).collect();
        self.running_mean.set(&from_f64(&nm, self.running_mean.as_tensor())?)?;
        self.running_var.set(&from_f64(&nv, self.running_var.as_tensor())?)?;
        self.tracked.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Normalisation with the running statistics: a per-channel affine map. With trainable scale/shift the
    /// gradient must reach them, so the map is built from tracked tensors; frozen ones use the fused constant op.
    fn forward_running(&self, x: &Tensor, train: bool) -> CResult<Tensor> {
        let rm = to_f64(self.running_mean.as_tensor())?;
        let rv = to_f64(self.running_var.as_tensor())?;
        let inv: Vec<f64> = rv.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
        if !train || (!self.weight.trainable() && !self.bias.trainable()) {
            let g = to_f64(self.weight.var.as_tensor())?;
            let b = to_f64(self.bias.var.as_tensor())?;
            let scale: Vec<f64> = g.iter().zip(&inv).map(|(g, i)| g * i).collect();
            let shift: Vec<f64> = b.iter().zip(rm.iter().zip(&scale)).map(|(b, (m, s))| b - m * s).collect();
            return ops::channel_affine_const(x, &scale, &shift);
        }
        let c = rm.len();
        let mut shape = vec![1usize; x.rank()];
        shape[1] = c;
        let dev = x.device();
        let mean = Tensor::from_vec(rm, c, dev)?.to_dtype(x.dtype())?.reshape(shape.clone())?;
        let inv = Tensor::from_vec(inv, c, dev)?.to_dtype(x.dtype())?.reshape(shape.clone())?;
        let g = self.weight.t().reshape(shape.clone())?;
        let b = self.bias.t().reshape(shape)?;
        x.broadcast_sub(&mean)?.broadcast_mul(&inv)?.broadcast_mul(&g)?.broadcast_add(&b)
    }
}

pub fn to_f64(t: &Tensor) -> CResult<Vec<f64>> {
    t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()
}

fn from_f64(v: &[f64], like: &Tensor) -> CResult<Tensor> {
    Tensor::from_slice(v, like.shape(), &candle_core::Device::Cpu)?.to_dtype(like.dtype())?.to_device(like.device())
}

/// The reference study's separable convolution: depthwise k x k conv (bias) -> BatchNorm -> pointwise 1x1 conv
/// (bias) -> BatchNorm, no activation inside. Names: `{depthwise, bn_depthwise, pointwise, bn_pointwise}`.
#[derive(Clone, Debug)]
pub struct SepConv {
    pub dw_weight: Param,
    pub dw_bias: Param,
    pub bn_dw: BatchNorm,
    pub pw_weight: Param,
    pub pw_bias: Param,
    pub bn_pw: BatchNorm,
}

impl SepConv {
    pub fn new(store: &mut ParamStore, name: &str, cin: usize, cout: usize) -> Result<Self> {
        let k = 3;
        let dwb = 1.0 / ((k * k) as f64).sqrt();
        let dw_weight = store.param(&format!("{name}.depthwise.weight"), &[cin, 1, k, k], Init::Uniform(dwb))?;
        let dw_bias = store.param(&format!("{name}.depthwise.bias"), &[cin], Init::Uniform(dwb))?;
        let bn_dw = BatchNorm::new(store, &format!("{name}.bn_depthwise"), cin)?;
        let pwb = 1.0 / (cin as f64).sqrt();
        let pw_weight = store.param(&format!("{name}.pointwise.weight"), &[cout, cin, 1, 1], Init::Uniform(pwb))?;
        let pw_bias = store.param(&format!("{name}.pointwise.bias"), &[cout], Init::Uniform(pwb))?;
        let bn_pw = BatchNorm::new(store, &format!("{name}.bn_pointwise"), cout)?;
        Ok(SepConv { dw_weight, dw_bias, bn_dw, pw_weight, pw_bias, bn_pw })
    }

    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> CResult<Tensor> {
        if ops::fused_available(x) && self.bn_dw.uses_batch_stats(ctx) && self.bn_pw.uses_batch_stats(ctx) {
            let params = ops::SepConvParams {
                dw_weight: &self.dw_weight.t(),
                dw_bias: &self.dw_bias.t(),
                bn_dw_weight: &self.bn_dw.weight.t(),
                bn_dw_bias: &self.bn_dw.bias.t(),
                pw_weight: &self.pw_weight.t(),
                pw_bias: &self.pw_bias.t(),
                bn_pw_weight: &self.bn_pw.weight.t(),
                bn_pw_bias: &self.bn_pw.bias.t(),
            };
            let (y, stats_dw, stats_pw) = ops::sep_conv_train(x, &params, self.bn_dw.eps, self.bn_pw.eps)?;
            self.bn_dw.record_batch(&stats_dw)?;
            self.bn_pw.record_batch(&stats_pw)?;
            return Ok(y);
        }
        self.forward_separate(x, ctx)
    }

    /// The four operations one by one (any device, any BatchNorm mode).
    pub fn forward_separate(&self, x: &Tensor, ctx: &Ctx) -> CResult<Tensor> {
        let y = ops::depthwise_conv(x, &self.dw_weight.t(), &self.dw_bias.t())?;
        let y = self.bn_dw.forward(&y, ctx)?;
        let y = ops::pointwise_conv(&y, &self.pw_weight.t(), &self.pw_bias.t())?;
        self.bn_pw.forward(&y, ctx)
    }

    pub fn batchnorms(&self) -> [&BatchNorm; 2] {
        [&self.bn_dw, &self.bn_pw]
    }
}

/// Inverted dropout with probability `p`, a mask drawn from graft's generator for (seed, step, layer).
pub fn dropout(x: &Tensor, p: f64, layer: &str, ctx: &Ctx) -> CResult<Tensor> {
    if !ctx.train || p <= 0.0 {
        return Ok(x.clone());
    }
    let mut r = Rng::for_label(ctx.seed, &format!("dropout/{}/{layer}", ctx.step));
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count()).map(|_| if r.next_f64() < p { 0.0 } else { keep as f32 }).collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x.mul(&mask)
}
