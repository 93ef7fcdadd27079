//! Generalized task arithmetic, the engine behind task_arithmetic, TIES, DARE, breadcrumbs and DELLA (mergekit's
//! `GeneralizedTaskArithmeticMerge`), and the `task_arithmetic` method itself.
//!
//! Per tensor, with base `b` and task vectors `d_i = x_i - b`:
//! 1. sparsify each `d_i` (none, magnitude, magnitude outliers, random, DELLA; see `sparsify`), and with `rescale`
//!    multiply the kept entries by `|d_i|_1 / |kept d_i|_1` (mergekit's L1 rescale, skipped when either is < 1e-7);
//! 2. weight: `e_i = w_i d_i`;
//! 3. without consensus: `m = sum_i e_i`, divisor `sum_i w_i` (1 when |.| < 1e-8); with sign consensus: the elected
//!    sign is that of `sum_i e_i` (zero counts as +), `m = sum` of the `e_i` whose sign equals it (zeros never agree),
//!    divisor `sum` of their `w_i` (1 when 0);
//! 4. `m /= divisor` when `normalize`; `m *= lambda`; result `b + m`.
//!
//! graft computes in f32 with f64 reductions. In mergekit mode every step is rounded to the working dtype as torch
//! does when mergekit computes in bf16/f16 (sums accumulate in f32 and round once).

use std::ops::Range;

use super::method::{Arithmetic, BaseRole, Contract, Ctx, Kernel, MergeMethod, TensorInputs};
use super::params::{Default, Kind, ParamDef, Scope, TensorParams};
use super::scratch::Buf;
use super::sparsify::{self, Cursor, Draws, Lines, RankWindow};
use crate::error::{Error, Result};
use crate::exec::CHUNK_ELEMS;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sparsification {
    None,
    Magnitude,
    Outliers,
    Random,
    Della,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consensus {
    None,
    Sum,
}

/// One generalized-task-arithmetic method: a name, its sparsification and consensus, its parameter defaults.
pub struct Gta {
    pub name: &'static str,
    pub about: &'static str,
    pub sparsification: Sparsification,
    pub consensus: Consensus,
    pub params: &'static [ParamDef],
}

/// The parameters every generalized-task-arithmetic method takes, with its `normalize`/`rescale` defaults.
macro_rules! gta_params {
    ($normalize:expr, $rescale:expr $(, $extra:expr)*) => {
        &[
            ParamDef::new("weight", Kind::Float, Scope::NonBase, Default::Required, "weight of each task vector"),
            ParamDef::new("density", Kind::Float, Scope::NonBase, Default::Float(1.0), "fraction of each task vector kept"),
            ParamDef::new("normalize", Kind::Bool, Scope::Shared, Default::Bool($normalize), "divide by the sum of the (agreeing) weights"),
            ParamDef::new("rescale", Kind::Bool, Scope::Shared, Default::Bool($rescale), "restore each sparsified task vector's L1 norm"),
            ParamDef::new("lambda", Kind::Float, Scope::Shared, Default::Float(1.0), "scale of the merged task vector"),
            ParamDef::new("int8_mask", Kind::Bool, Scope::Shared, Default::Bool(false), "accepted for compatibility; no effect on results"),
            $($extra,)*
        ]
    };
}
pub(crate) use gta_params;

pub const GAMMA: ParamDef =
    ParamDef::new("gamma", Kind::Float, Scope::NonBase, Default::Float(0.01), "fraction of largest magnitudes removed");
pub const EPSILON: ParamDef =
    ParamDef::new("epsilon", Kind::Float, Scope::NonBase, Default::Float(0.15), "spread of DELLA's keep probabilities");

pub const TASK_ARITHMETIC: Gta = Gta {
    name: "task_arithmetic",
    about: "base + lambda * sum of weighted task vectors",
    sparsification: Sparsification::None,
    consensus: Consensus::None,
    params: gta_params!(false, false),
};

enum Sparse {
    Keep,
    Zero,
    Window(RankWindow),
    Pending((usize, usize)),
    /// DARE's Bernoulli mask; `kept`: the keep bits of the whole tensor, drawn once by the rescale pass (see
    /// `KEPT_BITS_MAX`), else drawn as the kernel goes.
    Random {
        density: f64,
        kept: Option<Vec<u64>>,
    },
    Della {
        density: f64,
        epsilon: f64,
    },
}

/// Largest total size of the DARE keep bits a kernel holds between the rescale pass and the merge (1/32 of the
/// f32 task vectors they mask: 8 MiB for a 0.5B model's embedding and two task vectors): within it the merge reads
/// the bits instead of drawing every element a second time.
const KEPT_BITS_MAX: usize = 64 << 20;

/// Where a walk through a chunk stands in one series' mask, between the chunk's consecutive cache blocks.
enum Walk<'k> {
    None,
    Window(Cursor),
    Draws(Draws<'k>),
}

struct Series {
    input: usize,
    weight: f32,
    sparse: Sparse,
    /// L1 rescale factor (1 when not rescaling).
    scale: Option<f32>,
}

struct GtaKernel<'a> {
    inputs: TensorInputs<'a>,
    base: usize,
    series: Vec<Series>,
    consensus: Consensus,
    normalize: bool,
    lambda: f32,
    /// Non-consensus divisor: sum of all weights.
    weight_sum: f32,
    seed: u64,
    lines: Lines,
    ar: Arithmetic,
}

