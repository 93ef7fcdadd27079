//! Causal-LM fine-tuning: `graft train --init LLM --data text:PATH` with any freeze policy, for the llama family.
//!
//! The text is tokenised as `graft eval` does and packed into consecutive sequences of `--max-len` tokens; a seeded
//! `--val-fraction` of the sequences is held out. An optimiser step sees `--batch` sequences; they go through the
//! model in micro-batches that keep the logits under a fixed budget, each micro-batch's summed token NLL divided by
//! the step's predicted-token count, so the accumulated gradient is that of the step's mean NLL (transformers'
//! loss) whatever the micro-batching. AdamW (graft's fused one) updates only the parameters the policy leaves
//! trainable; frozen parameters enter the forward pass detached.
//!
//! The output keeps the input checkpoint's tensor names, order and dtypes: frozen tensors are copied byte for byte
//! from the input, trained ones are rounded from f32 to their stored dtype (nearest even), and `config.json` and the
//! tokenizer files are carried, so transformers loads it as it loaded the input.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor};
use serde::Serialize;
use serde_json::json;

use super::data::DataSpec;
use super::freeze::{self, FreezePolicy, FreezeSummary};
use super::lm_eval::{self, config_dir};
use super::memory::MemoryMeter;
use super::models::llama::Llama;
use super::optim::{AdamW, AdamWConfig};
use super::{results, tokenize, trainer, DeviceKind, RunRecord};
use crate::checkpoint::{Checkpoint, CheckpointWriter, TensorDecl, WriterOptions};
use crate::error::{Arg, Error, Result};
use crate::exec::{Executor, Produce};
use crate::rng::Rng;

/// Logit elements one micro-batch may hold while training (the log-softmax and its gradient triple it).
const TRAIN_LOGIT_BUDGET: usize = 64 << 20; // 256 MiB of f32 logits

#[derive(Clone, Debug)]
pub struct LmTrainOptions {
    pub init: PathBuf,
    pub data: DataSpec,
    pub tokenizer: Option<PathBuf>,
    pub max_len: usize,
    pub val_fraction: f64,
    pub freeze: FreezePolicy,
    pub epochs: usize,
    /// Sequences per optimiser step.
    pub batch: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub seed: u64,
    pub device: DeviceKind,
    pub record: RunRecord,
    /// Threads of the output writer (None: all cores).
    pub threads: Option<usize>,
    pub progress: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct LmEpoch {
    pub epoch: usize,
    pub train_loss: f64,
    pub val_nll: f64,
    pub val_perplexity: f64,
    pub time_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct LmTrainOutcome {
    pub run_id: String,
    pub init: PathBuf,
    pub data: String,
    pub sequences: SequenceCounts,
    pub freeze: FreezeSummary,
    pub perplexity_before: f64,
    pub perplexity: f64,
    pub nll: f64,
    pub epochs: Vec<LmEpoch>,
    pub steps: usize,
    /// Training wall time (optimiser steps only; the validation passes are timed apart in `eval_s`).
    pub time_s: f64,
    pub eval_s: f64,
    pub tokens_per_s: f64,
    /// What training itself held at its peak (parameters, gradients, optimiser state, activations kept for
    /// backward), counted from allocations: graft's allocator on the CPU, the CUDA memory pool on a GPU
    /// (`train::memory`); absent on a device with neither.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<PathBuf>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SequenceCounts {
    pub train: usize,
    pub val: usize,
    pub max_len: usize,
    pub tokens: usize,
}

/// Mean NLL per predicted token over `seqs`.
fn mean_nll(model: &Llama, seqs: &[&[u32]]) -> Result<f64> {
    let lp = trainer::without_graph(model.store(), || lm_eval::token_logprobs(model, seqs, usize::MAX))?;
    let n: usize = lp.iter().map(Vec::len).sum();
    Ok(-lp.iter().flatten().map(|&x| x as f64).sum::<f64>() / n.max(1) as f64)
}

/// Windows of `batch` that share a length, at most `budget / (len * vocab)` of them.
fn micro_batches<'a>(seqs: &[&'a [u32]], vocab: usize) -> Vec<Vec<&'a [u32]>> {
    let mut out: Vec<Vec<&[u32]>> = Vec::new();
    for s in seqs {
        let fit = (TRAIN_LOGIT_BUDGET / (s.len() * vocab).max(1)).max(1);
        match out.last_mut() {
            Some(last) if last.len() < fit && last[0].len() == s.len() => last.push(s),
            _ => out.push(vec![s]),
        }
    }
    out
}

