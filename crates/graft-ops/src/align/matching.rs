//! Weight matching (Ainsworth, Hayase & Srinivasa, "Git Re-Basin", 2022): coordinate ascent over the permutation
//! groups of a spec, maximising `sum over tensors <W_ref, P(W_model)>`.
//!
//! Each pass visits the groups in a seeded random order. For a group with `n` units it builds
//! `A = sum over (tensor, axis) it acts on of  R @ M^T`, where `R` is the reference tensor with that axis moved first
//! and flattened to `n` rows (a unit of `block` elements is one row), and `M` the model tensor the same way after the
//! current permutations of all its *other* axes; it then solves the linear assignment maximising `trace(A P)`. A new
//! permutation is kept only when it beats the current one by more than 1e-12, and the search stops after a pass in
//! which no group improved, or after `max_iter` passes.
//!
//! Memory: tensors are never held whole. Each `(tensor, axis)` term is streamed from the memory maps in column
//! chunks of the flattened `n x rest` view, packed as f64 into two `n x cols` buffers and multiplied into the `n x n`
//! f64 accumulator; only the accumulator and the two buffers live between chunks. Determinism: chunk boundaries and
//! the accumulator tiles each worker multiplies depend only on the shapes, never on the thread count, so every
//! accumulator entry sums the same products in the same order with any `--threads`.

use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;
use serde::Serialize;

use super::lap;
use super::permute::{axis_maps, is_identity, strides, Gather, Perms};
use super::spec::Resolved;
use crate::checkpoint::{dtype, Checkpoint, TensorView};
use crate::error::{Error, Result};
use crate::exec::{chunk_ranges, Executor};
use crate::rng::Rng;

/// A pass counts as progress only when some group's objective grows by more than this.
pub const TOLERANCE: f64 = 1e-12;

/// f64 elements per packed operand (32 MiB): bounds memory while keeping the GEMM's inner dimension large.
const PACK_ELEMS: usize = 1 << 22;

/// Side of the square tiles of the accumulator that workers multiply independently: small enough for about 64
/// tiles per matrix (work for every thread), large enough that each tile amortises packing its operands. A
/// function of `n` only, so the sums do not depend on the thread count.
fn tile(n: usize) -> usize {
    (n / 8).clamp(64, 256)
}

#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub seed: u64,
    pub max_iter: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options { seed: 0, max_iter: 100 }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct GroupReport {
    pub name: String,
    pub size: usize,
    /// Tensors the group permutes.
    pub tensors: usize,
    /// `sum over those tensors <W_ref, P(W_model)>` with the starting and with the final permutations.
    pub objective_before: f64,
    pub objective_after: f64,
    pub identity: bool,
    /// Units that moved (`p[i] != i`).
    pub moved: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Permuted tensors whose shapes differ between reference and model (e.g. task-specific heads): left out of the
    /// objective, still permuted.
    pub incomparable: Vec<String>,
    /// Passes run.
    pub iterations: usize,
    /// Whether the last pass improved nothing (false: stopped by `max_iter`).
    pub converged: bool,
    /// `sum over permuted tensors <W_ref, P(W_model)>`, each tensor counted once.
    pub objective_before: f64,
    pub objective_after: f64,
    pub groups: Vec<GroupReport>,
}

/// Aligns `model` to `reference`: returns the permutations (gathers on the model) and the report. `init` starts
/// the search from given permutations instead of identities.
pub fn weight_matching(
    reference: &Checkpoint,
    model: &Checkpoint,
    spec: &Resolved,
    init: Option<Perms>,
    opts: Options,
    exec: &Executor,
) -> Result<(Perms, Report)> {
    let incomparable = spec.incomparable(reference)?;
    spec.check_compatible(model)?;
    let mut perms = init.unwrap_or_else(|| super::permute::identity(spec));
    let sizes_fit = perms.len() == spec.groups.len()
        && perms.iter().zip(&spec.groups).all(|(p, g)| p.len() == g.size && lap::is_permutation(p));
    if !sizes_fit {
        return Err(Error::invalid("starting permutations do not fit the spec's groups"));
    }
    let before = tensor_objectives(reference, model, spec, &perms, exec)?;
    let mut rng = Rng::for_label(opts.seed, "align/group-order");
    let mut iterations = 0;
    let mut converged = false;
    while iterations < opts.max_iter {
        iterations += 1;
        let mut progress = false;
        for g in rng.permutation(spec.groups.len()) {
            let n = spec.groups[g].size;
            let what = format!("group '{}'", spec.groups[g].name);
            let a = cost_matrix(reference, model, spec, &perms, g, exec)?;
            let candidate = lap::maximize(n, &a, &what)?;
            if lap::value(n, &a, &candidate) > lap::value(n, &a, &perms[g]) + TOLERANCE {
                perms[g] = candidate;
                progress = true;
            }
        }
        if !progress {
            converged = true;
            break;
        }
    }
    let after = tensor_objectives(reference, model, spec, &perms, exec)?;
    let groups = spec
        .groups
        .iter()
        .enumerate()
        .map(|(g, grp)| {
            let ts = spec.tensors_of(g);
            GroupReport {
                name: grp.name.clone(),
                size: grp.size,
                tensors: ts.len(),
                objective_before: ts.iter().map(|&t| before[t]).sum(),
                objective_after: ts.iter().map(|&t| after[t]).sum(),
                identity: is_identity(&perms[g]),
                moved: perms[g].iter().enumerate().filter(|(i, &j)| *i != j).count(),
            }
        })
        .collect();
    let report = Report {
        incomparable,
        iterations,
        converged,
        objective_before: before.iter().sum(),
        objective_after: after.iter().sum(),
        groups,
    };
    Ok((perms, report))
}

