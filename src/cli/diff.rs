//! `graft diff FINETUNED --base BASE -o TV`: writes the task vector of a fine-tuned model. The flags become a
//! `taskvec::diff::Request`, carried out by `diff::run`; this file prints its report.

use std::fmt::Write;
use std::path::PathBuf;

use super::{emit, human_bytes, human_count, Global, OutputArgs};
use crate::checkpoint::Dtype;
use crate::error::{Error, Result};
use crate::exec::Executor;
use crate::taskvec::diff::{self, DiffOptions, DiffReport, Request};
use crate::taskvec::matching::Skipped;
use crate::taskvec::name_list;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub values: super::ValueArgs,
    /// The fine-tuned checkpoint (file, directory or index).
    finetuned: PathBuf,
    /// The checkpoint it was fine-tuned from.
    #[arg(long)]
    base: PathBuf,
    #[command(flatten)]
    output: OutputArgs,
    /// Dtype of the written deltas: f32 (default; exact for bf16/f16/f32 inputs close to each other), bf16, f16, f64.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Carry non-float tensors (e.g. num_batches_tracked) with the fine-tuned model's values instead of leaving them out.
    #[arg(long)]
    keep_nonfloat: bool,
    /// Write tensors whose delta is zero everywhere instead of leaving them out.
    #[arg(long)]
    keep_equal: bool,
    /// Skip tensors present in one model only or with different shapes (with a warning) instead of failing.
    #[arg(long)]
    allow_missing: bool,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args, global: &Global) -> Result<()> {
    let request = Request {
        finetuned: args.finetuned.clone(),
        base: args.base.clone(),
        output: args.output.output.clone(),
        writer: args.output.writer_options(Vec::new()),
        options: DiffOptions {
            dtype: float_dtype("--dtype", &args.dtype)?,
            keep_nonfloat: args.keep_nonfloat,
            keep_equal: args.keep_equal,
            allow_missing: args.allow_missing,
        },
    };
    let exec = Executor::new(global.threads)?;
    let report = diff::run(&request, &exec)?;
    warn_skipped(&report.skipped_mismatched);
    if args.json {
        emit(&(serde_json::to_string(&report).unwrap() + "\n"))
    } else {
        emit(&render(&report))
    }
}

/// Parses a `--dtype` value that must be a float type.
pub(super) fn float_dtype(flag: &str, s: &str) -> Result<Dtype> {
    match Dtype::parse_user(s) {
        Some(d) if d.is_float() => Ok(d),
        Some(d) => Err(Error::usage(format!("{flag} {s}: {d} is not a float type (use f32, bf16, f16 or f64)"))),
        None => Err(Error::usage(format!("{flag} {s}: unknown dtype (use f32, bf16, f16 or f64)"))),
    }
}

/// One warning line on stderr per tensor skipped under --allow-missing.
pub(super) fn warn_skipped(skipped: &[Skipped]) {
    for s in skipped {
        eprintln!("graft: warning: skipping tensor '{}': {}", s.name, s.reason);
    }
}

fn render(r: &DiffReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "wrote task vector {} ({} file{}): {} tensors, {} parameters, {}, {}",
        r.output,
        r.files.len(),
        if r.files.len() == 1 { "" } else { "s" },
        r.tensors,
        human_count(r.params),
        r.dtype,
        human_bytes(r.bytes)
    );
    let _ = writeln!(s, "  finetuned {}  base {}", r.finetuned, r.base);
    if !r.skipped_equal.is_empty() {
        let _ = writeln!(
            s,
            "left out {} tensor(s) equal in both (zero delta; --keep-equal writes them): {}",
            r.skipped_equal.len(),
            name_list(&r.skipped_equal)
        );
    }
    if !r.skipped_nonfloat.is_empty() {
        let _ = writeln!(
            s,
            "left out {} non-float tensor(s) (--keep-nonfloat carries them): {}",
            r.skipped_nonfloat.len(),
            name_list(&r.skipped_nonfloat)
        );
    }
    if !r.carried_nonfloat.is_empty() {
        let _ = writeln!(
            s,
            "carried {} non-float tensor(s) with the fine-tuned values: {}",
            r.carried_nonfloat.len(),
            name_list(&r.carried_nonfloat)
        );
    }
    if !r.skipped_mismatched.is_empty() {
        let _ = writeln!(s, "skipped {} tensor(s) that do not pair with the base", r.skipped_mismatched.len());
    }
    s
}