impl GtaKernel<'_> {
    fn streams(&self, j: usize) -> sparsify::Streams<'_> {
        sparsify::Streams { seed: self.seed, tensor: &self.inputs.name, input: self.series[j].input }
    }

    /// The task vector of series `j` over `range`, using `base` when it is already read for that range.
    fn delta(&self, j: usize, range: Range<usize>, base: Option<&[f32]>) -> Result<Buf> {
        if base.is_none() || self.fused_delta() {
            return self.inputs.read_difference(self.series[j].input, self.base, range);
        }
        let mut x = self.inputs.read(self.series[j].input, range.clone())?;
        let owned;
        let b = match base {
            Some(b) => b,
            None => {
                owned = self.inputs.read(self.base, range)?;
                &owned
            }
        };
        x.iter_mut().zip(b).for_each(|(v, &bv)| *v -= bv);
        self.ar.round(&mut x);
        Ok(x)
    }

    /// Whether task vectors are subtracted from the stored bf16 bits (`TensorInputs::read_difference`): then a
    /// base already widened for the range saves nothing, and a pass that needs only task vectors reads no base.
    fn fused_delta(&self) -> bool {
        let bf16 = |i: usize| self.inputs.stored_bf16(i);
        self.ar == Arithmetic::F32 && bf16(self.base) && self.series.iter().all(|s| bf16(s.input))
    }

    /// The sparsified (not yet rescaled) task vector of series `j` over `range`; `walk` carries a rank window's or
    /// a random mask's position between consecutive ranges (`Walk::None`: start afresh at `range`).
    fn sparse_delta(&self, j: usize, range: Range<usize>, base: Option<&[f32]>, walk: &mut Walk) -> Result<Buf> {
        match &self.series[j].sparse {
            Sparse::Keep => self.delta(j, range, base),
            Sparse::Zero => Ok(Buf::zeroed(range.len())),
            Sparse::Window(w) => {
                let mut d = self.delta(j, range.clone(), base)?;
                match walk {
                    Walk::Window(cur) => w.apply_at(cur, &mut d),
                    _ => {
                        let prefix = |q: Range<usize>| -> Result<Buf> { self.delta(j, q, None) };
                        w.apply(range, &mut d, &prefix)?;
                    }
                }
                Ok(d)
            }
            Sparse::Pending(_) => unreachable!("rank windows are computed before the kernel runs"),
            Sparse::Random { density, kept } => {
                let mut d = self.delta(j, range.clone(), base)?;
                match (kept, walk) {
                    (Some(bits), _) => sparsify::apply_bits(bits, range.start, &mut d),
                    (None, Walk::Draws(draws)) if draws.position() == range.start => draws.apply(&mut d),
                    (None, _) => sparsify::bernoulli(self.streams(j), *density, range, &mut d),
                }
                Ok(d)
            }
            Sparse::Della { density, epsilon } => {
                let bs = self.lines.block();
                let first = range.start / bs;
                let ext = first * bs..(range.end.div_ceil(bs) * bs).min(self.inputs.numel());
                let mut d = self.delta(j, ext.clone(), None)?;
                sparsify::della_mask(self.streams(j), *density, *epsilon, self.lines, first, &mut d);
                Ok(Buf::from_slice(&d[range.start - ext.start..range.end - ext.start]))
            }
        }
    }

    /// One cache-sized block of the merged tensor.
    fn block(&self, range: Range<usize>, walks: &mut [Walk]) -> Result<Buf> {
        let base = self.inputs.read(self.base, range.clone())?;
        let mut e: Vec<Buf> = Vec::with_capacity(self.series.len());
        for (j, walk) in walks.iter_mut().enumerate() {
            e.push(self.sparse_delta(j, range.clone(), Some(&base), walk)?);
        }
        if self.ar == Arithmetic::F32 && (1..=4).contains(&e.len()) {
            let mut out = base;
            match e.len() {
                1 => self.combine::<1>(&mut out, &e),
                2 => self.combine::<2>(&mut out, &e),
                3 => self.combine::<3>(&mut out, &e),
                _ => self.combine::<4>(&mut out, &e),
            }
            return Ok(out);
        }
        self.combine_steps(base, e)
    }

    /// Steps 2-4 of the module comment for `N` series in f32, in one pass over the elements: with no rounding
    /// between steps, fusing the whole-slice passes of `combine_steps` changes neither an operation nor its order,
    /// so the result is bit for bit the same. `out` holds the base and receives the result; `d` the sparsified
    /// task vectors.
    fn combine<const N: usize>(&self, out: &mut [f32], d: &[Buf]) {
        let n = out.len();
        let d: [&[f32]; N] = std::array::from_fn(|j| &d[j][..n]);
        let scale: [Option<f32>; N] = std::array::from_fn(|j| self.series[j].scale);
        let w: [f32; N] = std::array::from_fn(|j| self.series[j].weight);
        let (normalize, lambda, weight_sum) = (self.normalize, self.lambda, self.weight_sum);
        let weighted = |j: usize, k: usize| -> f32 {
            let v = d[j][k];
            let v = match scale[j] {
                Some(s) => v * s,
                None => v,
            };
            v * w[j]
        };
        match self.consensus {
            Consensus::None => {
                for (k, o) in out.iter_mut().enumerate() {
                    let mut m = 0f32;
                    for j in 0..N {
                        m += weighted(j, k);
                    }
                    if normalize {
                        m /= weight_sum;
                    }
                    if lambda != 1.0 {
                        m *= lambda;
                    }
                    *o += m;
                }
            }
            Consensus::Sum => {
                for (k, o) in out.iter_mut().enumerate() {
                    let e: [f32; N] = std::array::from_fn(|j| weighted(j, k));
                    let mut total = 0f32;
                    for v in e {
                        total += v;
                    }
                    let (mut m, mut ws) = (0f32, 0f32);
                    for (v, wj) in e.into_iter().zip(w) {
                        let agree = if total >= 0.0 { v > 0.0 } else { v < 0.0 };
                        m += if agree { v } else { 0.0 };
                        ws += if agree { wj } else { 0.0 };
                    }
                    if normalize {
                        m /= if ws == 0.0 { 1.0 } else { ws };
                    }
                    if lambda != 1.0 {
                        m *= lambda;
                    }
                    *o += m;
                }
            }
        }
    }

    /// Steps 2-4 as whole-slice passes, each followed by its rounding in mergekit mode.
    fn combine_steps(&self, base: Buf, mut e: Vec<Buf>) -> Result<Buf> {
        let ar = self.ar;
        let n = base.len();
        for (d, s) in e.iter_mut().zip(&self.series) {
            if let Some(scale) = s.scale {
                d.iter_mut().for_each(|v| *v *= scale);
                ar.round(d);
            }
            d.iter_mut().for_each(|v| *v *= s.weight);
            ar.round(d);
        }
        let mut mixed = Buf::zeroed(n);
        let divisor = match self.consensus {
            Consensus::None => {
                for d in &e {
                    mixed.iter_mut().zip(d).for_each(|(m, v)| *m += v);
                }
                ar.round(&mut mixed);
                None
            }
            Consensus::Sum => {
                let mut total = Buf::zeroed(n);
                for d in &e {
                    total.iter_mut().zip(d).for_each(|(t, v)| *t += v);
                }
                ar.round(&mut total);
                let mut wsum = Buf::zeroed(n);
                for (d, s) in e.iter().zip(&self.series) {
                    let w = s.weight;
                    for (((m, ws), &t), &v) in mixed.iter_mut().zip(wsum.iter_mut()).zip(&total).zip(d) {
                        let agree = if t >= 0.0 { v > 0.0 } else { v < 0.0 };
                        *m += if agree { v } else { 0.0 };
                        *ws += if agree { w } else { 0.0 };
                    }
                }
                ar.round(&mut mixed);
                ar.round(&mut wsum);
                wsum.iter_mut().for_each(|w| *w = if *w == 0.0 { 1.0 } else { *w });
                Some(wsum)
            }
        };
        if self.normalize {
            match &divisor {
                Some(w) => mixed.iter_mut().zip(w).for_each(|(m, w)| *m /= w),
                None => mixed.iter_mut().for_each(|m| *m /= self.weight_sum),
            }
            ar.round(&mut mixed);
        }
        if self.lambda != 1.0 {
            mixed.iter_mut().for_each(|m| *m *= self.lambda);
            ar.round(&mut mixed);
        }
        let mut out = base;
        out.iter_mut().zip(mixed.iter()).for_each(|(o, m)| *o += m);
        ar.round(&mut out);
        Ok(out)
    }
}

