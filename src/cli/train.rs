//! `graft train`: fine-tune (or train from scratch) a model on local data with a freezing policy, write the
//! checkpoint and a results line. The arguments become a `train::request::TrainRequest` (values typed by their
//! parsers: the architecture registry, `DataSpec`, `NormalizeSpec`, `FreezePolicy`); the library validates and
//! runs it; this file prints the summary.

use std::path::PathBuf;

use super::{emit, Global, OutputArgs};
use crate::error::Result;
use crate::train::data::{DataSpec, NormalizeSpec};
use crate::train::freeze::FreezePolicy;
use crate::train::lm_train::LmTrainOutcome;
use crate::train::models::{Arch, BnStats, Pooling};
use crate::train::request::{TrainPlan, TrainRequest, TrainResult};
use crate::train::{ArchOptions, DataOptions, DeviceKind, RunRecord, TrainOutcome};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Architecture for a fresh model (bert and llama start from --init). With --init/--transfer-body the
    /// checkpoint's own architecture is used and this only checks it.
    #[arg(long, value_parser = super::arch_arg())]
    arch: Option<&'static dyn Arch>,
    #[command(flatten)]
    data: DataArgs,
    /// Start from every tensor of this checkpoint.
    #[arg(long, conflicts_with = "transfer_body")]
    init: Option<PathBuf>,
    /// Start from every tensor of this checkpoint except the head, which is new and sized to the data's classes.
    #[arg(long)]
    transfer_body: Option<PathBuf>,
    /// Which parameters train: none (all train), all-but-head, selected:FILE, regex:FILE (see docs/train.md).
    #[arg(long, default_value = "none", value_parser = |s: &str| FreezePolicy::parse(s).map_err(|e| e.to_string()))]
    freeze: FreezePolicy,
    /// Train only the last N encoder layers and the head (transformers).
    #[arg(long, conflicts_with = "freeze")]
    train_last_layers: Option<usize>,
    /// BatchNorm running statistics of frozen layers: freeze (normalise with them, keep them) or update (batch
    /// statistics and running averages, PyTorch's train mode).
    #[arg(long, value_enum, default_value = "freeze")]
    bn_stats: BnStatsArg,
    /// Passes over the training data [default: 5; 1 for a causal LM].
    #[arg(long, value_parser = super::iterations_arg)]
    epochs: Option<usize>,
    /// Learning rate [default: 1e-3; 1e-4 for a causal LM].
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Samples per optimiser step [default: 128; 8 sequences for a causal LM, run in micro-batches that fit
    /// memory with their gradients accumulated].
    #[arg(long, value_parser = super::batch_arg)]
    batch: Option<usize>,
    /// Batch size for evaluation passes.
    #[arg(long, default_value_t = 512, value_parser = super::batch_arg)]
    eval_batch: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep the weights of the epoch with the best validation accuracy.
    #[arg(long)]
    best_epoch: bool,
    /// Count the per-epoch validation in the reported time (the reference study's convention); feature extraction
    /// and the training steps always count.
    #[arg(long)]
    time_with_eval: bool,
    /// mlp hidden sizes for a fresh model.
    #[arg(long, value_delimiter = ',', default_value = "256,128")]
    hidden: Vec<usize>,
    /// sepcnn/resnet20 width multiplier for a fresh model.
    #[arg(long, default_value_t = 1.0)]
    width: f64,
    /// sepcnn stage depths for a fresh model.
    #[arg(long, value_delimiter = ',', default_value = "3,4,3")]
    depths: Vec<usize>,
    /// bert pooling of the last hidden states.
    #[arg(long, value_enum)]
    pooling: Option<Pooling>,
    /// bert classifier hidden size.
    #[arg(long)]
    head_hidden: Option<usize>,
    /// cpu, or cuda (needs a build with the `cuda` feature).
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    device: DeviceKind,
    /// Output checkpoint (directory or .safetensors); without it nothing is written.
    #[arg(short = 'o', long = "output")]
    output: Option<PathBuf>,
    #[arg(long, value_parser = super::parse_shard_size_arg, default_value_t = crate::checkpoint::DEFAULT_MAX_SHARD_SIZE)]
    max_shard_size: u64,
    #[arg(long)]
    force: bool,
    /// Append a results line (JSONL) to this file.
    #[arg(long)]
    results: Option<PathBuf>,
    /// Experiment name in the results line (default: "ARCH / FREEZE").
    #[arg(long)]
    experiment: Option<String>,
    /// Extra KEY=VALUE entries for the results line's config (repeatable), e.g. --config method=lerp --config top_p=0.1.
    #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_tag)]
    tags: Vec<(String, String)>,
    /// Mark the results line as the baseline experiment.
    #[arg(long)]
    baseline: bool,
    /// Print the run summary as JSON.
    #[arg(long)]
    json: bool,
    /// No per-epoch lines or progress bar on stderr.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum BnStatsArg {
    Freeze,
    Update,
}

