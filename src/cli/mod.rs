//! The command line: one file per subcommand, each with its clap arguments and a `run` that calls the library and
//! prints. No algorithm lives here.

use std::collections::BTreeMap;
use std::io::Write;

use clap::{Parser, Subcommand};

use crate::checkpoint::{parse_size, WriterOptions, DEFAULT_MAX_SHARD_SIZE};
use crate::error::{Arg, Error, Result};

mod align;
mod apply;
mod convert;
mod diff;
mod eval;
mod experiment;
mod gather;
mod inspect;
mod interpolate;
mod merge;
mod report;
mod similarity;
mod snr;
mod train;

#[derive(Parser, Debug)]
#[command(
    name = "graft",
    version,
    about = "Offline model surgery on safetensors checkpoints",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Worker threads (default: all cores). Results are identical for any value.
    #[arg(long, global = true, value_parser = threads_arg)]
    threads: Option<usize>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List a checkpoint's tensors, a summary per layer type, totals and metadata.
    Inspect(inspect::Args),
    /// Merge models with mergekit's methods (flags or a mergekit YAML config), optionally only the top SNR layers.
    Merge(Box<merge::Args>),
    /// Write the task vector (fine-tuned minus base) of a fine-tuned model.
    Diff(diff::Args),
    /// Task arithmetic: add weighted task vectors (or fine-tuned deltas) to a base.
    Apply(apply::Args),
    /// Compare task vectors (cosine, norms, sign agreement), or analyse a merge's consistency with its experts.
    Similarity(similarity::Args),
    /// Re-shard a checkpoint and/or change the dtype of its float tensors.
    Convert(convert::Args),
    /// Tables with bootstrap mean +- standard error, charts and an HTML page from results files.
    Report(report::Args),
    /// Run the SNR-selective merging study described by a plan file, resumably, and report it.
    Experiment(experiment::Args),
    /// Run a small version of the whole study on real digits shipped with graft (about a minute on 2 cores).
    Demo(experiment::DemoArgs),
    /// Spectrum's per-matrix SNR: rankings per layer type, top-percent selection, Spectrum/axolotl files.
    Snr(snr::Args),
    /// Fine-tune a model (classifier or causal LM) on local data with a freezing policy; write the checkpoint and a results line.
    Train(Box<train::Args>),
    /// Accuracy, F1, loss and confusion matrix of a classifier, or perplexity of a causal LM, on local data.
    Eval(eval::Args),
    /// Align a model to a reference by permuting hidden units (Git Re-Basin weight matching).
    Align(align::Args),
    /// Write the checkpoints (1-l)A + lB along the straight path between two models.
    Interpolate(interpolate::Args),
    /// Join the results files of a sharded run (`--shard K/N`) into the single-process result.
    Gather(gather::Args),
}

/// Settings every subcommand may use.
pub struct Global {
    pub threads: Option<usize>,
}

