//! Bootstrap estimates of a mean over repeated runs: mean, standard error and a 95% percentile interval from B
//! resamples of the runs' values (one value per run: a run's accuracy is already a mean over its test set).
//!
//! The resampling is *balanced* (Davison, Hinkley and Schechtman, "Efficient bootstrap simulation", Biometrika
//! 1986): the B resamples together draw every run exactly B times, as if B copies of the data were shuffled and cut
//! into B resamples of n. Each resample is still a draw of n values with replacement from the data as far as its own
//! distribution goes, so the standard error and interval are those of the ordinary bootstrap; but the mean of the B
//! resample means is then exactly the sample mean (sum over resamples = B * sum of the data), instead of the sample
//! mean plus Monte Carlo noise of about SE / sqrt(B). So the reported "mean" is both the bootstrap mean and the
//! sample mean, and does not move with the seed; the seed only moves the SE and the interval (by about 1/sqrt(2B)).

use serde::Serialize;

use crate::rng::Rng;

/// The reference notebooks and the issue use 10,000 resamples.
pub const DEFAULT_RESAMPLES: usize = 10_000;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Estimate {
    /// Number of runs.
    pub n: usize,
    /// Mean of the resample means (equal to the sample mean, see the module comment).
    pub mean: f64,
    /// The plain sample mean, computed directly.
    pub sample_mean: f64,
    /// Bootstrap standard error: the standard deviation of the resample means (population form, as numpy's std).
    pub se: f64,
    /// Sample standard deviation of the runs (n - 1 in the denominator; 0 for one run).
    pub sd: f64,
    /// 2.5% and 97.5% percentiles of the resample means (linear interpolation between order statistics).
    pub ci95: [f64; 2],
}

