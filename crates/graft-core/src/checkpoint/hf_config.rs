//! A checkpoint's Hugging Face `config.json`: read it, patch the fields that must describe the tensors actually
//! written (dtype, layer count, vocabulary size), write it atomically (`super::write_atomic`: temp file + rename, so
//! a reader never sees half a file). Every command that rewrites `config.json` goes through here.

use std::path::Path;

use serde_json::{Map, Value};

use super::Dtype;
use crate::error::{Error, Result};

/// The keys different architectures use for the number of transformer blocks.
pub const LAYER_KEYS: &[&str] = &["num_hidden_layers", "n_layer", "num_layers"];

/// What the written tensors say, to be reflected in the config. `None` leaves a field as it was.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Patch {
    pub dtype: Option<Dtype>,
    pub layers: Option<usize>,
    pub vocab_size: Option<usize>,
}

/// transformers' name of a float dtype (`torch_dtype`/`dtype` values); None for dtypes it has no name for here.
pub fn torch_name(d: Dtype) -> Option<&'static str> {
    match d {
        Dtype::BF16 => Some("bfloat16"),
        Dtype::F16 => Some("float16"),
        Dtype::F32 => Some("float32"),
        Dtype::F64 => Some("float64"),
        _ => None,
    }
}

/// Reads `path` as a JSON object; None when the file does not exist.
pub fn read(path: &Path) -> Result<Option<Map<String, Value>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    match serde_json::from_str(&text) {
        Ok(Value::Object(m)) => Ok(Some(m)),
        Ok(_) => Err(Error::format(path, "config.json is not a JSON object")),
        Err(e) => Err(Error::format(path, format!("not valid JSON: {e}"))),
    }
}

/// Sets the patched fields. `dtype` is always written (transformers >= 4.56 reads it), `torch_dtype` only where the
/// config already had it (older readers); the layer count goes to whichever layer key the config uses; `vocab_size`
/// is set at the top level and in a nested `text_config` (multimodal configs) where the config has one.
pub fn patch(cfg: &mut Map<String, Value>, p: &Patch) {
    if let Some(name) = p.dtype.and_then(torch_name) {
        cfg.insert("dtype".into(), Value::from(name));
        if cfg.contains_key("torch_dtype") {
            cfg.insert("torch_dtype".into(), Value::from(name));
        }
    }
    if let Some(n) = p.layers {
        for key in LAYER_KEYS {
            if cfg.contains_key(*key) {
                cfg.insert(key.to_string(), Value::from(n));
            }
        }
    }
    if let Some(v) = p.vocab_size {
        if cfg.contains_key("vocab_size") {
            cfg.insert("vocab_size".into(), Value::from(v));
        }
        if let Some(Value::Object(text)) = cfg.get_mut("text_config") {
            if text.contains_key("vocab_size") {
                text.insert("vocab_size".into(), Value::from(v));
            }
        }
    }
}

/// Writes `cfg` as pretty JSON (Hugging Face's own layout: two-space indent, trailing newline) to `to`, atomically.
pub fn write(to: &Path, cfg: &Map<String, Value>) -> Result<()> {
    super::write_atomic(to, to_text(cfg).as_bytes())
}

/// `cfg` as Hugging Face writes it: pretty JSON, two-space indent, trailing newline.
pub fn to_text(cfg: &Map<String, Value>) -> String {
    serde_json::to_string_pretty(cfg).expect("a JSON map serializes") + "\n"
}

/// The text of `from` patched with `p`; None when `from` does not exist.
pub fn patched_text(from: &Path, p: &Patch) -> Result<Option<String>> {
    let Some(mut cfg) = read(from)? else { return Ok(None) };
    patch(&mut cfg, p);
    Ok(Some(to_text(&cfg)))
}

/// Reads `from`, patches it and writes it to `to`; does nothing when `from` does not exist.
pub fn copy_patched(from: &Path, to: &Path, p: &Patch) -> Result<bool> {
    let Some(mut cfg) = read(from)? else { return Ok(false) };
    patch(&mut cfg, p);
    write(to, &cfg)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn patches_dtype_layers_and_vocab() {
        let mut c = obj(serde_json::json!({
            "torch_dtype": "bfloat16", "num_hidden_layers": 2, "vocab_size": 300,
            "text_config": { "vocab_size": 300 }, "hidden_size": 32
        }));
        patch(&mut c, &Patch { dtype: Some(Dtype::F16), layers: Some(5), vocab_size: Some(256) });
        assert_eq!(
            Value::Object(c),
            serde_json::json!({
                "torch_dtype": "float16", "num_hidden_layers": 5, "vocab_size": 256,
                "text_config": { "vocab_size": 256 }, "hidden_size": 32, "dtype": "float16"
            })
        );
    }

    #[test]
    fn leaves_absent_keys_absent_and_unpatched_fields_alone() {
        let mut c = obj(serde_json::json!({ "n_layer": 12, "vocab_size": 10 }));
        patch(&mut c, &Patch { dtype: Some(Dtype::F32), ..Default::default() });
        assert_eq!(Value::Object(c), serde_json::json!({ "n_layer": 12, "vocab_size": 10, "dtype": "float32" }));
    }

    #[test]
    fn round_trips_through_disk_and_reports_bad_json() {
        let d = tempfile::tempdir().unwrap();
        let from = d.path().join("in.json");
        let to = d.path().join("config.json");
        assert!(!copy_patched(&from, &to, &Patch::default()).unwrap());
        std::fs::write(&from, r#"{"b": 1, "a": {"x": [1, 2]}}"#).unwrap();
        assert!(copy_patched(&from, &to, &Patch { layers: Some(3), ..Default::default() }).unwrap());
        // Key order is kept and no temporary file is left behind.
        assert_eq!(
            std::fs::read_to_string(&to).unwrap(),
            "{\n  \"b\": 1,\n  \"a\": {\n    \"x\": [\n      1,\n      2\n    ]\n  }\n}\n"
        );
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2);
        std::fs::write(&from, "[1]").unwrap();
        assert!(read(&from).unwrap_err().to_string().contains("not a JSON object"));
        std::fs::write(&from, "{").unwrap();
        assert!(read(&from).unwrap_err().to_string().contains("not valid JSON"));
    }
}
