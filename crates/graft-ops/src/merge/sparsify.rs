//! Trim and keep masks of task vectors, shared by TIES, DARE, breadcrumbs and DELLA (mergekit's `sparsify`).
//!
//! - magnitude (TIES): keep the `max(1, int(density * n))` largest magnitudes.
//! - magnitude outliers (breadcrumbs): sort magnitudes ascending, keep ranks `[n_bot, n_bot + int(density * n))`
//!   where `n_bot = max(0, n - int(density * n) - int(gamma * n))`: the smallest and the `gamma` largest go.
//! - random (DARE): keep each entry with probability `density`.
//! - della_magprune (DELLA): along axis 1 (rows of a matrix; a vector is one row), rank magnitudes ascending and keep
//!   each entry with probability `density - epsilon + 2 * epsilon * rank / (len - 1)`.
//!
//! Rank-based masks need order statistics of a whole tensor. They come from `rank`'s radix select over the f32 bit
//! patterns of the magnitudes, chunk by chunk, with memory of a few histograms whatever the tensor size. Equal
//! magnitudes are ranked by position, so masks are exact, reproducible and keep exactly the requested count (torch's
//! unstable sort keeps an arbitrary subset of ties instead).
//!
//! Random masks draw from a stream per (seed, tensor, input, block of `RNG_BLOCK` elements): identical whatever the
//! chunking or the thread count.

use std::ops::Range;

use super::rank::{self, Located};
use super::scratch::Buf;
use crate::error::Result;
use crate::exec::{Executor, CHUNK_ELEMS};
use crate::rng::Rng;

pub use super::rank::key;

/// Elements per random stream of DARE masks (divides the executor's chunk size).
pub const RNG_BLOCK: usize = 1 << 16;

/// The count `int(density * n)` as Python computes it (f64 product, truncated).
pub fn count_of(fraction: f64, n: usize) -> usize {
    let v = fraction * n as f64;
    if v <= 0.0 {
        0
    } else {
        (v as usize).min(n)
    }
}

#[derive(Clone, Debug)]
enum Window {
    All,
    Nothing,
    /// The keys at ranks `lo` and `hi - 1`, with where their equal keys start per chunk.
    Bounded {
        lower: Located,
        upper: Located,
    },
}

/// Keeps the elements whose ascending magnitude rank (ties by position) lies in `[lo, hi)`.
#[derive(Clone, Debug)]
pub struct RankWindow {
    lo: usize,
    hi: usize,
    window: Window,
}

/// Where a sequential walk through a rank window stands: how many elements equal to each boundary key lie before it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cursor {
    seen_lo: usize,
    seen_hi: usize,
}

impl RankWindow {
    /// Zeroes the entries of `d` (elements `range` of the series) outside the window. `prefix` supplies the values
    /// of `[chunk start, range.start)` when `range` does not start on a chunk boundary.
    pub fn apply(
        &self,
        range: Range<usize>,
        d: &mut [f32],
        prefix: &dyn Fn(Range<usize>) -> Result<Buf>,
    ) -> Result<()> {
        let mut cur = self.cursor(range.start, prefix)?;
        self.apply_at(&mut cur, d);
        Ok(())
    }

    /// The cursor at element `start` (`prefix` as for `apply`).
    pub fn cursor(&self, start: usize, prefix: &dyn Fn(Range<usize>) -> Result<Buf>) -> Result<Cursor> {
        let Window::Bounded { lower, upper } = &self.window else { return Ok(Cursor::default()) };
        let chunk = start / CHUNK_ELEMS;
        let mut cur = Cursor { seen_lo: lower.eq_before[chunk], seen_hi: upper.eq_before[chunk] };
        let chunk_start = chunk * CHUNK_ELEMS;
        if start > chunk_start {
            for k in prefix(chunk_start..start)?.iter().map(|&x| key(x)) {
                cur.seen_lo += (k == lower.key) as usize;
                cur.seen_hi += (k == upper.key) as usize;
            }
        }
        Ok(cur)
    }