/// The one table from the library's arguments to the flags that set them: library errors name an `Arg`, and the
/// command line shows it as its flag. The match is exhaustive, so a new argument cannot go unnamed, and a test
/// checks that every flag here is one that some subcommand has.
pub fn flag_of(arg: Arg) -> &'static str {
    match arg {
        Arg::Alpha => "--alpha",
        Arg::AllowMissing => "--allow-missing",
        Arg::AllowNonfinite => "--allow-nonfinite",
        Arg::Arch => "--arch",
        Arg::Base => "--base",
        Arg::Batch => "--batch",
        Arg::ChatTemplate => "--chat-template",
        Arg::Classes => "--classes",
        Arg::Compat => "--compat",
        Arg::Cycle => "--cycle",
        Arg::Data => "--data",
        Arg::Device => "--device",
        Arg::Dpi => "--dpi",
        Arg::Dtype => "--dtype",
        Arg::EvalBatch => "--eval-batch",
        Arg::Exclude => "--exclude",
        Arg::Executor => "--executor",
        Arg::Filter => "--filter",
        Arg::Finetuned => "--finetuned",
        Arg::Force => "--force",
        Arg::Freeze => "--freeze",
        Arg::Init => "--init",
        Arg::IntermediateDir => "--intermediate-dir",
        Arg::Lenient => "--lenient",
        Arg::Lr => "--lr",
        Arg::MaxIter => "--max-iter",
        Arg::MaxLen => "--max-len",
        Arg::Method => "--method",
        Arg::NoCopyTokenizer => "--no-copy-tokenizer",
        Arg::Normalize => "--normalize",
        Arg::Only => "--only",
        Arg::Output => "--output",
        Arg::Resamples => "--resamples",
        Arg::Resume => "--resume",
        Arg::SelectionJson => "--selection-json",
        Arg::Shard => "--shard",
        Arg::ShardCount => "--shard-count",
        Arg::SnrFrom => "--snr-from",
        Arg::SnrSelect => "--snr-select",
        Arg::SpectrumJson => "--spectrum-json",
        Arg::Spec => "--spec",
        Arg::Steps => "--steps",
        Arg::TestFraction => "--test-fraction",
        Arg::TiesVariant => "--ties-variant",
        Arg::TopPercent => "--top-percent",
        Arg::Tokenizer => "--tokenizer",
        Arg::TrainLastLayers => "--train-last-layers",
        Arg::TransferBody => "--transfer-body",
        Arg::UnfrozenYaml => "--unfrozen-yaml",
        Arg::ValFraction => "--val-fraction",
        Arg::Vector => "--vector",
    }
}

pub fn run() -> Result<()> {
    crate::error::name_args_with(flag_of);
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help and --version: clap prints them, exit 0.
            let _ = e.print();
            std::process::exit(0);
        }
        Err(e) => {
            // A usage error is one line like every other error, so that scripts can read stderr line by line.
            eprintln!("graft: error: {}", crate::error::bounded(&usage_error_line(&e.render().to_string())));
            std::process::exit(2);
        }
    };
    let global = Global { threads: cli.threads };
    // Set once, before any tensor is read; see `checkpoint::guard` for why the policy is process-wide.
    crate::checkpoint::guard::set_allow_nonfinite(cli.command.values().is_some_and(|v| v.allow_nonfinite));
    match cli.command {
        Command::Inspect(a) => inspect::run(a, &global),
        Command::Diff(a) => diff::run(a, &global),
        Command::Apply(a) => apply::run(a, &global),
        Command::Similarity(a) => similarity::run(a, &global),
        Command::Convert(a) => convert::run(a, &global),
        Command::Report(a) => report::run(a, &global),
        Command::Experiment(a) => experiment::run(a, &global),
        Command::Demo(a) => experiment::demo(a, &global),
        Command::Merge(a) => merge::run(*a, &global),
        Command::Snr(a) => snr::run(a, &global),
        Command::Train(a) => train::run(*a, &global),
        Command::Eval(a) => eval::run(a, &global),
        Command::Align(a) => align::run(a, &global),
        Command::Interpolate(a) => interpolate::run(a, &global),
        Command::Gather(a) => gather::run(a, &global),
    }
}

/// clap's rendering of a usage error (the problem, indented details, a blank line, the usage, a pointer to --help)
/// folded onto one line: the problem and its details, then the usage in parentheses.
fn usage_error_line(rendered: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    let mut usage = None;
    for line in rendered.lines().map(str::trim) {
        if line.is_empty() || line.starts_with("For more information") {
            continue;
        }
        match line.strip_prefix("Usage: ") {
            Some(u) => usage = Some(u),
            None => parts.push(line.strip_prefix("error: ").unwrap_or(line)),
        }
    }
    let mut text = parts.join(" ");
    if let Some(u) = usage {
        text.push_str(&format!(" (usage: {u})"));
    }
    text
}

