//! What to merge, from a mergekit YAML file or from command-line flags.
//!
//! The YAML schema is mergekit's for the methods graft has: `merge_method`, `base_model`, `models` (each `model` and
//! optional `parameters`) or `slices` (each `sources` of `model` + `layer_range` + optional `parameters`, optional
//! `base_model` and `parameters`) or `modules` with a single module (its `models` or `slices`, and `parameters` between
//! the slice's and the top level's), top-level `parameters` (scalars, gradients, filter lists), `dtype`, `out_dtype`,
//! `tokenizer_source: base | union | <model>` (read as the `tokenizer:` block's `source`, as mergekit reads it) and the
//! `tokenizer:` block (`source`, `tokens`, `pad_to_multiple_of`; built by `super::vocab`), `chat_template`
//! (`super::chat_template`). mergekit keys graft does not implement (several `modules`, `residual_weight`) and unknown
//! methods are errors that name the key. Unknown keys and unknown parameter names (mergekit silently drops them; they
//! are often typos), and per-model weights given for the base of a base-relative method (mergekit never reads them),
//! are errors too, or with `lenient` one warning each. Model references are local paths (relative to the working
//! directory, then to the config file's directory) or Hugging Face ids found in the local cache (`crate::hub`), each
//! with an optional `+adapter` (a PEFT LoRA directory, `super::lora`).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use yaml_serde::{Mapping, Value as Yaml};

use super::chat_template::ChatTemplate;
use super::method::{BaseRole, MergeMethod};
use super::params::{Conditional, Scalar, Scope, Setting, Settings, Value};
use super::vocab::{EmbedSource, TokenRef, TokenSetting, TokenizerSpec, VocabSource};
use crate::checkpoint::Dtype;
use crate::error::{Arg, Error, Result};
use crate::hub::CacheEnv;

