//! One merge as a typed request, and the library's single entry point that carries it out (`run`): open the models
//! (with their LoRA adapters), remap vocabulary rows, plan, select by SNR, lay out the output's side files, and
//! stream the plan through the executor to the writer. Everything that can be checked without reading a model is
//! checked first (`Request::validate`), so a bad combination of options fails before any file is opened.
//!
//! The command line builds a `Request` from flags or a YAML config and prints the `Outcome`; batch and multi-stage
//! runs call `run` once per merge.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::config::MergeConfig;
use super::execute::{self, RunOptions, Summary};
use super::plan::{self, Plan};
use super::select::{self, Alpha, SelectOptions, SelectionReport};
use super::{lora, output, vocab};
use crate::checkpoint::{Checkpoint, WriterOptions};
use crate::error::{Arg, Error, Result};
use crate::exec::Executor;

/// Everything one merge needs.
pub struct Request {
    pub config: MergeConfig,
    pub run: RunOptions,
    /// SNR top-p selection (`--snr-select`); None merges every tensor the config names.
    pub select: Option<SelectOptions>,
    pub output: PathBuf,
    /// Shard size, metadata and overwrite policy of the output; the models' files are added to `inputs`.
    pub writer: WriterOptions,
    /// Copy the primary model's tokenizer files (and write the chat template) beside the output.
    pub copy_tokenizer: bool,
    /// Plan (and select) only; write nothing.
    pub dry_run: bool,
}

/// What `run` did.
pub enum Outcome {
    /// `dry_run`: the plan and the selection that would have been written.
    Planned {
        plan: Plan,
        selection: Option<SelectionReport>,
    },
    Written(Summary),
}

impl Request {
    /// The checks that need no model: options the method cannot honour.
    pub fn validate(&self) -> Result<()> {
        self.run.check(self.config.method)?;
        if let Some(s) = &self.select {
            if s.alpha == Alpha::Snr && self.config.method.snr_alpha().is_none() {
                return Err(Error::usage(format!(
                    "{} snr does not apply to {}",
                    Arg::Alpha,
                    self.config.method.name()
                )));
            }
        }
        Ok(())
    }
}

/// Carries out one merge (see the module header).
pub fn run(request: &Request, exec: &Executor) -> Result<Outcome> {
    request.validate()?;
    let started = Instant::now();
    let mut cfg = request.config.clone();
    cfg.copy_mismatched = request.select.is_some();
    let out = &request.output;
    // Models with a LoRA adapter read their adapted weights with it applied (`lora::open`), so every method, the SNR
    // selection and every copy see the adapted model. A built vocabulary remaps embedding rows before the plan: the
    // remapped tensors are checkpoints appended to `models`, read in place of the originals.
    let mut models: Vec<Checkpoint> = cfg.model_paths().iter().map(|p| lora::open(p)).collect::<Result<_>>()?;
    let paths = cfg.model_paths();
    let label = |p: &Path| cfg.label(p);
    let mut remap = (cfg.tokenizer.as_ref())
        .map(|spec| vocab::prepare(spec, &paths, &label, cfg.base_model.as_ref(), cfg.dtype, &models, out))
        .transpose()?;
    let mut substitutes = BTreeMap::new();
    if let Some(r) = remap.as_mut() {
        let first = models.len();
        models.append(&mut r.substitutes.checkpoints);
        for ((m, tensor), &i) in &r.substitutes.map {
            if models[*m].has_update(tensor) {
                return Err(Error::usage(format!(
                    "{}: its LoRA adapter changes '{tensor}', whose rows the tokenizer settings remap; graft does not \
                     do both (bake the adapter in first)",
                    cfg.label(&paths[*m])
                )));
            }
            substitutes.insert((*m, tensor.clone()), first + i);
        }
    }
    let mut plan = plan::build_with(&cfg, &models, &substitutes)?;
    let selection = match &request.select {
        Some(opts) => Some(select::apply(&mut plan, &models, exec, opts)?),
        None => None,
    };
    // Decided (and the tokenizer checked against the planned embeddings) before anything is written.
    let vocabulary = remap.as_ref().map(|r| &r.vocabulary);
    let layout = output::plan(&cfg, &plan, &models, out, request.copy_tokenizer, vocabulary)?;
    if request.dry_run {
        return Ok(Outcome::Planned { plan, selection });
    }
    let mut opts = request.writer.clone();
    opts.inputs.extend(models.iter().flat_map(|m| m.files()));
    opts.metadata.extend(execute::merge_metadata(
        &plan,
        &cfg,
        &request.run,
        selection.as_ref().map(|s| serde_json::to_value(s).expect("a selection report serialises")),
    ));
    let side_files = output::files(&layout)?;
    let written = execute::execute(&plan, &models, exec, out, opts, side_files, &request.run)?;
    let merged = plan.merged_count();
    Ok(Outcome::Written(Summary {
        output: written.path.clone(),
        method: plan.method.name().to_string(),
        models: plan.models.clone(),
        tensors: written.tensors,
        merged,
        copied: written.tensors - merged,
        bytes: written.total_bytes,
        files: written.files.clone(),
        seconds: started.elapsed().as_secs_f64(),
    }))
}
