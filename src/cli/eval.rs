//! `graft eval CKPT --data D`: accuracy, weighted and macro F1, loss and confusion matrix of any classifier graft
//! produces, or the perplexity of a llama-family causal LM on text, as a table or JSON. The arguments become a
//! `train::request::EvalRequest`; this file prints what it returns.

use std::fmt::Write;
use std::path::PathBuf;

use super::train::DataArgs;
use super::{emit, table, Global};
use crate::error::Result;
use crate::train::lm_eval::LmEvalOutcome;
use crate::train::models::{Arch, Pooling};
use crate::train::request::{EvalRequest, EvalResult};
use crate::train::{ArchOptions, DeviceKind, EvalOutcome, Split};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The checkpoint (file or directory).
    checkpoint: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    /// Which split to measure.
    #[arg(long, value_enum, default_value_t = Split::Test)]
    split: Split,
    /// Expected architecture (checked against the checkpoint's).
    #[arg(long, value_parser = super::arch_arg())]
    arch: Option<&'static dyn Arch>,
    /// bert pooling override.
    #[arg(long, value_enum)]
    pooling: Option<Pooling>,
    #[arg(long, default_value_t = 512, value_parser = super::batch_arg)]
    batch: usize,
    /// Seed of the validation/test split (as given to graft train).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    device: DeviceKind,
    /// Append a results line (JSONL) to this file.
    #[arg(long)]
    results: Option<PathBuf>,
    #[arg(long)]
    experiment: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args, global: &Global) -> Result<()> {
    let request = EvalRequest {
        checkpoint: a.checkpoint.clone(),
        arch: ArchOptions { arch: a.arch, pooling: a.pooling, ..Default::default() },
        data: a.data.options()?,
        split: a.split,
        batch: a.batch,
        seed: a.seed,
        device: a.device,
        results: a.results.clone(),
        experiment: a.experiment.clone(),
    };
    let plan = request.validate(request.task())?;
    let result = super::with_threads(global, || plan.run())?;
    if a.json {
        return emit(&(serde_json::to_string(&result).unwrap() + "\n"));
    }
    match result {
        EvalResult::Classifier(out) => emit(&classifier_table(&out)),
        EvalResult::CausalLm(out) => emit(&causal_lm_line(&out)),
    }
}

/// The classifier's metrics and its confusion matrix with per-class precision, recall and F1.
fn classifier_table(out: &EvalOutcome) -> String {
    let m = &out.metrics;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{}  ({} on {} split of {}, {} samples)",
        out.checkpoint.display(),
        out.arch["graft_arch"].as_str().unwrap_or("?"),
        out.split.as_str(),
        out.data,
        m.samples
    );
    let _ = writeln!(
        s,
        "accuracy {:.4}  f1 weighted {:.4}  f1 macro {:.4}  loss {:.4}",
        m.accuracy,
        m.f1_weighted,
        m.f1_macro,
        m.loss.unwrap_or(f64::NAN)
    );
    let mut header: Vec<String> = vec!["true \\ predicted".into()];
    header.extend(out.classes.iter().cloned());
    header.extend(["precision".into(), "recall".into(), "f1".into(), "support".into()]);
    let hdr: Vec<&str> = header.iter().map(|h| h.as_str()).collect();
    let mut t = table(&hdr);
    for (i, row) in m.confusion.iter().enumerate() {
        let mut cells: Vec<String> = vec![out.classes.get(i).cloned().unwrap_or_else(|| i.to_string())];
        cells.extend(row.iter().map(|c| c.to_string()));
        let pc = &m.per_class[i];
        cells.extend([
            format!("{:.4}", pc.precision),
            format!("{:.4}", pc.recall),
            format!("{:.4}", pc.f1),
            pc.support.to_string(),
        ]);
        t.add_row(cells);
    }
    let _ = writeln!(s, "{t}");
    s
}

/// A causal LM's perplexity on text (`--data text:PATH`, `--max-len` tokens per window).
fn causal_lm_line(out: &LmEvalOutcome) -> String {
    format!(
        "{}  ({} on {}: {} documents, {} tokens, {} windows of <= {})\nperplexity {:.4}  nll {:.6}  {:.0} tokens/s\n",
        out.checkpoint.display(),
        out.arch,
        out.data,
        out.documents,
        out.tokens,
        out.windows,
        out.max_len,
        out.perplexity,
        out.nll,
        out.tokens_per_s
    )
}