/// Data options shared by `graft train` and `graft eval`.
#[derive(clap::Args, Debug, Clone)]
pub struct DataArgs {
    /// Data: FORMAT:PATH or PATH (idx, sprite, arrays, spam, tsv; see docs/data.md).
    #[arg(long, value_parser = super::data_arg)]
    data: DataSpec,
    /// Keep these classes, renumbered 0.. in the given order (e.g. 0,1,8,9).
    // The full path keeps clap from reading `Option<Vec<_>>` as a flag given several times: one value, one list.
    #[arg(long, value_parser = super::classes_arg)]
    classes: Option<::std::vec::Vec<u32>>,
    /// Fraction of the training pool held out for validation (seeded).
    #[arg(long, default_value_t = DataOptions::VAL_FRACTION)]
    val_fraction: f64,
    /// Fraction of the training pool held out for testing when the data has no test set (seeded).
    #[arg(long, default_value_t = DataOptions::TEST_FRACTION)]
    test_fraction: f64,
    /// none, auto (training-split statistics), MEAN,STD or M1,M2,..:S1,S2,.. (default 0.5,0.5 for pixels).
    #[arg(long, value_parser = |s: &str| NormalizeSpec::parse(s).map_err(|e| e.to_string()))]
    normalize: Option<NormalizeSpec>,
    /// Use at most this many training samples.
    #[arg(long)]
    limit: Option<usize>,
    /// tokenizer.json (or its directory) for text data (default: the checkpoint's directory).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Maximum tokens per text, special tokens included.
    #[arg(long, default_value_t = DataOptions::MAX_LEN, value_parser = super::batch_arg)]
    max_len: usize,
}

impl DataArgs {
    pub fn options(&self) -> Result<DataOptions> {
        Ok(DataOptions {
            spec: self.data.clone(),
            classes: self.classes.clone(),
            val_fraction: self.val_fraction,
            test_fraction: self.test_fraction,
            normalize: self.normalize.clone(),
            limit: self.limit,
            tokenizer: self.tokenizer.clone(),
            max_len: self.max_len,
        })
    }
}

pub fn run(a: Args, global: &Global) -> Result<()> {
    let out =
        OutputArgs { output: a.output.clone().unwrap_or_default(), max_shard_size: a.max_shard_size, force: a.force };
    let request = TrainRequest {
        arch: ArchOptions {
            arch: a.arch,
            hidden: a.hidden.clone(),
            width: a.width,
            depths: a.depths.clone(),
            pooling: a.pooling,
            head_hidden: a.head_hidden,
        },
        data: a.data.options()?,
        init: a.init.clone(),
        transfer_body: a.transfer_body.clone(),
        freeze: match a.train_last_layers {
            Some(n) => FreezePolicy::LastLayers(n),
            None => a.freeze.clone(),
        },
        bn_stats: match a.bn_stats {
            BnStatsArg::Freeze => BnStats::Freeze,
            BnStatsArg::Update => BnStats::Update,
        },
        epochs: a.epochs,
        lr: a.lr,
        batch: a.batch,
        eval_batch: a.eval_batch,
        weight_decay: a.weight_decay,
        seed: a.seed,
        best_epoch: a.best_epoch,
        time_with_eval: a.time_with_eval,
        progress: !a.quiet,
        device: a.device,
        record: RunRecord {
            output: a.output.clone(),
            writer: out.writer_options(Vec::new()),
            results: a.results.clone(),
            experiment: a.experiment.clone(),
            tags: a.tags.clone(),
        },
        threads: global.threads,
        baseline: a.baseline,
    };
    let plan = request.validate(request.task())?;
    if let TrainPlan::Classifier(opts) = &plan {
        if !a.quiet {
            eprintln!(
                "graft train: freeze {}, BatchNorm statistics of frozen layers: {}",
                opts.freeze.describe(),
                match opts.bn_stats {
                    BnStats::Freeze => "frozen (running statistics used and kept)",
                    BnStats::Update => "updated (batch statistics, running averages move)",
                }
            );
        }
    }
    let result = super::with_threads(global, || plan.run())?;
    if a.json {
        return emit(&(serde_json::to_string(&result).unwrap() + "\n"));
    }
    match result {
        TrainResult::Classifier(outcome) => emit(&classifier_summary(&outcome, a.time_with_eval)),
        TrainResult::CausalLm(outcome) => emit(&causal_lm_summary(&outcome)),
    }
}

