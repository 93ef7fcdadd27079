//! Linear paths between two checkpoints: the points `(1 - l) A + l B` for `l` evenly spaced in [0, 1], written as
//! checkpoints, for loss-barrier curves (typically between a model and another model aligned to it).
//!
//! Float tensors are mixed in f32 and stored in A's dtype (round to nearest even); the end points are A's and B's
//! stored bytes exactly. Non-float tensors (BatchNorm's `num_batches_tracked`, position ids) are A's. BatchNorm running
//! statistics are interpolated like any weight; an evaluator that wants them recomputed on data does so itself.
//!
//! Extension point for evaluation: `Point` (index, lambda, path) is what an evaluator needs. The trainer's
//! `graft eval` (a separate issue) plugs in by evaluating each written `Point::path` and adding its metrics to the
//! point's JSON record in `graft interpolate --eval`; nothing here depends on it.

use std::path::PathBuf;

use serde::Serialize;

use crate::checkpoint::{Checkpoint, CheckpointWriter, TensorDecl, WriterOptions, Written};
use crate::error::{Arg, Error, Result};
use crate::exec::{Executor, Produce, Read};

/// One point of the path.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    pub index: usize,
    /// Weight of B: the point is `(1 - lambda) A + lambda B`.
    pub lambda: f64,
    pub path: PathBuf,
}

/// `steps` evenly spaced weights from 0 to 1 inclusive.
pub fn lambdas(steps: usize) -> Result<Vec<f64>> {
    if steps < 2 {
        return Err(Error::usage(format!("{} must be at least 2 (both end points), not {steps}", Arg::Steps)));
    }
    Ok((0..steps).map(|i| i as f64 / (steps - 1) as f64).collect())
}

/// Checks that A and B have the same tensor names and shapes, with float tensors where the other has them.
pub fn check_compatible(a: &Checkpoint, b: &Checkpoint) -> Result<()> {
    for t in a.infos() {
        let u = b.tensor(&t.name)?;
        if u.shape != t.shape.as_slice() {
            return Err(Error::tensor(u.file, &t.name, format!("shape {:?} differs from A's {:?}", u.shape, t.shape)));
        }
        // Floats mix (widened to f32); an integer tensor must meet the same integer dtype, or B's would be lost.
        if t.dtype.is_float() != u.dtype.is_float() || (!t.dtype.is_float() && t.dtype != u.dtype) {
            return Err(Error::tensor(
                u.file,
                &t.name,
                format!("dtype {} cannot be mixed with {} in {}", u.dtype, t.dtype, a.path().display()),
            ));
        }
    }
    if let Some(extra) = b.names().find(|n| !a.contains(n)) {
        return Err(Error::tensor(b.path(), extra, format!("not present in {}", a.path().display())));
    }
    Ok(())
}

/// Writes the point `(1 - lambda) A + lambda B` (tensors in A's order and dtypes).
pub fn write_point(
    a: &Checkpoint,
    b: &Checkpoint,
    lambda: f64,
    out: &std::path::Path,
    opts: WriterOptions,
    exec: &Executor,
) -> Result<Written> {
    let decls: Vec<TensorDecl> =
        a.infos().iter().map(|t| TensorDecl::new(t.name.clone(), t.dtype, t.shape.clone())).collect();
    let writer = CheckpointWriter::create(out, decls, opts)?;
    let (wa, wb) = ((1.0 - lambda) as f32, lambda as f32);
    exec.write(writer, "interpolate", |_, decl| {
        let (ra, rb) = (Read::new(a, &decl.name)?, Read::new(b, &decl.name)?);
        let (x, y) = (ra.tensor, rb.tensor);
        if !x.is_float() || lambda == 0.0 {
            return Ok(Produce::Input(ra));
        }
        if lambda == 1.0 && y.dtype == x.dtype {
            return Ok(Produce::Input(rb));
        }
        Ok(Produce::elementwise(vec![ra, rb], move |r| {
            let xs = x.f32_range(r.clone())?;
            let ys = y.f32_range(r)?;
            Ok(xs.iter().zip(&ys).map(|(&p, &q)| wa * p + wb * q).collect())
        }))
    })
}
