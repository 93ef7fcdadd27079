//! Exact linear assignment on dense square f64 matrices: the step of weight matching that picks, for one group, the
//! permutation maximising `sum_i A[i][p[i]]`.
//!
//! The solver is Jonker-Volgenant (1987, "A shortest augmenting path algorithm for dense and sparse linear assignment
//! problems"): column reduction and reduction transfer, then shortest augmenting paths (Dijkstra over reduced costs)
//! for the rows still free. The structure follows the widely used C implementation in the `lap` Python package, with
//! infinities in place of its fixed "large" constant. The paper's augmenting row reduction (a heuristic between the
//! two phases) is left out: on uniform random and on low-rank-plus-noise matrices like weight matching's it cost
//! 1.5 to 4 times the time it saved (n = 512 and 2048, `tools/bench_lap.rs`). It returns
//! the same optimum as SciPy's `linear_sum_assignment` (tested against the `lsap` crate, a port of SciPy's solver,
//! and against brute force); `tools/bench-lap.py` times both on the same matrices.

use crate::error::{Error, Result};

const NONE: usize = usize::MAX;

/// The assignment maximising `sum_i cost[i * n + j(i)]` over permutations; `result[i]` is the column of row `i`.
/// `what` names the problem in errors (a NaN or infinite entry makes the problem ill-posed).
pub fn maximize(n: usize, cost: &[f64], what: &str) -> Result<Vec<usize>> {
    check(n, cost, what)?;
    let negated: Vec<f64> = cost.iter().map(|c| -c).collect();
    Ok(jonker_volgenant(n, &negated))
}

/// The assignment minimising `sum_i cost[i * n + j(i)]`; `result[i]` is the column of row `i`.
pub fn minimize(n: usize, cost: &[f64], what: &str) -> Result<Vec<usize>> {
    check(n, cost, what)?;
    Ok(jonker_volgenant(n, cost))
}

fn check(n: usize, cost: &[f64], what: &str) -> Result<()> {
    if cost.len() != n * n {
        return Err(Error::invalid(format!("{what}: cost matrix has {} entries, expected {n} x {n}", cost.len())));
    }
    if let Some(k) = cost.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(format!(
            "{what}: cost entry ({}, {}) is {} (the weights contain NaN or infinite values)",
            k / n,
            k % n,
            cost[k]
        )));
    }
    Ok(())
}

/// Minimising assignment of a square matrix with finite entries.
fn jonker_volgenant(n: usize, c: &[f64]) -> Vec<usize> {
    if n <= 1 {
        return vec![0; n];
    }
    let mut x = vec![NONE; n]; // column of each row
    let mut y = vec![NONE; n]; // row of each column
    let mut v = vec![f64::INFINITY; n]; // column duals
    let free = column_reduction(n, c, &mut x, &mut y, &mut v);
    augment(n, c, &free, &mut x, &mut y, &mut v);
    debug_assert!(is_permutation(&x));
    x
}

fn row(c: &[f64], n: usize, i: usize) -> &[f64] {
    &c[i * n..(i + 1) * n]
}

/// Column reduction and reduction transfer: each column's dual is its minimum; a row that is the minimum of exactly
/// one column takes it. Returns the rows left free.
fn column_reduction(n: usize, c: &[f64], x: &mut [usize], y: &mut [usize], v: &mut [f64]) -> Vec<usize> {
    for i in 0..n {
        for (j, &cij) in row(c, n, i).iter().enumerate() {
            if cij < v[j] {
                v[j] = cij;
                y[j] = i;
            }
        }
    }
    let mut unique = vec![true; n];
    for j in (0..n).rev() {
        let i = y[j];
        if x[i] == NONE {
            x[i] = j;
        } else {
            unique[i] = false;
            y[j] = NONE;
        }
    }
    let mut free = Vec::new();
    for i in 0..n {
        if x[i] == NONE {
            free.push(i);
        } else if unique[i] {
            let j = x[i];
            let r = row(c, n, i);
            let min = (0..n).filter(|&k| k != j).map(|k| r[k] - v[k]).fold(f64::INFINITY, f64::min);
            v[j] -= min;
        }
    }
    free
}

