//! LoRA inputs: a `model+adapter` reference (mergekit's form) names a model and a PEFT adapter directory
//! (`adapter_config.json` + `adapter_model.safetensors`); the merge reads the model with the adapter applied,
//! `W + s * B @ A` with `s = lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`.
//!
//! `split` tells such a reference from a path (a path that exists wins; otherwise the last `+` splits it). `open`
//! opens the model and gives each adapted weight its update (`checkpoint::low_rank`): the checkpoint then reads
//! those weights with the adapter applied, range by range as they are streamed (products accumulated in f64, the
//! sum rounded once to f32, then to the weight's stored dtype), so every method, the SNR selection and every copy see
//! the adapted model like a baked-in one, with no adapted copy on disk or in memory.
//! Adapters with what this formula does not cover (DoRA, `fan_in_fan_out`, per-module rank or alpha patterns,
//! embedding LoRA, `modules_to_save` tensors) are refused naming the file and key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::checkpoint::{Checkpoint, LowRankUpdate};
use crate::error::{Error, Result};
use crate::hub::{self, CacheEnv};

/// The model and adapter of a `model+adapter` reference; None for a plain path or id.
pub fn split(reference: &Path) -> Option<(PathBuf, PathBuf)> {
    if reference.exists() {
        return None;
    }
    let s = reference.to_str()?;
    let (model, adapter) = s.rsplit_once('+')?;
    (!model.is_empty() && !adapter.is_empty()).then(|| (PathBuf::from(model), PathBuf::from(adapter)))
}

/// Resolves a model reference that may carry `+adapter`: each part as `hub::resolve` does (local path, else cached
/// Hugging Face id), joined again with `+`.
pub fn resolve(reference: &str, rel_dir: Option<&Path>, env: &CacheEnv, what: &str) -> Result<PathBuf> {
    match split(Path::new(reference)) {
        Some((model, adapter)) if hub::resolve(reference, rel_dir, env, what).is_err() => {
            let m = hub::resolve(&model.to_string_lossy(), rel_dir, env, what)?;
            let a = hub::resolve(&adapter.to_string_lossy(), rel_dir, env, &format!("{what} (LoRA adapter)"))?;
            Ok(PathBuf::from(format!("{}+{}", m.display(), a.display())))
        }
        _ => hub::resolve(reference, rel_dir, env, what),
    }
}

/// Opens a model reference: the model's checkpoint, reading its adapted weights with the adapter applied if the
/// reference names one.
pub fn open(reference: &Path) -> Result<Checkpoint> {
    match split(reference) {
        Some((model, adapter)) => {
            let mut ck = Checkpoint::open(&model)?;
            let adapter = Adapter::open(&adapter)?;
            for name in adapter.targets.keys() {
                let update = adapter.update(&ck, name)?;
                ck.set_update(name, update)?;
            }
            Ok(ck)
        }
        None => Checkpoint::open(reference),
    }
}

/// A PEFT LoRA adapter: its scaling and, per adapted weight, the names of its A and B matrices.
pub struct Adapter {
    pub dir: PathBuf,
    pub scale: f64,
    /// target weight name -> (lora_A name, lora_B name)
    pub targets: BTreeMap<String, (String, String)>,
    tensors: Checkpoint,
}