/// `<W_ref, P(W_model)>` for every permuted tensor (0 for non-float tensors, which carry no weights to match).
pub fn tensor_objectives(
    reference: &Checkpoint,
    model: &Checkpoint,
    spec: &Resolved,
    perms: &Perms,
    exec: &Executor,
) -> Result<Vec<f64>> {
    let costs: Vec<u64> = spec.tensors.iter().map(|t| t.shape.iter().product::<usize>() as u64).collect();
    let mut out = vec![0.0; spec.tensors.len()];
    exec.map_ordered(
        &costs,
        1 << 26,
        "objective",
        |i| {
            let t = &spec.tensors[i];
            let (r, m) = (reference.tensor(&t.name)?, model.tensor(&t.name)?);
            if !r.is_float() || !m.is_float() || r.shape != m.shape {
                return Ok(0.0);
            }
            let gather = Gather::new(&t.shape, axis_maps(t, perms, None));
            let mut dot = 0f64;
            for chunk in chunk_ranges(r.numel()) {
                let rv = r.f32_range(chunk.clone())?;
                let mv = gather.f32_range(&m, chunk)?;
                dot += rv.iter().zip(&mv).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>();
            }
            Ok(dot)
        },
        |i, v| {
            out[i] = v;
            Ok(())
        },
    )?;
    Ok(out)
}

/// Squared distance `sum (a - b)^2` and `sum a^2` between `a` and `b` permuted by `perms`, over the permuted float
/// tensors, plus the sum over tensors of their mean squared difference (the reference study's cycle loss).
pub fn distance(
    a: &Checkpoint,
    b: &Checkpoint,
    spec: &Resolved,
    perms: &Perms,
    exec: &Executor,
) -> Result<(f64, f64, f64)> {
    let costs: Vec<u64> = spec.tensors.iter().map(|t| t.shape.iter().product::<usize>() as u64).collect();
    let (mut sq, mut norm, mut mse) = (0.0, 0.0, 0.0);
    exec.map_ordered(
        &costs,
        1 << 26,
        "distance",
        |i| {
            let t = &spec.tensors[i];
            let (x, y) = (a.tensor(&t.name)?, b.tensor(&t.name)?);
            if !x.is_float() || !y.is_float() {
                return Ok((0.0, 0.0, 0usize));
            }
            let gather = Gather::new(&t.shape, axis_maps(t, perms, None));
            let (mut d, mut n) = (0f64, 0f64);
            for chunk in chunk_ranges(x.numel()) {
                let xv = x.f32_range(chunk.clone())?;
                let yv = gather.f32_range(&y, chunk)?;
                for (&p, &q) in xv.iter().zip(&yv) {
                    d += (p as f64 - q as f64).powi(2);
                    n += (p as f64).powi(2);
                }
            }
            Ok((d, n, x.numel()))
        },
        |_, (d, n, count)| {
            sq += d;
            norm += n;
            if count > 0 {
                mse += d / count as f64;
            }
            Ok(())
        },
    )?;
    Ok((sq, norm, mse))
}

/// The `n x n` matrix of group `g` (row-major): entry `(i, j)` is how well model unit `j` matches reference unit `i`
/// with every other axis already permuted.
pub fn cost_matrix(
    reference: &Checkpoint,
    model: &Checkpoint,
    spec: &Resolved,
    perms: &Perms,
    g: usize,
    exec: &Executor,
) -> Result<Vec<f64>> {
    let n = spec.groups[g].size;
    let mut acc = vec![0f64; n * n];
    for &(ti, axis) in &spec.members[g] {
        let t = &spec.tensors[ti];
        let (r, m) = (reference.tensor(&t.name)?, model.tensor(&t.name)?);
        if !r.is_float() || !m.is_float() || r.shape != m.shape {
            continue;
        }
        let block = t.axes[axis].map_or(1, |a| a.block);
        let term = Term::new(&t.shape, axis, block, axis_maps(t, perms, Some(axis)));
        exec.install(|| term.accumulate(&r, &m, n, &mut acc))?;
    }
    Ok(acc)
}

