//! The files that go next to a merge's tensors, as mergekit lays them out, so the output loads with transformers'
//! `AutoModelForCausalLM`/`AutoTokenizer` from its directory:
//!
//! - `config.json` and `generation_config.json` from the primary model (the base, else the first model; for a
//!   selective merge the reference, whose tensors fill everything not merged), with `config.json`'s `dtype`
//!   (and `torch_dtype` where present), layer count and `vocab_size` set to what was written;
//! - tokenizer files and chat templates from the primary model, unless `--no-copy-tokenizer`. With a built
//!   vocabulary (`super::vocab`: `tokenizer_source: base | union | <model>`, the `tokenizer:` block, whose rows are
//!   remapped before the plan) the files come from its source model instead; when tokens were added to it,
//!   `tokenizer.json` is the built one and `tokenizer_config.json`'s `added_tokens_decoder` lists its added tokens;
//! - the config's `chat_template` (`super::chat_template` chooses it) as `chat_template.jinja`, replacing the
//!   tokenizer's own (also one kept in `chat_template.json` or `tokenizer_config.json`).
//!
//! `plan` decides and checks before any tensor is written; `files` reads and patches the side files, which the
//! writer then commits in the same step as the tensors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::chat_template;
use super::config::MergeConfig;
use super::plan::Plan;
use super::vocab::{self, Vocabulary};
use crate::checkpoint::hf_config::{self, Patch};
use crate::checkpoint::{Checkpoint, Dtype, CARRIED_FILES};
use crate::error::{Arg, Error, Result};

/// Tokenizer files and chat templates, copied from the tokenizer's model when present: the files the writer carries
/// (`CARRIED_FILES`) other than the model's own configs.
fn tokenizer_files() -> impl Iterator<Item = &'static str> {
    CARRIED_FILES
        .iter()
        .copied()
        .filter(|f| !matches!(*f, "config.json" | GENERATION_CONFIG | "preprocessor_config.json"))
}

/// Copied with `config.json` from the primary model (mergekit copies it whatever the tokenizer source).
pub const GENERATION_CONFIG: &str = "generation_config.json";

/// Input-embedding tensor names (suffixes) of common architectures, tried before the output head's.
const EMBEDDING_SUFFIXES: &[&str] = super::vocab::VOCAB_TENSOR_SUFFIXES;

/// What `write` will do.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    /// `config.json` and `generation_config.json` come from here.
    pub config_dir: Option<PathBuf>,
    /// Tokenizer files come from here; None with `--no-copy-tokenizer`.
    pub tokenizer_dir: Option<PathBuf>,
    /// How `config.json` is brought in line with the written tensors.
    pub patch: Patch,
    /// The config's `chat_template`, resolved: written as `chat_template.jinja` in place of the tokenizer's own.
    pub chat_template: Option<String>,
    /// A built vocabulary: its `tokenizer.json` replaces the copied one.
    pub vocabulary: Option<Vocabulary>,
}

