//! A fully connected ReLU network `layers.{i}` (`nn.Sequential`-free naming of the fixtures): Linear layers with
//! ReLU between them, the last one producing the logits. Inputs of any shape are flattened per sample.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::layers::{Ctx, Linear};
use super::{Arch, ArchOptions, ArchSpec, Input, Model, Spec};
use crate::error::{Error, Result};
use crate::train::ops;
use crate::train::params::ParamStore;

/// The `mlp` architecture.
#[derive(Debug)]
pub struct MlpArch;

impl Arch for MlpArch {
    fn name(&self) -> &'static str {
        "mlp"
    }
    fn about(&self) -> &'static str {
        "fully connected ReLU network; hidden sizes from --hidden"
    }
    fn alignment(&self) -> Option<super::AlignFamily> {
        Some(super::AlignFamily::Mlp)
    }
    /// Input features = the sample's elements, then `--hidden`, then one output per class.
    fn fresh(&self, options: &ArchOptions, sample_shape: &[usize], classes: usize) -> Result<ArchSpec> {
        let mut sizes = vec![sample_shape.iter().product::<usize>().max(1)];
        sizes.extend(&options.hidden);
        sizes.push(classes);
        Ok(MlpSpec { sizes }.into())
    }
}

/// `sizes` = input, hidden..., classes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MlpSpec {
    pub sizes: Vec<usize>,
}

impl Spec for MlpSpec {
    fn arch(&self) -> &'static dyn Arch {
        &MlpArch
    }
    fn num_classes(&self) -> usize {
        *self.sizes.last().unwrap_or(&0)
    }
    fn set_num_classes(&mut self, n: usize) {
        if let Some(l) = self.sizes.last_mut() {
            *l = n
        }
    }
    fn unfit_input(&self, sample_shape: &[usize]) -> Option<String> {
        let inputs = self.sizes.first().copied().unwrap_or(0);
        let numel: usize = sample_shape.iter().product();
        (sample_shape.is_empty() || inputs != numel).then(|| format!("{inputs} input features"))
    }
    fn build(&self, store: ParamStore) -> Result<Box<dyn Model>> {
        Ok(Box::new(Mlp::new(self.clone(), store)?))
    }
}

pub struct Mlp {
    spec: ArchSpec,
    store: ParamStore,
    layers: Vec<Linear>,
}

impl Mlp {
    pub fn new(spec: MlpSpec, mut store: ParamStore) -> Result<Self> {
        let sizes = &spec.sizes;
        if sizes.len() < 2 || sizes.contains(&0) {
            return Err(Error::usage(format!("mlp sizes {sizes:?}: need an input and an output size, all positive")));
        }
        let layers = sizes
            .windows(2)
            .enumerate()
            .map(|(i, w)| Linear::new(&mut store, &format!("layers.{i}"), w[0], w[1], true))
            .collect::<Result<Vec<_>>>()?;
        Ok(Mlp { spec: spec.into(), store, layers })
    }
}

impl Model for Mlp {
    fn spec(&self) -> &ArchSpec {
        &self.spec
    }
    fn store(&self) -> &ParamStore {
        &self.store
    }
    fn forward(&self, x: &Input, _ctx: &Ctx) -> candle_core::Result<Tensor> {
        let Input::Dense(x) = x else { candle_core::bail!("mlp: expects dense inputs, got tokens") };
        let mut h = x.flatten_from(1)?;
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h)?;
            if i + 1 < self.layers.len() {
                h = ops::relu(&h)?;
            }
        }
        Ok(h)
    }
    fn head_prefixes(&self) -> Vec<String> {
        vec![format!("layers.{}", self.layers.len() - 1)]
    }
}
