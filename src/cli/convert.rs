//! `graft convert IN -o OUT`: re-shard a checkpoint and/or change the dtype of its float tensors; a `.gguf` input
//! becomes a Hugging Face checkpoint (`docs/gguf.md`).

use std::path::PathBuf;

use super::{emit, Global, OutputArgs};
use crate::checkpoint::{Checkpoint, Dtype};
use crate::convert::{convert, convert_gguf};
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
    if crate::checkpoint::is_gguf_path(&args.input) {
        // A GGUF file becomes a Hugging Face checkpoint: nothing to carry, the config is rebuilt from its metadata.
        let g = crate::gguf::GgufFile::open(&args.input)?;
        let opts = args.output.writer_options(vec![args.input.clone()]);
        let exec = Executor::new(global.threads)?;
        let written = convert_gguf(&g, &args.output.output, dtype, opts, &exec)?;
        return report_written(&written, args.json);
    }
    let ck = Checkpoint::open(&args.input)?;
    let mut opts = args.output.writer_options(ck.files());
    // Converting keeps the model what it was: its metadata is preserved, with graft's provenance added.
    for (k, v) in ck.metadata() {
        opts.metadata.entry(k.clone()).or_insert_with(|| v.clone());
    }
    let is_dir_output = args.output.output.extension().is_none_or(|e| e != "safetensors");
    if !args.no_carry && is_dir_output {
        opts.carry_from = ck.dir().map(|d| d.to_path_buf());
    }
    let exec = Executor::new(global.threads)?;
    let written = convert(&ck, &args.output.output, dtype, opts, &exec)?;
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
