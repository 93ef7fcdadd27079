//! Eigenvalues (only) of a real symmetric matrix by two-stage tridiagonalisation, for the Gram matrices of `svals`.
//!
//! The one-stage reduction (LAPACK's `dsytrd`, faer's `tridiag_in_place`) spends half its flops in matrix-vector
//! products over the whole trailing matrix, one column at a time: for n in the thousands that is bound by memory
//! bandwidth, and it was 90% of the time of a singular-value computation. Here instead:
//!
//! 1. dense -> band of half-bandwidth `b`: block Householder QR of each panel of `b` columns below the band, then the
//!    two-sided update `A22 <- Q^T A22 Q` as one product `W = A22 V T` and one symmetric rank-2b update
//!    `A22 -= V Z^T + Z V^T` with `Z = W - V (T^T V^T W) / 2` (both faer matrix products, lower triangle only):
//!    all the O(n^3) work is matrix-matrix;
//! 2. band -> tridiagonal by Householder bulge chasing (the sweeps of LAPACK's `dsb2st`): column i is reduced by one
//!    reflector of length `b`; the bulge it creates below the band is pushed down `b` rows at a time, each step
//!    annihilating the first column of the bulge (the rest of it is removed by the next sweep). O(n^2 b) work on a
//!    band of width 2b that stays in cache;
//! 3. eigenvalues of the tridiagonal matrix by faer's implicit QR (O(n^2)).
//!
//! Reflectors follow LAPACK's convention: H = I - tau v v^T with v[0] = 1; a panel's Q = H_1 ... H_k = I - V T V^T
//! with T upper triangular (`dlarft`, forward, column-wise). All of it is sequential except the faer products, whose
//! parallel degree is fixed by the caller, so the result never depends on the thread count.

use faer::dyn_stack::{MemBuffer, MemStack, StackReq};
use faer::linalg::evd::tridiagonal_self_adjoint_evd;
use faer::linalg::matmul::matmul as gemm;
use faer::linalg::matmul::triangular::{matmul as trmm, BlockStructure};
use faer::linalg::temp_mat_scratch;
use faer::prelude::{Reborrow, ReborrowMut};
use faer::{Accum, Mat, MatMut, Par};

/// Half-bandwidth of the intermediate band matrix: wide enough for efficient matrix products in stage 1, narrow
/// enough for a cheap stage 2.
pub const BAND: usize = 32;

/// Eigenvalues (in no particular order) of the symmetric matrix whose lower triangle is `a` (the upper triangle is
/// ignored and overwritten). NaN everywhere if the tridiagonal QR fails to converge (it does not on finite input).
pub fn eigenvalues_lower(mut a: Mat<f64>, band: usize, par: Par) -> Vec<f64> {
    let n = a.nrows();
    assert_eq!(n, a.ncols());
    if n == 0 {
        return Vec::new();
    }
    let b = band.clamp(1, n.max(2) - 1);
    dense_to_band(a.as_mut(), b, par);
    let ld = 2 * b;
    let mut ab = vec![0f64; n * ld];
    for c in 0..n {
        for d in 0..=b.min(n - 1 - c) {
            ab[c * ld + d] = a[(c + d, c)];
        }
    }
    drop(a);
    let (diag, sub) = band_to_tridiagonal(&mut ab, n, b, ld);
    tridiagonal_eigenvalues(&diag, &sub)
}