impl Kernel for GtaKernel<'_> {
    fn compute(&self, range: Range<usize>) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(range.len());
        self.compute_pieces(range, &mut |piece| out.extend_from_slice(piece))?;
        Ok(out)
    }

    fn compute_pieces(&self, range: Range<usize>, sink: &mut dyn FnMut(&[f32])) -> Result<()> {
        // Cache-sized blocks keep the intermediate vectors out of main memory; DELLA ranks whole rows, so its
        // blocks are the whole range.
        let della = self.series.iter().any(|s| matches!(s.sparse, Sparse::Della { .. }));
        let mut walks = Vec::with_capacity(self.series.len());
        for (j, s) in self.series.iter().enumerate() {
            walks.push(match &s.sparse {
                Sparse::Window(w) => {
                    let prefix = |q: Range<usize>| -> Result<Buf> { self.delta(j, q, None) };
                    Walk::Window(w.cursor(range.start, &prefix)?)
                }
                Sparse::Random { density, kept: None } => {
                    Walk::Draws(Draws::at(self.streams(j), *density, range.start))
                }
                _ => Walk::None,
            });
        }
        if della {
            sink(&self.block(range, &mut walks)?);
            return Ok(());
        }
        for b in super::scratch::blocks(range) {
            sink(&self.block(b, &mut walks)?);
        }
        Ok(())
    }
}

