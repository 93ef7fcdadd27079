//! Fused CPU kernels for training, as candle custom ops with their own backward passes.
//!
//! candle's generic CPU path spends most of a small network's step in elementwise temporaries: a grouped
//! (depthwise) convolution becomes one convolution per channel plus a concatenation, a training-mode BatchNorm is a
//! dozen broadcast ops forward and more backward, ReLU's backward builds a comparison mask, a cast and a product.
//! Each op here does its work in one pass over the data (two for statistics), in parallel over planes or channels,
//! with f64 accumulation and a fixed reduction order, so results do not depend on the thread count.
//!
//! Every op works for f32 and f64 (the finite-difference gradient checks run in f64). On devices other than the CPU
//! the callers use candle's generic ops instead (`fused_available`), which compute the same functions.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

type CResult<T> = candle_core::Result<T>;

/// `GRAFT_GENERIC_OPS=1` makes every op (and AdamW) take candle's generic path on the CPU too: how
/// `tools/bench-train` measures what the fused kernels gain, and a way to rule them out when debugging.
pub fn generic_forced() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| std::env::var_os("GRAFT_GENERIC_OPS").is_some_and(|v| v == "1"))
}

/// Whether the fused CPU kernels can run on `t` (CPU tensor of f32 or f64).
pub fn fused_available(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64) && !generic_forced()
}

fn contiguous<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, op: &str) -> CResult<&'a [T]> {
    let (a, b) =
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{op}: input is not contiguous")))?;
    Ok(&s.as_slice::<T>()?[a..b])
}

fn unsupported(op: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: only f32 and f64 tensors are supported"))
}

/// Dispatches a generic kernel on the storage dtype.
macro_rules! dispatch {
    ($s:expr, $op:expr, |$t:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            _ => Err(unsupported($op)),
        }
    };
}

fn from_f64_vec<T: WithDType>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&x| T::from_f64(x)).collect()
}

// ---------------------------------------------------------------------------------------------------------------
// ReLU

/// `max(x, 0)` whose backward is one masked copy of the gradient.
pub fn relu(x: &Tensor) -> candle_core::Result<Tensor> {
    if !fused_available(x) {
        return x.relu();
    }
    x.contiguous()?.apply_op1(Relu)
}

struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "graft-relu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        dispatch!(s, "graft-relu", |T| {
            let x = contiguous::<T>(s, l, "graft-relu")?;
            let zero = T::from_f64(0.0);
            let y: Vec<T> = x.iter().map(|&v| if v > zero { v } else { zero }).collect();
            Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
        })
    }
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op2_no_bwd(res, &ReluBackward)?))
    }
}

struct ReluBackward;

impl CustomOp2 for ReluBackward {
    fn name(&self) -> &'static str {
        "graft-relu-backward"
    }
    fn cpu_fwd(&self, g: &CpuStorage, gl: &Layout, y: &CpuStorage, yl: &Layout) -> CResult<(CpuStorage, Shape)> {
        dispatch!(g, "graft-relu-backward", |T| {
            let g = contiguous::<T>(g, gl, "graft-relu-backward")?;
            let y = contiguous::<T>(y, yl, "graft-relu-backward")?;
            let zero = T::from_f64(0.0);
            let dx: Vec<T> = g.iter().zip(y).map(|(&g, &y)| if y > zero { g } else { zero }).collect();
            Ok((T::to_cpu_storage_owned(dx), gl.shape().clone()))
        })
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Softmax over the last axis

/// Softmax over the last axis with a backward pass. (candle-nn 0.11's `softmax_last_dim` is applied without a
/// backward pass, so gradients silently stop at it: attention weights would never train.)
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if !fused_available(x) {
        return candle_nn::ops::softmax(x, candle_core::D::Minus1);
    }
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "graft-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let n = l.shape().dims().last().copied().unwrap_or(1).max(1);
        dispatch!(s, "graft-softmax", |T| {
            let x = contiguous::<T>(s, l, "graft-softmax")?;
            let mut y = vec![T::from_f64(0.0); x.len()];
            y.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(|(o, i)| {
                let m = i.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b.to_f64()));
                let mut sum = 0f64;
                for (o, &v) in o.iter_mut().zip(i) {
                    let e = (v.to_f64() - m).exp();
                    sum += e;
                    *o = T::from_f64(e);
                }
                for o in o.iter_mut() {
                    *o = T::from_f64(o.to_f64() / sum);
                }
            });
            Ok((T::to_cpu_storage_owned(y), l.shape().clone()))
        })
    }
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op2_no_bwd(res, &SoftmaxBackward)?))
    }
}

/// dx = y * (g - sum(g * y)) per row.
struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "graft-softmax-backward"
    }
    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout, ys: &CpuStorage, yl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let n = gl.shape().dims().last().copied().unwrap_or(1).max(1);
        dispatch!(gs, "graft-softmax-backward", |T| {
            let g = contiguous::<T>(gs, gl, "graft-softmax-backward")?;
            let y = contiguous::<T>(ys, yl, "graft-softmax-backward")?;
            let mut dx = vec![T::from_f64(0.0); g.len()];
            dx.par_chunks_mut(n).zip(g.par_chunks(n).zip(y.par_chunks(n))).for_each(|(o, (g, y))| {
                let dot: f64 = g.iter().zip(y).map(|(a, b)| a.to_f64() * b.to_f64()).sum();
                for ((o, &g), &y) in o.iter_mut().zip(g).zip(y) {
                    *o = T::from_f64(y.to_f64() * (g.to_f64() - dot));
                }
            });
            Ok((T::to_cpu_storage_owned(dx), gl.shape().clone()))
        })
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Pointwise (1x1) convolution with bias

/// 1x1 convolution of `x` (N, Cin, H, W) with `w` (Cout, Cin, 1, 1) and bias `b` (Cout): one matrix product per
/// sample, bias added in the same pass, and a backward pass that sums the bias gradient per channel directly.
/// (Through candle's generic ops this is a reshape, a broadcast batched product, a broadcast bias add and another
/// reshape, each a full-size gradient buffer in the backward pass, plus a slow strided reduction for the bias.)
pub fn pointwise_conv(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let (n, cin, h, wd) = x.dims4()?;
    let cout = w.dim(0)?;
    if w.elem_count() != cout * cin || b.elem_count() != cout {
        candle_core::bail!(
            "pointwise conv: weight {:?} / bias {:?} do not fit input {:?}",
            w.dims(),
            b.dims(),
            x.dims()
        );
    }
    if !fused_available(x) {
        let y = w.reshape((cout, cin))?.broadcast_left(n)?.matmul(&x.reshape((n, cin, h * wd))?)?;
        return y.broadcast_add(&b.reshape((1, cout, 1))?)?.reshape((n, cout, h, wd));
    }
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, PointwiseConv)
}

