//! The training loop: AdamW on the trainable parameters only, cross-entropy, an evaluation on the validation split
//! after every epoch, optional best-epoch restore, timing (training wall time, evaluation excluded unless asked),
//! the high-water mark of heap bytes during the training steps (`crate::alloc`) and the process's peak memory.
//!
//! Determinism: the epoch order comes from graft's generator seeded by (seed, epoch), dropout masks from (seed,
//! step, layer), and every kernel reduces in a fixed order, so a run is reproducible bit for bit.

use std::io::IsTerminal;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::data::{self, BatchInput, Features, Normalize, Part, Samples};
use super::memory::MemoryMeter;
use super::metrics::{self, Metrics};
use super::models::{Ctx, Input, Model};
use super::optim::{AdamW, AdamWConfig};
use super::params::{ParamStore, Slot};
use crate::error::{Arg, Error, Result};
use crate::rng::Rng;

pub fn ce(e: candle_core::Error) -> Error {
    Error::invalid(format!("training: {e}"))
}

#[derive(Clone, Debug, Serialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub lr: f64,
    pub batch: usize,
    pub eval_batch: usize,
    pub seed: u64,
    pub weight_decay: f64,
    /// Keep the weights of the epoch with the best validation accuracy.
    pub best_epoch: bool,
    /// Count evaluation time in `time_s` (the reference study's timing did).
    pub time_with_eval: bool,
    #[serde(skip)]
    pub progress: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub train_loss: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    pub time_s: f64,
    pub samples_per_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TrainReport {
    pub epochs: Vec<EpochRecord>,
    /// Wall time of the training steps (`run_train` adds feature extraction, and evaluation with
    /// `time_with_eval`, to make the run's `time_s`).
    pub time_s: f64,
    /// Of which the steps alone.
    pub train_s: f64,
    /// The frozen encoder's pass over every split (feature extraction; 0 without it), set by `run_train`.
    pub feature_s: f64,
    /// Per-epoch validation.
    pub eval_time_s: f64,
    /// The most heap bytes live during any training step (absolute: `run_train` subtracts what was live before the
    /// model was built). Validation is outside the window.
    pub step_peak_bytes: u64,
    /// What training held at its peak: heap bytes live at the high-water mark of feature extraction and the
    /// training steps, less those live before the model was built (the data). Set by `run_train`; None where
    /// allocations are not counted (GPU tensors).
    pub training_memory_bytes: Option<u64>,
    pub best_epoch: Option<usize>,
    pub steps: u64,
    pub samples_per_s: f64,
    /// Values of optimiser state (frozen parameters have none).
    pub optimizer_state: usize,
}

/// Model input from a batch.
pub fn to_input(b: BatchInput) -> Input {
    match b {
        BatchInput::Dense(t) => Input::Dense(t),
        BatchInput::Tokens { ids, mask } => Input::Tokens { ids, mask },
    }
}

fn dtype_of(model: &dyn Model) -> (DType, Device) {
    (model.store().dtype, model.store().device.clone())
}