/// Bootstrap estimate of the mean of `values` with `resamples` balanced resamples drawn from `rng`.
/// `None` for no values. Deterministic for a given rng state.
pub fn bootstrap_mean(values: &[f64], resamples: usize, rng: &mut Rng) -> Option<Estimate> {
    let n = values.len();
    if n == 0 {
        return None;
    }
    let sample_mean = values.iter().sum::<f64>() / n as f64;
    let sd = if n > 1 {
        (values.iter().map(|v| (v - sample_mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    } else {
        0.0
    };
    let resamples = resamples.max(1);
    let mut means = Vec::with_capacity(resamples);
    let mut urn = Urn::new(n, resamples as u64);
    for _ in 0..resamples {
        let mut sum = 0.0f64;
        for _ in 0..n {
            sum += values[urn.draw(rng)];
        }
        means.push(sum / n as f64);
    }
    // Compensated: the mean of means then lands on the sample mean to the last bits, not ~B ulps away.
    let mean = neumaier_sum(&means) / resamples as f64;
    let se = (means.iter().map(|m| (m - mean).powi(2)).sum::<f64>() / resamples as f64).sqrt();
    means.sort_by(f64::total_cmp);
    let ci95 = [percentile(&means, 0.025), percentile(&means, 0.975)];
    Some(Estimate { n, mean, sample_mean, se, sd, ci95 })
}

/// Sum with Neumaier's compensation (the rounding error of every addition is carried and added back).
pub fn neumaier_sum(values: &[f64]) -> f64 {
    let (mut sum, mut carry) = (0.0f64, 0.0f64);
    for &v in values {
        let t = sum + v;
        carry += if sum.abs() >= v.abs() { (sum - t) + v } else { (v - t) + sum };
        sum = t;
    }
    sum + carry
}

/// Percentile of sorted data with linear interpolation (numpy's default method).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// An urn holding `copies` balls of each of n colours, drawn without replacement. A Fenwick tree over the remaining
/// counts finds the ball with a given rank in O(log n), so the n * B draws need O(n) memory rather than n * B.
struct Urn {
    tree: Vec<u64>, // 1-based Fenwick tree of remaining counts
    remaining: u64,
    top_bit: usize,
}

impl Urn {
    fn new(n: usize, copies: u64) -> Self {
        let mut tree = vec![0u64; n + 1];
        for i in 1..=n {
            tree[i] += copies;
            let parent = i + (i & i.wrapping_neg());
            if parent <= n {
                tree[parent] += tree[i];
            }
        }
        let top_bit = if n == 0 { 0 } else { 1usize << (usize::BITS - 1 - n.leading_zeros()) };
        Urn { tree, remaining: n as u64 * copies, top_bit }
    }

    /// Removes a uniformly chosen ball and returns its colour (0-based).
    fn draw(&mut self, rng: &mut Rng) -> usize {
        // 128-bit multiply-shift: uniform in [0, remaining) with bias below remaining / 2^64.
        let mut rank = ((rng.next_u64() as u128 * self.remaining as u128) >> 64) as u64;
        // Descend the tree to the first position whose prefix count exceeds `rank`.
        let n = self.tree.len() - 1;
        let mut pos = 0usize;
        let mut step = self.top_bit;
        while step > 0 {
            let next = pos + step;
            if next <= n && self.tree[next] <= rank {
                rank -= self.tree[next];
                pos = next;
            }
            step >>= 1;
        }
        let colour = pos; // 0-based index = (1-based position pos + 1) - 1
        let mut i = pos + 1;
        while i <= n {
            self.tree[i] -= 1;
            i += i & i.wrapping_neg();
        }
        self.remaining -= 1;
        colour
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed, irregular input: 24 accuracies written out by hand.
    const RUNS: [f64; 24] = [
        0.812, 0.797, 0.825, 0.781, 0.808, 0.833, 0.790, 0.816, 0.802, 0.829, 0.774, 0.811, 0.806, 0.819, 0.795, 0.838,
        0.787, 0.809, 0.822, 0.800, 0.814, 0.783, 0.827, 0.805,
    ];

    fn plain_mean_sd(x: &[f64]) -> (f64, f64) {
        let n = x.len() as f64;
        let mean = x.iter().sum::<f64>() / n;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1.0);
        (mean, var.sqrt())
    }

    #[test]
    fn mean_is_the_sample_mean_and_se_is_sd_over_sqrt_n() {
        let (mean, sd) = plain_mean_sd(&RUNS);
        for seed in 0..3 {
            let e = bootstrap_mean(&RUNS, DEFAULT_RESAMPLES, &mut Rng::new(seed)).unwrap();
            assert_eq!(e.n, 24);
            // Balanced resampling: the mean of the resample means is the sample mean up to rounding.
            assert!((e.mean - mean).abs() < 1e-9, "bootstrap mean {} vs {mean}", e.mean);
            assert!((e.sample_mean - mean).abs() < 1e-12);
            assert!((e.sd - sd).abs() < 1e-12);
            // The bootstrap SE estimates sd * sqrt((n-1)/n) / sqrt(n) (plug-in variance); with B = 10^4 its own
            // Monte Carlo error is about 1/sqrt(2B) = 0.7%. Within 5% of sd/sqrt(n) (2.1% lower by the plug-in
            // factor) and within 2% of the plug-in value.
            let classic = sd / (RUNS.len() as f64).sqrt();
            let plug_in = classic * ((RUNS.len() - 1) as f64 / RUNS.len() as f64).sqrt();
            assert!((e.se / classic - 1.0).abs() < 0.05, "se {} vs sd/sqrt(n) {classic}", e.se);
            assert!((e.se / plug_in - 1.0).abs() < 0.02, "se {} vs plug-in {plug_in}", e.se);
            // A 95% interval of a roughly normal mean: about mean +- 1.96 se.
            assert!(e.ci95[0] < mean && mean < e.ci95[1]);
            assert!(((e.ci95[1] - e.ci95[0]) / (2.0 * 1.96 * e.se) - 1.0).abs() < 0.1, "{:?}", e.ci95);
        }
    }

    #[test]
    fn ordinary_resampling_would_miss_the_mean_by_monte_carlo_noise() {
        // Why balanced: drawing each resample independently leaves the bootstrap mean off by ~ se/sqrt(B), far
        // more than 1e-9. This independent check of the claim uses plain draws with replacement.
        let (mean, _) = plain_mean_sd(&RUNS);
        let mut rng = Rng::new(0);
        let b = DEFAULT_RESAMPLES;
        let total: f64 =
            (0..b).map(|_| (0..RUNS.len()).map(|_| RUNS[rng.below(RUNS.len())]).sum::<f64>() / RUNS.len() as f64).sum();
        assert!((total / b as f64 - mean).abs() > 1e-9);
    }

    #[test]
    fn balanced_draws_use_every_run_exactly_b_times() {
        let (n, b) = (7usize, 1000u64);
        let mut urn = Urn::new(n, b);
        let mut rng = Rng::new(5);
        let mut counts = vec![0u64; n];
        for _ in 0..n as u64 * b {
            counts[urn.draw(&mut rng)] += 1;
        }
        assert_eq!(counts, vec![b; n]);
        assert_eq!(urn.remaining, 0);
    }

    #[test]
    fn each_resample_is_a_draw_with_replacement() {
        // Within one resample of n = 2 from a balanced urn with many copies, both values are drawn together about
        // half the time (with replacement: P(one of each) = 1/2), not always (as without replacement).
        let mut rng = Rng::new(9);
        let b = 20_000;
        let mut urn = Urn::new(2, b);
        let mixed = (0..b).filter(|_| urn.draw(&mut rng) != urn.draw(&mut rng)).count();
        let frac = mixed as f64 / b as f64;
        assert!((frac - 0.5).abs() < 0.02, "{frac}");
    }

    #[test]
    fn deterministic_and_degenerate_inputs() {
        let a = bootstrap_mean(&RUNS[..5], 2000, &mut Rng::new(3)).unwrap();
        let b = bootstrap_mean(&RUNS[..5], 2000, &mut Rng::new(3)).unwrap();
        assert_eq!(a, b);
        let c = bootstrap_mean(&RUNS[..5], 2000, &mut Rng::new(4)).unwrap();
        assert_ne!(a.se, c.se);
        assert!((a.mean - c.mean).abs() < 1e-12);
        let one = bootstrap_mean(&[0.5], 100, &mut Rng::new(0)).unwrap();
        assert_eq!((one.n, one.mean, one.se, one.sd, one.ci95), (1, 0.5, 0.0, 0.0, [0.5, 0.5]));
        assert!(bootstrap_mean(&[], 100, &mut Rng::new(0)).is_none());
    }

    #[test]
    fn compensated_sum_is_exact_where_plain_summation_drifts() {
        let v = vec![0.76; 500];
        assert_ne!(v.iter().sum::<f64>() / 500.0, 0.76);
        assert_eq!(neumaier_sum(&v) / 500.0, 0.76);
        assert_eq!(neumaier_sum(&[1e100, 1.0, -1e100]), 1.0);
    }

    #[test]
    fn percentile_interpolates_like_numpy() {
        let s = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&s, 0.0), 1.0);
        assert_eq!(percentile(&s, 1.0), 4.0);
        assert!((percentile(&s, 0.5) - 2.5).abs() < 1e-15);
        assert!((percentile(&s, 0.025) - 1.075).abs() < 1e-12); // numpy.percentile([1,2,3,4], 2.5)
    }
}
