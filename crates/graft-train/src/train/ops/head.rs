//! A language model's head and the log-probability of each row's target token as one blocked op:
//! `log softmax(x W^T)[row, target[row]]` for hidden rows `x` (rows, hidden) and a head `W` (vocab, hidden), with a
//! backward pass, without the (rows, vocab) logits or their gradient ever existing as tensors.
//!
//! Through candle (a product, then `target_logprobs`), a micro-batch of 8 x 127 rows over SmolLM2's 49,152 tokens
//! holds 200 MB of logits for the backward pass, which writes a gradient of the same size, and the product's
//! backward reads it twice. Here the rows go in chunks of `ROW_CHUNK` and the vocabulary in blocks of
//! `VOCAB_BLOCK`; a chunk's logits against one block (2 MiB in f32) are computed into a buffer of their own, used
//! and dropped:
//! - forward: each block's logits give the block's maximum and `sum(exp(logit - max))` per row (the sum in f64);
//!   the blocks' pairs are combined in block order into the row's log-sum-exp, kept for the backward pass;
//! - backward: each block's logits are computed again and turned in place into `G = g * (onehot - softmax)`, from
//!   which `grad_W[block] += G^T x[chunk]` (chunks in order) and the block's share `G W[block]` of `grad_x[chunk]`,
//!   summed over the blocks in block order in f64.
//!
//! Recomputing the logits costs one more product of the head's size than keeping them; in exchange nothing of the
//! logits' size is allocated, zero-filled or read back from memory. Every result depends only on the fixed chunk
//! and block partition, never on which thread ran a block, so gradients are bit-identical for any thread count.
//! `grad_W` is computed only when `W` is tracked (a trainable head, or the trainable embedding of a tied model),
//! `grad_x` only when `x` is.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor, WithDType};
use rayon::prelude::*;

use super::{contiguous, fused_available, matmul, unsupported, CResult, Exp};

/// Rows whose logits are computed together: enough rows that a block of the head read from memory serves many of
/// them (and `grad_W`'s accumulation passes over the head few times), few enough that a block's logits stay small.
const ROW_CHUNK: usize = 256;

/// Vocabulary entries per block: the unit of parallel work (SmolLM2's 49,152 tokens make 24 blocks). A fixed size,
/// not one derived from the thread count, so that results do not depend on it.
const VOCAB_BLOCK: usize = 2048;

/// `log softmax(x @ w^T)[row, targets[row]]` for `x` (rows, hidden), `w` (vocab, hidden) and u32 `targets` (rows,):
/// a (rows,) tensor, differentiable in `x` and `w`.
pub fn head_logprobs(x: &Tensor, w: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    head_logprobs_blocked(x, w, targets, Blocks { rows: ROW_CHUNK, vocab: VOCAB_BLOCK })
}

/// The chunk and block sizes (small ones in the tests, so that a few rows span several of each).
#[derive(Clone, Copy, Debug)]
pub(super) struct Blocks {
    pub rows: usize,
    pub vocab: usize,
}

pub(super) fn head_logprobs_blocked(
    x: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    blocks: Blocks,
) -> candle_core::Result<Tensor> {
    let (rows, hidden) = x.dims2()?;
    let (_, w_hidden) = w.dims2()?;
    if hidden == 0 || w_hidden != hidden || targets.dims() != [rows] {
        candle_core::bail!(
            "graft-head-logprobs: hidden rows {:?}, head {:?} and targets {:?} do not fit",
            x.dims(),
            w.dims(),
            targets.dims()
        );
    }
    if !fused_available(x) || w.dtype() != x.dtype() {
        return super::target_logprobs(&x.matmul(&w.t()?)?, targets);
    }
    x.contiguous()?.apply_op3(&w.contiguous()?, &targets.contiguous()?, HeadLogprob { blocks, lse: Mutex::new(None) })
}

/// Per row, the maximum logit and `sum(exp(logit - max))`: what the backward pass needs of the forward one.
struct RowLse {
    max: Vec<f64>,
    sum: Vec<f64>,
}

struct HeadLogprob {
    blocks: Blocks,
    /// Filled by the forward pass, read by the backward pass.
    lse: Mutex<Option<RowLse>>,
}

