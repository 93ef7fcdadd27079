//! Typed requests for `graft train` and `graft eval`: one library entry each, for classifiers and causal LMs alike.
//!
//! A front end fills a `TrainRequest` or `EvalRequest` with typed values (an architecture from the registry, a
//! `DataSpec`, a `FreezePolicy`), then calls `validate` and `run`. `validate` checks the request against itself
//! (exclusive flags, required combinations, the task's defaults) before any file is opened; what the run trains or
//! measures is decided once there (`--arch`'s task, else the starting checkpoint's `config.json`), and `run` hands
//! the options to the classifier (`run_train`, `run_eval`) or causal-LM (`lm_train`, `lm_eval`) path.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::freeze::FreezePolicy;
use super::lm_eval::{self, LmEvalOptions, LmEvalOutcome};
use super::lm_train::{self, LmTrainOptions, LmTrainOutcome};
use super::models::{ArchOptions, BnStats, Task};
use super::trainer::TrainConfig;
use super::{DataOptions, DeviceKind, EvalOptions, EvalOutcome, RunRecord, TrainOptions, TrainOutcome};
use crate::error::{Arg, Error, Result};

/// `graft train`: fine-tune (or train from scratch) a classifier or a causal LM.
#[derive(Clone, Debug)]
pub struct TrainRequest {
    pub arch: ArchOptions,
    pub data: DataOptions,
    /// Start from every tensor of this checkpoint.
    pub init: Option<PathBuf>,
    /// Start from every tensor of this checkpoint but the head (classifiers).
    pub transfer_body: Option<PathBuf>,
    pub freeze: FreezePolicy,
    pub bn_stats: BnStats,
    /// None: the task's default (5 epochs, lr 1e-3, batch 128 for a classifier; 1, 1e-4, 8 for a causal LM).
    pub epochs: Option<usize>,
    pub lr: Option<f64>,
    pub batch: Option<usize>,
    pub eval_batch: usize,
    pub weight_decay: f64,
    pub seed: u64,
    pub best_epoch: bool,
    pub time_with_eval: bool,
    /// Per-epoch lines (and the causal LM's progress) on stderr.
    pub progress: bool,
    pub device: DeviceKind,
    pub record: RunRecord,
    /// Threads of the causal LM's output writer (None: all cores).
    pub threads: Option<usize>,
    pub baseline: bool,
}

/// A validated training request, its defaults settled for its task.
#[derive(Clone, Debug)]
pub enum TrainPlan {
    Classifier(Box<TrainOptions>),
    CausalLm(Box<LmTrainOptions>),
}

#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum TrainResult {
    Classifier(Box<TrainOutcome>),
    CausalLm(Box<LmTrainOutcome>),
}

impl TrainRequest {
    /// What the run trains: a causal LM when `--arch` names one or the starting checkpoint's `config.json` describes
    /// one (this reads that file, nothing else), else a classifier.
    pub fn task(&self) -> Task {
        let from_checkpoint =
            [&self.init, &self.transfer_body].into_iter().flatten().any(|p| lm_eval::is_causal_lm(p.as_path()));
        let named_lm = self.arch.arch.is_some_and(|a| a.task() == Task::CausalLm);
        if named_lm || from_checkpoint {
            Task::CausalLm
        } else {
            Task::Classifier
        }
    }

    /// Checks the request for `task` before any file is opened and settles the task's defaults.
    pub fn validate(&self, task: Task) -> Result<TrainPlan> {
        let (epochs, lr, batch) = match task {
            Task::CausalLm => (self.epochs.unwrap_or(1), self.lr.unwrap_or(1e-4), self.batch.unwrap_or(8)),
            Task::Classifier => (self.epochs.unwrap_or(5), self.lr.unwrap_or(1e-3), self.batch.unwrap_or(128)),
        };
        if batch == 0 || self.eval_batch == 0 {
            return Err(Error::usage(format!("{} and {} must be at least 1", Arg::Batch, Arg::EvalBatch)));
        }
        if !(lr > 0.0 && lr.is_finite()) {
            return Err(Error::usage(format!("{} must be positive", Arg::Lr)));
        }
        if self.init.is_some() && self.transfer_body.is_some() {
            return Err(Error::usage(format!(
                "{} and {} are exclusive (one starting checkpoint)",
                Arg::Init,
                Arg::TransferBody
            )));
        }
        Ok(match task {
            Task::CausalLm => {
                let Some(init) = self.init.clone() else {
                    return Err(Error::usage(format!(
                        "a causal LM is fine-tuned from a checkpoint: pass {} DIR",
                        Arg::Init
                    )));
                };
                TrainPlan::CausalLm(Box::new(LmTrainOptions {
                    init,
                    data: self.data.spec.clone(),
                    tokenizer: self.data.tokenizer.clone(),
                    max_len: self.data.max_len,
                    val_fraction: self.data.val_fraction,
                    freeze: self.freeze.clone(),
                    epochs,
                    batch,
                    lr,
                    weight_decay: self.weight_decay,
                    seed: self.seed,
                    device: self.device,
                    record: self.record.clone(),
                    threads: self.threads,
                    progress: self.progress,
                }))
            }
            Task::Classifier => TrainPlan::Classifier(Box::new(TrainOptions {
                arch: self.arch.clone(),
                data: self.data.clone(),
                init: self.init.clone(),
                transfer_body: self.transfer_body.clone(),
                freeze: self.freeze.clone(),
                bn_stats: self.bn_stats,
                train: TrainConfig {
                    epochs,
                    lr,
                    batch,
                    eval_batch: self.eval_batch,
                    seed: self.seed,
                    weight_decay: self.weight_decay,
                    best_epoch: self.best_epoch,
                    time_with_eval: self.time_with_eval,
                    progress: self.progress,
                },
                device: self.device,
                record: self.record.clone(),
                baseline: self.baseline,
            })),
        })
    }
}

