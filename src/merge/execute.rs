//! Streams a merge plan through the shared executor and writer: each output tensor's inputs are read from their
//! memory maps, merged in f32 chunk by chunk (after the method's pre-passes), narrowed to the output dtype and
//! written in order. Input pages are released as soon as a tensor is written, so peak memory is a few tensors, not
//! the models.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::config::{MergeConfig, TokenizerSource};
use super::method::{Arithmetic, Ctx, MergeMethod, TensorInputs};
use super::plan::{Op, Plan};
use crate::checkpoint::{Checkpoint, CheckpointWriter, TensorDecl, WriterOptions, Written};
use crate::error::{Error, Result};
use crate::exec::{Executor, Produce, Read};

/// How to compute, beyond what the config says.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Seed of DARE/DELLA masks.
    pub seed: u64,
    /// Reproduce mergekit's arithmetic in its working dtype.
    pub compat: bool,
}

impl RunOptions {
    /// Refuses options the method cannot honour (before any model is opened, when called early).
    pub fn check(&self, method: &dyn MergeMethod) -> Result<()> {
        match method.compat_conflict() {
            Some(why) if self.compat => Err(Error::usage(why)),
            _ => Ok(()),
        }
    }
}

/// What a merge wrote (the `--json` summary).
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub output: PathBuf,
    pub method: String,
    pub models: Vec<PathBuf>,
    pub tensors: usize,
    pub merged: usize,
    pub copied: usize,
    pub bytes: u64,
    pub files: Vec<PathBuf>,
    pub seconds: f64,
}

/// The `__metadata__` entries recording the merge: `graft.merge` (method, models, parameters, options) and
/// `graft.merged_tensors` (a JSON array of the tensors the method computed; the others were copied).
pub fn merge_metadata(
    plan: &Plan,
    cfg: &MergeConfig,
    run: &RunOptions,
    selection: Option<serde_json::Value>,
) -> BTreeMap<String, String> {
    let merged: Vec<&str> =
        plan.tensors.iter().filter(|t| matches!(t.op, Op::Merge { .. })).map(|t| t.name.as_str()).collect();
    let recorded = plan.method.recorded_as();
    let mut m = serde_json::json!({
        "method": recorded.method,
        "models": plan.models,
        "base": plan.base.map(|b| &plan.models[b]),
        "reference": &plan.models[plan.reference],
        "parameters": cfg.parameters,
        "model_parameters": model_parameters(cfg),
        "dtype": cfg.dtype.map(|d| d.name()),
        "out_dtype": cfg.out_dtype.map(|d| d.name()),
        "seed": run.seed,
        "arithmetic": if run.compat { "mergekit" } else { "f32" },
    });
    if let Some((key, value)) = recorded.variant {
        m[key] = serde_json::json!(value);
    }
    if let Some(s) = selection {
        m["selection"] = s;
    }
    BTreeMap::from([
        ("graft.merge".to_string(), m.to_string()),
        ("graft.merged_tensors".to_string(), serde_json::to_string(&merged).unwrap()),
    ])
}

fn model_parameters(cfg: &MergeConfig) -> serde_json::Value {
    use super::config::Inputs;
    match &cfg.inputs {
        Inputs::Models(ms) => serde_json::Value::Array(
            ms.iter().map(|m| serde_json::json!({ "model": m.model, "parameters": m.parameters })).collect(),
        ),
        Inputs::Slices(ss) => serde_json::Value::Array(
            ss.iter()
                .map(|s| {
                    serde_json::json!({
                        "sources": s.sources.iter().map(|src| serde_json::json!({
                            "model": src.model, "layer_range": [src.layer_range.0, src.layer_range.1],
                            "parameters": src.parameters })).collect::<Vec<_>>(),
                        "base_model": s.base_model,
                        "parameters": s.parameters,
                    })
                })
                .collect(),
        ),
    }
}

/// The directory whose config and tokenizer files go with the output, and whether only `config.json` is taken
/// (mergekit writes the base's config always, tokenizer files only with `tokenizer_source`).
pub fn carried(cfg: &MergeConfig, plan: &Plan, models: &[Checkpoint]) -> Option<(PathBuf, bool)> {
    let dir_of = |i: usize| models[i].dir().map(Path::to_path_buf);
    // A selective merge keeps the reference's tensors wherever it merges nothing (its head among them), so its
    // config describes the output; otherwise the base does.
    let primary = if cfg.copy_mismatched { plan.reference } else { plan.base.unwrap_or(plan.reference) };
    match &cfg.tokenizer_source {
        Some(TokenizerSource::Base) => dir_of(primary).map(|d| (d, false)),
        Some(TokenizerSource::Model(p)) => {
            let i = plan.models.iter().position(|m| m == p);
            let dir = match i {
                Some(i) => dir_of(i),
                None => {
                    Some(if p.is_dir() { p.clone() } else { p.parent().map(Path::to_path_buf).unwrap_or_default() })
                }
            };
            dir.map(|d| (d, false))
        }
        None => dir_of(primary).map(|d| (d, true)),
    }
}

