//! Tensors that stand in for some of the merged models' own: rows of a vocabulary remapped to the output tokenizer
//! (`super::vocab`). Each batch is written as a small safetensors file in a temporary directory beside the output,
//! opened like any input, and the plan reads it in place of the original (`super::plan::build_with`). Owns that
//! temporary directory: dropping the substitutes removes it. (LoRA adapters need no substitutes: the model's
//! checkpoint applies them as it is read, `super::lora`.)

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;

use crate::checkpoint::commit::TempDir;
use crate::checkpoint::{Checkpoint, Dtype};
use crate::error::{Error, Result};

/// Tensors that replace inputs' originals in the plan (`super::plan::build_with`): remapped vocabulary rows. Their
/// files live in a temporary directory beside the output until this is dropped.
#[derive(Default)]
pub struct Substitutes {
    /// (model index, tensor name) -> index into `checkpoints`.
    pub map: BTreeMap<(usize, String), usize>,
    pub checkpoints: Vec<Checkpoint>,
    dir: Option<TempDir>,
}

impl Substitutes {
    /// Writes `tensors` (name, dtype, shape, bytes) as substitutes of model `model`'s; `kind` names the file.
    pub fn add(
        &mut self,
        model: usize,
        tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
        out: &Path,
        kind: &str,
    ) -> Result<()> {
        if self.dir.is_none() {
            let (parent, name) = crate::checkpoint::commit::split(out)?;
            let mut stem = OsString::from(format!("{kind}-"));
            stem.push(&name);
            self.dir = Some(TempDir::create(&parent, &stem).map_err(|e| Error::io(&parent, e))?);
        }
        let dir = &self.dir.as_ref().expect("created above").path;
        let file = dir.join(format!("{kind}-{model}-{}.safetensors", self.checkpoints.len()));
        write_safetensors(&file, &tensors)?;
        for (name, ..) in &tensors {
            self.map.insert((model, name.clone()), self.checkpoints.len());
        }
        self.checkpoints.push(Checkpoint::open(&file)?);
        Ok(())
    }
}

/// Writes a plain safetensors file (header, then the tensors in order).
fn write_safetensors(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) -> Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
    }
    let mut text = serde_json::Value::Object(header).to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut file = Vec::with_capacity(8 + text.len() + offset);
    file.extend_from_slice(&(text.len() as u64).to_le_bytes());
    file.extend_from_slice(&text);
    for (.., bytes) in tensors {
        file.extend_from_slice(bytes);
    }
    std::fs::write(path, file).map_err(|e| Error::io(path, e))
}
