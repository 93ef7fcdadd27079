//! Fused CPU kernels for training, as candle custom ops with their own backward passes.
//!
//! candle's generic CPU path spends most of a small network's step in elementwise temporaries: a grouped
//! (depthwise) convolution becomes one convolution per channel plus a concatenation, a training-mode BatchNorm is a
//! dozen broadcast ops forward and more backward, ReLU's backward builds a comparison mask, a cast and a product.
//! Each op here does its work in one pass over the data (two for statistics), in parallel over planes or channels,
//! with f64 accumulation and a fixed reduction order, so results do not depend on the thread count.
//!
//! Every op works for f32 and f64 (the finite-difference gradient checks run in f64). On devices other than the CPU
//! the callers use candle's generic ops instead (`fused_available`), which compute the same functions.
//!
//! `frozen` is not a kernel but works on every device: products with frozen operands that differentiate only the
//! tracked input (candle's own backward pass would compute and keep the frozen operands' gradients too).
//!
//! The pieces: `activation` (ReLU, softmax), `decoder` (a llama decoder layer's RMSNorm, SwiGLU, rotary embedding
//! and causal softmax), `head` (a language model's head and target log-probabilities in blocks), `logprob` (the
//! target log-probability of given logits), `conv` (pointwise and depthwise convolution), `batchnorm` (training-mode
//! BatchNorm and the fixed affine map), `pool` (max pooling), `separable` (the separable convolution as one graph
//! node, built from `conv` and `batchnorm`). The shared helpers below (dtype dispatch, lane reductions) are theirs.

use candle_core::{CpuStorage, DType, Layout, Tensor, WithDType};

type CResult<T> = candle_core::Result<T>;

/// `GRAFT_GENERIC_OPS=1` makes every op (and AdamW) take candle's generic path on the CPU too: how
/// `tools/bench-train` measures what the fused kernels gain, and a way to rule them out when debugging.
pub fn generic_forced() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| std::env::var_os("GRAFT_GENERIC_OPS").is_some_and(|v| v == "1"))
}

/// Whether the fused CPU kernels can run on `t` (CPU tensor of f32 or f64).
pub fn fused_available(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64) && !generic_forced()
}

fn contiguous<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, op: &str) -> CResult<&'a [T]> {
    let (a, b) =
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{op}: input is not contiguous")))?;
    Ok(&s.as_slice::<T>()?[a..b])
}

fn unsupported(op: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{op}: only f32 and f64 tensors are supported"))
}

/// Dispatches a generic kernel on the storage dtype.
macro_rules! dispatch {
    ($s:expr, $op:expr, |$t:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            _ => Err(unsupported($op)),
        }
    };
}

/// The exponential in the working precision: an f32 one is within f32's rounding of the exact value.
trait Exp: WithDType {
    fn exp_(self) -> Self;
}
impl Exp for f32 {
    fn exp_(self) -> f32 {
        self.exp()
    }
}
impl Exp for f64 {
    fn exp_(self) -> f64 {
        self.exp()
    }
}

fn from_f64_vec<T: WithDType>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&x| T::from_f64(x)).collect()
}

/// Lanes of independent partial sums: lets the compiler vectorise a reduction without reassociating it freely
/// (the order is fixed by the lane count, so results stay deterministic).
const LANES: usize = 16;

/// Elements per span: each lane adds `SPAN / LANES` products in the working precision before the span's lanes are
/// summed in f64. Long spans keep the (serial) f64 summation a small share of the work; 16 terms per lane keep the
/// f32 rounding small.
const SPAN: usize = 256;

/// Sum of `a[j] * b[j]` in f64 via `LANES` partial sums per `SPAN` (bounded f32 rounding, vectorised).
fn dot_f64<T: WithDType>(a: &[T], b: &[T]) -> f64 {
    let mut total = 0f64;
    for (ca, cb) in a.chunks(SPAN).zip(b.chunks(SPAN)) {
        let mut acc = [T::from_f64(0.0); LANES];
        let mut ia = ca.chunks_exact(LANES);
        let mut ib = cb.chunks_exact(LANES);
        for (x, y) in (&mut ia).zip(&mut ib) {
            for l in 0..LANES {
                acc[l] += x[l] * y[l];
            }
        }
        let mut s: f64 = acc.iter().map(|v| v.to_f64()).sum();
        for (x, y) in ia.remainder().iter().zip(ib.remainder()) {
            s += (*x * *y).to_f64();
        }
        total += s;
    }
    total
}

/// Sum of `a` in f64 (same lane scheme as `dot_f64`).
fn sum_f64<T: WithDType>(a: &[T]) -> f64 {
    let mut total = 0f64;
    for ca in a.chunks(SPAN) {
        let mut acc = [T::from_f64(0.0); LANES];
        let mut it = ca.chunks_exact(LANES);
        for x in &mut it {
            for l in 0..LANES {
                acc[l] += x[l];
            }
        }
        total += acc.iter().map(|v| v.to_f64()).sum::<f64>() + it.remainder().iter().map(|v| v.to_f64()).sum::<f64>();
    }
    total
}

/// `dst (m x n) = [dst +] lhs (m x k) * rhs (k x n)`, row-major with explicit row strides, single-threaded (the
/// callers parallelise over samples or blocks, which keeps every result independent of the thread count).
#[allow(clippy::too_many_arguments)]
fn matmul<T: WithDType>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    accumulate: bool,
    lhs: &[T],
    lhs_transposed: bool,
    rhs: &[T],
    rhs_transposed: bool,
) {
    // Strides (column, row) of a row-major matrix, or of the transpose of one.
    let (lcs, lrs) = if lhs_transposed { (m as isize, 1) } else { (1, k as isize) };
    let (rcs, rrs) = if rhs_transposed { (k as isize, 1) } else { (1, n as isize) };
    assert!(dst.len() >= m * n && lhs.len() >= m * k && rhs.len() >= k * n);
    // SAFETY: the slices hold the m x n, m x k and k x n matrices the strides describe (checked above); gemm reads
    // lhs/rhs and writes dst only within those bounds, and dst does not alias the inputs (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lcs,
            lrs,
            rhs.as_ptr(),
            rcs,
            rrs,
            T::from_f64(1.0),
            T::from_f64(1.0),
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

mod activation;
mod batchnorm;
mod conv;
mod decoder;
mod frozen;
mod head;
mod logprob;
mod pool;
mod separable;
#[cfg(test)]
mod tests;

pub use activation::{relu, softmax_last_dim};
pub use batchnorm::{batch_norm_train, channel_affine_const, BatchStats};
pub use conv::{depthwise_conv, pointwise_conv};
pub use decoder::{causal_softmax, rms_norm, rope_to_heads, swiglu, RopeTables};
pub use frozen::{frozen_linear, frozen_scale, frozen_shift, linear_of_constant_input};
pub use head::head_logprobs;
pub use logprob::target_logprobs;
pub use pool::max_pool;
pub use separable::{sep_conv_train, SepConvParams};
