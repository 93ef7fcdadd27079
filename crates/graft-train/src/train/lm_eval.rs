//! Perplexity of a causal LM on text: `graft eval CKPT --data text:PATH` when CKPT is a llama-family checkpoint.
//!
//! The protocol is transformers' own, so the numbers compare: each document is tokenised as `tokenizer(text)` does
//! (the checkpoint's `tokenizer.json`, special tokens as its post-processor adds them), the documents' ids are joined
//! in order and cut into consecutive windows of `max_len` tokens, and each window is scored as
//! `model(ids, labels=ids)` scores it (every token after the first predicted from those before it, within the
//! window). The reported `nll` is the mean over every predicted token of every window (summed in f64), and
//! `perplexity = exp(nll)`.
//!
//! Text sources: a text file (one document), a JSONL file (`{"text": ...}` per line, `.jsonl`), or a directory of
//! such files (`.txt`, `.jsonl`, in name order).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor};
use serde::Serialize;
use serde_json::json;

use super::data::{DataSpec, Format};
use super::models::llama::{Llama, LlamaConfig, WORKING_DTYPE};
use super::params::ParamStore;
use super::{checkpoint_io, results, tokenize, trainer, DeviceKind};
use crate::checkpoint::Checkpoint;
use crate::error::{Arg, Error, Result};

/// Logit elements one forward pass may hold (windows are batched up to this, 8 Mi f32 = 32 MiB: larger batches only add memory traffic on the logits).
const LOGIT_BUDGET: usize = 8 << 20;

#[derive(Clone, Debug)]
pub struct LmEvalOptions {
    pub checkpoint: PathBuf,
    /// The `--data` value (`text:PATH` or `PATH`).
    pub data: DataSpec,
    /// A tokenizer.json (or its directory) other than the checkpoint's.
    pub tokenizer: Option<PathBuf>,
    pub max_len: usize,
    /// At most this many windows per forward pass.
    pub batch: usize,
    pub device: DeviceKind,
    pub results: Option<PathBuf>,
    pub experiment: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct LmEvalOutcome {
    pub checkpoint: PathBuf,
    pub arch: String,
    pub data: String,
    pub documents: usize,
    /// Tokens after tokenisation (special tokens included).
    pub tokens: usize,
    pub windows: usize,
    pub max_len: usize,
    /// Tokens that were predicted (each window's length minus one).
    pub predicted_tokens: usize,
    pub nll: f64,
    pub perplexity: f64,
    pub time_s: f64,
    pub tokens_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
}

/// Whether `ck` is a causal LM graft can evaluate by perplexity (its directory's `config.json` says llama family).
pub fn is_causal_lm(checkpoint: &Path) -> bool {
    read_config(checkpoint)
        .ok()
        .flatten()
        .is_some_and(|(v, _)| super::models::reading_config(&v, super::models::Task::CausalLm).is_some())
}

/// The directory holding a checkpoint's `config.json` and tokenizer: the checkpoint's own, or a file's parent; for a
/// GGUF file, the files convert would write from it (`gguf::side`).
pub fn config_dir(checkpoint: &Path) -> Option<PathBuf> {
    if crate::checkpoint::is_gguf_path(checkpoint) {
        return crate::gguf::side::dir(checkpoint).ok();
    }
    if checkpoint.is_dir() {
        Some(checkpoint.to_path_buf())
    } else {
        checkpoint.parent().map(Path::to_path_buf)
    }
}

fn read_config(checkpoint: &Path) -> Result<Option<(serde_json::Value, PathBuf)>> {
    let Some(path) = config_dir(checkpoint).map(|d| d.join("config.json")).filter(|p| p.is_file()) else {
        return Ok(None);
    };
    let v = crate::checkpoint::hf_config::read(&path)?.map(serde_json::Value::Object);
    Ok(v.map(|v| (v, path)))
}

/// Loads a llama-family checkpoint (single file or sharded directory) with its `config.json`.
pub fn load_llama(checkpoint: &Path, device: &candle_core::Device) -> Result<Llama> {
    let (v, path) = read_config(checkpoint)?.ok_or_else(|| {
        Error::usage(format!("{}: no config.json beside the checkpoint (a causal LM needs one)", checkpoint.display()))
    })?;
    let config = LlamaConfig::from_json(&v, &path.display().to_string())?;
    let ck = Checkpoint::open(checkpoint)?;
    let model = Llama::new(config, ParamStore::for_loading(WORKING_DTYPE, device.clone()))?;
    // A tied model registers no head, so a checkpoint's redundant `lm_head.weight` is merely unused.
    checkpoint_io::load(model.store(), &ck, &|_| false)?;
    Ok(model)
}

/// The documents of a text source, in order.
pub fn read_documents(spec: &DataSpec) -> Result<Vec<String>> {
    if spec.format.is_some_and(|f| f != Format::Text) {
        return Err(Error::usage(format!("{spec}: a causal LM reads plain text: text:PATH or PATH ({})", Arg::Data)));
    }
    let path = spec.path.clone();
    if !path.exists() {
        return Err(Error::usage(format!("{}: no such file or directory ({})", path.display(), Arg::Data)));
    }
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&path)
            .map_err(|e| Error::io(&path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("txt" | "jsonl")))
            .collect();
        v.sort();
        if v.is_empty() {
            return Err(Error::usage(format!(
                "{}: no .txt or .jsonl files in this directory ({})",
                path.display(),
                Arg::Data
            )));
        }
        v
    } else {
        vec![path]
    };
    let mut docs = Vec::new();
    for f in &files {
        let bytes = std::fs::read(f).map_err(|e| Error::io(f, e))?;
        let text = String::from_utf8(bytes).map_err(|e| Error::format(f, format!("not UTF-8 text: {e}")))?;
        if f.extension().and_then(|e| e.to_str()) == Some("jsonl") {
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let v: serde_json::Value = serde_json::from_str(line)
                    .map_err(|e| Error::format(f, format!("line {}: invalid JSON: {e}", i + 1)))?;
                let doc = v
                    .get("text")
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| Error::format(f, format!("line {}: no string field \"text\"", i + 1)))?;
                docs.push(doc.to_string());
            }
        } else {
            docs.push(text);
        }
    }
    if docs.is_empty() {
        return Err(Error::usage(format!("{spec}: no text to score ({})", Arg::Data)));
    }
    Ok(docs)
}

