//! A fully connected ReLU network `layers.{i}` (`nn.Sequential`-free naming of the fixtures): Linear layers with
//! ReLU between them, the last one producing the logits. Inputs of any shape are flattened per sample.

use candle_core::Tensor;

use super::layers::{Ctx, Linear};
use super::{ArchSpec, Input, Model};
use crate::error::{Error, Result};
use crate::train::ops;
use crate::train::params::ParamStore;

pub struct Mlp {
    spec: ArchSpec,
    store: ParamStore,
    layers: Vec<Linear>,
}

impl Mlp {
    pub fn new(spec: ArchSpec, mut store: ParamStore) -> Result<Self> {
        let ArchSpec::Mlp { sizes } = &spec else { unreachable!() };
        if sizes.len() < 2 || sizes.contains(&0) {
            return Err(Error::usage(format!("mlp sizes {sizes:?}: need an input and an output size, all positive")));
        }
        let layers = sizes
            .windows(2)
            .enumerate()
            .map(|(i, w)| Linear::new(&mut store, &format!("layers.{i}"), w[0], w[1], true))
            .collect::<Result<Vec<_>>>()?;
        Ok(Mlp { spec, store, layers })
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
