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
    /// The path's start (l = 0).
    a: PathBuf,
    /// The path's end (l = 1), typically a model aligned to A with `graft align`.
    b: PathBuf,
    /// Number of points, end points included.
    #[arg(long, default_value_t = 25)]
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
    let manifest = serde_json::json!({
        "a": args.a.display().to_string(),
        "b": args.b.display().to_string(),
        "steps": args.steps,
        "points": points,
    });
    let manifest_path = dir.join("interpolation.json");
    std::fs::write(&manifest_path, serde_json::to_string_pretty(&manifest).unwrap() + "\n")
        .map_err(|e| Error::io(&manifest_path, e))?;
    if args.json {
        emit(&(manifest.to_string() + "\n"))
    } else {
        let mut s = String::new();
        for p in &points {
            s.push_str(&format!("{:>4}  lambda {:.4}  {}\n", p.index, p.lambda, p.path.display()));
        }
        s.push_str(&format!("wrote {} checkpoints and {}\n", points.len(), manifest_path.display()));
        emit(&s)
    }
}
