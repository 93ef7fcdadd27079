//! CIFAR-style ResNet-20 (He et al. 2016, section 4.2), named as the widely used PyTorch implementation
//! (`conv1`, `bn1`, `layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}`, `linear`): 3x3 convolutions without bias, BatchNorm,
//! three stages of `blocks` basic blocks at 16/32/64 channels (times the width multiplier), stride 2 at the start
//! of stages 2 and 3 with the parameter-free option-A shortcut (subsample, zero-pad channels), global average pool,
//! Linear head.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::layers::{BatchNorm, Conv2d, Ctx, Linear};
use super::{scaled, unfit_image, Arch, ArchOptions, ArchSpec, Input, Model, Spec};
use crate::error::{Error, Result};
use crate::train::ops;
use crate::train::params::ParamStore;

/// The `resnet20` architecture.
#[derive(Debug)]
pub struct Resnet20Arch;

impl Arch for Resnet20Arch {
    fn name(&self) -> &'static str {
        "resnet20"
    }
    fn about(&self) -> &'static str {
        "CIFAR-style ResNet-20; --width"
    }
    fn alignment(&self) -> Option<super::AlignFamily> {
        Some(super::AlignFamily::Cnn)
    }
    fn fresh(&self, options: &ArchOptions, sample_shape: &[usize], classes: usize) -> Result<ArchSpec> {
        let channels = if sample_shape.len() == 3 { sample_shape[0] } else { 1 };
        Ok(spec(channels, options.width, classes))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Resnet20Spec {
    pub in_channels: usize,
    pub widths: Vec<usize>,
    pub blocks: usize,
    pub num_classes: usize,
}

impl Spec for Resnet20Spec {
    fn arch(&self) -> &'static dyn Arch {
        &Resnet20Arch
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
    fn set_num_classes(&mut self, n: usize) {
        self.num_classes = n
    }
    fn unfit_input(&self, sample_shape: &[usize]) -> Option<String> {
        unfit_image(self.in_channels, sample_shape)
    }
    fn build(&self, store: ParamStore) -> Result<Box<dyn Model>> {
        Ok(Box::new(ResNet20::new(self.clone(), store)?))
    }
}

/// ResNet-20 at `width` (16/32/64 channels scaled), 3 blocks per stage.
pub fn spec(in_channels: usize, width: f64, num_classes: usize) -> ArchSpec {
    Resnet20Spec {
        in_channels,
        widths: [16, 32, 64].iter().map(|&c| scaled(c, width)).collect(),
        blocks: 3,
        num_classes,
    }
    .into()
}

struct Block {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    /// Channels added by the shortcut's zero padding (option A), 0 for an identity shortcut.
    pad: usize,
    stride: usize,
}

pub struct ResNet20 {
    spec: ArchSpec,
    store: ParamStore,
    conv1: Conv2d,
    bn1: BatchNorm,
    blocks: Vec<Block>,
    linear: Linear,
}

impl ResNet20 {
    pub fn new(spec: Resnet20Spec, mut store: ParamStore) -> Result<Self> {
        let Resnet20Spec { in_channels, widths, blocks, num_classes } = &spec;
        if widths.len() != 3 || widths.contains(&0) || *blocks == 0 {
            return Err(Error::usage(format!("resnet20: needs 3 positive widths and blocks > 0, got {widths:?}")));
        }
        let st = &mut store;
        let conv1 = Conv2d::new(st, "conv1", *in_channels, widths[0], 3, 1, 1, false)?;
        let bn1 = BatchNorm::new(st, "bn1", widths[0])?;
        let mut all = Vec::new();
        let mut prev = widths[0];
        for (s, &c) in widths.iter().enumerate() {
            for i in 0..*blocks {
                let stride = if s > 0 && i == 0 { 2 } else { 1 };
                let p = format!("layer{}.{i}", s + 1);
                all.push(Block {
                    conv1: Conv2d::new(st, &format!("{p}.conv1"), prev, c, 3, stride, 1, false)?,
                    bn1: BatchNorm::new(st, &format!("{p}.bn1"), c)?,
                    conv2: Conv2d::new(st, &format!("{p}.conv2"), c, c, 3, 1, 1, false)?,
                    bn2: BatchNorm::new(st, &format!("{p}.bn2"), c)?,
                    pad: c.saturating_sub(prev),
                    stride,
                });
                prev = c;
            }
        }
        let linear = Linear::new(st, "linear", prev, *num_classes, true)?;
        Ok(ResNet20 { spec: spec.into(), store, conv1, bn1, blocks: all, linear })
    }
}

/// Option-A shortcut: every `stride`-th pixel, then `pad` zero channels split evenly before and after.
fn shortcut(x: &Tensor, stride: usize, pad: usize) -> candle_core::Result<Tensor> {
    let mut h = x.clone();
    if stride > 1 {
        let (n, c, hh, ww) = h.dims4()?;
        let (oh, ow) = (hh.div_ceil(stride), ww.div_ceil(stride));
        let rows: Vec<u32> = (0..oh).map(|i| (i * stride) as u32).collect();
        let cols: Vec<u32> = (0..ow).map(|j| (j * stride) as u32).collect();
        let rows = Tensor::from_vec(rows, oh, h.device())?;
        let cols = Tensor::from_vec(cols, ow, h.device())?;
        h = h.index_select(&rows, 2)?.index_select(&cols, 3)?;
        let _ = (n, c);
    }
    if pad > 0 {
        let (n, _, hh, ww) = h.dims4()?;
        let before = pad / 2;
        let after = pad - before;
        let z1 = Tensor::zeros((n, before, hh, ww), h.dtype(), h.device())?;
        let z2 = Tensor::zeros((n, after, hh, ww), h.dtype(), h.device())?;
        h = Tensor::cat(&[&z1, &h, &z2], 1)?;
    }
    Ok(h)
}

impl Model for ResNet20 {
    fn spec(&self) -> &ArchSpec {
        &self.spec
    }
    fn store(&self) -> &ParamStore {
        &self.store
    }
    fn forward(&self, x: &Input, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let Input::Dense(x) = x else { candle_core::bail!("resnet20: expects images, got tokens") };
        let mut h = ops::relu(&self.bn1.forward(&self.conv1.forward(x)?, ctx)?)?;
        for b in &self.blocks {
            let y = ops::relu(&b.bn1.forward(&b.conv1.forward(&h)?, ctx)?)?;
            let y = b.bn2.forward(&b.conv2.forward(&y)?, ctx)?;
            h = ops::relu(&(y + shortcut(&h, b.stride, b.pad)?)?)?;
        }
        self.linear.forward(&h.mean((2, 3))?)
    }
    fn batchnorms(&self) -> Vec<&BatchNorm> {
        let mut v = vec![&self.bn1];
        for b in &self.blocks {
            v.push(&b.bn1);
            v.push(&b.bn2);
        }
        v
    }
    fn head_prefixes(&self) -> Vec<String> {
        vec!["linear".into()]
    }
}
