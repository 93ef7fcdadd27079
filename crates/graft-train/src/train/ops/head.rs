//! A language model's head and the log-probability of each row's target token as one blocked op:
//! `log softmax(x W^T)[row, target[row]]` for hidden rows `x` (rows, hidden) and a head `W` (vocab, hidden), with a
//! backward pass, without the (rows, vocab) logits or their gradient ever existing as tensors.
//!
//! Through candle (a product, then `target_logprobs`), a micro-batch of 8 x 127 rows over SmolLM2's 49,152 tokens
//! holds 200 MB of logits for the backward pass, which writes a gradient of the same size, and the product's
//! backward reads it twice. Here the rows go in chunks of `ROW_CHUNK` and the vocabulary in blocks of
//! `VOCAB_BLOCK` (the unit of parallel work):
//! - forward: a chunk's logits against every block (25 MiB in f32, one buffer reused chunk after chunk) give each
//!   block's maximum and `sum(exp(logit - max))` per row (the sum in f64), combined in block order into the row's
//!   log-sum-exp. When a gradient is wanted, the chunk's logits are then turned in place into
//!   `onehot - softmax` (the logit gradient for an upstream gradient of one per row), from which
//!   `grad_W[block] += G^T x[chunk]` (chunks in order) and the block's share `G W[block]` of `grad_x[chunk]`
//!   (summed over the blocks in block order in f64): three products of the head's size in all, as candle's, without
//!   its full-size tensors;
//! - backward: the rows' gradient scales row by row by the upstream gradient; the head's, a sum over rows, scales
//!   only when the upstream gradient is the same for every row, which it is for a loss that sums or averages the
//!   log-probabilities. Otherwise the logits are computed again block by block and turned into
//!   `g * (onehot - softmax)` directly.
//!
//! Every result depends only on the fixed chunk and block partition, never on which thread ran a block, so values
//! and gradients are bit-identical for any thread count. `grad_W` is computed only when `W` is tracked (a trainable
//! head, or the trainable embedding of a tied model), `grad_x` only when `x` is.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor, WithDType};
use rayon::prelude::*;

use super::{contiguous, fused_available, matmul, unsupported, CResult, Exp};

/// Rows whose logits are computed together: enough rows that a block of the head read from memory serves many of
/// them (and `grad_W`'s accumulation passes over the head few times), few enough that the chunk's logits (128 x
/// 49,152 f32 for SmolLM2) stay under the allocator's 32 MiB mmap threshold, so their buffer is reused, not zeroed by
/// the kernel on every call.
const ROW_CHUNK: usize = 128;

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
    let op = HeadLogprob {
        blocks,
        want: Want { x: x.track_op(), w: w.track_op() },
        lse: Mutex::new(None),
        unit_grads: Mutex::new(None),
    };
    x.contiguous()?.apply_op3(&w.contiguous()?, &targets.contiguous()?, op)
}

/// Per row, the maximum logit and `sum(exp(logit - max))`: what the backward pass needs of the forward one.
struct RowLse {
    max: Vec<f64>,
    sum: Vec<f64>,
}

