//! Products with a constant operand (a frozen weight, a mask) whose backward pass differentiates the other one alone.
//!
//! candle's backward pass differentiates both operands of a matmul or an elementwise product whatever their
//! tracking: a frozen (detached) weight still gets its gradient computed (one more weight-sized matmul per layer) and
//! kept in the gradient store, under an id nothing reads, until the store is dropped; a broadcast constant (an RMSNorm
//! scale, a bias, the rotary cosines, an attention mask) gets an activation-sized one. Selective fine-tuning then
//! cost full fine-tuning's time and more than its memory (SmolLM2-135M with Spectrum's top 25% unfrozen: 7.16 GiB
//! against 6.17 GiB for full fine-tuning, before this op). The same holds the other way round: the first trained
//! layer after frozen ones got a gradient computed for its (constant) input. Here the result is computed from
//! detached operands and attached to the graph as a node of the one tracked operand, with that operand's gradient
//! given by the caller.
//!
//! Works on every device: the forward value is computed with candle's ops by the caller; the node only hands it over
//! (one copy of the output).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};

use super::CResult;

type Backward = Box<dyn Fn(&Tensor) -> CResult<Tensor> + Send + Sync>;

/// `value` (computed from `input` detached and frozen operands) as a graph node of `input` whose gradient is
/// `grad_input(grad of value)`. When `input` is not tracked either, `value` is returned as it is. `value` must be a
/// fresh result that owns its whole storage (the node hands over a copy of that storage).
fn with_input_grad(
    input: &Tensor,
    value: Tensor,
    grad_input: impl Fn(&Tensor) -> CResult<Tensor> + Send + Sync + 'static,
) -> CResult<Tensor> {
    if !input.track_op() {
        return Ok(value);
    }
    let value = if value.is_contiguous() && value.layout().start_offset() == 0 { value } else { value.copy()? };
    input.apply_op1(InputGrad { value: Mutex::new(Some(value)), grad_input: Box::new(grad_input) })
}

/// `x @ w^T (+ b)` for rows `x` (2-D) and a frozen `w` (and `b`): only `x` is differentiated.
pub fn frozen_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> CResult<Tensor> {
    let w = w.detach();
    let mut y = x.detach().matmul(&w.t()?)?;
    if let Some(b) = b {
        y = y.broadcast_add(&b.detach())?;
    }
    with_input_grad(x, y, move |g| g.matmul(&w))
}

/// `x @ w^T` for rows `x` (2-D) that are not differentiated (they come from frozen layers) and a trainable `w`:
/// only `w` is differentiated (candle would compute the gradient of `x` as well).
pub fn linear_of_constant_input(x: &Tensor, w: &Tensor) -> CResult<Tensor> {
    let x = x.detach();
    let y = x.matmul(&w.detach().t()?)?;
    with_input_grad(w, y, move |g| g.t()?.matmul(&x))
}

/// `x * v` broadcast over the leading axes of `x`, for a frozen vector `v`: only `x` is differentiated.
pub fn frozen_scale(x: &Tensor, v: &Tensor) -> CResult<Tensor> {
    let v = v.detach();
    let y = x.detach().broadcast_mul(&v)?;
    with_input_grad(x, y, move |g| g.broadcast_mul(&v))
}

/// `x + c` broadcast over the leading axes of `x`, for a constant `c` (an attention mask, the residual stream below
/// the first trained layer): only `x` is differentiated, with the identity.
pub fn frozen_shift(x: &Tensor, c: &Tensor) -> CResult<Tensor> {
    let y = x.detach().broadcast_add(&c.detach())?;
    with_input_grad(x, y, |g| Ok(g.clone()))
}

struct InputGrad {
    /// Taken by the forward pass, so the graph does not keep a second copy of the output alive.
    value: Mutex<Option<Tensor>>,
    grad_input: Backward,
}