/// Assigns each free row along a shortest augmenting path.
fn augment(n: usize, c: &[f64], free: &[usize], x: &mut [usize], y: &mut [usize], v: &mut [f64]) {
    let mut pred = vec![0usize; n];
    let mut d = vec![0f64; n];
    let mut cols = vec![0usize; n];
    for &free_i in free {
        let mut j = shortest_path(n, c, free_i, y, v, &mut pred, &mut d, &mut cols);
        loop {
            let i = pred[j];
            y[j] = i;
            std::mem::swap(&mut j, &mut x[i]);
            if i == free_i {
                break;
            }
        }
    }
}

/// Dijkstra over reduced costs from row `start` to the nearest free column; updates the duals of the columns
/// settled before the last distance level. `cols` holds columns as [ready | scan | todo].
#[allow(clippy::too_many_arguments)]
fn shortest_path(
    n: usize,
    c: &[f64],
    start: usize,
    y: &[usize],
    v: &mut [f64],
    pred: &mut [usize],
    d: &mut [f64],
    cols: &mut [usize],
) -> usize {
    let r = row(c, n, start);
    for j in 0..n {
        cols[j] = j;
        pred[j] = start;
        d[j] = r[j] - v[j];
    }
    let (mut lo, mut hi, mut n_ready) = (0usize, 0usize, 0usize);
    let mut final_j = NONE;
    while final_j == NONE {
        if lo == hi {
            // Move the columns at the next smallest distance to the scan list.
            n_ready = lo;
            hi = lo + 1;
            let mut mind = d[cols[lo]];
            // `hi` grows inside the loop; the columns examined are those after the first, fixed at the start.
            for k in lo + 1..n {
                let j = cols[k];
                if d[j] <= mind {
                    if d[j] < mind {
                        hi = lo;
                        mind = d[j];
                    }
                    cols[k] = cols[hi];
                    cols[hi] = j;
                    hi += 1;
                }
            }
            for &j in &cols[lo..hi] {
                if y[j] == NONE {
                    final_j = j;
                }
            }
        }
        if final_j == NONE {
            final_j = scan(n, c, &mut lo, &mut hi, d, cols, pred, y, v);
        }
    }
    let mind = d[cols[lo]];
    for &j in &cols[..n_ready] {
        v[j] += d[j] - mind;
    }
    final_j
}

/// Scans the columns at the current distance: relaxes the todo columns through their assigned rows; returns a free
/// column reached at that distance, if any.
#[allow(clippy::too_many_arguments)]
fn scan(
    n: usize,
    c: &[f64],
    plo: &mut usize,
    phi: &mut usize,
    d: &mut [f64],
    cols: &mut [usize],
    pred: &mut [usize],
    y: &[usize],
    v: &[f64],
) -> usize {
    let (mut lo, mut hi) = (*plo, *phi);
    while lo != hi {
        let j = cols[lo];
        lo += 1;
        let i = y[j];
        let mind = d[j];
        let r = row(c, n, i);
        let h = r[j] - v[j] - mind;
        let todo = hi;
        for k in todo..n {
            let j = cols[k];
            let cred = r[j] - v[j] - h;
            if cred < d[j] {
                d[j] = cred;
                pred[j] = i;
                if cred == mind {
                    if y[j] == NONE {
                        return j;
                    }
                    cols[k] = cols[hi];
                    cols[hi] = j;
                    hi += 1;
                }
            }
        }
    }
    *plo = lo;
    *phi = hi;
    NONE
}

/// `sum_i cost[i * n + assignment[i]]`, summed in row order.
pub fn value(n: usize, cost: &[f64], assignment: &[usize]) -> f64 {
    assignment.iter().enumerate().map(|(i, &j)| cost[i * n + j]).sum()
}

