//! Singular values of one f32 matrix, accurate to f32, by the f64 Gram route.
//!
//! G = W W^T (or W^T W, whichever is smaller) is accumulated in f64 from the f32 values (every product of two f32
//! values is exact in f64), its eigenvalues are computed in f64, and the singular values are the square roots of
//! the eigenvalues clamped at zero. An eigenvalue's absolute error is a small multiple of eps64 * S[0]^2, so a
//! singular value's absolute error is about eps64 * S[0]^2 / (2 s) for s well above sqrt(eps64) * S[0] ~ 1.5e-8
//! S[0], and at most about that floor below it: the normwise accuracy of an f32 SVD (torch's or LAPACK's), at a
//! fraction of its cost (the Gram product is half the flops of a bidiagonalisation and all of it matrix-matrix).
//! The Gram matrix is never formed in f32: that would lose every singular value below about 1e-4 of the largest.
//!
//! Eigenvalues: faer's one-stage symmetric solver, sequential, below `TWO_STAGE_MIN`; the two-stage reduction of
//! `symeig` from there on (the one-stage reduction is bound by memory bandwidth once G leaves the caches).
//!
//! Determinism: the sequential paths are trivially reproducible; the parallel ones (the Gram product and the
//! two-stage reduction, whose only parallel parts are faer matrix products that split the output, never a sum) give
//! bit-identical results for any thread count, which the tests check.

use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::evd::{self_adjoint_evd, self_adjoint_evd_scratch, ComputeEigenvectors};
use faer::linalg::matmul::triangular::{matmul, BlockStructure};
use faer::{Accum, Mat, Par};

use super::symeig;

/// Columns of the long dimension converted to f64 and accumulated into G at a time.
const PANEL: usize = 512;

/// Work (short side squared times long side) from which one matrix is split across threads itself.
const PARALLEL_WORK: usize = 1 << 27;

/// Short side from which the two-stage eigensolver is used.
pub const TWO_STAGE_MIN: usize = 1024;

/// The parallelism for a matrix with `k x k` Gram matrix over a long side `long` (all threads of the current pool
/// for big ones; results do not depend on it).
pub fn par_for(k: usize, long: usize) -> Par {
    if k * k * long >= PARALLEL_WORK {
        Par::rayon(0)
    } else {
        Par::Seq
    }
}

/// All min(rows, cols) singular values of the row-major `rows x cols` matrix `values`, in descending order.
/// The caller guarantees finite values and `values.len() == rows * cols`.
pub fn singular_values(values: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    debug_assert_eq!(values.len(), rows * cols);
    let k = rows.min(cols);
    if k == 0 {
        return Vec::new();
    }
    let par = par_for(k, rows.max(cols));
    let gram = gram_lower(values, rows, cols, par);
    let eig = eigenvalues_lower(gram, par);
    let mut s: Vec<f64> = eig.into_iter().map(|l| l.max(0.0).sqrt()).collect();
    s.sort_by(|a, b| b.total_cmp(a));
    s
}

/// The lower triangle of the k x k Gram matrix on the short side, accumulated in f64 panel by panel.
pub fn gram_lower(values: &[f32], rows: usize, cols: usize, par: Par) -> Mat<f64> {
    let k = rows.min(cols);
    let long = rows.max(cols);
    let mut gram = Mat::<f64>::zeros(k, k);
    let width_max = PANEL.min(long);
    // Each panel is a contiguous widening copy: for a wide matrix (rows <= cols) the panel is stored transposed
    // (width x k, column r = row r of W), for a tall one as k x width (column j = row j of W).
    let mut panel = if rows <= cols { Mat::<f64>::zeros(width_max, k) } else { Mat::<f64>::zeros(k, width_max) };
    let mut start = 0;
    while start < long {
        let width = PANEL.min(long - start);
        if rows <= cols {
            for r in 0..k {
                let col = panel.col_mut(r).try_as_col_major_mut().unwrap().as_slice_mut();
                for (x, &v) in col[..width].iter_mut().zip(&values[r * cols + start..r * cols + start + width]) {
                    *x = v as f64;
                }
            }
        } else {
            for j in 0..width {
                let col = panel.col_mut(j).try_as_col_major_mut().unwrap().as_slice_mut();
                for (x, &v) in col.iter_mut().zip(&values[(start + j) * cols..(start + j + 1) * cols]) {
                    *x = v as f64;
                }
            }
        }
        // p is the k x width block of the short-side vectors at long indices start..start+width.
        let p =
            if rows <= cols { panel.as_ref().subrows(0, width).transpose() } else { panel.as_ref().subcols(0, width) };
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
pub fn eigenvalues_lower(gram: Mat<f64>, par: Par) -> Vec<f64> {
    if gram.nrows() >= TWO_STAGE_MIN {
        symeig::eigenvalues_lower(gram, symeig::BAND, par)
    } else {
        one_stage_eigenvalues_lower(gram)
    }
}

/// Eigenvalues by faer's one-stage self-adjoint eigensolver, sequential (small matrices, and the benchmark's
/// comparison for large ones).
pub fn one_stage_eigenvalues_lower(gram: Mat<f64>) -> Vec<f64> {
    let n = gram.nrows();
    let par = Par::Seq;
    let mut s = Diag::<f64>::zeros(n);
    let mut mem = MemBuffer::new(self_adjoint_evd_scratch::<f64>(n, ComputeEigenvectors::No, par, Default::default()));
    // A symmetric eigenproblem without eigenvectors only fails on non-finite input, which the caller excludes; if
    // it ever did, NaN values make the caller report the tensor as non-finite instead of guessing.
    if self_adjoint_evd(gram.as_ref(), s.as_mut(), None, par, MemStack::new(&mut mem), Default::default()).is_err() {
        return vec![f64::NAN; n];
    }
    s.column_vector().iter().copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use std::num::NonZeroUsize;

    #[test]
    fn parallel_paths_are_bit_identical_to_sequential() {
        let (rows, cols) = (150, 700);
        let mut rng = Rng::new(11);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.normal() as f32).collect();
        let t: Vec<f32> = (0..rows * cols).map(|i| w[(i % rows) * cols + i / rows]).collect(); // the transpose
        let run = |par: Par, values: &[f32], r: usize, c: usize| {
            let g = gram_lower(values, r, c, par);
            let lower: Vec<u64> = (0..g.nrows())
                .flat_map(|j| (j..g.nrows()).map(move |i| (i, j)))
                .map(|(i, j)| g[(i, j)].to_bits())
                .collect();
            let e: Vec<u64> = symeig::eigenvalues_lower(g, 16, par).iter().map(|x| x.to_bits()).collect();
            (lower, e)
        };
        let seq = run(Par::Seq, &w, rows, cols);
        for threads in [2, 3, 8] {
            let par = Par::Rayon(NonZeroUsize::new(threads).unwrap());
            assert!(run(par, &w, rows, cols) == seq, "{threads} threads");
        }
        // The tall orientation goes through the other panel layout and gives the same Gram matrix up to rounding.
        let (g_wide, g_tall) = (gram_lower(&w, rows, cols, Par::Seq), gram_lower(&t, cols, rows, Par::Seq));
        for j in 0..rows {
            for i in j..rows {
                assert!((g_wide[(i, j)] - g_tall[(i, j)]).abs() <= 1e-12 * g_wide[(j, j)].abs().max(1.0));
            }
        }
    }
}
