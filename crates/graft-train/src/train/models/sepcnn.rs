//! The reference study's separable-convolution residual network.
//!
//! `stem` (sepconv in->w1, ReLU); stage s = `depths[s]` residual blocks `stage{s}.{i}` of two sepconvs `conv1`,
//! `conv2` (relu(conv1 x) -> conv2 -> + x -> relu); between stages a 2x2 max-pool and a `transition{s}` sepconv
//! (no ReLU); global average pool; head `mlp.{i}` = Linear + BatchNorm1d + ReLU (+ dropout 0.4 on all but the last);
//! `classifier` Linear. At width 1 with depths 3/4/3 and fc 512/256/128/64 this is the 944,494-parameter network of
//! the study (10 classes).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::layers::{dropout, BatchNorm, Ctx, Linear, SepConv};
use super::{scaled, unfit_image, Arch, ArchOptions, ArchSpec, Input, Model, Spec};
use crate::error::{Error, Result};
use crate::train::ops;
use crate::train::params::ParamStore;

pub const DEFAULT_WIDTHS: [usize; 3] = [64, 128, 256];
pub const DEFAULT_DEPTHS: [usize; 3] = [3, 4, 3];
pub const DEFAULT_FC: [usize; 4] = [512, 256, 128, 64];
const HEAD_DROPOUT: f64 = 0.4;

/// The `sepcnn` architecture.
#[derive(Debug)]
pub struct SepcnnArch;

impl Arch for SepcnnArch {
    fn name(&self) -> &'static str {
        "sepcnn"
    }
    fn about(&self) -> &'static str {
        "the reference study's separable-conv residual network; --width, --depths"
    }
    fn alignment(&self) -> Option<super::AlignFamily> {
        Some(super::AlignFamily::Cnn)
    }
    fn fresh(&self, options: &ArchOptions, sample_shape: &[usize], classes: usize) -> Result<ArchSpec> {
        let channels = if sample_shape.len() == 3 { sample_shape[0] } else { 1 };
        Ok(spec(channels, options.width, &options.depths, classes))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SepcnnSpec {
    pub in_channels: usize,
    pub widths: Vec<usize>,
    pub depths: Vec<usize>,
    pub fc: Vec<usize>,
    pub num_classes: usize,
}

impl Spec for SepcnnSpec {
    fn arch(&self) -> &'static dyn Arch {
        &SepcnnArch
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
        Ok(Box::new(SepCnn::new(self.clone(), store)?))
    }
}

/// The study's network at `width` (channels and head sizes scaled) with the given stage depths.
pub fn spec(in_channels: usize, width: f64, depths: &[usize], num_classes: usize) -> ArchSpec {
    SepcnnSpec {
        in_channels,
        widths: DEFAULT_WIDTHS.iter().map(|&c| scaled(c, width)).collect(),
        depths: depths.to_vec(),
        fc: DEFAULT_FC.iter().map(|&c| scaled(c, width)).collect(),
        num_classes,
    }
    .into()
}

struct Block {
    conv1: SepConv,
    conv2: SepConv,
}

struct Head {
    linear: Linear,
    bn: BatchNorm,
}

pub struct SepCnn {
    spec: ArchSpec,
    store: ParamStore,
    stem: SepConv,
    /// (transition before the stage, if any; blocks)
    stages: Vec<(Option<SepConv>, Vec<Block>)>,
    head: Vec<Head>,
    classifier: Linear,
}

impl SepCnn {
    pub fn new(spec: SepcnnSpec, mut store: ParamStore) -> Result<Self> {
        let SepcnnSpec { in_channels, widths, depths, fc, num_classes } = &spec;
        if widths.is_empty() || widths.len() != depths.len() || widths.contains(&0) || fc.contains(&0) {
            return Err(Error::usage(format!(
                "sepcnn: widths {widths:?} and depths {depths:?} must be non-empty, positive and of equal length"
            )));
        }
        let st = &mut store;
        let stem = SepConv::new(st, "stem", *in_channels, widths[0])?;
        let mut stages = Vec::new();
        let mut prev = widths[0];
        for (s, (&c, &d)) in widths.iter().zip(depths).enumerate() {
            let transition = if s > 0 { Some(SepConv::new(st, &format!("transition{s}"), prev, c)?) } else { None };
            let blocks = (0..d)
                .map(|i| {
                    Ok(Block {
                        conv1: SepConv::new(st, &format!("stage{}.{i}.conv1", s + 1), c, c)?,
                        conv2: SepConv::new(st, &format!("stage{}.{i}.conv2", s + 1), c, c)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            stages.push((transition, blocks));
            prev = c;
        }
        let mut head = Vec::new();
        for (i, &h) in fc.iter().enumerate() {
            head.push(Head {
                linear: Linear::new(st, &format!("mlp.{i}.linear"), prev, h, true)?,
                bn: BatchNorm::new(st, &format!("mlp.{i}.bn"), h)?,
            });
            prev = h;
        }
        let classifier = Linear::new(st, "classifier", prev, *num_classes, true)?;
        Ok(SepCnn { spec: spec.into(), store, stem, stages, head, classifier })
    }
}

impl Model for SepCnn {
    fn spec(&self) -> &ArchSpec {
        &self.spec
    }
    fn store(&self) -> &ParamStore {
        &self.store
    }
    fn forward(&self, x: &Input, ctx: &Ctx) -> candle_core::Result<Tensor> {
        let Input::Dense(x) = x else { candle_core::bail!("sepcnn: expects images, got tokens") };
        let mut h = ops::relu(&self.stem.forward(x, ctx)?)?;
        for (s, (transition, blocks)) in self.stages.iter().enumerate() {
            if let Some(t) = transition {
                if s > 0 {
                    h = ops::max_pool(&h, 2)?;
                }
                h = t.forward(&h, ctx)?;
            }
            for b in blocks {
                let y = ops::relu(&b.conv1.forward(&h, ctx)?)?;
                let y = b.conv2.forward(&y, ctx)?;
                h = ops::relu(&(y + &h)?)?;
            }
        }
        let mut h = h.mean((2, 3))?;
        let last = self.head.len().saturating_sub(1);
        for (i, l) in self.head.iter().enumerate() {
            h = ops::relu(&l.bn.forward(&l.linear.forward(&h)?, ctx)?)?;
            if i < last {
                h = dropout(&h, HEAD_DROPOUT, &format!("mlp.{i}"), ctx)?;
            }
        }
        self.classifier.forward(&h)
    }
    fn batchnorms(&self) -> Vec<&BatchNorm> {
        let mut v: Vec<&BatchNorm> = self.stem.batchnorms().to_vec();
        for (t, blocks) in &self.stages {
            if let Some(t) = t {
                v.extend(t.batchnorms());
            }
            for b in blocks {
                v.extend(b.conv1.batchnorms());
                v.extend(b.conv2.batchnorms());
            }
        }
        v.extend(self.head.iter().map(|h| &h.bn));
        v
    }
    fn head_prefixes(&self) -> Vec<String> {
        vec!["classifier".into()]
    }
}
