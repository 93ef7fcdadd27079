//! Task vectors: tau = theta_ft - theta_base, task arithmetic theta = theta_base + sum lambda_i tau_i, cosine
//! similarity of task vectors, and the consistency analysis of a merge against its experts.
//!
//! Every entry point streams tensor by tensor (and chunk by chunk for large tensors) through `exec::Executor`, so
//! memory is bounded by a few chunks per worker whatever the model size: writes hand the executor their inputs as
//! `exec::Read`s and it releases their pages; reductions release each range they read (`Read::take_f32`). The per-element arithmetic is the same
//! everywhere: inputs are widened to f32, a delta is the f32 difference `fl32(ft - base)` (what `graft diff` writes),
//! sums and reductions run in f64, and results are narrowed with round-to-nearest-even.
//!
//! - `matching`: pairing the tensors of two checkpoints by name, shape and kind (float or not).
//! - `diff`: writing a task vector checkpoint (and `diff` as a typed request).
//! - `apply`: task arithmetic onto a base (and the rounding bound of diff-then-apply).
//! - `similarity`: norms, zero fractions, cosine and sign agreement between task vectors, whole-model or grouped.
//! - `consistency`: cos(dM - dB, dA - dB) and cos(dM - dA, dB - dA) for a merge M of experts A and B.
//! - `compare`: `graft similarity` as a typed request and its one entry point (reports, a zoo's pairs, consistency).

use std::ops::Range;
use std::path::Path;

use crate::checkpoint::{TensorView, INDEX_NAME, SINGLE_NAME};
use crate::error::Result;

pub mod apply;
pub mod compare;
pub mod consistency;
pub mod diff;
pub mod matching;
pub mod similarity;

/// `__metadata__` key of a task vector written by `graft diff`: JSON `{"finetuned": path, "base": path}`.
pub const TASK_VECTOR_OF: &str = "graft.task_vector_of";

/// `__metadata__` key of a merge output written by `graft merge`: a JSON array of the names of the merged tensors.
pub const MERGED_TENSORS: &str = "graft.merged_tensors";

/// `__metadata__` key of an `graft apply` output: JSON `{"base": path, "terms": [{"path", "kind", "lambda"}]}`.
pub const TASK_ARITHMETIC: &str = "graft.task_arithmetic";

/// The task vector entries `out[i] = fl32(ft[i] - base[i])`.
pub fn delta(ft: &[f32], base: &[f32]) -> Vec<f32> {
    debug_assert_eq!(ft.len(), base.len());
    ft.iter().zip(base).map(|(f, b)| f - b).collect()
}

/// The task vector entries of elements `range` of one tensor, `fl32(ft - base)`.
pub fn delta_range(ft: &TensorView, base: &TensorView, range: Range<usize>) -> Result<Vec<f32>> {
    let mut d = ft.f32_range(range.clone())?;
    let b = base.f32_range(range)?;
    for (x, y) in d.iter_mut().zip(&b) {
        *x -= y;
    }
    Ok(d)
}

/// A checkpoint's identity as recorded in metadata and compared across commands: the absolute path, and for the
/// `model.safetensors` or index file of a directory, the directory (both open the same checkpoint).
pub fn canonical_display(path: &Path) -> String {
    let p = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let is_dir_entry = p.file_name().is_some_and(|n| n == SINGLE_NAME || n == INDEX_NAME);
    match p.parent() {
        Some(dir) if is_dir_entry => dir.display().to_string(),
        _ => p.display().to_string(),
    }
}

/// `names` as a short list for messages: the first few, then how many more.
pub fn name_list<S: AsRef<str>>(names: &[S]) -> String {
    const SHOWN: usize = 5;
    let mut s: Vec<String> = names.iter().take(SHOWN).map(|n| n.as_ref().to_string()).collect();
    if names.len() > SHOWN {
        s.push(format!("and {} more", names.len() - SHOWN));
    }
    s.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_is_the_f32_difference() {
        assert_eq!(delta(&[1.5, -2.0, 0.25], &[1.0, -2.0, 1.0]), vec![0.5, 0.0, -0.75]);
    }

    #[test]
    fn name_lists_are_capped() {
        assert_eq!(name_list(&["a", "b"]), "a, b");
        let many: Vec<String> = (0..8).map(|i| format!("t{i}")).collect();
        assert_eq!(name_list(&many), "t0, t1, t2, t3, t4, and 3 more");
    }
}