struct PointwiseConv;

/// `dst (m x n) = [dst +] lhs (m x k) * rhs (k x n)`, row-major with explicit row strides, single-threaded (the
/// callers parallelise over samples, which keeps every result independent of the thread count).
#[allow(clippy::too_many_arguments)]
fn matmul<T: WithDType>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    accumulate: bool,
    lhs: &[T],
    lhs_transposed: bool,
    rhs: &[T],
    rhs_transposed: bool,
) {
    // Strides (column, row) of a row-major matrix, or of the transpose of one.
    let (lcs, lrs) = if lhs_transposed { (m as isize, 1) } else { (1, k as isize) };
    let (rcs, rrs) = if rhs_transposed { (k as isize, 1) } else { (1, n as isize) };
    assert!(dst.len() >= m * n && lhs.len() >= m * k && rhs.len() >= k * n);
    // SAFETY: the slices hold the m x n, m x k and k x n matrices the strides describe (checked above); gemm reads
    // lhs/rhs and writes dst only within those bounds, and dst does not alias the inputs (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lcs,
            lrs,
            rhs.as_ptr(),
            rcs,
            rrs,
            T::from_f64(1.0),
            T::from_f64(1.0),
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

impl CustomOp3 for PointwiseConv {
    fn name(&self) -> &'static str {
        "graft-pointwise-conv"
    }
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (n, cin, h, wd) = xl.shape().dims4()?;
        let hw = h * wd;
        dispatch!(xs, "graft-pointwise-conv", |T| {
            let x = contiguous::<T>(xs, xl, "graft-pointwise-conv")?;
            let w = contiguous::<T>(ws, wl, "graft-pointwise-conv")?;
            let b = contiguous::<T>(bs, bl, "graft-pointwise-conv")?;
            let cout = b.len();
            let mut y = vec![T::from_f64(0.0); n * cout * hw];
            y.par_chunks_mut(cout * hw).zip(x.par_chunks(cin * hw)).for_each(|(ys, xs)| {
                for (c, row) in ys.chunks_mut(hw).enumerate() {
                    row.fill(b[c]);
                }
                matmul(cout, hw, cin, ys, true, w, false, xs, false);
            });
            Ok((T::to_cpu_storage_owned(y), Shape::from((n, cout, h, wd))))
        })
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = PointwiseConvBackward { param_grads: Mutex::new(None) };
        let dx = x.apply_op3_no_bwd(&grad.contiguous()?, w, &op)?;
        let (dw, db) = op.param_grads.lock().unwrap().take().expect("pointwise backward ran");
        let dw = Tensor::from_vec(dw, w.shape(), w.device())?.to_dtype(w.dtype())?;
        let db = Tensor::from_vec(db, w.dim(0)?, w.device())?.to_dtype(w.dtype())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// dx_n = W^T g_n; dW = sum_n g_n x_n^T (per-sample partials summed in sample order); db = sum of g per channel.
struct PointwiseConvBackward {
    param_grads: Mutex<Option<(Vec<f64>, Vec<f64>)>>,
}

impl CustomOp3 for PointwiseConvBackward {
    fn name(&self) -> &'static str {
        "graft-pointwise-conv-backward"
    }
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (n, cin, h, wd) = xl.shape().dims4()?;
        let (_, cout, _, _) = gl.shape().dims4()?;
        let hw = h * wd;
        dispatch!(xs, "graft-pointwise-conv-backward", |T| {
            let x = contiguous::<T>(xs, xl, "graft-pointwise-conv-backward")?;
            let g = contiguous::<T>(gs, gl, "graft-pointwise-conv-backward")?;
            let w = contiguous::<T>(ws, wl, "graft-pointwise-conv-backward")?;
            let mut dx = vec![T::from_f64(0.0); x.len()];
            let partial: Vec<(Vec<T>, Vec<f64>)> = dx
                .par_chunks_mut(cin * hw)
                .zip(g.par_chunks(cout * hw).zip(x.par_chunks(cin * hw)))
                .map(|(dxs, (gs, xs))| {
                    matmul(cin, hw, cout, dxs, false, w, true, gs, false);
                    let mut dw = vec![T::from_f64(0.0); cout * cin];
                    matmul(cout, cin, hw, &mut dw, false, gs, false, xs, true);
                    let db: Vec<f64> = gs.chunks(hw).map(sum_f64).collect();
                    (dw, db)
                })
                .collect();
            let mut dw = vec![0f64; cout * cin];
            let mut db = vec![0f64; cout];
            for (pw, pb) in &partial {
                for (a, b) in dw.iter_mut().zip(pw) {
                    *a += b.to_f64();
                }
                for (a, b) in db.iter_mut().zip(pb) {
                    *a += b;
                }
            }
            let _ = n;
            *self.param_grads.lock().unwrap() = Some((dw, db));
            Ok((T::to_cpu_storage_owned(dx), xl.shape().clone()))
        })
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Depthwise convolution (k x k, stride 1, "same" padding k/2, one filter per channel, with bias)

/// Depthwise convolution of `x` (N, C, H, W) with `w` (C, 1, k, k) and bias `b` (C), stride 1, padding k/2.
/// Computed directly on the planes (no im2col, no per-channel convolutions).
pub fn depthwise_conv(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let (_, c, _, _) = x.dims4()?;
    let (wc, one, k, k2) = w.dims4()?;
    if wc != c || one != 1 || k != k2 || k % 2 == 0 {
        candle_core::bail!("depthwise conv: weight {:?} does not fit input {:?}", w.dims(), x.dims());
    }
    if !fused_available(x) {
        let y = x.conv2d(w, k / 2, 1, 1, c)?;
        return y.broadcast_add(&b.reshape((1, c, 1, 1))?);
    }
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, DepthwiseConv { k })
}

struct DepthwiseConv {
    k: usize,
}

