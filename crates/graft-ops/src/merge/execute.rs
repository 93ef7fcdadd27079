//! Streams a merge plan through the shared executor and writer: each output tensor's inputs are read from their
//! memory maps, merged in f32 chunk by chunk (after the method's pre-passes), narrowed to the output dtype and
//! written in order. Input pages are released as soon as a tensor is written, so peak memory is a few tensors, not
//! the models.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::config::MergeConfig;
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

/// Runs the merge: creates the writer with `opts` (metadata already included), gives it the side files
/// (`super::output::files`: config, tokenizer), committed in the same step as the tensors, and streams every tensor.
pub fn execute(
    plan: &Plan,
    models: &[Checkpoint],
    exec: &Executor,
    out: &Path,
    opts: WriterOptions,
    side_files: Vec<(String, Vec<u8>)>,
    run: &RunOptions,
) -> Result<Written> {
    let method = plan.method;
    run.check(method)?;
    let inputs_of = |i: usize| -> Result<Option<(TensorInputs, &super::params::TensorParams)>> {
        let t = &plan.tensors[i];
        let Op::Merge { inputs, base, params } = &t.op else { return Ok(None) };
        let pages = inputs.iter().map(|s| Read::new(&models[s.model], &s.tensor)).collect::<Result<Vec<_>>>()?;
        let views = pages.iter().map(|p| p.tensor).collect();
        let arithmetic = if run.compat { Arithmetic::Mergekit(plan.working_dtype(models, i)) } else { Arithmetic::F32 };
        Ok(Some((
            TensorInputs { name: t.name.clone(), shape: t.shape.clone(), views, base: *base, arithmetic, pages },
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
    for (name, bytes) in side_files {
        writer.add_file(&name, bytes)?;
    }
    let written = exec.write(writer, "merge", |i, _| {
        let t = &plan.tensors[i];
        match &t.op {
            Op::Copy { from, .. } => Produce::input(&models[from.model], &from.tensor),
            Op::Merge { inputs, .. } => {
                let (ti, params) = inputs_of(i)?.expect("a merge op");
                let reads = inputs.iter().map(|s| Read::new(&models[s.model], &s.tensor)).collect::<Result<_>>()?;
                let kernel = method.prepare(ti, params, &ctx)?;
                Ok(Produce::pieces(reads, move |r, sink| kernel.compute_pieces(r, sink)))
            }
        }
    })?;
    Ok(written)
}