/// Runs the merge: creates the writer with `opts` (metadata already included), gives it the carried `config.json`
/// fixed up when slices changed the layer count, and streams every tensor.
pub fn execute(
    plan: &Plan,
    cfg: &MergeConfig,
    models: &[Checkpoint],
    exec: &Executor,
    out: &Path,
    mut opts: WriterOptions,
    run: &RunOptions,
) -> Result<Written> {
    let method = plan.method;
    run.check(method)?;
    let single_file = out.extension().is_some_and(|e| e == "safetensors");
    let carry = if single_file { None } else { carried(cfg, plan, models) };
    let config_only = match &carry {
        Some((dir, true)) => Some(dir.clone()),
        Some((dir, false)) => {
            opts.carry_from = Some(dir.clone());
            None
        }
        None => None,
    };
    let inputs_of = |i: usize| -> Result<Option<(TensorInputs, &super::params::TensorParams)>> {
        let t = &plan.tensors[i];
        let Op::Merge { inputs, base, params } = &t.op else { return Ok(None) };
        let views = inputs.iter().map(|s| models[s.model].tensor(&s.tensor)).collect::<Result<Vec<_>>>()?;
        let arithmetic = if run.compat { Arithmetic::Mergekit(plan.working_dtype(models, i)) } else { Arithmetic::F32 };
        Ok(Some((
            TensorInputs { name: t.name.clone(), shape: t.shape.clone(), views, base: *base, arithmetic },
            params,
        )))
    };
    let mut ctx = Ctx { exec, seed: run.seed, global: None };
    // A method with whole-model statistics gathers them over every merged tensor before the first is written.
    if let Some(pass) = method.global_pass() {
        let mut all = Vec::new();
        for i in 0..plan.tensors.len() {
            if let Some((ti, p)) = inputs_of(i)? {
                all.push((ti, p.clone()));
            }
        }
        let stats = pass.gather(&all, &ctx)?;
        drop(all);
        for t in &plan.tensors {
            if let Op::Merge { inputs, .. } = &t.op {
                inputs.iter().for_each(|s| models[s.model].release(&s.tensor));
            }
        }
        ctx.global = Some(stats);
    }
    let ctx = ctx;
    let decls: Vec<TensorDecl> =
        plan.tensors.iter().map(|t| TensorDecl::new(t.name.clone(), t.dtype, t.shape.clone())).collect();
    let mut writer = CheckpointWriter::create(out, decls, opts)?;
    if !single_file && (config_only.is_some() || plan.new_layer_count.is_some()) {
        // Committed with the weights, in the same swap: never new weights beside an old config.
        let src = config_only.or_else(|| carry.as_ref().map(|c| c.0.clone()));
        if let Some(Some(text)) = src.map(|s| config_text(&s.join("config.json"), plan.new_layer_count)).transpose()? {
            writer.add_file("config.json", text.into_bytes())?;
        }
    }
    let written = exec.write(writer, "merge", |i, _| {
        let t = &plan.tensors[i];
        match &t.op {
            Op::Copy { from, .. } => Produce::input(&models[from.model], &from.tensor),
            Op::Merge { inputs, .. } => {
                let (ti, params) = inputs_of(i)?.expect("a merge op");
                let reads = inputs.iter().map(|s| Read::new(&models[s.model], &s.tensor)).collect::<Result<_>>()?;
                let kernel = method.prepare(ti, params, &ctx)?;
                Ok(Produce::elementwise(reads, move |r| kernel.compute(r)))
            }
        }
    })?;
    Ok(written)
}

/// The text of `from` (a `config.json`), with `num_hidden_layers` set when the layer count changed; None when there
/// is no such file.
fn config_text(from: &Path, layers: Option<usize>) -> Result<Option<String>> {
    if !from.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(from).map_err(|e| Error::io(from, e))?;
    let text = match layers {
        None => text,
        Some(n) => {
            let mut v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::format(from, format!("not valid JSON: {e}")))?;
            if let Some(o) = v.as_object_mut() {
                for key in ["num_hidden_layers", "n_layer", "num_layers"] {
                    if o.contains_key(key) {
                        o.insert(key.to_string(), serde_json::json!(n));
                    }
                }
            }
            serde_json::to_string_pretty(&v).unwrap() + "\n"
        }
    };
    Ok(Some(text))
}
