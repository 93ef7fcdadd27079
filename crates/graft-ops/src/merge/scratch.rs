//! Per-thread scratch memory of the merge kernels: chunk-sized f32 buffers reused from a pool (`Buf`), and the
//! cache-sized blocks (`BLOCK`, `blocks`, `blocked`, `blocked_pieces`) that elementwise kernels and rank passes walk a
//! chunk in.
//!
//! This file depends on nothing else in `merge`, so the method interface, the masks and the methods can all use it
//! without importing one another.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut, Range};

use crate::error::Result;

thread_local! {
    static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// Buffers kept per thread for reuse.
const POOL_BUFFERS: usize = 8;

/// A chunk-sized f32 scratch buffer from a per-thread pool; dropping it hands the memory back. Streaming a model
/// touches millions of chunk buffers: fresh allocations would each be mapped, zeroed and page-faulted in by the
/// kernel, which costs more than the merging itself.
pub struct Buf(Vec<f32>);

impl Buf {
    /// `n` zeros.
    pub fn zeroed(n: usize) -> Buf {
        let mut b = Buf::scratch(n);
        b.fill(0.0);
        b
    }

    /// `n` values left over from earlier use, for callers that overwrite them all (saves the zeroing).
    pub fn scratch(n: usize) -> Buf {
        let mut v = POOL.with(|p| p.borrow_mut().pop()).unwrap_or_default();
        if v.len() >= n {
            v.truncate(n);
        } else {
            v.resize(n, 0.0);
        }
        Buf(v)
    }

    /// A copy of `s`.
    pub fn from_slice(s: &[f32]) -> Buf {
        let mut b = Buf::scratch(s.len());
        b.copy_from_slice(s);
        b
    }

    /// The values as a plain vector (leaving the pool).
    pub fn into_vec(mut self) -> Vec<f32> {
        std::mem::take(&mut self.0)
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if self.0.capacity() > 0 {
            let v = std::mem::take(&mut self.0);
            POOL.with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < POOL_BUFFERS {
                    p.push(v);
                }
            });
        }
    }
}

impl Deref for Buf {
    type Target = Vec<f32>;
    fn deref(&self) -> &Vec<f32> {
        &self.0
    }
}

impl<'a> IntoIterator for &'a Buf {
    type Item = &'a f32;
    type IntoIter = std::slice::Iter<'a, f32>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut Vec<f32> {
        &mut self.0
    }
}

/// Runs `block(r, out)` over cache-sized pieces `r` of `range`, each filling its piece `out` of the result: the
/// intermediate vectors of an elementwise kernel then stay in cache instead of streaming through memory per step.
/// `out` holds leftover values, not zeros: `block` must write every element. (Zero-filling each chunk's result
/// first was a pass over memory of its own, 5% of a linear merge.)
pub fn blocked(range: Range<usize>, block: impl FnMut(Range<usize>, &mut [f32]) -> Result<()>) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(range.len());
    blocked_pieces(range, block, &mut |piece| out.extend_from_slice(piece))?;
    Ok(out)
}

/// Like `blocked`, handing each block's result to `sink` as it is done (in order) instead of collecting them: the
/// executor narrows it while it is in cache (`exec::Produce::Pieces`).
pub fn blocked_pieces(
    range: Range<usize>,
    mut block: impl FnMut(Range<usize>, &mut [f32]) -> Result<()>,
    sink: &mut dyn FnMut(&[f32]),
) -> Result<()> {
    let mut piece = Buf::scratch(BLOCK.min(range.len()));
    for b in blocks(range) {
        let dst = &mut piece[..b.len()];
        block(b, dst)?;
        sink(dst);
    }
    Ok(())
}

/// Elements per cache-sized block of a chunk (64 KiB of f32 per buffer).
pub const BLOCK: usize = 1 << 14;

/// `r` cut into `BLOCK`-sized pieces.
pub fn blocks(r: Range<usize>) -> impl Iterator<Item = Range<usize>> {
    (r.start..r.end).step_by(BLOCK).map(move |s| s..(s + BLOCK).min(r.end))
}
