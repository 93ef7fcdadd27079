//! AdamW (Loshchilov & Hutter; PyTorch's `torch.optim.AdamW` update order) as one fused in-place pass per
//! parameter: decoupled weight decay, both moment updates, bias correction and the step in a single loop over the
//! raw buffers, with no temporaries. candle's own `AdamW` builds about ten full-size tensors per parameter per step,
//! which on a small network costs more than the matrix products.
//!
//! Only trainable parameters get state; frozen ones are never touched. On devices other than the CPU the same
//! update runs as candle tensor ops.

use std::cell::RefCell;
use std::mem::MaybeUninit;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp2, Layout, Tensor, Var};
use rayon::prelude::*;

use super::params::ParamStore;

#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWConfig {
    /// PyTorch's defaults with the reference study's weight decay (0.01, also PyTorch's AdamW default).
    pub fn new(lr: f64) -> Self {
        AdamWConfig { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

enum Moments {
    F32(Vec<f32>, Vec<f32>),
    F64(Vec<f64>, Vec<f64>),
    Device(Tensor, Tensor),
}

struct Slot {
    var: Var,
    moments: Moments,
}

pub struct AdamW {
    cfg: AdamWConfig,
    step: u64,
    slots: Vec<Slot>,
}

impl AdamW {
    /// State for every parameter of `store` that trains now.
    pub fn new(store: &ParamStore, cfg: AdamWConfig) -> candle_core::Result<Self> {
        let mut slots = Vec::new();
        for (_, p) in store.params().filter(|(_, p)| p.trainable()) {
            let moments = if !p.var.device().is_cpu() || super::ops::generic_forced() {
                Moments::Device(p.var.zeros_like()?, p.var.zeros_like()?)
            } else if p.var.dtype() == candle_core::DType::F64 {
                Moments::F64(Vec::new(), Vec::new())
            } else {
                Moments::F32(Vec::new(), Vec::new())
            };
            slots.push(Slot { var: p.var.clone(), moments });
        }
        Ok(AdamW { cfg, step: 0, slots })
    }

    /// Number of values of optimiser state (two per trained parameter value).
    pub fn state_len(&self) -> usize {
        self.slots.iter().map(|s| 2 * s.var.elem_count()).sum()
    }

    /// One update from the gradients in `grads` (parameters without a gradient are left alone).
    pub fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.step += 1;
        let c = self.cfg;
        let t = self.step as i32;
        let step = Step {
            lr: c.lr,
            decay: 1.0 - c.lr * c.weight_decay,
            b1: c.beta1,
            b2: c.beta2,
            eps: c.eps,
            // Folding PyTorch's bias corrections into the step size and epsilon keeps one division per element.
            step_size: c.lr / (1.0 - c.beta1.powi(t)),
            bc2_sqrt: (1.0 - c.beta2.powi(t)).sqrt(),
        };
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.var.as_tensor()) else { continue };
            match &mut slot.moments {
                Moments::Device(m, v) => {
                    let p = slot.var.as_tensor();
                    *m = ((&*m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
                    *v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                    let denom = ((v.sqrt()? / step.bc2_sqrt)? + c.eps)?;
                    let new = ((p * step.decay)? - (m.div(&denom)? * step.step_size)?)?;
                    slot.var.set(&new)?;
                }
                Moments::F32(m, v) => {
                    let op = FusedAdamW { step, f32: RefCell::new(Some((m, v))), f64: RefCell::new(None) };
                    slot.var.as_tensor().inplace_op2(&g.contiguous()?, &op)?;
                }
                Moments::F64(m, v) => {
                    let op = FusedAdamW { step, f32: RefCell::new(None), f64: RefCell::new(Some((m, v))) };
                    slot.var.as_tensor().inplace_op2(&g.contiguous()?, &op)?;
                }
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct Step {
    lr: f64,
    decay: f64,
    b1: f64,
    b2: f64,
    eps: f64,
    step_size: f64,
    bc2_sqrt: f64,
}

type MomentsRef<'a, T> = RefCell<Option<(&'a mut Vec<T>, &'a mut Vec<T>)>>;

struct FusedAdamW<'a> {
    step: Step,
    f32: MomentsRef<'a, f32>,
    f64: MomentsRef<'a, f64>,
}

/// Elements per parallel task: large enough that scheduling costs nothing, small enough to split big matrices.
const GRAIN: usize = 1 << 14;

/// A first moment as the first update sees it: zero, written before it is read.
fn zeroed<T: From<f32>>(x: &mut MaybeUninit<T>) -> &mut T {
    x.write(T::from(0.0))
}

/// A moment of an earlier update.
fn held<T>(x: &mut T) -> &mut T {
    x
}

/// The update of one parameter. The CPU moments start empty and are written, not read, by the first update: the
/// moments of a large model are its largest fresh allocation, and zero-filled memory that is read before it is
/// written costs two page faults per page (the shared zero page, then a private copy) instead of one. The first
/// update still computes `b1 * 0 + (1 - b1) * g`, so its bits are those of an update from zeroed moments.
macro_rules! adamw_kernel {
    ($t:ty, $p:expr, $g:expr, $m:expr, $v:expr, $s:expr) => {{
        let (m, v) = ($m, $v);
        if m.is_empty() {
            let n = $g.len();
            m.reserve_exact(n);
            v.reserve_exact(n);
            let (new_m, new_v) = (&mut m.spare_capacity_mut()[..n], &mut v.spare_capacity_mut()[..n]);
            adamw_loop!($t, $p, $g, new_m, new_v, $s, zeroed);
            // SAFETY: the loop above wrote every one of the first n elements of both (the chunks cover the slice).
            unsafe {
                m.set_len(n);
                v.set_len(n);
            }
        } else {
            adamw_loop!($t, $p, $g, &mut m[..], &mut v[..], $s, held);
        }
    }};
}

macro_rules! adamw_loop {
    ($t:ty, $p:expr, $g:expr, $m:expr, $v:expr, $s:expr, $init:expr) => {{
        let s = $s;
        let (decay, b1, b2, eps) = (s.decay as $t, s.b1 as $t, s.b2 as $t, s.eps as $t);
        let (c1, c2) = ((1.0 - s.b1) as $t, (1.0 - s.b2) as $t);
        let (step_size, inv_bc2) = (s.step_size as $t, (1.0 / s.bc2_sqrt) as $t);
        let _ = s.lr;
        let init = $init;
        $p.par_chunks_mut(GRAIN)
            .zip($g.par_chunks(GRAIN))
            .zip($m.par_chunks_mut(GRAIN).zip($v.par_chunks_mut(GRAIN)))
            .for_each(|((p, g), (m, v))| {
                // Zipped iterators carry no bounds checks, so the loop compiles to vector instructions (the
                // arithmetic per element, and so the result, is the same as an indexed loop's).
                for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    let (m, v) = (init(m), init(v));
                    let mi = b1 * *m + c1 * g;
                    let vi = b2 * *v + c2 * g * g;
                    *m = mi;
                    *v = vi;
                    *p = *p * decay - step_size * mi / (vi.sqrt() * inv_bc2 + eps);
                }
            });
    }};
}

impl InplaceOp2 for FusedAdamW<'_> {
    fn name(&self) -> &'static str {
        "graft-fused-adamw"
    }
    fn cpu_fwd(&self, ps: &mut CpuStorage, pl: &Layout, gs: &CpuStorage, gl: &Layout) -> candle_core::Result<()> {
        let (Some((p0, p1)), Some((g0, g1))) = (pl.contiguous_offsets(), gl.contiguous_offsets()) else {
            candle_core::bail!("graft-fused-adamw: parameter or gradient is not contiguous")
        };
        match (ps, gs) {
            (CpuStorage::F32(p), CpuStorage::F32(g)) => {
                let mut st = self.f32.borrow_mut();
                let (m, v) = st.as_mut().ok_or_else(|| candle_core::Error::Msg("adamw: f32 state missing".into()))?;
                adamw_kernel!(f32, p[p0..p1], g[g0..g1], m, v, self.step);
            }
            (CpuStorage::F64(p), CpuStorage::F64(g)) => {
                let mut st = self.f64.borrow_mut();
                let (m, v) = st.as_mut().ok_or_else(|| candle_core::Error::Msg("adamw: f64 state missing".into()))?;
                adamw_kernel!(f64, p[p0..p1], g[g0..g1], m, v, self.step);
            }
            _ => candle_core::bail!("graft-fused-adamw: parameter and gradient must both be f32 or f64"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::params::Init;
    use candle_core::{DType, Device};

    /// Three steps of the fused update against PyTorch's AdamW algorithm written out plainly in f64.
    #[test]
    fn fused_step_matches_the_textbook_update() {
        let mut store = ParamStore::new(DType::F64, Device::Cpu, 3);
        let p = store.param("w", &[5], Init::Normal(1.0)).unwrap();
        let frozen = store.param("f", &[2], Init::Normal(1.0)).unwrap();
        frozen.set_trainable(false);
        let cfg = AdamWConfig::new(0.1);
        let mut opt = AdamW::new(&store, cfg).unwrap();
        assert_eq!(opt.state_len(), 10, "frozen parameters get no state");
        let mut w: Vec<f64> = p.var.to_vec1().unwrap();
        let (mut m, mut v) = (vec![0.0; 5], vec![0.0; 5]);
        for t in 1..=3 {
            // loss = sum(w^3) / 3 -> grad = w^2
            let loss = (p.t().powf(3.0).unwrap().sum_all().unwrap() / 3.0).unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&grads).unwrap();
            for i in 0..5 {
                let g = w[i] * w[i];
                w[i] -= cfg.lr * cfg.weight_decay * w[i];
                m[i] = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * g;
                v[i] = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * g * g;
                let mh = m[i] / (1.0 - cfg.beta1.powi(t));
                let vh = v[i] / (1.0 - cfg.beta2.powi(t));
                w[i] -= cfg.lr * mh / (vh.sqrt() + cfg.eps);
            }
            let got: Vec<f64> = p.var.to_vec1().unwrap();
            for (a, b) in got.iter().zip(&w) {
                assert!((a - b).abs() < 1e-12, "step {t}: {a} vs {b}");
            }
        }
    }
}
