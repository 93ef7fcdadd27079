//! Order statistics of f32 magnitudes without sorting: a two-pass radix select over the magnitudes' bit patterns
//! (monotone for non-negative floats), chunk by chunk. It serves every rank-based trim: the per-tensor rank windows of
//! TIES and breadcrumbs (`sparsify::rank_windows`) and the global thresholds of the TIES paper variant, whose
//! "tensor" is the whole model (`ties::paper_stats`).
//!
//! The data is a list of segments (one tensor, or every merged tensor), each cut into the executor's fixed chunks,
//! holding several series at the same positions (one per task vector). Pass one histograms the high 16 bits of each
//! series' keys; the bucket holding each wanted rank follows. Pass two counts the low 16 bits inside those buckets,
//! which settles the key at each rank. Memory stays at a few histograms whatever the data size.
//!
//! With per-chunk bookkeeping (one tensor, whose masks are applied chunk by chunk), pass one also keeps the few keys
//! whose low 16 bits are not zero: differences of bf16 values almost never have any, so those short lists settle
//! the order inside each bucket without pass two; a chunk with too many of them (f32 data) asks for pass two. It also
//! reports, per chunk, how many elements equal to each found key lie in earlier chunks, so that equal keys can be
//! ranked by position.

use std::ops::Range;

use super::scratch::{blocks, Buf};
use crate::error::Result;
use crate::exec::Executor;

/// The sort key of a magnitude: its f32 bits (monotone for non-negative values; NaN sorts above infinity).
#[inline]
pub fn key(x: f32) -> u32 {
    x.abs().to_bits()
}

/// The key at one wanted rank of a series.
#[derive(Clone, Debug)]
pub struct Located {
    /// The magnitude key sitting at the rank.
    pub key: u32,
    /// Number of elements with a smaller key.
    pub less: usize,
    /// With per-chunk bookkeeping, per chunk (segments' chunks in order): elements equal to `key` in earlier
    /// chunks. Empty otherwise.
    pub eq_before: Vec<usize>,
}

/// The series values of one piece of the data: `values(segment, range)` returns one buffer per series.
pub type Values<'a> = dyn Fn(usize, Range<usize>) -> Result<Vec<Buf>> + Sync + 'a;

/// (low 16 bits, count) pairs, ascending.
type Counts = Vec<(u16, usize)>;

/// Pass one over one chunk of one series.
struct HighPass {
    /// The high-bits histogram's non-empty buckets, ascending: (bucket, count). Kept per chunk until the tensor's
    /// ranks are found, so sparse: task vectors fill a few thousand of the 65,536 buckets, and a dense copy per chunk
    /// held 256 KiB each (32 MB for a 64-chunk embedding and two task vectors).
    hist: Vec<(u16, u32)>,
    /// Keys with nonzero low 16 bits (up to a cap; per-chunk bookkeeping only).
    odd: Vec<u32>,
    overflow: bool,
}

