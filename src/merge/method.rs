//! The merge-method interface: what a method is called, which parameters it takes, which inputs it needs, and how it
//! merges one tensor.
//!
//! A method merges one output tensor at a time from the input tensors' views. `prepare` runs whatever whole-tensor
//! statistics the method needs (slerp's norms and dot product, TIES's magnitude thresholds, model stock's cosines) as
//! pre-passes over fixed chunks with f64 accumulation, and returns a `Kernel` that computes any element range in f32.
//! Purely elementwise methods (linear, task arithmetic, DARE) skip the pre-pass. The executor then calls the kernel
//! chunk by chunk, so no method ever holds a whole large tensor in memory.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut, Range};

use super::params::{ParamDef, TensorParams};
use crate::checkpoint::{dtype, Dtype, TensorView};
use crate::error::{Error, Result};
use crate::exec::Executor;

/// Whether a method takes a base model among its inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BasePolicy {
    /// The base is one of the inputs and plays a distinguished role (task vectors are taken against it).
    Required,
    /// Every input is treated alike; a configured base model is just one more input.
    Ignored,
}

/// Structural requirements on a method's inputs (per output tensor).
#[derive(Clone, Copy, Debug)]
pub struct Contract {
    pub base: BasePolicy,
    pub min_inputs: usize,
    pub max_inputs: Option<usize>,
}

/// How graft computes: in f32 (default), or reproducing mergekit's arithmetic in its working dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Arithmetic {
    #[default]
    F32,
    /// mergekit's working dtype (the config's `dtype`, else the inputs' promoted dtype): inputs are rounded to it and,
    /// for the methods that mergekit computes in that dtype, so is every intermediate step.
    Mergekit(Dtype),
}

impl Arithmetic {
    /// Rounds `v` to the working dtype (no-op in f32 mode or for a working dtype of f32 and wider).
    pub fn round(self, v: &mut [f32]) {
        if let Arithmetic::Mergekit(d) = self {
            dtype::round_in_place(d, v);
        }
    }

    /// One value rounded to the working dtype.
    #[inline]
    pub fn r(self, x: f32) -> f32 {
        match self {
            Arithmetic::Mergekit(d) => dtype::round_value(d, x),
            Arithmetic::F32 => x,
        }
    }

    pub fn is_compat(self) -> bool {
        matches!(self, Arithmetic::Mergekit(_))
    }
}

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

/// Everything a method may consult besides the tensor itself.
pub struct Ctx<'e> {
    /// For chunked pre-passes (their results come back in chunk order whatever the thread count).
    pub exec: &'e Executor,
    /// Seed of the random methods (DARE, DELLA).
    pub seed: u64,
    /// TIES variant: mergekit's per-tensor rule, or the paper's global trim (statistics gathered beforehand).
    pub ties_paper: Option<std::sync::Arc<super::ties::PaperStats>>,
}

impl Ctx<'_> {
    /// Runs `f` over the fixed chunks of `0..n` in parallel; results in chunk order.
    pub fn chunked<T: Send>(&self, n: usize, f: impl Fn(Range<usize>) -> Result<T> + Sync) -> Result<Vec<T>> {
        self.exec.chunked(n, f)
    }
}

/// The input tensors of one output tensor.
pub struct TensorInputs<'a> {
    /// The output tensor's name (used in messages and to derive random streams).
    pub name: String,
    pub shape: Vec<usize>,
    /// One view per input, in input order.
    pub views: Vec<TensorView<'a>>,
    /// Which input is the base, if the method has one.
    pub base: Option<usize>,
    pub arithmetic: Arithmetic,
}

impl<'a> TensorInputs<'a> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn len(&self) -> usize {
        self.views.len()
    }

    pub fn is_empty(&self) -> bool {
        self.views.is_empty()
    }

    /// Elements `range` of input `i` as f32 (rounded to the working dtype in mergekit mode).
    pub fn read(&self, i: usize, range: Range<usize>) -> Result<Buf> {
        let mut v = Buf::scratch(range.len());
        self.views[i].read_f32_range(range, &mut v)?;
        self.arithmetic.round(&mut v);
        Ok(v)
    }

    /// Elements `range` of input `i` into `out` (rounded to the working dtype in mergekit mode).
    pub fn read_into(&self, i: usize, range: Range<usize>, out: &mut [f32]) -> Result<()> {
        self.views[i].read_f32_range(range, out)?;
        self.arithmetic.round(out);
        Ok(())
    }

    /// The inputs other than the base, in input order.
    pub fn non_base(&self) -> Vec<usize> {
        (0..self.views.len()).filter(|&i| Some(i) != self.base).collect()
    }

    /// The base input's index, or an error naming the tensor.
    pub fn base_index(&self) -> Result<usize> {
        self.base.ok_or_else(|| Error::invalid(format!("tensor '{}': this method needs a base model", self.name)))
    }
}