/// The classifier run's summary: samples, freezing, epochs, test metrics, time and memory.
fn classifier_summary(outcome: &TrainOutcome, time_with_eval: bool) -> String {
    let r = &outcome.report;
    let mut s = String::new();
    use std::fmt::Write;
    let _ = writeln!(
        s,
        "run {}  arch {}  data {}",
        outcome.run_id,
        outcome.arch["graft_arch"].as_str().unwrap_or("?"),
        outcome.data
    );
    let _ = writeln!(
        s,
        "samples train {} / val {} / test {}, {} classes",
        outcome.samples["train"],
        outcome.samples["val"],
        outcome.samples["test"],
        outcome.classes.len()
    );
    let f = &outcome.freeze;
    let _ = writeln!(
        s,
        "freeze {}: {} of {} parameters train ({} tensors trainable, {} frozen){}",
        f.policy,
        f.trainable_params,
        f.total_params,
        f.trainable_tensors,
        f.frozen_tensors,
        if outcome.feature_extraction { ", feature extraction (encoder outputs computed once)" } else { "" }
    );
    if let Some(z) = outcome.zero_shot_accuracy {
        let _ = writeln!(s, "zero-shot test accuracy {:.4}", z);
    }
    for e in &r.epochs {
        let val = e.val_accuracy.map(|v| format!("  val accuracy {v:.4}")).unwrap_or_default();
        let _ = writeln!(
            s,
            "epoch {:>3}  train loss {:.4}{val}  {:.1} s  {:.0} samples/s",
            e.epoch, e.train_loss, e.time_s, e.samples_per_s
        );
    }
    if let Some(b) = r.best_epoch {
        let _ = writeln!(s, "restored best epoch {b}");
    }
    let t = &outcome.test;
    let _ = writeln!(
        s,
        "test: accuracy {:.4}  f1 weighted {:.4}  f1 macro {:.4}  loss {:.4}",
        t.accuracy,
        t.f1_weighted,
        t.f1_macro,
        t.loss.unwrap_or(f64::NAN)
    );
    let _ = writeln!(
        s,
        "time {:.2} s (feature extraction {:.2} s + training {:.2} s, validation {:.2} s {}), {:.0} samples/s",
        r.time_s,
        r.feature_s,
        r.train_s,
        r.eval_time_s,
        if time_with_eval { "included" } else { "excluded" },
        r.samples_per_s,
    );
    let _ = writeln!(
        s,
        "training memory {} (parameters, gradients, optimiser state, activations), process peak {}",
        r.training_memory_bytes.map(super::human_bytes).unwrap_or_else(|| "not counted on this device".into()),
        outcome.peak_memory_bytes.map(super::human_bytes).unwrap_or_else(|| "unknown".into())
    );
    if let Some(o) = &outcome.output {
        let _ = writeln!(s, "wrote {}", o.display());
    }
    s
}

/// A llama-family causal LM's fine-tuning (see `train::lm_train`).
fn causal_lm_summary(o: &LmTrainOutcome) -> String {
    let f = &o.freeze;
    let mut s = format!(
        "run {}  {} on {}: {} train / {} validation sequences of <= {} tokens\n\
         freeze {}: {} of {} parameters train ({} tensors trainable, {} frozen)\n\
         validation perplexity {:.4} -> {:.4}  ({} steps, {:.1} s training, {:.0} tokens/s, peak memory {})\n",
        o.run_id,
        o.init.display(),
        o.data,
        o.sequences.train,
        o.sequences.val,
        o.sequences.max_len,
        f.policy,
        f.trainable_params,
        f.total_params,
        f.trainable_tensors,
        f.frozen_tensors,
        o.perplexity_before,
        o.perplexity,
        o.steps,
        o.time_s,
        o.tokens_per_s,
        o.peak_memory_bytes.map(super::human_bytes).unwrap_or_else(|| "unknown".into())
    );
    if let Some(p) = &o.output {
        s.push_str(&format!("wrote {}\n", p.display()));
    }
    s
}

fn parse_tag(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("'{s}' is not KEY=VALUE")),
    }
}
