//! The separable convolution in training mode as one node of candle's graph, from the `conv` and `batchnorm` kernels.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};

use super::batchnorm::{BatchNormBackward, BatchNormTrain, BatchStats};
use super::conv::{DepthwiseConv, DepthwiseConvParamGrad, PointwiseConv, PointwiseConvBackward};
use super::{unsupported, CResult};

/// The eight parameters of a separable convolution, in the order they are packed.
pub struct SepConvParams<'a> {
    /// Depthwise kernel (C, 1, 3, 3) and bias (C).
    pub dw_weight: &'a Tensor,
    pub dw_bias: &'a Tensor,
    /// The depthwise BatchNorm's scale and shift (C).
    pub bn_dw_weight: &'a Tensor,
    pub bn_dw_bias: &'a Tensor,
    /// Pointwise weight (O, C, 1, 1) and bias (O).
    pub pw_weight: &'a Tensor,
    pub pw_bias: &'a Tensor,
    /// The pointwise BatchNorm's scale and shift (O).
    pub bn_pw_weight: &'a Tensor,
    pub bn_pw_bias: &'a Tensor,
}

/// Training-mode separable convolution (depthwise 3x3, BatchNorm, pointwise, BatchNorm, both BatchNorms on batch
/// statistics) as one node of candle's graph. It runs the same kernels as the four separate operations, so values
/// and gradients are the same bit for bit; but candle's backward pass materialises every node's input gradient as
/// zeros plus the incoming gradient, and one node instead of four saves three activation-sized zero-fills,
/// additions and allocations per convolution (a fifth of a small CNN's step). The parameters travel packed in one
/// tensor (`Tensor::cat`, whose backward pass hands each parameter its slice). Returns the output and the two
/// BatchNorms' batch statistics.
pub fn sep_conv_train(
    x: &Tensor,
    p: &SepConvParams,
    eps_dw: f64,
    eps_pw: f64,
) -> CResult<(Tensor, BatchStats, BatchStats)> {
    let (_, c, _, _) = x.dims4()?;
    let o = p.pw_bias.elem_count();
    let expect = [
        (p.dw_weight, 9 * c),
        (p.dw_bias, c),
        (p.bn_dw_weight, c),
        (p.bn_dw_bias, c),
        (p.pw_weight, o * c),
        (p.pw_bias, o),
        (p.bn_pw_weight, o),
        (p.bn_pw_bias, o),
    ];
    let mut parts = Vec::with_capacity(expect.len());
    for (t, n) in expect {
        if t.elem_count() != n {
            candle_core::bail!("separable conv: parameter {:?} does not fit input {:?}", t.dims(), x.dims());
        }
        parts.push(t.flatten_all()?);
    }
    let packed = Tensor::cat(&parts, 0)?;
    let saved = Arc::new(Mutex::new(None));
    let op = SepConvTrain { c, o, eps: [eps_dw, eps_pw], saved: saved.clone() };
    let y = x.contiguous()?.apply_op2(&packed, op)?;
    let s = saved.lock().unwrap();
    let s: &SepConvSaved = s.as_ref().expect("separable conv forward ran");
    Ok((y, s.stats[0].clone(), s.stats[1].clone()))
}

/// What the backward pass needs from the forward pass: the depthwise output, its normalised value, the pointwise
/// output, and both BatchNorms' batch statistics.
struct SepConvSaved {
    dw_out: CpuStorage,
    bn_dw_out: CpuStorage,
    pw_out: CpuStorage,
    stats: [BatchStats; 2],
}

struct SepConvTrain {
    c: usize,
    o: usize,
    eps: [f64; 2],
    saved: Arc<Mutex<Option<SepConvSaved>>>,
}

impl SepConvTrain {
    /// Offsets of the parameters in the packed tensor, in `SepConvParams` order, and the total length.
    fn offsets(&self) -> ([usize; 8], usize) {
        let (c, o) = (self.c, self.o);
        let lens = [9 * c, c, c, c, o * c, o, o, o];
        let mut offs = [0; 8];
        let mut at = 0;
        for (off, len) in offs.iter_mut().zip(lens) {
            *off = at;
            at += len;
        }
        (offs, at)
    }
}

fn storage_tensor(s: CpuStorage, shape: Shape) -> CResult<Tensor> {
    match s {
        CpuStorage::F32(v) => Tensor::from_vec(v, shape, &candle_core::Device::Cpu),
        CpuStorage::F64(v) => Tensor::from_vec(v, shape, &candle_core::Device::Cpu),
        _ => Err(unsupported("graft-separable-conv")),
    }
}