/// `out[i, j] += sum over the k x k window of w * inp`, with zero padding, for one plane.
fn dw_plane<T: WithDType>(inp: &[T], w: &[T], out: &mut [T], h: usize, wd: usize, k: usize) {
    let p = k / 2;
    for i in 0..h {
        let orow = &mut out[i * wd..(i + 1) * wd];
        for di in 0..k {
            let si = i as isize + di as isize - p as isize;
            if si < 0 || si >= h as isize {
                continue;
            }
            let irow = &inp[si as usize * wd..(si as usize + 1) * wd];
            for dj in 0..k {
                let wv = w[di * k + dj];
                // Output column j reads input column j + dj - p; clip to the columns that exist.
                let shift = dj as isize - p as isize;
                let j0 = (-shift).max(0) as usize;
                let j1 = (wd as isize - shift).min(wd as isize).max(0) as usize;
                if j0 >= j1 {
                    continue;
                }
                let src = &irow[(j0 as isize + shift) as usize..(j1 as isize + shift) as usize];
                for (o, &v) in orow[j0..j1].iter_mut().zip(src) {
                    *o += wv * v;
                }
            }
        }
    }
}

/// Copies a plane into a zero-bordered (h + 2) x (w + 2) buffer, so 3x3 windows need no bounds checks.
fn pad1<T: WithDType>(inp: &[T], h: usize, wd: usize) -> Vec<T> {
    let pw = wd + 2;
    let mut p = vec![T::from_f64(0.0); (h + 2) * pw];
    for i in 0..h {
        p[(i + 1) * pw + 1..(i + 1) * pw + 1 + wd].copy_from_slice(&inp[i * wd..(i + 1) * wd]);
    }
    p
}

/// The 3x3 case over the zero-bordered plane taken as one flat vector with row stride `w + 2`: output (i, j) sits at
/// flat index `i * (w + 2) + j` and tap (di, dj) reads the same index shifted by `di * (w + 2) + dj`, so each tap is
/// one long contiguous multiply-add whatever the plane's width (rows of 8 or 16 would leave the vector units idle).
/// The two border columns of each row are computed and dropped. Terms are added in tap order after the bias.
fn dw3_plane<T: WithDType>(inp: &[T], w: &[T], bias: T, out: &mut [T], h: usize, wd: usize) {
    let pw = wd + 2;
    let p = pad1(inp, h, wd);
    // The last row's border columns are never needed: stopping short keeps every tap inside the padded plane.
    let len = h * pw - 2;
    let mut flat = vec![bias; len];
    for (t, &wv) in w[..9].iter().enumerate() {
        let off = (t / 3) * pw + t % 3;
        for (o, &v) in flat.iter_mut().zip(&p[off..off + len]) {
            *o += wv * v;
        }
    }
    for (i, row) in out.chunks_exact_mut(wd).enumerate() {
        row.copy_from_slice(&flat[i * pw..i * pw + wd]);
    }
}

/// The nine tap gradients of a 3x3 depthwise kernel over one plane: tap (di, dj) is the sum of
/// `g[i, j] * padded[i + di, j + dj]`. With `g` laid out at the padded row stride (zeros in the border columns),
/// each tap is one long dot product, as in `dw3_plane`.
fn dw3_weight_grad<T: WithDType>(g: &[T], padded: &[T], h: usize, wd: usize, taps: &mut [f64]) {
    let pw = wd + 2;
    let len = h * pw - 2;
    let mut gs = vec![T::from_f64(0.0); len];
    for (i, row) in g.chunks_exact(wd).enumerate() {
        gs[i * pw..i * pw + wd].copy_from_slice(row);
    }
    for (t, tap) in taps.iter_mut().enumerate().take(9) {
        let off = (t / 3) * pw + t % 3;
        *tap = dot_f64(&gs, &padded[off..off + len]);
    }
}

/// Lanes of independent partial sums: lets the compiler vectorise a reduction without reassociating it freely
/// (the order is fixed by the lane count, so results stay deterministic).
const LANES: usize = 16;

/// Elements per span: each lane adds `SPAN / LANES` products in the working precision before the span's lanes are
/// summed in f64. Long spans keep the (serial) f64 summation a small share of the work; 16 terms per lane keep the
/// f32 rounding small.
const SPAN: usize = 256;

/// Sum of `a[j] * b[j]` in f64 via `LANES` partial sums per `SPAN` (bounded f32 rounding, vectorised).
fn dot_f64<T: WithDType>(a: &[T], b: &[T]) -> f64 {
    let mut total = 0f64;
    for (ca, cb) in a.chunks(SPAN).zip(b.chunks(SPAN)) {
        let mut acc = [T::from_f64(0.0); LANES];
        let mut ia = ca.chunks_exact(LANES);
        let mut ib = cb.chunks_exact(LANES);
        for (x, y) in (&mut ia).zip(&mut ib) {
            for l in 0..LANES {
                acc[l] += x[l] * y[l];
            }
        }
        let mut s: f64 = acc.iter().map(|v| v.to_f64()).sum();
        for (x, y) in ia.remainder().iter().zip(ib.remainder()) {
            s += (*x * *y).to_f64();
        }
        total += s;
    }
    total
}

/// Sum of `a` in f64 (same lane scheme as `dot_f64`).
fn sum_f64<T: WithDType>(a: &[T]) -> f64 {
    let mut total = 0f64;
    for ca in a.chunks(SPAN) {
        let mut acc = [T::from_f64(0.0); LANES];
        let mut it = ca.chunks_exact(LANES);
        for x in &mut it {
            for l in 0..LANES {
                acc[l] += x[l];
            }
        }
        total += acc.iter().map(|v| v.to_f64()).sum::<f64>() + it.remainder().iter().map(|v| v.to_f64()).sum::<f64>();
    }
    total
}

impl CustomOp3 for DepthwiseConv {
    fn name(&self) -> &'static str {
        "graft-depthwise-conv"
    }
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (_n, c, h, wd) = xl.shape().dims4()?;
        let k = self.k;
        dispatch!(xs, "graft-depthwise-conv", |T| {
            let x = contiguous::<T>(xs, xl, "graft-depthwise-conv")?;
            let w = contiguous::<T>(ws, wl, "graft-depthwise-conv")?;
            let b = contiguous::<T>(bs, bl, "graft-depthwise-conv")?;
            let plane = h * wd;
            let mut y = vec![T::from_f64(0.0); x.len()];
            y.par_chunks_mut(plane).zip(x.par_chunks(plane)).enumerate().for_each(|(p, (out, inp))| {
                let ch = p % c;
                let wk = &w[ch * k * k..(ch + 1) * k * k];
                if k == 3 {
                    dw3_plane(inp, wk, b[ch], out, h, wd);
                } else {
                    out.fill(b[ch]);
                    dw_plane(inp, wk, out, h, wd, k);
                }
            });
            Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
        })
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // The input gradient is the same convolution with the kernel rotated by 180 degrees and no bias.
        let flipped = w.flip(&[2, 3])?.contiguous()?;
        let zero_bias = Tensor::zeros(w.dim(0)?, w.dtype(), w.device())?;
        let dx = grad.apply_op3_no_bwd(&flipped, &zero_bias, &DepthwiseConv { k: self.k })?;
        let packed = x.apply_op2_no_bwd(&grad, &DepthwiseConvParamGrad { k: self.k })?;
        let kk = self.k * self.k;
        let dw = packed.narrow(1, 0, kk)?.reshape(w.shape())?;
        let db = packed.narrow(1, kk, 1)?.flatten_all()?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// Weight and bias gradients of the depthwise convolution, packed as (C, k*k + 1).
