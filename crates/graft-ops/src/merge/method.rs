//! The merge-method interface: what a method is called, which parameters it takes, which inputs it needs, and how it
//! merges one tensor.
//!
//! A method merges one output tensor at a time from the input tensors' views. `prepare` runs whatever whole-tensor
//! statistics the method needs (slerp's norms and dot product, TIES's magnitude thresholds, model stock's cosines) as
//! pre-passes over fixed chunks with f64 accumulation (a large tensor's pre-pass releases each chunk's input pages
//! once read, `TensorInputs::release_pages`), and returns a `Kernel` that computes any element range in f32.
//! Purely elementwise methods (linear, task arithmetic, DARE) skip the pre-pass. The executor then calls the kernel
//! chunk by chunk, so no method ever holds a whole large tensor in memory.
//!
//! Everything the rest of graft needs to know about a method is a property declared here, never its name: the role
//! of its base model (`base_role`), where `--alpha snr` puts its weights (`snr_alpha`), which tensors it leaves
//! unchanged (`copies_unchanged`), how the output's metadata records it (`recorded_as`), and, for a method that needs
//! statistics over the whole model before merging any tensor (the TIES paper variant), a `GlobalPass` whose result
//! reaches `prepare` through `Ctx::global`.

use std::any::Any;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use super::params::{ParamDef, Scope, TensorParams};
use super::scratch::Buf;
use crate::checkpoint::{dtype, Dtype, TensorView};
use crate::error::{Error, Result};
use crate::exec::{Executor, Read};

/// What a method does with a base model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseRole {
    /// The base is one of the inputs and task vectors are taken against it (`--base` is required with flags).
    TaskVectorBase,
    /// The base is the first endpoint of an interpolation (slerp's t = 0): with flags it is the first model, and a
    /// `--base` only names the reference that unmerged tensors come from.
    FirstEndpoint,
    /// Like `TaskVectorBase` when a base is configured, but the base is optional: without one the method works on
    /// the models themselves (mergekit's `BasePolicy.OPTIONAL`: multislerp, nuslerp).
    OptionalBase,
    /// Every input is treated alike; a configured base model is just one more input.
    Ignored,
}

impl BaseRole {
    /// Whether the base is an input with a distinguished position (`TensorInputs::base`).
    pub fn takes_base(self) -> bool {
        self != BaseRole::Ignored
    }

    /// Whether a merge without a base model is refused.
    pub fn requires_base(self) -> bool {
        matches!(self, BaseRole::TaskVectorBase | BaseRole::FirstEndpoint)
    }

    /// Whether a configured base is a reference the others are measured against (not merged as a model itself).
    pub fn base_is_reference(self) -> bool {
        matches!(self, BaseRole::TaskVectorBase | BaseRole::OptionalBase)
    }
}

/// The parameter `--alpha snr` sets from the experts' SNRs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlphaTarget {
    /// One shared parameter holding the second expert's share (slerp's `t`).
    Shared(&'static str),
    /// A per-model parameter: the two experts get `1 - alpha` and `alpha` (the weighted methods' `weight`).
    PerInput(&'static str),
}

/// How the output's `graft.merge` metadata names a method: its family (mergekit's `merge_method`) and, for one of
/// several variants of a family, the key and value telling which.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub method: &'static str,
    pub variant: Option<(&'static str, &'static str)>,
}

/// Statistics over every merged tensor of the model, gathered before any tensor is merged.
pub trait GlobalPass: Send + Sync {
    /// Gathers the statistics from all merged tensors (inputs and resolved parameters, in plan order). The result
    /// reaches `MergeMethod::prepare` as `Ctx::global`.
    fn gather(&self, tensors: &[(TensorInputs, TensorParams)], ctx: &Ctx) -> Result<Arc<dyn Any + Send + Sync>>;
}

/// Structural requirements on a method's inputs (per output tensor).
#[derive(Clone, Copy, Debug)]
pub struct Contract {
    pub base: BaseRole,
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
}

/// Everything a method may consult besides the tensor itself.
pub struct Ctx<'e> {
    /// For chunked pre-passes (their results come back in chunk order whatever the thread count).
    pub exec: &'e Executor,
    /// Seed of the random methods (DARE, DELLA).
    pub seed: u64,
    /// What the method's `GlobalPass` gathered (None for methods without one).
    pub global: Option<Arc<dyn Any + Send + Sync>>,
}

