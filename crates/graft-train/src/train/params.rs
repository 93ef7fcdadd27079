//! The ordered store of a model's tensors: trainable parameters, float buffers (BatchNorm running statistics) and
//! integer counters (`num_batches_tracked`), each under the name it has in a checkpoint.
//!
//! candle's `VarMap` is a hash map: it loses the declaration order (which is the order graft writes checkpoints in,
//! the PyTorch `state_dict` order) and cannot hold integer buffers, so the models register their tensors here.
//! Whether a parameter trains is a flag on its handle: a frozen parameter enters the forward pass detached, so
//! candle computes no gradient for it and nothing upstream of it that only it needs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};
use crate::rng::Rng;

/// What a stored tensor is.
#[derive(Clone, Debug)]
pub enum Slot {
    /// A parameter the optimiser may train.
    Param(Param),
    /// A float buffer updated by the forward pass (running statistics), never by the optimiser.
    Buffer(Var),
    /// An integer counter stored as a 0-d I64 tensor (`num_batches_tracked`).
    Counter(Arc<AtomicI64>),
}

/// A parameter and whether it currently trains.
#[derive(Clone, Debug)]
pub struct Param {
    pub var: Var,
    trainable: Arc<AtomicBool>,
}

impl Param {
    /// The tensor to use in a forward pass: tracked when the parameter trains, detached (no gradient) when frozen.
    pub fn t(&self) -> Tensor {
        if self.trainable() {
            self.var.as_tensor().clone()
        } else {
            self.var.as_tensor().detach()
        }
    }
    pub fn trainable(&self) -> bool {
        self.trainable.load(Ordering::Relaxed)
    }
    pub fn set_trainable(&self, on: bool) {
        self.trainable.store(on, Ordering::Relaxed)
    }
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    pub shape: Vec<usize>,
    pub slot: Slot,
}

/// How a fresh parameter is initialised (PyTorch's defaults, drawn from a per-name stream of graft's generator).
#[derive(Clone, Copy, Debug)]
pub enum Init {
    /// Uniform in [-bound, bound] (PyTorch's Linear/Conv default: bound = 1/sqrt(fan_in)).
    Uniform(f64),
    Normal(f64),
    Const(f64),
}

pub struct ParamStore {
    pub dtype: DType,
    pub device: Device,
    seed: u64,
    /// Tensors start as zeros, not drawn from `Init`: every one of them is about to be read from a checkpoint.
    placeholders: bool,
    entries: Vec<Entry>,
    index: HashMap<String, usize>,
}

impl ParamStore {
    pub fn new(dtype: DType, device: Device, seed: u64) -> Self {
        ParamStore { dtype, device, seed, placeholders: false, entries: Vec::new(), index: HashMap::new() }
    }

    /// A store for a model that `checkpoint_io::load` fills next, each tensor of which must be in the checkpoint:
    /// its tensors start as zeros. Drawing 135 million initial values in f64 only to overwrite them was most of the
    /// time SmolLM2 took to load, and their f64 and f32 copies a gigabyte and a half of memory touched once.
    pub fn for_loading(dtype: DType, device: Device) -> Self {
        ParamStore { placeholders: true, ..Self::new(dtype, device, 0) }
    }

    fn values(&self, name: &str, n: usize, init: Init) -> Vec<f64> {
        let mut r = Rng::for_label(self.seed, name);
        match init {
            Init::Uniform(b) => (0..n).map(|_| (2.0 * r.next_f64() - 1.0) * b).collect(),
            Init::Normal(s) => (0..n).map(|_| r.normal() * s).collect(),
            Init::Const(c) => vec![c; n],
        }
    }

    fn tensor(&self, name: &str, shape: &[usize], init: Init) -> Result<Var> {
        if self.placeholders {
            return Var::zeros(shape, self.dtype, &self.device)
                .map_err(|e| Error::invalid(format!("cannot create tensor '{name}': {e}")));
        }
        let v = self.values(name, shape.iter().product(), init);
        let t = Tensor::from_vec(v, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(self.dtype))
            .and_then(|t| t.to_device(&self.device))
            .map_err(|e| Error::invalid(format!("cannot create tensor '{name}': {e}")))?;
        Var::from_tensor(&t).map_err(|e| Error::invalid(format!("cannot create tensor '{name}': {e}")))
    }

    fn push(&mut self, name: &str, shape: &[usize], slot: Slot) {
        assert!(!self.index.contains_key(name), "tensor '{name}' registered twice");
        self.index.insert(name.to_string(), self.entries.len());
        self.entries.push(Entry { name: name.to_string(), shape: shape.to_vec(), slot });
    }

    pub fn param(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Param> {
        let p = Param { var: self.tensor(name, shape, init)?, trainable: Arc::new(AtomicBool::new(true)) };
        self.push(name, shape, Slot::Param(p.clone()));
        Ok(p)
    }

    pub fn buffer(&mut self, name: &str, shape: &[usize], value: f64) -> Result<Var> {
        let v = self.tensor(name, shape, Init::Const(value))?;
        self.push(name, shape, Slot::Buffer(v.clone()));
        Ok(v)
    }

    pub fn counter(&mut self, name: &str) -> Arc<AtomicI64> {
        let c = Arc::new(AtomicI64::new(0));
        self.push(name, &[], Slot::Counter(c.clone()));
        c
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.index.get(name).map(|&i| &self.entries[i])
    }

    /// Trainable-or-frozen parameters in declaration order.
    pub fn params(&self) -> impl Iterator<Item = (&str, &Param)> {
        self.entries.iter().filter_map(|e| match &e.slot {
            Slot::Param(p) => Some((e.name.as_str(), p)),
            _ => None,
        })
    }

    pub fn param_count(&self) -> usize {
        self.params().map(|(_, p)| p.var.elem_count()).sum()
    }

    pub fn trainable_count(&self) -> usize {
        self.params().filter(|(_, p)| p.trainable()).map(|(_, p)| p.var.elem_count()).sum()
    }

    /// A tensor's values as f64 (parameters and buffers; counters as their value).
    pub fn values_f64(&self, name: &str) -> Result<Vec<f64>> {
        let e = self.get(name).ok_or_else(|| Error::invalid(format!("model has no tensor '{name}'")))?;
        let t = match &e.slot {
            Slot::Param(p) => p.var.as_tensor().clone(),
            Slot::Buffer(v) => v.as_tensor().clone(),
            Slot::Counter(c) => return Ok(vec![c.load(Ordering::Relaxed) as f64]),
        };
        t.flatten_all()
            .and_then(|t| t.to_dtype(DType::F64))
            .and_then(|t| t.to_vec1::<f64>())
            .map_err(|e| Error::invalid(format!("cannot read tensor '{name}': {e}")))
    }
}
