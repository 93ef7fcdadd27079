//! A low-rank update of a stored 2-D weight, applied as the weight is read: `W + scale * B @ A` (a LoRA adapter's
//! `B`, rows x rank, and `A`, rank x cols). A checkpoint holding updates (`Checkpoint::set_update`) hands out views
//! that read the updated values (`TensorView::update`), so every reader of the checkpoint streams them element range
//! by element range, with no updated copy of the weight in memory or on disk.
//!
//! Each element is exactly what baking the update in beforehand stores: the product summed over the rank in f64 (in
//! rank order, from zero), added to `W` widened to f64, rounded once to f32, then to `W`'s dtype (nearest even), and
//! read back as f32 (`TensorView::read_f32_range`). Any element range gives the same values as the whole tensor.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// `scale * B @ A` for one weight of shape `[rows, cols]`.
pub struct LowRankUpdate {
    rows: usize,
    cols: usize,
    rank: usize,
    /// rank x cols, row-major.
    a: Vec<f32>,
    /// rows x rank, row-major.
    b: Vec<f32>,
    scale: f64,
    /// Where the update comes from (the adapter file), for messages.
    origin: PathBuf,
}

impl fmt::Debug for LowRankUpdate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LowRankUpdate")
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .field("rank", &self.rank)
            .field("scale", &self.scale)
            .field("origin", &self.origin)
            .finish()
    }
}

impl LowRankUpdate {
    /// The update of a `[rows, cols]` weight by `scale * B @ A`; None when `a` is not `rank x cols` or `b` not
    /// `rows x rank` for one rank.
    pub fn new(rows: usize, cols: usize, a: Vec<f32>, b: Vec<f32>, scale: f64, origin: &Path) -> Option<Self> {
        let rank = b.len().checked_div(rows).or_else(|| a.len().checked_div(cols))?;
        (a.len() == rank * cols && b.len() == rows * rank).then(|| LowRankUpdate {
            rows,
            cols,
            rank,
            a,
            b,
            scale,
            origin: origin.to_path_buf(),
        })
    }

    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// Adds the update to elements `range` (row-major) of the weight: `values` holds `W`'s elements of `range`
    /// widened to f32 on entry and `W + scale * B @ A` rounded once to f32 on return.
    pub fn add_to(&self, range: Range<usize>, values: &mut [f32]) {
        debug_assert_eq!(values.len(), range.len());
        if range.is_empty() {
            return;
        }
        let cols = self.cols;
        let first_row = range.start / cols;
        let last_row = (range.end - 1) / cols;
        let mut row = vec![0f64; cols.min(range.len())];
        for i in first_row..=last_row {
            let start = range.start.max(i * cols);
            let end = range.end.min((i + 1) * cols);
            let (j0, j1) = (start - i * cols, end - i * cols);
            let acc = &mut row[..j1 - j0];
            self.row_delta(i, j0, acc);
            let out = &mut values[start - range.start..end - range.start];
            for (v, &d) in out.iter_mut().zip(acc.iter()) {
                *v = (*v as f64 + self.scale * d) as f32;
            }
        }
    }
}

/// Columns of one row's product summed in registers at a time (4 AVX registers of f64).
const TILE: usize = 16;

impl LowRankUpdate {
    /// `acc[x] = sum_k B[i, k] * A[k, j0 + x]`, in f64, summed from zero in rank order.
    fn row_delta(&self, i: usize, j0: usize, acc: &mut [f64]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked above). No FMA is enabled: each product is rounded before it is
            // added, as everywhere else.
            return unsafe { self.row_delta_avx2(i, j0, acc) };
        }
        self.row_delta_portable(i, j0, acc)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn row_delta_avx2(&self, i: usize, j0: usize, acc: &mut [f64]) {
        self.row_delta_portable(i, j0, acc)
    }

    /// The sum a tile of columns at a time, so that the running sums stay in registers across the rank.
    #[inline(always)]
    fn row_delta_portable(&self, i: usize, j0: usize, acc: &mut [f64]) {
        let (cols, rank) = (self.cols, self.rank);
        let b = &self.b[i * rank..(i + 1) * rank];
        let mut tiles = acc.chunks_exact_mut(TILE);
        let mut j = j0;
        for tile in &mut tiles {
            let mut sums = [0f64; TILE];
            for (k, &bk) in b.iter().enumerate() {
                let bk = bk as f64;
                let a: &[f32; TILE] = self.a[k * cols + j..k * cols + j + TILE].try_into().expect("a whole tile");
                for (x, &akj) in sums.iter_mut().zip(a) {
                    *x += bk * akj as f64;
                }
            }
            tile.copy_from_slice(&sums);
            j += TILE;
        }
        let rest = tiles.into_remainder();
        rest.fill(0.0);
        let width = rest.len();
        for (k, &bk) in b.iter().enumerate() {
            let bk = bk as f64;
            for (x, &akj) in rest.iter_mut().zip(&self.a[k * cols + j..k * cols + j + width]) {
                *x += bk * akj as f64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// W + s * B @ A computed whole, one element at a time, as the definition says.
    fn reference(w: &[f32], u: &LowRankUpdate) -> Vec<f32> {
        (0..w.len())
            .map(|e| {
                let (i, j) = (e / u.cols, e % u.cols);
                let mut d = 0f64;
                for k in 0..u.rank {
                    d += u.b[i * u.rank + k] as f64 * u.a[k * u.cols + j] as f64;
                }
                (w[e] as f64 + u.scale * d) as f32
            })
            .collect()
    }

    fn values(seed: u32, n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 2001) as f32 * 1e-3 - 1.0).collect()
    }

    #[test]
    fn any_range_adds_what_the_whole_tensor_does() {
        let (rows, cols, rank) = (7, 13, 3);
        let u = LowRankUpdate::new(rows, cols, values(1, rank * cols), values(2, rows * rank), 0.37, Path::new("a"))
            .unwrap();
        let w = values(3, rows * cols);
        let want = reference(&w, &u);
        for range in [0..rows * cols, 0..1, 5..6, 12..14, 3..40, 13..26, 50..91, 90..91] {
            let mut v = w[range.clone()].to_vec();
            u.add_to(range.clone(), &mut v);
            let same = v.iter().zip(&want[range.clone()]).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{range:?}");
        }
    }

    #[test]
    fn wide_rows_add_what_the_definition_does_in_tiles_and_their_tails() {
        let (rows, cols, rank) = (5, 3 * TILE + 5, 16);
        let u = LowRankUpdate::new(rows, cols, values(4, rank * cols), values(5, rows * rank), 2.0, Path::new("a"))
            .unwrap();
        let w = values(6, rows * cols);
        let want = reference(&w, &u);
        for range in [0..rows * cols, 1..cols - 1, TILE + 3..2 * cols + 7, cols * 4 + 2..rows * cols] {
            let mut v = w[range.clone()].to_vec();
            u.add_to(range.clone(), &mut v);
            let same = v.iter().zip(&want[range.clone()]).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{range:?}");
        }
    }

    #[test]
    fn factors_must_fit_the_weight() {
        let p = Path::new("a");
        assert!(LowRankUpdate::new(4, 5, vec![0.0; 10], vec![0.0; 8], 1.0, p).is_some());
        assert!(LowRankUpdate::new(4, 5, vec![0.0; 10], vec![0.0; 12], 1.0, p).is_none());
        assert!(LowRankUpdate::new(4, 5, vec![0.0; 9], vec![0.0; 8], 1.0, p).is_none());
    }
}