impl Ctx<'_> {
    /// The global statistics of type `T`, or an error when the method's global pass has not run.
    pub fn global<T: Any + Send + Sync>(&self) -> Result<Arc<T>> {
        self.global
            .clone()
            .and_then(|g| g.downcast::<T>().ok())
            .ok_or_else(|| Error::invalid("internal: the method's whole-model pass did not run before merging"))
    }

    /// Runs `f` over the fixed chunks of `0..n` in parallel; results in chunk order.
    pub fn chunked<T: Send>(&self, n: usize, f: impl Fn(Range<usize>) -> Result<T> + Sync) -> Result<Vec<T>> {
        self.exec.chunked(n, f)
    }
}

/// Largest tensor (elements) whose pre-pass keeps the input pages it has read mapped for the kernel: 8 chunks, 16 MB
/// per bf16 input. Larger ones (a model's embeddings) release them chunk by chunk, so that a pre-pass does not hold
/// every input page of the tensor at once (slerp's and TIES's peak RSS was 2.5-3 times linear's).
pub const PREPASS_MAPPED_MAX: usize = 8 * crate::exec::CHUNK_ELEMS;

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
    /// Where each view's bytes are mapped (one per view, in input order), so that pre-passes can release the pages
    /// they have read (`release_pages`); empty for views that are not mapped from a checkpoint (tests).
    pub pages: Vec<Read<'a>>,
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

    /// Whether input `i`'s values are its stored bf16 bits (a bf16 tensor without a low-rank update, whose stored
    /// bytes are not its values): what the subtraction from stored bits (`read_difference`) needs.
    pub fn stored_bf16(&self, i: usize) -> bool {
        self.views[i].dtype == Dtype::BF16 && self.views[i].is_stored()
    }

    /// Elements `range` of input `i` minus those of input `base`, as reading both and subtracting computes them
    /// (each input rounded to the working dtype, then the difference, in mergekit mode). Two stored bf16 inputs in
    /// f32 arithmetic are subtracted straight from their stored bits in one pass (`dtype::bf16_difference_counting`),
    /// without widening either into a buffer first: a task vector is what TIES's rank pass and every
    /// task-arithmetic merge read most.
    pub fn read_difference(&self, i: usize, base: usize, range: Range<usize>) -> Result<Buf> {
        let (x, b) = (&self.views[i], &self.views[base]);
        let fits = range.end <= x.numel() && range.end <= b.numel() && range.start <= range.end;
        if self.arithmetic == Arithmetic::F32 && self.stored_bf16(i) && self.stored_bf16(base) && fits {
            let mut out = Buf::scratch(range.len());
            let bytes = range.start * 2..range.end * 2;
            let (xs, bs) = (&x.data[bytes.clone()], &b.data[bytes]);
            if let Some((in_x, in_base)) = dtype::bf16_difference_counting(xs, bs, &mut out) {
                // The base first, as the callers used to read it first.
                if in_base > 0 {
                    b.nonfinite_found()?;
                }
                if in_x > 0 {
                    x.nonfinite_found()?;
                }
                return Ok(out);
            }
        }
        let mut out = self.read(i, range.clone())?;
        let base_values = self.read(base, range)?;
        out.iter_mut().zip(base_values.iter()).for_each(|(v, &bv)| *v -= bv);
        self.arithmetic.round(&mut out);
        Ok(out)
    }

    /// Drops the mapped pages of elements `range` of every input, for a pre-pass that is done with the range: the
    /// kernel reads it again later and maps it again. Only for tensors over `PREPASS_MAPPED_MAX` elements: mapping
    /// again costs system time, and below that size holding the pages costs little memory.
    pub fn release_pages(&self, range: Range<usize>) {
        if self.numel() > PREPASS_MAPPED_MAX {
            self.pages.iter().for_each(|p| p.release_range(range.clone()));
        }
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

/// Computes any element range of one merged tensor.
pub trait Kernel: Send + Sync {
    fn compute(&self, range: Range<usize>) -> Result<Vec<f32>>;

    /// The values of `range`, handed to `sink` in order in one or more consecutive pieces. Kernels that work in
    /// cache-sized blocks hand over each block as it is done, so that the executor narrows it while it is still in
    /// cache (`exec::Produce::Pieces`); the default hands over `compute`'s result whole.
    fn compute_pieces(&self, range: Range<usize>, sink: &mut dyn FnMut(&[f32])) -> Result<()> {
        sink(&self.compute(range)?);
        Ok(())
    }
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
    /// What the method does with a base model.
    fn base_role(&self) -> BaseRole {
        self.contract().base
    }
    /// The parameter `--alpha snr` sets: by default a per-model `weight` if the method has one (the linear and
    /// task-vector family), else none.
    fn snr_alpha(&self) -> Option<AlphaTarget> {
        self.params()
            .iter()
            .any(|p| p.name == "weight" && p.scope != Scope::Shared)
            .then_some(AlphaTarget::PerInput("weight"))
    }
    /// Whether the output tensor with parameters `p` is its first input unchanged, so the plan copies it instead.
    fn copies_unchanged(&self, _p: &TensorParams) -> bool {
        false
    }
    /// The whole-model statistics the method needs before merging any tensor, if any.
    fn global_pass(&self) -> Option<&dyn GlobalPass> {
        None
    }
    /// Why the method cannot reproduce mergekit's arithmetic (`--compat mergekit`), if it cannot.
    fn compat_conflict(&self) -> Option<&'static str> {
        None
    }
    /// How the output's metadata names the method.
    fn recorded_as(&self) -> Recorded {
        Recorded { method: self.name(), variant: None }
    }
    /// Gathers the tensor's statistics (if any) and returns the kernel that computes its elements.
    fn prepare<'a>(&self, inputs: TensorInputs<'a>, params: &TensorParams, ctx: &Ctx) -> Result<Box<dyn Kernel + 'a>>;
}