/// Stage 1: reduces the lower triangle of `a` in place to half-bandwidth `b` (entries below the band are left as
/// garbage; only the band is meaningful afterwards).
pub fn dense_to_band(mut a: MatMut<'_, f64>, b: usize, par: Par) {
    let n = a.nrows();
    let mut j = 0;
    while j + b + 1 < n {
        let r0 = j + b;
        let m = n - r0;
        // Panel: rows r0.., columns j..j+b, copied out (column-major, contiguous columns).
        let mut panel = Mat::<f64>::zeros(m, b);
        panel.copy_from(a.rb().submatrix(r0, j, m, b));
        let k = m.min(b);
        let tau = panel_qr(panel.as_mut());
        // R goes back into the band; below it the panel is zero after the transform.
        for c in 0..b {
            for r in 0..m {
                a[(r0 + r, j + c)] = if r <= c { panel[(r, c)] } else { 0.0 };
            }
        }
        // V: unit lower trapezoidal m x k.
        let mut v = Mat::<f64>::zeros(m, k);
        for c in 0..k {
            v[(c, c)] = 1.0;
            for r in c + 1..m {
                v[(r, c)] = panel[(r, c)];
            }
        }
        let t = larft(&v, &tau);
        let mut a22 = a.rb_mut().submatrix_mut(r0, r0, m, m);
        // W = A22 (V T), A22 symmetric from its lower triangle.
        let mut vt = Mat::<f64>::zeros(m, k);
        trmm(
            vt.as_mut(),
            BlockStructure::Rectangular,
            Accum::Replace,
            v.as_ref(),
            BlockStructure::Rectangular,
            t.as_ref(),
            BlockStructure::TriangularUpper,
            1.0,
            par,
        );
        let mut w = Mat::<f64>::zeros(m, k);
        symm_lower(w.as_mut(), a22.rb(), vt.as_ref(), par);
        // M = T^T (V^T W) (symmetric), Z = W - V M / 2.
        let mut y = Mat::<f64>::zeros(k, k);
        gemm(y.as_mut(), Accum::Replace, v.transpose(), w.as_ref(), 1.0, par);
        let mut mm = Mat::<f64>::zeros(k, k);
        trmm(
            mm.as_mut(),
            BlockStructure::Rectangular,
            Accum::Replace,
            t.transpose(),
            BlockStructure::TriangularLower,
            y.as_ref(),
            BlockStructure::Rectangular,
            1.0,
            par,
        );
        // [V Z] and [Z V]: A22 -= [V Z] [Z V]^T = V Z^T + Z V^T.
        let mut vz = Mat::<f64>::zeros(m, 2 * k);
        let mut zv = Mat::<f64>::zeros(m, 2 * k);
        vz.as_mut().subcols_mut(0, k).copy_from(&v);
        {
            let mut z = vz.as_mut().subcols_mut(k, k);
            z.copy_from(&w);
            gemm(z.rb_mut(), Accum::Add, v.as_ref(), mm.as_ref(), -0.5, par);
        }
        zv.as_mut().subcols_mut(0, k).copy_from(vz.as_ref().subcols(k, k));
        zv.as_mut().subcols_mut(k, k).copy_from(&v);
        trmm(
            a22.rb_mut(),
            BlockStructure::TriangularLower,
            Accum::Add,
            vz.as_ref(),
            BlockStructure::Rectangular,
            zv.transpose(),
            BlockStructure::Rectangular,
            -1.0,
            par,
        );
        j += b;
    }
}

/// Column block of the symmetric product `symm_lower`.
const SYMM_BLOCK: usize = 256;

