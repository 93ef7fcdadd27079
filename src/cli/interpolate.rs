//! `graft interpolate A B --steps N -o DIR`: writes the checkpoints `(1 - l) A + l B`, `l = 0, 1/(N-1), ..., 1`, as
//! `DIR/step-000` ... and a manifest `DIR/interpolation.json`; with `--eval-data`, evaluates every point on the way
//! (`train::path`, one library call). This file builds the request and prints the outcome.

use std::path::PathBuf;

use super::{emit, parse_shard_size, Global, OutputArgs};
use crate::checkpoint::DEFAULT_MAX_SHARD_SIZE;
use crate::error::Result;
use crate::exec::Executor;
use crate::interpolate;
use crate::train::path::{self, PathEval, PathRequest};

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
    let out = OutputArgs { output: args.output.clone(), max_shard_size: args.max_shard_size, force: args.force };
    let request = PathRequest {
        path: interpolate::Request {
            a: args.a.clone(),
            b: args.b.clone(),
            steps: args.steps,
            output: args.output.clone(),
            writer: out.writer_options(Vec::new()),
        },
        eval: args.eval_data.clone().map(|data| PathEval { data, seed: args.seed, results: args.results.clone() }),
    };
    request.validate()?;
    // The thread settings reach candle's evaluation as well as the executor's writes.
    let outcome = super::with_threads(global, || path::run(&request, &Executor::new(global.threads)?))?;
    if args.json {
        emit(&(outcome.manifest.to_string() + "\n"))
    } else {
        let mut s = String::new();
        for (p, m) in outcome.points.iter().zip(&outcome.metrics) {
            let acc = m
                .as_ref()
                .map(|m| format!("  accuracy {:.4}", m["accuracy"].as_f64().unwrap_or(f64::NAN)))
                .unwrap_or_default();
            s.push_str(&format!("{:>4}  lambda {:.4}  {}{acc}\n", p.index, p.lambda, p.path.display()));
        }
        s.push_str(&format!("wrote {} checkpoints and {}\n", outcome.points.len(), outcome.manifest_path.display()));
        emit(&s)
    }
}
