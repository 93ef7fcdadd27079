//! Fine-tuning and evaluation with candle: the only place graft runs networks.
//!
//! `request` is the entry of `graft train` and `graft eval` (typed, validated before any I/O), which hands a
//! classifier to `run_train` / `run_eval` here and a causal LM to `lm_train` / `lm_eval`. `run_train` turns a
//! checkpoint (or a fresh model) plus local data into a trained checkpoint and a results line; `run_eval` measures
//! any classifier graft produces. The pieces: `models` (the architecture registry and one file per architecture:
//! mlp, sepcnn, resnet20, bert, llama; names as the PyTorch originals), `params` (the ordered tensor store), `checkpoint_io` (store <-> graft checkpoints),
//! `data` (formats, subsets, splits, batches), `freeze` (which parameters train), `ops` (fused CPU kernels),
//! `optim` (fused AdamW), `trainer` (the loop), `metrics` (sklearn's definitions), `results` (JSONL lines), `path`
//! (evaluation along an interpolation path: one call writes, evaluates and records every point).

pub mod checkpoint_io;
pub mod data;
pub mod freeze;
pub mod lm_eval;
pub mod lm_train;
mod memory;
pub mod metrics;
pub mod models;
mod ops;
mod optim;
pub mod params;
pub mod path;
pub mod request;
pub mod results;
pub mod tokenize;
mod trainer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::Serialize;

use crate::checkpoint::{Checkpoint, WriterOptions};
use crate::error::{Arg, Error, Result};
use data::{DataSpec, Normalize, NormalizeSpec, Samples, SplitOptions, Splits};
use freeze::{FreezePolicy, FreezeSummary};
pub use models::ArchOptions;
use models::{ArchSpec, BnStats, Model, Task};
use trainer::{EpochRecord, TrainConfig, TrainReport};

#[derive(Clone, Debug)]
pub struct DataOptions {
    pub spec: DataSpec,
    pub classes: Option<Vec<u32>>,
    pub val_fraction: f64,
    pub test_fraction: f64,
    /// None: 0.5,0.5 for pixel data (the reference's Normalize(0.5, 0.5)), none for float data.
    pub normalize: Option<NormalizeSpec>,
    pub limit: Option<usize>,
    pub tokenizer: Option<PathBuf>,
    pub max_len: usize,
}

impl DataOptions {
    pub const VAL_FRACTION: f64 = 0.1;
    pub const TEST_FRACTION: f64 = 0.2;
    pub const MAX_LEN: usize = 128;

    /// `spec` with every other option at its default (the defaults `graft train` and `graft eval` show).
    pub fn new(spec: DataSpec) -> DataOptions {
        DataOptions {
            spec,
            classes: None,
            val_fraction: Self::VAL_FRACTION,
            test_fraction: Self::TEST_FRACTION,
            normalize: None,
            limit: None,
            tokenizer: None,
            max_len: Self::MAX_LEN,
        }
    }
}

#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub arch: ArchOptions,
    pub data: DataOptions,
    pub init: Option<PathBuf>,
    pub transfer_body: Option<PathBuf>,
    pub freeze: FreezePolicy,
    pub bn_stats: BnStats,
    pub train: TrainConfig,
    pub device: DeviceKind,
    pub record: RunRecord,
    pub baseline: bool,
}

/// Where a training run leaves what it made, for classifiers and causal LMs alike: the trained checkpoint and the
/// results line.
#[derive(Clone, Debug)]
pub struct RunRecord {
    /// The trained checkpoint's destination (none: nothing is written).
    pub output: Option<PathBuf>,
    pub writer: WriterOptions,
    /// The results file the run appends its line to.
    pub results: Option<PathBuf>,
    /// The line's experiment name (none: one made from the model and the freeze policy).
    pub experiment: Option<String>,
    /// Extra `key=value` entries for the results line's config (numbers when they parse as one), so reports can
    /// plot metrics against parameters the trainer does not know (method, top-p of a merge).
    pub tags: Vec<(String, String)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TrainOutcome {
    pub run_id: String,
    pub arch: serde_json::Value,
    pub data: String,
    pub classes: Vec<String>,
    pub samples: BTreeMap<&'static str, usize>,
    pub freeze: FreezeSummary,
    pub bn_stats: BnStats,
    pub feature_extraction: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zero_shot_accuracy: Option<f64>,
    pub report: TrainReport,
    pub test: metrics::Metrics,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<PathBuf>,
}

/// Where a model trains or evaluates (`--device`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    #[default]
    Cpu,
    /// GPU 0 (needs a build with the `cuda` feature).
    Cuda,
}

