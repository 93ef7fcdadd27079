//! Exact linear assignment on dense square f64 matrices: the step of weight matching that picks, for one group, the
//! permutation maximising `sum_i A[i][p[i]]`.
//!
//! The solver is the `lsap` crate: a line-by-line port of SciPy's `linear_sum_assignment` (Crouse's shortest
//! augmenting path variant of Jonker-Volgenant), so it returns the same optimum as SciPy on the same matrix, and on a
//! matrix with a unique optimum the same assignment. `tools/bench-lap.py` times it against SciPy.

use crate::error::{Error, Result};

/// The assignment maximising `sum_i cost[i * n + j(i)]` over permutations; `result[i]` is the column of row `i`.
/// `what` names the problem in errors (a NaN or infinite entry makes the problem ill-posed).
pub fn maximize(n: usize, cost: &[f64], what: &str) -> Result<Vec<usize>> {
    solve(n, cost, true, what)
}

/// The assignment minimising `sum_i cost[i * n + j(i)]`; `result[i]` is the column of row `i`.
pub fn minimize(n: usize, cost: &[f64], what: &str) -> Result<Vec<usize>> {
    solve(n, cost, false, what)
}

fn solve(n: usize, cost: &[f64], maximize: bool, what: &str) -> Result<Vec<usize>> {
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
    if n == 0 {
        return Ok(Vec::new());
    }
    // lsap takes `&Vec`; the copy is n^2 doubles next to an O(n^3) solve.
    let matrix = cost.to_vec();
    let (rows, cols) = lsap::solve(n, n, &matrix, maximize)
        .map_err(|e| Error::invalid(format!("{what}: linear assignment failed: {e:?}")))?;
    let mut assignment = vec![usize::MAX; n];
    for (r, c) in rows.into_iter().zip(cols) {
        assignment[r] = c;
    }
    debug_assert!(is_permutation(&assignment));
    Ok(assignment)
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