struct DepthwiseConvParamGrad {
    k: usize,
}

impl CustomOp2 for DepthwiseConvParamGrad {
    fn name(&self) -> &'static str {
        "graft-depthwise-conv-param-grad"
    }
    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (n, c, h, wd) = xl.shape().dims4()?;
        let k = self.k;
        let p = k / 2;
        let kk = k * k;
        dispatch!(xs, "graft-depthwise-conv-param-grad", |T| {
            let x = contiguous::<T>(xs, xl, "graft-depthwise-conv-param-grad")?;
            let g = contiguous::<T>(gs, gl, "graft-depthwise-conv-param-grad")?;
            let plane = h * wd;
            // One partial sum per plane, combined per channel in batch order: fixed order, any thread count.
            let partial: Vec<Vec<f64>> = (0..n * c)
                .into_par_iter()
                .map(|pl| {
                    let xp = &x[pl * plane..(pl + 1) * plane];
                    let gp = &g[pl * plane..(pl + 1) * plane];
                    let mut acc = vec![0f64; kk + 1];
                    acc[kk] = sum_f64(gp);
                    if k == 3 {
                        dw3_weight_grad(gp, &pad1(xp, h, wd), h, wd, &mut acc[..9]);
                        return acc;
                    }
                    for di in 0..k {
                        for dj in 0..k {
                            let si = di as isize - p as isize;
                            let sj = dj as isize - p as isize;
                            let i0 = (-si).max(0) as usize;
                            let i1 = (h as isize - si).min(h as isize).max(0) as usize;
                            let j0 = (-sj).max(0) as usize;
                            let j1 = (wd as isize - sj).min(wd as isize).max(0) as usize;
                            let mut s = T::from_f64(0.0);
                            for i in i0..i1 {
                                let gr = &gp[i * wd + j0..i * wd + j1];
                                let xi = (i as isize + si) as usize;
                                let xr = &xp[xi * wd + (j0 as isize + sj) as usize..][..j1 - j0];
                                let mut row = T::from_f64(0.0);
                                for (&a, &b) in gr.iter().zip(xr) {
                                    row += a * b;
                                }
                                s += row;
                            }
                            acc[di * k + dj] = s.to_f64();
                        }
                    }
                    acc
                })
                .collect();
            let mut out = vec![0f64; c * (kk + 1)];
            for (pl, acc) in partial.iter().enumerate() {
                let ch = pl % c;
                for (o, a) in out[ch * (kk + 1)..(ch + 1) * (kk + 1)].iter_mut().zip(acc) {
                    *o += a;
                }
            }
            Ok((T::to_cpu_storage_owned(from_f64_vec::<T>(&out)), Shape::from((c, kk + 1))))
        })
    }
}

// ---------------------------------------------------------------------------------------------------------------
// BatchNorm, training mode (batch statistics)

/// Batch statistics of one training-mode BatchNorm call: per-channel mean and biased variance, and the count.
#[derive(Clone, Debug, Default)]
pub struct BatchStats {
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
    pub count: usize,
}

/// Training-mode BatchNorm of `x` (N, C) or (N, C, H, W) over every axis but the channel: normalise with the batch
/// mean and biased variance, scale by `gamma`, shift by `beta`. The batch statistics (for the running averages) are
/// returned alongside.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> candle_core::Result<(Tensor, Arc<Mutex<BatchStats>>)> {
    let stats = Arc::new(Mutex::new(BatchStats::default()));
    if !fused_available(x) {
        return batch_norm_train_generic(x, gamma, beta, eps);
    }
    let y = x.contiguous()?.apply_op3(gamma, beta, BatchNormTrain { eps, stats: stats.clone() })?;
    Ok((y, stats))
}

fn channel_view(shape: &Shape) -> CResult<(usize, usize, usize)> {
    let d = shape.dims();
    if d.len() < 2 {
        candle_core::bail!("batch norm: input {:?} has no channel axis", d);
    }
    Ok((d[0], d[1], d[2..].iter().product()))
}

