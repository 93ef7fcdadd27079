//! Pointwise (1x1) and depthwise (k x k) convolution with bias, and their backward passes.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::{contiguous, dot_f64, from_f64_vec, fused_available, matmul, sum_f64, unsupported, CResult};

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

pub(super) struct PointwiseConv;

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
pub(super) struct PointwiseConvBackward {
    pub(super) param_grads: Mutex<Option<(Vec<f64>, Vec<f64>)>>,
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

pub(super) struct DepthwiseConv {
    pub(super) k: usize,
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
pub(super) struct DepthwiseConvParamGrad {
    pub(super) k: usize,
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