    /// Zeroes the entries of `d` outside the window, `d` being the elements at `cur`; advances `cur` past them.
    pub fn apply_at(&self, cur: &mut Cursor, d: &mut [f32]) {
        let (lower, upper) = match &self.window {
            Window::All => return,
            Window::Nothing => {
                d.fill(0.0);
                return;
            }
            Window::Bounded { lower, upper } => (lower, upper),
        };
        let (mut seen_lo, mut seen_hi) = (cur.seen_lo, cur.seen_hi);
        let (lk, uk) = (lower.key, upper.key);
        let (lo, hi) = (self.lo, self.hi);
        // Equal keys have rank `less + ordinal among the equal ones`. bf16 task vectors put a large share of their
        // entries exactly on a boundary key, but in every block but one per boundary those entries are all kept or
        // all dropped: decide per block of 4096, and run the branch-free (vectorisable) loop with constants there.
        let whole = |first: usize, count: usize| -> Option<bool> {
            if count == 0 || (first >= lo && first + count <= hi) {
                Some(count > 0)
            } else if first + count <= lo || first >= hi {
                Some(false)
            } else {
                None
            }
        };
        for block in d.chunks_mut(4096) {
            let count_l = block.iter().filter(|x| key(**x) == lk).count();
            let count_u = if lk == uk { count_l } else { block.iter().filter(|x| key(**x) == uk).count() };
            let keep_l = whole(lower.less + seen_lo, count_l);
            let keep_u = if lk == uk { keep_l } else { whole(upper.less + seen_hi, count_u) };
            if let (Some(kl), Some(ku)) = (keep_l, keep_u) {
                for x in block.iter_mut() {
                    let k = key(*x);
                    let keep = ((k > lk) & (k < uk)) | ((k == lk) & kl) | ((k == uk) & ku);
                    *x = if keep { *x } else { 0.0 };
                }
                seen_lo += count_l;
                seen_hi += count_u;
                continue;
            }
            for x in block.iter_mut() {
                let k = key(*x);
                let (eq_l, eq_u) = (k == lk, k == uk);
                let r_l = lower.less + seen_lo;
                let r_u = upper.less + seen_hi;
                let keep = ((k > lk) & (k < uk))
                    | (eq_l & (r_l >= lo) & (r_l < hi))
                    | (eq_u & !eq_l & (r_u >= lo) & (r_u < hi));
                seen_lo += eq_l as usize;
                seen_hi += eq_u as usize;
                *x = if keep { *x } else { 0.0 };
            }
        }
        cur.seen_lo = seen_lo;
        cur.seen_hi = seen_hi;
    }

    /// The number of elements kept.
    pub fn kept(&self, n: usize) -> usize {
        match self.window {
            Window::All => n,
            Window::Nothing => 0,
            Window::Bounded { .. } => self.hi - self.lo,
        }
    }
}

/// The window of TIES's magnitude trim: the `k = max(1, int(density * n))` largest magnitudes (None: keep all).
pub fn magnitude_window(n: usize, density: f64) -> (usize, usize) {
    if density >= 1.0 {
        return (0, n);
    }
    if density <= 0.0 || n == 0 {
        return (0, 0);
    }
    let k = count_of(density, n).max(1);
    (n - k, n)
}

/// The window of breadcrumbs' outlier trim (see the module comment).
pub fn outlier_window(n: usize, density: f64, gamma: f64) -> (usize, usize) {
    if density >= 1.0 {
        return (0, n);
    }
    let target = count_of(density, n);
    let top = count_of(gamma, n);
    let bot = n.saturating_sub(target + top);
    (bot, (bot + target).min(n))
}

/// Computes the rank windows of several series sharing positions `0..n`: `values(range)` returns, per series, the
/// values of that chunk (ranked by magnitude). Two chunked passes over the data at most, however many series.
pub fn rank_windows(
    exec: &Executor,
    n: usize,
    windows: &[(usize, usize)],
    values: &(dyn Fn(Range<usize>) -> Result<Vec<Buf>> + Sync),
) -> Result<Vec<RankWindow>> {
    let trivial = |(lo, hi): (usize, usize)| hi <= lo || (lo == 0 && hi >= n);
    if windows.iter().all(|&w| trivial(w)) {
        return Ok(windows.iter().map(|&(lo, hi)| simple(lo, hi, n)).collect());
    }
    let wanted: Vec<Vec<usize>> =
        windows.iter().map(|&(lo, hi)| if trivial((lo, hi)) { Vec::new() } else { vec![lo, hi - 1] }).collect();
    let located = rank::locate(exec, &[n], &wanted, true, &|_, r| values(r))?;
    Ok(windows
        .iter()
        .zip(located)
        .map(|(&(lo, hi), mut found)| match (found.pop(), found.pop()) {
            (Some(upper), Some(lower)) => RankWindow { lo, hi, window: Window::Bounded { lower, upper } },
            _ => simple(lo, hi, n),
        })
        .collect())
}

fn simple(lo: usize, hi: usize, n: usize) -> RankWindow {
    let window = if hi <= lo { Window::Nothing } else { Window::All };
    debug_assert!(hi <= lo || (lo == 0 && hi >= n));
    RankWindow { lo, hi: hi.min(n), window }
}

/// Identifies the random streams of one input's mask within one tensor.
#[derive(Clone, Copy, Debug)]
pub struct Streams<'a> {
    pub seed: u64,
    pub tensor: &'a str,
    pub input: usize,
}