fn targets_of<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> CResult<&'a [u32]> {
    match s {
        CpuStorage::U32(_) => contiguous::<u32>(s, l, op),
        _ => Err(candle_core::Error::Msg(format!("{op}: targets must be u32"))),
    }
}

/// One vocabulary block's view of a chunk of rows: per row its maximum logit, `sum(exp(logit - max))` and, when
/// the row's target lies in the block, the target's logit.
struct BlockPartial<T> {
    max: Vec<T>,
    sum: Vec<f64>,
    target: Vec<Option<T>>,
}

/// `logits (rows x block) = x_chunk @ w_block^T` into `buf`.
fn block_logits<T: WithDType>(buf: &mut Vec<T>, x: &[T], w: &[T], hidden: usize) -> usize {
    let (rows, n) = (x.len() / hidden, w.len() / hidden);
    buf.clear();
    buf.resize(rows * n, T::from_f64(0.0));
    matmul(rows, n, hidden, buf, false, x, false, w, true);
    n
}

fn forward<T: WithDType + Exp>(x: &[T], w: &[T], targets: &[u32], hidden: usize, blocks: Blocks) -> (Vec<T>, RowLse) {
    let rows = targets.len();
    let block_len = blocks.vocab * hidden;
    let mut out = Vec::with_capacity(rows);
    let (mut max, mut sum) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
    for (xc, tc) in x.chunks(blocks.rows * hidden).zip(targets.chunks(blocks.rows)) {
        let partials: Vec<BlockPartial<T>> = w
            .par_chunks(block_len)
            .enumerate()
            .map_init(Vec::new, |buf, (b, wb)| {
                let n = block_logits(buf, xc, wb, hidden);
                let start = b * blocks.vocab;
                let mut p = BlockPartial {
                    max: Vec::with_capacity(tc.len()),
                    sum: Vec::with_capacity(tc.len()),
                    target: Vec::with_capacity(tc.len()),
                };
                for (row, &t) in buf.chunks(n).zip(tc) {
                    let m = row.iter().fold(row[0], |a, &v| if v > a { v } else { a });
                    p.max.push(m);
                    p.sum.push(row.iter().map(|&v| (v - m).exp_().to_f64()).sum());
                    let t = t as usize;
                    p.target.push((start..start + n).contains(&t).then(|| row[t - start]));
                }
                p
            })
            .collect();
        for r in 0..tc.len() {
            let m = partials.iter().map(|p| p.max[r].to_f64()).fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = partials.iter().map(|p| p.sum[r] * (p.max[r].to_f64() - m).exp()).sum();
            let target = partials.iter().find_map(|p| p.target[r]).map_or(f64::NAN, |v| v.to_f64());
            out.push(T::from_f64(target - m - s.ln()));
            max.push(m);
            sum.push(s);
        }
    }
    (out, RowLse { max, sum })
}