/// Every document tokenised as `tokenizer(text)` does, joined in order.
pub fn tokenize_documents(tokenizer: &Path, docs: &[String]) -> Result<Vec<u32>> {
    let tok = tokenize::Tokenizer::open_whole(tokenizer)?;
    let mut ids = Vec::new();
    for d in docs {
        ids.extend(tok.encode(d)?);
    }
    Ok(ids)
}

/// Consecutive windows of at most `max_len` tokens; a last window of one token predicts nothing and is dropped.
pub fn windows(ids: &[u32], max_len: usize) -> Vec<&[u32]> {
    ids.chunks(max_len.max(2)).filter(|w| w.len() >= 2).collect()
}

/// The log-likelihood of every predicted token of every window, window after window, in order.
pub fn token_logprobs(model: &Llama, windows: &[&[u32]], batch: usize) -> Result<Vec<Vec<f32>>> {
    let device = model.device();
    let vocab = model.config.vocab_size;
    let mut out = Vec::with_capacity(windows.len());
    let mut i = 0;
    while i < windows.len() {
        let len = windows[i].len();
        // Windows of one length go through together, as many as the logit budget allows.
        let fit = (LOGIT_BUDGET / (len * vocab).max(1)).clamp(1, batch.max(1));
        let group: Vec<&[u32]> = windows[i..].iter().take(fit).take_while(|w| w.len() == len).copied().collect();
        if let Some(bad) = group.iter().flat_map(|w| w.iter()).find(|&&t| t as usize >= vocab) {
            return Err(Error::invalid(format!("token id {bad} is outside the model's vocabulary of {vocab}")));
        }
        let flat: Vec<u32> = group.iter().flat_map(|w| w.iter().copied()).collect();
        let ids = Tensor::from_vec(flat, (group.len(), len), &device)
            .map_err(|e| Error::invalid(format!("cannot build the token batch: {e}")))?;
        let lp = model
            .next_token_logprobs(&ids)
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec2::<f32>())
            .map_err(|e| Error::invalid(format!("forward pass failed: {e}")))?;
        i += group.len();
        out.extend(lp);
    }
    Ok(out)
}

pub fn run(o: &LmEvalOptions) -> Result<LmEvalOutcome> {
    crate::alloc::tune_allocator();
    let dev = o.device.open()?;
    let model = load_llama(&o.checkpoint, &dev)?;
    model.config.check_sequence_length(o.max_len, &o.checkpoint.join("config.json").display().to_string())?;
    let tokenizer = tokenize::find(o.tokenizer.as_deref(), config_dir(&o.checkpoint).as_deref())?;
    let docs = read_documents(&o.data)?;
    let ids = tokenize_documents(&tokenizer, &docs)?;
    let wins = windows(&ids, o.max_len);
    if wins.is_empty() {
        return Err(Error::usage(format!("{}: the text has {} token(s); at least 2 are needed", o.data, ids.len())));
    }
    let start = Instant::now();
    // Scoring needs no gradient: without a graph no activation outlives its use.
    let logprobs = trainer::without_graph(model.store(), || token_logprobs(&model, &wins, o.batch))?;
    let time_s = start.elapsed().as_secs_f64();
    let predicted: usize = logprobs.iter().map(Vec::len).sum();
    let nll = -logprobs.iter().flat_map(|w| w.iter()).map(|&x| x as f64).sum::<f64>() / predicted as f64;
    let scored: usize = wins.iter().map(|w| w.len()).sum();
    let outcome = LmEvalOutcome {
        checkpoint: o.checkpoint.clone(),
        arch: model.config.model_type.clone(),
        data: o.data.to_string(),
        documents: docs.len(),
        tokens: ids.len(),
        windows: wins.len(),
        max_len: o.max_len,
        predicted_tokens: predicted,
        nll,
        perplexity: nll.exp(),
        time_s,
        tokens_per_s: scored as f64 / time_s.max(1e-9),
        peak_memory_bytes: trainer::peak_rss_bytes(),
    };
    if let Some(path) = &o.results {
        let config = json!({
            "checkpoint": o.checkpoint.display().to_string(), "arch": outcome.arch, "data": o.data,
            "max_len": o.max_len,
        });
        let id = super::run_id(&config, 0);
        let experiment = o.experiment.clone().unwrap_or_else(|| o.checkpoint.display().to_string());
        let mut line = results::Line::new(results::Kind::Eval, id, experiment, 0, &config);
        let m = &mut line.metrics;
        m.set("nll", outcome.nll).set("loss", outcome.nll).set("perplexity", outcome.perplexity);
        m.set("tokens", outcome.tokens).set("predicted_tokens", outcome.predicted_tokens);
        m.set("time_s", outcome.time_s).set("tokens_per_s", outcome.tokens_per_s);
        m.set_some("peak_memory_bytes", outcome.peak_memory_bytes);
        line.append(path)?;
    }
    Ok(outcome)
}