/// Runs `block(r, out)` over cache-sized pieces `r` of `range`, each filling its piece `out` of the result: the
/// intermediate vectors of an elementwise kernel then stay in cache instead of streaming through memory per step.
pub fn blocked(range: Range<usize>, mut block: impl FnMut(Range<usize>, &mut [f32]) -> Result<()>) -> Result<Vec<f32>> {
    let start = range.start;
    let mut out = vec![0f32; range.len()];
    for b in super::sparsify::blocks(range) {
        let dst = &mut out[b.start - start..b.end - start];
        block(b, dst)?;
    }
    Ok(out)
}

/// Computes any element range of one merged tensor.
pub trait Kernel: Send + Sync {
    fn compute(&self, range: Range<usize>) -> Result<Vec<f32>>;
}

/// One merge method. Implementations are stateless; per-tensor state lives in the kernel `prepare` returns.
pub trait MergeMethod: Send + Sync {
    /// The name used by `--method` and by mergekit's `merge_method`.
    fn name(&self) -> &'static str;
    /// One line for `--help` and docs.
    fn about(&self) -> &'static str;
    /// Accepted parameters (mergekit's names, scopes and defaults).
    fn params(&self) -> &'static [ParamDef];
    fn contract(&self) -> Contract;
    /// True when any element range can be computed without whole-tensor statistics.
    fn elementwise(&self) -> bool;
    /// Gathers the tensor's statistics (if any) and returns the kernel that computes its elements.
    fn prepare<'a>(&self, inputs: TensorInputs<'a>, params: &TensorParams, ctx: &Ctx) -> Result<Box<dyn Kernel + 'a>>;
}

/// Test helpers: run a method on plain f32 vectors.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::merge::params::{Scalar, TensorParams};
    use std::collections::BTreeMap;
    use std::path::Path;

    pub fn bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    pub fn params(shared: &[(&str, Scalar)], inputs: Vec<Vec<(&str, f64)>>) -> TensorParams {
        TensorParams {
            shared: shared.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            inputs: inputs
                .into_iter()
                .map(|m| m.into_iter().map(|(k, v)| (k.to_string(), Scalar::Num(v))).collect::<BTreeMap<_, _>>())
                .collect(),
        }
    }

    /// Runs `method` on `inputs` (f32 data of shape `shape`) and returns the merged tensor, computed as the executor
    /// does: executor chunks in parallel on `threads` threads (`threads: 0` computes the whole tensor in one call to
    /// the kernel on one thread instead, the single-chunk reference for chunking tests).
    #[allow(clippy::too_many_arguments)]
    pub fn run_full(
        method: &dyn MergeMethod,
        inputs: &[Vec<f32>],
        shape: &[usize],
        base: Option<usize>,
        p: &TensorParams,
        arithmetic: Arithmetic,
        seed: u64,
        threads: usize,
    ) -> Result<Vec<f32>> {
        let data: Vec<Vec<u8>> = inputs.iter().map(|v| bytes(v)).collect();
        let views: Vec<TensorView> = data
            .iter()
            .map(|d| TensorView { name: "t", dtype: Dtype::F32, shape, data: d, file: Path::new("test") })
            .collect();
        let exec = Executor::new(Some(threads.max(1)))?.quiet();
        let ctx = Ctx { exec: &exec, seed, ties_paper: None };
        let ti = TensorInputs { name: "t".into(), shape: shape.to_vec(), views, base, arithmetic };
        let n = ti.numel();
        let k = method.prepare(ti, p, &ctx)?;
        if threads == 0 {
            return k.compute(0..n);
        }
        Ok(exec.chunked(n, |r| k.compute(r))?.concat())
    }

    pub fn run(method: &dyn MergeMethod, inputs: &[Vec<f32>], base: Option<usize>, p: &TensorParams) -> Vec<f32> {
        let n = inputs[0].len();
        run_full(method, inputs, &[n], base, p, Arithmetic::F32, 0, 2).unwrap()
    }

    /// Deterministic pseudo-random test vectors.
    pub fn randn(seed: u64, n: usize, std: f64) -> Vec<f32> {
        let mut r = crate::rng::Rng::new(seed);
        (0..n).map(|_| (r.normal() * std) as f32).collect()
    }
}