/// Trains `model` on `train`, validating on `val` after each epoch.
pub fn train(
    model: &dyn Model,
    train: &Part,
    val: &Part,
    norm: &Normalize,
    cfg: &TrainConfig,
    on_epoch: &mut dyn FnMut(&EpochRecord),
) -> Result<TrainReport> {
    let (dt, dev) = dtype_of(model);
    let mut opt = AdamW::new(model.store(), AdamWConfig { weight_decay: cfg.weight_decay, ..AdamWConfig::new(cfg.lr) })
        .map_err(ce)?;
    let mut records = Vec::new();
    let (mut train_time, mut eval_time) = (0f64, 0f64);
    let mut step = 0u64;
    // The optimiser state just allocated is part of what training holds, whatever the first epoch's peak.
    let meter = MemoryMeter::for_device(&dev);
    let mut step_peak = meter.live();
    let mut best: Option<(f64, usize, Vec<Saved>)> = None;
    let has_bn = !model.batchnorms().is_empty();
    for epoch in 1..=cfg.epochs {
        let mut order = train.indices.clone();
        Rng::for_label(cfg.seed, &format!("graft-train/epoch/{epoch}")).shuffle(&mut order);
        // A last batch of one sample cannot be batch-normalised (PyTorch raises); drop it.
        let batches: Vec<&[usize]> = order.chunks(cfg.batch.max(1)).filter(|b| !(has_bn && b.len() < 2)).collect();
        let bar = progress_bar(cfg.progress, batches.len() as u64, epoch, cfg.epochs);
        meter.reset_peak();
        let start = Instant::now();
        let (mut loss_sum, mut seen) = (0f64, 0usize);
        for b in batches {
            step += 1;
            let (x, y) = data::batch(&train.data, b, norm, dt, &dev).map_err(ce)?;
            let ctx = Ctx { train: true, seed: cfg.seed, step };
            let logits = model.forward(&to_input(x), &ctx).map_err(ce)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y).map_err(ce)?;
            let l = loss.to_dtype(DType::F64).and_then(|l| l.to_scalar::<f64>()).map_err(ce)?;
            if !l.is_finite() {
                return Err(Error::invalid(format!(
                    "training diverged at epoch {epoch}, step {step}: loss is {l}; lower {}",
                    Arg::Lr
                )));
            }
            if opt.state_len() > 0 {
                let grads = loss.backward().map_err(ce)?;
                opt.step(&grads).map_err(ce)?;
            }
            loss_sum += l * b.len() as f64;
            seen += b.len();
            bar.inc(1);
            let secs = start.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!("loss {:.4}  {:.0} samples/s", loss_sum / seen as f64, seen as f64 / secs));
        }
        let secs = start.elapsed().as_secs_f64();
        train_time += secs;
        step_peak = step_peak.max(meter.peak());
        bar.finish_and_clear();
        let ev_start = Instant::now();
        let val_m = if val.is_empty() { None } else { Some(evaluate(model, val, norm, cfg.eval_batch)?) };
        eval_time += ev_start.elapsed().as_secs_f64();
        let rec = EpochRecord {
            epoch,
            train_loss: loss_sum / seen.max(1) as f64,
            val_accuracy: val_m.as_ref().map(|m| m.accuracy),
            val_loss: val_m.as_ref().and_then(|m| m.loss),
            time_s: secs,
            samples_per_s: seen as f64 / secs.max(1e-9),
        };
        on_epoch(&rec);
        if cfg.best_epoch {
            if let Some(acc) = rec.val_accuracy {
                if !best.as_ref().is_some_and(|(b, _, _)| acc <= *b) {
                    best = Some((acc, epoch, snapshot(model)?));
                }
            }
        }
        records.push(rec);
    }
    let best_epoch = match best {
        Some((_, e, saved)) => {
            restore(model, saved)?;
            Some(e)
        }
        None => None,
    };
    let samples: f64 = records.iter().map(|r| r.samples_per_s * r.time_s).sum();
    Ok(TrainReport {
        samples_per_s: samples / train_time.max(1e-9),
        time_s: train_time,
        train_s: train_time,
        feature_s: 0.0,
        eval_time_s: eval_time,
        training_memory_bytes: None,
        step_peak_bytes: step_peak,
        epochs: records,
        best_epoch,
        steps: step,
        optimizer_state: opt.state_len(),
    })
}

fn progress_bar(on: bool, len: u64, epoch: usize, epochs: usize) -> ProgressBar {
    if !on || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "epoch {epoch}/{epochs} [{{bar:30}}] {{pos}}/{{len}} {{msg}} eta {{eta}}"
        ))
        .unwrap()
        .progress_chars("=> "),
    );
    bar
}

enum Saved {
    Var(candle_core::Var, Tensor),
    Counter(std::sync::Arc<std::sync::atomic::AtomicI64>, i64),
}

fn snapshot(model: &dyn Model) -> Result<Vec<Saved>> {
    model
        .store()
        .entries()
        .iter()
        .map(|e| {
            Ok(match &e.slot {
                Slot::Param(p) => Saved::Var(p.var.clone(), p.var.as_tensor().copy().map_err(ce)?),
                Slot::Buffer(v) => Saved::Var(v.clone(), v.as_tensor().copy().map_err(ce)?),
                Slot::Counter(c) => Saved::Counter(c.clone(), c.load(std::sync::atomic::Ordering::Relaxed)),
            })
        })
        .collect()
}

