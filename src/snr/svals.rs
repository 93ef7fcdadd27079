//! Singular values of one f32 matrix, accurate to f32, by the f64 Gram route.
//!
//! G = W W^T (or W^T W, whichever is smaller) is accumulated in f64 from f32 inputs (every product of two f32 values
//! is exact in f64), its eigenvalues come from faer's self-adjoint eigensolver in f64, and the singular values are
//! the square roots of the eigenvalues clamped at zero. An eigenvalue's absolute error is a small multiple of
//! eps64 * S[0]^2, so a singular value's absolute error is about eps64 * S[0]^2 / (2 s) for s well above
//! sqrt(eps64) * S[0] ~ 1.5e-8 S[0], and at most about that floor below it: the same normwise accuracy an f32 SVD
//! (torch's or LAPACK's) has, at a fraction of its cost. The Gram matrix is never formed in f32: that would lose
//! every singular value below about 1e-4 of the largest.
//!
//! Work is split into fixed panels along the long dimension and faer is given a fixed parallel degree, so the result
//! is bit-identical whatever the size of the thread pool it runs in.

use std::num::NonZeroUsize;

use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::evd::{self_adjoint_evd, self_adjoint_evd_scratch, ComputeEigenvectors};
use faer::linalg::matmul::triangular::{matmul, BlockStructure};
use faer::{Accum, Mat, Par};

/// Columns of the long dimension converted to f64 and accumulated into G at a time.
const PANEL: usize = 256;

/// Work (short side squared times long side) above which one matrix is split across threads itself.
const PARALLEL_WORK: usize = 1 << 24;

/// The parallel degree handed to faer: fixed, so that its work partition never depends on the pool size.
const DEGREE: usize = 4;

fn par_for(work: usize) -> Par {
    if work >= PARALLEL_WORK {
        Par::Rayon(NonZeroUsize::new(DEGREE).unwrap())
    } else {
        Par::Seq
    }
}

/// All min(rows, cols) singular values of the row-major `rows x cols` matrix `values`, in descending order.
/// The caller guarantees finite values and `values.len() == rows * cols`.
pub fn singular_values(values: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    debug_assert_eq!(values.len(), rows * cols);
    let k = rows.min(cols);
    let long = rows.max(cols);
    if k == 0 {
        return Vec::new();
    }
    let par = par_for(k * k * long);
    let gram = gram_lower(values, rows, cols, par);
    let mut eig = eigenvalues_lower(gram, par);
    let mut s: Vec<f64> = eig.drain(..).map(|l| l.max(0.0).sqrt()).collect();
    s.sort_by(|a, b| b.total_cmp(a));
    s
}

/// The lower triangle of the k x k Gram matrix on the short side, accumulated in f64 panel by panel.
fn gram_lower(values: &[f32], rows: usize, cols: usize, par: Par) -> Mat<f64> {
    let k = rows.min(cols);
    let long = rows.max(cols);
    let mut gram = Mat::<f64>::zeros(k, k);
    let mut panel = Mat::<f64>::zeros(k, PANEL.min(long));
    let mut start = 0;
    while start < long {
        let width = PANEL.min(long - start);
        // Column j of the panel is the short-side vector at long index start + j.
        for j in 0..width {
            let l = start + j;
            let col = panel.col_mut(j);
            let col = col.try_as_col_major_mut().unwrap().as_slice_mut();
            if rows <= cols {
                for (r, x) in col.iter_mut().enumerate() {
                    *x = values[r * cols + l] as f64;
                }
            } else {
                for (x, &v) in col.iter_mut().zip(&values[l * cols..(l + 1) * cols]) {
                    *x = v as f64;
                }
            }
        }
        let p = panel.as_ref().subcols(0, width);
        matmul(
            gram.as_mut(),
            BlockStructure::TriangularLower,
            Accum::Add,
            p,
            BlockStructure::Rectangular,
            p.transpose(),
            BlockStructure::Rectangular,
            1.0,
            par,
        );
        start += width;
    }
    gram
}

/// Eigenvalues (any order) of the symmetric matrix whose lower triangle is `gram`.
fn eigenvalues_lower(gram: Mat<f64>, par: Par) -> Vec<f64> {
    let n = gram.nrows();
    let mut s = Diag::<f64>::zeros(n);
    let mut mem = MemBuffer::new(self_adjoint_evd_scratch::<f64>(n, ComputeEigenvectors::No, par, Default::default()));
    // A symmetric eigenproblem without eigenvectors only fails on non-finite input, which the caller excludes; if
    // it ever did, NaN values make the caller report the tensor as non-finite instead of guessing.
    if self_adjoint_evd(gram.as_ref(), s.as_mut(), None, par, MemStack::new(&mut mem), Default::default()).is_err() {
        return vec![f64::NAN; n];
    }
    s.column_vector().iter().copied().collect()
}