impl DeviceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        }
    }

    /// Opens the device: CUDA needs the `cuda` feature and a GPU.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceKind::Cpu => Ok(Device::Cpu),
            DeviceKind::Cuda if cfg!(feature = "cuda") => {
                Device::new_cuda(0).map_err(|e| Error::invalid(format!("{} cuda: cannot open GPU 0: {e}", Arg::Device)))
            }
            DeviceKind::Cuda => Err(Error::usage(format!(
                "{} cuda: this graft was built without the `cuda` cargo feature",
                Arg::Device
            ))),
        }
    }
}

/// Which split of the data an evaluation measures (`--split`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    #[default]
    Test,
    Val,
    Train,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Test => "test",
            Split::Val => "val",
            Split::Train => "train",
        }
    }
}

/// Loads and splits the data, tokenising texts with the tokenizer found for `tokenizer_dir`.
pub fn load_data(opts: &DataOptions, seed: u64, tokenizer_dir: Option<&Path>) -> Result<(Splits, &'static str)> {
    let mut src = data::open(&opts.spec)?;
    let format = src.format;
    if let Samples::Text(_) = &src.train.samples {
        let path = tokenize::find(opts.tokenizer.as_deref(), tokenizer_dir)?;
        let tok = tokenize::Tokenizer::open(&path, opts.max_len)?;
        tok.tokenize(&mut src.train)?;
        if let Some(t) = src.test.as_mut() {
            tok.tokenize(t)?;
        }
    }
    let split = SplitOptions {
        classes: opts.classes.clone(),
        val_fraction: opts.val_fraction,
        test_fraction: opts.test_fraction,
        seed,
        limit: opts.limit,
    };
    Ok((data::subset::split(src, &split)?, format))
}

fn normalisation(opts: &DataOptions, splits: &Splits) -> Normalize {
    let pixel = matches!(&splits.train.data.samples, Samples::Dense { features: data::Features::U8(_), .. });
    // Pixels get the reference study's Normalize(0.5, 0.5); float features stay as they are.
    let pixel_default = Normalize { mean: vec![0.5], std: vec![0.5] };
    let spec =
        opts.normalize.clone().unwrap_or(NormalizeSpec::Fixed(if pixel { pixel_default } else { Normalize::none() }));
    match spec {
        NormalizeSpec::Fixed(n) => n,
        NormalizeSpec::Auto => Normalize::fit(&splits.train),
    }
}

/// The architecture for a run: from the checkpoint when there is one (head resized for `--transfer-body`), else
/// from `--arch` and the data.
fn resolve_arch(
    opts: &ArchOptions,
    ck: Option<&Checkpoint>,
    transfer: bool,
    sample_shape: &[usize],
    classes: usize,
) -> Result<ArchSpec> {
    let from_ck = match ck {
        Some(ck) => checkpoint_io::arch_of(ck)?,
        None => None,
    };
    let mut spec = match (from_ck, opts.arch) {
        (Some(s), Some(a)) if s.name() != a.name() => {
            return Err(Error::usage(format!(
                "{} {} but {} holds a {} model",
                Arg::Arch,
                a.name(),
                ck.unwrap().path().display(),
                s.name()
            )))
        }
        (Some(s), _) => s,
        (None, Some(a)) => a.fresh(opts, sample_shape, classes)?,
        (None, None) => {
            return Err(Error::usage(match ck {
                Some(ck) => format!(
                    "{}: no architecture in its metadata ('{}') or config.json; pass {}",
                    ck.path().display(),
                    checkpoint_io::ARCH_KEY,
                    Arg::Arch
                ),
                None => format!(
                    "pass {} ({}) or {}/{} CHECKPOINT",
                    Arg::Arch,
                    models::ARCHS
                        .iter()
                        .filter(|a| a.task() == Task::Classifier)
                        .map(|a| a.name())
                        .collect::<Vec<_>>()
                        .join(", "),
                    Arg::Init,
                    Arg::TransferBody
                ),
            }))
        }
    };
    spec.override_from(opts);
    if spec.num_classes() != classes {
        if transfer || ck.is_some_and(|c| lacks_head(&spec, c)) {
            spec = spec.with_num_classes(classes);
        } else {
            return Err(Error::usage(format!(
                "the model has {} outputs but the data has {classes} classes; use {} to start a new head",
                spec.num_classes(),
                Arg::TransferBody
            )));
        }
    }
    Ok(spec)
}