impl Gta {
    fn build<'a>(&self, inputs: TensorInputs<'a>, p: &TensorParams, ctx: &Ctx) -> Result<GtaKernel<'a>> {
        let base = inputs.base_index()?;
        let n = inputs.numel();
        let ar = inputs.arithmetic;
        let mut series = Vec::new();
        for i in inputs.non_base() {
            let weight = ar.r(p.input_f64(i, "weight")? as f32);
            let density = p.input_f64(i, "density")?;
            let sparse = if self.sparsification == Sparsification::None || density >= 1.0 {
                Sparse::Keep
            } else {
                match self.sparsification {
                    Sparsification::Magnitude => Sparse::Pending(sparsify::magnitude_window(n, density)),
                    Sparsification::Outliers => {
                        Sparse::Pending(sparsify::outlier_window(n, density, p.input_f64(i, "gamma")?))
                    }
                    Sparsification::Random => Sparse::Random { density, kept: None },
                    Sparsification::Della if density <= 0.0 => Sparse::Zero,
                    Sparsification::Della => {
                        let epsilon = p.input_f64(i, "epsilon")?;
                        if density + epsilon >= 1.0 || density - epsilon <= 0.0 {
                            return Err(Error::usage(format!(
                                "tensor '{}': DELLA needs density +/- epsilon inside (0, 1); got density {density}, \
                                 epsilon {epsilon}",
                                inputs.name
                            )));
                        }
                        Sparse::Della { density, epsilon }
                    }
                    Sparsification::None => unreachable!(),
                }
            };
            series.push(Series { input: i, weight, sparse, scale: None });
        }
        let weight_sum = {
            let s = ar.r(series.iter().map(|s| s.weight).sum());
            if s.abs() < 1e-8 {
                1.0
            } else {
                s
            }
        };
        let lines = Lines::of_shape(&inputs.shape);
        let mut k = GtaKernel {
            inputs,
            base,
            series,
            consensus: self.consensus,
            normalize: p.bool("normalize")?,
            lambda: p.f64("lambda")? as f32,
            weight_sum,
            seed: ctx.seed,
            lines,
            ar,
        };
        let pending: Vec<(usize, (usize, usize))> = k
            .series
            .iter()
            .enumerate()
            .filter_map(|(j, s)| if let Sparse::Pending(w) = s.sparse { Some((j, w)) } else { None })
            .collect();
        if !pending.is_empty() {
            let windows: Vec<(usize, usize)> = pending.iter().map(|p| p.1).collect();
            let fused = k.fused_delta();
            let keys = |r: Range<usize>| -> Result<Vec<Buf>> {
                let b = if fused { None } else { Some(k.inputs.read(k.base, r.clone())?) };
                let keys = pending.iter().map(|&(j, _)| k.delta(j, r.clone(), b.as_ref().map(|b| &b[..]))).collect();
                // The rank pass reads a chunk in cache blocks: its pages go after the chunk's last block.
                if r.end.is_multiple_of(CHUNK_ELEMS) || r.end == n {
                    k.inputs.release_pages(r.end.saturating_sub(1) / CHUNK_ELEMS * CHUNK_ELEMS..r.end);
                }
                keys
            };
            let found = sparsify::rank_windows(ctx.exec, n, &windows, &keys)?;
            for ((j, _), w) in pending.iter().zip(found) {
                k.series[*j].sparse = Sparse::Window(w);
            }
        }
        if p.bool("rescale")? {
            let targets: Vec<usize> =
                (0..k.series.len()).filter(|&j| !matches!(k.series[j].sparse, Sparse::Keep)).collect();
            if !targets.is_empty() {
                // DARE's keep bits, drawn here once and kept for the merge when they fit the bound.
                let random = targets.iter().filter(|&&j| matches!(k.series[j].sparse, Sparse::Random { .. })).count();
                let keep_bits = random * n.div_ceil(64) * 8 <= KEPT_BITS_MAX;
                let l1 = |d: &[f32]| -> f64 { d.iter().map(|&x| x.abs() as f64).sum() };
                // Chunks start on a multiple of RNG_BLOCK, so each chunk's draws are a fresh walk.
                let mut parts = ctx.chunked(n, |r| {
                    let b = k.inputs.read(k.base, r.clone())?;
                    let sums = targets
                        .iter()
                        .map(|&j| match &k.series[j].sparse {
                            Sparse::Random { density, .. } => {
                                let d = k.delta(j, r.clone(), Some(&b))?;
                                let bits = Draws::at(k.streams(j), *density, r.start).keep_bits(r.len());
                                let (before, after) = sparsify::l1_and_masked_l1(&d, &bits);
                                Ok((before, after, keep_bits.then_some(bits)))
                            }
                            _ => {
                                let before = l1(&k.delta(j, r.clone(), Some(&b))?);
                                let after = l1(&k.sparse_delta(j, r.clone(), Some(&b), &mut Walk::None)?);
                                Ok((before, after, None))
                            }
                        })
                        .collect::<Result<Vec<_>>>();
                    k.inputs.release_pages(r);
                    sums
                })?;
                for (t, &j) in targets.iter().enumerate() {
                    let before = ar.r(parts.iter().map(|p| p[t].0).sum::<f64>() as f32);
                    let after = ar.r(parts.iter().map(|p| p[t].1).sum::<f64>() as f32);
                    if before >= 1e-7 && after >= 1e-7 {
                        k.series[j].scale = Some(ar.r(before / after));
                    }
                }
                if keep_bits {
                    for (t, &j) in targets.iter().enumerate() {
                        if let Sparse::Random { kept, .. } = &mut k.series[j].sparse {
                            // Chunks hold whole words (CHUNK_ELEMS is a multiple of 64), so the chunks' bits
                            // concatenate into the tensor's.
                            *kept = Some(parts.iter_mut().flat_map(|p| p[t].2.take().unwrap_or_default()).collect());
                        }
                    }
                }
            }
        }
        Ok(k)
    }
}