struct HeadLogprob {
    blocks: Blocks,
    want: Want,
    /// Filled by the forward pass, read by the backward pass.
    lse: Mutex<Option<RowLse>>,
    /// The gradients for an upstream gradient of one per row (rows', head's), filled by the forward pass and taken
    /// by the backward pass.
    unit_grads: Mutex<Option<(Option<CpuStorage>, Option<CpuStorage>)>>,
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("graft-head-logprobs: poisoned".into())
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

/// Turns one block's logits (rows x n, the block starting at token `start`) into their gradient in place:
/// `g * (onehot(target) - softmax)` per row, from the rows' maxima and exponential sums.
fn logits_to_gradient<T: WithDType + Exp>(
    block: &mut [T],
    n: usize,
    start: usize,
    targets: &[u32],
    (max, sum): (&[f64], &[f64]),
    g: impl Fn(usize) -> f64,
) {
    for (r, (row, &t)) in block.chunks_mut(n).zip(targets).enumerate() {
        let m = T::from_f64(max[r]);
        let scale = T::from_f64(-g(r) / sum[r]);
        for v in row.iter_mut() {
            *v = scale * (*v - m).exp_();
        }
        let t = t as usize;
        if (start..start + n).contains(&t) {
            let v = &mut row[t - start];
            *v = T::from_f64(v.to_f64() + g(r));
        }
    }
}

/// From one block's logit gradient `p` (rows x n): `dw_block (+)= p^T x_chunk` when the head's gradient is wanted,
/// and the block's share `p @ w_block` of the chunk's `grad_x` when the rows' is.
fn block_products<T: WithDType>(
    p: &[T],
    x: &[T],
    w: &[T],
    dw: Option<&mut [T]>,
    accumulate: bool,
    want_x: bool,
    hidden: usize,
) -> Option<Vec<T>> {
    let (rows, n) = (x.len() / hidden, w.len() / hidden);
    if let Some(dw) = dw {
        matmul(n, hidden, rows, dw, accumulate, p, true, x, false);
    }
    want_x.then(|| {
        let mut share = vec![T::from_f64(0.0); rows * hidden];
        matmul(rows, hidden, n, &mut share, false, p, false, w, false);
        share
    })
}

/// `dx_chunk = sum of the blocks' shares`, in block order, in f64.
fn sum_shares<T: WithDType>(dx: &mut [T], shares: &[Option<Vec<T>>], hidden: usize) {
    dx.par_chunks_mut(hidden).enumerate().for_each(|(r, out)| {
        for (j, o) in out.iter_mut().enumerate() {
            let k = r * hidden + j;
            *o = T::from_f64(shares.iter().flatten().map(|s| s[k].to_f64()).sum());
        }
    });
}

/// The head's gradient split into per-block slots (none when it is not wanted).
fn dw_slots<T>(dw: Option<&mut Vec<T>>, block_len: usize, blocks: usize) -> Vec<Option<&mut [T]>> {
    match dw {
        Some(dw) => dw.chunks_mut(block_len).map(Some).collect(),
        None => (0..blocks).map(|_| None).collect(),
    }
}

/// Which gradients the graph wants: of the rows (`x` tracked) and of the head (`w` tracked).
#[derive(Clone, Copy, Debug)]
struct Want {
    x: bool,
    w: bool,
}

/// The forward pass's results: the log-probabilities, the rows' log-sum-exp terms and, when a gradient is wanted,
/// the gradients for an upstream gradient of one per row (computed from the chunk's logits while they are at hand).
struct Forward<T> {
    logprobs: Vec<T>,
    lse: RowLse,
    unit_dx: Option<Vec<T>>,
    unit_dw: Option<Vec<T>>,
}

fn forward<T: WithDType + Exp>(
    x: &[T],
    w: &[T],
    targets: &[u32],
    hidden: usize,
    blocks: Blocks,
    want: Want,
) -> Forward<T> {
    let rows = targets.len();
    let vocab = w.len() / hidden;
    let block_len = blocks.vocab * hidden;
    let n_blocks = w.len().div_ceil(block_len);
    let mut out = Vec::with_capacity(rows);
    let (mut max, mut sum) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
    let mut unit_dx = want.x.then(|| vec![T::from_f64(0.0); x.len()]);
    let mut unit_dw = want.w.then(|| vec![T::from_f64(0.0); w.len()]);
    // One chunk's logits against the whole vocabulary, block after block: kept between the pass that finds the
    // rows' log-sum-exp and the one that turns them into gradients (so the gradients cost no second product).
    let mut logits = vec![T::from_f64(0.0); blocks.rows.min(rows) * vocab];
    for (chunk, (xc, tc)) in x.chunks(blocks.rows * hidden).zip(targets.chunks(blocks.rows)).enumerate() {
        let (first, rc) = (chunk * blocks.rows, tc.len());
        let chunk_logits = &mut logits[..rc * vocab];
        let partials: Vec<BlockPartial<T>> = chunk_logits
            .par_chunks_mut(rc * blocks.vocab)
            .zip(w.par_chunks(block_len))
            .enumerate()
            .map(|(b, (lb, wb))| {
                let n = wb.len() / hidden;
                matmul(rc, n, hidden, lb, false, xc, false, wb, true);
                let start = b * blocks.vocab;
                let mut p = BlockPartial {
                    max: Vec::with_capacity(rc),
                    sum: Vec::with_capacity(rc),
                    target: Vec::with_capacity(rc),
                };
                for (row, &t) in lb.chunks(n).zip(tc) {
                    let m = row.iter().fold(row[0], |a, &v| if v > a { v } else { a });
                    p.max.push(m);
                    p.sum.push(row.iter().map(|&v| (v - m).exp_().to_f64()).sum());
                    let t = t as usize;
                    p.target.push((start..start + n).contains(&t).then(|| row[t - start]));
                }
                p
            })
            .collect();
        for r in 0..rc {
            let m = partials.iter().map(|p| p.max[r].to_f64()).fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = partials.iter().map(|p| p.sum[r] * (p.max[r].to_f64() - m).exp()).sum();
            let target = partials.iter().find_map(|p| p.target[r]).map_or(f64::NAN, |v| v.to_f64());
            out.push(T::from_f64(target - m - s.ln()));
            max.push(m);
            sum.push(s);
        }
        if !want.x && !want.w {
            continue;
        }
        let row_lse = (&max[first..first + rc], &sum[first..first + rc]);
        let shares: Vec<Option<Vec<T>>> = chunk_logits
            .par_chunks_mut(rc * blocks.vocab)
            .zip(w.par_chunks(block_len))
            .zip(dw_slots(unit_dw.as_mut(), block_len, n_blocks).into_par_iter())
            .enumerate()
            .map(|(b, ((lb, wb), dwb))| {
                let n = wb.len() / hidden;
                logits_to_gradient(lb, n, b * blocks.vocab, tc, row_lse, |_| 1.0);
                block_products(lb, xc, wb, dwb, chunk > 0, want.x, hidden)
            })
            .collect();
        if let Some(dx) = unit_dx.as_mut() {
            sum_shares(&mut dx[first * hidden..(first + rc) * hidden], &shares, hidden);
        }
    }
    Forward { logprobs: out, lse: RowLse { max, sum }, unit_dx, unit_dw }
}

/// `grad_x` and `grad_w` (those `want` names) for the row gradients `g`, the logits computed again block by block.
#[allow(clippy::too_many_arguments)]
fn backward<T: WithDType + Exp>(
    x: &[T],
    w: &[T],
    targets: &[u32],
    g: &[T],
    lse: &RowLse,
    hidden: usize,
    blocks: Blocks,
    want: Want,
) -> (Option<Vec<T>>, Option<Vec<T>>) {
    let block_len = blocks.vocab * hidden;
    let n_blocks = w.len().div_ceil(block_len);
    let mut dx = want.x.then(|| vec![T::from_f64(0.0); x.len()]);
    let mut dw = want.w.then(|| vec![T::from_f64(0.0); w.len()]);
    for (chunk, (xc, tc)) in x.chunks(blocks.rows * hidden).zip(targets.chunks(blocks.rows)).enumerate() {
        let (first, rc) = (chunk * blocks.rows, tc.len());
        let gc = &g[first..first + rc];
        let row_lse = (&lse.max[first..first + rc], &lse.sum[first..first + rc]);
        let shares: Vec<Option<Vec<T>>> = w
            .par_chunks(block_len)
            .zip(dw_slots(dw.as_mut(), block_len, n_blocks).into_par_iter())
            .enumerate()
            .map_init(Vec::new, |buf, (b, (wb, dwb))| {
                let n = block_logits(buf, xc, wb, hidden);
                logits_to_gradient(buf, n, b * blocks.vocab, tc, row_lse, |r| gc[r].to_f64());
                block_products(buf, xc, wb, dwb, chunk > 0, want.x, hidden)
            })
            .collect();
        if let Some(dx) = dx.as_mut() {
            sum_shares(&mut dx[first * hidden..(first + rc) * hidden], &shares, hidden);
        }
    }
    (dx, dw)
}

/// `unit` (rows of `width`) with row r multiplied by `g(r)` in the working precision, in place (no second buffer of
/// the head's size), as a tensor of `like`'s shape and device.
fn scaled_rows(unit: CpuStorage, width: usize, g: impl Fn(usize) -> f64 + Sync, like: &Tensor) -> CResult<Tensor> {
    fn scale<T: WithDType>(mut v: Vec<T>, width: usize, g: &(impl Fn(usize) -> f64 + Sync)) -> Vec<T> {
        v.par_chunks_mut(width).enumerate().for_each(|(r, row)| {
            let c = T::from_f64(g(r));
            for x in row {
                *x *= c;
            }
        });
        v
    }
    match unit {
        CpuStorage::F32(v) => Tensor::from_vec(scale(v, width, &g), like.shape(), like.device()),
        CpuStorage::F64(v) => Tensor::from_vec(scale(v, width, &g), like.shape(), like.device()),
        _ => Err(unsupported("graft-head-logprobs")),
    }
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
            let f = forward(x, w, targets, hidden, self.blocks, self.want);
            let unit = (f.unit_dx.map(T::to_cpu_storage_owned), f.unit_dw.map(T::to_cpu_storage_owned));
            *self.lse.lock().map_err(|_| poisoned())? = Some(f.lse);
            *self.unit_grads.lock().map_err(|_| poisoned())? = Some(unit);
            Ok((T::to_cpu_storage_owned(f.logprobs), Shape::from(rows)))
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
        let want = Want { x: x.track_op(), w: w.track_op() };
        if !want.x && !want.w {
            return Ok((None, None, None));
        }
        let grad = grad.contiguous()?;
        // The forward pass's gradients serve when they are the wanted ones: the rows' scale by any upstream
        // gradient row by row; the head's sums over rows, so it scales only by an upstream gradient equal for every
        // row (a training loss's sum or mean of the log-probabilities).
        let unit = self.unit_grads.lock().map_err(|_| poisoned())?.take();
        if let Some((unit_dx, unit_dw)) = unit {
            let g = grad.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
            let uniform = g.first().is_none_or(|&g0| g.iter().all(|&v| v == g0));
            if (!want.x || unit_dx.is_some()) && (!want.w || (unit_dw.is_some() && uniform)) {
                let hidden = x.dim(1)?;
                let dx = match unit_dx.filter(|_| want.x) {
                    Some(u) => Some(scaled_rows(u, hidden, |r| g[r], x)?),
                    None => None,
                };
                let g0 = g.first().copied().unwrap_or(0.0);
                let dw = match unit_dw.filter(|_| want.w) {
                    Some(u) => Some(scaled_rows(u, hidden, |_| g0, w)?),
                    None => None,
                };
                return Ok((dx, dw, None));
            }
        }
        let lse = self.lse.lock().map_err(|_| poisoned())?;
        let lse = lse.as_ref().ok_or_else(|| candle_core::Error::Msg("graft-head-logprobs: no forward pass".into()))?;
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
            let (dx, dw) = backward(xv, wv, targets, gv, lse, hidden, self.blocks, want);
            let dx = dx.map(|v| Tensor::from_vec(v, x.shape(), x.device())).transpose()?;
            let dw = dw.map(|v| Tensor::from_vec(v, w.shape(), w.device())).transpose()?;
            Ok((dx, dw))
        })?;
        Ok((dx, dw, None))
    }
}