impl InputGrad {
    fn take(&self) -> CResult<(Storage, Shape)> {
        let value = self
            .value
            .lock()
            .map_err(|_| candle_core::Error::Msg("graft-input-grad: poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("graft-input-grad: forward ran twice".into()))?;
        let (storage, layout) = value.storage_and_layout();
        Ok((storage.try_clone(layout)?, value.shape().clone()))
    }
}

impl CustomOp1 for InputGrad {
    fn name(&self) -> &'static str {
        "graft-input-grad"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> CResult<(CpuStorage, Shape)> {
        match self.take()? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => Err(candle_core::Error::Msg("graft-input-grad: the value is not on the input's device".into())),
        }
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout) -> CResult<(candle_core::CudaStorage, Shape)> {
        match self.take()? {
            (Storage::Cuda(s), shape) => Ok((s, shape)),
            _ => Err(candle_core::Error::Msg("graft-input-grad: the value is not on the input's device".into())),
        }
    }
    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some((self.grad_input)(grad)?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use super::*;

    fn values(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
    }

    /// The input's gradient equals the one candle's own ops give, and no gradient is computed for the frozen operands.
    #[test]
    fn input_gradient_matches_candle_and_frozen_operands_get_none() {
        let dev = Device::Cpu;
        let x0: Vec<f64> = (0..24).map(|i| ((i * 7 % 11) as f64 - 5.0) / 3.0).collect();
        let w0: Vec<f64> = (0..20).map(|i| ((i * 5 % 13) as f64 - 6.0) / 4.0).collect();
        let b0: Vec<f64> = (0..5).map(|i| i as f64 / 2.0 - 1.0).collect();
        let v0: Vec<f64> = (0..4).map(|i| 0.5 + i as f64).collect();
        let x = Var::from_vec(x0, (6, 4), &dev).unwrap();
        let w = Var::from_vec(w0, (5, 4), &dev).unwrap();
        let b = Var::from_vec(b0, 5, &dev).unwrap();
        let v = Var::from_vec(v0, 4, &dev).unwrap();

        let c = Var::from_vec(vec![0.25f64, -1.0, 2.0, 0.0, 1.5], 5, &dev).unwrap();
        let ours = frozen_linear(&frozen_scale(&x, &v).unwrap(), &w, Some(&b)).unwrap();
        let ours = frozen_shift(&ours, &c).unwrap();
        let reference = x.broadcast_mul(&v).unwrap().matmul(&w.t().unwrap()).unwrap().broadcast_add(&b);
        let reference = reference.unwrap().broadcast_add(&c).unwrap();
        assert_eq!(values(&ours), values(&reference));

        // A loss whose gradient differs per output (2y), with no constant operand of its own.
        let g_ours = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = reference.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(values(g_ours.get(&x).unwrap()), values(g_ref.get(&x).unwrap()));
        for frozen in [&w, &b, &v, &c] {
            assert!(g_ours.get(frozen).is_none(), "a frozen operand got a gradient");
            assert!(g_ref.get(frozen).is_some());
        }
        // Only the tracked input's gradient (and the loss's own nodes, removed by candle) is in the store.
        assert_eq!(g_ours.get_ids().count(), 1);
        assert_eq!(ours.dtype(), DType::F64);
    }

    /// A trained weight applied to a constant input: the weight's gradient equals candle's, the input gets none.
    #[test]
    fn constant_input_gets_no_gradient() {
        let dev = Device::Cpu;
        let x = Tensor::from_vec((0..12).map(|i| i as f64 / 5.0 - 1.0).collect::<Vec<_>>(), (3, 4), &dev).unwrap();
        let w = Var::from_vec((0..8).map(|i| (i * 3 % 7) as f64 - 3.0).collect::<Vec<_>>(), (2, 4), &dev).unwrap();
        let ours = linear_of_constant_input(&x, &w).unwrap();
        let reference = x.matmul(&w.t().unwrap()).unwrap();
        assert_eq!(values(&ours), values(&reference));
        let g_ours = ours.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = reference.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(values(g_ours.get(&w).unwrap()), values(g_ref.get(&w).unwrap()));
        assert_eq!(g_ours.get_ids().count(), 1);
        assert_eq!(g_ref.get_ids().count(), 2, "candle's matmul differentiates the constant input too");
    }

    #[test]
    fn untracked_input_gives_the_plain_value() {
        let dev = Device::Cpu;
        let x = Tensor::ones((2, 4), DType::F32, &dev).unwrap();
        let w = Tensor::ones((3, 4), DType::F32, &dev).unwrap();
        let y = frozen_linear(&x, &w, None).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![4.0; 3]; 2]);
        assert!(!y.track_op());
    }
}