/// The dtype most float parameters are written in (by element count; ties go to the wider dtype, so a half/full
/// split never claims less precision than was written). None when no float tensor is written.
pub fn majority_dtype(plan: &Plan) -> Option<Dtype> {
    let mut count: BTreeMap<(usize, &'static str), (u64, Dtype)> = BTreeMap::new();
    for t in plan.tensors.iter().filter(|t| t.dtype.is_float()) {
        let n: u64 = t.shape.iter().map(|&d| d as u64).product();
        count.entry((t.dtype.size(), t.dtype.name())).or_insert((0, t.dtype)).0 += n;
    }
    count.iter().max_by_key(|(k, (n, _))| (*n, k.0)).map(|(_, (_, d))| *d)
}

/// The written vocabulary: rows of the input embedding (else the output head), with the tensor's name.
pub fn written_vocab(plan: &Plan) -> Option<(usize, &str)> {
    EMBEDDING_SUFFIXES.iter().find_map(|suffix| {
        plan.tensors
            .iter()
            .find(|t| t.name.ends_with(suffix) && t.shape.len() == 2)
            .map(|t| (t.shape[0], t.name.as_str()))
    })
}

/// Decides where the output's config and tokenizer come from.
/// `copy_tokenizer` is false with `--no-copy-tokenizer`. A single-file output (`.safetensors`) gets no side files.
/// `vocabulary` is the one `super::vocab::prepare` built, if any.
pub fn plan(
    cfg: &MergeConfig,
    plan: &Plan,
    models: &[Checkpoint],
    out: &Path,
    copy_tokenizer: bool,
    vocabulary: Option<&Vocabulary>,
) -> Result<Layout> {
    let patch = Patch {
        dtype: majority_dtype(plan),
        layers: plan.new_layer_count,
        vocab_size: written_vocab(plan).map(|(n, _)| n),
    };
    if out.extension().is_some_and(|e| e == "safetensors") {
        if cfg.chat_template.is_some() {
            return Err(Error::usage(format!(
                "chat_template: {} is a single file; a chat template is written next to the tokenizer in an output \
                 directory",
                out.display()
            )));
        }
        return Ok(Layout { config_dir: None, tokenizer_dir: None, patch, chat_template: None, vocabulary: None });
    }
    let dir_of = |i: usize| models[i].dir().map(Path::to_path_buf);
    // A selective merge keeps the reference's tensors wherever it merges nothing (its head among them), so its
    // config describes the output; otherwise the base (else the first model) does.
    let primary = if cfg.copy_mismatched { plan.reference } else { plan.base.unwrap_or(plan.reference) };
    let config_dir = dir_of(primary);
    let vocabulary = vocabulary.filter(|_| copy_tokenizer).cloned();
    let tokenizer_dir = match (&vocabulary, copy_tokenizer) {
        (_, false) => None,
        (Some(v), true) => Some(v.files_from.clone()),
        (None, true) => config_dir.clone(),
    };
    let chat_template = match &cfg.chat_template {
        None => None,
        Some(_) if tokenizer_dir.is_none() => {
            return Err(Error::usage(format!(
                "chat_template is written with the tokenizer, which {} leaves out (drop one of them)",
                Arg::NoCopyTokenizer
            )))
        }
        Some(setting) => {
            // mergekit's `auto` looks at the base first, then the other inputs.
            let dirs: Vec<PathBuf> = plan.base.into_iter().chain(0..models.len()).filter_map(dir_of).collect();
            chat_template::choose(setting, &dirs)?
        }
    };
    Ok(Layout { config_dir, tokenizer_dir, patch, chat_template, vocabulary })
}

/// The side files (name in the output directory, contents), read and patched now so the writer commits them with
/// the tensors in one step.
pub fn files(layout: &Layout) -> Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    if let Some(src) = &layout.config_dir {
        if let Some(text) = hf_config::patched_text(&src.join("config.json"), &layout.patch)? {
            files.push(("config.json".to_string(), text.into_bytes()));
        }
        read_into(src, GENERATION_CONFIG, &mut files)?;
    }
    if let Some(src) = &layout.tokenizer_dir {
        for f in tokenizer_files() {
            read_into(src, f, &mut files)?;
        }
        if let Some((v, json)) = layout.vocabulary.as_ref().and_then(|v| v.tokenizer_json.as_ref().map(|j| (v, j))) {
            files.retain(|(name, _)| name != "tokenizer.json");
            files.push(("tokenizer.json".to_string(), json.clone().into_bytes()));
            if let Some((name, bytes)) = files.iter_mut().find(|(name, _)| name == "tokenizer_config.json") {
                *bytes = vocab::patch_tokenizer_config(&src.join(name.as_str()), bytes, &v.added)?;
            }
        }
    }
    if let Some(template) = &layout.chat_template {
        // The chosen template replaces every place the tokenizer kept its own, so transformers finds only it.
        files.retain(|(name, _)| name != chat_template::TEMPLATE_FILE && name != chat_template::LEGACY_TEMPLATE_FILE);
        if let Some((name, bytes)) = files.iter_mut().find(|(name, _)| name == "tokenizer_config.json") {
            let path = layout.tokenizer_dir.as_deref().unwrap_or(Path::new("")).join(name.as_str());
            let mut config: serde_json::Value =
                serde_json::from_slice(bytes).map_err(|e| Error::format(&path, format!("not valid JSON: {e}")))?;
            if let Some(object) = config.as_object_mut() {
                if object.remove("chat_template").is_some() {
                    *bytes = serde_json::to_vec_pretty(&config).expect("JSON values serialise");
                }
            }
        }
        files.push((chat_template::TEMPLATE_FILE.to_string(), template.clone().into_bytes()));
    }
    Ok(files)
}

fn read_into(dir: &Path, name: &str, files: &mut Vec<(String, Vec<u8>)>) -> Result<()> {
    let from = dir.join(name);
    if !from.is_file() {
        return Ok(());
    }
    let bytes = std::fs::read(&from).map_err(|e| Error::io(&from, e))?;
    files.push((name.to_string(), bytes));
    Ok(())
}