#[derive(Clone, Debug, PartialEq)]
pub struct ModelEntry {
    pub model: PathBuf,
    pub parameters: Settings,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SliceSource {
    pub model: PathBuf,
    pub layer_range: (usize, usize),
    pub parameters: Settings,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SliceDef {
    pub sources: Vec<SliceSource>,
    pub base_model: Option<PathBuf>,
    pub parameters: Settings,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Inputs {
    Models(Vec<ModelEntry>),
    Slices(Vec<SliceDef>),
}

/// One merge, however it was described.
#[derive(Clone, Debug, PartialEq)]
pub struct MergeConfig {
    /// The method, looked up in the registry once, when the config is read.
    pub method: &'static dyn MergeMethod,
    pub base_model: Option<PathBuf>,
    pub inputs: Inputs,
    pub parameters: Settings,
    /// mergekit's working dtype: graft computes in f32 regardless (except in mergekit mode), but it is the output dtype
    /// when `out_dtype` is absent.
    pub dtype: Option<Dtype>,
    pub out_dtype: Option<Dtype>,
    /// A vocabulary to build (`tokenizer:` block, or `tokenizer_source`, which mergekit reads as the block's
    /// `source`). None: the primary model's tokenizer files are copied and no rows move.
    pub tokenizer: Option<TokenizerSpec>,
    /// The chat template written with the tokenizer (None: the tokenizer's own, as copied).
    pub chat_template: Option<ChatTemplate>,
    /// The model that tensors left unmerged are copied from (graft's addition; default: the base, else the first model).
    pub reference: Option<PathBuf>,
    /// Plan tensors whose shapes differ between the inputs (task-specific heads of experts) as copies from the
    /// reference instead of refusing the merge. Only selective merges set it: they merge a subset by design.
    pub copy_mismatched: bool,
    /// The reference as written for each model path that resolution changed (a Hugging Face id resolved to its
    /// cached snapshot, a relative path joined to the config's directory), so that errors name what the user wrote.
    pub labels: BTreeMap<PathBuf, String>,
}

impl MergeConfig {
    /// How errors name model `path`: the reference as written where it was resolved to another path, with the
    /// resolved path after it when the two differ in more than a directory prefix.
    pub fn label(&self, path: &Path) -> String {
        match self.labels.get(path) {
            Some(written) if !path.ends_with(written) => format!("{written} ({})", path.display()),
            _ => path.display().to_string(),
        }
    }

    /// Every model path the merge reads, in first-mention order (models or slice sources, then the base and reference).
    pub fn model_paths(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = Vec::new();
        let mut add = |p: &PathBuf| {
            if !v.contains(p) {
                v.push(p.clone());
            }
        };
        match &self.inputs {
            Inputs::Models(ms) => ms.iter().for_each(|m| add(&m.model)),
            Inputs::Slices(ss) => ss.iter().flat_map(|s| s.sources.iter()).for_each(|s| add(&s.model)),
        }
        if let Inputs::Slices(ss) = &self.inputs {
            ss.iter().filter_map(|s| s.base_model.as_ref()).for_each(&mut add);
        }
        if let Some(b) = &self.base_model {
            add(b);
        }
        if let Some(r) = &self.reference {
            add(r);
        }
        v
    }
}

/// A parsed config and the warnings `lenient` parsing turned errors into (one line each, `warning: FILE: ...`).
#[derive(Clone, Debug)]
pub struct Loaded {
    pub config: MergeConfig,
    pub warnings: Vec<String>,
}

/// Reads and parses a mergekit YAML config file, resolving every model reference (local path or cached Hugging Face
/// id, see `crate::hub`). With `lenient`, keys mergekit would ignore are warnings instead of errors.
pub fn load(path: &Path, lenient: bool) -> Result<Loaded> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let p = Parser {
        file: path,
        dir: &dir,
        lenient,
        env: Some(CacheEnv::from_env()),
        warnings: RefCell::default(),
        labels: RefCell::default(),
    };
    let config = p.config(&text)?;
    Ok(Loaded { config, warnings: p.warnings.into_inner() })
}

/// Parses YAML `text` strictly, without looking model references up (`file` names it in errors; relative model
/// paths may resolve against `dir`).
pub fn parse(text: &str, file: &Path, dir: &Path) -> Result<MergeConfig> {
    Parser { file, dir, lenient: false, env: None, warnings: RefCell::default(), labels: RefCell::default() }
        .config(text)
}

impl Parser<'_> {
    fn config(&self, text: &str) -> Result<MergeConfig> {
        let p = self;
        let doc: Yaml = yaml_serde::from_str(text).map_err(|e| p.err(format!("not valid YAML: {e}")))?;
        let top = p.mapping(&doc, "the config")?;
        p.check_keys(
            top,
            "the config",
            &[
                "merge_method",
                "base_model",
                "models",
                "slices",
                "modules",
                "parameters",
                "dtype",
                "out_dtype",
                "tokenizer_source",
                "tokenizer",
                "chat_template",
            ],
            &[],
        )?;
        let method = match top.get("merge_method") {
            Some(Yaml::String(s)) => super::method(s).map_err(|e| p.err(e.to_string()))?,
            Some(_) => return Err(p.err("'merge_method' must be a string")),
            None => return Err(p.err("'merge_method' is missing")),
        };
        let base_model = top.get("base_model").map(|v| p.model(v, "base_model")).transpose()?;
        let mut parameters = p.settings(top.get("parameters"), "parameters")?;
        let given: Vec<&str> = ["models", "slices", "modules"].into_iter().filter(|k| top.contains_key(*k)).collect();
        if given.len() != 1 {
            return Err(p.err(format!(
                "give exactly one of 'models', 'slices' or 'modules' (found {})",
                if given.is_empty() { "none".to_string() } else { given.join(" and ") }
            )));
        }
        let inputs = match given[0] {
            "models" => Inputs::Models(p.models(&top["models"], "models")?),
            "slices" => Inputs::Slices(p.slices(&top["slices"], "slices")?),
            _ => {
                let (inputs, module_parameters) = p.single_module(&top["modules"])?;
                // mergekit reads a module's parameters before the top level's.
                parameters.extend(module_parameters);
                inputs
            }
        };
        let dtype = p.dtype(top.get("dtype"), "dtype")?;
        let out_dtype = p.dtype(top.get("out_dtype"), "out_dtype")?;
        // mergekit builds the vocabulary of the legacy `tokenizer_source: X` exactly as `tokenizer: {source: X}`.
        let legacy = |source| TokenizerSpec { source, tokens: Vec::new(), pad_to_multiple_of: None };
        let mut tokenizer = match top.get("tokenizer_source") {
            None | Some(Yaml::Null) => None,
            Some(Yaml::String(s)) if s == "base" => Some(legacy(VocabSource::Base)),
            Some(Yaml::String(s)) if s == "union" => Some(legacy(VocabSource::Union)),
            Some(v) => Some(legacy(VocabSource::Model(p.model(v, "tokenizer_source")?))),
        };
        if let Some(block) = top.get("tokenizer").filter(|v| !v.is_null()) {
            if tokenizer.is_some() {
                return Err(p.err("give 'tokenizer' or 'tokenizer_source', not both (mergekit uses only 'tokenizer')"));
            }
            tokenizer = Some(p.tokenizer(block)?);
        }
        let chat_template = match top.get("chat_template") {
            None | Some(Yaml::Null) => None,
            Some(Yaml::String(s)) => Some(super::chat_template::parse(s).map_err(|e| p.err(e))?),
            Some(_) => return Err(p.err("'chat_template' must be a string")),
        };
        let mut cfg = MergeConfig {
            method,
            base_model,
            inputs,
            parameters,
            dtype,
            out_dtype,
            tokenizer,
            chat_template,
            reference: None,
            copy_mismatched: false,
            labels: p.labels.take(),
        };
        p.ignored_parameters(&mut cfg)?;
        Ok(cfg)
    }

    /// Parameters mergekit reads past without a word: names the method does not have (often typos, such as
    /// `nomalize`), and per-model weights given for the base of a base-relative method. Errors naming the parameter
    /// and where it is; with `lenient`, one warning each and the parameter dropped.
    fn ignored_parameters(&self, cfg: &mut MergeConfig) -> Result<()> {
        let method = cfg.method;
        let defs = method.params();
        let accepted = defs.iter().map(|d| d.name).collect::<Vec<_>>().join(", ");
        let takes_base = method.base_role().takes_base();
        let base = cfg.base_model.clone();
        let mut places: Vec<(String, &mut Settings, bool)> = vec![("parameters".into(), &mut cfg.parameters, false)];
        match &mut cfg.inputs {
            Inputs::Models(ms) => {
                for (i, m) in ms.iter_mut().enumerate() {
                    let is_base = takes_base && base.as_ref() == Some(&m.model);
                    places.push((format!("models[{i}].parameters"), &mut m.parameters, is_base));
                }
            }
            Inputs::Slices(ss) => {
                for (i, s) in ss.iter_mut().enumerate() {
                    places.push((format!("slices[{i}].parameters"), &mut s.parameters, false));
                    for (j, src) in s.sources.iter_mut().enumerate() {
                        places.push((format!("slices[{i}].sources[{j}].parameters"), &mut src.parameters, false));
                    }
                }
            }
        }
        for (what, settings, is_base) in places {
            let names: Vec<String> = settings.keys().cloned().collect();
            for name in names {
                let msg = match defs.iter().find(|d| d.name == name) {
                    None => {
                        format!("unknown parameter '{name}' for {} in {what} (accepted: {accepted})", method.name())
                    }
                    Some(d) if is_base && d.scope == Scope::NonBase => format!(
                        "parameter '{name}' in {what} is given for the base model, which {} does not weight",
                        method.name()
                    ),
                    Some(_) => continue,
                };
                if !self.lenient {
                    return Err(self
                        .err(format!("{msg}; mergekit would ignore it silently ({}: warn and go on)", Arg::Lenient)));
                }
                self.warnings.borrow_mut().push(format!("warning: {}: {msg}; ignored", self.file.display()));
                settings.remove(&name);
            }
        }
        Ok(())
    }
}

struct Parser<'a> {
    file: &'a Path,
    dir: &'a Path,
    /// Unknown keys become warnings instead of errors.
    lenient: bool,
    /// Where Hugging Face ids are looked up; None: model references are kept as written (unit tests).
    env: Option<CacheEnv>,
    warnings: RefCell<Vec<String>>,
    /// Resolved model path -> the reference as written (`MergeConfig::labels`).
    labels: RefCell<BTreeMap<PathBuf, String>>,
}

