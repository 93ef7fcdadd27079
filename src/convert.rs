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

/// Writes `ck` to `out`: same dtypes are copied byte for byte from the memory map, float conversions go through f32
/// (exact when widening, round to nearest even when narrowing).
pub fn convert(
    ck: &Checkpoint,
    out: &std::path::Path,
    dtype: Option<Dtype>,
    opts: WriterOptions,
    exec: &Executor,
) -> Result<Written> {
    let writer = CheckpointWriter::create(out, plan(ck, dtype), opts)?;
    exec.write(writer, "convert", |_, decl| {
        let view = ck.tensor(&decl.name)?;
        if view.dtype == decl.dtype {
            crate::checkpoint::guard::check_stored(&view)?;
            return Ok(Produce::Bytes(view.data));
        }
        Ok(Produce::Elementwise(Box::new(move |r| view.f32_range(r))))
    })
}
