//! The log-probability of a target class per row of logits, `x[t] - logsumexp(x)`, as one pass per row with a
//! backward pass that writes `g * (onehot(t) - softmax(x))` in one more: a language model's loss over a vocabulary of
//! tens of thousands without the full-size log-softmax, gather and their gradients as separate tensors.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::{contiguous, fused_available, unsupported, CResult, Exp};

/// `log softmax(logits)[row, targets[row]]` for logits (rows, classes) and u32 targets (rows,): a (rows,) tensor.
pub fn target_logprobs(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    if !fused_available(logits) {
        let lp = candle_nn::ops::log_softmax(logits, candle_core::D::Minus1)?;
        return lp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1);
    }
    logits.contiguous()?.apply_op2(&targets.contiguous()?, TargetLogprob)
}

struct TargetLogprob;

/// The row's maximum and `sum(exp(x - max))`: each exponential in the working precision (an f32 one is within
/// f32's rounding of the exact value, and several times cheaper than f64's), the sum in f64.
fn max_and_exp_sum<T: Exp>(row: &[T]) -> (T, f64) {
    let m = row.iter().fold(row[0], |a, &b| if b > a { b } else { a });
    (m, row.iter().map(|&v| (v - m).exp_().to_f64()).sum())
}

fn targets_of<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> CResult<&'a [u32]> {
    match s {
        CpuStorage::U32(_) => contiguous::<u32>(s, l, op),
        _ => Err(candle_core::Error::Msg(format!("{op}: targets must be u32"))),
    }
}

impl CustomOp2 for TargetLogprob {
    fn name(&self) -> &'static str {
        "graft-target-logprob"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout, ts: &CpuStorage, tl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (rows, n) = l.shape().dims2()?;
        let targets = targets_of(ts, tl, self.name())?;
        if targets.len() != rows || targets.iter().any(|&t| t as usize >= n) {
            return Err(candle_core::Error::Msg(format!("{}: a target is outside 0..{n}", self.name())));
        }
        dispatch!(s, "graft-target-logprob", |T| {
            let x = contiguous::<T>(s, l, "graft-target-logprob")?;
            let out: Vec<T> = x
                .par_chunks(n)
                .zip(targets.par_iter())
                .map(|(row, &t)| {
                    let (m, sum) = max_and_exp_sum(row);
                    T::from_f64(row[t as usize].to_f64() - m.to_f64() - sum.ln())
                })
                .collect();
            Ok((T::to_cpu_storage_owned(out), Shape::from(rows)))
        })
    }
    fn bwd(&self, x: &Tensor, t: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(x.apply_op3_no_bwd(t, &grad.contiguous()?, &TargetLogprobBackward)?), None))
    }
}

/// d logits = g_row * (onehot(target) - softmax(row)).
struct TargetLogprobBackward;

impl CustomOp3 for TargetLogprobBackward {
    fn name(&self) -> &'static str {
        "graft-target-logprob-backward"
    }
    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (_, n) = l.shape().dims2()?;
        let targets = targets_of(ts, tl, self.name())?;
        dispatch!(s, "graft-target-logprob-backward", |T| {
            let x = contiguous::<T>(s, l, "graft-target-logprob-backward")?;
            let g = contiguous::<T>(gs, gl, "graft-target-logprob-backward")?;
            let mut dx = vec![T::from_f64(0.0); x.len()];
            dx.par_chunks_mut(n).zip(x.par_chunks(n)).zip(targets.par_iter().zip(g.par_iter())).for_each(
                |((o, row), (&t, &g))| {
                    let (m, sum) = max_and_exp_sum(row);
                    let scale = T::from_f64(-g.to_f64() / sum);
                    for (o, &v) in o.iter_mut().zip(row) {
                        *o = scale * (v - m).exp_();
                    }
                    o[t as usize] = T::from_f64(o[t as usize].to_f64() + g.to_f64());
                },
            );
            Ok((T::to_cpu_storage_owned(dx), l.shape().clone()))
        })
    }
}