impl MergeMethod for Gta {
    fn name(&self) -> &'static str {
        self.name
    }
    fn about(&self) -> &'static str {
        self.about
    }
    fn params(&self) -> &'static [ParamDef] {
        self.params
    }
    fn contract(&self) -> Contract {
        Contract { base: BaseRole::TaskVectorBase, min_inputs: 1, max_inputs: None }
    }
    fn prepare<'a>(&self, inputs: TensorInputs<'a>, p: &TensorParams, ctx: &Ctx) -> Result<Box<dyn Kernel + 'a>> {
        Ok(Box::new(self.build(inputs, p, ctx)?))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::merge::method::testing::*;
    use crate::merge::params::Scalar;

    pub fn gta_params(normalize: bool, lambda: f64, per: Vec<Vec<(&str, f64)>>) -> TensorParams {
        params(
            &[
                ("normalize", Scalar::Bool(normalize)),
                ("rescale", Scalar::Bool(false)),
                ("lambda", Scalar::Num(lambda)),
                ("int8_mask", Scalar::Bool(false)),
            ],
            per,
        )
    }

    #[test]
    fn task_arithmetic_matches_an_f64_reference() {
        let b = randn(1, 2000, 1.0);
        let x1 = randn(2, 2000, 1.0);
        let x2 = randn(3, 2000, 1.0);
        let (w1, w2, lambda) = (0.7, 0.4, 0.8);
        let p = gta_params(
            false,
            lambda,
            vec![vec![], vec![("weight", w1), ("density", 1.0)], vec![("weight", w2), ("density", 1.0)]],
        );
        let got = run(&TASK_ARITHMETIC, &[b.clone(), x1.clone(), x2.clone()], Some(0), &p);
        for e in 0..2000 {
            let (bb, a, c) = (b[e] as f64, x1[e] as f64, x2[e] as f64);
            let r = bb + lambda * (w1 * (a - bb) + w2 * (c - bb));
            assert!((got[e] as f64 - r).abs() <= 2e-6 * (1.0 + r.abs()), "{e}");
        }
        // normalize divides the weighted sum by the weight sum.
        let p = gta_params(
            true,
            1.0,
            vec![vec![], vec![("weight", w1), ("density", 1.0)], vec![("weight", w2), ("density", 1.0)]],
        );
        let got = run(&TASK_ARITHMETIC, &[b.clone(), x1.clone(), x2.clone()], Some(0), &p);
        for e in 0..2000 {
            let (bb, a, c) = (b[e] as f64, x1[e] as f64, x2[e] as f64);
            let r = bb + (w1 * (a - bb) + w2 * (c - bb)) / (w1 + w2);
            assert!((got[e] as f64 - r).abs() <= 2e-6 * (1.0 + r.abs()), "{e}");
        }
    }

    #[test]
    fn bf16_mode_rounds_every_step() {
        // base 1, model 1 + 2^-7 (one bf16 ulp), weight 0.3: delta 2^-7, weighted 0.3 * 2^-7 rounded to bf16, then
        // 1 + that rounded: in f32 the sum is 1.00234375; in bf16 steps it rounds back to 1.0 (below half an ulp).
        let b = vec![1.0f32];
        let x = vec![1.0f32 + 2f32.powi(-7)];
        let p = gta_params(false, 1.0, vec![vec![], vec![("weight", 0.3), ("density", 1.0)]]);
        let f = run_full(&TASK_ARITHMETIC, &[b.clone(), x.clone()], &[1], Some(0), &p, Arithmetic::F32, 0, 1).unwrap();
        assert!((f[0] - (1.0 + 0.3 * 2f32.powi(-7))).abs() < 1e-7);
        let m = run_full(
            &TASK_ARITHMETIC,
            &[b, x],
            &[1],
            Some(0),
            &p,
            Arithmetic::Mergekit(crate::checkpoint::Dtype::BF16),
            0,
            1,
        )
        .unwrap();
        assert_eq!(m[0], 1.0);
    }
}