fn batch_norm_train_generic(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> candle_core::Result<(Tensor, Arc<Mutex<BatchStats>>)> {
    let (n, c, s) = channel_view(x.shape())?;
    let x3 = x.reshape((n, c, s))?;
    let mean = x3.mean_keepdim(2)?.mean_keepdim(0)?;
    let centred = x3.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(2)?.mean_keepdim(0)?;
    let y = centred
        .broadcast_div(&(var.clone() + eps)?.sqrt()?)?
        .broadcast_mul(&gamma.reshape((1, c, 1))?)?
        .broadcast_add(&beta.reshape((1, c, 1))?)?
        .reshape(x.shape())?;
    let to_vec = |t: &Tensor| -> CResult<Vec<f64>> { t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>() };
    let stats = BatchStats { mean: to_vec(&mean)?, var: to_vec(&var)?, count: n * s };
    Ok((y, Arc::new(Mutex::new(stats))))
}

struct BatchNormTrain {
    eps: f64,
    stats: Arc<Mutex<BatchStats>>,
}

/// Per-channel (mean, biased variance) of `x` viewed as (N, C, S), two passes in f64, channels in parallel.
fn channel_moments<T: WithDType>(x: &[T], n: usize, c: usize, s: usize) -> (Vec<f64>, Vec<f64>) {
    let count = (n * s) as f64;
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let mut sum = 0f64;
            for b in 0..n {
                let base = (b * c + ch) * s;
                sum += sum_f64(&x[base..base + s]);
            }
            let mean = sum / count;
            // Second pass around the mean (no cancellation), the deviations formed in T then squared in lanes.
            let m = T::from_f64(mean);
            let mut sq = 0f64;
            let mut dev = Vec::with_capacity(s);
            for b in 0..n {
                let base = (b * c + ch) * s;
                dev.clear();
                dev.extend(x[base..base + s].iter().map(|&v| v - m));
                sq += dot_f64(&dev, &dev);
            }
            (mean, sq / count)
        })
        .unzip()
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "graft-batch-norm-train"
    }
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (n, c, s) = channel_view(xl.shape())?;
        dispatch!(xs, "graft-batch-norm-train", |T| {
            let x = contiguous::<T>(xs, xl, "graft-batch-norm-train")?;
            let g = contiguous::<T>(gs, gl, "graft-batch-norm-train")?;
            let b = contiguous::<T>(bs, bl, "graft-batch-norm-train")?;
            let (mean, var) = channel_moments(x, n, c, s);
            let scale: Vec<T> = (0..c).map(|ch| T::from_f64(g[ch].to_f64() / (var[ch] + self.eps).sqrt())).collect();
            let shift: Vec<T> = (0..c).map(|ch| T::from_f64(b[ch].to_f64() - mean[ch] * scale[ch].to_f64())).collect();
            let y = channel_affine(x, c, s, &scale, &shift);
            *self.stats.lock().unwrap() = BatchStats { mean, var, count: n * s };
            Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
        })
    }
    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stats = self.stats.lock().unwrap().clone();
        let op = BatchNormBackward { eps: self.eps, stats, param_grads: Mutex::new(None) };
        let dx = x.apply_op3_no_bwd(&grad.contiguous()?, gamma, &op)?;
        let (dg, db) = op.param_grads.lock().unwrap().take().expect("batch norm backward ran");
        let dg = Tensor::from_vec(dg, gamma.dims1()?, gamma.device())?.to_dtype(gamma.dtype())?;
        let db = Tensor::from_vec(db, gamma.dims1()?, gamma.device())?.to_dtype(gamma.dtype())?;
        Ok((Some(dx), Some(dg), Some(db)))
    }
}

/// `y = x * scale[c] + shift[c]` for x viewed as (N, C, S), in parallel over (n, c) planes.
fn channel_affine<T: WithDType>(x: &[T], c: usize, s: usize, scale: &[T], shift: &[T]) -> Vec<T> {
    let mut y = vec![T::from_f64(0.0); x.len()];
    if s == 1 {
        // (N, C) rows: one row per sample.
        y.par_chunks_mut(c.max(1)).zip(x.par_chunks(c.max(1))).for_each(|(o, i)| {
            for ch in 0..c {
                o[ch] = i[ch] * scale[ch] + shift[ch];
            }
        });
        return y;
    }
    y.par_chunks_mut(s).zip(x.par_chunks(s)).enumerate().for_each(|(p, (o, i))| {
        let ch = p % c;
        let (a, b) = (scale[ch], shift[ch]);
        for (o, &v) in o.iter_mut().zip(i) {
            *o = v * a + b;
        }
    });
    y
}

struct BatchNormBackward {
    eps: f64,
    stats: BatchStats,
    param_grads: Mutex<Option<(Vec<f64>, Vec<f64>)>>,
}

impl CustomOp3 for BatchNormBackward {
    fn name(&self) -> &'static str {
        "graft-batch-norm-backward"
    }
    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        gms: &CpuStorage,
        gml: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (n, c, s) = channel_view(xl.shape())?;
        dispatch!(xs, "graft-batch-norm-backward", |T| {
            let x = contiguous::<T>(xs, xl, "graft-batch-norm-backward")?;
            let dy = contiguous::<T>(gs, gl, "graft-batch-norm-backward")?;
            let gamma = contiguous::<T>(gms, gml, "graft-batch-norm-backward")?;
            let count = (n * s) as f64;
            let mean = &self.stats.mean;
            let inv: Vec<f64> = self.stats.var.iter().map(|v| 1.0 / (v + self.eps).sqrt()).collect();
            // Per channel: sum(dy) and sum(dy * xhat).
            let (sum_dy, sum_dy_xhat): (Vec<f64>, Vec<f64>) = (0..c)
                .into_par_iter()
                .map(|ch| {
                    let (mut a, mut b) = (0f64, 0f64);
                    // sum(dy * (x - mean)) = sum(dy * x) - mean * sum(dy)
                    for bi in 0..n {
                        let base = (bi * c + ch) * s;
                        a += sum_f64(&dy[base..base + s]);
                        b += dot_f64(&dy[base..base + s], &x[base..base + s]);
                    }
                    (a, (b - mean[ch] * a) * inv[ch])
                })
                .unzip();
            // dx = gamma * inv / M * (M dy - sum(dy) - xhat * sum(dy xhat)), written as dy * k1 + x * k2 + k3.
            let mut k1 = vec![T::from_f64(0.0); c];
            let mut k2 = vec![T::from_f64(0.0); c];
            let mut k3 = vec![T::from_f64(0.0); c];
            for ch in 0..c {
                let gi = gamma[ch].to_f64() * inv[ch];
                k1[ch] = T::from_f64(gi);
                let a = -gi * inv[ch] * sum_dy_xhat[ch] / count;
                k2[ch] = T::from_f64(a);
                k3[ch] = T::from_f64(-gi * sum_dy[ch] / count - a * mean[ch]);
            }
            let mut dx = vec![T::from_f64(0.0); x.len()];
            let plane = s.max(1);
            if s == 1 {
                dx.par_chunks_mut(c).zip(dy.par_chunks(c).zip(x.par_chunks(c))).for_each(|(o, (g, v))| {
                    for ch in 0..c {
                        o[ch] = g[ch] * k1[ch] + v[ch] * k2[ch] + k3[ch];
                    }
                });
            } else {
                dx.par_chunks_mut(plane).zip(dy.par_chunks(plane).zip(x.par_chunks(plane))).enumerate().for_each(
                    |(p, (o, (g, v)))| {
                        let ch = p % c;
                        let (a, b, d) = (k1[ch], k2[ch], k3[ch]);
                        for ((o, &g), &v) in o.iter_mut().zip(g).zip(v) {
                            *o = g * a + v * b + d;
                        }
                    },
                );
            }
            *self.param_grads.lock().unwrap() = Some((sum_dy_xhat, sum_dy));
            Ok((T::to_cpu_storage_owned(dx), xl.shape().clone()))
        })
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Separable convolution in training mode as one graph node