impl Streams<'_> {
    /// The stream of block `block`.
    pub fn block(&self, block: usize) -> Rng {
        Rng::for_label(self.seed, &format!("{}\u{1f}{}\u{1f}{block}", self.tensor, self.input))
    }
}

/// DARE's Bernoulli keep mask: zeroes entries of `d` (elements `range`) not drawn with probability `density`.
pub fn bernoulli(streams: Streams, density: f64, range: Range<usize>, d: &mut [f32]) {
    if density >= 1.0 {
        return;
    }
    let mut pos = range.start;
    let mut i = 0;
    while pos < range.end {
        let block = pos / RNG_BLOCK;
        let block_end = ((block + 1) * RNG_BLOCK).min(range.end);
        let mut rng = streams.block(block);
        for _ in block * RNG_BLOCK..pos {
            rng.next_u64();
        }
        for _ in pos..block_end {
            if rng.next_f64() >= density {
                d[i] = 0.0;
            }
            i += 1;
        }
        pos = block_end;
    }
}

/// The line layout DELLA ranks along: blocks of the leading axis, lines along axis 1, `inner` lines per block.
#[derive(Clone, Copy, Debug)]
pub struct Lines {
    /// Line length (the size of axis 1).
    pub len: usize,
    /// Lines per block (the product of the axes after 1), also the stride inside a line.
    pub inner: usize,
}

impl Lines {
    pub fn of_shape(shape: &[usize]) -> Lines {
        match shape.len() {
            0 => Lines { len: 1, inner: 1 },
            1 => Lines { len: shape[0], inner: 1 },
            _ => Lines { len: shape[1], inner: shape[2..].iter().product() },
        }
    }

    pub fn block(&self) -> usize {
        (self.len * self.inner).max(1)
    }
}

