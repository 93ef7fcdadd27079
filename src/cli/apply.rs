//! `graft apply BASE --vector TV[:LAMBDA]... [--finetuned FT[:LAMBDA]...] -o OUT`: task arithmetic (see
//! `taskvec::apply`). The flags become one `taskvec::apply::Request`, validated before any file is opened; this file
//! prints its report.

use std::fmt::Write;
use std::path::PathBuf;

use super::diff::{float_dtype, warn_skipped};
use super::{emit, human_bytes, Global, OutputArgs};
use crate::error::{Error, Result};
use crate::exec::Executor;
use crate::taskvec::apply::{self, ApplyOptions, ApplyReport, Request, TermKind, TermSpec};
use crate::taskvec::name_list;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub values: super::ValueArgs,
    /// The base checkpoint the task vectors are added to.
    base: PathBuf,
    /// A task vector (`graft diff` output) and its weight, TV or TV:LAMBDA (default 1; negative negates the task).
    /// Repeatable.
    #[arg(long = "vector", value_name = "TV[:LAMBDA]")]
    vectors: Vec<String>,
    /// A fine-tuned model whose delta against BASE is applied without writing it, FT or FT:LAMBDA. Repeatable.
    #[arg(long = "finetuned", value_name = "FT[:LAMBDA]")]
    finetuned: Vec<String>,
    #[command(flatten)]
    output: OutputArgs,
    /// Output dtype of float tensors (default: the base's dtype, tensor by tensor).
    #[arg(long)]
    dtype: Option<String>,
    /// Skip tensors of a term that the base lacks or holds with another shape (with a warning) instead of failing;
    /// with --finetuned, base tensors missing from the model get a zero delta.
    #[arg(long)]
    allow_missing: bool,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

/// Splits `PATH:LAMBDA` (a trailing `:number`) from a plain `PATH` (lambda 1).
pub fn parse_term(flag: &str, s: &str) -> Result<(PathBuf, f64)> {
    if let Some((path, l)) = s.rsplit_once(':') {
        if let Ok(lambda) = l.trim().parse::<f64>() {
            if path.is_empty() {
                return Err(Error::usage(format!("{flag} {s}: no path before ':{l}'")));
            }
            if !lambda.is_finite() {
                return Err(Error::usage(format!("{flag} {s}: lambda {l} is not a finite number")));
            }
            return Ok((PathBuf::from(path), lambda));
        }
    }
    Ok((PathBuf::from(s), 1.0))
}

pub fn run(args: Args, global: &Global) -> Result<()> {
    let mut terms = Vec::new();
    for v in &args.vectors {
        let (path, lambda) = parse_term("--vector", v)?;
        terms.push(TermSpec { path, kind: TermKind::Vector, lambda });
    }
    for f in &args.finetuned {
        let (path, lambda) = parse_term("--finetuned", f)?;
        terms.push(TermSpec { path, kind: TermKind::Finetuned, lambda });
    }
    let request = Request {
        base: args.base.clone(),
        terms,
        output: args.output.output.clone(),
        writer: args.output.writer_options(Vec::new()),
        options: ApplyOptions {
            dtype: args.dtype.as_deref().map(|d| float_dtype("--dtype", d)).transpose()?,
            allow_missing: args.allow_missing,
        },
    };
    request.validate()?;
    let report = apply::run(&request, &Executor::new(global.threads)?)?;
    warn_skipped(&report.skipped_mismatched);
    for w in &report.warnings {
        eprintln!("graft: warning: {w}");
    }
    if !report.ignored_nonfloat.is_empty() {
        eprintln!(
            "graft: warning: kept the base's values of {} non-float tensor(s) found in task vectors: {}",
            report.ignored_nonfloat.len(),
            name_list(&report.ignored_nonfloat)
        );
    }
    if args.json {
        emit(&(serde_json::to_string(&report).unwrap() + "\n"))
    } else {
        emit(&render(&report))
    }
}

fn render(r: &ApplyReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "wrote {} ({} file{}): {} tensors, {} changed, {} with the base's values, {}",
        r.output,
        r.files.len(),
        if r.files.len() == 1 { "" } else { "s" },
        r.tensors,
        r.changed,
        r.unchanged,
        human_bytes(r.bytes)
    );
    let _ = writeln!(s, "  base {}", r.base);
    for t in &r.terms {
        let kind = match t.kind {
            TermKind::Vector => "vector",
            TermKind::Finetuned => "finetuned",
        };
        let _ = writeln!(s, "  + {} x {kind} {} ({} tensors)", t.lambda, t.path, t.tensors);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_parse_with_and_without_lambda() {
        assert_eq!(parse_term("--vector", "tv").unwrap(), (PathBuf::from("tv"), 1.0));
        assert_eq!(parse_term("--vector", "a/tv:0.5").unwrap(), (PathBuf::from("a/tv"), 0.5));
        assert_eq!(parse_term("--vector", "tv:-1").unwrap(), (PathBuf::from("tv"), -1.0));
        assert_eq!(parse_term("--vector", "dir:name").unwrap(), (PathBuf::from("dir:name"), 1.0));
        assert!(parse_term("--vector", ":2").is_err());
        assert!(parse_term("--vector", "tv:inf").is_err());
    }
}
