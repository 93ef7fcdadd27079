//! Applying permutations to tensors: index maps per axis, gathers over any number of axes, and the streamed write of
//! a permuted checkpoint.
//!
//! A group's permutation `p` is a gather: unit `i` of the permuted tensor is unit `p[i]` of the original, on every
//! axis the group acts on. An axis carrying a group in blocks of `b` maps element `i` to `p[i / b] * b + i % b`.
//! Permuting moves values without arithmetic, so small tensors are gathered as raw bytes (any dtype, bit-exact) and
//! large float tensors in executor chunks (widening and narrowing a stored value is exact, so also bit-exact).

use std::ops::Range;

use super::spec::{Permuted, Resolved};
use crate::checkpoint::{Checkpoint, CheckpointWriter, TensorView, Written};
use crate::error::Result;
use crate::exec::{Executor, Produce, Read, CHUNK_ELEMS};
use crate::rng::Rng;

/// One permutation per group of a resolved spec (a gather: position `i` takes unit `perms[g][i]`).
pub type Perms = Vec<Vec<usize>>;

pub fn identity(spec: &Resolved) -> Perms {
    spec.groups.iter().map(|g| (0..g.size).collect()).collect()
}

/// Uniformly random permutations, one stream per group name, so a group's permutation does not depend on the others.
pub fn random(spec: &Resolved, seed: u64) -> Perms {
    spec.groups.iter().map(|g| Rng::for_label(seed, &format!("align/random/{}", g.name)).permutation(g.size)).collect()
}

pub fn is_identity(p: &[usize]) -> bool {
    p.iter().enumerate().all(|(i, &j)| i == j)
}

/// The gather equal to applying `first` and then `then`: `then(first(x))[i] = x[first[then[i]]]`.
pub fn compose(first: &Perms, then: &Perms) -> Perms {
    first.iter().zip(then).map(|(f, t)| t.iter().map(|&j| f[j]).collect()).collect()
}

pub fn inverse(perms: &Perms) -> Perms {
    perms
        .iter()
        .map(|p| {
            let mut inv = vec![0; p.len()];
            for (i, &j) in p.iter().enumerate() {
                inv[j] = i;
            }
            inv
        })
        .collect()
}

/// The element-level index map of an axis whose units (blocks of `block` elements) are permuted by `p`.
pub fn element_map(p: &[usize], block: usize) -> Vec<usize> {
    let mut m = Vec::with_capacity(p.len() * block);
    for &u in p {
        m.extend(u * block..(u + 1) * block);
    }
    m
}

/// The per-axis index maps of a permuted tensor under `perms` (`None` for axes left in place). `skip` leaves one
/// axis unmapped, as the cost of a group needs.
pub fn axis_maps(t: &Permuted, perms: &Perms, skip: Option<usize>) -> Vec<Option<Vec<usize>>> {
    t.axes
        .iter()
        .enumerate()
        .map(|(k, a)| match a {
            Some(a) if Some(k) != skip && !is_identity(&perms[a.group]) => Some(element_map(&perms[a.group], a.block)),
            _ => None,
        })
        .collect()
}

/// Row-major strides (in elements) of `shape`.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for k in (0..shape.len().saturating_sub(1)).rev() {
        s[k] = s[k + 1] * shape[k + 1];
    }
    s
}

/// A gather over a whole tensor: output element at multi-index `(i_0, ..)` reads input `(map_0(i_0), ..)`.
pub struct Gather {
    shape: Vec<usize>,
    strides: Vec<usize>,
    maps: Vec<Option<Vec<usize>>>,
    /// Elements after the last mapped axis: output runs of this length are contiguous in the input.
    run: usize,
    /// Axes up to and including the last mapped one.
    lead: usize,
}

impl Gather {
    pub fn new(shape: &[usize], maps: Vec<Option<Vec<usize>>>) -> Gather {
        let lead = maps.iter().rposition(|m| m.is_some()).map_or(0, |k| k + 1);
        let run = shape[lead..].iter().product();
        Gather { shape: shape.to_vec(), strides: strides(shape), maps, run, lead }
    }

    pub fn is_identity(&self) -> bool {
        self.lead == 0
    }

    /// Source offset of the first element of output row `row` (a row is one index over the leading axes).
    fn row_source(&self, mut row: usize) -> usize {
        let mut src = 0;
        for k in (0..self.lead).rev() {
            let i = row % self.shape[k];
            row /= self.shape[k];
            src += self.strides[k] * self.maps[k].as_ref().map_or(i, |m| m[i]);
        }
        src
    }

    /// Calls `f(source_start, len)` for the contiguous source pieces of output elements `range`, in output order.
    pub fn segments(&self, range: Range<usize>, mut f: impl FnMut(usize, usize) -> Result<()>) -> Result<()> {
        let mut pos = range.start;
        while pos < range.end {
            let (row, off) = (pos / self.run, pos % self.run);
            let len = (self.run - off).min(range.end - pos);
            f(self.row_source(row) + off, len)?;
            pos += len;
        }
        Ok(())
    }

    /// The gathered tensor as raw bytes, `elem` bytes per element.
    pub fn bytes(&self, src: &[u8], elem: usize) -> Vec<u8> {
        let numel = src.len() / elem;
        let mut out = Vec::with_capacity(src.len());
        let _ = self.segments(0..numel, |s, len| {
            out.extend_from_slice(&src[s * elem..(s + len) * elem]);
            Ok(())
        });
        out
    }

