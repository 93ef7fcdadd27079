//! `graft gather OUT SHARDFILE...`: joins the results files of a sharded batch run (`--shard K/N`) into the file one
//! process would have written, refusing (and naming them) missing shards, missing items and items recorded twice.

use std::path::PathBuf;

use super::Global;
use crate::error::Result;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The joined results file (JSONL), written whole or not at all.
    out: PathBuf,
    /// The shards' results files, each with the `FILE.shard.json` manifest its shard wrote.
    #[arg(required = true)]
    shard_files: Vec<PathBuf>,
}

pub fn run(args: Args, _global: &Global) -> Result<()> {
    if args.shard_files.contains(&args.out) {
        return Err(crate::Error::usage(format!("{} is both the output and a shard file", args.out.display())));
    }
    let joined = crate::shard::gather(&args.shard_files)?;
    crate::checkpoint::write_atomic(&args.out, joined.as_bytes())?;
    eprintln!(
        "graft: gather: {} lines from {} shard files into {}",
        joined.lines().count(),
        args.shard_files.len(),
        args.out.display()
    );
    Ok(())
}