/// dst = A x for symmetric A given by its lower triangle, by column blocks of A: the diagonal block mirrored into a
/// small full copy, the block below it used twice (as is and transposed). Every product is a plain faer matrix
/// product, which is several times faster than faer's triangular one with a transposed triangular operand.
fn symm_lower(mut dst: MatMut<'_, f64>, a: faer::MatRef<'_, f64>, x: faer::MatRef<'_, f64>, par: Par) {
    let m = a.nrows();
    dst.fill(0.0);
    let mut diag = Mat::<f64>::zeros(SYMM_BLOCK.min(m), SYMM_BLOCK.min(m));
    let mut c0 = 0;
    while c0 < m {
        let nb = SYMM_BLOCK.min(m - c0);
        let below = m - c0 - nb;
        let mut dblk = diag.as_mut().submatrix_mut(0, 0, nb, nb);
        for c in 0..nb {
            for r in c..nb {
                let v = a[(c0 + r, c0 + c)];
                dblk[(r, c)] = v;
                dblk[(c, r)] = v;
            }
        }
        gemm(dst.rb_mut().subrows_mut(c0, nb), Accum::Add, dblk.rb(), x.subrows(c0, nb), 1.0, par);
        if below > 0 {
            let blk = a.submatrix(c0 + nb, c0, below, nb);
            gemm(dst.rb_mut().subrows_mut(c0 + nb, below), Accum::Add, blk, x.subrows(c0, nb), 1.0, par);
            gemm(dst.rb_mut().subrows_mut(c0, nb), Accum::Add, blk.transpose(), x.subrows(c0 + nb, below), 1.0, par);
        }
        c0 += nb;
    }
}

/// Multiply-add as the CPU does it best: fused where the code was compiled for FMA (`Fused`), plain otherwise
/// (`Plain`; `f64::mul_add` without hardware FMA is a slow library call). The choice is made once per call from the
/// CPU's features, so it never depends on the thread count.
trait Madd {
    fn madd(a: f64, b: f64, c: f64) -> f64;
}
struct Plain;
impl Madd for Plain {
    #[inline(always)]
    fn madd(a: f64, b: f64, c: f64) -> f64 {
        a * b + c
    }
}
#[cfg(target_arch = "x86_64")]
struct Fused;
#[cfg(target_arch = "x86_64")]
impl Madd for Fused {
    #[inline(always)]
    fn madd(a: f64, b: f64, c: f64) -> f64 {
        a.mul_add(b, c)
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

/// Unblocked Householder QR of an m x b panel in place (LAPACK `dgeqr2`): R on and above the diagonal, the
/// reflectors' tails below it. Returns the taus.
fn panel_qr(p: MatMut<'_, f64>) -> Vec<f64> {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { panel_qr_avx2(p) };
    }
    panel_qr_impl::<Plain>(p)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn panel_qr_avx2(p: MatMut<'_, f64>) -> Vec<f64> {
    panel_qr_impl::<Fused>(p)
}

#[inline(always)]
fn panel_qr_impl<M: Madd>(mut p: MatMut<'_, f64>) -> Vec<f64> {
    let (m, b) = (p.nrows(), p.ncols());
    let k = m.min(b);
    let mut taus = Vec::with_capacity(k);
    for c in 0..k {
        let (head, rest) = p.rb_mut().split_at_col_mut(c + 1);
        let col = head.col_mut(c).subrows_mut(c, m - c).try_as_col_major_mut().unwrap().as_slice_mut();
        let tau = larfg::<M>(col);
        taus.push(tau);
        if tau == 0.0 {
            continue;
        }
        let v: &[f64] = col;
        // Apply H = I - tau v v^T (v[0] = 1) to the remaining columns.
        let mut rest = rest;
        for cc in 0..rest.ncols() {
            let x = rest.rb_mut().col_mut(cc).subrows_mut(c, m - c).try_as_col_major_mut().unwrap().as_slice_mut();
            let s = x[0] + dot::<M>(&v[1..], &x[1..]);
            let f = tau * s;
            x[0] -= f;
            axpy::<M>(-f, &v[1..], &mut x[1..]);
        }
    }
    taus
}

/// The T of Q = H_1 ... H_k = I - V T V^T (LAPACK `dlarft`, forward, column-wise).
fn larft(v: &Mat<f64>, tau: &[f64]) -> Mat<f64> {
    let (m, k) = (v.nrows(), v.ncols());
    let mut t = Mat::<f64>::zeros(k, k);
    for i in 0..k {
        t[(i, i)] = tau[i];
        if i == 0 || tau[i] == 0.0 {
            continue;
        }
        let vi = v.col(i).try_as_col_major().unwrap().as_slice();
        // x = -tau_i V[:, 0..i]^T v_i (v_i is zero above row i).
        let mut x = vec![0f64; i];
        for (p, xp) in x.iter_mut().enumerate() {
            let vp = v.col(p).try_as_col_major().unwrap().as_slice();
            *xp = -tau[i] * dot::<Plain>(&vp[i..m], &vi[i..m]);
        }
        // T[0..i, i] = T[0..i, 0..i] x (upper triangular).
        for r in 0..i {
            let mut s = 0.0;
            for (c, xc) in x.iter().enumerate().skip(r) {
                s += t[(r, c)] * xc;
            }
            t[(r, i)] = s;
        }
    }
    t
}

/// Householder reflector (LAPACK `dlarfg`) for x: on return x[0] = beta, x[1..] = v's tail (v[0] = 1 implied), and
/// H x = beta e1 with H = I - tau v v^T. tau = 0 when x[1..] is already zero.
#[inline(always)]
fn larfg<M: Madd>(x: &mut [f64]) -> f64 {
    if x.len() < 2 {
        return 0.0;
    }
    let alpha = x[0];
    let xnorm = norm2::<M>(&x[1..]);
    if xnorm == 0.0 {
        return 0.0;
    }
    let beta = -alpha.signum() * alpha.hypot(xnorm);
    let tau = (beta - alpha) / beta;
    let scale = 1.0 / (alpha - beta);
    for v in &mut x[1..] {
        *v *= scale;
    }
    x[0] = beta;
    tau
}

#[inline(always)]
fn norm2<M: Madd>(x: &[f64]) -> f64 {
    // Scaled to avoid overflow/underflow for extreme magnitudes.
    let amax = x.iter().fold(0f64, |m, v| m.max(v.abs()));
    if amax == 0.0 || !amax.is_finite() {
        return amax;
    }
    let inv = 1.0 / amax;
    let mut acc = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let rem = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            let y = c[l] * inv;
            acc[l] = M::madd(y, y, acc[l]);
        }
    }
    let mut s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for v in rem {
        let y = v * inv;
        s = M::madd(y, y, s);
    }
    amax * s.sqrt()
}