/// Finds, for each series `j`, the keys at the ascending ranks `wanted[j]` (0-based; an empty list skips the
/// series) over all `segments` (lengths). `per_chunk` asks for `Located::eq_before`. Two chunked passes over the
/// data at most, however many series.
pub fn locate(
    exec: &Executor,
    segments: &[usize],
    wanted: &[Vec<usize>],
    per_chunk: bool,
    values: &Values,
) -> Result<Vec<Vec<Located>>> {
    let s = wanted.len();
    let active: Vec<bool> = wanted.iter().map(|w| !w.is_empty()).collect();
    // Pass one, per chunk and series: histogram of the high 16 bits (plus the odd keys, see the module comment).
    let mut hist = vec![vec![0u64; 1 << 16]; s];
    // Without per-chunk bookkeeping there are no odd-key lists, so every series takes pass two.
    let mut overflow = vec![!per_chunk; s];
    let mut kept: Vec<Vec<Option<HighPass>>> = Vec::new();
    for (segment, &n) in segments.iter().enumerate() {
        let parts = exec.chunked(n, |r| {
            let cap = if per_chunk { r.len() / 64 + 16 } else { 0 };
            let mut h: Vec<Option<HighPass>> = (0..s)
                .map(|j| active[j].then(|| HighPass { hist: Vec::new(), odd: Vec::new(), overflow: false }))
                .collect();
            let mut spread: Vec<Vec<u32>> =
                (0..s).map(|j| vec![0u32; if active[j] { SPREAD << 16 } else { 0 }]).collect();
            // Cache-sized blocks: the values of a block are still in cache when they are counted.
            for b in blocks(r) {
                let vs = values(segment, b)?;
                for ((v, p), spread) in vs.iter().zip(h.iter_mut()).zip(spread.iter_mut()) {
                    let Some(p) = p else { continue };
                    count_high(v, spread, p, per_chunk.then_some(cap));
                }
            }
            for (p, spread) in h.iter_mut().zip(&spread) {
                if let Some(p) = p {
                    p.hist = fold_spread(spread);
                }
            }
            Ok(h)
        })?;
        for p in parts {
            for (j, pj) in p.iter().enumerate() {
                if let Some(pj) = pj {
                    for &(bucket, c) in &pj.hist {
                        hist[j][bucket as usize] += c as u64;
                    }
                    overflow[j] |= pj.overflow;
                }
            }
            if per_chunk {
                kept.push(p);
            }
        }
    }
    // For each series and wanted rank, the bucket holding it and how many elements lie below that bucket.
    let locate_bucket = |h: &[u64], rank: usize| -> (u32, usize) {
        let mut below = 0usize;
        for (b, &c) in h.iter().enumerate() {
            if below + c as usize > rank {
                return (b as u32, below);
            }
            below += c as usize;
        }
        unreachable!("rank {rank} beyond the histogram total {below}")
    };
    let targets: Vec<Vec<(u32, usize)>> =
        wanted.iter().zip(&hist).map(|(w, h)| w.iter().map(|&rank| locate_bucket(h, rank)).collect()).collect();
    drop(hist);
    // Pass two, for the series whose buckets pass one did not settle: the low 16 bits of every element in the
    // buckets, as (value, count) lists per chunk (per segment without per-chunk bookkeeping).
    let mut low: Vec<Vec<Vec<Counts>>> = Vec::new();
    if overflow.iter().zip(&active).any(|(&o, &a)| o && a) {
        for (segment, &n) in segments.iter().enumerate() {
            let parts = exec.chunked(n, |r| {
                let vs = values(segment, r)?;
                let mut out: Vec<Vec<Vec<u16>>> = targets.iter().map(|t| vec![Vec::new(); t.len()]).collect();
                for (j, v) in vs.iter().enumerate() {
                    if !overflow[j] || targets[j].is_empty() {
                        continue;
                    }
                    for x in v.iter().map(|&x| key(x)) {
                        let hi = x >> 16;
                        for (e, &(b, _)) in targets[j].iter().enumerate() {
                            if hi == b {
                                out[j][e].push(x as u16);
                            }
                        }
                    }
                }
                Ok(out.into_iter().map(|t| t.into_iter().map(|v| counts(v.into_iter())).collect()).collect())
            })?;
            if per_chunk {
                low.extend(parts);
            } else {
                let mut folded: Vec<Vec<Counts>> = targets.iter().map(|t| vec![Vec::new(); t.len()]).collect();
                for part in parts {
                    for (fj, pj) in folded.iter_mut().zip(part) {
                        for (f, p) in fj.iter_mut().zip(pj) {
                            f.extend(p);
                        }
                    }
                }
                low.push(folded.into_iter().map(|t| t.into_iter().map(merge_counts).collect()).collect());
            }
        }
    }
    let mut result = Vec::with_capacity(s);
    for (j, ranks) in wanted.iter().enumerate() {
        let mut found = Vec::with_capacity(ranks.len());
        for (e, (&(bucket, below), &rank)) in targets[j].iter().zip(ranks).enumerate() {
            // Per chunk (or segment): how many elements of the bucket hold each low-16-bit value.
            let per_part: Vec<Counts> = if overflow[j] {
                low.iter().map(|p| p[j][e].clone()).collect()
            } else {
                kept.iter()
                    .map(|p| {
                        let pj = p[j].as_ref().expect("pass one ran for this series");
                        let odd: Vec<u16> = pj.odd.iter().filter(|&&k| k >> 16 == bucket).map(|&k| k as u16).collect();
                        let in_bucket = pj
                            .hist
                            .binary_search_by_key(&(bucket as u16), |&(b, _)| b)
                            .map_or(0, |i| pj.hist[i].1 as usize);
                        let zeros = in_bucket - odd.len();
                        let mut c = counts(odd.into_iter());
                        if zeros > 0 {
                            c.insert(0, (0, zeros));
                        }
                        c
                    })
                    .collect()
            };
            let total = merge_counts(per_part.iter().flatten().copied().collect());
            let mut less = below;
            let mut value = 0u16;
            for &(v, c) in &total {
                if less + c > rank {
                    value = v;
                    break;
                }
                less += c;
            }
            let mut eq_before = Vec::new();
            if per_chunk {
                let mut acc = 0usize;
                for c in &per_part {
                    eq_before.push(acc);
                    acc += c.iter().filter(|(v, _)| *v == value).map(|(_, c)| c).sum::<usize>();
                }
            }
            found.push(Located { key: (bucket << 16) | value as u32, less, eq_before });
        }
        result.push(found);
    }
    Ok(result)
}

