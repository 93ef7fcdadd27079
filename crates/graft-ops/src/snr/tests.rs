//! Checks of the Spectrum formula and the singular values against values derived independently: by hand for
//! diagonal and rank-1 matrices, and against a plain f64 one-sided Jacobi SVD for random ones.

use super::*;
use crate::rng::Rng;

/// Singular values by one-sided Jacobi in f64 (Hestenes): orthogonalise the columns of A (rows >= cols) by plane
/// rotations until every pair is orthogonal; the column norms are then the singular values.
fn jacobi_singular_values(values: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    // Work on the orientation with at least as many rows as columns.
    let (m, n, a): (usize, usize, Vec<f64>) = if rows >= cols {
        (rows, cols, values.iter().map(|&v| v as f64).collect())
    } else {
        let mut t = vec![0f64; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = values[r * cols + c] as f64;
            }
        }
        (cols, rows, t)
    };
    // Column-major copy: column j is a[j*m..(j+1)*m] of the (m x n) matrix.
    let mut col = vec![0f64; m * n];
    for r in 0..m {
        for c in 0..n {
            col[c * m + r] = a[r * n + c];
        }
    }
    for _sweep in 0..60 {
        let mut off = 0f64;
        for p in 0..n {
            for q in p + 1..n {
                let (mut alpha, mut beta, mut gamma) = (0f64, 0f64, 0f64);
                for i in 0..m {
                    let (x, y) = (col[p * m + i], col[q * m + i]);
                    alpha += x * x;
                    beta += y * y;
                    gamma += x * y;
                }
                if gamma == 0.0 {
                    continue;
                }
                off = off.max(gamma.abs() / (alpha * beta).sqrt());
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let t = if zeta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                for i in 0..m {
                    let (x, y) = (col[p * m + i], col[q * m + i]);
                    col[p * m + i] = c * x - s * y;
                    col[q * m + i] = s * x + c * y;
                }
            }
        }
        if off < 1e-15 {
            break;
        }
    }
    let mut s: Vec<f64> = (0..n).map(|j| col[j * m..(j + 1) * m].iter().map(|x| x * x).sum::<f64>().sqrt()).collect();
    s.sort_by(|a, b| b.total_cmp(a));
    s
}

fn random_matrix(seed: u64, rows: usize, cols: usize) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..rows * cols).map(|_| rng.normal() as f32).collect()
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs())
}