/// Dot product with eight independent accumulators (vectorisable, and a fixed summation order).
#[inline(always)]
fn dot<M: Madd>(a: &[f64], b: &[f64]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f64; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = M::madd(x[l], y[l], acc[l]);
        }
    }
    let mut s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s = M::madd(*x, *y, s);
    }
    s
}

#[inline(always)]
fn axpy<M: Madd>(alpha: f64, x: &[f64], y: &mut [f64]) {
    debug_assert_eq!(x.len(), y.len());
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = M::madd(alpha, *xi, *yi);
    }
}

/// Stage 2: a symmetric band matrix of half-bandwidth `b`, lower band storage `ab[c * ld + d] = A[c + d, c]` with
/// `ld = 2b` (room for the bulge), reduced to tridiagonal form. Returns (diagonal, subdiagonal).
pub fn band_to_tridiagonal(ab: &mut [f64], n: usize, b: usize, ld: usize) -> (Vec<f64>, Vec<f64>) {
    assert!(ld >= 2 * b && ab.len() >= n * ld);
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has the features the function is compiled for.
        unsafe { band_to_tridiagonal_avx2(ab, n, b, ld) };
        return band_diagonals(ab, n, ld);
    }
    band_to_tridiagonal_impl::<Plain>(ab, n, b, ld);
    band_diagonals(ab, n, ld)
}