/// Options shared by every command that reads tensor values (one group, so the flag reads the same everywhere).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ValueArgs {
    /// Let NaN and infinite values through (in inputs, and in outputs that overflow their dtype), with one warning
    /// line per tensor, instead of refusing them with an error naming file, tensor and count.
    #[arg(long)]
    pub allow_nonfinite: bool,
}

impl Command {
    /// The value options of a command that reads tensor values.
    fn values(&self) -> Option<&ValueArgs> {
        match self {
            Command::Merge(a) => Some(&a.values),
            Command::Diff(a) => Some(&a.values),
            Command::Apply(a) => Some(&a.values),
            Command::Similarity(a) => Some(&a.values),
            Command::Convert(a) => Some(&a.values),
            Command::Interpolate(a) => Some(&a.values),
            Command::Align(a) => Some(&a.values),
            _ => None,
        }
    }
}

/// Output options shared by every command that writes a checkpoint.
#[derive(clap::Args, Debug, Clone)]
pub struct OutputArgs {
    /// Output: a directory (Hugging Face layout) or a single `.safetensors` file.
    #[arg(short = 'o', long = "output")]
    pub output: std::path::PathBuf,
    /// Shard size limit, e.g. 5GB (default, as Hugging Face), 500MB, 2GiB.
    #[arg(long, value_parser = parse_shard_size, default_value_t = DEFAULT_MAX_SHARD_SIZE)]
    pub max_shard_size: u64,
    /// Replace a checkpoint already at the output path.
    #[arg(long)]
    pub force: bool,
}

/// Spin iterations of candle's idle elementwise workers before they park (candle's default is 25,000).
const CANDLE_SPIN_LIMIT: u32 = 1000;

/// Runs `f` on a pool of `--threads` workers (all cores by default), where rayon and candle's kernels run.
///
/// candle sizes its matrix-product parallelism and its spinning elementwise worker pool from `RAYON_NUM_THREADS` /
/// `CANDLE_NUM_THREADS`, and without them re-reads `/proc/cpuinfo` on every matrix product: set both once, before
/// the first tensor operation, so `--threads` bounds candle too and the lookup is free.
pub fn with_threads<R: Send>(global: &Global, f: impl FnOnce() -> Result<R> + Send) -> Result<R> {
    let n = global.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    for var in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
        if global.threads.is_some() || std::env::var_os(var).is_none() {
            // Still single-threaded here: no other thread reads the environment concurrently.
            std::env::set_var(var, n.to_string());
        }
    }
    // candle's elementwise workers spin for a while after every operation before they sleep; between candle's
    // operations graft's own kernels run on rayon's threads, which then share the cores with spinning threads
    // (a third of a training step on 2 cores). Brief spinning keeps the hand-off cheap without that cost.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_LIMIT.to_string());
    }
    match global.threads {
        None => f(),
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .map_err(|e| Error::invalid(format!("cannot start {n} worker threads: {e}")))?
            .install(f),
    }
}

/// A count flag's value within `lo..=hi`: beyond the bounds a usage error (exit 2) instead of an allocation that
/// panics or aborts (`--steps 18446744073709551615` asked for a vector of that many points).
fn count_in(s: &str, lo: usize, hi: usize) -> std::result::Result<usize, String> {
    let v: u128 = s.trim().parse().map_err(|_| format!("'{s}' is not a whole number"))?;
    if v < lo as u128 || v > hi as u128 {
        return Err(format!("{v} is outside {lo}..={hi}"));
    }
    Ok(v as usize)
}

