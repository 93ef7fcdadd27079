//! Moving a model's tensors in and out of graft checkpoints: loading goes through `checkpoint::Checkpoint` (views
//! widened with `to_f32`), saving through `CheckpointWriter`, in the model's declaration order, with the
//! architecture in the `graft.arch` metadata key so `graft eval` and later runs rebuild the model without flags.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;

use candle_core::{DType, Tensor};

use super::models::{self, ArchSpec};
use super::params::{ParamStore, Slot};
use crate::checkpoint::{Checkpoint, CheckpointWriter, Dtype, TensorDecl, TensorView, WriterOptions, Written};
use crate::error::{Error, Result};

/// The metadata key holding the architecture JSON.
pub const ARCH_KEY: &str = "graft.arch";

/// What a load did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LoadReport {
    pub loaded: usize,
    /// Model tensors left at their initial values because the caller excluded them (e.g. a transferred head).
    pub skipped: Vec<String>,
    /// Checkpoint tensors the model has no use for.
    pub unused: usize,
}

/// The view of `name`, accepting the `bert.` prefix of Hugging Face task models.
fn find<'a>(ck: &'a Checkpoint, name: &str) -> Option<TensorView<'a>> {
    ck.get(name).or_else(|| ck.get(&format!("bert.{name}")))
}

/// Copies every tensor of `ck` into `store`, except those `skip` names. Every other model tensor must be present
/// with the same shape; BatchNorm counters may be missing (they stay 0).
pub fn load(store: &ParamStore, ck: &Checkpoint, skip: &dyn Fn(&str) -> bool) -> Result<LoadReport> {
    let mut report = LoadReport::default();
    let mut used = 0usize;
    for e in store.entries() {
        if skip(&e.name) {
            report.skipped.push(e.name.clone());
            continue;
        }
        let Some(view) = find(ck, &e.name) else {
            if matches!(e.slot, Slot::Counter(_)) {
                continue;
            }
            return Err(Error::tensor(ck.path(), &e.name, "the model needs this tensor but the checkpoint lacks it"));
        };
        used += 1;
        if view.shape != e.shape.as_slice() && !(e.shape.is_empty() && view.numel() == 1) {
            return Err(Error::tensor(
                view.file,
                &e.name,
                format!("shape {:?} in the checkpoint, the model expects {:?}", view.shape, e.shape),
            ));
        }
        match &e.slot {
            Slot::Param(p) => set_var(&p.var, &view, store)?,
            Slot::Buffer(v) => set_var(v, &view, store)?,
            Slot::Counter(c) => c.store(read_int(&view)?, Ordering::Relaxed),
        }
        report.loaded += 1;
    }
    report.unused = ck.len().saturating_sub(used);
    Ok(report)
}

fn set_var(var: &candle_core::Var, view: &TensorView, store: &ParamStore) -> Result<()> {
    let values = view.to_f32()?;
    Tensor::from_vec(values, view.shape, &candle_core::Device::Cpu)
        .and_then(|t| t.to_dtype(store.dtype))
        .and_then(|t| t.to_device(&store.device))
        .and_then(|t| var.set(&t))
        .map_err(|e| Error::tensor(view.file, view.name, format!("cannot load: {e}")))?;
    Ok(())
}

fn read_int(view: &TensorView) -> Result<i64> {
    let d = view.data;
    let v = match view.dtype {
        Dtype::I64 if d.len() >= 8 => i64::from_le_bytes(d[..8].try_into().unwrap()),
        Dtype::I32 if d.len() >= 4 => i32::from_le_bytes(d[..4].try_into().unwrap()) as i64,
        Dtype::U8 if !d.is_empty() => d[0] as i64,
        _ if view.is_float() => view.to_f32()?.first().copied().unwrap_or(0.0) as i64,
        other => return Err(Error::tensor(view.file, view.name, format!("counter of dtype {other} is not supported"))),
    };
    Ok(v)
}

/// Writes every tensor of `store` (F32 for f32 models, F64 for f64 ones, counters as I64) to `out`, with the
/// architecture in the metadata and, for a directory output, a `config.json` describing it.
pub fn save(
    store: &ParamStore,
    spec: &ArchSpec,
    out: &Path,
    mut opts: WriterOptions,
    extra_metadata: BTreeMap<String, String>,
) -> Result<Written> {
    let fdt = if store.dtype == DType::F64 { Dtype::F64 } else { Dtype::F32 };
    let decls: Vec<TensorDecl> = store
        .entries()
        .iter()
        .map(|e| match e.slot {
            Slot::Counter(_) => TensorDecl::new(e.name.clone(), Dtype::I64, vec![]),
            _ => TensorDecl::new(e.name.clone(), fdt, e.shape.clone()),
        })
        .collect();
    opts.metadata.insert(ARCH_KEY.into(), spec.to_json().to_string());
    opts.metadata.extend(extra_metadata);
    let mut w = CheckpointWriter::create(out, decls, opts)?;
    if out.extension().is_none_or(|x| x != "safetensors") {
        let mut config = spec.to_json();
        spec.as_spec().foreign_config(&mut config);
        // Committed with the weights, in the same step.
        w.add_file("config.json", (serde_json::to_string_pretty(&config).unwrap() + "\n").into_bytes())?;
    }
    for e in store.entries() {
        let bytes: Vec<u8> = match &e.slot {
            Slot::Counter(c) => c.load(Ordering::Relaxed).to_le_bytes().to_vec(),
            Slot::Param(p) => tensor_bytes(p.var.as_tensor(), fdt, &e.name)?,
            Slot::Buffer(v) => tensor_bytes(v.as_tensor(), fdt, &e.name)?,
        };
        w.write_tensor(&e.name, &bytes)?;
    }
    w.finish()
}

fn tensor_bytes(t: &Tensor, dt: Dtype, name: &str) -> Result<Vec<u8>> {
    let err = |e: candle_core::Error| Error::invalid(format!("tensor '{name}': {e}"));
    Ok(match dt {
        Dtype::F64 => {
            let v =
                t.flatten_all().and_then(|t| t.to_dtype(DType::F64)).and_then(|t| t.to_vec1::<f64>()).map_err(err)?;
            bytemuck::cast_slice(&v).to_vec()
        }
        _ => {
            let v =
                t.flatten_all().and_then(|t| t.to_dtype(DType::F32)).and_then(|t| t.to_vec1::<f32>()).map_err(err)?;
            bytemuck::cast_slice(&v).to_vec()
        }
    })
}

/// The architecture of a checkpoint: the `graft.arch` metadata key, else the `config.json` next to it.
pub fn arch_of(ck: &Checkpoint) -> Result<Option<ArchSpec>> {
    if let Some(s) = ck.metadata().get(ARCH_KEY) {
        let v: serde_json::Value = serde_json::from_str(s)
            .map_err(|e| Error::format(ck.path(), format!("metadata '{ARCH_KEY}' is not JSON: {e}")))?;
        return ArchSpec::from_json(&v)
            .map(Some)
            .map_err(|e| Error::format(ck.path(), format!("metadata '{ARCH_KEY}': {e}")));
    }
    let Some(dir) = ck.dir() else { return Ok(None) };
    let path = dir.join("config.json");
    let Some(v) = crate::checkpoint::hf_config::read(&path)?.map(serde_json::Value::Object) else { return Ok(None) };
    if v.get("graft_arch").is_none() && models::reading_config(&v, models::Task::Classifier).is_none() {
        return Ok(None);
    }
    ArchSpec::from_json(&v).map(Some).map_err(|e| Error::format(&path, e))
}
