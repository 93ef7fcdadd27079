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
    /// The series length (no rank reaches it).
    n: usize,
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
        // Whether a boundary key's entries in a block are all kept or all dropped whatever their number: the ranks
        // they can take there, from `first` to the smaller of `first + block length` and `limit` (no entry of the key
        // ranks at `limit` or above), lie all inside or all outside [lo, hi). That holds for every block but the few
        // around each boundary's crossing, and there the block needs one pass, counting and masking at once.
        let decided = |first: usize, len: usize, limit: usize| -> Option<bool> {
            let last = (first + len).min(limit);
            if first >= lo && last <= hi {
                Some(true)
            } else if last <= lo || first >= hi {
                Some(false)
            } else {
                None
            }
        };
        // Entries of the upper key rank below n; those of a smaller lower key below the upper key's first rank.
        let limit_l = if lk < uk { upper.less } else { self.n };
        for block in d.chunks_mut(4096) {
            let len = block.len();
            let kl = decided(lower.less + seen_lo, len, limit_l);
            let ku = decided(upper.less + seen_hi, len, self.n);
            if let (Some(kl), Some(ku)) = (kl, ku) {
                let (mut count_l, mut count_u) = (0u32, 0u32);
                for x in block.iter_mut() {
                    let k = key(*x);
                    let (eq_l, eq_u) = (k == lk, k == uk);
                    let keep = ((k > lk) & (k < uk)) | (eq_l & kl) | (eq_u & ku);
                    count_l += eq_l as u32;
                    count_u += eq_u as u32;
                    *x = if keep { *x } else { 0.0 };
                }
                seen_lo += count_l as usize;
                seen_hi += count_u as usize;
                continue;
            }
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
            (Some(upper), Some(lower)) => RankWindow { lo, hi, n, window: Window::Bounded { lower, upper } },
            _ => simple(lo, hi, n),
        })
        .collect())
}

fn simple(lo: usize, hi: usize, n: usize) -> RankWindow {
    let window = if hi <= lo { Window::Nothing } else { Window::All };
    debug_assert!(hi <= lo || (lo == 0 && hi >= n));
    RankWindow { lo, hi: hi.min(n), n, window }
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
    debug_assert_eq!(range.len(), d.len());
    Draws::at(streams, density, range.start).apply(d);
}

/// A walk through DARE's random streams from one element on: consecutive calls continue the stream where the
/// previous one stopped. (Starting a stream afresh for each cache block of a chunk meant discarding the draws before
/// the block: 2.5 draws per element where one is needed, and DARE merges spent 70% of their time drawing.)
pub struct Draws<'a> {
    streams: Streams<'a>,
    density: f64,
    /// The element the next draw is for.
    next: usize,
    /// Where the current stream's block ends.
    block_end: usize,
    rng: Rng,
}