impl fmt::Debug for dyn MergeMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Methods are registered once under unique names, so the name identifies one.
impl PartialEq for dyn MergeMethod {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

/// Serialises a method by its registered name (plans and configs print it so).
pub fn serialize_name<S: serde::Serializer>(
    m: &&'static dyn MergeMethod,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(m.name())
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
            .map(|d| TensorView { name: "t", dtype: Dtype::F32, shape, data: d, file: Path::new("test"), update: None })
            .collect();
        let exec = Executor::new(Some(threads.max(1)))?.quiet();
        let mut ctx = Ctx { exec: &exec, seed, global: None };
        let ti = TensorInputs { name: "t".into(), shape: shape.to_vec(), views, base, arithmetic, pages: Vec::new() };
        // A method with whole-model statistics gathers them first (the model being this one tensor).
        let [(ti, _)] = {
            let whole = [(ti, p.clone())];
            if let Some(pass) = method.global_pass() {
                ctx.global = Some(pass.gather(&whole, &ctx)?);
            }
            whole
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn bf16_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes()).collect()
    }

    fn inputs<'a>(data: [&'a [u8]; 2], shape: &'a [usize], arithmetic: Arithmetic) -> TensorInputs<'a> {
        let view = |data: &'a [u8], name: &'a str| TensorView {
            name,
            dtype: Dtype::BF16,
            shape,
            data,
            file: Path::new(name),
            update: None,
        };
        let views = vec![view(data[0], "x"), view(data[1], "base")];
        TensorInputs { name: "t".into(), shape: shape.to_vec(), views, base: Some(1), arithmetic, pages: Vec::new() }
    }

    #[test]
    fn a_difference_read_from_bf16_bits_equals_reading_both_and_subtracting() {
        let n = 5000;
        let x: Vec<f32> = testing::randn(1, n, 2.0);
        let b: Vec<f32> = testing::randn(2, n, 2.0);
        let (xb, bb) = (bf16_bytes(&x), bf16_bytes(&b));
        let shape = [n];
        // An odd offset makes the bytes unaligned for u16: the widening path runs instead, with the same result.
        let mut shifted = vec![0u8; 2 * n + 1];
        shifted[1..].copy_from_slice(&xb);
        for xs in [&xb[..], &shifted[1..]] {
            for arithmetic in [Arithmetic::F32, Arithmetic::Mergekit(Dtype::F16)] {
                let ti = inputs([xs, &bb[..]], &shape, arithmetic);
                let got = ti.read_difference(0, 1, 123..4567).unwrap();
                let mut want = ti.read(0, 123..4567).unwrap();
                let base = ti.read(1, 123..4567).unwrap();
                want.iter_mut().zip(base.iter()).for_each(|(w, &v)| *w -= v);
                arithmetic.round(&mut want);
                assert!(got.iter().zip(want.iter()).all(|(g, w)| g.to_bits() == w.to_bits()), "{arithmetic:?}");
            }
        }
        // A non-finite value is an error naming the input that holds it.
        let mut bad = b.clone();
        bad[200] = f32::NAN;
        let bad = bf16_bytes(&bad);
        let Err(err) = inputs([&xb[..], &bad[..]], &shape, Arithmetic::F32).read_difference(0, 1, 0..n) else {
            panic!("a NaN in the base was let through");
        };
        let err = err.to_string();
        assert!(err.contains("base") && err.contains("NaN"), "{err}");
    }
}