/// Whether `ck` is a pretrained body without the head `spec`'s architecture trains on it (a Hugging Face encoder).
fn lacks_head(spec: &ArchSpec, ck: &Checkpoint) -> bool {
    spec.as_spec().head_tensor().is_some_and(|t| ck.get(t).is_none())
}

/// Builds the model for `spec` and loads `ck` into it (all tensors, or all but the head for a transfer).
pub fn build_model(
    spec: &ArchSpec,
    ck: Option<&Checkpoint>,
    transfer: bool,
    dtype: DType,
    device: &Device,
    seed: u64,
) -> Result<Box<dyn Model>> {
    let store = params::ParamStore::new(dtype, device.clone(), seed);
    let model = models::build(spec, store)?;
    if let Some(ck) = ck {
        // A pretrained encoder without graft's head gets a fresh head, as does every transfer.
        let fresh_head = transfer || lacks_head(spec, ck);
        let m = &*model;
        checkpoint_io::load(m.store(), ck, &|n| fresh_head && m.is_head(n))?;
    }
    Ok(model)
}

/// A run's identity in results lines: a stable hash of its configuration and seed.
pub(crate) fn run_id(config: &serde_json::Value, seed: u64) -> String {
    format!("{:016x}", crate::rng::stable_hash(&format!("{config}/{seed}")))
}

