//! Evaluation along an interpolation path (`graft interpolate --eval-data`): write the points of a
//! `graft_ops::interpolate::Request`, evaluate each on the test split of one data set, append a `kind: interpolate`
//! results line per point, and record the metrics in the manifest.
//!
//! It lives in the trainer's crate because evaluating is candle's work: graft-ops (which writes the points) builds
//! without candle, and graft-study (experiments, reports) without the trainer; this crate sits above graft-ops, so
//! one call here does the whole workflow.

use std::path::PathBuf;

use graft_ops::interpolate::{self, Outcome, Request};

use super::data::DataSpec;
use super::{DataOptions, DeviceKind, EvalOptions, Split};
use crate::error::Result;
use crate::exec::Executor;

/// How every point of the path is evaluated.
#[derive(Clone, Debug)]
pub struct PathEval {
    /// The data, split with the data defaults; the points are measured on its test split.
    pub data: DataSpec,
    /// Seed of the split (the models' training seed).
    pub seed: u64,
    /// Append one results line per point here.
    pub results: Option<PathBuf>,
}

/// An interpolation, optionally evaluated point by point.
#[derive(Clone, Debug)]
pub struct PathRequest {
    pub path: Request,
    pub eval: Option<PathEval>,
}

/// Points evaluated per batch: a forward pass only, so larger than training's batches.
const EVAL_BATCH: usize = 512;

impl PathRequest {
    /// The checks that need no file.
    pub fn validate(&self) -> Result<()> {
        self.path.validate()
    }
}

/// Writes every point, evaluates each (when asked), then writes the manifest with the metrics.
pub fn run(request: &PathRequest, exec: &Executor) -> Result<Outcome> {
    request.validate()?;
    let path = &request.path;
    let points = interpolate::write_points(path, exec)?;
    let mut metrics = vec![None; points.len()];
    if let Some(eval) = &request.eval {
        let experiment = format!("interpolate {} -> {}", path.a.display(), path.b.display());
        let config = serde_json::json!({
            "a": path.a.display().to_string(), "b": path.b.display().to_string(), "data": eval.data,
        });
        for (p, m) in points.iter().zip(metrics.iter_mut()) {
            let opts = EvalOptions {
                checkpoint: p.path.clone(),
                arch: Default::default(),
                data: DataOptions::new(eval.data.clone()),
                split: Split::Test,
                batch: EVAL_BATCH,
                seed: eval.seed,
                device: DeviceKind::Cpu,
                results: None,
                experiment: None,
            };
            let out = super::run_eval(&opts)?;
            if let Some(r) = &eval.results {
                super::results::interpolate_line(&experiment, eval.seed, p.lambda, &config, &out.metrics).append(r)?;
            }
            *m = Some(serde_json::json!({
                "accuracy": out.metrics.accuracy, "f1_weighted": out.metrics.f1_weighted,
                "f1_macro": out.metrics.f1_macro, "loss": out.metrics.loss,
            }));
        }
    }
    interpolate::finish(path, points, metrics)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::WriterOptions;
    use crate::error::Error;

    #[test]
    fn an_evaluated_path_is_refused_before_any_file_is_opened() {
        let missing = PathBuf::from("/nonexistent/graft-path-test");
        let request = |steps| PathRequest {
            path: Request {
                a: missing.join("a"),
                b: missing.join("b"),
                steps,
                output: missing.join("out"),
                writer: WriterOptions::default(),
            },
            eval: Some(PathEval {
                data: DataSpec::parse(&missing.join("data").display().to_string()),
                seed: 0,
                results: Some(missing.join("r.jsonl")),
            }),
        };
        let exec = Executor::new(Some(1)).unwrap();
        let e = run(&request(1), &exec).unwrap_err();
        assert!(matches!(e, Error::Usage(_)) && e.to_string().contains("at least 2"), "{e:?}");
        assert!(request(2).validate().is_ok());
        assert!(!matches!(run(&request(2), &exec).unwrap_err(), Error::Usage(_)), "a valid request reads A");
    }
}