/// Interleaved copies of each chunk's high-bits histogram. Keys of bf16 task vectors crowd into a few buckets, so
/// consecutive increments of one histogram hit the same counter and each waits for the previous one's store; four
/// copies taken in turn break that chain (the increment was 60% of pass one's time, pass one 18% of a TIES merge).
const SPREAD: usize = 4;

/// Counts the high 16 bits of the keys of `v` into `spread` (`SPREAD` histograms of 2^16, element `i` into copy
/// `i % SPREAD`) and, with `odd_cap`, lists the keys whose low 16 bits are not zero in `p.odd` (up to the cap, past
/// which `p.overflow` is set), in element order.
fn count_high(v: &[f32], spread: &mut [u32], p: &mut HighPass, odd_cap: Option<usize>) {
    let (h01, h23) = spread.split_at_mut(2 << 16);
    let (h0, h1) = h01.split_at_mut(1 << 16);
    let (h2, h3) = h23.split_at_mut(1 << 16);
    // Fixed-size arrays: a 16-bit index needs no bounds check.
    fn as_array(h: &mut [u32]) -> &mut [u32; 1 << 16] {
        h.try_into().expect("2^16 buckets per copy")
    }
    let (h0, h1, h2, h3) = (as_array(h0), as_array(h1), as_array(h2), as_array(h3));
    let mut odd = |k: u32| {
        if let Some(cap) = odd_cap {
            if k & 0xffff != 0 {
                if p.odd.len() < cap {
                    p.odd.push(k);
                } else {
                    p.overflow = true;
                }
            }
        }
    };
    let mut quads = v.chunks_exact(SPREAD);
    for q in &mut quads {
        let k = [key(q[0]), key(q[1]), key(q[2]), key(q[3])];
        h0[(k[0] >> 16) as usize] += 1;
        h1[(k[1] >> 16) as usize] += 1;
        h2[(k[2] >> 16) as usize] += 1;
        h3[(k[3] >> 16) as usize] += 1;
        if (k[0] | k[1] | k[2] | k[3]) & 0xffff != 0 {
            k.into_iter().for_each(&mut odd);
        }
    }
    for &x in quads.remainder() {
        let k = key(x);
        h0[(k >> 16) as usize] += 1;
        odd(k);
    }
}

/// The non-empty buckets, ascending, of the histogram that the `SPREAD` interleaved copies in `spread` add up to.
fn fold_spread(spread: &[u32]) -> Vec<(u16, u32)> {
    let (h01, h23) = spread.split_at(2 << 16);
    let (h0, h1) = h01.split_at(1 << 16);
    let (h2, h3) = h23.split_at(1 << 16);
    let mut sparse = Vec::new();
    for (b, (((a, b1), c), d)) in h0.iter().zip(h1).zip(h2).zip(h3).enumerate() {
        let n = a + b1 + c + d;
        if n != 0 {
            sparse.push((b as u16, n));
        }
    }
    sparse
}

/// (value, count) pairs of `values`, ascending by value.
fn counts(values: impl Iterator<Item = u16>) -> Vec<(u16, usize)> {
    let mut v: Vec<u16> = values.collect();
    v.sort_unstable();
    let mut out: Vec<(u16, usize)> = Vec::new();
    for x in v {
        match out.last_mut() {
            Some((y, c)) if *y == x => *c += 1,
            _ => out.push((x, 1)),
        }
    }
    out
}

