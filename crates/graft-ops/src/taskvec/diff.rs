//! `graft diff`: the task vector tau = fl32(theta_ft - theta_base) of a fine-tuned model, written as a checkpoint with
//! the base's tensor names and shapes.
//!
//! Only float tensors have a task vector. Non-float tensors (`num_batches_tracked`, `position_ids`) are left out, or
//! carried with the fine-tuned model's bytes on request. Tensors whose delta is zero everywhere are left out unless
//! kept on request: `graft apply` treats a tensor missing from a vector as a zero delta, so leaving them out changes
//! nothing but the file size. The output records which models it came from under `TASK_VECTOR_OF`.
//!
//! `Request` is the whole command as a typed request (checked without opening a file by `validate`), and `run` its
//! one entry point: open both models, protect them from being overwritten, write the vector.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::matching::{pair, Coverage, Skipped};
use super::{canonical_display, delta_range, TASK_VECTOR_OF};
use crate::checkpoint::{Checkpoint, CheckpointWriter, Dtype, TensorDecl, WriterOptions};
use crate::error::{Arg, Error, Result};
use crate::exec::{chunk_ranges, Executor, Produce, Read};

#[derive(Clone, Debug)]
pub struct DiffOptions {
    /// Dtype of the written deltas (the default keeps them exact in f32).
    pub dtype: Dtype,
    /// Carry non-float tensors with the fine-tuned model's bytes instead of leaving them out.
    pub keep_nonfloat: bool,
    /// Write tensors whose delta is zero everywhere instead of leaving them out.
    pub keep_equal: bool,
    /// Skip tensors that do not pair with the base instead of failing.
    pub allow_missing: bool,
}

impl Default for DiffOptions {
    fn default() -> Self {
        DiffOptions { dtype: Dtype::F32, keep_nonfloat: false, keep_equal: false, allow_missing: false }
    }
}

/// What `diff` wrote and what it left out.
#[derive(Clone, Debug, Serialize)]
pub struct DiffReport {
    pub finetuned: String,
    pub base: String,
    pub output: String,
    pub files: Vec<String>,
    /// Dtype of the written deltas.
    pub dtype: String,
    /// Tensors written (deltas and carried non-float tensors).
    pub tensors: usize,
    /// Elements of the written deltas.
    pub params: u64,
    pub bytes: u64,
    /// Non-float tensors carried with the fine-tuned model's bytes (`--keep-nonfloat`).
    pub carried_nonfloat: Vec<String>,
    /// Non-float tensors left out.
    pub skipped_nonfloat: Vec<String>,
    /// Float tensors whose delta is zero everywhere, left out.
    pub skipped_equal: Vec<String>,
    /// Tensors that do not pair with the base, left out under `allow_missing`.
    pub skipped_mismatched: Vec<Skipped>,
}

enum Entry {
    Delta(String),
    Carry(String),
}

/// One `diff`: the task vector of `finetuned` against `base`, written to `output`.
#[derive(Clone, Debug)]
pub struct Request {
    pub finetuned: PathBuf,
    pub base: PathBuf,
    pub output: PathBuf,
    /// Shard size, metadata and overwrite policy; both models' files are added to `inputs`.
    pub writer: WriterOptions,
    pub options: DiffOptions,
}

impl Request {
    /// The checks that need no file: the written dtype is a float type.
    pub fn validate(&self) -> Result<()> {
        let dtype = self.options.dtype;
        if !dtype.is_float() {
            return Err(Error::usage(format!("{} {dtype}: a task vector needs a float dtype", Arg::Dtype)));
        }
        Ok(())
    }
}

/// Carries out one diff (see the module header).
pub fn run(request: &Request, exec: &Executor) -> Result<DiffReport> {
    request.validate()?;
    let ft = Checkpoint::open(&request.finetuned)?;
    let base = Checkpoint::open(&request.base)?;
    let mut writer = request.writer.clone();
    writer.inputs.extend(ft.files());
    writer.inputs.extend(base.files());
    diff(&ft, &base, &request.options, exec, &request.output, writer)
}