/// One optimiser step over `seqs`; returns the step's mean NLL.
fn step(model: &Llama, opt: &mut AdamW, seqs: &[&[u32]]) -> Result<f64> {
    let ce = trainer::ce;
    let device = model.device();
    let predicted: usize = seqs.iter().map(|s| s.len() - 1).sum();
    let mut grads: Option<candle_core::backprop::GradStore> = None;
    let mut total = 0.0;
    for mb in micro_batches(seqs, model.config.vocab_size) {
        let len = mb[0].len();
        let flat: Vec<u32> = mb.iter().flat_map(|s| s.iter().copied()).collect();
        let ids = Tensor::from_vec(flat, (mb.len(), len), &device).map_err(ce)?;
        let lp = model.next_token_logprobs(&ids).map_err(ce)?;
        let loss = (lp.sum_all().map_err(ce)?.neg().map_err(ce)? / predicted as f64).map_err(ce)?;
        total += loss.to_dtype(DType::F64).and_then(|t| t.to_scalar::<f64>()).map_err(ce)?;
        let g = loss.backward().map_err(ce)?;
        grads = Some(match grads {
            None => g,
            Some(mut acc) => {
                for (_, p) in model.store().params().filter(|(_, p)| p.trainable()) {
                    if let Some(new) = g.get(&p.var) {
                        let sum = match acc.get(&p.var) {
                            Some(old) => (old + new).map_err(ce)?,
                            None => new.clone(),
                        };
                        acc.insert(&p.var, sum);
                    }
                }
                acc
            }
        });
    }
    if let Some(g) = grads {
        opt.step(&g).map_err(ce)?;
    }
    Ok(total)
}

pub fn run(o: &LmTrainOptions) -> Result<LmTrainOutcome> {
    crate::alloc::tune_allocator();
    if let Some(out) = &o.record.output {
        CheckpointWriter::check_destination_free(out, &o.record.writer)?;
    }
    if !(0.0..1.0).contains(&o.val_fraction) || o.val_fraction == 0.0 {
        return Err(Error::usage(format!("{} {}: expected a fraction in (0, 1)", Arg::ValFraction, o.val_fraction)));
    }
    let dev = o.device.open()?;
    // Training memory counts from here: the model's parameters are part of it (the text read next is counted too,
    // a few bytes per token beside the model).
    let meter = MemoryMeter::for_device(&dev);
    let live_before_model = meter.live();
    let model = lm_eval::load_llama(&o.init, &dev)?;
    model.config.check_sequence_length(o.max_len, &o.init.join("config.json").display().to_string())?;
    let tokenizer = tokenize::find(o.tokenizer.as_deref(), config_dir(&o.init).as_deref())?;
    let docs = lm_eval::read_documents(&o.data)?;
    let ids = lm_eval::tokenize_documents(&tokenizer, &docs)?;
    let seqs = lm_eval::windows(&ids, o.max_len);
    if seqs.len() < 2 {
        return Err(Error::usage(format!(
            "{}: {} tokens make {} sequence(s) of {} {}; training needs at least 2 (one for validation)",
            o.data,
            ids.len(),
            seqs.len(),
            Arg::MaxLen,
            o.max_len
        )));
    }
    // A seeded split of whole sequences.
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    Rng::for_label(o.seed, "lm-split").shuffle(&mut order);
    let n_val = ((seqs.len() as f64 * o.val_fraction).round() as usize).clamp(1, seqs.len() - 1);
    let val: Vec<&[u32]> = order[..n_val].iter().map(|&i| seqs[i]).collect();
    let mut train: Vec<&[u32]> = order[n_val..].iter().map(|&i| seqs[i]).collect();

    let fsum = freeze::apply(&model, &o.freeze)?;
    if fsum.trainable_params == 0 {
        return Err(Error::usage(format!(
            "{} {}: no parameter of the {} model trains under this policy",
            Arg::Freeze,
            o.freeze.describe(),
            model.config.model_type
        )));
    }
    // Loading's temporary buffers are gone; the window opens with the model alone live.
    meter.reset_peak();
    let mut eval_s = 0.0;
    let t = Instant::now();
    let before = mean_nll(&model, &val)?;
    eval_s += t.elapsed().as_secs_f64();
    let mut cfg = AdamWConfig::new(o.lr);
    cfg.weight_decay = o.weight_decay;
    let mut opt = AdamW::new(model.store(), cfg).map_err(trainer::ce)?;
    let mut epochs = Vec::new();
    let mut train_s = 0.0;
    let mut steps = 0;
    let mut rng = Rng::for_label(o.seed, "lm-shuffle");
    let mut last = before;
    for epoch in 1..=o.epochs {
        let start = Instant::now();
        rng.shuffle(&mut train);
        // Sequences of one length batch together: the shorter last sequence, if any, goes in a step of its own.
        let mut by_len = train.clone();
        by_len.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let mut loss_sum = 0.0;
        let mut n_steps = 0;
        for chunk in by_len.chunks(o.batch.max(1)) {
            loss_sum += step(&model, &mut opt, chunk)?;
            n_steps += 1;
        }
        steps += n_steps;
        let epoch_s = start.elapsed().as_secs_f64();
        train_s += epoch_s;
        let t = Instant::now();
        last = mean_nll(&model, &val)?;
        eval_s += t.elapsed().as_secs_f64();
        let rec = LmEpoch {
            epoch,
            train_loss: loss_sum / n_steps.max(1) as f64,
            val_nll: last,
            val_perplexity: last.exp(),
            time_s: epoch_s,
        };
        if o.progress {
            eprintln!(
                "epoch {:>3}  train loss {:.4}  val perplexity {:.4}  {:.1} s",
                rec.epoch, rec.train_loss, rec.val_perplexity, rec.time_s
            );
        }
        epochs.push(rec);
    }
    let training_memory = meter.measures().then(|| meter.peak().saturating_sub(live_before_model));
    let trained_tokens: usize = train.iter().map(|s| s.len()).sum::<usize>() * o.epochs;
    let output = match &o.record.output {
        Some(out) => Some(write_output(&model, &o.init, out, o.record.writer.clone(), o.threads)?),
        None => None,
    };
    let config = json!({
        "init": o.init.display().to_string(), "arch": model.config.model_type, "data": o.data,
        "freeze": fsum.policy, "trainable_params": fsum.trainable_params, "lr": o.lr, "epochs": o.epochs,
        "batch": o.batch, "max_len": o.max_len,
    });
    let mut config = config;
    for (k, v) in &o.record.tags {
        config[k] = json!(v);
    }
    let run_id = super::run_id(&config, o.seed);
    let outcome = LmTrainOutcome {
        run_id: run_id.clone(),
        init: o.init.clone(),
        data: o.data.to_string(),
        sequences: SequenceCounts { train: train.len(), val: val.len(), max_len: o.max_len, tokens: ids.len() },
        freeze: fsum,
        perplexity_before: before.exp(),
        perplexity: last.exp(),
        nll: last,
        epochs,
        steps,
        time_s: train_s,
        eval_s,
        tokens_per_s: trained_tokens as f64 / train_s.max(1e-9),
        peak_memory_bytes: training_memory,
        peak_rss_bytes: trainer::peak_rss_bytes(),
        output,
    };
    if let Some(path) = &o.record.results {
        let experiment = o
            .record
            .experiment
            .clone()
            .unwrap_or_else(|| format!("{} / {}", model.config.model_type, outcome.freeze.policy));
        let mut line = results::Line::new(results::Kind::Train, run_id.as_str(), experiment, o.seed as i64, &config);
        let m = &mut line.metrics;
        m.set("perplexity", outcome.perplexity).set("perplexity_before", outcome.perplexity_before);
        m.set("nll", outcome.nll).set("loss", outcome.nll).set("time_s", outcome.time_s);
        m.set("eval_s", outcome.eval_s).set("tokens_per_s", outcome.tokens_per_s);
        m.set("trainable_params", outcome.freeze.trainable_params);
        m.set_some("peak_rss_bytes", outcome.peak_rss_bytes).set_some("peak_memory_bytes", outcome.peak_memory_bytes);
        for e in &outcome.epochs {
            let mut o = results::Numbers::new();
            o.set("epoch", e.epoch).set("train_loss", e.train_loss).set("val_loss", e.val_nll).set("time_s", e.time_s);
            line.epochs.push(o);
        }
        line.append(path)?;
    }
    Ok(outcome)
}