/// (value, count) pairs with equal values summed, ascending by value.
fn merge_counts(mut pairs: Vec<(u16, usize)>) -> Vec<(u16, usize)> {
    pairs.sort_unstable();
    let mut out: Vec<(u16, usize)> = Vec::with_capacity(pairs.len());
    for (v, c) in pairs {
        match out.last_mut() {
            Some((w, d)) if *w == v => *d += c,
            _ => out.push((v, c)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Plain reference: the keys sorted ascending.
    fn sorted_keys(v: &[f32]) -> Vec<u32> {
        let mut k: Vec<u32> = v.iter().map(|&x| key(x)).collect();
        k.sort_unstable();
        k
    }

    #[test]
    fn interleaved_histograms_add_up_to_the_plain_one_and_list_odd_keys_in_order() {
        // 4099 values (not a multiple of the copies), bf16-like (zero low bits) but every 10th with low bits.
        let mut r = Rng::new(3);
        let v: Vec<f32> = (0..4099)
            .map(|i| {
                let x = f32::from_bits((r.normal() as f32 * 0.01).to_bits() & 0xffff_0000);
                if i % 10 == 0 {
                    x * 1.001
                } else {
                    x
                }
            })
            .collect();
        let mut plain = vec![0u32; 1 << 16];
        let odd: Vec<u32> = v.iter().map(|&x| key(x)).filter(|k| k & 0xffff != 0).collect();
        v.iter().for_each(|&x| plain[(key(x) >> 16) as usize] += 1);
        for cap in [odd.len(), odd.len() - 1] {
            let mut spread = vec![0u32; SPREAD << 16];
            let mut p = HighPass { hist: Vec::new(), odd: Vec::new(), overflow: false };
            count_high(&v, &mut spread, &mut p, Some(cap));
            let mut folded = vec![0u32; 1 << 16];
            fold_spread(&spread).into_iter().for_each(|(b, c)| folded[b as usize] = c);
            assert_eq!(folded, plain);
            assert_eq!(p.odd, odd[..cap]);
            assert_eq!(p.overflow, cap < odd.len());
        }
    }

    #[test]
    fn finds_the_key_at_each_rank_over_segments_with_and_without_chunk_bookkeeping() {
        // Two series over three segments (one longer than a chunk): grid values (many ties, zero low bits) and
        // continuous values (nonzero low bits, so pass two decides).
        let n = crate::exec::CHUNK_ELEMS + 1000;
        let lens = [n, 777, 5000];
        let mut r = Rng::new(11);
        let grid: Vec<Vec<f32>> =
            lens.iter().map(|&l| (0..l).map(|_| ((r.normal() * 8.0).round() / 8.0) as f32).collect()).collect();
        let cont: Vec<Vec<f32>> = lens.iter().map(|&l| (0..l).map(|_| r.normal() as f32).collect()).collect();
        let total: usize = lens.iter().sum();
        let all = |s: &[Vec<f32>]| s.concat();
        let wanted = vec![vec![0, total / 3, total - 1], vec![17, total / 2]];
        let values = |seg: usize, r: Range<usize>| -> Result<Vec<Buf>> {
            Ok(vec![Buf::from_slice(&grid[seg][r.clone()]), Buf::from_slice(&cont[seg][r])])
        };
        let exec = Executor::new(Some(2)).unwrap().quiet();
        for per_chunk in [false, true] {
            let got = locate(&exec, &lens, &wanted, per_chunk, &values).unwrap();
            for (j, series) in [all(&grid), all(&cont)].iter().enumerate() {
                let keys = sorted_keys(series);
                for (l, &rank) in got[j].iter().zip(&wanted[j]) {
                    assert_eq!(l.key, keys[rank], "series {j} rank {rank} per_chunk {per_chunk}");
                    assert_eq!(l.less, keys.partition_point(|&k| k < l.key), "series {j} rank {rank}");
                    assert_eq!(l.eq_before.is_empty(), !per_chunk);
                }
            }
        }
        // A skipped series gives nothing.
        let got = locate(&exec, &lens, &[vec![], vec![3]], false, &values).unwrap();
        assert!(got[0].is_empty() && got[1].len() == 1);
    }
}
