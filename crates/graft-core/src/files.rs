//! The small whole files graft reads and writes beside checkpoints and runs (configs, manifests, markers,
//! selections, charts, reports): one way to write them (atomically: a temporary beside the file, synced, renamed over
//! it, so a reader or an interrupted run never sees half a file) and one way to read them as JSON (errors name the
//! file). Checkpoints themselves go through `checkpoint::writer`'s commit protocol.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

pub use crate::checkpoint::commit::write_atomic;

/// Reads JSON file `path` as a `T`.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    read_json_if_exists(path)?.ok_or_else(|| Error::io(path, std::io::ErrorKind::NotFound.into()))
}

/// Reads JSON file `path` as a `T`; None when there is no such file.
pub fn read_json_if_exists<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    serde_json::from_str(&text).map(Some).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_write_atomic_wrote_and_names_the_file_on_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.json");
        assert_eq!(read_json_if_exists::<serde_json::Value>(&p).unwrap(), None);
        let missing = read_json::<serde_json::Value>(&p).unwrap_err().to_string();
        assert!(missing.contains("a.json"), "{missing}");
        write_atomic(&p, br#"{"k": [1, 2]}"#).unwrap();
        let v: serde_json::Value = read_json(&p).unwrap();
        assert_eq!(v["k"][1], 2);
        write_atomic(&p, b"{").unwrap();
        let bad = read_json::<serde_json::Value>(&p).unwrap_err().to_string();
        assert!(bad.contains("a.json") && bad.contains("not valid JSON"), "{bad}");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1, "no temporaries left");
    }
}