/// One `(tensor, axis)` term of a cost matrix. The tensor is viewed as `(outer, n, block, inner)` around the axis;
/// unit `u` of the flattened `n x rest` view is `block * inner` contiguous elements for each outer index. The model's
/// other axes are permuted through two offset tables (outer axes, inner axes), which keeps the gather cheap.
struct Term {
    n: usize,
    block: usize,
    inner: usize,
    outer: usize,
    outer_tab: Vec<usize>,
    inner_tab: Vec<usize>,
    /// f64 elements per packed operand (`PACK_ELEMS`; smaller in tests).
    pack: usize,
}

impl Term {
    fn new(shape: &[usize], axis: usize, block: usize, maps: Vec<Option<Vec<usize>>>) -> Term {
        let st = strides(shape);
        let table = |axes: std::ops::Range<usize>| -> Vec<usize> {
            let len: usize = shape[axes.clone()].iter().product();
            (0..len)
                .map(|mut idx| {
                    let mut off = 0;
                    for k in axes.clone().rev() {
                        let i = idx % shape[k];
                        idx /= shape[k];
                        off += st[k] * maps[k].as_ref().map_or(i, |m| m[i]);
                    }
                    off
                })
                .collect()
        };
        let outer_tab = table(0..axis);
        let inner_tab = table(axis + 1..shape.len());
        Term {
            n: shape[axis] / block,
            block,
            inner: inner_tab.len(),
            outer: outer_tab.len(),
            outer_tab,
            inner_tab,
            pack: PACK_ELEMS,
        }
    }

