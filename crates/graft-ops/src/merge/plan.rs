//! The merge plan: for every output tensor, which input tensors feed it (model and tensor name), with which resolved
//! parameters, or which model it is copied from. Building the plan checks that the inputs fit together (every
//! mismatch named at once) and resolves every parameter, so a bad config fails before any tensor is computed. The
//! plan is also what `--dry-run` prints.
//!
//! Layer gradients use `names::layer_of`: with `models`, a tensor of layer `l` out of `L` sits at `t = l / (L - 1)`
//! (`t = 1` when `L = 1`, as mergekit does); tensors outside layers sit at `t = 0`. With `slices`, `t` runs over each
//! slice's layers and output layers are renumbered consecutively (mergekit's rule). Unlike mergekit, which only
//! merges the tensors its architecture tables list, graft keeps every tensor: non-float tensors are copied from the
//! reference model (the base, else the first model).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use super::config::{Inputs, MergeConfig};
use super::method::{serialize_name, MergeMethod};
use super::params::{resolve, Scalar, Scope, Settings, TensorParams};
use crate::checkpoint::{Checkpoint, Dtype, TensorInfo};
use crate::error::{Arg, Error, Result};
use crate::names::layer_of;

/// One input tensor: a model (index into `Plan::models`) and a tensor name in it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Source {
    pub model: usize,
    pub tensor: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Computed by the merge method from `inputs` (`base` indexes `inputs`).
    Merge { inputs: Vec<Source>, base: Option<usize>, params: TensorParams },
    /// Copied (converted to the output dtype when it is a float tensor).
    Copy { from: Source, reason: String },
}

#[derive(Clone, Debug, Serialize)]
pub struct PlannedTensor {
    pub name: String,
    #[serde(serialize_with = "dtype_name")]
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Relative layer position used for gradients.
    pub t: f64,
    #[serde(flatten)]
    pub op: Op,
}

fn dtype_name<S: serde::Serializer>(d: &Dtype, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(d.name())
}

#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    /// The method, resolved once from the config (printed by name).
    #[serde(serialize_with = "serialize_name")]
    pub method: &'static dyn MergeMethod,
    /// Every model read, indexed by `Source::model`.
    pub models: Vec<PathBuf>,
    /// The method's base model, if it has one.
    pub base: Option<usize>,
    /// The model unmerged tensors come from.
    pub reference: usize,
    /// Number of layers of the output (slices renumber them).
    pub layers: usize,
    /// Set when slices change the layer count: the output config's `num_hidden_layers`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_layer_count: Option<usize>,
    /// mergekit's `dtype` (graft's mergekit mode computes in it).
    #[serde(skip)]
    pub dtype: Option<Dtype>,
    pub tensors: Vec<PlannedTensor>,
}

impl Plan {
    pub fn merged_count(&self) -> usize {
        self.tensors.iter().filter(|t| matches!(t.op, Op::Merge { .. })).count()
    }

    /// The working dtype mergekit would compute tensor `i` in: the config's `dtype`, else the inputs' promoted dtype.
    pub fn working_dtype(&self, models: &[Checkpoint], i: usize) -> Dtype {
        if let Some(d) = self.dtype {
            return d;
        }
        match &self.tensors[i].op {
            Op::Merge { inputs, .. } => {
                promote(inputs.iter().filter_map(|s| models[s.model].info(&s.tensor).map(|t| t.dtype)))
            }
            Op::Copy { .. } => self.tensors[i].dtype,
        }
    }
}

/// torch's promotion among float dtypes: the wider wins; bf16 with f16 gives f32.
pub fn promote(dtypes: impl Iterator<Item = Dtype>) -> Dtype {
    let mut out: Option<Dtype> = None;
    for d in dtypes {
        out = Some(match (out, d) {
            (None, d) => d,
            (Some(a), b) if a == b => a,
            (Some(Dtype::F64), _) | (_, Dtype::F64) => Dtype::F64,
            _ => Dtype::F32,
        });
    }
    out.unwrap_or(Dtype::F32)
}