/// The fine-tuned checkpoint: the input's tensors in its order and dtypes, frozen ones copied byte for byte.
fn write_output(
    model: &Llama,
    init: &Path,
    out: &Path,
    mut opts: WriterOptions,
    threads: Option<usize>,
) -> Result<PathBuf> {
    let ck = Checkpoint::open(init)?;
    let store = model.store();
    let decls: Vec<TensorDecl> =
        ck.iter().map(|v| TensorDecl::new(v.name.to_string(), v.dtype, v.shape.to_vec())).collect();
    opts.carry_from = config_dir(init);
    opts.inputs.extend(ck.files());
    for (k, v) in ck.metadata() {
        opts.metadata.entry(k.clone()).or_insert_with(|| v.clone());
    }
    let writer = CheckpointWriter::create(out, decls, opts)?;
    let exec = Executor::new(threads)?;
    let written = exec.write(writer, "train", |_, decl| {
        let trained = store.get(&decl.name).and_then(|e| match &e.slot {
            super::params::Slot::Param(p) if p.trainable() => Some(p),
            _ => None,
        });
        match trained {
            None => Produce::input(&ck, &decl.name),
            Some(p) => {
                let values = p
                    .var
                    .as_tensor()
                    .flatten_all()
                    .and_then(|t| t.to_dtype(DType::F32))
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(|e| Error::tensor(out, &decl.name, format!("cannot read trained values: {e}")))?;
                Ok(Produce::F32(values))
            }
        }
    })?;
    Ok(written.path)
}