#[test]
fn diagonal_matrix_whole_formula_by_hand() {
    // 6 x 8 with diagonal 10, 5, 4, 3, 2, 1 (shuffled onto the diagonal): S = [10, 5, 4, 3, 2, 1].
    let (rows, cols) = (6, 8);
    let diag = [3.0f32, 10.0, 1.0, 5.0, 2.0, 4.0];
    let mut w = vec![0f32; rows * cols];
    for (i, &d) in diag.iter().enumerate() {
        w[i * cols + i] = if i % 2 == 0 { d } else { -d }; // signs do not change singular values
    }
    // Ascending S = 1 2 3 4 5 10. q75 at position 3.75: 4 + 0.75 * (5 - 4) = 4.75; q25 at 1.25: 2 + 0.25 = 2.25.
    let sigma = (4.75 - 2.25) / 1.349;
    let threshold = sigma * (1.0 + (6.0f64 / 8.0).sqrt()); // 3.458..., so 10, 5, 4 are signal
    let want = (19.0 / 6.0) / 10.0;
    let r = matrix_snr(&w, rows, cols);
    assert_eq!(r.status, SnrStatus::Ok);
    assert_eq!(r.n_signal, 3);
    assert!(close(r.s_max, 10.0, 1e-12), "{r:?}");
    assert!(close(r.sigma, sigma, 1e-12), "{r:?}");
    assert!(close(r.threshold, threshold, 1e-12), "{r:?}");
    assert!(close(r.ratio, 19.0 / 6.0, 1e-12), "{r:?}");
    assert!(close(r.snr, want, 1e-12), "{r:?}");
    // The transposed matrix has the same singular values and beta.
    let mut t = vec![0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    assert!(close(matrix_snr(&t, cols, rows).snr, want, 1e-12));
}

#[test]
fn signal_is_strictly_above_threshold() {
    // S = [4, 2, 2, 2, 0] for a 5 x 5 diagonal: q75 = 2, q25 = 2, sigma = 0, threshold = 0; the zero is noise,
    // everything else signal, noise sum 0 -> infinite.
    let (n, d) = (5, [4.0f32, 2.0, 2.0, 2.0, 0.0]);
    let mut w = vec![0f32; n * n];
    for i in 0..n {
        w[i * n + i] = d[i];
    }
    let r = matrix_snr(&w, n, n);
    assert_eq!(r.status, SnrStatus::NoiseZero);
    assert_eq!(r.n_signal, 4);
    assert_eq!(r.snr, f64::INFINITY);
    // Straight from singular values: S = [3, 1, 1, 1]: threshold 0, all signal, no noise -> noise = 1 by the rule.
    let r = snr_from_singular_values(&[3.0, 1.0, 1.0, 1.0], 4, 4);
    assert_eq!(r.status, SnrStatus::Ok);
    assert_eq!(r.n_signal, 4);
    assert!(close(r.snr, 6.0 / 1.0 / 3.0, 1e-15));
}

#[test]
fn rank_one_matrix_is_all_signal_no_noise() {
    // u v^T has S = [|u| |v|, 0, ...]: quantiles 0, threshold 0, signal = S[0], noise exactly 0 -> infinite.
    let u: Vec<f32> = (0..37).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
    let v: Vec<f32> = (0..53).map(|j| ((j * 5 % 13) as f32 - 6.0) / 7.0).collect();
    let w: Vec<f32> = u.iter().flat_map(|&a| v.iter().map(move |&b| a * b)).collect();
    let r = matrix_snr(&w, u.len(), v.len());
    let norm = |x: &[f32]| x.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
    assert_eq!(r.status, SnrStatus::NoiseZero, "{r:?}");
    assert_eq!(r.n_signal, 1);
    assert_eq!(r.sigma, 0.0);
    assert!(close(r.s_max, norm(&u) * norm(&v), 1e-6), "{r:?}");
    assert!(r.score() == Some(f64::INFINITY));
}

#[test]
fn random_matrices_match_an_f64_jacobi_svd() {
    for (seed, rows, cols) in [(1, 40, 70), (2, 64, 64), (3, 90, 33), (4, 1, 50), (5, 17, 1)] {
        let w = random_matrix(seed, rows, cols);
        let ours = svals::singular_values(&w, rows, cols);
        let reference = jacobi_singular_values(&w, rows, cols);
        assert_eq!(ours.len(), reference.len());
        for (a, b) in ours.iter().zip(&reference) {
            assert!(close(*a, *b, 1e-5), "{rows}x{cols}: {a} vs {b}");
        }
        let got = matrix_snr(&w, rows, cols);
        let want = snr_from_singular_values(&reference, rows, cols);
        assert_eq!(got.status, want.status);
        assert_eq!(got.n_signal, want.n_signal);
        assert!(close(got.snr, want.snr, 1e-5), "{rows}x{cols}: {got:?} vs {want:?}");
    }
}

#[test]
fn vectors_score_exactly_one() {
    // 1 x d: S = [|x|], sigma 0, threshold 0, signal |x|, no noise -> noise 1 -> |x| / 1 / |x| = 1.
    let x = [3.0f32, -4.0, 12.0];
    let r = matrix_snr(&x, 1, 3);
    assert_eq!(r.status, SnrStatus::Ok);
    assert!(close(r.s_max, 13.0, 1e-12));
    assert_eq!(r.snr, 1.0);
    assert_eq!(matrix_shape(&[7]), (1, 7));
    assert_eq!(matrix_shape(&[]), (1, 1));
    assert_eq!(matrix_shape(&[8, 3, 3, 3]), (8, 27));
}

#[test]
fn degenerate_matrices_are_named_not_nan() {
    assert_eq!(matrix_snr(&[0.0; 12], 3, 4).status, SnrStatus::AllZero);
    assert_eq!(matrix_snr(&[1.0, f32::NAN, 0.0, 2.0], 2, 2).status, SnrStatus::NonFinite);
    assert_eq!(matrix_snr(&[1.0, f32::INFINITY, 0.0, 2.0], 2, 2).status, SnrStatus::NonFinite);
    assert_eq!(matrix_snr(&[], 0, 5).status, SnrStatus::Empty);
    for s in [SnrStatus::AllZero, SnrStatus::NonFinite, SnrStatus::Empty, SnrStatus::Skipped1d] {
        assert!(!s.is_scored());
    }
}

#[test]
fn two_stage_route_matches_jacobi_too() {
    // The production route switches to the two-stage eigensolver for big Gram matrices; check it directly on small
    // ones with a narrow band so that several panels and bulge-chasing sweeps are exercised.
    for (seed, rows, cols, band) in [(21, 60, 90, 4), (22, 75, 40, 8), (23, 33, 33, 5)] {
        let w = random_matrix(seed, rows, cols);
        let g = svals::gram_lower(&w, rows, cols, faer::Par::Seq);
        let mut s: Vec<f64> =
            symeig::eigenvalues_lower(g, band, faer::Par::Seq).iter().map(|l| l.max(0.0).sqrt()).collect();
        s.sort_by(|a, b| b.total_cmp(a));
        let reference = jacobi_singular_values(&w, rows, cols);
        for (a, b) in s.iter().zip(&reference) {
            assert!(close(*a, *b, 1e-5), "{rows}x{cols}: {a} vs {b}");
        }
    }
}
