//! Linear paths between two checkpoints: the points `(1 - l) A + l B` for `l` evenly spaced in [0, 1], written as
//! checkpoints, for loss-barrier curves (typically between a model and another model aligned to it).
//!
//! Float tensors are mixed in f32 and stored in A's dtype (round to nearest even); the end points are A's and B's
//! stored bytes exactly. Non-float tensors (BatchNorm's `num_batches_tracked`, position ids) are A's. BatchNorm running
//! statistics are interpolated like any weight; an evaluator that wants them recomputed on data does so itself.
//!
//! `graft interpolate` is a typed `Request`: `validate` checks it without opening a file, `run` writes every point
//! (`write_points`) and then the manifest `interpolation.json` (`finish`), last, so that its presence marks a
//! complete run. Evaluating the points (`graft interpolate --eval-data`) needs the trainer, a layer above this crate:
//! `graft_train::train::path` writes the points with `write_points`, evaluates each one, and hands the metrics to
//! `finish`, which records them in the manifest.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::checkpoint::{Checkpoint, CheckpointWriter, TensorDecl, WriterOptions, Written};
use crate::error::{Arg, Error, Result};
use crate::exec::{Executor, Produce, Read};

/// The points between two checkpoints, written under one directory.
#[derive(Clone, Debug)]
pub struct Request {
    /// The path's start (lambda = 0).
    pub a: PathBuf,
    /// The path's end (lambda = 1).
    pub b: PathBuf,
    /// Number of points, end points included.
    pub steps: usize,
    /// The directory of the points (`step-000`, ...) and the manifest.
    pub output: PathBuf,
    /// Shard size, metadata and overwrite policy of each point; the inputs' files are added to `inputs`.
    pub writer: WriterOptions,
}

/// What `run` (or `finish`) wrote.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub points: Vec<Point>,
    /// Each point's metrics when the path was evaluated (in `points`' order).
    pub metrics: Vec<Option<serde_json::Value>>,
    /// The manifest as written.
    pub manifest: serde_json::Value,
    pub manifest_path: PathBuf,
}

impl Request {
    /// The checks that need no file.
    pub fn validate(&self) -> Result<()> {
        lambdas(self.steps)?;
        if self.output.extension().is_some_and(|e| e == "safetensors") {
            return Err(Error::usage(format!(
                "interpolate writes one checkpoint per step: give a directory as {}",
                Arg::Output
            )));
        }
        Ok(())
    }

    /// Where the manifest goes.
    pub fn manifest_path(&self) -> PathBuf {
        self.output.join("interpolation.json")
    }
}

/// Writes the path's points (after checking that A and B fit together), not yet the manifest.
pub fn write_points(request: &Request, exec: &Executor) -> Result<Vec<Point>> {
    request.validate()?;
    let ls = lambdas(request.steps)?;
    let (a, b) = (Checkpoint::open(&request.a)?, Checkpoint::open(&request.b)?);
    check_compatible(&a, &b)?;
    let dir = &request.output;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut inputs = a.files();
    inputs.extend(b.files());
    let mut points = Vec::new();
    for (index, &lambda) in ls.iter().enumerate() {
        let path = dir.join(format!("step-{index:03}"));
        let mut opts = request.writer.clone();
        opts.inputs.extend(inputs.iter().cloned());
        opts.carry_from = a.dir().map(|d| d.to_path_buf());
        write_point(&a, &b, lambda, &path, opts, exec)?;
        points.push(Point { index, lambda, path });
    }
    Ok(points)
}

/// Writes the manifest of the written `points`, with each point's `metrics` where it has them (one entry per point).
pub fn finish(request: &Request, points: Vec<Point>, metrics: Vec<Option<serde_json::Value>>) -> Result<Outcome> {
    assert_eq!(points.len(), metrics.len(), "one metrics entry per point");
    let records: Vec<serde_json::Value> = points
        .iter()
        .zip(&metrics)
        .map(|(p, m)| {
            let mut v = serde_json::to_value(p).expect("a point serialises");
            if let Some(m) = m {
                v["metrics"] = m.clone();
            }
            v
        })
        .collect();
    let manifest = serde_json::json!({
        "a": request.a.display().to_string(),
        "b": request.b.display().to_string(),
        "steps": request.steps,
        "points": records,
    });
    let manifest_path = request.manifest_path();
    let text = serde_json::to_string_pretty(&manifest).expect("a manifest serialises") + "\n";
    crate::files::write_atomic(&manifest_path, text.as_bytes())?;
    Ok(Outcome { points, metrics, manifest, manifest_path })
}

/// Writes the points and the manifest (see the module header).
pub fn run(request: &Request, exec: &Executor) -> Result<Outcome> {
    let points = write_points(request, exec)?;
    let none = vec![None; points.len()];
    finish(request, points, none)
}

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
    out: &Path,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A request whose inputs and output do not exist: a check that touched them would fail with an I/O error.
    fn request(steps: usize, output: &str) -> Request {
        Request {
            a: PathBuf::from("/nonexistent/graft-interpolate-test/a"),
            b: PathBuf::from("/nonexistent/graft-interpolate-test/b"),
            steps,
            output: PathBuf::from("/nonexistent/graft-interpolate-test").join(output),
            writer: WriterOptions::default(),
        }
    }

    #[test]
    fn refusals_come_before_any_file_is_opened() {
        let exec = Executor::new(Some(1)).unwrap();
        for (r, want) in [
            (request(1, "out"), "steps must be at least 2 (both end points), not 1"),
            (request(0, "out"), "not 0"),
            (request(3, "out.safetensors"), "writes one checkpoint per step: give a directory as output"),
        ] {
            let e = r.validate().unwrap_err();
            assert!(matches!(e, Error::Usage(_)) && e.to_string().contains(want), "{e}");
            let e = run(&r, &exec).unwrap_err();
            assert!(matches!(e, Error::Usage(_)), "run refuses it the same way, before opening A: {e:?}");
        }
        let ok = request(2, "out");
        assert!(ok.validate().is_ok());
        assert!(matches!(run(&ok, &exec).unwrap_err(), Error::Io { .. } | Error::Format { .. }), "then A is opened");
    }

    #[test]
    fn lambdas_are_evenly_spaced_with_exact_ends() {
        assert_eq!(lambdas(5).unwrap(), [0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(lambdas(2).unwrap(), [0.0, 1.0]);
    }
}