/// DELLA's magnitude-ranked random keep mask over whole blocks: `d` holds blocks `first_block..` (whole blocks), and
/// entries not drawn are zeroed.
pub fn della_mask(streams: Streams, density: f64, epsilon: f64, lines: Lines, first_block: usize, d: &mut [f32]) {
    let bs = lines.block();
    let mut order: Vec<u32> = Vec::with_capacity(lines.len);
    let mut rank = vec![0usize; lines.len];
    let mut prob = vec![0f64; bs];
    for (b, block) in d.chunks_mut(bs).enumerate() {
        for j in 0..lines.inner {
            order.clear();
            order.extend(0..lines.len as u32);
            order.sort_unstable_by_key(|&i| (key(block[i as usize * lines.inner + j]), i));
            for (r, &i) in order.iter().enumerate() {
                rank[i as usize] = r;
            }
            for i in 0..lines.len {
                let norm = if lines.len > 1 { rank[i] as f64 / (lines.len - 1) as f64 } else { 0.0 };
                prob[i * lines.inner + j] = density - epsilon + norm * 2.0 * epsilon;
            }
        }
        let mut rng = streams.block(first_block + b);
        for (x, &p) in block.iter_mut().zip(&prob) {
            if rng.next_f64() >= p {
                *x = 0.0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn windows_of(v: &[f32], w: (usize, usize), threads: usize) -> Vec<f32> {
        let exec = Executor::new(Some(threads)).unwrap().quiet();
        let values = |r: Range<usize>| -> Result<Vec<Buf>> { Ok(vec![Buf::from_slice(&v[r])]) };
        let rw = rank_windows(&exec, v.len(), &[w], &values).unwrap().remove(0);
        let mut out = Vec::new();
        for r in crate::exec::chunk_ranges(v.len()) {
            let mut d = v[r.clone()].to_vec();
            let pk = |q: Range<usize>| -> Result<Buf> { Ok(Buf::from_slice(&v[q])) };
            rw.apply(r, &mut d, &pk).unwrap();
            out.extend(d);
        }
        out
    }

    /// Plain reference: stable ascending sort by magnitude, keep positions whose rank is in [lo, hi).
    fn reference(v: &[f32], (lo, hi): (usize, usize)) -> Vec<f32> {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&a, &b| v[a].abs().partial_cmp(&v[b].abs()).unwrap());
        let mut out = vec![0f32; v.len()];
        for &i in &idx[lo..hi] {
            out[i] = v[i];
        }
        out
    }

    #[test]
    fn rank_window_matches_a_sort_with_ties_and_chunks() {
        // Values on a coarse grid make many ties; a second chunk exercises the per-chunk tie counts.
        let n = CHUNK_ELEMS + CHUNK_ELEMS / 8;
        let mut r = Rng::new(5);
        let v: Vec<f32> = (0..n).map(|_| ((r.normal() * 8.0).round() / 8.0) as f32).collect();
        for w in [magnitude_window(n, 0.5), outlier_window(n, 0.3, 0.05), (17, 18)] {
            let got = windows_of(&v, w, 2);
            assert_eq!(got, reference(&v, w), "window {w:?}");
            assert!(got.iter().zip(&v).filter(|(g, x)| g == x && **x != 0.0).count() <= w.1 - w.0);
        }
        assert_eq!(windows_of(&v, magnitude_window(n, 0.5), 1), windows_of(&v, magnitude_window(n, 0.5), 2));
        // Mostly grid values with a few off-grid ones (as differences of bf16 values are): the short lists of keys
        // with nonzero low bits settle the order inside buckets.
        let v: Vec<f32> = v.iter().enumerate().map(|(i, &x)| if i % 997 == 0 { x * 1.0001 } else { x }).collect();
        for w in [magnitude_window(n, 0.5), outlier_window(n, 0.3, 0.05)] {
            assert_eq!(windows_of(&v, w, 2), reference(&v, w), "window {w:?}");
        }
        // Continuous values: the boundary buckets hold several keys, so the low-bit pass decides.
        let v: Vec<f32> = (0..n).map(|_| r.normal() as f32).collect();
        for w in [magnitude_window(n, 0.3), outlier_window(n, 0.5, 0.01)] {
            assert_eq!(windows_of(&v, w, 2), reference(&v, w), "window {w:?}");
        }
    }

    #[test]
    fn small_windows_and_edges() {
        let v = [0.5f32, -3.0, 2.0, -0.1, 2.0, 0.0];
        // Top 2 magnitudes: -3 and one of the two 2.0 (the later one ranks higher).
        assert_eq!(windows_of(&v, magnitude_window(6, 0.34), 1), vec![0.0, -3.0, 0.0, 0.0, 2.0, 0.0]);
        // density 0.01 still keeps one element (mergekit's max(1, k)).
        assert_eq!(windows_of(&v, magnitude_window(6, 0.01), 1), vec![0.0, -3.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(windows_of(&v, magnitude_window(6, 1.0), 1), v.to_vec());
        assert_eq!(windows_of(&v, magnitude_window(6, 0.0), 1), vec![0.0; 6]);
        // Breadcrumbs n=6, density 0.5, gamma 0.2: target 3, top 1, bottom 2: ranks 2..5 -> 0.5, 2.0, 2.0 (-3 dropped).
        assert_eq!(outlier_window(6, 0.5, 0.2), (2, 5));
        assert_eq!(windows_of(&v, (2, 5), 1), vec![0.5, 0.0, 2.0, 0.0, 2.0, 0.0]);
    }

    #[test]
    fn bernoulli_is_chunking_independent_and_has_the_right_rate() {
        let n = 3 * RNG_BLOCK + 123;
        let whole = {
            let mut d = vec![1f32; n];
            bernoulli(Streams { seed: 9, tensor: "w", input: 1 }, 0.3, 0..n, &mut d);
            d
        };
        let mut parts = Vec::new();
        for r in [0..1000, 1000..RNG_BLOCK + 7, RNG_BLOCK + 7..n] {
            let mut d = vec![1f32; r.len()];
            bernoulli(Streams { seed: 9, tensor: "w", input: 1 }, 0.3, r, &mut d);
            parts.extend(d);
        }
        assert_eq!(whole, parts);
        let kept = whole.iter().filter(|&&x| x != 0.0).count() as f64 / n as f64;
        // Binomial standard error at p = 0.3, n ~ 200k: 0.001; allow 5.
        assert!((kept - 0.3).abs() < 0.005, "{kept}");
    }

    #[test]
    fn della_probabilities_follow_ranks() {
        // One row of 5 distinct magnitudes: probabilities density - eps + 2 eps * rank / 4. With many seeds, the keep
        // frequency of the largest entry approaches density + eps, of the smallest density - eps.
        let row = [0.1f32, -5.0, 0.3, 2.0, -0.2];
        let (density, eps) = (0.5, 0.2);
        let mut kept = [0usize; 5];
        let trials = 20000;
        for s in 0..trials {
            let mut d = row.to_vec();
            della_mask(Streams { seed: s, tensor: "t", input: 0 }, density, eps, Lines::of_shape(&[1, 5]), 0, &mut d);
            for (k, x) in kept.iter_mut().zip(&d) {
                *k += (*x != 0.0) as usize;
            }
        }
        // ranks: 0.1 -> 0, -5 -> 4, 0.3 -> 2, 2 -> 3, -0.2 -> 1
        let want = [0.3, 0.7, 0.5, 0.6, 0.4];
        for (k, w) in kept.iter().zip(want) {
            let f = *k as f64 / trials as f64;
            assert!((f - w).abs() < 0.02, "{kept:?}");
        }
    }
}