impl Adapter {
    pub fn open(dir: &Path) -> Result<Adapter> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::usage(format!("{}: no adapter_config.json; a LoRA adapter is a PEFT directory", dir.display()))
            } else {
                Error::io(&cfg_path, e)
            }
        })?;
        let cfg: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(&cfg_path, format!("not valid JSON: {e}")))?;
        let bad = |msg: String| Error::format(&cfg_path, msg);
        if let Some(t) = cfg.get("peft_type").and_then(|t| t.as_str()) {
            if t != "LORA" {
                return Err(bad(format!("peft_type is {t}; graft applies LORA adapters only")));
            }
        }
        let r = cfg
            .get("r")
            .and_then(|v| v.as_f64())
            .filter(|r| *r > 0.0)
            .ok_or_else(|| bad("'r' must be a positive number".into()))?;
        let alpha =
            cfg.get("lora_alpha").and_then(|v| v.as_f64()).ok_or_else(|| bad("'lora_alpha' is missing".into()))?;
        let flag = |k: &str| cfg.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
        for unsupported in ["use_dora", "fan_in_fan_out"] {
            if flag(unsupported) {
                return Err(bad(format!("'{unsupported}: true' is not supported by graft")));
            }
        }
        for pattern in ["rank_pattern", "alpha_pattern"] {
            if cfg.get(pattern).and_then(|p| p.as_object()).is_some_and(|p| !p.is_empty()) {
                return Err(bad(format!("'{pattern}' (per-module rank or alpha) is not supported by graft")));
            }
        }
        let scale = if flag("use_rslora") { alpha / r.sqrt() } else { alpha / r };
        let file = dir.join("adapter_model.safetensors");
        if !file.is_file() {
            return Err(Error::usage(format!(
                "{}: no adapter_model.safetensors (graft reads safetensors adapters only)",
                dir.display()
            )));
        }
        let tensors = Checkpoint::open(&file)?;
        let mut targets: BTreeMap<String, (Option<String>, Option<String>)> = BTreeMap::new();
        for name in tensors.names() {
            let stripped = name.strip_prefix("base_model.model.").unwrap_or(name);
            let (module, which) = if let Some(m) = stripped.strip_suffix(".lora_A.weight") {
                (m, 0)
            } else if let Some(m) = stripped.strip_suffix(".lora_B.weight") {
                (m, 1)
            } else {
                return Err(Error::tensor(
                    &file,
                    name,
                    "not a lora_A/lora_B weight (embedding LoRA, biases and modules_to_save are not supported by graft)",
                ));
            };
            let slot = targets.entry(format!("{module}.weight")).or_default();
            if which == 0 {
                slot.0 = Some(name.to_string());
            } else {
                slot.1 = Some(name.to_string());
            }
        }
        let targets = targets
            .into_iter()
            .map(|(t, (a, b))| match (a, b) {
                (Some(a), Some(b)) => Ok((t, (a, b))),
                (a, _) => Err(Error::tensor(
                    &file,
                    &t,
                    format!(
                        "has lora_{} but not lora_{}",
                        if a.is_some() { "A" } else { "B" },
                        if a.is_some() { "B" } else { "A" }
                    ),
                )),
            })
            .collect::<Result<_>>()?;
        Ok(Adapter { dir: dir.to_path_buf(), scale, targets, tensors })
    }

    /// The update `scale * B @ A` of target `name` of `model`, checked against the weight.
    pub fn update(&self, model: &Checkpoint, name: &str) -> Result<LowRankUpdate> {
        let (a_name, b_name) = &self.targets[name];
        let file = self.dir.join("adapter_model.safetensors");
        let w = model.info(name).ok_or_else(|| {
            Error::tensor(&file, a_name, format!("adapts '{name}', which {} does not have", model.path().display()))
        })?;
        let (a, b) = (self.tensors.tensor(a_name)?, self.tensors.tensor(b_name)?);
        let (out, inp) = match w.shape.as_slice() {
            [o, i] => (*o, *i),
            s => return Err(Error::tensor(model.path(), name, format!("is {s:?}; LoRA adapts 2-D weights"))),
        };
        let rank = a.shape.first().copied().unwrap_or(0);
        if a.shape != [rank, inp] || b.shape != [out, rank] {
            return Err(Error::tensor(
                &file,
                a_name,
                format!("A is {:?} and B is {:?}, which do not fit '{name}' {:?}", a.shape, b.shape, w.shape),
            ));
        }
        if !w.dtype.is_float() {
            return Err(Error::tensor(model.path(), name, format!("is {}; LoRA adapts float weights", w.dtype)));
        }
        LowRankUpdate::new(out, inp, a.to_f32()?, b.to_f32()?, self.scale, &file)
            .ok_or_else(|| Error::tensor(&file, a_name, "internal: the factors do not fit the weight"))
    }
}
