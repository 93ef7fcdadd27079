//! `graft convert IN -o OUT`: re-shard a checkpoint and/or change the dtype of its float tensors; a `.gguf` input
//! becomes a Hugging Face checkpoint (`docs/gguf.md`). The library's `convert::Request` does the work; this file
//! parses the flags and prints what was written.

use std::path::PathBuf;

use super::{emit, Global, OutputArgs};
use crate::checkpoint::Dtype;
use crate::convert;
use crate::error::{Error, Result};
use crate::exec::Executor;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub values: super::ValueArgs,
    /// The checkpoint to read (file, index file or directory), or a GGUF file (`.gguf`) to turn into a Hugging Face
    /// checkpoint.
    input: PathBuf,
    #[command(flatten)]
    output: OutputArgs,
    /// Store float tensors as this dtype (bf16, f16, f32, f64); other tensors keep theirs. For GGUF: default f32
    /// for quantised tensors, F16/BF16 ones as stored.
    #[arg(long)]
    dtype: Option<String>,
    /// Do not copy config.json, tokenizer and generation files from the input directory.
    #[arg(long)]
    no_carry: bool,
    /// Print a JSON summary of what was written.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args, global: &Global) -> Result<()> {
    let dtype = args
        .dtype
        .as_deref()
        .map(|d| match Dtype::parse_user(d) {
            Some(t) if t.is_float() => Ok(t),
            _ => Err(Error::usage(format!("--dtype '{d}' is not a float dtype (bf16, f16, f32, f64)"))),
        })
        .transpose()?;
    let request = convert::Request {
        input: args.input.clone(),
        output: args.output.output.clone(),
        dtype,
        carry: !args.no_carry,
        writer: args.output.writer_options(Vec::new()),
    };
    request.validate()?;
    let written = convert::run(&request, &Executor::new(global.threads)?)?;
    report_written(&written, args.json)
}

fn report_written(written: &crate::checkpoint::Written, json: bool) -> Result<()> {
    if json {
        emit(&(serde_json::to_string(written).unwrap() + "\n"))
    } else {
        emit(&format!(
            "wrote {} tensors ({} bytes) in {} shard{} to {}\n",
            written.tensors,
            written.total_bytes,
            written.shards,
            if written.shards == 1 { "" } else { "s" },
            written.path.display()
        ))
    }
}
