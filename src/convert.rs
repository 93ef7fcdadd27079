//! Re-writing a checkpoint: re-sharding, changing the dtype of float tensors, renaming nothing. The simplest user of
//! the pipeline (open -> plan -> stream -> write), and the round trip that proves reader and writer agree.

use crate::checkpoint::{Checkpoint, CheckpointWriter, Dtype, TensorDecl, WriterOptions, Written};
use crate::error::Result;
use crate::exec::{Executor, Produce};

/// Plans `ck`'s tensors in storage order; float tensors take `dtype` when given, others keep theirs.
pub fn plan(ck: &Checkpoint, dtype: Option<Dtype>) -> Vec<TensorDecl> {
    ck.infos()
        .iter()
        .map(|t| {
            let d = match dtype {
                Some(d) if t.dtype.is_float() => d,
                _ => t.dtype,
            };
            TensorDecl::new(t.name.clone(), d, t.shape.clone())
        })
        .collect()
}

/// Writes `ck` to `out`: every tensor is an input written as it is (`Produce::Input`), so same dtypes are copied byte
/// for byte from the memory map, float conversions go through f32 (exact when widening, round to nearest even when
/// narrowing), and each tensor's pages are released once written.
pub fn convert(
    ck: &Checkpoint,
    out: &std::path::Path,
    dtype: Option<Dtype>,
    opts: WriterOptions,
    exec: &Executor,
) -> Result<Written> {
    let writer = CheckpointWriter::create(out, plan(ck, dtype), opts)?;
    exec.write(writer, "convert", |_, decl| Produce::input(ck, &decl.name))
}