pub fn run_train(o: &TrainOptions) -> Result<TrainOutcome> {
    crate::alloc::tune_allocator();
    if let Some(out) = &o.record.output {
        crate::checkpoint::CheckpointWriter::check_destination_free(out, &o.record.writer)?;
    }
    let dev = o.device.open()?;
    if o.init.is_some() && o.transfer_body.is_some() {
        return Err(Error::usage(format!(
            "{} and {} are exclusive (one starting checkpoint)",
            Arg::Init,
            Arg::TransferBody
        )));
    }
    let start = o.init.as_ref().or(o.transfer_body.as_ref());
    let ck = start.map(Checkpoint::open).transpose()?;
    let transfer = o.transfer_body.is_some();
    let tok_dir = ck.as_ref().and_then(|c| c.dir().map(Path::to_path_buf));
    let (splits, format) = load_data(&o.data, o.train.seed, tok_dir.as_deref())?;
    let shape = splits.train.data.samples.sample_shape();
    let spec = resolve_arch(&o.arch, ck.as_ref(), transfer, &shape, splits.classes())?;
    spec.check_input(&shape)?;
    // Training memory is counted from here: the data is loaded; the model, features, gradients, optimiser state
    // and activations to come are what the policy costs.
    let meter = memory::MemoryMeter::for_device(&dev);
    let data_bytes = meter.live();
    let model = build_model(&spec, ck.as_ref(), transfer, DType::F32, &dev, o.train.seed)?;
    let fsum = freeze::apply(&*model, &o.freeze)?;
    // Loading's temporaries (decoded checkpoint tensors) are freed by now and are not what the policy costs.
    meter.reset_peak();
    for bn in model.batchnorms() {
        *bn.frozen_stats.lock().unwrap() = o.bn_stats;
    }
    let norm = normalisation(&o.data, &splits);

    // Feature extraction: a frozen encoder's pooled outputs are computed once.
    let feature_mode = model.feature_body().is_some_and(|b| b.frozen());
    // Its time is part of what the policy costs: `feature_train_s` (the training split's pass) counts toward
    // samples/s, `feature_s` (every split) toward `time_s`.
    let (mut feature_s, mut feature_train_s) = (0.0, 0.0);
    let (train_p, val_p, test_p, norm) = if feature_mode {
        // Extraction runs in training-sized batches: its memory is then what the policy's forward passes need at the
        // batch every other policy trains with (in evaluation-sized batches it outweighed full fine-tuning: MiniLM,
        // 512 sequences of 128 tokens, 2.4 GB).
        let eb = o.train.batch;
        let started = std::time::Instant::now();
        let train_f = trainer::extract_features(&*model, &splits.train, eb)?;
        feature_train_s = started.elapsed().as_secs_f64();
        let val_f = trainer::extract_features(&*model, &splits.val, eb)?;
        let test_f = trainer::extract_features(&*model, &splits.test, eb)?;
        feature_s = started.elapsed().as_secs_f64();
        (train_f, val_f, test_f, Normalize::none())
    } else {
        (splits.train.clone(), splits.val.clone(), splits.test.clone(), norm)
    };
    let setup_peak = meter.peak();
    // Zero-shot accuracy means something only when the checkpoint brought its own head.
    let head_loaded = o.init.is_some() && ck.as_ref().is_some_and(|c| !lacks_head(&spec, c));
    let zero_shot = if head_loaded && !test_p.is_empty() {
        Some(trainer::evaluate(&*model, &test_p, &norm, o.train.eval_batch)?.accuracy)
    } else {
        None
    };
    let mut progress = |r: &EpochRecord| {
        if o.train.progress {
            let val = r.val_accuracy.map(|a| format!(", val accuracy {:.4}", a)).unwrap_or_default();
            eprintln!(
                "epoch {}: train loss {:.4}{val}, {:.1} s, {:.0} samples/s",
                r.epoch, r.train_loss, r.time_s, r.samples_per_s
            );
        }
    };
    // The zero-shot evaluation above is outside the window: the first epoch starts a new high-water mark.
    let mut report = trainer::train(&*model, &train_p, &val_p, &norm, &o.train, &mut progress)?;
    let trained_samples = report.samples_per_s * report.train_s;
    report.samples_per_s = trained_samples / (report.train_s + feature_train_s).max(1e-9);
    report.feature_s = feature_s;
    report.time_s = feature_s + report.train_s + if o.train.time_with_eval { report.eval_time_s } else { 0.0 };
    report.training_memory_bytes =
        meter.measures().then(|| setup_peak.max(report.step_peak_bytes).saturating_sub(data_bytes));
    let test = if test_p.is_empty() {
        metrics::compute(&[], &[], splits.classes(), None)
    } else {
        trainer::evaluate(&*model, &test_p, &norm, o.train.eval_batch)?
    };
    let peak = trainer::peak_rss_bytes();

    let config = serde_json::json!({
        "arch": spec.name(),
        "arch_spec": spec.to_json(),
        "data": o.data.spec,
        "format": format,
        "classes": o.data.classes.as_ref().map(|c| c.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")),
        "init": o.init.as_ref().map(|p| p.display().to_string()),
        "transfer_body": o.transfer_body.as_ref().map(|p| p.display().to_string()),
        "freeze": fsum.policy,
        "bn_stats": o.bn_stats,
        "epochs": o.train.epochs,
        "lr": o.train.lr,
        "batch": o.train.batch,
        "weight_decay": o.train.weight_decay,
        "normalize": norm,
        "device": o.device,
        "feature_extraction": feature_mode,
        "time_with_eval": o.train.time_with_eval,
        "trainable_params": fsum.trainable_params,
    });
    let mut config = config;
    for (k, v) in &o.record.tags {
        let value = v
            .parse::<f64>()
            .ok()
            .filter(|x| x.is_finite())
            .map_or_else(|| serde_json::json!(v), |x| serde_json::json!(x));
        config[k.as_str()] = value;
    }
    let id = run_id(&config, o.train.seed);
    if let Some(out) = &o.record.output {
        let mut meta = BTreeMap::new();
        meta.insert("graft.train".to_string(), serde_json::json!({ "run_id": id, "config": config }).to_string());
        let mut wopts = o.record.writer.clone();
        if wopts.carry_from.is_none() && spec.as_spec().reads_text() {
            wopts.carry_from = tok_dir.clone();
        }
        wopts.inputs.extend(ck.as_ref().map(|c| c.files()).unwrap_or_default());
        checkpoint_io::save(model.store(), &spec, out, wopts, meta)?;
    }
    if let Some(path) = &o.record.results {
        let experiment = o.record.experiment.clone().unwrap_or_else(|| format!("{} / {}", spec.name(), fsum.policy));
        let line =
            results::train_line(&id, &experiment, o.train.seed, &config, &test, &report, peak, zero_shot, o.baseline);
        line.append(path)?;
    }
    let mut samples = BTreeMap::new();
    samples.insert("train", splits.train.len());
    samples.insert("val", splits.val.len());
    samples.insert("test", splits.test.len());
    Ok(TrainOutcome {
        run_id: id,
        arch: spec.to_json(),
        data: o.data.spec.to_string(),
        classes: splits.class_names.clone(),
        samples,
        freeze: fsum,
        bn_stats: o.bn_stats,
        feature_extraction: feature_mode,
        zero_shot_accuracy: zero_shot,
        report,
        test,
        peak_memory_bytes: peak,
        output: o.record.output.clone(),
    })
}

#[derive(Clone, Debug)]
pub struct EvalOptions {
    pub checkpoint: PathBuf,
    pub arch: ArchOptions,
    pub data: DataOptions,
    pub split: Split,
    pub batch: usize,
    pub seed: u64,
    pub device: DeviceKind,
    pub results: Option<PathBuf>,
    pub experiment: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalOutcome {
    pub checkpoint: PathBuf,
    pub arch: serde_json::Value,
    pub data: String,
    pub split: Split,
    pub classes: Vec<String>,
    #[serde(flatten)]
    pub metrics: metrics::Metrics,
    pub time_s: f64,
}

pub fn run_eval(o: &EvalOptions) -> Result<EvalOutcome> {
    crate::alloc::tune_allocator();
    let dev = o.device.open()?;
    let ck = Checkpoint::open(&o.checkpoint)?;
    let (splits, _) = load_data(&o.data, o.seed, ck.dir())?;
    let shape = splits.train.data.samples.sample_shape();
    let spec = resolve_arch(&o.arch, Some(&ck), false, &shape, splits.classes())?;
    spec.check_input(&shape)?;
    let model = build_model(&spec, Some(&ck), false, DType::F32, &dev, o.seed)?;
    let norm = normalisation(&o.data, &splits);
    let part = match o.split {
        Split::Test => &splits.test,
        Split::Val => &splits.val,
        Split::Train => &splits.train,
    };
    if part.is_empty() {
        return Err(Error::usage(format!("the {} split is empty", o.split.as_str())));
    }
    let t = std::time::Instant::now();
    let m = trainer::evaluate(&*model, part, &norm, o.batch)?;
    let time_s = t.elapsed().as_secs_f64();
    if let Some(path) = &o.results {
        let config = serde_json::json!({
            "checkpoint": o.checkpoint.display().to_string(), "arch": spec.name(), "data": o.data.spec,
            "classes": o.data.classes.as_ref().map(|c| c.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")),
            "split": o.split.as_str(),
        });
        let id = run_id(&config, o.seed);
        let experiment = o.experiment.clone().unwrap_or_else(|| o.checkpoint.display().to_string());
        results::eval_line(&id, &experiment, o.seed, &config, &m).append(path)?;
    }
    Ok(EvalOutcome {
        checkpoint: o.checkpoint.clone(),
        arch: spec.to_json(),
        data: o.data.spec.to_string(),
        split: o.split,
        classes: splits.class_names.clone(),
        metrics: m,
        time_s,
    })
}