/// The eight parameters of a separable convolution, in the order they are packed.
pub struct SepConvParams<'a> {
    /// Depthwise kernel (C, 1, 3, 3) and bias (C).
    pub dw_weight: &'a Tensor,
    pub dw_bias: &'a Tensor,
    /// The depthwise BatchNorm's scale and shift (C).
    pub bn_dw_weight: &'a Tensor,
    pub bn_dw_bias: &'a Tensor,
    /// Pointwise weight (O, C, 1, 1) and bias (O).
    pub pw_weight: &'a Tensor,
    pub pw_bias: &'a Tensor,
    /// The pointwise BatchNorm's scale and shift (O).
    pub bn_pw_weight: &'a Tensor,
    pub bn_pw_bias: &'a Tensor,
}

/// Training-mode separable convolution (depthwise 3x3, BatchNorm, pointwise, BatchNorm, both BatchNorms on batch
/// statistics) as one node of candle's graph. It runs the same kernels as the four separate operations, so values
/// and gradients are the same bit for bit; but candle's backward pass materialises every node's input gradient as
/// zeros plus the incoming gradient, and one node instead of four saves three activation-sized zero-fills,
/// additions and allocations per convolution (a fifth of a small CNN's step). The parameters travel packed in one
/// tensor (`Tensor::cat`, whose backward pass hands each parameter its slice). Returns the output and the two
/// BatchNorms' batch statistics.
pub fn sep_conv_train(
    x: &Tensor,
    p: &SepConvParams,
    eps_dw: f64,
    eps_pw: f64,
) -> CResult<(Tensor, BatchStats, BatchStats)> {
    let (_, c, _, _) = x.dims4()?;
    let o = p.pw_bias.elem_count();
    let expect = [
        (p.dw_weight, 9 * c),
        (p.dw_bias, c),
        (p.bn_dw_weight, c),
        (p.bn_dw_bias, c),
        (p.pw_weight, o * c),
        (p.pw_bias, o),
        (p.bn_pw_weight, o),
        (p.bn_pw_bias, o),
    ];
    let mut parts = Vec::with_capacity(expect.len());
    for (t, n) in expect {
        if t.elem_count() != n {
            candle_core::bail!("separable conv: parameter {:?} does not fit input {:?}", t.dims(), x.dims());
        }
        parts.push(t.flatten_all()?);
    }
    let packed = Tensor::cat(&parts, 0)?;
    let saved = Arc::new(Mutex::new(None));
    let op = SepConvTrain { c, o, eps: [eps_dw, eps_pw], saved: saved.clone() };
    let y = x.contiguous()?.apply_op2(&packed, op)?;
    let s = saved.lock().unwrap();
    let s: &SepConvSaved = s.as_ref().expect("separable conv forward ran");
    Ok((y, s.stats[0].clone(), s.stats[1].clone()))
}

/// What the backward pass needs from the forward pass: the depthwise output, its normalised value, the pointwise
/// output, and both BatchNorms' batch statistics.
struct SepConvSaved {
    dw_out: CpuStorage,
    bn_dw_out: CpuStorage,
    pw_out: CpuStorage,
    stats: [BatchStats; 2],
}

struct SepConvTrain {
    c: usize,
    o: usize,
    eps: [f64; 2],
    saved: Arc<Mutex<Option<SepConvSaved>>>,
}

impl SepConvTrain {
    /// Offsets of the parameters in the packed tensor, in `SepConvParams` order, and the total length.
    fn offsets(&self) -> ([usize; 8], usize) {
        let (c, o) = (self.c, self.o);
        let lens = [9 * c, c, c, c, o * c, o, o, o];
        let mut offs = [0; 8];
        let mut at = 0;
        for (off, len) in offs.iter_mut().zip(lens) {
            *off = at;
            at += len;
        }
        (offs, at)
    }
}

fn storage_tensor(s: CpuStorage, shape: Shape) -> CResult<Tensor> {
    match s {
        CpuStorage::F32(v) => Tensor::from_vec(v, shape, &candle_core::Device::Cpu),
        CpuStorage::F64(v) => Tensor::from_vec(v, shape, &candle_core::Device::Cpu),
        _ => Err(unsupported("graft-separable-conv")),
    }
}