impl Parser<'_> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::usage(format!("{}: {}", self.file.display(), msg.into()))
    }

    fn mapping<'v>(&self, v: &'v Yaml, what: &str) -> Result<&'v Mapping> {
        match v {
            Yaml::Mapping(m) => Ok(m),
            _ => Err(self.err(format!("{what} must be a mapping"))),
        }
    }

    fn nonempty_sequence<'v>(&self, v: &'v Yaml, what: &str) -> Result<&'v [Yaml]> {
        let list = self.sequence(v, what)?;
        if list.is_empty() {
            return Err(self.err(format!("'{what}' is empty")));
        }
        Ok(list)
    }

    fn sequence<'v>(&self, v: &'v Yaml, what: &str) -> Result<&'v [Yaml]> {
        match v {
            Yaml::Sequence(s) => Ok(s),
            _ => Err(self.err(format!("'{what}' must be a list"))),
        }
    }

    fn check_keys(&self, m: &Mapping, what: &str, allowed: &[&str], unsupported: &[(&str, &str)]) -> Result<()> {
        for k in m.keys() {
            let Yaml::String(k) = k else {
                return Err(self.err(format!("{what} has a key that is not a string: {k:?}")));
            };
            if allowed.contains(&k.as_str()) {
                continue;
            }
            if let Some((_, feature)) = unsupported.iter().find(|(u, _)| u == k) {
                return Err(self.err(format!("'{k}' in {what}: {feature} are not supported by graft")));
            }
            let msg = format!("unknown key '{k}' in {what} (allowed: {})", allowed.join(", "));
            if !self.lenient {
                return Err(
                    self.err(format!("{msg}; mergekit would ignore it silently ({}: warn and go on)", Arg::Lenient))
                );
            }
            self.warnings.borrow_mut().push(format!("warning: {}: {msg}; ignored", self.file.display()));
        }
        Ok(())
    }

    /// `modules:` with exactly one module: its inputs and parameters. Several modules stay an error.
    fn single_module(&self, v: &Yaml) -> Result<(Inputs, Settings)> {
        let modules = self.mapping(v, "'modules'")?;
        if modules.len() != 1 {
            let names: Vec<String> = modules.keys().map(|k| k.as_str().unwrap_or("?").to_string()).collect();
            return Err(self.err(format!(
                "'modules' has {} modules ({}): multi-module merges are not supported by graft (one module is)",
                modules.len(),
                names.join(", ")
            )));
        }
        let (name, module) = modules.iter().next().expect("one module");
        let what = format!("modules.{}", name.as_str().unwrap_or("?"));
        let m = self.mapping(module, &what)?;
        self.check_keys(m, &what, &["models", "slices", "parameters"], &[])?;
        let inputs = match (m.get("models"), m.get("slices")) {
            (Some(x), None) => Inputs::Models(self.models(x, &format!("{what}.models"))?),
            (None, Some(x)) => Inputs::Slices(self.slices(x, &format!("{what}.slices"))?),
            _ => return Err(self.err(format!("{what}: give either 'models' or 'slices'"))),
        };
        Ok((inputs, self.settings(m.get("parameters"), &format!("{what}.parameters"))?))
    }

    /// The `tokenizer:` block (mergekit's defaults: `source: union`, no tokens, no padding).
    fn tokenizer(&self, v: &Yaml) -> Result<TokenizerSpec> {
        let m = self.mapping(v, "'tokenizer'")?;
        self.check_keys(m, "tokenizer", &["source", "tokens", "pad_to_multiple_of"], &[])?;
        let source = match m.get("source") {
            None | Some(Yaml::Null) => VocabSource::Union,
            Some(Yaml::String(s)) if s == "union" => VocabSource::Union,
            Some(Yaml::String(s)) if s == "base" => VocabSource::Base,
            Some(v) => VocabSource::Model(self.model(v, "tokenizer.source")?),
        };
        let pad_to_multiple_of = match m.get("pad_to_multiple_of") {
            None | Some(Yaml::Null) => None,
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Some(n as usize),
                _ => return Err(self.err("'tokenizer.pad_to_multiple_of' must be a positive integer")),
            },
        };
        let mut tokens = Vec::new();
        if let Some(t) = m.get("tokens").filter(|t| !t.is_null()) {
            for (k, v) in self.mapping(t, "'tokenizer.tokens'")? {
                let token = match k {
                    Yaml::String(s) => s.clone(),
                    _ => return Err(self.err(format!("tokenizer.tokens: key {k:?} is not a string"))),
                };
                let what = format!("tokenizer.tokens['{token}']");
                let e = self.mapping(v, &what)?;
                self.check_keys(e, &what, &["source", "force"], &[])?;
                let force = match e.get("force") {
                    None | Some(Yaml::Null) => false,
                    Some(Yaml::Bool(b)) => *b,
                    Some(_) => return Err(self.err(format!("{what}.force must be true or false"))),
                };
                let source = match e.get("source") {
                    None | Some(Yaml::Null) => None,
                    Some(s @ Yaml::String(_)) => Some(EmbedSource::Model(self.model(s, &format!("{what}.source"))?)),
                    Some(s) => Some(self.embed_source(s, &format!("{what}.source"))?),
                };
                tokens.push((token, TokenSetting { source, force }));
            }
        }
        Ok(TokenizerSpec { source, tokens, pad_to_multiple_of })
    }

    /// `{kind: zero}` or `{kind: model_token, model, token_id | token}`.
    fn embed_source(&self, v: &Yaml, what: &str) -> Result<EmbedSource> {
        let m = self.mapping(v, what)?;
        match m.get("kind").and_then(|k| k.as_str()) {
            Some("zero") => {
                self.check_keys(m, what, &["kind"], &[])?;
                Ok(EmbedSource::Zero)
            }
            Some("model_token") => {
                self.check_keys(m, what, &["kind", "model", "token_id", "token"], &[])?;
                let model = self.model(m.get("model").unwrap_or(&Yaml::Null), &format!("{what}.model"))?;
                let token = match (m.get("token_id"), m.get("token")) {
                    (Some(id), None) => match id.as_u64() {
                        Some(i) => TokenRef::Id(i as usize),
                        None => return Err(self.err(format!("{what}.token_id must be a non-negative integer"))),
                    },
                    (None, Some(Yaml::String(t))) => TokenRef::Text(t.clone()),
                    _ => return Err(self.err(format!("{what}: give one of 'token_id' or 'token' (a string)"))),
                };
                Ok(EmbedSource::ModelToken { model, token })
            }
            _ => Err(self.err(format!("{what}: a model, or a mapping with kind: zero | model_token"))),
        }
    }

    fn model(&self, v: &Yaml, what: &str) -> Result<PathBuf> {
        let Yaml::String(s) = v else {
            return Err(self.err(format!("'{what}' must be a model path")));
        };
        if let Some(env) = &self.env {
            let resolved = super::lora::resolve(s, Some(self.dir), env, &format!("{}: {what}", self.file.display()))?;
            if resolved != Path::new(s) {
                self.labels.borrow_mut().insert(resolved.clone(), s.clone());
            }
            return Ok(resolved);
        }
        let p = PathBuf::from(s);
        if p.exists() || p.is_absolute() {
            return Ok(p);
        }
        let rel = self.dir.join(&p);
        Ok(if rel.exists() { rel } else { p })
    }

    fn models(&self, v: &Yaml, at: &str) -> Result<Vec<ModelEntry>> {
        let list = self.nonempty_sequence(v, at)?;
        list.iter()
            .enumerate()
            .map(|(i, e)| {
                let what = format!("{at}[{i}]");
                let m = self.mapping(e, &what)?;
                self.check_keys(m, &what, &["model", "parameters"], &[])?;
                let model = m.get("model").ok_or_else(|| self.err(format!("{what} has no 'model'")))?;
                Ok(ModelEntry {
                    model: self.model(model, &format!("{what}.model"))?,
                    parameters: self.settings(m.get("parameters"), &format!("{what}.parameters"))?,
                })
            })
            .collect()
    }

    fn slices(&self, v: &Yaml, at: &str) -> Result<Vec<SliceDef>> {
        let list = self.nonempty_sequence(v, at)?;
        list.iter()
            .enumerate()
            .map(|(i, e)| {
                let what = format!("{at}[{i}]");
                let m = self.mapping(e, &what)?;
                self.check_keys(
                    m,
                    &what,
                    &["sources", "base_model", "parameters"],
                    &[("residual_weight", "residual weights")],
                )?;
                let sources = self.sequence(
                    m.get("sources").ok_or_else(|| self.err(format!("{what} has no 'sources'")))?,
                    &format!("{what}.sources"),
                )?;
                if sources.is_empty() {
                    return Err(self.err(format!("{what}.sources is empty")));
                }
                let sources = sources
                    .iter()
                    .enumerate()
                    .map(|(j, s)| {
                        let what = format!("{what}.sources[{j}]");
                        let sm = self.mapping(s, &what)?;
                        self.check_keys(sm, &what, &["model", "layer_range", "parameters"], &[])?;
                        let model = sm.get("model").ok_or_else(|| self.err(format!("{what} has no 'model'")))?;
                        let range =
                            sm.get("layer_range").ok_or_else(|| self.err(format!("{what} has no 'layer_range'")))?;
                        Ok(SliceSource {
                            model: self.model(model, &format!("{what}.model"))?,
                            layer_range: self.layer_range(range, &what)?,
                            parameters: self.settings(sm.get("parameters"), &format!("{what}.parameters"))?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(SliceDef {
                    sources,
                    base_model: m
                        .get("base_model")
                        .map(|b| self.model(b, &format!("{what}.base_model")))
                        .transpose()?,
                    parameters: self.settings(m.get("parameters"), &format!("{what}.parameters"))?,
                })
            })
            .collect()
    }

    fn layer_range(&self, v: &Yaml, what: &str) -> Result<(usize, usize)> {
        let bad = || self.err(format!("{what}.layer_range must be [start, end] with 0 <= start < end"));
        let s = self.sequence(v, &format!("{what}.layer_range"))?;
        if s.len() != 2 {
            return Err(bad());
        }
        let n = |x: &Yaml| x.as_u64().map(|v| v as usize).ok_or_else(bad);
        let (a, b) = (n(&s[0])?, n(&s[1])?);
        if a >= b {
            return Err(bad());
        }
        Ok((a, b))
    }

    fn dtype(&self, v: Option<&Yaml>, what: &str) -> Result<Option<Dtype>> {
        match v {
            None | Some(Yaml::Null) => Ok(None),
            Some(Yaml::String(s)) => match Dtype::parse_user(s.trim_start_matches("torch.")) {
                Some(d) if d.is_float() => Ok(Some(d)),
                _ => Err(self.err(format!("'{what}: {s}' is not a float dtype (bfloat16, float16, float32, float64)"))),
            },
            Some(_) => Err(self.err(format!("'{what}' must be a dtype name"))),
        }
    }

    fn settings(&self, v: Option<&Yaml>, what: &str) -> Result<Settings> {
        let mut out = Settings::new();
        let Some(v) = v else { return Ok(out) };
        if matches!(v, Yaml::Null) {
            return Ok(out);
        }
        for (k, s) in self.mapping(v, &format!("'{what}'"))? {
            let Yaml::String(name) = k else {
                return Err(self.err(format!("{what} has a key that is not a string")));
            };
            out.insert(name.clone(), self.setting(s, &format!("{what}.{name}"))?);
        }
        Ok(out)
    }

    fn scalar(&self, v: &Yaml, what: &str) -> Result<Option<Scalar>> {
        Ok(match v {
            Yaml::Bool(b) => Some(Scalar::Bool(*b)),
            Yaml::Number(n) => Some(Scalar::Num(n.as_f64().ok_or_else(|| self.err(format!("{what}: bad number")))?)),
            Yaml::String(s) => Some(Scalar::Str(s.clone())),
            _ => None,
        })
    }

    fn value(&self, v: &Yaml, what: &str) -> Result<Value> {
        if let Some(s) = self.scalar(v, what)? {
            return Ok(Value::Scalar(s));
        }
        match v {
            Yaml::Sequence(list) if !list.is_empty() => {
                let items = list.iter().map(|x| self.scalar(x, what)).collect::<Result<Option<Vec<_>>>>()?;
                items
                    .map(Value::Gradient)
                    .ok_or_else(|| self.err(format!("{what}: a gradient must be a list of scalars")))
            }
            _ => Err(self.err(format!("{what}: expected a scalar or a non-empty list of scalars"))),
        }
    }

    fn setting(&self, v: &Yaml, what: &str) -> Result<Setting> {
        match v {
            Yaml::Mapping(m) => Ok(Setting::Filtered(vec![self.conditional(m, what)?])),
            Yaml::Sequence(list) if !list.is_empty() && list.iter().all(|x| matches!(x, Yaml::Mapping(_))) => {
                let conds = list
                    .iter()
                    .enumerate()
                    .map(|(i, x)| self.conditional(self.mapping(x, what)?, &format!("{what}[{i}]")))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Setting::Filtered(conds))
            }
            Yaml::Sequence(list) if list.iter().any(|x| matches!(x, Yaml::Mapping(_))) => {
                Err(self.err(format!("{what}: a list mixes filters ({{filter, value}}) and plain values")))
            }
            _ => Ok(Setting::Value(self.value(v, what)?)),
        }
    }

    fn conditional(&self, m: &Mapping, what: &str) -> Result<Conditional> {
        self.check_keys(m, what, &["filter", "value"], &[])?;
        let filter = match m.get("filter") {
            None | Some(Yaml::Null) => None,
            Some(Yaml::String(s)) => Some(s.clone()),
            Some(_) => return Err(self.err(format!("{what}.filter must be a string"))),
        };
        let value = m.get("value").ok_or_else(|| self.err(format!("{what} has a filter but no 'value'")))?;
        Ok(Conditional { filter, value: self.value(value, &format!("{what}.value"))? })
    }
}

/// A merge described by command-line flags.
#[derive(Clone, Debug)]
pub struct Flags {
    pub method: &'static dyn MergeMethod,
    pub models: Vec<PathBuf>,
    pub base: Option<PathBuf>,
    /// Shared parameters (a list of several values is a layer gradient).
    pub shared: Vec<(String, Setting)>,
    /// Per-model parameters: one value for every model, or one per model (non-base models for base-relative methods).
    pub per_model: Vec<(String, Vec<f64>)>,
    pub dtype: Option<Dtype>,
    pub out_dtype: Option<Dtype>,
    /// Copy unmerged tensors from the first model instead of the base.
    pub reference_first: bool,
}

impl Flags {
    /// A merge with `method` and nothing else set yet.
    pub fn new(method: &'static dyn MergeMethod) -> Flags {
        Flags {
            method,
            models: Vec::new(),
            base: None,
            shared: Vec::new(),
            per_model: Vec::new(),
            dtype: None,
            out_dtype: None,
            reference_first: false,
        }
    }

    pub fn into_config(self) -> Result<MergeConfig> {
        let m = self.method;
        if self.models.is_empty() {
            return Err(Error::usage("give the models to merge (or a YAML config)"));
        }
        let base_relative = m.base_role().takes_base();
        // An interpolation (slerp) runs from its first input, t = 0; a --base is then only the reference for
        // unmerged tensors (SNR-selective merging). Task-vector methods take task vectors against --base.
        let (base_model, reference) = match m.base_role() {
            BaseRole::FirstEndpoint => (Some(self.models[0].clone()), self.base.clone()),
            BaseRole::TaskVectorBase => {
                let b = self.base.clone().ok_or_else(|| {
                    Error::usage(format!(
                        "{} {} needs {} (the model task vectors are taken against)",
                        Arg::Method,
                        m.name(),
                        Arg::Base
                    ))
                })?;
                (Some(b), None)
            }
            BaseRole::OptionalBase => (self.base.clone(), None),
            BaseRole::Ignored => (None, self.base.clone()),
        };
        let reference = if self.reference_first { Some(self.models[0].clone()) } else { reference };
        let weighted: Vec<&PathBuf> =
            self.models.iter().filter(|p| !base_relative || Some(*p) != base_model.as_ref()).collect();
        let mut entries: Vec<ModelEntry> =
            self.models.iter().map(|p| ModelEntry { model: p.clone(), parameters: Settings::new() }).collect();
        for (name, values) in &self.per_model {
            if values.len() != 1 && values.len() != weighted.len() {
                return Err(Error::usage(format!(
                    "--{} has {} values; give one, or one per model ({})",
                    name.replace('_', "-"),
                    values.len(),
                    weighted.len()
                )));
            }
            for (k, p) in weighted.iter().enumerate() {
                let v = if values.len() == 1 { values[0] } else { values[k] };
                let e = entries.iter_mut().find(|e| &&e.model == p).unwrap();
                e.parameters.insert(name.clone(), Setting::num(v));
            }
        }
        Ok(MergeConfig {
            method: self.method,
            base_model,
            inputs: Inputs::Models(entries),
            parameters: self.shared.into_iter().collect(),
            dtype: self.dtype,
            out_dtype: self.out_dtype,
            tokenizer: None,
            chat_template: None,
            reference,
            copy_mismatched: false,
            labels: BTreeMap::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<MergeConfig> {
        parse(s, Path::new("c.yml"), Path::new("."))
    }

    #[test]
    fn parses_mergekit_examples() {
        let c = parse_str(
            r#"
models:
  - model: a
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: b
    parameters:
      density: 0.5
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: base
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"#,
        )
        .unwrap();
        assert_eq!(c.method.name(), "ties");
        assert_eq!(c.base_model, Some(PathBuf::from("base")));
        assert_eq!(c.dtype, Some(Dtype::F16));
        let Inputs::Models(m) = &c.inputs else { panic!() };
        assert_eq!(m.len(), 2);
        assert_eq!(
            m[0].parameters["density"],
            Setting::Value(Value::Gradient(vec![Scalar::Num(1.0), Scalar::Num(0.7), Scalar::Num(0.1)]))
        );
        let Setting::Filtered(f) = &m[1].parameters["weight"] else { panic!() };
        assert_eq!(f[0].filter.as_deref(), Some("mlp"));
        assert_eq!(f[1].filter, None);
        assert_eq!(c.model_paths(), vec![PathBuf::from("a"), PathBuf::from("b"), PathBuf::from("base")]);

        let c = parse_str(
            r#"
slices:
  - sources:
      - model: a
        layer_range: [0, 2]
      - model: b
        layer_range: [0, 2]
merge_method: slerp
base_model: a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - value: 0.5
tokenizer_source: base
"#,
        )
        .unwrap();
        let Inputs::Slices(s) = &c.inputs else { panic!() };
        assert_eq!(s[0].sources[1].layer_range, (0, 2));
        assert_eq!(c.tokenizer.unwrap().source, VocabSource::Base);
    }

    #[test]
    fn parses_the_tokenizer_block() {
        let base = "merge_method: linear\nmodels:\n  - model: a\n  - model: b\n";
        // The legacy key builds the same vocabulary as the block's `source` (mergekit's plan.py).
        for (legacy, source) in
            [("union", VocabSource::Union), ("base", VocabSource::Base), ("b", VocabSource::Model("b".into()))]
        {
            let c = parse_str(&format!("{base}tokenizer_source: {legacy}\n")).unwrap();
            let block = parse_str(&format!("{base}tokenizer: {{source: {legacy}}}\n")).unwrap();
            assert_eq!(c.tokenizer, block.tokenizer, "{legacy}");
            assert_eq!(c.tokenizer.unwrap().source, source, "{legacy}");
        }
        let c = parse_str(&format!(
            "{base}tokenizer:\n  source: base\n  pad_to_multiple_of: 64\n  tokens:\n    <a>: {{source: b, force: true}}\n    \
             <b>:\n      source: {{kind: model_token, model: a, token: x}}\n    <c>: {{source: {{kind: zero}}}}\n    \
             <d>: {{source: {{kind: model_token, model: b, token_id: 7}}}}\n"
        ))
        .unwrap();
        let t = c.tokenizer.unwrap();
        assert_eq!(t.source, VocabSource::Base);
        assert_eq!(t.pad_to_multiple_of, Some(64));
        let want = [
            ("<a>", Some(EmbedSource::Model("b".into())), true),
            ("<b>", Some(EmbedSource::ModelToken { model: "a".into(), token: TokenRef::Text("x".into()) }), false),
            ("<c>", Some(EmbedSource::Zero), false),
            ("<d>", Some(EmbedSource::ModelToken { model: "b".into(), token: TokenRef::Id(7) }), false),
        ];
        assert_eq!(t.tokens.len(), want.len());
        for ((token, setting), (w, source, force)) in t.tokens.iter().zip(want) {
            assert_eq!((token.as_str(), &setting.source, setting.force), (w, &source, force));
        }
        // mergekit's default source is the union.
        assert_eq!(
            parse_str(&format!("{base}tokenizer: {{}}\n")).unwrap().tokenizer.unwrap().source,
            VocabSource::Union
        );
    }

    #[test]
    fn unknown_or_unsupported_is_an_error() {
        let base = "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n";
        assert!(parse_str(base).is_ok());
        let cases = [
            (format!("{base}foo: 1\n"), "unknown key 'foo'"),
            (format!("{base}modules: {{}}\n"), "'modules'"),
            (
                "merge_method: frankenmerge\nmodels: [{model: a}]\n".to_string(),
                "unsupported merge method 'frankenmerge'",
            ),
            (
                "merge_method: linear\nmodels:\n  - model: a\n    weight: 1\n".to_string(),
                "unknown key 'weight' in models[0]",
            ),
            (format!("{base}tokenizer_source: union\ntokenizer: {{source: base}}\n"), "not both"),
            (format!("{base}tokenizer:\n  tokens: {{x: {{source: {{kind: one}}}}}}\n"), "kind: zero | model_token"),
            (format!("{base}tokenizer:\n  pad_to_multiple_of: 0\n"), "positive integer"),
            (format!("{base}dtype: int8\n"), "not a float dtype"),
            ("merge_method: linear\n".to_string(), "give exactly one of 'models', 'slices' or 'modules' (found none)"),
            (
                "merge_method: slerp\nslices:\n  - sources:\n      - model: a\n        layer_range: [3, 1]\n"
                    .to_string(),
                "layer_range",
            ),
            (format!("{base}parameters:\n  t: [{{filter: a, value: 1}}, 2]\n"), "mixes filters"),
            (format!("{base}parameters:\n  t: {{filter: a, valeu: 1}}\n"), "unknown key 'valeu'"),
        ];
        for (text, want) in cases {
            let e = parse_str(&text).unwrap_err().to_string();
            assert!(e.contains(want), "{want:?} not in {e:?}");
            assert!(e.starts_with("c.yml: "), "{e}");
        }
    }

    #[test]
    fn a_single_module_is_its_slices_and_several_are_refused() {
        let slices =
            "slices:\n  - sources:\n      - {model: a, layer_range: [0, 2]}\n      - {model: b, layer_range: [0, 2]}\n";
        let plain =
            parse_str(&format!("merge_method: slerp\nbase_model: a\nparameters: {{t: 0.5}}\n{slices}")).unwrap();
        let indented: String = slices.lines().map(|l| format!("    {l}\n")).collect();
        // The module's parameters are read before the top level's (mergekit's ConfigReader.parameter order).
        let module = parse_str(&format!(
            "merge_method: slerp\nbase_model: a\nparameters: {{t: 0.9}}\nmodules:\n  default:\n    parameters: {{t: 0.5}}\n{indented}"
        ))
        .unwrap();
        assert_eq!(module, plain);
        let two = format!("merge_method: slerp\nmodules:\n  text:\n{indented}  vision:\n{indented}");
        let e = parse_str(&two).unwrap_err().to_string();
        assert!(e.contains("2 modules (text, vision)") && e.contains("multi-module"), "{e}");
        let e = parse_str(&format!("merge_method: slerp\n{slices}modules: {{default: {{}}}}\n")).unwrap_err();
        assert!(e.to_string().contains("found slices and modules"), "{e}");
    }

    #[test]
    fn lenient_turns_unknown_keys_into_warnings_but_not_unsupported_features() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        std::fs::create_dir(&a).unwrap();
        let cfg = d.path().join("c.yml");
        let text = "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\nselect_topk: 0.5\ndype: float16\n";
        std::fs::write(&cfg, text).unwrap();
        let e = load(&cfg, false).unwrap_err().to_string();
        assert!(
            e.contains("unknown key 'select_topk'") && e.contains(&format!("({}: warn and go on)", Arg::Lenient)),
            "{e}"
        );
        let loaded = load(&cfg, true).unwrap();
        assert_eq!(loaded.warnings.len(), 2, "{:?}", loaded.warnings);
        assert!(loaded.warnings[0].starts_with(&format!("warning: {}: unknown key 'select_topk'", cfg.display())));
        assert!(loaded.warnings[1].contains("'dype'"));
        // The model resolved against the config's directory.
        let Inputs::Models(ms) = &loaded.config.inputs else { panic!() };
        assert_eq!(ms[0].model, a);
        for bad in ["chat_template: chatlm\n", "merge_method: frankenmerge\n", "tokenizer: {pad_to_multiple_of: x}\n"] {
            std::fs::write(
                &cfg,
                format!("{text}{bad}").replace(
                    "merge_method: linear\n",
                    if bad.starts_with("merge") { "" } else { "merge_method: linear\n" },
                ),
            )
            .unwrap();
            assert!(load(&cfg, true).is_err(), "{bad}");
        }
    }

    #[test]
    fn parameters_mergekit_ignores_are_errors_or_lenient_warnings() {
        let d = tempfile::tempdir().unwrap();
        for m in ["base", "a", "b"] {
            std::fs::create_dir(d.path().join(m)).unwrap();
        }
        let cfg = d.path().join("c.yml");
        // A typo at the top level (mergekit drops it: the default `normalize` applies), a name ties does not have
        // on a slice-less model, and a density for the base, which ties never weights.
        let text = "merge_method: ties\nbase_model: base\nmodels:\n  - model: base\n    parameters: {density: 0.5}\n  \
                    - model: a\n    parameters: {weight: 1, density: 0.5, t: 0.3}\n  - model: b\n    parameters: {weight: 1}\n\
                    parameters: {nomalize: false}\n";
        std::fs::write(&cfg, text).unwrap();
        let e = load(&cfg, false).unwrap_err().to_string();
        assert!(
            e.contains("unknown parameter 'nomalize' for ties in parameters (accepted: ")
                && e.contains(&format!("({}: warn and go on)", Arg::Lenient)),
            "{e}"
        );
        let loaded = load(&cfg, true).unwrap();
        let w = &loaded.warnings;
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].contains("'nomalize'") && w[0].ends_with("; ignored"), "{w:?}");
        assert!(w[1].contains("parameter 'density' in models[0].parameters is given for the base model"), "{w:?}");
        assert!(w[2].contains("unknown parameter 't' for ties in models[1].parameters"), "{w:?}");
        let Inputs::Models(ms) = &loaded.config.inputs else { panic!() };
        assert!(loaded.config.parameters.is_empty() && ms[0].parameters.is_empty());
        assert_eq!(ms[1].parameters.keys().collect::<Vec<_>>(), ["density", "weight"]);
        // A density for a model that is not the base stays, and linear weights every model, the base included.
        let linear = text.replace("merge_method: ties", "merge_method: linear").replace("nomalize", "normalize");
        std::fs::write(&cfg, linear.replace(", t: 0.3", "")).unwrap();
        let e = load(&cfg, false).unwrap_err().to_string();
        assert!(e.contains("unknown parameter 'density' for linear in models[0].parameters"), "{e}");
    }

    #[test]
    fn flags_map_to_a_config() {
        let method = |name: &str| crate::merge::method(name).unwrap();
        let f = Flags {
            models: vec!["a".into(), "b".into()],
            base: Some("base".into()),
            per_model: vec![("weight".into(), vec![0.3, 0.7]), ("density".into(), vec![0.5])],
            ..Flags::new(method("ties"))
        };
        let c = f.into_config().unwrap();
        let Inputs::Models(m) = &c.inputs else { panic!() };
        assert_eq!(m[1].parameters["weight"], Setting::num(0.7));
        assert_eq!(m[0].parameters["density"], Setting::num(0.5));
        let f = Flags { models: vec!["a".into()], ..Flags::new(method("ties")) };
        assert!(f.into_config().unwrap_err().to_string().contains(&format!("needs {}", Arg::Base)));
        let f = Flags {
            models: vec!["a".into(), "b".into()],
            per_model: vec![("weight".into(), vec![0.3, 0.7, 1.0])],
            ..Flags::new(method("linear"))
        };
        assert!(f.into_config().unwrap_err().to_string().contains("3 values"));
    }
}