/// Writes the task vector of `ft` against `base` to `out`.
pub fn diff(
    ft: &Checkpoint,
    base: &Checkpoint,
    opts: &DiffOptions,
    exec: &Executor,
    out: &Path,
    mut writer_opts: WriterOptions,
) -> Result<DiffReport> {
    if !opts.dtype.is_float() {
        return Err(Error::usage(format!("a task vector needs a float dtype, not {}", opts.dtype)));
    }
    let pairing = pair(base, ft, Coverage::Full, opts.allow_missing)?;
    let (float, nonfloat): (Vec<String>, Vec<String>) =
        pairing.common.into_iter().partition(|n| base.info(n).is_some_and(|t| t.dtype.is_float()));

    let mut equal = vec![false; float.len()];
    if !opts.keep_equal {
        let costs: Vec<u64> = float.iter().map(|n| base.info(n).map_or(0, |t| t.numel() as u64)).collect();
        exec.map_ordered(
            &costs,
            crate::exec::WINDOW_BYTES / 4,
            "compare",
            |i| delta_is_zero(ft, base, &float[i]),
            |i, z| {
                equal[i] = z;
                Ok(())
            },
        )?;
    }

    let mut entries = Vec::new();
    let mut decls = Vec::new();
    let mut skipped_equal = Vec::new();
    for (name, &eq) in float.iter().zip(&equal) {
        if eq {
            skipped_equal.push(name.clone());
            continue;
        }
        let shape = base.info(name).map(|t| t.shape.clone()).unwrap_or_default();
        decls.push(TensorDecl::new(name.clone(), opts.dtype, shape));
        entries.push(Entry::Delta(name.clone()));
    }
    let (carried_nonfloat, skipped_nonfloat) =
        if opts.keep_nonfloat { (nonfloat, Vec::new()) } else { (Vec::new(), nonfloat) };
    for name in &carried_nonfloat {
        let t = ft.tensor(name)?;
        decls.push(TensorDecl::new(name.clone(), t.dtype, t.shape.to_vec()));
        entries.push(Entry::Carry(name.clone()));
    }
    let params: u64 =
        decls.iter().zip(&entries).filter(|(_, e)| matches!(e, Entry::Delta(_))).map(|(d, _)| d.numel() as u64).sum();

    let origin =
        serde_json::json!({ "finetuned": canonical_display(ft.path()), "base": canonical_display(base.path()) });
    writer_opts.metadata.insert(TASK_VECTOR_OF.to_string(), origin.to_string());
    let writer = CheckpointWriter::create(out, decls, writer_opts)?;
    let written = exec.write(writer, "diff", |i, _decl| match &entries[i] {
        Entry::Carry(name) => Produce::input(ft, name),
        Entry::Delta(name) => {
            let (f, b) = (Read::new(ft, name)?, Read::new(base, name)?);
            Ok(Produce::elementwise(vec![f, b], move |r| delta_range(&f.tensor, &b.tensor, r)))
        }
    })?;

    Ok(DiffReport {
        finetuned: ft.path().display().to_string(),
        base: base.path().display().to_string(),
        output: written.path.display().to_string(),
        files: written.files.iter().map(|f| f.display().to_string()).collect(),
        dtype: opts.dtype.to_string(),
        tensors: written.tensors,
        params,
        bytes: written.total_bytes,
        carried_nonfloat,
        skipped_nonfloat,
        skipped_equal,
        skipped_mismatched: pairing.skipped,
    })
}

/// Whether `fl32(ft - base)` is zero for every element of tensor `name` (stops at the first chunk that is not).
pub fn delta_is_zero(ft: &Checkpoint, base: &Checkpoint, name: &str) -> Result<bool> {
    let (f, b) = (Read::new(ft, name)?, Read::new(base, name)?);
    for r in chunk_ranges(f.tensor.numel()) {
        let d = delta_range(&f.tensor, &b.tensor, r.clone())?;
        f.release_range(r.clone());
        b.release_range(r);
        if d.iter().any(|&x| x != 0.0) {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_float_dtype_is_refused_before_either_model_is_opened() {
        let mut request = Request {
            finetuned: "/nonexistent/graft-diff/ft".into(),
            base: "/nonexistent/graft-diff/base".into(),
            output: "/nonexistent/graft-diff/tv".into(),
            writer: WriterOptions::default(),
            options: DiffOptions { dtype: Dtype::I64, ..DiffOptions::default() },
        };
        let exec = Executor::new(Some(1)).unwrap();
        for e in [request.validate().unwrap_err(), run(&request, &exec).unwrap_err()] {
            assert!(matches!(e, Error::Usage(_)), "{e}");
            assert_eq!(e.to_string(), "dtype I64: a task vector needs a float dtype");
        }
        request.options.dtype = Dtype::BF16;
        request.validate().unwrap();
        let e = run(&request, &exec).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/graft-diff/ft"), "the first file opened is the model: {e}");
    }
}
