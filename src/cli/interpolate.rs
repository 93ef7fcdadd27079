//! `graft interpolate A B --steps N -o DIR`: writes the checkpoints `(1 - l) A + l B`, `l = 0, 1/(N-1), ..., 1`, as
//! `DIR/step-000` ... and a manifest `DIR/interpolation.json`.
//!
//! Evaluation extension point: `--eval` (evaluating each point for a loss-barrier curve) belongs to the trainer's
//! `graft eval`, a separate issue. It plugs in after `write_point` returns: evaluate `point.path`, add the metrics to
//! that point's record in the manifest and the JSON output. Until then this command writes checkpoints only.

use std::path::PathBuf;

use super::{emit, parse_shard_size, Global, OutputArgs};
use crate::checkpoint::{Checkpoint, DEFAULT_MAX_SHARD_SIZE};
use crate::error::{Error, Result};
use crate::exec::Executor;
use crate::interpolate::{check_compatible, lambdas, write_point, Point};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub values: super::ValueArgs,
    /// The path's start (l = 0).
    a: PathBuf,
    /// The path's end (l = 1), typically a model aligned to A with `graft align`.
    b: PathBuf,
    /// Number of points, end points included.
    #[arg(long, default_value_t = 25, value_parser = super::steps_arg)]
    steps: usize,
    /// Output directory: one checkpoint directory per point (`step-000`, ...) and `interpolation.json`.
    #[arg(short = 'o', long = "output", value_name = "DIR")]
    output: PathBuf,
    /// Shard size limit of each point, e.g. 5GB (default, as Hugging Face), 500MB, 2GiB.
    #[arg(long, value_parser = parse_shard_size, default_value_t = DEFAULT_MAX_SHARD_SIZE)]
    max_shard_size: u64,
    /// Replace checkpoints already at the output paths.
    #[arg(long)]
    force: bool,
    /// Print the manifest as one JSON document.
    #[arg(long)]
    json: bool,
    /// Evaluate every point on this data (as `graft eval --data` takes it): test-split metrics per lambda, in the
    /// manifest and, with --results, as `kind: interpolate` results lines for `graft report`'s loss-barrier charts.
    #[arg(long, value_name = "DATA", value_parser = super::data_arg)]
    eval_data: Option<crate::train::data::DataSpec>,
    /// Seed of the data split used by --eval-data (use the models' training seed).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Append one results line per point to this file (needs --eval-data).
    #[arg(long, requires = "eval_data")]
    results: Option<PathBuf>,
}

pub fn run(args: Args, global: &Global) -> Result<()> {
    let ls = lambdas(args.steps)?;
    let (a, b) = (Checkpoint::open(&args.a)?, Checkpoint::open(&args.b)?);
    check_compatible(&a, &b)?;
    let out = OutputArgs { output: args.output.clone(), max_shard_size: args.max_shard_size, force: args.force };
    let dir = &out.output;
    if dir.extension().is_some_and(|e| e == "safetensors") {
        return Err(Error::usage("interpolate writes one checkpoint per step: give a directory as -o"));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let exec = Executor::new(global.threads)?;
    let mut inputs = a.files();
    inputs.extend(b.files());
    let mut points = Vec::new();
    for (index, &lambda) in ls.iter().enumerate() {
        let path = dir.join(format!("step-{index:03}"));
        let mut opts = out.writer_options(inputs.clone());
        opts.carry_from = a.dir().map(|d| d.to_path_buf());
        write_point(&a, &b, lambda, &path, opts, &exec)?;
        points.push(Point { index, lambda, path });
    }
    let mut metrics: Vec<Option<serde_json::Value>> = vec![None; points.len()];
    if let Some(data) = &args.eval_data {
        let experiment = format!("interpolate {} -> {}", args.a.display(), args.b.display());
        let config =
            serde_json::json!({ "a": args.a.display().to_string(), "b": args.b.display().to_string(), "data": data });
        for (p, m) in points.iter().zip(metrics.iter_mut()) {
            let opts = crate::train::EvalOptions {
                checkpoint: p.path.clone(),
                arch: Default::default(),
                data: crate::train::DataOptions::new(data.clone()),
                split: crate::train::Split::Test,
                batch: 512,
                seed: args.seed,
                device: crate::train::DeviceKind::Cpu,
                results: None,
                experiment: None,
            };
            let out = super::with_threads(global, || crate::train::run_eval(&opts))?;
            if let Some(r) = &args.results {
                let line =
                    crate::train::results::interpolate_line(&experiment, args.seed, p.lambda, &config, &out.metrics);
                line.append(r)?;
            }
            *m = Some(serde_json::json!({
                "accuracy": out.metrics.accuracy, "f1_weighted": out.metrics.f1_weighted,
                "f1_macro": out.metrics.f1_macro, "loss": out.metrics.loss,
            }));
        }
    }
    let points_json: Vec<serde_json::Value> = points
        .iter()
        .zip(&metrics)
        .map(|(p, m)| {
            let mut v = serde_json::to_value(p).unwrap();
            if let Some(m) = m {
                v["metrics"] = m.clone();
            }
            v
        })
        .collect();
    let manifest = serde_json::json!({
        "a": args.a.display().to_string(),
        "b": args.b.display().to_string(),
        "steps": args.steps,
        "points": points_json,
    });
    let manifest_path = dir.join("interpolation.json");
    crate::files::write_atomic(&manifest_path, (serde_json::to_string_pretty(&manifest).unwrap() + "\n").as_bytes())?;
    if args.json {
        emit(&(manifest.to_string() + "\n"))
    } else {
        let mut s = String::new();
        for (p, m) in points.iter().zip(&metrics) {
            let acc = m
                .as_ref()
                .map(|m| format!("  accuracy {:.4}", m["accuracy"].as_f64().unwrap_or(f64::NAN)))
                .unwrap_or_default();
            s.push_str(&format!("{:>4}  lambda {:.4}  {}{acc}\n", p.index, p.lambda, p.path.display()));
        }
        s.push_str(&format!("wrote {} checkpoints and {}\n", points.len(), manifest_path.display()));
        emit(&s)
    }
}