fn band_diagonals(ab: &[f64], n: usize, ld: usize) -> (Vec<f64>, Vec<f64>) {
    let diag: Vec<f64> = (0..n).map(|c| ab[c * ld]).collect();
    let sub: Vec<f64> = (0..n.saturating_sub(1)).map(|c| ab[c * ld + 1]).collect();
    (diag, sub)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn band_to_tridiagonal_avx2(ab: &mut [f64], n: usize, b: usize, ld: usize) {
    band_to_tridiagonal_impl::<Fused>(ab, n, b, ld)
}

#[inline(always)]
fn band_to_tridiagonal_impl<M: Madd>(ab: &mut [f64], n: usize, b: usize, ld: usize) {
    if b < 2 {
        return;
    }
    let mut v = vec![0f64; b];
    let mut v2 = vec![0f64; b];
    let mut w = vec![0f64; b];
    let mut y = vec![0f64; b];
    for i in 0..n.saturating_sub(2) {
        // The sweep for column i: reflector on rows i+1 ..= min(i+b, n-1).
        let mut s0 = i + 1;
        let mut len = b.min(n - 1 - i);
        if len < 2 {
            continue;
        }
        let mut tau = {
            let x = &mut ab[i * ld + 1..i * ld + 1 + len];
            let tau = larfg::<M>(x);
            v[0] = 1.0;
            v[1..len].copy_from_slice(&x[1..]);
            x[1..].fill(0.0);
            tau
        };
        while tau != 0.0 {
            let s1 = s0 + len - 1;
            two_sided::<M>(ab, ld, s0, len, &v[..len], tau, &mut w);
            let t0 = s1 + 1;
            if t0 >= n {
                break;
            }
            let lb = b.min(n - t0);
            // The block below: rows t0..t0+lb, columns s0..s0+len; column k lives at offset t0 - s0 - k.
            let off = |k: usize| (s0 + k) * ld + (t0 - s0 - k);
            // Right application: B <- B - tau (B v) v^T.
            y[..lb].fill(0.0);
            for (k, &vk) in v[..len].iter().enumerate() {
                let o = off(k);
                axpy::<M>(vk, &ab[o..o + lb], &mut y[..lb]);
            }
            for (k, &vk) in v[..len].iter().enumerate() {
                let o = off(k);
                axpy::<M>(-tau * vk, &y[..lb], &mut ab[o..o + lb]);
            }
            // The bulge's first column defines the next reflector; it is applied from the left to the rest.
            let tau2 = {
                let o = off(0);
                let x = &mut ab[o..o + lb];
                let t = larfg::<M>(x);
                v2[0] = 1.0;
                v2[1..lb].copy_from_slice(&x[1..]);
                x[1..].fill(0.0);
                t
            };
            if tau2 != 0.0 {
                for k in 1..len {
                    let o = off(k);
                    let col = &mut ab[o..o + lb];
                    let s = dot::<M>(&v2[..lb], col);
                    axpy::<M>(-tau2 * s, &v2[..lb], col);
                }
            }
            std::mem::swap(&mut v, &mut v2);
            tau = tau2;
            s0 = t0;
            len = lb;
            if len < 2 {
                // A 1 x 1 diagonal block: the reflector is the identity (tau = 0 by construction).
                break;
            }
        }
    }
}

/// D <- H D H for the symmetric diagonal block at rows/columns s0..s0+len (lower band storage), H = I - tau v v^T:
/// w = tau D v; w -= (tau/2)(w.v) v; D -= v w^T + w v^T.
#[inline(always)]
fn two_sided<M: Madd>(ab: &mut [f64], ld: usize, s0: usize, len: usize, v: &[f64], tau: f64, w: &mut [f64]) {
    let w = &mut w[..len];
    w.fill(0.0);
    for k in 0..len {
        let col = &ab[(s0 + k) * ld..(s0 + k) * ld + (len - k)];
        // Column k of the lower triangle: D[k..len, k].
        w[k] = M::madd(col[0], v[k], w[k]);
        let tail = &col[1..];
        axpy::<M>(v[k], tail, &mut w[k + 1..len]);
        w[k] += dot::<M>(tail, &v[k + 1..len]);
    }
    for x in w.iter_mut() {
        *x *= tau;
    }
    let alpha = -0.5 * tau * dot::<M>(w, v);
    axpy::<M>(alpha, v, w);
    for k in 0..len {
        let col = &mut ab[(s0 + k) * ld..(s0 + k) * ld + (len - k)];
        let (vk, wk) = (v[k], w[k]);
        for (r, x) in col.iter_mut().enumerate() {
            *x = M::madd(-v[k + r], wk, M::madd(-w[k + r], vk, *x));
        }
    }
}

/// Eigenvalues of the symmetric tridiagonal matrix (diag, sub) by faer's implicit QR.
fn tridiagonal_eigenvalues(diag: &[f64], sub: &[f64]) -> Vec<f64> {
    let n = diag.len();
    let d = faer::col::Col::<f64>::from_fn(n, |i| diag[i]);
    let e = faer::col::Col::<f64>::from_fn(n, |i| if i < sub.len() { sub[i] } else { 0.0 });
    let mut s = faer::diag::Diag::<f64>::zeros(n);
    let mut mem = MemBuffer::new(StackReq::all_of(&[temp_mat_scratch::<f64>(n, 1), temp_mat_scratch::<f64>(n, 1)]));
    let ok = tridiagonal_self_adjoint_evd(
        d.as_diagonal(),
        e.as_diagonal(),
        s.as_mut(),
        None,
        Par::Seq,
        MemStack::new(&mut mem),
        Default::default(),
    );
    if ok.is_err() {
        return vec![f64::NAN; n];
    }
    s.column_vector().iter().copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn random_symmetric(seed: u64, n: usize) -> Mat<f64> {
        let mut rng = Rng::new(seed);
        let mut a = Mat::<f64>::zeros(n, n);
        for c in 0..n {
            for r in c..n {
                let x = rng.normal();
                a[(r, c)] = x;
                a[(c, r)] = x;
            }
        }
        a
    }

    fn reference(a: &Mat<f64>) -> Vec<f64> {
        let mut e = a.self_adjoint_eigenvalues(faer::Side::Lower).unwrap();
        e.sort_by(f64::total_cmp);
        e
    }

    #[test]
    fn two_stage_matches_faer_on_random_symmetric_matrices() {
        for (seed, n, band) in
            [(1, 1, 4), (2, 2, 4), (3, 5, 4), (4, 9, 4), (5, 37, 4), (6, 64, 8), (7, 100, 7), (8, 130, 32)]
        {
            let a = random_symmetric(seed, n);
            let want = reference(&a);
            // Only the lower triangle is read: garbage above must not matter.
            let mut lower = a.clone();
            for c in 0..n {
                for r in 0..c {
                    lower[(r, c)] = 1e30;
                }
            }
            let mut got = eigenvalues_lower(lower, band, Par::Seq);
            got.sort_by(f64::total_cmp);
            let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-12 * scale, "n {n} band {band}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn known_spectrum_through_reflections() {
        // A = H diag(d) H with H a Householder reflection has eigenvalues d exactly (up to rounding).
        let n = 50;
        let d: Vec<f64> = (0..n).map(|i| (i as f64 - 20.0) * 0.5).collect();
        let mut rng = Rng::new(9);
        let u: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
        let nu: f64 = u.iter().map(|x| x * x).sum();
        let h = Mat::<f64>::from_fn(n, n, |r, c| if r == c { 1.0 } else { 0.0 } - 2.0 * u[r] * u[c] / nu);
        let dm = Mat::<f64>::from_fn(n, n, |r, c| if r == c { d[r] } else { 0.0 });
        let a = &h * &dm * &h;
        let mut got = eigenvalues_lower(a, 6, Par::Seq);
        got.sort_by(f64::total_cmp);
        for (g, w) in got.iter().zip(&d) {
            assert!((g - w).abs() < 1e-12, "{g} vs {w}");
        }
    }
}