impl<'a> Draws<'a> {
    /// The walk positioned at element `start`.
    pub fn at(streams: Streams<'a>, density: f64, start: usize) -> Draws<'a> {
        let block = start / RNG_BLOCK;
        let mut rng = streams.block(block);
        for _ in block * RNG_BLOCK..start {
            rng.next_u64();
        }
        Draws { streams, density, next: start, block_end: (block + 1) * RNG_BLOCK, rng }
    }

    /// The element the next draw is for.
    pub fn position(&self) -> usize {
        self.next
    }

    /// Calls `f(i, keep)` for the next `len` elements in order (`i` counting from 0), advancing the walk.
    #[inline(always)]
    fn each(&mut self, len: usize, mut f: impl FnMut(usize, bool)) {
        let mut i = 0;
        while i < len {
            if self.next == self.block_end {
                self.rng = self.streams.block(self.next / RNG_BLOCK);
                self.block_end = self.next + RNG_BLOCK;
            }
            let take = (self.block_end - self.next).min(len - i);
            for k in i..i + take {
                // Dropped where the draw is >= density (so a NaN density keeps everything, as before).
                let dropped = self.rng.next_f64() >= self.density;
                f(k, !dropped);
            }
            i += take;
            self.next += take;
        }
    }

    /// Zeroes the entries of `d` (the next `d.len()` elements) not drawn; nothing is drawn when `density >= 1`.
    pub fn apply(&mut self, d: &mut [f32]) {
        if self.density >= 1.0 {
            return;
        }
        // Branch-free: a 50% keep rate defeats branch prediction. A dropped entry becomes +0.0, as before.
        self.each(d.len(), |i, keep| d[i] = f32::from_bits(d[i].to_bits() & (keep as u32).wrapping_neg()));
    }

    /// The keep decisions of the next `len` elements as bits (element `i` at bit `i % 64` of word `i / 64`).
    pub fn keep_bits(&mut self, len: usize) -> Vec<u64> {
        let mut bits = vec![0u64; len.div_ceil(64)];
        if self.density >= 1.0 {
            bits.iter_mut().for_each(|w| *w = !0);
            return bits;
        }
        // The word is built in a register and stored once full (or-ing each bit into memory made every draw wait
        // for the previous one's store).
        let mut word = 0u64;
        self.each(len, |i, keep| {
            word |= (keep as u64) << (i % 64);
            if i % 64 == 63 || i + 1 == len {
                bits[i / 64] = word;
                word = 0;
            }
        });
        bits
    }
}

/// `BYTE_MASKS[b][i]`: all ones where bit `i` of `b` is set, else zero. Masking through a table keeps the loops
/// free of branches (the compiler turns a computed `0 - bit` mask back into a branch, which a 50% keep rate
/// mispredicts half the time) and lets them vectorise.
static BYTE_MASKS: [[u32; 8]; 256] = {
    let mut t = [[0u32; 8]; 256];
    let mut b = 0;
    while b < 256 {
        let mut i = 0;
        while i < 8 {
            if (b >> i) & 1 == 1 {
                t[b][i] = u32::MAX;
            }
            i += 1;
        }
        b += 1;
    }
    t
};

/// The 8 keep bits of elements `e..e + 8` (`e` a multiple of 8).
#[inline(always)]
fn keep_byte(bits: &[u64], e: usize) -> usize {
    ((bits[e / 64] >> (e % 64)) & 0xff) as usize
}

/// Zeroes the entries of `d` whose keep bit is clear, `d` being elements `start..` of the bits' numbering (a dropped
/// entry becomes +0.0).
pub fn apply_bits(bits: &[u64], start: usize, d: &mut [f32]) {
    let d: &mut [u32] = bytemuck::cast_slice_mut(d);
    let one = |e: usize| BYTE_MASKS[((bits[e / 64] >> (e % 64)) & 1) as usize][0];
    let head = ((8 - start % 8) % 8).min(d.len());
    let (first, rest) = d.split_at_mut(head);
    first.iter_mut().enumerate().for_each(|(i, x)| *x &= one(start + i));
    let mut e = start + head;
    let mut octets = rest.chunks_exact_mut(8);
    for o in &mut octets {
        o.iter_mut().zip(&BYTE_MASKS[keep_byte(bits, e)]).for_each(|(x, m)| *x &= m);
        e += 8;
    }
    octets.into_remainder().iter_mut().enumerate().for_each(|(i, x)| *x &= one(e + i));
}

/// The L1 norms (f64 sums of magnitudes, in element order) of `d` and of `d` masked by `bits` (from element 0), in
/// one pass: two independent chains of additions instead of two passes each waiting on its own chain. Masked
/// entries add +0.0, as the zeros of the masked vector do, so both sums are those of the separate passes.
pub fn l1_and_masked_l1(d: &[f32], bits: &[u64]) -> (f64, f64) {
    let (mut all, mut kept) = (0f64, 0f64);
    let mut add = |x: f32, mask: u32| {
        all += x.abs() as f64;
        kept += f32::from_bits(x.abs().to_bits() & mask) as f64;
    };
    let mut octets = d.chunks_exact(8);
    let mut e = 0;
    for o in &mut octets {
        o.iter().zip(&BYTE_MASKS[keep_byte(bits, e)]).for_each(|(&x, &m)| add(x, m));
        e += 8;
    }
    for (i, &x) in octets.remainder().iter().enumerate() {
        add(x, BYTE_MASKS[((bits[(e + i) / 64] >> ((e + i) % 64)) & 1) as usize][0]);
    }
    (all, kept)
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
    // Each entry's magnitude key above its index, read once: sorting these plain integers gives the (key, index)
    // order without re-reading the strided column for every comparison (that was most of a della merge).
    let mut order: Vec<u64> = Vec::with_capacity(lines.len);
    let mut rank = vec![0usize; lines.len];
    let mut prob = vec![0f64; bs];
    for (b, block) in d.chunks_mut(bs).enumerate() {
        for j in 0..lines.inner {
            order.clear();
            order.extend((0..lines.len).map(|i| (u64::from(key(block[i * lines.inner + j])) << 32) | i as u64));
            order.sort_unstable();
            for (r, &ki) in order.iter().enumerate() {
                rank[(ki & u64::from(u32::MAX)) as usize] = r;
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
    fn walks_and_kept_bits_draw_what_fresh_streams_draw() {
        // Reference: the stream of each block started afresh and advanced to the element, one element at a time.
        let streams = Streams { seed: 4, tensor: "t", input: 2 };
        let (start, n, density) = (RNG_BLOCK - 5000, 2 * RNG_BLOCK + 999, 0.4);
        let reference: Vec<f32> = (start..start + n)
            .map(|e| {
                let mut rng = streams.block(e / RNG_BLOCK);
                (0..e % RNG_BLOCK).for_each(|_| {
                    rng.next_u64();
                });
                if rng.next_f64() >= density {
                    0.0
                } else {
                    -1.5
                }
            })
            .collect();
        // A walk over uneven consecutive pieces, as a kernel's cache blocks take it.
        let mut walk = Draws::at(streams, density, start);
        let mut walked = vec![-1.5f32; n];
        for piece in walked.chunks_mut(16_000) {
            walk.apply(piece);
        }
        assert_eq!(walk.position(), start + n);
        assert_eq!(walked, reference);
        // Kept bits, applied from offsets on and off the 8-element grid, short and long.
        let bits = Draws::at(streams, density, start).keep_bits(n);
        for (from, len) in [(70, n - 70), (64, 1000), (3, 4), (0, n)] {
            let mut masked = vec![-1.5f32; len];
            apply_bits(&bits, from, &mut masked);
            assert_eq!(masked, reference[from..from + len], "from {from} len {len}");
            assert!(masked.iter().all(|x| x.to_bits() == 0 || *x == -1.5), "dropped entries are +0.0");
        }
        // The fused norms equal the two plain sums.
        let d: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 3.25).collect();
        let mut masked = d.clone();
        apply_bits(&bits, 0, &mut masked);
        let l1 = |v: &[f32]| -> f64 { v.iter().map(|&x| x.abs() as f64).sum() };
        assert_eq!(l1_and_masked_l1(&d, &bits), (l1(&d), l1(&masked)));
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