impl TrainPlan {
    pub fn run(&self) -> Result<TrainResult> {
        Ok(match self {
            TrainPlan::Classifier(o) => TrainResult::Classifier(Box::new(super::run_train(o)?)),
            TrainPlan::CausalLm(o) => TrainResult::CausalLm(Box::new(lm_train::run(o)?)),
        })
    }
}

/// `graft eval`: measure a classifier (accuracy, F1, loss) or a causal LM (perplexity). The request has exactly the
/// classifier evaluation's options (checkpoint, expected architecture, data, split, batch, seed, device, results), so
/// it is that struct; `validate` settles which evaluation runs.
pub type EvalRequest = EvalOptions;

#[derive(Clone, Debug)]
pub enum EvalPlan {
    Classifier(Box<EvalOptions>),
    CausalLm(LmEvalOptions),
}

#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum EvalResult {
    Classifier(EvalOutcome),
    CausalLm(LmEvalOutcome),
}

impl EvalRequest {
    /// A causal LM when the checkpoint's `config.json` describes one (this reads that file), else a classifier.
    pub fn task(&self) -> Task {
        if lm_eval::is_causal_lm(Path::new(&self.checkpoint)) {
            Task::CausalLm
        } else {
            Task::Classifier
        }
    }

    /// Checks the request for `task` before any data or weights are read.
    pub fn validate(&self, task: Task) -> Result<EvalPlan> {
        if self.batch == 0 {
            return Err(Error::usage(format!("{} must be at least 1", Arg::Batch)));
        }
        Ok(match task {
            Task::CausalLm => EvalPlan::CausalLm(LmEvalOptions {
                checkpoint: self.checkpoint.clone(),
                data: self.data.spec.clone(),
                tokenizer: self.data.tokenizer.clone(),
                max_len: self.data.max_len,
                batch: self.batch,
                device: self.device,
                results: self.results.clone(),
                experiment: self.experiment.clone(),
            }),
            Task::Classifier => EvalPlan::Classifier(Box::new(self.clone())),
        })
    }
}

impl EvalPlan {
    pub fn run(&self) -> Result<EvalResult> {
        Ok(match self {
            EvalPlan::Classifier(o) => EvalResult::Classifier(super::run_eval(o)?),
            EvalPlan::CausalLm(o) => EvalResult::CausalLm(lm_eval::run(o)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::data::DataSpec;
    use crate::train::models::lookup;

    fn request() -> TrainRequest {
        TrainRequest {
            arch: ArchOptions { arch: lookup("mlp"), ..Default::default() },
            data: DataOptions::new(DataSpec::parse("/nonexistent/data")),
            init: None,
            transfer_body: None,
            freeze: FreezePolicy::None,
            bn_stats: BnStats::Freeze,
            epochs: None,
            lr: None,
            batch: None,
            eval_batch: 512,
            weight_decay: 0.01,
            seed: 0,
            best_epoch: false,
            time_with_eval: false,
            progress: false,
            device: DeviceKind::Cpu,
            record: RunRecord {
                output: None,
                writer: crate::checkpoint::WriterOptions {
                    max_shard_size: crate::checkpoint::DEFAULT_MAX_SHARD_SIZE,
                    metadata: Default::default(),
                    carry_from: None,
                    inputs: Vec::new(),
                    overwrite: false,
                },
                results: None,
                experiment: None,
                tags: Vec::new(),
            },
            threads: None,
            baseline: false,
        }
    }

    /// The task's defaults, as docs/train.md states them; a named llama is a causal LM without reading any file.
    #[test]
    fn defaults_follow_the_task() {
        let r = request();
        assert_eq!(r.task(), Task::Classifier);
        let TrainPlan::Classifier(o) = r.validate(Task::Classifier).unwrap() else { panic!("a classifier") };
        assert_eq!((o.train.epochs, o.train.lr, o.train.batch), (5, 1e-3, 128));
        let lm = TrainRequest {
            arch: ArchOptions { arch: lookup("llama"), ..Default::default() },
            init: Some("/nonexistent/llama".into()),
            ..request()
        };
        assert_eq!(lm.task(), Task::CausalLm);
        let TrainPlan::CausalLm(o) = lm.validate(Task::CausalLm).unwrap() else { panic!("a causal LM") };
        assert_eq!((o.epochs, o.lr, o.batch), (1, 1e-4, 8));
    }

    /// Conflicts and missing combinations fail in `validate`, on paths that do not exist: no file was needed.
    #[test]
    fn bad_combinations_fail_before_any_file_is_read() {
        let both = TrainRequest {
            init: Some("/nonexistent/a".into()),
            transfer_body: Some("/nonexistent/b".into()),
            ..request()
        };
        let err = both.validate(Task::Classifier).unwrap_err().to_string();
        assert!(err.contains("exclusive"), "{err}");
        let err = request().validate(Task::CausalLm).unwrap_err().to_string();
        assert!(err.contains("fine-tuned from a checkpoint"), "{err}");
        for lr in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = TrainRequest { lr: Some(lr), ..request() }.validate(Task::Classifier).unwrap_err().to_string();
            assert!(err.contains("must be positive"), "{lr}: {err}");
        }
        let err = TrainRequest { batch: Some(0), ..request() }.validate(Task::CausalLm).unwrap_err().to_string();
        assert!(err.contains("at least 1"), "{err}");
    }
}
