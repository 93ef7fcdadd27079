//! Merges as typed requests. `Request` is one merge, and `run` carries it out: open the models (with their LoRA
//! adapters), remap vocabulary rows, plan, select by SNR, lay out the output's side files, and stream the plan
//! through the executor to the writer. Everything that can be checked without reading a model is checked first
//! (`Request::validate`), so a bad combination of options fails before any file is opened.
//!
//! `Options` are what every merge of a job shares (`super::job`: one config, a config file's stages, a batch), and
//! `Event` what a job reports while it runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::config::{self, MergeConfig};
use super::execute::{self, RunOptions, Summary};
use super::plan::{self, Plan};
use super::select::{self, Alpha, SelectOptions, SelectionReport, SnrSource};
use super::{chat_template, lora, output, vocab};
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

/// Where the tensors that are not merged come from, overriding a config file's choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reference {
    /// The base model.
    Base,
    /// The first model.
    First,
}

/// The options of every merge of a job: each config of a batch and each stage of a multi-document config gets the
/// same ones.
#[derive(Clone, Debug)]
pub struct Options {
    pub run: RunOptions,
    pub select: Option<SelectOptions>,
    /// Shard size, metadata and overwrite policy of every output.
    pub writer: WriterOptions,
    pub copy_tokenizer: bool,
    /// Plan only; write nothing.
    pub dry_run: bool,
    /// The chat template written with the tokenizer, as mergekit spells it (`auto`, a name, or Jinja text),
    /// overriding a config's `chat_template`.
    pub chat_template: Option<String>,
    /// Run the TIES paper's variant of the configured method (`ties` becomes `ties_paper`).
    pub ties_paper: bool,
    /// Config files: keys mergekit would ignore are warnings, not errors.
    pub lenient: bool,
    /// Config files: where unmerged tensors come from, overriding the file (a config built by the caller already
    /// says it).
    pub reference: Option<Reference>,
}

/// The command's defaults: a plain merge that copies the tokenizer, as `graft merge` without options.
impl Default for Options {
    fn default() -> Self {
        Options {
            run: RunOptions::default(),
            select: None,
            writer: WriterOptions::default(),
            copy_tokenizer: true,
            dry_run: false,
            chat_template: None,
            ties_paper: false,
            lenient: false,
            reference: None,
        }
    }
}

/// One stage of a multi-document config as a dry run lists it.
#[derive(Clone, Debug)]
pub struct PlannedStage {
    /// How messages name the stage (`stage 'NAME' (document K)`).
    pub label: String,
    pub output: PathBuf,
    /// The stems of the stages it reads.
    pub reads: Vec<String>,
}

/// What a job reports while it runs.
#[derive(Debug)]
pub enum Event {
    /// A line for the user (a config's warnings, a skipped stage or config).
    Note(String),
    /// One merge done (or planned, on a dry run).
    Merged(Outcome),
    /// A dry run of a multi-document config: its stages in the order they would run.
    Stages(Vec<PlannedStage>),
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Planned { plan, .. } => write!(f, "Planned({} tensors)", plan.tensors.len()),
            Outcome::Written(s) => write!(f, "Written({})", s.output.display()),
        }
    }
}

impl Options {
    /// The checks that need no file.
    pub fn validate(&self) -> Result<()> {
        self.chat_template().map(|_| ())
    }

    fn chat_template(&self) -> Result<Option<chat_template::ChatTemplate>> {
        (self.chat_template.as_deref())
            .map(|t| {
                // The parser names the config key; an option is named as the front end shows it.
                chat_template::parse(t).map_err(|e| {
                    let why = e.strip_prefix("chat_template ").unwrap_or(&e);
                    Error::usage(format!("{} {why}", Arg::ChatTemplate))
                })
            })
            .transpose()
    }