/// Worker threads: beyond a few thousand the OS refuses to start them (and each takes a stack).
pub(crate) fn threads_arg(s: &str) -> std::result::Result<usize, String> {
    count_in(s, 1, 4096)
}
/// Interpolation points: each one is a whole checkpoint on disk.
pub(crate) fn steps_arg(s: &str) -> std::result::Result<usize, String> {
    count_in(s, 2, 10_000)
}
/// Bootstrap resamples.
pub(crate) fn resamples_arg(s: &str) -> std::result::Result<usize, String> {
    count_in(s, 1, 10_000_000)
}
/// Training epochs and solver iterations.
pub(crate) fn iterations_arg(s: &str) -> std::result::Result<usize, String> {
    count_in(s, 1, 1_000_000)
}
/// Batch sizes and sequence lengths: a batch is allocated at once.
pub(crate) fn batch_arg(s: &str) -> std::result::Result<usize, String> {
    count_in(s, 1, 1 << 20)
}

pub(crate) fn parse_shard_size_arg(s: &str) -> std::result::Result<u64, String> {
    parse_shard_size(s)
}

/// `--arch NAME`: an entry of the architecture registry, whose names and help lines are the possible values.
pub(crate) fn arch_arg() -> impl clap::builder::TypedValueParser<Value = &'static dyn crate::train::models::Arch> {
    use crate::train::models;
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
    PossibleValuesParser::new(models::ARCHS.iter().map(|a| PossibleValue::new(a.name()).help(a.about())))
        .map(|name| models::lookup(&name).expect("clap accepts registry names only"))
}

/// `--data FORMAT:PATH` or `PATH`, parsed once (it cannot fail: the path is checked when the data is read).
pub(crate) fn data_arg(s: &str) -> std::result::Result<crate::train::data::DataSpec, String> {
    Ok(crate::train::data::DataSpec::parse(s))
}

/// `--classes 0,1,8,9`: distinct class indices, parsed once into the list the data options take.
pub(crate) fn classes_arg(s: &str) -> std::result::Result<Vec<u32>, String> {
    crate::train::data::subset::parse_classes(s)
}

fn parse_shard_size(s: &str) -> std::result::Result<u64, String> {
    parse_size(s).ok_or_else(|| format!("'{s}' is not a size (examples: 5GB, 500MB, 2GiB, 1000000)"))
}

impl OutputArgs {
    /// Writer options with the provenance entry and `inputs` protected from being overwritten.
    pub fn writer_options(&self, inputs: Vec<std::path::PathBuf>) -> WriterOptions {
        WriterOptions {
            max_shard_size: self.max_shard_size,
            metadata: provenance(),
            carry_from: None,
            inputs,
            overwrite: self.force,
        }
    }
}

/// The `graft` provenance entry for `__metadata__`: version and command line, less the flags that cannot change
/// a result (so that the same inputs give byte-identical files for any `--threads`).
pub fn provenance() -> BTreeMap<String, String> {
    let args = recorded_args(std::env::args());
    let v = serde_json::json!({ "version": env!("CARGO_PKG_VERSION"), "command": args });
    BTreeMap::from([("graft".to_string(), v.to_string())])
}

/// Flags that change how a command runs, never what it writes: left out of the recorded command line (so a merge
/// done by one shard of a batch writes the bytes a single process would).
const UNRECORDED_FLAGS: [&str; 6] = ["--threads", "--quiet", "--force", "--shard", "--shard-count", "--resume"];
/// Of those, the ones that take a value as the next argument.
const UNRECORDED_WITH_VALUE: [&str; 4] = ["--threads", "--shard", "--shard-count", "--resume"];

fn recorded_args(args: impl Iterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut skip_value = false;
    for a in args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        let flag = a.split('=').next().unwrap_or("");
        if UNRECORDED_FLAGS.contains(&flag) {
            skip_value = UNRECORDED_WITH_VALUE.contains(&flag) && !a.contains('=');
            continue;
        }
        out.push(a);
    }
    out
}

/// `shard::run_batch` with the command line's report of each failure: with `json`, a `{key: name, "error": ...}`
/// line on stdout, and the error on stderr.
pub fn run_batch<T>(
    items: &[T],
    json: bool,
    key: &str,
    failed: &str,
    name: impl Fn(&T) -> String,
    each: impl FnMut(&T) -> Result<()>,
) -> Result<()> {
    crate::shard::run_batch(items, failed, each, |item, e| {
        if json {
            emit(&(serde_json::json!({ key: name(item), "error": e.to_string() }).to_string() + "\n"))?;
        }
        eprintln!("graft: error: {}", crate::error::bounded(&e.to_string()));
        Ok(())
    })
}