    /// Output elements `range` widened to f32.
    pub fn f32_range(&self, view: &TensorView, range: Range<usize>) -> Result<Vec<f32>> {
        let mut out = vec![0f32; range.len()];
        let last = self.shape.len().wrapping_sub(1);
        if let Some(Some(map)) = self.maps.get(last).filter(|_| self.run == 1) {
            // The last axis is permuted, so contiguous pieces are single elements: widen each source row once
            // and gather from it instead.
            let width = self.shape[last];
            let mut row = vec![0f32; width];
            let mut pos = range.start;
            while pos < range.end {
                let (r, off) = (pos / width, pos % width);
                let len = (width - off).min(range.end - pos);
                let base = self.row_source(r * width) - self.strides[last] * map[0];
                view.read_f32_range(base..base + width, &mut row)?;
                let dst = &mut out[pos - range.start..pos - range.start + len];
                for (d, &m) in dst.iter_mut().zip(&map[off..off + len]) {
                    *d = row[m];
                }
                pos += len;
            }
            return Ok(out);
        }
        let mut k = 0;
        self.segments(range, |s, len| {
            view.read_f32_range(s..s + len, &mut out[k..k + len])?;
            k += len;
            Ok(())
        })?;
        Ok(out)
    }
}

/// Writes `model` with `perms` applied to every tensor of `spec`, streaming through the executor; tensors the spec
/// does not permute (or permutes by identities) are inputs written as they are; every input's pages are released once
/// its tensor is written.
pub fn write_permuted(
    model: &Checkpoint,
    spec: &Resolved,
    perms: &Perms,
    writer: CheckpointWriter,
    exec: &Executor,
    label: &str,
) -> Result<Written> {
    exec.write(writer, label, |_, decl| {
        let read = Read::new(model, &decl.name)?;
        let view = read.tensor;
        let Some(t) = spec.get(&decl.name) else { return Ok(Produce::Input(read)) };
        let gather = Gather::new(&t.shape, axis_maps(t, perms, None));
        if gather.is_identity() {
            return Ok(Produce::Input(read));
        }
        if view.numel() <= CHUNK_ELEMS || !view.is_float() {
            let bytes = gather.bytes(view.data, view.dtype.size());
            read.release();
            return Ok(Produce::Owned(bytes));
        }
        Ok(Produce::elementwise(vec![read], move |r| gather.f32_range(&view, r)))
    })
}

/// Declarations for a checkpoint with the same tensors as `ck`, in its storage order.
pub fn same_decls(ck: &Checkpoint) -> Vec<crate::checkpoint::TensorDecl> {
    ck.infos().iter().map(|t| crate::checkpoint::TensorDecl::new(t.name.clone(), t.dtype, t.shape.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain reference: gather by decoding every output multi-index.
    fn naive(shape: &[usize], maps: &[Option<Vec<usize>>], src: &[u32]) -> Vec<u32> {
        let st = strides(shape);
        (0..src.len())
            .map(|mut flat| {
                let mut off = 0;
                for k in (0..shape.len()).rev() {
                    let i = flat % shape[k];
                    flat /= shape[k];
                    off += st[k] * maps[k].as_ref().map_or(i, |m| m[i]);
                }
                src[off]
            })
            .collect()
    }

    #[test]
    fn gathers_match_a_plain_reference() {
        let mut rng = Rng::new(5);
        for shape in [vec![6, 4], vec![4, 6], vec![3, 4, 2, 2], vec![8], vec![2, 3, 4]] {
            for mask in 0..(1u32 << shape.len()) {
                let maps: Vec<Option<Vec<usize>>> =
                    shape.iter().enumerate().map(|(k, &d)| (mask >> k & 1 == 1).then(|| rng.permutation(d))).collect();
                let n: usize = shape.iter().product();
                let src: Vec<u32> = (0..n as u32).map(|v| v * 7 + 1).collect();
                let bytes: Vec<u8> = src.iter().flat_map(|v| v.to_le_bytes()).collect();
                let g = Gather::new(&shape, maps.clone());
                let got: Vec<u32> =
                    g.bytes(&bytes, 4).chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
                assert_eq!(got, naive(&shape, &maps, &src), "shape {shape:?} mask {mask}");
                // Any output range gives the same pieces as the whole.
                let mut pieces = Vec::new();
                g.segments(1..n - 1, |s, len| {
                    pieces.extend_from_slice(&src[s..s + len]);
                    Ok(())
                })
                .unwrap();
                assert_eq!(pieces, got[1..n - 1]);
                // The f32 path (row-wise when the last axis is permuted) gives the same values for any range.
                let fbytes: Vec<u8> = src.iter().flat_map(|&v| (v as f32).to_le_bytes()).collect();
                let view = TensorView {
                    name: "t",
                    dtype: crate::checkpoint::Dtype::F32,
                    shape: &shape,
                    data: &fbytes,
                    file: std::path::Path::new("t"),
                    update: None,
                };
                for r in [0..n, 1..n - 1, n / 3..n / 2 + 1] {
                    let want: Vec<f32> = got[r.clone()].iter().map(|&v| v as f32).collect();
                    assert_eq!(g.f32_range(&view, r).unwrap(), want, "shape {shape:?} mask {mask}");
                }
            }
        }
    }

    #[test]
    fn block_maps_compose_and_invert() {
        assert_eq!(element_map(&[2, 0, 1], 2), vec![4, 5, 0, 1, 2, 3]);
        let a: Perms = vec![vec![2, 0, 1], vec![1, 0]];
        let b: Perms = vec![vec![1, 2, 0], vec![1, 0]];
        let c = compose(&a, &b);
        // Applying a then b to x = [x0, x1, x2]: a gives [x2, x0, x1]; b gives [x0, x1, x2].
        assert_eq!(c[0], vec![0, 1, 2]);
        assert_eq!(compose(&a, &inverse(&a)), vec![vec![0, 1, 2], vec![0, 1]]);
    }
}