fn restore(_model: &dyn Model, saved: Vec<Saved>) -> Result<()> {
    for s in saved {
        match s {
            Saved::Var(v, t) => v.set(&t).map_err(ce)?,
            Saved::Counter(c, x) => c.store(x, std::sync::atomic::Ordering::Relaxed),
        }
    }
    Ok(())
}

/// Predictions, loss and metrics of `model` on `part` (evaluation mode).
pub fn evaluate(model: &dyn Model, part: &Part, norm: &Normalize, batch: usize) -> Result<Metrics> {
    without_graph(model.store(), || evaluate_tracked(model, part, norm, batch))
}

/// Runs `f` with every parameter of `store` detached, then restores the policy's flags. An evaluation needs no graph:
/// with trainable parameters candle would record one and keep every activation of the batch (MiniLM, full
/// fine-tuning, 512 sequences of 128 tokens per evaluation batch: over 20 GB).
pub fn without_graph<R>(store: &ParamStore, f: impl FnOnce() -> R) -> R {
    let flags: Vec<bool> = store.params().map(|(_, p)| p.trainable()).collect();
    for (_, p) in store.params() {
        p.set_trainable(false);
    }
    let r = f();
    for ((_, p), on) in store.params().zip(flags) {
        p.set_trainable(on);
    }
    r
}

fn evaluate_tracked(model: &dyn Model, part: &Part, norm: &Normalize, batch: usize) -> Result<Metrics> {
    let (dt, dev) = dtype_of(model);
    let mut pred = Vec::with_capacity(part.len());
    let mut loss_sum = 0f64;
    for b in part.indices.chunks(batch.max(1)) {
        let (x, y) = data::batch(&part.data, b, norm, dt, &dev).map_err(ce)?;
        let logits = model.forward(&to_input(x), &Ctx::eval()).map_err(ce)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y).map_err(ce)?;
        loss_sum += loss.to_dtype(DType::F64).and_then(|l| l.to_scalar::<f64>()).map_err(ce)? * b.len() as f64;
        let am: Vec<u32> = logits.argmax(1).and_then(|a| a.to_vec1::<u32>()).map_err(ce)?;
        pred.extend(am);
    }
    let truth = part.labels();
    let classes = model.spec().num_classes();
    Ok(metrics::compute(&truth, &pred, classes, Some(loss_sum / part.len().max(1) as f64)))
}

/// Feature extraction: the pooled encoder outputs of every sample of `part`, as a dense part (the encoder is
/// frozen and has no train-mode behaviour, so they are the same every epoch).
pub fn extract_features(model: &dyn Model, part: &Part, batch: usize) -> Result<Part> {
    let body = model.feature_body().ok_or_else(|| {
        Error::invalid(format!("feature extraction: the {} model has no pooled body", model.spec().name()))
    })?;
    let (dt, dev) = dtype_of(model);
    let mut feats: Vec<f32> = Vec::new();
    let mut width = 0;
    for b in part.indices.chunks(batch.max(1)) {
        let (x, _) = data::batch(&part.data, b, &Normalize::none(), dt, &dev).map_err(ce)?;
        let BatchInput::Tokens { ids, mask } = x else {
            return Err(Error::invalid("feature extraction needs token inputs"));
        };
        let f = body.pooled(&ids, &mask).and_then(|f| f.to_dtype(DType::F32)).map_err(ce)?;
        width = f.dim(1).map_err(ce)?;
        feats.extend(f.flatten_all().and_then(|f| f.to_vec1::<f32>()).map_err(ce)?);
    }
    let labels = part.labels();
    let ds = data::Dataset {
        samples: Samples::Dense { features: Features::F32(feats), shape: vec![width] },
        labels,
        class_names: part.data.class_names.clone(),
    };
    let n = ds.len();
    Ok(Part { data: std::sync::Arc::new(ds), indices: (0..n).collect() })
}

/// The process's peak resident set size in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// One-element tensor check used by tests.
#[cfg(test)]
pub(crate) fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}