impl CustomOp2 for SepConvTrain {
    fn name(&self) -> &'static str {
        "graft-separable-conv-train"
    }
    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, ps: &CpuStorage, pl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (n, c, h, w) = xl.shape().dims4()?;
        let o = self.o;
        let (base, _) = pl.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("packed parameters".into()))?;
        let (off, _) = self.offsets();
        let at = |i: usize, shape: Shape| Layout::contiguous_with_offset(shape, base + off[i]);
        let act_dw = Layout::contiguous((n, c, h, w));
        let act_pw = Layout::contiguous((n, o, h, w));
        let stats = [Arc::new(Mutex::new(BatchStats::default())), Arc::new(Mutex::new(BatchStats::default()))];
        let (dw_out, _) =
            DepthwiseConv { k: 3 }.cpu_fwd(xs, xl, ps, &at(0, Shape::from((c, 1, 3, 3))), ps, &at(1, c.into()))?;
        let bn = BatchNormTrain { eps: self.eps[0], stats: stats[0].clone() };
        let (bn_dw_out, _) = bn.cpu_fwd(&dw_out, &act_dw, ps, &at(2, c.into()), ps, &at(3, c.into()))?;
        let (pw_out, _) =
            PointwiseConv.cpu_fwd(&bn_dw_out, &act_dw, ps, &at(4, Shape::from((o, c, 1, 1))), ps, &at(5, o.into()))?;
        let bn = BatchNormTrain { eps: self.eps[1], stats: stats[1].clone() };
        let (y, _) = bn.cpu_fwd(&pw_out, &act_pw, ps, &at(6, o.into()), ps, &at(7, o.into()))?;
        let stats = stats.map(|s| s.lock().unwrap().clone());
        *self.saved.lock().unwrap() = Some(SepConvSaved { dw_out, bn_dw_out, pw_out, stats });
        Ok((y, Shape::from((n, o, h, w))))
    }
    fn bwd(
        &self,
        x: &Tensor,
        packed: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved.lock().unwrap().take();
        let Some(saved) = saved else { candle_core::bail!("separable conv: backward pass ran twice") };
        let (n, c, h, w) = x.dims4()?;
        let o = self.o;
        let (off, total) = self.offsets();
        let param = |i: usize, len: usize| packed.narrow(0, off[i], len);
        let dw_out = storage_tensor(saved.dw_out, Shape::from((n, c, h, w)))?;
        let bn_dw_out = storage_tensor(saved.bn_dw_out, Shape::from((n, c, h, w)))?;
        let pw_out = storage_tensor(saved.pw_out, Shape::from((n, o, h, w)))?;
        let [stats_dw, stats_pw] = saved.stats;

        let bn = BatchNormBackward { eps: self.eps[1], stats: stats_pw, param_grads: Mutex::new(None) };
        let d_pw_out = pw_out.apply_op3_no_bwd(&grad.contiguous()?, &param(6, o)?, &bn)?;
        let (d_bn_pw_w, d_bn_pw_b) = bn.param_grads.lock().unwrap().take().expect("batch norm backward ran");
        let pw = PointwiseConvBackward { param_grads: Mutex::new(None) };
        let d_bn_dw_out = bn_dw_out.apply_op3_no_bwd(&d_pw_out, &param(4, o * c)?, &pw)?;
        let (d_pw_w, d_pw_b) = pw.param_grads.lock().unwrap().take().expect("pointwise backward ran");
        let bn = BatchNormBackward { eps: self.eps[0], stats: stats_dw, param_grads: Mutex::new(None) };
        let d_dw_out = dw_out.apply_op3_no_bwd(&d_bn_dw_out, &param(2, c)?, &bn)?;
        let (d_bn_dw_w, d_bn_dw_b) = bn.param_grads.lock().unwrap().take().expect("batch norm backward ran");
        // As in `DepthwiseConv::bwd`: the input gradient is the convolution with the kernel rotated by 180 degrees.
        let flipped = param(0, 9 * c)?.reshape((c, 1, 3, 3))?.flip(&[2, 3])?.contiguous()?;
        let zero_bias = Tensor::zeros(c, x.dtype(), x.device())?;
        let dx = d_dw_out.apply_op3_no_bwd(&flipped, &zero_bias, &DepthwiseConv { k: 3 })?;
        let dw_packed = x.apply_op2_no_bwd(&d_dw_out, &DepthwiseConvParamGrad { k: 3 })?;
        let dw_packed = dw_packed.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;

        let mut d = Vec::with_capacity(total);
        d.extend(dw_packed.chunks_exact(10).flat_map(|r| r[..9].iter().copied()));
        d.extend(dw_packed.chunks_exact(10).map(|r| r[9]));
        for part in [d_bn_dw_w, d_bn_dw_b, d_pw_w, d_pw_b, d_bn_pw_w, d_bn_pw_b] {
            d.extend(part);
        }
        let d_packed = Tensor::from_vec(d, total, x.device())?.to_dtype(packed.dtype())?;
        Ok((Some(dx), Some(d_packed)))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Per-channel affine map (BatchNorm with fixed statistics)

/// `x * scale[c] + shift[c]` over the channel axis 1 of `x`, with `scale`/`shift` as constants (the gradient flows
/// to `x` only): evaluation-mode BatchNorm and BatchNorm whose statistics and parameters are frozen.
pub fn channel_affine_const(x: &Tensor, scale: &[f64], shift: &[f64]) -> candle_core::Result<Tensor> {
    let (_, c, s) = channel_view(x.shape())?;
    if !fused_available(x) {
        let mut shape = vec![1usize; x.rank()];
        shape[1] = c;
        let sc = Tensor::from_slice(scale, c, x.device())?.to_dtype(x.dtype())?.reshape(shape.clone())?;
        let sh = Tensor::from_slice(shift, c, x.device())?.to_dtype(x.dtype())?.reshape(shape)?;
        return x.broadcast_mul(&sc)?.broadcast_add(&sh);
    }
    let _ = s;
    x.contiguous()?.apply_op1(ChannelAffine { scale: scale.to_vec(), shift: shift.to_vec() })
}

struct ChannelAffine {
    scale: Vec<f64>,
    shift: Vec<f64>,
}

impl CustomOp1 for ChannelAffine {
    fn name(&self) -> &'static str {
        "graft-channel-affine"
    }
    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (_, c, s) = channel_view(xl.shape())?;
        dispatch!(xs, "graft-channel-affine", |T| {
            let x = contiguous::<T>(xs, xl, "graft-channel-affine")?;
            let y = channel_affine(x, c, s, &from_f64_vec::<T>(&self.scale), &from_f64_vec::<T>(&self.shift));
            Ok((T::to_cpu_storage_owned(y), xl.shape().clone()))
        })
    }
    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let op = ChannelAffine { scale: self.scale.clone(), shift: vec![0.0; self.shift.len()] };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Max pooling (kernel = stride)

/// Max pooling of (N, C, H, W) with a k x k window and stride k (H, W rounded down as PyTorch does).
pub fn max_pool(x: &Tensor, k: usize) -> candle_core::Result<Tensor> {
    if !fused_available(x) {
        return x.max_pool2d(k);
    }
    x.contiguous()?.apply_op1(MaxPool { k, argmax: Arc::new(Mutex::new(Vec::new())) })
}

struct MaxPool {
    k: usize,
    argmax: Arc<Mutex<Vec<u32>>>,
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "graft-max-pool"
    }
    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (n, c, h, w) = xl.shape().dims4()?;
        let k = self.k;
        let (oh, ow) = (h / k, w / k);
        dispatch!(xs, "graft-max-pool", |T| {
            let x = contiguous::<T>(xs, xl, "graft-max-pool")?;
            let mut y = vec![T::from_f64(0.0); n * c * oh * ow];
            let mut arg = vec![0u32; y.len()];
            y.par_chunks_mut(oh * ow).zip(arg.par_chunks_mut(oh * ow)).enumerate().for_each(|(p, (yo, ao))| {
                let inp = &x[p * h * w..(p + 1) * h * w];
                for i in 0..oh {
                    for j in 0..ow {
                        let mut best = i * k * w + j * k;
                        for di in 0..k {
                            for dj in 0..k {
                                let at = (i * k + di) * w + j * k + dj;
                                // First maximum wins, as PyTorch's CPU kernel picks it; NaN propagates.
                                if inp[at] > inp[best] || (inp[at].to_f64().is_nan() && !inp[best].to_f64().is_nan()) {
                                    best = at;
                                }
                            }
                        }
                        yo[i * ow + j] = inp[best];
                        ao[i * ow + j] = best as u32;
                    }
                }
            });
            *self.argmax.lock().unwrap() = arg;
            Ok((T::to_cpu_storage_owned(y), Shape::from((n, c, oh, ow))))
        })
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let op = MaxPoolBackward { argmax: self.argmax.clone(), in_shape: x.shape().clone() };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