    fn accumulate(&self, r: &TensorView, m: &TensorView, n: usize, acc: &mut [f64]) -> Result<()> {
        if self.n != n {
            return Err(Error::tensor(r.file, r.name, format!("axis has {} units, the group {n}", self.n)));
        }
        let unit = self.block * self.inner;
        let rest = self.outer * unit;
        if rest == 0 || n == 0 {
            return Ok(());
        }
        let cols = (self.pack / n).clamp(1, rest);
        let mut x = vec![0f64; n * cols];
        let mut y = vec![0f64; n * cols];
        let (load_r, load_m) = (dtype::element_to_f64(r.dtype), dtype::element_to_f64(m.dtype));
        let mut c0 = 0;
        while c0 < rest {
            let c = cols.min(rest - c0);
            let (xs, ys) = (&mut x[..n * c], &mut y[..n * c]);
            xs.par_chunks_mut(c).zip(ys.par_chunks_mut(c)).enumerate().for_each(|(u, (xr, yr))| {
                for (k, (xv, yv)) in xr.iter_mut().zip(yr.iter_mut()).enumerate() {
                    let col = c0 + k;
                    let (o, within) = (col / unit, col % unit);
                    let (t, q) = (within / self.inner, within % self.inner);
                    *xv = load_r(r.data, o * n * unit + u * unit + within);
                    *yv = load_m(m.data, self.outer_tab[o] + (u * self.block + t) * self.inner + self.inner_tab[q]);
                }
            });
            let xm = MatRef::from_row_major_slice(&x[..n * c], n, c);
            let ym = MatRef::from_row_major_slice(&y[..n * c], n, c);
            let tb = tile(n);
            let dst = MatMut::from_row_major_slice_mut(&mut acc[..], n, n);
            dst.par_row_chunks_mut(tb).enumerate().for_each(|(bi, rows)| {
                rows.par_col_chunks_mut(tb).enumerate().for_each(|(bj, t)| {
                    let (lhs, rhs) = (xm.subrows(bi * tb, t.nrows()), ym.subrows(bj * tb, t.ncols()));
                    faer::linalg::matmul::matmul(t, Accum::Add, lhs, rhs.transpose(), 1.0, Par::Seq);
                });
            });
            c0 += c;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Dtype;

    /// The cost term computed by definition: move the axis first, flatten, permute the other axes, multiply.
    fn naive_term(
        shape: &[usize],
        axis: usize,
        block: usize,
        maps: &[Option<Vec<usize>>],
        r: &[f32],
        m: &[f32],
    ) -> Vec<f64> {
        let n = shape[axis] / block;
        let st = strides(shape);
        let mut acc = vec![0f64; n * n];
        // Enumerate all pairs of elements that share every index except the unit along `axis`.
        for (flat, &rv) in r.iter().enumerate() {
            let mut idx = vec![0; shape.len()];
            let mut f = flat;
            for k in (0..shape.len()).rev() {
                idx[k] = f % shape[k];
                f /= shape[k];
            }
            let (i, t) = (idx[axis] / block, idx[axis] % block);
            for j in 0..n {
                let mut off = 0;
                for k in 0..shape.len() {
                    let v = if k == axis { j * block + t } else { maps[k].as_ref().map_or(idx[k], |mp| mp[idx[k]]) };
                    off += st[k] * v;
                }
                acc[i * n + j] += rv as f64 * m[off] as f64;
            }
        }
        acc
    }

    #[test]
    fn large_terms_are_chunked_deterministically() {
        // n = 100 units of 500 elements, packed 20 columns at a time: 25 column chunks and 2 x 2 tiles.
        let (n, rest) = (100usize, 500usize);
        let mut rng = Rng::new(4);
        let r: Vec<f32> = (0..n * rest).map(|_| rng.normal() as f32).collect();
        let m: Vec<f32> = (0..n * rest).map(|_| rng.normal() as f32).collect();
        let (rb, mb): (Vec<u8>, Vec<u8>) =
            (r.iter().flat_map(|v| v.to_le_bytes()).collect(), m.iter().flat_map(|v| v.to_le_bytes()).collect());
        let shape = [n, rest];
        let file = std::path::Path::new("t");
        let rv = TensorView { name: "t", dtype: Dtype::F32, shape: &shape, data: &rb, file, update: None };
        let mv = TensorView { name: "t", dtype: Dtype::F32, shape: &shape, data: &mb, file, update: None };
        assert!(n > tile(n));
        let run = |threads: usize| {
            let exec = Executor::new(Some(threads)).unwrap();
            let mut acc = vec![0f64; n * n];
            let term = Term { pack: 20 * n, ..Term::new(&shape, 0, 1, vec![None, None]) };
            exec.install(|| term.accumulate(&rv, &mv, n, &mut acc)).unwrap();
            acc
        };
        let (one, three) = (run(1), run(3));
        assert!(one.iter().zip(&three).all(|(a, b)| a.to_bits() == b.to_bits()));
        // Row sums computed another way: sum_j A[i][j] = sum_k R[i][k] * (sum_j M[j][k]).
        let col_sums: Vec<f64> = (0..rest).map(|k| (0..n).map(|j| m[j * rest + k] as f64).sum()).collect();
        for i in 0..n {
            let want: f64 = (0..rest).map(|k| r[i * rest + k] as f64 * col_sums[k]).sum();
            let got: f64 = one[i * n..(i + 1) * n].iter().sum();
            assert!((got - want).abs() < 1e-8 * want.abs().max(1.0), "row {i}: {got} vs {want}");
        }
    }

    #[test]
    fn term_matches_the_definition() {
        let mut rng = Rng::new(9);
        for (shape, axis, block) in
            [(vec![6, 5], 0, 2), (vec![5, 6], 1, 3), (vec![3, 4, 2, 2], 1, 1), (vec![4, 3, 3], 0, 1), (vec![7], 0, 1)]
        {
            let numel: usize = shape.iter().product();
            let r: Vec<f32> = (0..numel).map(|_| rng.normal() as f32).collect();
            let m: Vec<f32> = (0..numel).map(|_| rng.normal() as f32).collect();
            let maps: Vec<Option<Vec<usize>>> =
                shape.iter().enumerate().map(|(k, &d)| (k != axis).then(|| rng.permutation(d))).collect();
            let rb: Vec<u8> = r.iter().flat_map(|v| v.to_le_bytes()).collect();
            let mb: Vec<u8> = m.iter().flat_map(|v| v.to_le_bytes()).collect();
            let file = std::path::Path::new("t");
            let rv = TensorView { name: "t", dtype: Dtype::F32, shape: &shape, data: &rb, file, update: None };
            let mv = TensorView { name: "t", dtype: Dtype::F32, shape: &shape, data: &mb, file, update: None };
            let n = shape[axis] / block;
            let mut acc = vec![0f64; n * n];
            Term::new(&shape, axis, block, maps.clone()).accumulate(&rv, &mv, n, &mut acc).unwrap();
            let want = naive_term(&shape, axis, block, &maps, &r, &m);
            for (a, b) in acc.iter().zip(&want) {
                assert!((a - b).abs() < 1e-9, "{shape:?} axis {axis}: {a} vs {b}");
            }
        }
    }
}