    /// The options as a multi-document stage's stamp records them: those that change what a merge writes.
    pub fn stamp(&self) -> String {
        let select = self.select.as_ref();
        format!(
            "seed={} compat={} ties_variant={} reference={:?} snr_select={:?} snr_from={} alpha={:?} \
             no_copy_tokenizer={} chat_template={:?} lenient={} allow_nonfinite={} max_shard_size={}",
            self.run.seed,
            if self.run.compat { "Some(Mergekit)" } else { "None" },
            if self.ties_paper { "Paper" } else { "Mergekit" },
            self.reference,
            select.map(|s| format!("top-p={}", s.top_p)),
            select.map_or(SnrSource::Base, |s| s.from.clone()),
            select.map_or(Alpha::Fixed, |s| s.alpha),
            !self.copy_tokenizer,
            self.chat_template,
            self.lenient,
            crate::checkpoint::guard::allow_nonfinite(),
            self.writer.max_shard_size
        )
    }

    /// `cfg` with the options a config cannot set itself applied: the chat template and the TIES variant.
    pub fn apply(&self, mut cfg: MergeConfig) -> Result<MergeConfig> {
        if let Some(t) = self.chat_template()? {
            cfg.chat_template = Some(t);
        }
        if self.ties_paper {
            cfg.method = super::variant(cfg.method, "paper")
                .ok_or_else(|| Error::usage(format!("{} applies to {} ties only", Arg::TiesVariant, Arg::Method)))?;
        }
        Ok(cfg)
    }

    /// The merge config of a single-document config file, its warnings reported as notes.
    pub(super) fn load(&self, file: &Path, report: &mut dyn FnMut(Event) -> Result<()>) -> Result<MergeConfig> {
        let loaded = config::load(file, self.lenient)?;
        for w in loaded.warnings {
            report(Event::Note(w))?;
        }
        let mut cfg = loaded.config;
        if let Some(r) = self.reference {
            cfg.reference = match r {
                Reference::Base => cfg.base_model.clone(),
                Reference::First => cfg.model_paths().first().cloned(),
            };
        }
        self.apply(cfg)
    }

    /// The one-merge request of `config` into `output`.
    pub(super) fn request(&self, config: MergeConfig, output: PathBuf) -> Request {
        Request {
            config,
            run: self.run.clone(),
            select: self.select.clone(),
            output,
            writer: self.writer.clone(),
            copy_tokenizer: self.copy_tokenizer,
            dry_run: self.dry_run,
        }
    }

    /// Carries out one merge of `config` into `output`.
    pub(super) fn merge(
        &self,
        config: MergeConfig,
        output: PathBuf,
        exec: &Executor,
        report: &mut dyn FnMut(Event) -> Result<()>,
    ) -> Result<()> {
        let request = self.request(config, output);
        request.validate()?;
        report(Event::Merged(run(&request, exec)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_spell_the_options_as_earlier_versions_wrote_them() {
        // Stage stamps written before the options were typed must still match, or every stage would re-run.
        let o = Options {
            run: RunOptions { seed: 7, compat: true },
            select: Some(SelectOptions { top_p: 0.5, from: SnrSource::Avg, alpha: Alpha::Snr }),
            writer: WriterOptions { max_shard_size: 1000, ..WriterOptions::default() },
            copy_tokenizer: false,
            chat_template: Some("chatml".into()),
            ties_paper: true,
            lenient: true,
            reference: Some(Reference::First),
            ..Options::default()
        };
        assert_eq!(
            o.stamp(),
            "seed=7 compat=Some(Mergekit) ties_variant=Paper reference=Some(First) snr_select=Some(\"top-p=0.5\") \
             snr_from=avg alpha=Snr no_copy_tokenizer=true chat_template=Some(\"chatml\") lenient=true \
             allow_nonfinite=false max_shard_size=1000"
        );
        let plain = Options {
            writer: WriterOptions { max_shard_size: 5_000_000_000, ..WriterOptions::default() },
            ..Options::default()
        };
        assert_eq!(
            plain.stamp(),
            "seed=0 compat=None ties_variant=Mergekit reference=None snr_select=None snr_from=base alpha=Fixed \
             no_copy_tokenizer=false chat_template=None lenient=false allow_nonfinite=false max_shard_size=5000000000"
        );
    }
}
