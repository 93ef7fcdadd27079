//! `graft experiment PLAN.yml -o RUNDIR` and `graft demo`: run the SNR-selective merging study (on classifiers, or
//! with `kind: llm` on a causal LM), then report it.

use std::path::{Path, PathBuf};

use super::{emit, report::render_text, Global};
use crate::error::{Error, Result};
use crate::experiment::{self, Plan, Study};
use crate::report::{bootstrap::DEFAULT_RESAMPLES, generate, Options};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The study plan (YAML; see docs/experiment.md).
    plan: PathBuf,
    /// Run directory: checkpoints, logs, results.jsonl and the report. A rerun skips finished steps.
    #[arg(short = 'o', long = "output")]
    output: PathBuf,
    /// Do not build the report at the end.
    #[arg(long)]
    no_report: bool,
}

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Run directory (a rerun resumes it).
    #[arg(short = 'o', long = "output", default_value = "graft-demo")]
    output: PathBuf,
}

/// The demo's data: 1,797 real 8x8 digits (UCI, CC BY 4.0; fixtures/data/digits/LICENSE.md), built into the binary
/// so the demo runs from any directory.
const DIGITS_IMAGES: &[u8] = include_bytes!("../../fixtures/data/digits/train-images-idx3-ubyte");
const DIGITS_LABELS: &[u8] = include_bytes!("../../fixtures/data/digits/train-labels-idx1-ubyte");

pub fn run(args: Args, global: &Global) -> Result<()> {
    let mut plan = Study::load(&args.plan)?;
    let threads = match &mut plan {
        Study::Classifier(p) => &mut p.threads,
        Study::Llm(p) => &mut p.threads,
    };
    if threads.is_none() {
        *threads = global.threads;
    }
    study(&plan, &args.output, !args.no_report)
}

pub fn demo(args: DemoArgs, global: &Global) -> Result<()> {
    let data = args.output.join("data").join("digits");
    std::fs::create_dir_all(&data).map_err(|e| Error::io(&data, e))?;
    for (name, bytes) in [("train-images-idx3-ubyte", DIGITS_IMAGES), ("train-labels-idx1-ubyte", DIGITS_LABELS)] {
        let p = data.join(name);
        if std::fs::read(&p).ok().as_deref() != Some(bytes) {
            std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))?;
        }
    }
    let mut plan = Plan::demo(&data);
    plan.threads = global.threads;
    study(&Study::Classifier(plan), &args.output, true)
}

fn study(plan: &Study, rundir: &Path, report: bool) -> Result<()> {
    let program = std::env::current_exe().map_err(|e| Error::io("<graft executable>", e))?;
    let t = std::time::Instant::now();
    let summary = match plan {
        Study::Classifier(p) => experiment::run(p, rundir, &program)?,
        Study::Llm(p) => experiment::run_llm(p, rundir, &program)?,
    };
    let failed = summary.failed();
    eprintln!(
        "graft: {} steps ({} failed or blocked) in {:.1} s; {} results lines in {}",
        summary.outcomes.len(),
        failed.len(),
        t.elapsed().as_secs_f64(),
        summary.lines,
        summary.results.display()
    );
    if report && summary.lines > 0 {
        let r = generate(
            std::slice::from_ref(&summary.results),
            &rundir.join("report"),
            &Options { seed: 0, resamples: DEFAULT_RESAMPLES },
        )?;
        emit(&render_text(&r))?;
    }
    if failed.is_empty() {
        Ok(())
    } else {
        for o in &failed {
            eprintln!("graft: step {} did not finish: {}", o.id, serde_json::to_string(&o.status).unwrap_or_default());
        }
        Err(Error::invalid(format!(
            "{} of {} steps did not finish (logs in {})",
            failed.len(),
            summary.outcomes.len(),
            rundir.join("logs").display()
        )))
    }
}