pub fn is_permutation(p: &[usize]) -> bool {
    let mut seen = vec![false; p.len()];
    p.iter().all(|&j| j < seen.len() && !std::mem::replace(&mut seen[j], true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The best value over all n! permutations (Heap's algorithm, each swap updating the sum by its two changed
    /// entries), computed independently of the solver.
    fn brute_force_max(n: usize, cost: &[f64]) -> f64 {
        let mut p: Vec<usize> = (0..n).collect();
        let mut c = vec![0usize; n];
        let mut current = value(n, cost, &p);
        let mut best = current;
        let mut i = 1;
        while i < n {
            if c[i] < i {
                let j = if i % 2 == 0 { 0 } else { c[i] };
                current -= cost[i * n + p[i]] + cost[j * n + p[j]];
                p.swap(j, i);
                current += cost[i * n + p[i]] + cost[j * n + p[j]];
                best = best.max(current);
                c[i] += 1;
                i = 1;
            } else {
                c[i] = 0;
                i += 1;
            }
        }
        best
    }

    #[test]
    fn matches_brute_force_on_random_8x8_problems() {
        let mut rng = Rng::new(2024);
        for case in 0..300 {
            let n = 8;
            // Mix continuous costs with small integers, which have many ties and exercise the tie-breaking paths.
            let cost: Vec<f64> = if case % 3 == 0 {
                (0..n * n).map(|_| rng.below(4) as f64).collect()
            } else {
                (0..n * n).map(|_| rng.normal() * 10.0).collect()
            };
            let best = brute_force_max(n, &cost);
            let p = maximize(n, &cost, "test").unwrap();
            assert!(is_permutation(&p));
            let got = value(n, &cost, &p);
            assert!((got - best).abs() <= 1e-9 * best.abs().max(1.0), "case {case}: solver {got}, brute force {best}");
            // Minimising is maximising the negation.
            let neg: Vec<f64> = cost.iter().map(|v| -v).collect();
            let q = minimize(n, &neg, "test").unwrap();
            assert!((value(n, &neg, &q) + best).abs() <= 1e-9 * best.abs().max(1.0), "case {case} (minimize)");
        }
    }

    /// SciPy's algorithm (the `lsap` port), as an independent reference on sizes brute force cannot reach.
    fn scipy_port(n: usize, cost: &[f64]) -> Vec<usize> {
        let (rows, cols) = lsap::solve(n, n, &cost.to_vec(), false).unwrap();
        let mut a = vec![0; n];
        for (r, c) in rows.into_iter().zip(cols) {
            a[r] = c;
        }
        a
    }

    #[test]
    fn matches_scipy_on_larger_problems() {
        let mut rng = Rng::new(77);
        for (case, n) in [2, 3, 5, 17, 64, 100, 150].into_iter().cycle().take(40).enumerate() {
            let cost: Vec<f64> = match case % 4 {
                0 => (0..n * n).map(|_| rng.next_f64()).collect(),
                1 => (0..n * n).map(|_| rng.below(3) as f64).collect(),
                2 => (0..n * n).map(|_| rng.normal() * 1e8).collect(),
                // Low rank plus noise, like the cost matrices of weight matching.
                _ => {
                    let (u, w): (Vec<f64>, Vec<f64>) =
                        ((0..n).map(|_| rng.normal()).collect(), (0..n).map(|_| rng.normal()).collect());
                    (0..n * n).map(|k| u[k / n] * w[k % n] + 0.01 * rng.normal()).collect()
                }
            };
            let ours = minimize(n, &cost, "t").unwrap();
            let theirs = scipy_port(n, &cost);
            assert!(is_permutation(&ours));
            let (a, b) = (value(n, &cost, &ours), value(n, &cost, &theirs));
            let scale: f64 = cost.iter().map(|c| c.abs()).fold(1.0, f64::max) * n as f64;
            assert!((a - b).abs() <= 1e-12 * scale, "case {case} n {n}: {a} vs {b}");
            if case % 4 == 0 || case % 4 == 2 {
                // Continuous costs have a unique optimum: the same assignment.
                assert_eq!(ours, theirs, "case {case} n {n}");
            }
        }
    }

    #[test]
    fn small_sizes_and_hand_solved_problem() {
        assert_eq!(maximize(0, &[], "t").unwrap(), Vec::<usize>::new());
        assert_eq!(maximize(1, &[-3.0], "t").unwrap(), vec![0]);
        // An outer product of increasing vectors: by the rearrangement inequality the identity (1 + 4 + 9) is optimal.
        let cost = [1.0, 2.0, 3.0, 2.0, 4.0, 6.0, 3.0, 6.0, 9.0];
        assert_eq!(maximize(3, &cost, "t").unwrap(), vec![0, 1, 2]);
        let cost = [0.0, 0.0, 5.0, 0.0, 4.0, 0.0, 3.0, 0.0, 0.0];
        assert_eq!(maximize(3, &cost, "t").unwrap(), vec![2, 1, 0]);
        assert_eq!(minimize(3, &cost, "t").unwrap().len(), 3);
    }

    #[test]
    fn non_finite_costs_are_an_error_naming_the_problem() {
        let e = maximize(2, &[1.0, f64::NAN, 0.0, 1.0], "group 'x'").unwrap_err().to_string();
        assert!(e.contains("group 'x'") && e.contains("NaN"), "{e}");
        assert!(maximize(2, &[1.0, 2.0], "g").is_err());
    }
}