/// Writes to stdout; a closed pipe (`graft ... | head`) ends the program quietly instead of panicking.
pub fn emit(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(Error::io("<stdout>", e)),
    }
}

/// A table in graft's one text style.
pub fn table(header: &[&str]) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
    t.set_content_arrangement(comfy_table::ContentArrangement::Disabled);
    t.set_header(header.iter().copied());
    t
}

/// Human-readable byte counts (decimal units, as Hugging Face writes sizes).
pub fn human_bytes(n: u64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", units[u])
    }
}

/// Parameter counts with a magnitude suffix (1.54B, 22.7M).
pub fn human_count(n: u64) -> String {
    let v = n as f64;
    if v >= 1e9 {
        format!("{:.2}B", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}K", v / 1e3)
    } else {
        n.to_string()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_library_argument_is_named_by_a_flag_some_subcommand_has() {
        use clap::CommandFactory;
        let cli = super::Cli::command();
        let longs: std::collections::BTreeSet<String> = cli
            .get_subcommands()
            .flat_map(|c| c.get_arguments())
            .chain(cli.get_arguments())
            .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
            .collect();
        for &arg in crate::error::Arg::ALL {
            let flag = super::flag_of(arg);
            assert!(longs.contains(flag), "{arg:?} is shown as {flag}, which no subcommand has");
        }
    }

    #[test]
    fn count_flags_are_bounded() {
        assert_eq!(super::steps_arg("25"), Ok(25));
        assert!(super::steps_arg("1").is_err());
        assert!(super::steps_arg("18446744073709551615").unwrap_err().contains("outside 2..=10000"));
        assert!(super::steps_arg("1e12").unwrap_err().contains("not a whole number"));
        assert!(super::threads_arg("0").is_err() && super::threads_arg("100000000").is_err());
        assert_eq!(super::threads_arg("4096"), Ok(4096));
    }

    #[test]
    fn recorded_command_line_leaves_out_threads_and_quiet() {
        let args = ["graft", "--threads", "4", "merge", "a", "b", "--threads=2", "--quiet", "-o", "out", "--force"];
        let got = super::recorded_args(args.iter().map(|s| s.to_string()));
        assert_eq!(got, ["graft", "merge", "a", "b", "-o", "out"]);
        let sharded = ["graft", "merge", "c/*.yml", "-o", "out", "--shard", "1/4", "--resume", "s1.jsonl"];
        let auto = ["graft", "merge", "c/*.yml", "--shard=auto", "--shard-count", "4", "-o", "out"];
        for args in [&sharded[..], &auto[..]] {
            assert_eq!(
                super::recorded_args(args.iter().map(|s| s.to_string())),
                ["graft", "merge", "c/*.yml", "-o", "out"]
            );
        }
    }

    #[test]
    fn usage_errors_fold_onto_one_line() {
        use clap::Parser;
        let e = super::Cli::try_parse_from(["graft", "similarity", "m", "--base", "b", "--only", "x"]).unwrap_err();
        let rendered = e.render().to_string();
        assert!(rendered.trim_end().lines().count() > 1, "clap renders several lines: {rendered}");
        let line = super::usage_error_line(&rendered);
        assert!(!line.contains('\n'), "{line}");
        // The problem, each missing argument, and the usage, in that order.
        let at = |needle: &str| line.find(needle).unwrap_or_else(|| panic!("{needle} missing from {line}"));
        assert!(at("required arguments were not provided") < at("--experts <A> <B>"));
        assert!(at("--merged <M>") < at("(usage: graft similarity"));
        assert!(!line.starts_with("error:") && !line.contains("For more information"), "{line}");
    }
}