/// Replaces the layer-index component of `name` (its first all-digit component) with `index`.
pub fn rename_layer(name: &str, index: usize) -> String {
    let mut done = false;
    name.split('.')
        .map(|p| {
            if !done && !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) {
                done = true;
                index.to_string()
            } else {
                p.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Whether a tensor outside the layers belongs after them (final norm, output head): decides which slice's models
/// provide it when slices stack layers. Everything else outside layers (embeddings) comes before.
pub fn is_post_layer(name: &str) -> bool {
    const POST: &[&str] = &[
        "lm_head",
        "norm",
        "ln_f",
        "final_layernorm",
        "final_layer_norm",
        "final_norm",
        "head",
        "classifier",
        "score",
        "pooler",
        "output",
    ];
    name.split('.').any(|p| POST.contains(&p))
}

struct Builder<'a> {
    cfg: &'a MergeConfig,
    method: &'static dyn MergeMethod,
    models: &'a [Checkpoint],
    paths: Vec<PathBuf>,
    substitutes: &'a BTreeMap<(usize, String), usize>,
}

/// Builds the plan of `cfg`; `models[i]` is `cfg.model_paths()[i]`, opened.
pub fn build(cfg: &MergeConfig, models: &[Checkpoint]) -> Result<Plan> {
    build_with(cfg, models, &BTreeMap::new())
}

/// Builds the plan of `cfg` reading some tensors from substitutes: `substitutes[(model, tensor)]` indexes `models`
/// past `cfg.model_paths()` (checkpoints appended for the purpose: `super::vocab`'s remapped rows). The plan's
/// sources of those tensors name the substitutes, so every later step reads them.
pub fn build_with(
    cfg: &MergeConfig,
    models: &[Checkpoint],
    substitutes: &BTreeMap<(usize, String), usize>,
) -> Result<Plan> {
    let method = cfg.method;
    let paths = cfg.model_paths();
    let extra = substitutes.values().map(|&i| i + 1).max().unwrap_or(0).saturating_sub(paths.len());
    if paths.len() + extra != models.len() {
        return Err(Error::invalid("internal: the opened models do not match the config's model list"));
    }
    let b = Builder { cfg, method, models, paths, substitutes };
    b.check_parameter_names()?;
    let mut plan = match &cfg.inputs {
        Inputs::Models(_) => b.models_plan(),
        Inputs::Slices(_) => b.slices_plan(),
    }?;
    let redirect = |s: &mut Source| {
        if let Some(&i) = substitutes.get(&(s.model, s.tensor.clone())) {
            s.model = i;
        }
    };
    for t in &mut plan.tensors {
        match &mut t.op {
            Op::Merge { inputs, .. } => inputs.iter_mut().for_each(redirect),
            Op::Copy { from, .. } => redirect(from),
        }
    }
    Ok(plan)
}

impl Builder<'_> {
    /// A tensor of model `model`, or its substitute.
    fn info(&self, model: usize, tensor: &str) -> Option<&TensorInfo> {
        let m = self.substitutes.get(&(model, tensor.to_string())).copied().unwrap_or(model);
        self.models[m].info(tensor)
    }

    fn index(&self, p: &PathBuf) -> usize {
        self.paths.iter().position(|q| q == p).expect("every config path is in the model list")
    }

    fn label(&self, i: usize) -> String {
        self.cfg.label(&self.paths[i])
    }

    fn check_parameter_names(&self) -> Result<()> {
        let defs = self.method.params();
        let accepted = || defs.iter().map(|d| d.name).collect::<Vec<_>>().join(", ");
        let check = |s: &Settings, where_: &str, per_model: bool, is_base: bool| -> Result<()> {
            for name in s.keys() {
                let Some(d) = defs.iter().find(|d| d.name == name) else {
                    return Err(Error::usage(format!(
                        "{where_}: unknown parameter '{name}' for {} (accepted: {})",
                        self.method.name(),
                        accepted()
                    )));
                };
                if per_model && d.scope == Scope::Shared {
                    return Err(Error::usage(format!(
                        "{where_}: parameter '{name}' of {} is shared by all models; set it under the top-level \
                         (or slice) parameters",
                        self.method.name()
                    )));
                }
                if per_model && is_base && d.scope == Scope::NonBase {
                    return Err(Error::usage(format!(
                        "{where_}: parameter '{name}' is given for the base model, which {} does not weight; remove it",
                        self.method.name()
                    )));
                }
            }
            Ok(())
        };
        let base_relative = self.method.base_role().takes_base();
        check(&self.cfg.parameters, "parameters", false, false)?;
        match &self.cfg.inputs {
            Inputs::Models(ms) => {
                for (i, m) in ms.iter().enumerate() {
                    let is_base = base_relative && self.cfg.base_model.as_ref() == Some(&m.model);
                    check(&m.parameters, &format!("models[{i}] ({})", self.cfg.label(&m.model)), true, is_base)?;
                }
            }
            Inputs::Slices(ss) => {
                for (i, s) in ss.iter().enumerate() {
                    check(&s.parameters, &format!("slices[{i}].parameters"), false, false)?;
                    let base = s.base_model.as_ref().or(self.cfg.base_model.as_ref());
                    for (j, src) in s.sources.iter().enumerate() {
                        let is_base = base_relative && base == Some(&src.model);
                        check(&src.parameters, &format!("slices[{i}].sources[{j}]"), true, is_base)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn check_contract(&self, n_inputs: usize, base: Option<usize>, what: &str) -> Result<()> {
        let c = self.method.contract();
        let name = self.method.name();
        if n_inputs < c.min_inputs {
            return Err(Error::usage(format!(
                "{name} needs at least {} input models{what}; got {n_inputs}",
                c.min_inputs
            )));
        }
        if let Some(max) = c.max_inputs {
            if n_inputs > max {
                return Err(Error::usage(format!("{name} takes at most {max} input model(s){what}; got {n_inputs}")));
            }
        }
        if c.base.requires_base() && base.is_none() {
            return Err(Error::usage(format!(
                "{name} needs a base model among its inputs{what} (base_model / {})",
                Arg::Base
            )));
        }
        Ok(())
    }

    /// Resolves the parameters of one merged tensor.
    #[allow(clippy::too_many_arguments)]
    fn resolve(
        &self,
        out_name: &str,
        inputs: &[Source],
        scopes: &[Option<&Settings>],
        base: Option<usize>,
        slice: Option<&Settings>,
        t: f64,
    ) -> Result<TensorParams> {
        let global = Some(&self.cfg.parameters);
        let mut p = TensorParams::default();
        for d in self.method.params() {
            if d.scope == Scope::Shared {
                if let Some(v) = resolve(d, &[slice, global], out_name, t)? {
                    p.shared.insert(d.name.to_string(), v);
                }
            }
        }
        for (k, src) in inputs.iter().enumerate() {
            let mut m: BTreeMap<String, Scalar> = BTreeMap::new();
            for d in self.method.params() {
                let applies = d.scope == Scope::Input || (d.scope == Scope::NonBase && Some(k) != base);
                if !applies {
                    continue;
                }
                let v = resolve(d, &[scopes[k], slice, global], &src.tensor, t)
                    .map_err(|e| Error::usage(format!("{}: {e}", self.label(src.model))))?;
                if let Some(v) = v {
                    m.insert(d.name.to_string(), v);
                }
            }
            p.inputs.push(m);
        }
        Ok(p)
    }

    fn out_dtype(&self, float_inputs: impl Iterator<Item = Dtype>) -> Dtype {
        self.cfg.out_dtype.or(self.cfg.dtype).unwrap_or_else(|| promote(float_inputs))
    }

    fn copy(&self, name: &str, from: Source, reason: &str, t: f64) -> PlannedTensor {
        let info = self.info(from.model, &from.tensor).expect("checked");
        let dtype = if info.dtype.is_float() {
            self.cfg.out_dtype.or(self.cfg.dtype).unwrap_or(info.dtype)
        } else {
            info.dtype
        };
        PlannedTensor {
            name: name.to_string(),
            dtype,
            shape: info.shape.clone(),
            t,
            op: Op::Copy { from, reason: reason.to_string() },
        }
    }

    /// One output tensor from same-named tensors of `inputs` (models); copies non-float tensors from `copy_from`.
    #[allow(clippy::too_many_arguments)]
    fn tensor(
        &self,
        out_name: &str,
        inputs: &[Source],
        scopes: &[Option<&Settings>],
        base: Option<usize>,
        copy_from: Source,
        slice: Option<&Settings>,
        t: f64,
    ) -> Result<PlannedTensor> {
        let infos: Vec<_> = inputs.iter().map(|s| self.info(s.model, &s.tensor).expect("checked")).collect();
        check_dtype_kinds(self.models, inputs.iter().chain([&copy_from]))?;
        if infos.iter().any(|i| !i.dtype.is_float())
            || !self.info(copy_from.model, &copy_from.tensor).is_some_and(|i| i.dtype.is_float())
        {
            return Ok(self.copy(out_name, copy_from, "not a float tensor", t));
        }
        let params = self.resolve(out_name, inputs, scopes, base, slice, t)?;
        if self.method.copies_unchanged(&params) {
            return Ok(self.copy(out_name, inputs[0].clone(), self.method.name(), t));
        }
        Ok(PlannedTensor {
            name: out_name.to_string(),
            dtype: self.out_dtype(infos.iter().map(|i| i.dtype)),
            shape: infos[0].shape.clone(),
            t,
            op: Op::Merge { inputs: inputs.to_vec(), base, params },
        })
    }

    /// Checks that `others` hold exactly the tensors (names and shapes) of `reference`. With `copy_mismatched`,
    /// shape differences are returned (names) instead of refused; missing or extra tensors are always errors.
    fn check_same_tensors(&self, reference: usize, others: &[usize]) -> Result<Vec<String>> {
        let mut mismatched: Vec<String> = Vec::new();
        let r = &self.models[reference];
        let mut problems = Vec::new();
        let others: Vec<usize> = others.iter().copied().filter(|&o| o != reference).collect();
        // With two or more other models, a difference they all share is the reference's: name it, not each of them.
        let shared_by_all = |names: Vec<&str>, has: &dyn Fn(&Checkpoint, &str) -> bool| -> Vec<String> {
            if others.len() < 2 {
                return Vec::new();
            }
            names.into_iter().filter(|n| others.iter().all(|&o| has(&self.models[o], n))).map(String::from).collect()
        };
        let first = others.first().map(|&o| &self.models[o]);
        let ref_lacks = first.map_or(Vec::new(), |m| {
            shared_by_all(m.names().filter(|n| !r.contains(n)).collect(), &|c: &Checkpoint, n: &str| c.contains(n))
        });
        let ref_extra = shared_by_all(r.names().collect(), &|c: &Checkpoint, n: &str| !c.contains(n));
        if !ref_lacks.is_empty() {
            let names: Vec<&str> = ref_lacks.iter().map(String::as_str).collect();
            problems.push(format!("{} lacks {} (every other model has it)", self.label(reference), quote_list(&names)));
        }
        if !ref_extra.is_empty() {
            let names: Vec<&str> = ref_extra.iter().map(String::as_str).collect();
            problems.push(format!(
                "{} has extra {} (no other model has it)",
                self.label(reference),
                quote_list(&names)
            ));
        }
        for &o in &others {
            let m = &self.models[o];
            let missing: Vec<&str> =
                r.names().filter(|n| !m.contains(n) && !ref_extra.iter().any(|x| x == n)).collect();
            let extra: Vec<&str> = m.names().filter(|n| !r.contains(n) && !ref_lacks.iter().any(|x| x == n)).collect();
            if !missing.is_empty() {
                problems.push(format!("{} lacks {}", self.label(o), quote_list(&missing)));
            }
            if !extra.is_empty() {
                problems.push(format!("{} has extra {}", self.label(o), quote_list(&extra)));
            }
            for info in r.infos().iter().filter_map(|i| self.info(reference, &i.name)) {
                if let Some(oi) = self.info(o, &info.name) {
                    if oi.shape != info.shape && self.cfg.copy_mismatched {
                        if !mismatched.contains(&info.name) {
                            mismatched.push(info.name.clone());
                        }
                    } else if oi.shape != info.shape {
                        problems.push(format!(
                            "'{}' is {:?} in {} but {:?} in {}",
                            info.name,
                            info.shape,
                            self.label(reference),
                            oi.shape,
                            self.label(o)
                        ));
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(mismatched)
        } else {
            Err(Error::invalid(format!("the input models do not fit together: {}", problems.join("; "))))
        }
    }

    fn reference(&self, base: Option<usize>, first: usize) -> usize {
        self.cfg.reference.as_ref().map(|p| self.index(p)).or(base).unwrap_or(first)
    }

    fn models_plan(&self) -> Result<Plan> {
        let Inputs::Models(entries) = &self.cfg.inputs else { unreachable!() };
        let mut inputs: Vec<usize> = entries.iter().map(|e| self.index(&e.model)).collect();
        let mut scopes: Vec<Option<&Settings>> = entries.iter().map(|e| Some(&e.parameters)).collect();
        // mergekit adds a base model that the models list leaves out.
        if let Some(b) = &self.cfg.base_model {
            let bi = self.index(b);
            if !inputs.contains(&bi) {
                inputs.push(bi);
                scopes.push(None);
            }
        }
        let mut seen = Vec::new();
        for &i in &inputs {
            if seen.contains(&i) {
                return Err(Error::usage(format!("model {} is listed twice", self.label(i))));
            }
            seen.push(i);
        }
        let base_pos = if self.method.base_role().takes_base() {
            self.cfg.base_model.as_ref().map(|b| inputs.iter().position(|&i| i == self.index(b)).unwrap())
        } else {
            None
        };
        self.check_contract(inputs.len(), base_pos, "")?;
        let primary = base_pos.map(|p| inputs[p]).unwrap_or(inputs[0]);
        let reference = self.reference(base_pos.map(|p| inputs[p]), inputs[0]);
        let mut all = inputs.clone();
        all.push(reference);
        let mismatched = self.check_same_tensors(primary, &all)?;
        let ck = &self.models[primary];
        let layers = ck.names().filter_map(layer_of).max().map_or(0, |m| m + 1);
        let mut tensors = Vec::with_capacity(ck.len());
        for info in ck.infos().iter().filter_map(|i| self.info(primary, &i.name)) {
            let t = match layer_of(&info.name) {
                Some(l) if layers > 1 => l as f64 / (layers - 1) as f64,
                Some(_) => 1.0,
                None => 0.0,
            };
            let srcs: Vec<Source> = inputs.iter().map(|&m| Source { model: m, tensor: info.name.clone() }).collect();
            let from = Source { model: reference, tensor: info.name.clone() };
            if mismatched.contains(&info.name) {
                tensors.push(self.copy(&info.name, from, "shapes differ between the inputs", t));
                continue;
            }
            tensors.push(self.tensor(&info.name, &srcs, &scopes, base_pos, from, None, t)?);
        }
        Ok(Plan {
            method: self.method,
            models: self.paths.clone(),
            base: base_pos.map(|p| inputs[p]),
            reference,
            layers,
            new_layer_count: None,
            dtype: self.cfg.dtype,
            tensors,
        })
    }

    fn slices_plan(&self) -> Result<Plan> {
        let Inputs::Slices(slices) = &self.cfg.inputs else { unreachable!() };
        // Per model: layer index -> its tensors (storage order).
        let by_layer: Vec<BTreeMap<usize, Vec<&str>>> = self
            .models
            .iter()
            .map(|ck| {
                let mut map: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
                for n in ck.names() {
                    if let Some(l) = layer_of(n) {
                        map.entry(l).or_default().push(n);
                    }
                }
                map
            })
            .collect();
        let mut problems: Vec<String> = Vec::new();
        let mut tensors: Vec<PlannedTensor> = Vec::new();
        let mut layer_tensors: Vec<PlannedTensor> = Vec::new();
        let mut out_layer = 0usize;
        let base_relative = self.method.base_role().takes_base();
        let slice_base = |s: &super::config::SliceDef| -> Result<Option<usize>> {
            if !base_relative {
                return Ok(None);
            }
            let Some(b) = s.base_model.as_ref().or(self.cfg.base_model.as_ref()) else { return Ok(None) };
            let bi = self.index(b);
            match s.sources.iter().position(|src| self.index(&src.model) == bi) {
                Some(p) => Ok(Some(p)),
                None => Err(Error::usage(format!("base model {} is not among the slice's sources", self.cfg.label(b)))),
            }
        };
        let mut first_ref = None;
        for (si, s) in slices.iter().enumerate() {
            let what = format!(" in slices[{si}]");
            let len = s.sources[0].layer_range.1 - s.sources[0].layer_range.0;
            if s.sources.iter().any(|src| src.layer_range.1 - src.layer_range.0 != len) {
                return Err(Error::usage(format!("all sources of slices[{si}] must span the same number of layers")));
            }
            let base = slice_base(s)?;
            self.check_contract(s.sources.len(), base, &what)?;
            let models: Vec<usize> = s.sources.iter().map(|src| self.index(&src.model)).collect();
            let reference = self.reference(base.map(|b| models[b]), models[0]);
            first_ref.get_or_insert(reference);
            let scopes: Vec<Option<&Settings>> = s.sources.iter().map(|src| Some(&src.parameters)).collect();
            for offset in 0..len {
                let t = if len > 1 { offset as f64 / (len - 1) as f64 } else { 1.0 };
                let src_layers: Vec<usize> = s.sources.iter().map(|src| src.layer_range.0 + offset).collect();
                let lead: Vec<String> = match by_layer[models[0]].get(&src_layers[0]) {
                    Some(v) => v.iter().map(|n| n.to_string()).collect(),
                    None => {
                        problems.push(format!("{} has no layer {}", self.label(models[0]), src_layers[0]));
                        continue;
                    }
                };
                for name in &lead {
                    let mut srcs = Vec::with_capacity(models.len());
                    for (k, &m) in models.iter().enumerate() {
                        let want = rename_layer(name, src_layers[k]);
                        match self.info(m, &want) {
                            Some(i) if i.shape == self.info(models[0], name).unwrap().shape => {
                                srcs.push(Source { model: m, tensor: want })
                            }
                            Some(i) => problems.push(format!("'{want}' is {:?} in {}", i.shape, self.label(m))),
                            None => problems.push(format!("{} lacks '{want}'", self.label(m))),
                        }
                    }
                    if srcs.len() != models.len() {
                        continue;
                    }
                    let ref_pos = models.iter().position(|&m| m == reference);
                    let from = match ref_pos {
                        Some(p) => srcs[p].clone(),
                        None => Source { model: reference, tensor: rename_layer(name, src_layers[0]) },
                    };
                    if self.info(from.model, &from.tensor).is_none() {
                        problems.push(format!("{} lacks '{}'", self.label(from.model), from.tensor));
                        continue;
                    }
                    let out = rename_layer(name, out_layer);
                    layer_tensors.push(self.tensor(&out, &srcs, &scopes, base, from, Some(&s.parameters), t)?);
                }
                out_layer += 1;
            }
        }
        // Tensors outside layers: those before the layers from the first slice's models, after them from the last's.
        for (pos, s) in [(false, &slices[0]), (true, &slices[slices.len() - 1])] {
            let base = slice_base(s)?;
            let models: Vec<usize> = s.sources.iter().map(|src| self.index(&src.model)).collect();
            let reference = self.reference(base.map(|b| models[b]), models[0]);
            let scopes: Vec<Option<&Settings>> = s.sources.iter().map(|src| Some(&src.parameters)).collect();
            let names: Vec<String> = self.models[models[0]]
                .names()
                .filter(|n| layer_of(n).is_none() && is_post_layer(n) == pos)
                .map(str::to_string)
                .collect();
            for name in names {
                let mut ok = true;
                for &m in models.iter().chain([reference].iter()) {
                    match self.info(m, &name) {
                        Some(i) if i.shape == self.info(models[0], &name).unwrap().shape => {}
                        Some(i) => {
                            problems.push(format!("'{name}' is {:?} in {}", i.shape, self.label(m)));
                            ok = false;
                        }
                        None => {
                            problems.push(format!("{} lacks '{name}'", self.label(m)));
                            ok = false;
                        }
                    }
                }
                if !ok {
                    continue;
                }
                let srcs: Vec<Source> = models.iter().map(|&m| Source { model: m, tensor: name.clone() }).collect();
                let from = Source { model: reference, tensor: name.clone() };
                let planned = self.tensor(&name, &srcs, &scopes, base, from, Some(&s.parameters), 0.0)?;
                if pos {
                    layer_tensors.push(planned);
                } else {
                    tensors.push(planned);
                }
            }
        }
        if !problems.is_empty() {
            problems.dedup();
            return Err(Error::invalid(format!("the slices do not fit the models: {}", problems.join("; "))));
        }
        tensors.extend(layer_tensors);
        let reference = first_ref.unwrap_or(0);
        let original = self.models[reference].names().filter_map(layer_of).max().map_or(0, |m| m + 1);
        Ok(Plan {
            method: self.method,
            models: self.paths.clone(),
            base: self.cfg.base_model.as_ref().map(|b| self.index(b)),
            reference,
            layers: out_layer,
            new_layer_count: (out_layer != original).then_some(out_layer),
            dtype: self.cfg.dtype,
            tensors,
        })
    }
}

/// Refuses same-named tensors whose dtypes cannot be merged or copied in place of one another: an integer (or bool,
/// or FP8) tensor against a float one, or two different integer dtypes. Float dtypes mix freely (widened to f32).
/// Without this the plan would silently copy the first model's tensor. The error names both files and the tensor.
fn check_dtype_kinds<'s>(models: &[Checkpoint], sources: impl Iterator<Item = &'s Source>) -> Result<()> {
    let mut first: Option<(&Checkpoint, &str, Dtype)> = None;
    for s in sources {
        let m = &models[s.model];
        let Some(info) = m.info(&s.tensor) else { continue };
        match first {
            None => first = Some((m, &s.tensor, info.dtype)),
            Some((fm, ft, fd)) => {
                let compatible = if fd.is_float() { info.dtype.is_float() } else { fd == info.dtype };
                if !compatible {
                    return Err(Error::invalid(format!(
                        "tensor '{ft}' is {fd} in {} but tensor '{}' is {} in {}: an integer tensor cannot be merged \
                         with a float one or another integer type",
                        fm.path().display(),
                        s.tensor,
                        info.dtype,
                        m.path().display()
                    )));
                }
            }
        }
    }
    Ok(())
}

fn quote_list(v: &[&str]) -> String {
    v.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_renaming_and_classification() {
        assert_eq!(rename_layer("model.layers.3.mlp.up_proj.weight", 11), "model.layers.11.mlp.up_proj.weight");
        assert_eq!(rename_layer("lm_head.weight", 2), "lm_head.weight");
        assert!(
            is_post_layer("lm_head.weight")
                && is_post_layer("model.norm.weight")
                && is_post_layer("transformer.ln_f.bias")
        );
        assert!(!is_post_layer("model.embed_tokens.weight"));
        assert_eq!(promote([Dtype::BF16, Dtype::BF16].into_iter()), Dtype::BF16);
        assert_eq!(promote([Dtype::BF16, Dtype::F16].into_iter()), Dtype::F32);
        assert_eq!(promote([Dtype::BF16, Dtype::F64].into_iter()), Dtype::F64);
    }
}