impl CustomOp2 for SepConvTrain {
    fn name(&self) -> &'static str {
        "graft-separable-conv-train"
    }
    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ps: &CpuStorage, pl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (n, c, h, w) = xl.shape().dims4()?;
        let o = self.o;
        let (base, _) = pl.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("packed parameters".into()))?;
        let (off, _) = self.offsets();
        let at = |i: usize, shape: Shape| Layout::contiguous_with_offset(shape, base + off[i]);
        let act_dw = Layout::contiguous((n, c, h, w));
        let act_pw = Layout::contiguous((n, o, h, w));
        let stats = [Arc::new(Mutex::new(BatchStats::default())), Arc::new(Mutex::new(BatchStats::default()))];
        let (dw_out, _) =
            DepthwiseConv { k: 3 }.cpu_fwd(xs, xl, ps, &at(0, Shape::from((c, 1, 3, 3))), ps, &at(1, c.into()))?;
        let bn = BatchNormTrain { eps: self.eps[0], stats: stats[0].clone() };
        let (bn_dw_out, _) = bn.cpu_fwd(&dw_out, &act_dw, ps, &at(2, c.into()), ps, &at(3, c.into()))?;
        let (pw_out, _) =
            PointwiseConv.cpu_fwd(&bn_dw_out, &act_dw, ps, &at(4, Shape::from((o, c, 1, 1))), ps, &at(5, o.into()))?;
        let bn = BatchNormTrain { eps: self.eps[1], stats: stats[1].clone() };
        let (y, _) = bn.cpu_fwd(&pw_out, &act_pw, ps, &at(6, o.into()), ps, &at(7, o.into()))?;
        let stats = stats.map(|s| s.lock().unwrap().clone());
        *self.saved.lock().unwrap() = Some(SepConvSaved { dw_out, bn_dw_out, pw_out, stats });
        Ok((y, Shape::from((n, o, h, w))))
    }
    fn bwd(
        &self,
        x: &Tensor,
        packed: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved.lock().unwrap().take();
        let Some(saved) = saved else { candle_core::bail!("separable conv: backward pass ran twice") };
        let (n, c, h, w) = x.dims4()?;
        let o = self.o;
        let (off, total) = self.offsets();
        let param = |i: usize, len: usize| packed.narrow(0, off[i], len);
        let dw_out = storage_tensor(saved.dw_out, Shape::from((n, c, h, w)))?;
        let bn_dw_out = storage_tensor(saved.bn_dw_out, Shape::from((n, c, h, w)))?;
        let pw_out = storage_tensor(saved.pw_out, Shape::from((n, o, h, w)))?;
        let [stats_dw, stats_pw] = saved.stats;

        let bn = BatchNormBackward { eps: self.eps[1], stats: stats_pw, param_grads: Mutex::new(None) };
        let d_pw_out = pw_out.apply_op3_no_bwd(&grad.contiguous()?, &param(6, o)?, &bn)?;
        let (d_bn_pw_w, d_bn_pw_b) = bn.param_grads.lock().unwrap().take().expect("batch norm backward ran");
        let pw = PointwiseConvBackward { param_grads: Mutex::new(None) };
        let d_bn_dw_out = bn_dw_out.apply_op3_no_bwd(&d_pw_out, &param(4, o * c)?, &pw)?;
        let (d_pw_w, d_pw_b) = pw.param_grads.lock().unwrap().take().expect("pointwise backward ran");
        let bn = BatchNormBackward { eps: self.eps[0], stats: stats_dw, param_grads: Mutex::new(None) };
        let d_dw_out = dw_out.apply_op3_no_bwd(&d_bn_dw_out, &param(2, c)?, &bn)?;
        let (d_bn_dw_w, d_bn_dw_b) = bn.param_grads.lock().unwrap().take().expect("batch norm backward ran");
        // As in `DepthwiseConv::bwd`: the input gradient is the convolution with the kernel rotated by 180 degrees.
        let flipped = param(0, 9 * c)?.reshape((c, 1, 3, 3))?.flip(&[2, 3])?.contiguous()?;
        let zero_bias = Tensor::zeros(c, x.dtype(), x.device())?;
        let dx = d_dw_out.apply_op3_no_bwd(&flipped, &zero_bias, &DepthwiseConv { k: 3 })?;
        let dw_packed = x.apply_op2_no_bwd(&d_dw_out, &DepthwiseConvParamGrad { k: 3 })?;
        let dw_packed = dw_packed.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;

        let mut d = Vec::with_capacity(total);
        d.extend(dw_packed.chunks_exact(10).flat_map(|r| r[..9].iter().copied()));
        d.extend(dw_packed.chunks_exact(10).map(|r| r[9]));
        for part in [d_bn_dw_w, d_bn_dw_b, d_pw_w, d_pw_b, d_bn_pw_w, d_bn_pw_b] {
            d.extend(part);
        }
        let d_packed = Tensor::from_vec(d, total, x.device())?.to_dtype(packed.dtype())?;
        Ok((Some(dx), Some(d_packed)))
    }
}