struct MaxPoolBackward {
    argmax: Arc<Mutex<Vec<u32>>>,
    in_shape: Shape,
}

impl CustomOp1 for MaxPoolBackward {
    fn name(&self) -> &'static str {
        "graft-max-pool-backward"
    }
    fn cpu_fwd(&self, gs: &CpuStorage, gl: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (_, _, oh, ow) = gl.shape().dims4()?;
        let (_, _, h, w) = self.in_shape.dims4()?;
        let arg = self.argmax.lock().unwrap();
        dispatch!(gs, "graft-max-pool-backward", |T| {
            let g = contiguous::<T>(gs, gl, "graft-max-pool-backward")?;
            let mut dx = vec![T::from_f64(0.0); self.in_shape.elem_count()];
            dx.par_chunks_mut(h * w).zip(g.par_chunks(oh * ow).zip(arg.par_chunks(oh * ow))).for_each(|(d, (g, a))| {
                for (&g, &a) in g.iter().zip(a) {
                    d[a as usize] += g;
                }
            });
            Ok((T::to_cpu_storage_owned(dx), self.in_shape.clone()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand_tensor(shape: &[usize], seed: u64) -> Tensor {
        let mut r = crate::rng::Rng::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        let a = a.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(a.len(), b.len());
        a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
    }

    /// The fused ops against candle's generic ops (forward and every gradient), in f64.
    fn compare(
        fused: impl Fn(&[Tensor]) -> Tensor,
        generic: impl Fn(&[Tensor]) -> Tensor,
        inputs: &[Tensor],
        tol: f64,
    ) {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let weights = rand_tensor(fused(&ts).dims(), 99);
        let yf = fused(&ts);
        let yg = generic(&ts);
        assert!(max_abs_diff(&yf, &yg) < tol, "forward differs by {}", max_abs_diff(&yf, &yg));
        let gf = (yf * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let gg = (yg * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, t) in ts.iter().enumerate() {
            let (a, b) = (gf.get(t).unwrap(), gg.get(t).unwrap());
            let d = max_abs_diff(a, b);
            assert!(d < tol, "gradient of input {i} differs by {d}");
        }
    }

    #[test]
    fn depthwise_conv_matches_candle_grouped_conv() {
        for k in [3, 5] {
            let inputs = [rand_tensor(&[2, 3, 5, 6], 1), rand_tensor(&[3, 1, k, k], 2), rand_tensor(&[3], 3)];
            compare(
                |t| depthwise_conv(&t[0], &t[1], &t[2]).unwrap(),
                |t| {
                    t[0].conv2d(&t[1], k / 2, 1, 1, 3)
                        .unwrap()
                        .broadcast_add(&t[2].reshape((1, 3, 1, 1)).unwrap())
                        .unwrap()
                },
                &inputs,
                1e-10,
            );
        }
    }

    #[test]
    fn pointwise_conv_matches_candle_conv() {
        let inputs = [rand_tensor(&[3, 4, 2, 5], 11), rand_tensor(&[6, 4, 1, 1], 12), rand_tensor(&[6], 13)];
        compare(
            |t| pointwise_conv(&t[0], &t[1], &t[2]).unwrap(),
            |t| t[0].conv2d(&t[1], 0, 1, 1, 1).unwrap().broadcast_add(&t[2].reshape((1, 6, 1, 1)).unwrap()).unwrap(),
            &inputs,
            1e-10,
        );
    }

    #[test]
    fn batch_norm_matches_generic_formula() {
        for shape in [vec![4, 3, 2, 5], vec![6, 4]] {
            let c = shape[1];
            let inputs = [rand_tensor(&shape, 4), rand_tensor(&[c], 5), rand_tensor(&[c], 6)];
            compare(
                |t| batch_norm_train(&t[0], &t[1], &t[2], 1e-5).unwrap().0,
                |t| batch_norm_train_generic(&t[0], &t[1], &t[2], 1e-5).unwrap().0,
                &inputs,
                1e-9,
            );
        }
    }

    #[test]
    fn softmax_matches_candle_generic() {
        let inputs = [rand_tensor(&[2, 3, 5], 9)];
        compare(|t| softmax_last_dim(&t[0]).unwrap(), |t| candle_nn::ops::softmax(&t[0], 2).unwrap(), &inputs, 1e-12);
    }

    #[test]
    fn relu_matches_candle() {
        let inputs = [rand_tensor(&[2, 3, 4, 6], 7)];
        compare(|t| relu(&t[0]).unwrap(), |t| t[0].relu().unwrap(), &inputs, 1e-12);
    }

    /// Max pooling against a plain loop. (candle 0.11's own max_pool2d backward scales the gradient by 1/k^2 at the
    /// maximum instead of passing it through, so it cannot serve as the reference.)
    #[test]
    fn max_pool_matches_plain_loop() {
        let x = Var::from_tensor(&rand_tensor(&[2, 3, 4, 6], 7)).unwrap();
        let y = max_pool(x.as_tensor(), 2).unwrap();
        let w = rand_tensor(&[2, 3, 2, 3], 8);
        let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let xv = x.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let yv = y.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let wv = w.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let mut want = vec![0.0; xv.len()];
        for p in 0..6 {
            for i in 0..2 {
                for j in 0..3 {
                    let cells: Vec<usize> = (0..4).map(|q| p * 24 + (2 * i + q / 2) * 6 + 2 * j + q % 2).collect();
                    let best = *cells.iter().max_by(|a, b| xv[**a].total_cmp(&xv[**b])).unwrap();
                    assert_eq!(yv[p * 6 + i * 3 + j], xv[best]);
                    want[best] += wv[p * 6 + i * 3 + j];
                }
            }
        }
        assert_eq!(dx, want);
    }

    #[test]
    fn channel_affine_matches_broadcast() {
        let x = rand_tensor(&[2, 3, 2, 2], 8);
        let (sc, sh) = ([0.5, -1.0, 2.0], [0.1, 0.2, -0.3]);
        let y = channel_affine_const(&x, &sc, &sh).unwrap();
        let xv = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let yv = y.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for (i, (&a, &b)) in xv.iter().zip(&yv).enumerate() {
            let ch = (i / 4) % 3;
            assert!((a * sc[ch] + sh[ch] - b).abs() < 1e-12);
        }
    }
}