/// `grad_x` (when `want_x`) and `grad_w` (when `want_w`) for the row gradients `g`.
#[allow(clippy::too_many_arguments)]
fn backward<T: WithDType + Exp>(
    x: &[T],
    w: &[T],
    targets: &[u32],
    g: &[T],
    lse: &RowLse,
    hidden: usize,
    blocks: Blocks,
    want_x: bool,
    want_w: bool,
) -> (Option<Vec<T>>, Option<Vec<T>>) {
    let block_len = blocks.vocab * hidden;
    let mut dx = want_x.then(|| vec![T::from_f64(0.0); x.len()]);
    let mut dw = want_w.then(|| vec![T::from_f64(0.0); w.len()]);
    for (chunk, (xc, tc)) in x.chunks(blocks.rows * hidden).zip(targets.chunks(blocks.rows)).enumerate() {
        let first = chunk * blocks.rows;
        let gc = &g[first..first + tc.len()];
        let dw_blocks: Vec<Option<&mut [T]>> = match dw.as_mut() {
            Some(dw) => dw.chunks_mut(block_len).map(Some).collect(),
            None => (0..w.len().div_ceil(block_len)).map(|_| None).collect(),
        };
        let shares: Vec<Option<Vec<T>>> = w
            .par_chunks(block_len)
            .zip(dw_blocks.into_par_iter())
            .enumerate()
            .map_init(Vec::new, |buf, (b, (wb, dwb))| {
                let n = block_logits(buf, xc, wb, hidden);
                let start = b * blocks.vocab;
                for (r, (row, &t)) in buf.chunks_mut(n).zip(tc).enumerate() {
                    let i = first + r;
                    let m = T::from_f64(lse.max[i]);
                    let scale = T::from_f64(-gc[r].to_f64() / lse.sum[i]);
                    for v in row.iter_mut() {
                        *v = scale * (*v - m).exp_();
                    }
                    let t = t as usize;
                    if (start..start + n).contains(&t) {
                        let v = &mut row[t - start];
                        *v = T::from_f64(v.to_f64() + gc[r].to_f64());
                    }
                }
                if let Some(dwb) = dwb {
                    matmul(n, hidden, tc.len(), dwb, chunk > 0, buf, true, xc, false);
                }
                want_x.then(|| {
                    let mut share = vec![T::from_f64(0.0); tc.len() * hidden];
                    matmul(tc.len(), hidden, n, &mut share, false, buf, false, wb, false);
                    share
                })
            })
            .collect();
        if let Some(dx) = dx.as_mut() {
            let dxc = &mut dx[first * hidden..(first + tc.len()) * hidden];
            dxc.par_chunks_mut(hidden).enumerate().for_each(|(r, out)| {
                for (j, o) in out.iter_mut().enumerate() {
                    let k = r * hidden + j;
                    *o = T::from_f64(shares.iter().flatten().map(|s| s[k].to_f64()).sum());
                }
            });
        }
    }
    (dx, dw)
}

impl CustomOp3 for HeadLogprob {
    fn name(&self) -> &'static str {
        "graft-head-logprobs"
    }
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (rows, hidden) = xl.shape().dims2()?;
        let (vocab, _) = wl.shape().dims2()?;
        let targets = targets_of(ts, tl, self.name())?;
        if targets.iter().any(|&t| t as usize >= vocab) {
            return Err(candle_core::Error::Msg(format!("{}: a target is outside 0..{vocab}", self.name())));
        }
        dispatch!(xs, "graft-head-logprobs", |T| {
            let x = contiguous::<T>(xs, xl, self.name())?;
            let w = contiguous::<T>(ws, wl, self.name())?;
            let (out, lse) = forward(x, w, targets, hidden, self.blocks);
            *self.lse.lock().map_err(|_| candle_core::Error::Msg("graft-head-logprobs: poisoned".into()))? = Some(lse);
            Ok((T::to_cpu_storage_owned(out), Shape::from(rows)))
        })
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        t: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (want_x, want_w) = (x.track_op(), w.track_op());
        if !want_x && !want_w {
            return Ok((None, None, None));
        }
        let lse = self.lse.lock().map_err(|_| candle_core::Error::Msg("graft-head-logprobs: poisoned".into()))?;
        let lse = lse.as_ref().ok_or_else(|| candle_core::Error::Msg("graft-head-logprobs: no forward pass".into()))?;
        let grad = grad.contiguous()?;
        let hidden = x.dim(1)?;
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (ts, tl) = t.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (Storage::Cpu(xs), Storage::Cpu(ws), Storage::Cpu(ts), Storage::Cpu(gs)) = (&*xs, &*ws, &*ts, &*gs) else {
            return Err(candle_core::Error::Msg(format!("{}: tensors are not on the CPU", self.name())));
        };
        let targets = targets_of(ts, tl, self.name())?;
        let (dx, dw) = dispatch!(xs, "graft-head-logprobs", |T| {
            let xv = contiguous::<T>(xs, xl, self.name())?;
            let wv = contiguous::<T>(ws, wl, self.name())?;
            let gv = contiguous::<T>(gs, gl, self.name())?;
            let (dx, dw) = backward(xv, wv, targets, gv, lse, hidden, self.blocks, want_x, want_w);
            let dx = dx.map(|v| Tensor::from_vec(v, x.shape(), x.device())).transpose()?;
            let dw = dw.map(|v| Tensor::from_vec(v, w.shape(), w.device())).transpose()?;
            Ok((dx, dw))
        })?;
        Ok((dx, dw, None))
    }
}
